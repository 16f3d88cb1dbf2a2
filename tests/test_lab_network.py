"""The lab's host layer, for real: namespaces joined by bridges, each host with
its own pinned mount namespace where cgroups work, and a teardown that finds
everything by name. Needs root, `ip`, `nsenter`/`unshare`, LXC and busybox-static.

No controller or agent here: the hosts are built with the lab's own building
blocks and removed with `lab_down`, which must cope without a state file.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from lab import cgroups, hostns, network, processes
from lab.layout import (
    Addressing,
    LabPaths,
    bridge_name,
    is_lab_link,
    is_lab_namespace,
    namespace_name,
    veth_name,
)
from lab.lab import free_subnet_octet, lab_down
from corral.proc import run

LAB = "lnt"  # its own name: never meets the session lab or a demo lab
BUSYBOX = Path("/bin/busybox")

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0
    or not all(shutil.which(tool) for tool in ("ip", "nsenter", "unshare", "lxc-start"))
    or not BUSYBOX.is_file(),
    reason="needs root, iproute2, util-linux, LXC and busybox-static",
)


@pytest.fixture
async def two_hosts(tmp_path):
    """Two lab hosts (n1, n2) on one bridge, torn down by lab_down afterwards."""
    base = tmp_path / "lab"
    paths = LabPaths(base)
    await lab_down(LAB, base)  # leftovers of an interrupted run
    try:
        async with network.machine_lock():  # as lab_up does: pick a free /24 and take it
            net = Addressing(await free_subnet_octet(LAB))
            await network.create_root_bridge(bridge_name(LAB), net.gateway, 24)
        await hostns.prepare_pin_dir(paths.hostns_dir)
        for i in (1, 2):
            ns = namespace_name(LAB, i)
            await network.create_namespace(ns)
            await network.create_host_link(bridge_name(LAB), veth_name(LAB, i), ns)
            await network.configure_host_namespace(ns, net.host_address(i), 24, net.gateway, "br0")
            paths.host(i).lxc_path.mkdir(parents=True)
            await hostns.create(ns, paths.host(i).mount_ns)
        yield paths, net
    finally:
        await lab_down(LAB, base)
    assert not [ns for ns in await network.list_namespaces() if is_lab_namespace(LAB, ns)]
    assert not [link for link in await network.list_links() if is_lab_link(LAB, link)]
    assert not processes.find_marked(str(base))
    assert not base.exists()


def _on_host(paths: LabPaths, index: int, *argv: str | Path) -> list[str]:
    return hostns.enter_argv(namespace_name(LAB, index), paths.host(index).mount_ns, argv)


async def test_hosts_reach_each_other_and_the_gateway(two_hosts):
    paths, net = two_hosts
    for target in (net.host_address(2), net.gateway):
        await run(_on_host(paths, 1, BUSYBOX, "ping", "-c1", "-W2", target), timeout=10)
    await run([BUSYBOX, "ping", "-c1", "-W2", net.host_address(1)], timeout=10)  # from the root namespace


async def test_host_has_its_own_sys_and_the_cgroup_hierarchies(two_hosts):
    paths, _ = two_hosts
    shown = await run(_on_host(paths, 1, "ls", "/sys/class/net", "/sys/fs/cgroup"), timeout=10)
    listing = shown.stdout.decode().split()
    assert "br0" in listing and "eth0" in listing
    host_hierarchies = {m.target.rsplit("/", 1)[-1] for m in cgroups.cgroup_mounts_to_recreate(
        Path("/proc/self/mountinfo").read_text()) if m.fstype != "tmpfs"}
    assert host_hierarchies and host_hierarchies <= set(listing)


async def test_mounts_persist_on_a_host_and_stay_there(two_hosts):
    paths, _ = two_hosts
    point = paths.host(1).storage_dir / "m"
    point.mkdir(parents=True)
    await run(_on_host(paths, 1, "mount", "-t", "tmpfs", "lnt", point), timeout=10)
    # A second process on the same host sees it (one mount table per host) ...
    assert await hostns.mounts_inside(paths.host(1).mount_ns, point.parent) == [point]
    # ... the other host and the machine itself do not.
    assert await hostns.mounts_inside(paths.host(2).mount_ns, point.parent) == []
    assert str(point) not in Path("/proc/self/mountinfo").read_text()


async def test_container_on_a_host_is_in_its_cgroup_and_limited(two_hosts):
    paths, net = two_hosts
    # A name of its own: the cgroup hierarchies are the machine's, shared with every lab.
    name = f"lnt{os.getpid()}"
    lxc_path = paths.host(1).lxc_path
    rootfs = lxc_path / name / "rootfs"
    for d in ("bin", "proc", "sys", "dev", "tmp"):
        (rootfs / d).mkdir(parents=True)
    shutil.copy2(BUSYBOX, rootfs / "bin" / "busybox")
    (lxc_path / name / "config").write_text(
        f"lxc.uts.name = {name}\n"
        f"lxc.rootfs.path = dir:{rootfs}\n"
        "lxc.net.0.type = veth\nlxc.net.0.link = br0\nlxc.net.0.flags = up\n"
        f"lxc.net.0.ipv4.address = {net.range_start}/24\n"
        "lxc.tty.max = 0\nlxc.console.path = none\n"
        "lxc.mount.auto = proc:mixed sys:mixed\n"
        "lxc.init.cmd = /bin/busybox sleep 1000\n"
        "lxc.cgroup.memory.limit_in_bytes = 32M\n"
    )  # fmt: skip
    await run(_on_host(paths, 1, "lxc-start", "-P", lxc_path, "-n", name), timeout=30,
              env=processes.daemon_env())
    info = await run(_on_host(paths, 1, "lxc-info", "-P", lxc_path, "-n", name, "-p", "-H"), timeout=10)
    init_pid = int(info.stdout.decode().strip())

    assert cgroups.cgroups_of(init_pid)["memory"].endswith(f"/lxc.payload.{name}")
    assert cgroups.memory_limit_of(init_pid) == 32 * 1024 * 1024
    # Its veth is on the host's br0, so the other host reaches it.
    await run(_on_host(paths, 2, BUSYBOX, "ping", "-c1", "-W2", net.range_start), timeout=10)
    # More memory than the limit: the kernel kills it inside the container.
    hog = await run(_on_host(paths, 1, "lxc-attach", "-P", lxc_path, "-n", name, "--",
                             "/bin/busybox", "dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"),
                    timeout=30, check=False)
    assert hog.returncode != 0
    # lab_down (in the fixture) must stop it: its monitor must be gone afterwards.


def test_lab_names_are_checked():
    from corral.errors import InvalidArgument
    from lab.layout import validate_lab_name

    for bad in ("", "toolong7", "Ab", "a-b", "1ab", "a/b"):
        with pytest.raises(InvalidArgument):
            validate_lab_name(bad)
    assert validate_lab_name("tst") == "tst"


def test_cgroup_layout_is_read_from_mountinfo():
    mountinfo = (
        "31 23 0:28 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime - tmpfs tmpfs rw,mode=755\n"
        "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,relatime - cgroup cgroup rw,cpu,cpuacct\n"
        "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
        "40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd\n"
        "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate\n"
        "50 27 0:40 / /mnt/other rw,relatime - cgroup cgroup rw,pids\n"
    )
    mounts = cgroups.cgroup_mounts_to_recreate(mountinfo)
    assert [(m.target, m.fstype, m.data) for m in mounts] == [
        ("/sys/fs/cgroup", "tmpfs", "mode=755"),
        ("/sys/fs/cgroup/cpu,cpuacct", "cgroup", "cpu,cpuacct"),
        ("/sys/fs/cgroup/memory", "cgroup", "memory"),
        ("/sys/fs/cgroup/systemd", "cgroup", "xattr,name=systemd"),
        ("/sys/fs/cgroup/unified", "cgroup2", "nsdelegate"),
    ]
    assert mounts[1].flags == ("nosuid",)
    assert cgroups.alias_links(mounts) == {
        "/sys/fs/cgroup/cpu": "cpu,cpuacct",
        "/sys/fs/cgroup/cpuacct": "cpu,cpuacct",
    }


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
