"""The `corral` command line: fleet operations for people."""
