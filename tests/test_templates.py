"""Both templates give a working container: busybox (tiny) and Debian (systemd, apt)."""


async def test_debian_container_boots_systemd_and_keeps_its_address(corral, cleanup):
    cleanup.append("deb")
    # The first debian container on a machine waits for the template build (debootstrap, ~45 s).
    created = await corral.json("ct", "create", "deb", "-t", "debian", "--node", "n3", "--memory", "256M", "--start")
    version = await corral("ct", "exec", "deb", "--", "cat", "/etc/debian_version")
    assert version.stdout.startswith("12.")
    init = await corral("ct", "exec", "deb", "--", "cat", "/proc/1/comm")
    assert init.stdout.strip() == "systemd"
    addr = await corral("ct", "exec", "deb", "--", "ip", "-4", "-o", "addr", "show", "eth0")
    assert f"inet {created['network']['ipv4_cidr']}" in addr.stdout
    stopped = await corral.json("ct", "stop", "deb", "--timeout", "30")
    assert stopped["state"] == "stopped"


async def test_busybox_container_has_no_host_binds_and_no_tty(corral, cleanup, lab):
    cleanup.append("bb")
    await corral("ct", "create", "bb", "-t", "busybox", "--node", "n1", "--start")
    config = (lab.host("n1").lxc_path / "bb" / "config").read_text()
    # What makes it checkpointable (DESIGN.md): no host bind mounts, no ttys, no console.
    assert "bind" not in config
    assert "lxc.tty.max = 0" in config and "lxc.console.path = none" in config
    mounts = await corral("ct", "exec", "bb", "--", "cat", "/proc/mounts")
    assert "/usr/lib" not in mounts.stdout and "/lib64" not in mounts.stdout
