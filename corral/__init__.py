"""Corral: shared pieces of the agent, the controller and the CLI."""
