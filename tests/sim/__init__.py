"""The HA scenario simulator: the real decision code on simulated hosts and simulated time.

tests/sim/clock.py runs asyncio on a simulated clock; tests/sim/world.py holds
the simulated hosts, controller and failover daemons around the real code;
tests/sim/scenario.py reads a scenario (a timed script, the expected story)
and plays it, checking rule 1 (never two running copies) at every tick.
"""
