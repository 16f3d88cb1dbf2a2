"""In-memory stand-ins for the fleet's hosts and for a controller that crashes.

hosts.py    FakeWorld (the hosts, their containers, staging, checkpoints, the shared SAN)
            and FakeAgentPool / FakeAgent: the controller's AgentClient, answered in memory
            with the real agent's rules (agent/containers.py, agent/migration.py,
            agent/storage/ownership.py).
crash.py    CrashingStore: a SqliteStore that "kills the controller" at its k-th durable write.
controller.py  ControllerGen: one life of the controller (store, registry, engine, fleet) over
            the same hosts; a crash ends it and the next one recovers.
"""
