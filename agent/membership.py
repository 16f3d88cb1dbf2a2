"""The agent's side of fleet membership: register with the controller, then heartbeat.

The agent keeps trying while the controller is away; containers keep running,
except the HA ones once the lease each acknowledged heartbeat renews has run out
(agent/lease.py): those are killed so that the fleet can run them elsewhere.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import replace

import structlog

from agent.containers import ContainerManager
from agent.ha_restart import LocalRestarts
from agent.host_facts import HostFacts
from agent.lease import Lease
from agent.metrics import HEARTBEAT_SECONDS
from corral.api.client import call
from corral.api.convert import container_to_pb, facts_to_pb
from corral.api.tls import secure_channel
from corral.config import TlsFiles
from corral.errors import CorralError, Unavailable
from corral.v1 import controller_pb2 as cpb
from corral.v1 import controller_pb2_grpc

log = structlog.get_logger("corral.agent.membership")

MIN_DEADLINE = 1.0  # a register or heartbeat unanswered this long is retried on a fresh connection
MAX_DEADLINE = 3.5  # however slow the controller has been: still within the lease (5 s, less 1 s margin)
RETRY_SOON = 0.2
RETRY_DELAY = 1.0


def _jittered(delay: float) -> float:
    """delay +-50%: after a controller restart a thousand agents do not retry in lock-step."""
    return delay * random.uniform(0.5, 1.5)


class Membership:
    def __init__(
        self, controller: str, tls: TlsFiles, facts: HostFacts, containers: ContainerManager, interval: float,
        lease: Lease | None = None,
    ) -> None:  # fmt: skip
        self.lease = lease
        self.controller = controller
        self.tls = tls
        self.facts = facts
        self.containers = containers
        self.interval = interval
        self.registered = asyncio.Event()
        self.restarts = LocalRestarts(containers, lease)
        self._answer_time = 0.0  # recent time the controller took to answer (moving average)

    async def run(self) -> None:
        channel = None
        try:
            last_failure, logged_at = "", 0.0
            while True:
                if channel is None:
                    channel = secure_channel(self.controller, self.tls, server_name="controller", role="controller")
                    stub = controller_pb2_grpc.ControllerServiceStub(channel)
                try:
                    if not self.registered.is_set():
                        await self._register(stub)
                    await self._heartbeat_until_reregister(stub)
                    self.registered.clear()  # the controller forgot this node (it restarted): register
                except Unavailable as exc:
                    # Unanswered within the deadline: after a cut, the connection may sit in TCP's
                    # retransmission back-off for seconds, longer than the lease lasts. Dial afresh
                    # and try again soon (heartbeats again, not a new registration: the controller
                    # says if it needs one), so that a brief flap never costs the lease.
                    log.warning("controller unreachable, retrying", controller=self.controller, error=exc.message)
                    # The next call waits the longest deadline: a controller just (re)starting, or busy,
                    # may need it, and a connection dialled afresh gets through in it once a cut heals.
                    self._answer_time = max(self._answer_time, MAX_DEADLINE / 4)
                    await channel.close(grace=0)
                    channel = None
                    await asyncio.sleep(_jittered(RETRY_SOON))
                except CorralError as exc:
                    self.registered.clear()
                    log.error("controller refused this agent, retrying", controller=self.controller,
                              error=exc.message)  # fmt: skip
                    await asyncio.sleep(_jittered(RETRY_DELAY))
                except Exception as exc:
                    # A bug or a bad file on this host must not end the heartbeats, and with them
                    # the agent (its TaskGroup): report it and go on. The traceback once a minute.
                    self.registered.clear()
                    failure, now = f"{type(exc).__name__}: {exc}", asyncio.get_running_loop().time()
                    if failure != last_failure or now - logged_at >= 60:
                        log.exception("heartbeat failed unexpectedly, retrying", controller=self.controller)
                        last_failure, logged_at = failure, now
                    await asyncio.sleep(_jittered(RETRY_DELAY))
        finally:
            if channel is not None:
                await channel.close()

    def _deadline(self) -> float:
        """Each call's deadline: short, so that one lost in a cut is retried well within the lease,
        but a few times the controller's recent answer time, so that a busy controller is waited
        for rather than flooded with retries on fresh connections."""
        return min(MAX_DEADLINE, max(MIN_DEADLINE, self.interval, 4 * self._answer_time))

    def _answered(self, seconds: float) -> None:
        self._answer_time = seconds if self._answer_time == 0 else 0.7 * self._answer_time + 0.3 * seconds

    async def _snapshot(self):
        containers = [replace(c, ha_restarts=self.restarts.count(c.name)) for c in await self.containers.list()]
        return facts_to_pb(self.facts.current()), [container_to_pb(c) for c in containers]

    async def _register(self, stub) -> None:
        facts, containers = await self._snapshot()
        sent = self.lease.now() if self.lease else 0.0
        began = time.perf_counter()
        reply = await call(
            stub.RegisterNode,
            cpb.RegisterNodeRequest(facts=facts, containers=containers),
            timeout=self._deadline(),
            peer=f"controller {self.controller}",
        )
        self._answered(time.perf_counter() - began)
        if self.lease:
            await self.lease.renewed(sent, reply.lease_seconds, list(reply.ha_containers))
        if reply.heartbeat_interval_seconds > 0:
            self.interval = reply.heartbeat_interval_seconds
        self.registered.set()
        log.info("registered with controller", controller=self.controller, containers=len(containers))

    async def _heartbeat_until_reregister(self, stub) -> None:
        loop = asyncio.get_running_loop()
        next_beat = loop.time()
        while True:
            next_beat += self.interval
            await asyncio.sleep(max(0.0, next_beat - loop.time()))
            facts, containers = await self._snapshot()
            sent = self.lease.now() if self.lease else 0.0
            began = time.perf_counter()
            reply = await call(
                stub.Heartbeat,
                cpb.HeartbeatRequest(node=facts.name, facts=facts, containers=containers),
                timeout=self._deadline(),
                peer=f"controller {self.controller}",
            )
            answered = time.perf_counter() - began
            HEARTBEAT_SECONDS.observe(answered)  # answered ones: a failure raised above
            self._answered(answered)
            if reply.reregister:
                return
            if self.lease:
                await self.lease.renewed(sent, reply.lease_seconds, list(reply.ha_containers))
            await self.restarts.tend(list(reply.ha_keep_running), reply.ha_max_restart,
                                     reply.ha_restart_window_seconds)  # fmt: skip
