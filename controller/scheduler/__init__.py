"""Pure placement decisions: a fleet snapshot in, a plan with reasons out."""
