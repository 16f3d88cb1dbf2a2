"""An operator live-migrates a Debian container running a real service (systemd as init,
an HTTP server as a systemd unit): it answers the same content at the same address
from another host after the move, with its PID unchanged.

    CORRAL_TEST_LAB=deb .venv/bin/pytest -q tests/test_migration_debian.py
"""

import asyncio
import secrets
import time


WEB_UNIT = """[Unit]
Description=A small HTTP server (busybox httpd)
After=network.target

[Service]
ExecStart=/bin/busybox httpd -f -p 80 -h /srv/www
Restart=always

[Install]
WantedBy=multi-user.target
"""

# Needs CRIU >= 4.2 (deploy/install-criu.sh pins 4.2.1): before it, CRIU read SO_PASSCRED of
# every socket, which Linux >= 6.16 refuses for TCP sockets, so no TCP socket could be dumped
# (CRIU issue #2705).


async def wait_for(check, timeout: float, what: str, interval: float = 0.2):
    """check()'s first true result; fails with `what` and the last result after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout:g} s (last: {result!r})")
        await asyncio.sleep(interval)


async def fetch(corral, client: str, url: str) -> str | None:
    # (busybox wget's own -T makes this busybox crash: bound it with timeout instead)
    r = await corral("ct", "exec", client, "--", "timeout", "3", "wget", "-qO-", url, check=False)
    return r.stdout if r.returncode == 0 else None


async def test_debian_http_service_answers_at_the_same_address_after_a_live_migration(corral, cleanup, lab):
    cleanup += ["debweb", "webclient"]
    created = await corral.json("ct", "create", "debweb", "-t", "debian", "--node", "n1", "--memory", "256M", "--start")
    ip = created["network"]["ipv4_cidr"].split("/")[0]

    async def booted():
        r = await corral("ct", "exec", "debweb", "--", "systemctl", "is-system-running", check=False)
        return r.stdout.strip() in ("running", "degraded") and r.stdout.strip()

    # The first debian container on a machine waits for the template build (debootstrap, ~45 s).
    assert await wait_for(booted, 90, "systemd up") == "running"

    token = f"hello from debweb {secrets.token_hex(8)}\n"
    await corral("ct", "exec", "-i", "debweb", "--", "sh", "-c",
                 "mkdir -p /srv/www && cat > /srv/www/index.html", stdin=token.encode())  # fmt: skip
    await corral("ct", "exec", "-i", "debweb", "--", "sh", "-c",
                 "cat > /etc/systemd/system/web.service && systemctl enable --now web", stdin=WEB_UNIT.encode())  # fmt: skip

    async def main_pid() -> int:
        r = await corral("ct", "exec", "debweb", "--", "systemctl", "show", "-p", "MainPID", "--value", "web")
        return int(r.stdout.strip() or 0)

    pid_before = await wait_for(main_pid, 10, "web.service running")
    await corral("ct", "create", "webclient", "-t", "busybox", "--node", "n3", "--start")
    assert await wait_for(lambda: fetch(corral, "webclient", f"http://{ip}/"), 15, "first answer") == token

    result = await corral("--output", "json", "ct", "migrate", "debweb", "--to", "n2", "--live", check=False)
    op = result.json()
    assert result.returncode == 0 and op["state"] == "succeeded", op["error"]
    assert op["params"]["live"] is True
    moved_at = time.monotonic()

    shown = await corral.json("ct", "show", "debweb")
    assert shown["node"] == "n2" and shown["state"] == "running" and shown["network"]["ipv4_cidr"].split("/")[0] == ip
    # Same content, same address, asked from a container on a third host.
    assert await wait_for(lambda: fetch(corral, "webclient", f"http://{ip}/"), 15, "answer after the move") == token
    answered_after_s = time.monotonic() - moved_at
    assert answered_after_s < 5, f"the service answered only {answered_after_s:.1f} s after the migration ended"
    # The very same process, and systemd still manages it.
    assert await main_pid() == pid_before
    active = await corral("ct", "exec", "debweb", "--", "systemctl", "is-active", "web")
    assert active.stdout.strip() == "active"
    assert (await booted()) == "running"
    # The source's copy is gone.
    assert not (lab.host("n1").lxc_path / "debweb").exists()


def test_debian_template_cache_follows_its_package_list():
    from agent.runtime.templates import DEBIAN_PACKAGES, debian_cache_key

    assert debian_cache_key() == debian_cache_key(packages=",".join(reversed(DEBIAN_PACKAGES.split(","))))
    assert debian_cache_key() != debian_cache_key(packages=DEBIAN_PACKAGES + ",curl")
    assert debian_cache_key().startswith("debian-bookworm-")


def test_debian_template_drops_what_criu_cannot_checkpoint(tmp_path):
    from agent.runtime.templates import CHECKPOINT_DROPIN, checkpointable_systemd

    units = tmp_path / "usr/lib/systemd/system"
    units.mkdir(parents=True)
    (tmp_path / "lib").symlink_to("usr/lib")
    (units / "systemd-journald.service").write_text("[Service]\nIPAddressDeny=any\nExecStart=/x\n")
    (units / "systemd-sysctl.service").write_text("[Service]\nLoadCredential=sysctl.extra\n")
    (units / "procps.service").symlink_to("systemd-sysctl.service")  # an alias: its drop-ins are the unit's
    (units / "cron.service").write_text("[Service]\nExecStart=/usr/sbin/cron\n")

    assert checkpointable_systemd(tmp_path) == ["systemd-journald.service", "systemd-sysctl.service"]
    dropins = tmp_path / "etc/systemd/system"
    assert (dropins / "systemd-journald.service.d" / CHECKPOINT_DROPIN).read_text().endswith("[Service]\nIPAddressDeny=\n")
    assert (dropins / "systemd-sysctl.service.d" / CHECKPOINT_DROPIN).read_text().endswith("[Service]\nLoadCredential=\n")
    assert not (dropins / "cron.service.d").exists()
