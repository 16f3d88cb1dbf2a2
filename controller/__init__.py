"""corral-controller: the fleet — nodes, placement, containers, operations, API."""
