"""corral-agent: one per host; runs that host's containers for the controller."""

__version__ = "0.1.0"
