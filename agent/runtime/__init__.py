"""Container runtimes of a host: LXC for containers, CRIU for checkpoints."""
