"""HA scenarios: the real health, fencing and failover decisions on simulated hosts and time.

Each scenario is an operator's story: the hosts and HA containers, the faults
at their times, and every event that must follow, in order (tests/sim: the
simulator, its script language and its log). Rule 1 (never two running
copies) is checked at every tick of every scenario. Defaults: heartbeats every
1 s, suspect after 5 s of silence, dead past the 5 s lease plus 2 s margin, a
fence command that powers the host off in 1 s (60 s timeout, tried again every
10 s), one failover daemon `d1`, 8 GB hosts, 1 GB containers on shared storage.
Heartbeats fall on the half seconds: the last one before a fault at t=2 is the one at t=1.5.
"""

import pytest

from controller.health import guard
from sim.scenario import Scenario
from sim.world import Settings, Violation

NO_FENCE = Settings(fence=False)
WATCHDOG_NO_FENCE = Settings(fence=False, watchdog=10.0)

SCENARIOS = [
    # -- partitions and flaps -----------------------------------------------------------------
    Scenario(
        "a blip of the link (2 s): nothing at all",
        containers="db@n1",
        script="""
            at 2: partition n1
            at 4: heal n1
        """,
        expect="",
        running="db@n1",
    ),
    Scenario(
        "a flapping link, down 2 s and up 1 s, six times: never suspect, nothing fenced or moved",
        containers="db@n1",
        script="at 2: flap n1 down 2 up 1 times 6",
        expect="",
        running="db@n1",
    ),
    Scenario(
        "a partition past the agent's lease but short of suspect: the host fences itself, nobody else moves",
        containers="db@n1",
        script="""
            at 2: partition n1
            at 5.5: heal n1
        """,
        expect="""
            db self-fenced on n1    by 5.5
        """,
        running="db@-",
    ),
    Scenario(
        "flapping slower than suspect but faster than dead (down 6 s, up 1.5 s): suspect and back, never dead",
        containers="db@n1",
        script="at 2: flap n1 down 6 up 1.5 times 3",
        expect="""
            db self-fenced on n1
            n1 suspect
            n1 ready
            n1 suspect
            n1 ready
            n1 suspect
            n1 ready
        """,
        running="db@-",
    ),
    Scenario(
        "a long partition: the cut-off host fences itself before it is dead; fenced, its container moves",
        containers="db@n1",
        script="""
            at 2: partition n1
            at 30: heal n1
        """,
        expect="""
            db self-fenced on n1            by 5.5
            n1 suspect                      by 6.6
            n1 dead                         by 8.6
            n1 powered off by its fence agent
            n1 fenced                       by 9.6
            d1: failover db n1 -> n2
            db started on n2                by 10.6
        """,
        running="db@n2",
    ),
    Scenario(
        "a long partition with no fence command: it fences itself, but nothing moves (dead is not fenced)",
        containers="db@n1",
        settings=NO_FENCE,
        script="""
            at 2: partition n1
            at 20: operator failover db
            at 30: heal n1
        """,
        expect="""
            db self-fenced on n1
            n1 suspect
            n1 dead
            operator: failover of db refused: *n1 is not proven unable to run it (it is dead but not fenced*
            n1 ready
        """,
        running="db@-",  # back, it restarts nothing by itself
    ),
    Scenario(
        "partitioned with a watchdog and no fence command: it fences itself, then the watchdog resets it",
        containers="db@n1",
        settings=WATCHDOG_NO_FENCE,
        script="""
            at 2: partition n1
            at 30: heal n1
        """,
        expect="""
            db self-fenced on n1
            n1 suspect
            n1 dead
            n1 powered off by its watchdog (nothing petted it)     by 15.6
            n1 ready                                               after 30
        """,
        running="db@-",
    ),
    # -- power and agents ------------------------------------------------------------------------
    Scenario(
        "a power cut: dead, fenced by its fence agent, its container runs on the roomiest host",
        containers="db@n1",
        script="at 2: power_off n1",
        expect="""
            n1 powered off by the script
            n1 suspect                    by 6.6
            n1 dead                       by 8.6
            n1 fenced                     by 9.6
            d1: failover db n1 -> n2
            db started on n2              by 10.6
        """,
        running="db@n2",
    ),
    Scenario(
        "a power cut of a host with no HA container: fenced, nothing to move",
        containers="web@n1,noha",
        script="at 2: power_off n1",
        expect="""
            n1 powered off by the script
            n1 suspect
            n1 dead
            n1 fenced
        """,
        running="web@-",
    ),
    Scenario(
        "the fence command fails, then works on a retry 10 s later",
        containers="db@n1",
        script="""
            at 0: fence n1 fails
            at 2: power_off n1
            at 12: fence n1 works
        """,
        expect="""
            n1 powered off by the script
            n1 suspect
            n1 dead
            fencing n1 failed: no answer from the power switch of n1     by 9.6
            n1 fenced                                                    after 18.5
            d1: failover db n1 -> n2
            db started on n2                                             by 20.6
        """,
        running="db@n2",
    ),
    Scenario(
        "the fence command keeps failing: nothing moves, ever; every attempt says why",
        containers="db@n1",
        script="""
            at 0: fence n1 fails
            at 2: kill_agent n1
        """,
        end=40,
        expect="""
            n1's agent died; its containers keep running
            n1 suspect
            n1 dead
            fencing n1 failed: no answer from the power switch of n1
            fencing n1 failed: no answer from the power switch of n1
            fencing n1 failed: no answer from the power switch of n1
            fencing n1 failed: no answer from the power switch of n1
        """,
        running="db@n1",
    ),
    Scenario(
        "the fence command hangs: it is given up after its timeout and tried again at once",
        containers="db@n1",
        script="""
            at 0: fence n1 hangs
            at 2: power_off n1
            at 30: fence n1 works
        """,
        end=80,
        expect="""
            n1 powered off by the script
            n1 suspect
            n1 dead
            fencing n1 failed: `n1` did not finish within 60s    after 68.5
            n1 fenced                                            by 70
            d1: failover db n1 -> n2
            db started on n2
        """,
        running="db@n2",
    ),
    Scenario(
        "the agent dies, its container left running: no failover until the fence has powered it off",
        containers="db@n1",
        script="at 2: kill_agent n1",
        expect="""
            n1's agent died; its containers keep running
            n1 suspect
            n1 dead
            n1 powered off by its fence agent
            n1 fenced
            d1: failover db n1 -> n2
            db started on n2
        """,
        running="db@n2",
    ),
    Scenario(
        "the agent dies and no fence command is configured: never a failover, and the refusal says why",
        containers="db@n1",
        settings=NO_FENCE,
        script="""
            at 2: kill_agent n1
            at 7: operator failover db
            at 30: operator failover db
        """,
        expect="""
            n1's agent died; its containers keep running
            n1 suspect
            operator: failover of db refused: *n1 is not proven unable to run it (it is suspect*
            n1 dead
            operator: failover of db refused: *(it is dead but not fenced: its agent may have died with its containers still running. Power it off, then `corral node fenced n1`)
        """,
        running="db@n1",
    ),
    Scenario(
        "no fence command: the operator powers the host off and says so; then it fails over",
        containers="db@n1",
        settings=NO_FENCE,
        script="""
            at 2: kill_agent n1
            at 20: power_off n1
            at 21: operator fenced n1
        """,
        expect="""
            n1's agent died; its containers keep running
            n1 suspect
            n1 dead
            n1 powered off by the script
            n1 fenced
            d1: failover db n1 -> n2
            db started on n2
        """,
        running="db@n2",
    ),
    Scenario(
        "the operator cannot declare a heartbeating host fenced",
        containers="db@n1",
        script="at 2: operator fenced n1",
        expect="""
            operator: fenced n1 refused: node 'n1' is ready (it heartbeats): it is not fenced
        """,
        running="db@n1",
    ),
    Scenario(
        "the agent restarts within its lease: nothing happens",
        containers="db@n1",
        script="""
            at 2: kill_agent n1
            at 3: start_agent n1
        """,
        expect="""
            n1's agent died; its containers keep running
        """,
        running="db@n1",
    ),
    Scenario(
        "the agent restarts after its lease ran out: it trusts no lost lease and fences at once",
        containers="db@n1",
        settings=NO_FENCE,
        script="""
            at 2: kill_agent n1
            at 7: start_agent n1
        """,
        expect="""
            n1's agent died; its containers keep running
            n1 suspect
            db self-fenced on n1     by 7
            n1 ready
        """,
        running="db@-",
    ),
    Scenario(
        "a hung agent with a watchdog: nothing pets it, the host is reset; with no fence, nothing moves",
        containers="db@n1",
        settings=WATCHDOG_NO_FENCE,
        script="at 2: hang n1",
        expect="""
            n1's agent hangs
            n1 suspect
            n1 dead
            n1 powered off by its watchdog (nothing petted it)    by 12.1
            n1 ready                                              after 14.5
        """,
        running="db@-",
    ),
    Scenario(
        "a hung agent without a watchdog or fence command: its container keeps running, nothing moves",
        containers="db@n1",
        settings=NO_FENCE,
        script="at 2: hang n1",
        end=60,
        expect="""
            n1's agent hangs
            n1 suspect
            n1 dead
        """,
        running="db@n1",
    ),
    Scenario(
        "a hung agent with a watchdog and a fence command: the fence is faster, then the failover",
        containers="db@n1",
        settings=Settings(watchdog=10.0),
        script="at 2: hang n1",
        expect="""
            n1's agent hangs
            n1 suspect
            n1 dead
            n1 powered off by its fence agent
            n1 fenced
            d1: failover db n1 -> n2
            db started on n2
        """,
        running="db@n2",
    ),
    Scenario(
        "a healthy host with a watchdog is never reset",
        containers="db@n1",
        settings=WATCHDOG_NO_FENCE,
        script="at 60: heal n1",
        expect="",
        running="db@n1",
    ),
    Scenario(
        "a host back before it was fenced (its fence failed): nothing restarts by itself",
        containers="db@n1",
        script="""
            at 0: fence n1 fails
            at 2: power_off n1
            at 12: power_on n1
        """,
        expect="""
            n1 powered off by the script
            n1 suspect
            n1 dead
            fencing n1 failed: *
            n1 ready     after 15
        """,
        running="db@-",
    ),
    Scenario(
        "a host back after it was declared dead and failed over: its stale copy stays stopped and goes",
        containers="db@n1",
        script="""
            at 2: power_off n1
            at 20: power_on n1
        """,
        expect="""
            n1 powered off by the script
            n1 suspect
            n1 dead
            n1 fenced
            d1: failover db n1 -> n2
            db started on n2
            n1 ready
            stale db on n1 removed
        """,
        running="db@n2",
    ),
    # -- several faults ----------------------------------------------------------------------------
    Scenario(
        "a double fault: two hosts lost at once, each one's containers go to the survivors",
        hosts="n1 n2 n3 n4",
        containers="db@n1 web@n2",
        script="""
            at 2: power_off n1
            at 2: power_off n2
        """,
        expect="""
            n1 powered off by the script
            n2 powered off by the script
            n1 suspect
            n2 suspect
            n1 dead
            n2 dead
            n1 fenced
            d1: failover db n1 -> n3
            n2 fenced
            d1: failover of db refused: 'db' is busy: a failover of it is under way
            d1: failover web n2 -> n4
            db started on n3
            web started on n4
        """,
        running="db@n3 web@n4",
    ),
    Scenario(
        "a double fault where one fence hangs: the other host's containers move on time",
        hosts="n1 n2 n3 n4",
        containers="db@n1 web@n2",
        script="""
            at 0: fence n1 hangs
            at 2: power_off n1
            at 2: power_off n2
            at 30: fence n1 works
        """,
        end=80,
        expect="""
            n1 powered off by the script
            n2 powered off by the script
            n1 suspect
            n2 suspect
            n1 dead
            n2 dead
            n2 fenced                     by 9.6
            d1: failover web n2 -> n3
            web started on n3             by 10.6
            fencing n1 failed: * did not finish within 60s
            n1 fenced
            d1: failover db n1 -> n4
            db started on n4
        """,
        running="db@n4 web@n3",
    ),
    Scenario(
        "the failover target is lost while the copy starts there: the daemon asks again (the controller still "
        "thinks it ready once more), until the target is suspect and the copy goes to a live host",
        hosts="n1 n2 n3",
        containers="db@n1",
        script="""
            at 2: power_off n1
            at 9.7: power_off n2
        """,
        expect="""
            n1 powered off by the script
            n1 suspect
            n1 dead
            n1 fenced
            d1: failover db n1 -> n2
            n2 powered off by the script
            failover of db to n2 failed: n2 cannot be reached
            d1: failover db n1 -> n2
            failover of db to n2 failed: n2 cannot be reached
            n2 suspect
            d1: failover db n1 -> n3
            db started on n3             by 16.6
            n2 dead
            n2 fenced
        """,
        running="db@n3",
    ),
    # -- the controller and the daemons ---------------------------------------------------------------
    Scenario(
        "the controller restarts mid-failover: the operation resumes; nodes are suspect, counted from the restart",
        containers="db@n1",
        script="""
            at 2: power_off n1
            at 9.7: restart controller
        """,
        expect="""
            n1 powered off by the script
            n1 suspect
            n1 dead
            n1 fenced
            d1: failover db n1 -> n2
            controller stopped
            controller started
            n2 ready
            n3 ready
            db started on n2         by 11.7
            n1 dead                  after 17.7
            n1 fenced
        """,
        running="db@n2",
    ),
    Scenario(
        "the controller restarts while a host is cut off: its lease is counted again from the restart",
        containers="db@n1",
        script="""
            at 2: partition n1
            at 5: restart controller
        """,
        expect="""
            controller stopped
            db self-fenced on n1
            controller started
            n2 ready
            n3 ready
            n1 dead                  after 13
            n1 powered off by its fence agent
            n1 fenced
            d1: failover db n1 -> n2
            db started on n2
        """,
        running="db@n2",
    ),
    Scenario(
        "a controller outage past the lease: every host fences its HA containers, and nothing fails over "
        "(the lease comes from the controller alone until it is replicated)",
        containers="db@n1 web@n2",
        script="""
            at 2: stop controller
            at 12: start controller
        """,
        expect="""
            controller stopped
            db self-fenced on n1
            web self-fenced on n2
            controller started
            n1 ready
            n2 ready
            n3 ready
        """,
        running="db@- web@-",
    ),
    Scenario(
        "two failover daemons at once: only the one holding the lease acts",
        containers="db@n1 web@n1",
        daemons="d1 d2",
        script="at 2: power_off n1",
        expect="""
            n1 powered off by the script
            n1 suspect
            n1 dead
            n1 fenced
            d1: failover db n1 -> n2
            d1: failover web n1 -> n3
            db started on n2
            web started on n3
        """,
        running="db@n2 web@n3",
    ),
    Scenario(
        "the leading daemon stops: the other takes over once its lease ran out, and acts",
        containers="db@n1",
        daemons="d1 d2",
        script="""
            at 1: stop_daemon d1
            at 15: power_off n1
        """,
        expect="""
            d2 leads         by 14.5
            n1 powered off by the script
            n1 suspect
            n1 dead
            n1 fenced
            d2: failover db n1 -> n2
            db started on n2
        """,
        running="db@n2",
    ),
    Scenario(
        "a buggy daemon ignoring the lease asks too: the controller refuses the second request",
        containers="db@n1",
        daemons="d1",
        script="""
            at 1: start_daemon d2 heedless
            at 2: power_off n1
        """,
        expect="""
            n1 powered off by the script
            n1 suspect
            n1 dead
            n1 fenced
            d*: failover db n1 -> n2
            d*: failover of db refused: 'db' is busy: a failover of it is under way
            db started on n2
        """,
        running="db@n2",
    ),
    # -- where they go -------------------------------------------------------------------------------
    Scenario(
        "two HA groups competing for room: each container goes where no member of its group is",
        hosts="n1 n2:4 n3:4",
        containers="db1@n1:2,gdb web1@n1:2,gweb db2@n2:2,gdb web2@n3:2,gweb",
        script="at 2: power_off n1",
        expect="""
            n1 powered off by the script
            n1 suspect
            n1 dead
            n1 fenced
            d1: failover db1 n1 -> n3
            d1: failover web1 n1 -> n2
            db1 started on n3
            web1 started on n2
        """,
        running="db1@n3 web1@n2 db2@n2 web2@n3",
    ),
    Scenario(
        "room for one of two: the higher priority goes first and gets it; the other waits with the reason",
        hosts="n1 n2:4",
        containers="low@n1:3,p1 high@n1:3,p9",
        script="at 2: power_off n1",
        expect="""
            n1 powered off by the script
            n1 suspect
            n1 dead
            n1 fenced
            d1: failover high n1 -> n2
            d1: failover of low refused: 'low' cannot fail over: no node can take it: n2: needs 3G memory, 1G unallocated
            high started on n2
        """,
        running="high@n2 low@-",
    ),
    Scenario(
        "no room anywhere: nothing moves, and the daemon's refusal says why",
        hosts="n1 n2:2 n3:2",
        containers="big@n1:4",
        script="at 2: power_off n1",
        expect="""
            n1 powered off by the script
            n1 suspect
            n1 dead
            n1 fenced
            d1: failover of big refused: 'big' cannot fail over: no node can take it: n2: needs 4G memory, 2G unallocated; n3: needs 4G memory, 2G unallocated
        """,
        running="big@-",
    ),
    Scenario(
        "a container in doubt is never failed over, by the daemon or the operator",
        containers="db@n1,doubt",
        script="""
            at 2: power_off n1
            at 12: operator failover db
        """,
        expect="""
            n1 powered off by the script
            n1 suspect
            n1 dead
            n1 fenced
            operator: failover of db refused: container 'db' is in doubt (the operator's test: not settled)*
        """,
        running="db@-",
    ),
    Scenario(
        "an HA container on local storage cannot fail over: its disk is lost with its host",
        containers="old@n1,local",
        script="at 2: power_off n1",
        expect="""
            n1 powered off by the script
            n1 suspect
            n1 dead
            n1 fenced
            d1: failover of old refused: 'old' is on dir storage: its disk is lost with its node
        """,
        running="old@-",
    ),
]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.title for s in SCENARIOS])
def test_scenario(scenario):
    scenario.run()


def test_the_simulator_catches_a_failover_of_a_dead_but_unfenced_host(monkeypatch):
    """The scenarios can fail: let the guard take a dead host for a lost one, and a host whose agent
    died with its container running gets a second copy started elsewhere; rule 1 trips at once."""
    real = guard.failover_refusal

    def lax(record, node_not_lost):
        return real(record, None if node_not_lost and "dead but not fenced" in node_not_lost else node_not_lost)

    monkeypatch.setattr("sim.world.failover_refusal", lax)
    broken = Scenario("a lax guard", containers="db@n1", settings=NO_FENCE, script="""
        at 2: kill_agent n1
        at 12: operator failover db
    """)  # fmt: skip
    with pytest.raises(Violation, match="db runs on n1, n2 at once"):
        broken.run()


def test_a_wrong_story_is_told_in_full():
    wrong = Scenario("a story that did not happen", containers="db@n1", script="at 2: power_off n1",
                     expect="n1 fenced")  # fmt: skip
    with pytest.raises(AssertionError, match=r"(?s)expected 'n1 fenced'.*the whole story:.*n1 dead"):
        wrong.run()
