"""Storage drivers: where a container root filesystem lives (one driver a module)."""
