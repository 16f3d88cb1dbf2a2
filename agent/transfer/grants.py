"""Who may write where: one receive grant per migration operation.

A grant says: SSH user `op-<op_id>`, holding exactly this public key, may run
`rsync --server` (receiving) into `staging_root/<op_id>` until `expires_at`.
The registry lives in memory only: after an agent restart every grant is gone
and the controller asks again (PrepareReceive is repeatable).

Thread-safe: `revoke` is usually run in a worker thread (it removes a tree),
while the SSH server looks grants up on the event loop.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import structlog

from agent.transfer.keys import parse_public_key, public_key_line
from agent.transfer.landing import LandingFile
from corral.errors import InvalidArgument, RuntimeFailure

log = structlog.get_logger("corral.agent.transfer")

USER_PREFIX = "op-"
MAX_TTL = 7 * 24 * 3600.0  # a grant is for one operation, never a standing credential
_OP_ID = re.compile(r"^[a-z0-9-]{1,64}$")

GrantListener = Callable[[str], None]


@dataclass(frozen=True)
class ReceiveGrant:
    op_id: str
    user: str  # "op-<op_id>"
    public_key: str  # "ssh-ed25519 AAAA...": the only key accepted for this user
    staging: Path  # staging_root/<op_id>
    expires_at: float  # time.time() deadline

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.expires_at


def validate_op_id(op_id: str) -> str:
    if not isinstance(op_id, str) or not _OP_ID.fullmatch(op_id) or op_id.strip("-") != op_id:
        raise InvalidArgument(
            f"operation id {op_id!r} is invalid: use 1-64 lowercase letters, digits and '-', "
            "not starting or ending with '-'"
        )
    return op_id


def user_for(op_id: str) -> str:
    return USER_PREFIX + validate_op_id(op_id)


class GrantRegistry:
    def __init__(self, staging_root: Path) -> None:
        self.staging_root = Path(staging_root)
        # 0700: what a grant receives may hold setuid files and device nodes;
        # no local user may reach them before the container owns them.
        self.staging_root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.staging_root, 0o700)
        self._grants: dict[str, ReceiveGrant] = {}  # by user
        self._landings: dict[str, LandingFile] = {}  # by op id: page cache prepared for its images
        self._lock = threading.Lock()
        self._listeners: list[GrantListener] = []

    def add_listener(self, listener: GrantListener) -> None:
        """`listener(user)` runs after that user's grant is replaced or revoked, in the
        caller's thread, before `revoke` removes the staging directory."""
        self._listeners.append(listener)

    def authorize(self, op_id: str, public_key: str, ttl: float) -> ReceiveGrant:
        """Open (or re-open) receiving for `op_id`; replaces the key of an active grant."""
        user = user_for(op_id)
        key = public_key_line(parse_public_key(public_key, "the operation's public key"))
        if not isinstance(ttl, (int, float)) or not (0 < ttl <= MAX_TTL):
            raise InvalidArgument(f"grant lifetime must be between 0 and {MAX_TTL:g} seconds, got {ttl!r}")
        with self._lock:  # with the staging: an expiry sweep must not take it from under a new grant
            staging = self._make_staging(op_id)
            grant = ReceiveGrant(op_id, user, key, staging, time.time() + ttl)
            previous = self._grants.get(user)
            self._grants[user] = grant
        log.info("transfer grant authorized", op=op_id, user=user, ttl=ttl,
                 replaced_key=previous is not None and previous.public_key != key)  # fmt: skip
        if previous is not None:
            self._notify(user)
        return grant

    def attach_landing(self, op_id: str, landing: LandingFile) -> None:
        """The landing file the grant's images stream is to write over; it ends with the grant."""
        with self._lock:
            self._landings[op_id] = landing

    def landing(self, op_id: str) -> LandingFile | None:
        with self._lock:
            return self._landings.get(op_id)

    def stop_landings(self) -> None:
        """Stop writing every landing file (the agent is shutting down); they stay on disk with
        their staging, which the next start sweeps."""
        with self._lock:
            for landing in self._landings.values():
                landing.abandon()

    def _drop_landing(self, op_id: str) -> None:
        landing = self._landings.pop(op_id, None)
        if landing is not None:
            landing.abandon()

    def revoke(self, op_id: str, *, remove_staging: bool) -> None:
        """Close receiving for `op_id` (idempotent): its key stops working and its live
        sessions are cut; with `remove_staging` its staging directory goes too."""
        user = user_for(op_id)
        with self._lock:
            grant = self._grants.pop(user, None)
            self._drop_landing(op_id)
        self._notify(user)  # also for an unknown grant: cut anything still running
        if remove_staging:
            self._remove_staging(self.staging_root / op_id)
        log.info("transfer grant revoked", op=op_id, user=user, was_active=grant is not None,
                 removed_staging=remove_staging)  # fmt: skip

    def lookup(self, user: str) -> ReceiveGrant | None:
        """The live grant of `user`; None if unknown, revoked or expired."""
        with self._lock:
            grant = self._grants.get(user)
        if grant is None or grant.expired():
            return None
        return grant

    def expired(self, now: float | None = None) -> list[str]:
        """Operation ids whose grant has expired but is still registered (their staging is
        still there): for the sweeper, which revokes them once nothing uses their staging."""
        now = time.time() if now is None else now
        with self._lock:
            return [g.op_id for g in self._grants.values() if g.expired(now)]

    def revoke_expired(self, op_id: str) -> bool:
        """Revoke `op_id`'s grant and remove its staging if the grant is (still) expired: the
        operation outlived its credential, nothing more can arrive. False if it was renewed."""
        user = user_for(op_id)
        with self._lock:
            grant = self._grants.get(user)
            if grant is None or not grant.expired():
                return False
            del self._grants[user]
            self._drop_landing(op_id)
            # Out of the way at once (a rename), so a new grant for the op starts afresh.
            doomed = self.staging_root / f".expired-{op_id}-{os.urandom(4).hex()}"
            try:
                os.rename(grant.staging, doomed)
            except FileNotFoundError:
                doomed = None
        self._notify(user)
        if doomed is not None:
            self._remove_staging(doomed)
        log.info("transfer grant expired: staging removed", op=op_id, user=user)
        return True

    # -- internals ---------------------------------------------------------------

    def _notify(self, user: str) -> None:
        for listener in self._listeners:
            try:
                listener(user)
            except Exception:  # a listener's failure must not keep a grant alive
                log.exception("transfer grant listener failed", user=user)

    def _make_staging(self, op_id: str) -> Path:
        staging = self.staging_root / op_id
        try:
            os.mkdir(staging, 0o700)
        except FileExistsError:
            pass
        st = os.lstat(staging)
        if not stat.S_ISDIR(st.st_mode):
            raise RuntimeFailure(f"staging path {staging} exists and is not a directory")
        return staging

    def _remove_staging(self, staging: Path) -> None:
        try:
            st = os.lstat(staging)
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(st.st_mode):
            staging.unlink()
            return
        # rmtree does not follow symlinks: links a grant planted inside stay links.
        for attempt in range(3):
            try:
                shutil.rmtree(staging)
                return
            except FileNotFoundError:
                return
            except OSError as e:
                # A just-killed receiver may still have been finishing a write.
                if attempt == 2:
                    raise RuntimeFailure(f"cannot remove staging directory {staging}: {e}") from None
                time.sleep(0.1)
