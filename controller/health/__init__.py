"""Node liveness: registry, heartbeats, and (later) leases and fencing."""
