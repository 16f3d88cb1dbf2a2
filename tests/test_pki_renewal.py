"""Certificate ends and renewal: `corral pki ls` (exit 5 when one ends within --warn-days or has
ended), `corral pki renew` (same role, name and hosts, a new key, signed by the CA), and the
daemons' watch on their own certificate (a warning, the expiry gauge on /metrics)."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509
from prometheus_client import REGISTRY

from corral import certwatch, pki
from corral.config import TlsFiles

EXPIRING = 5


def corral(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "controller.cli.main", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60)  # fmt: skip


@pytest.fixture
def fleet(tmp_path) -> Path:
    """A CA, a controller for a year, an agent for 10 days, a user that ended 2 minutes ago."""
    d = tmp_path / "pki"
    pki.init_ca(d)
    pki.issue(d, "controller", "controller", ["10.0.0.1", "ctl.example"])
    pki.issue(d, "agent", "n1", ["10.0.0.11"], validity=datetime.timedelta(days=10))
    pki.issue(d, "user", "alice", validity=datetime.timedelta(minutes=-2))
    return d


def test_ls_flags_the_expiring_and_the_expired_and_exits_5(fleet, tmp_path):
    done = corral(tmp_path, "pki", "ls", "--dir", "pki")
    assert done.returncode == EXPIRING, done.stderr
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines()[2:]}
    in_10_days = (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=10)).date().isoformat()
    assert rows["n1"][1:] == ["agent", "n1,10.0.0.11", in_10_days, "9", "expiring"]
    assert rows["alice"][-1] == "expired" and rows["controller"][-1] == "ok" and rows["Corral"][-1] == "ok"
    assert "2 of 4 certificates ended or end within 30 days: agent n1, user alice" in done.stderr

    done = corral(tmp_path, "pki", "ls", "--dir", "pki", "-o", "json", "--warn-days", "5")
    assert done.returncode == EXPIRING
    certs = {c["name"]: c for c in json.loads(done.stdout)}
    assert certs["n1"]["state"] == "ok" and certs["alice"]["state"] == "expired"  # 10 days > 5
    assert certs["controller"]["hosts"] == ["controller", "10.0.0.1", "ctl.example", "localhost", "127.0.0.1"]
    assert certs["controller"]["role"] == "controller" and certs["controller"]["days_left"] in (364, 365)
    assert certs["controller"]["valid_until"].endswith("Z")
    assert certs["controller"]["file"] == "pki/controller-controller.crt"
    assert certs["Corral fleet CA"]["role"] == "ca"


def test_ls_of_a_sound_directory_exits_0(tmp_path):
    d = tmp_path / "pki"
    pki.init_ca(d)
    pki.issue(d, "agent", "n1", ["10.0.0.11"])
    done = corral(tmp_path, "pki", "ls", "--dir", "pki")
    assert done.returncode == 0 and not done.stderr and "n1" in done.stdout
    assert corral(tmp_path, "pki", "ls", "--dir", "absent").returncode == 3


def test_issue_days_sets_the_validity(tmp_path):
    d = tmp_path / "pki"
    pki.init_ca(d)
    done = corral(tmp_path, "pki", "issue", "--dir", "pki", "--role", "agent", "--name", "n2", "--days", "3")
    assert done.returncode == 0, done.stderr
    assert 2.9 < pki.certificate_info(d / "agent-n2.crt").days_left() <= 3
    assert corral(tmp_path, "pki", "issue", "--dir", "pki", "--role", "agent", "--name", "n2", "--days",
                  "0").returncode == 2  # fmt: skip


def verifies(cert_path: Path, ca_path: Path) -> bool:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca_path.read_bytes()))  # raises if not
    return True


def test_renew_keeps_role_name_and_hosts_with_a_new_key_the_ca_signed(fleet, tmp_path):
    old = pki.certificate_info(fleet / "agent-n1.crt")
    old_key = (fleet / "agent-n1.key").read_bytes()
    done = corral(tmp_path, "pki", "renew", "--dir", "pki", "--role", "agent", "--name", "n1")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("renewed agent certificate pki/agent-n1.crt")
    assert "hosts: n1, 10.0.0.11" in done.stdout
    new = pki.certificate_info(fleet / "agent-n1.crt")
    assert (new.role, new.name, new.hosts) == ("agent", "n1", old.hosts) == ("agent", "n1", ("n1", "10.0.0.11"))
    assert new.days_left() > 364 and (fleet / "agent-n1.key").read_bytes() != old_key
    assert verifies(fleet / "agent-n1.crt", fleet / "ca.crt")
    # Still a server's certificate: the role-qualified name a client checks is there.
    sans = x509.load_pem_x509_certificate((fleet / "agent-n1.crt").read_bytes()).extensions \
        .get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)  # fmt: skip
    assert pki.server_name("agent", "n1") in sans
    assert oct((fleet / "agent-n1.key").stat().st_mode & 0o777) == "0o600"


def test_renew_all_expiring_renews_those_ls_flags_and_no_other(fleet, tmp_path):
    controller = (fleet / "controller-controller.crt").read_bytes()
    done = corral(tmp_path, "pki", "renew", "--dir", "pki", "--all-expiring")
    assert done.returncode == 0, done.stderr
    assert [line.split()[1] for line in done.stdout.splitlines()] == ["agent", "user"]
    assert (fleet / "controller-controller.crt").read_bytes() == controller
    alice = pki.certificate_info(fleet / "user-alice.crt")
    assert alice.hosts == () and alice.state(30) == "ok" and verifies(fleet / "user-alice.crt", fleet / "ca.crt")
    assert corral(tmp_path, "pki", "ls", "--dir", "pki").returncode == 0
    done = corral(tmp_path, "pki", "renew", "--dir", "pki", "--all-expiring")
    assert done.returncode == 0 and done.stdout.startswith("nothing to renew")


def test_renew_refuses_what_it_cannot_renew(fleet, tmp_path):
    done = corral(tmp_path, "pki", "renew", "--dir", "pki", "--role", "agent", "--name", "n9")
    assert done.returncode == 3 and "no certificate pki/agent-n9.crt to renew" in done.stderr
    done = corral(tmp_path, "pki", "renew", "--dir", "pki", "--role", "agent")
    assert done.returncode == 2 and "give --role and --name, or --all-expiring" in done.stderr
    done = corral(tmp_path, "pki", "renew", "--dir", "pki", "--role", "agent", "--name", "n1", "--all-expiring")
    assert done.returncode == 2


# -- the daemons' watch ------------------------------------------------------------------------


def gauge(kind: str, role: str, name: str) -> float | None:
    return REGISTRY.get_sample_value("corral_certificate_expiry_timestamp_seconds",
                                     {"certificate": kind, "role": role, "name": name})  # fmt: skip


def test_the_watch_warns_within_30_days_and_sets_the_gauge(fleet):
    tls = lambda cert: TlsFiles(fleet / "ca.crt", fleet / f"{cert}.crt", fleet / f"{cert}.key")  # noqa: E731
    in_use = certwatch.read_in_use(tls("controller-controller"))
    assert certwatch.check(in_use) == []
    assert gauge("own", "controller", "controller") == in_use[0].info.not_after.timestamp()
    assert gauge("ca", "ca", "Corral fleet CA") == in_use[1].info.not_after.timestamp()

    said = certwatch.check(certwatch.read_in_use(tls("agent-n1")))
    assert len(said) == 1 and "the certificate of agent 'n1'" in said[0] and "in 10 days" in said[0]
    assert "corral pki renew --role agent --name n1" in said[0]
    said = certwatch.check(certwatch.read_in_use(tls("user-alice")))
    assert len(said) == 1 and "the certificate of user 'alice'" in said[0] and " ended " in said[0]
    # Checked daily: what is fine today warns once the clock is within 30 days of the end.
    later = in_use[0].info.not_after - datetime.timedelta(days=29)
    said = certwatch.check(in_use, now=later)
    assert len(said) == 1 and "controller 'controller'" in said[0]


async def test_the_watch_checks_again_on_its_period(fleet):
    tls = TlsFiles(fleet / "ca.crt", fleet / "controller-controller.crt", fleet / "controller-controller.key")
    end = pki.certificate_info(tls.cert).not_after
    times = iter([end - datetime.timedelta(days=60), end - datetime.timedelta(days=20)])
    checked: list[list[str]] = []
    original = certwatch.check

    def recording(certs, warn_days, now):
        checked.append(original(certs, warn_days, now))
        return checked[-1]

    watch = certwatch.CertificateWatch(tls, every=0.05, now=lambda: next(times))
    certwatch.check, saved = recording, certwatch.check
    try:
        task = asyncio.create_task(watch.run())
        async with asyncio.timeout(10):
            while len(checked) < 2:
                await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    finally:
        certwatch.check = saved
    assert checked[0] == [] and len(checked[1]) == 1 and "in 20 days" in checked[1][0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_the_controller_exports_its_certificate_expiry_on_metrics(tmp_path):
    d = tmp_path / "pki"
    pki.init_ca(d)
    pki.issue(d, "controller", "controller", ["127.0.0.1"], validity=datetime.timedelta(days=20))
    port, metrics = free_port(), free_port()
    config = tmp_path / "controller.yaml"
    config.write_text(
        f'listen: ["127.0.0.1:{port}"]\nmetrics_listen: 127.0.0.1:{metrics}\n'
        f"store: {{path: {tmp_path / 'store.db'}}}\n"
        f"tls: {{ca: {d}/ca.crt, cert: {d}/controller-controller.crt, key: {d}/controller-controller.key}}\n"
        "network: {subnet: 10.0.0.0/24, gateway: 10.0.0.1, range_start: 10.0.0.100, range_end: 10.0.0.250}\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "controller.main", "--config", str(config),
        env={k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)  # fmt: skip
    end = pki.certificate_info(d / "controller-controller.crt").not_after.timestamp()
    try:
        text = ""
        async with asyncio.timeout(60):
            while "corral_certificate_expiry_timestamp_seconds{" not in text:
                await asyncio.sleep(0.2)
                try:
                    text = await asyncio.to_thread(lambda: urllib.request.urlopen(
                        f"http://127.0.0.1:{metrics}/metrics", timeout=5).read().decode())  # fmt: skip
                except OSError:
                    continue
        line = next(l for l in text.splitlines() if l.startswith("corral_certificate_expiry_timestamp_seconds{")
                    and 'certificate="own"' in l)  # fmt: skip
        assert 'role="controller"' in line and 'name="controller"' in line and float(line.split()[-1]) == end
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            _, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    warnings = [json.loads(l) for l in err.decode().splitlines() if "certificate of controller" in l]
    assert warnings and warnings[0]["level"] == "warning" and warnings[0]["days_left"] == pytest.approx(20, abs=0.1)


def test_check_config_says_how_soon_a_certificate_ends(tmp_path, capsys):
    from controller import main as controller_main

    d = tmp_path / "pki"
    pki.init_ca(d)
    pki.issue(d, "controller", "controller", ["127.0.0.1"], validity=datetime.timedelta(days=12, hours=1))
    config = tmp_path / "controller.yaml"
    config.write_text(
        f'listen: ["127.0.0.1:{free_port()}"]\nstore: {{path: {tmp_path / "store.db"}}}\n'
        f"tls: {{ca: {d}/ca.crt, cert: {d}/controller-controller.crt, key: {d}/controller-controller.key}}\n"
        "network: {subnet: 10.0.0.0/24, gateway: 10.0.0.1, range_start: 10.0.0.100, range_end: 10.0.0.250}\n"
    )
    with pytest.raises(SystemExit) as exited:
        controller_main.main(["--check-config", "--config", str(config)])
    out = capsys.readouterr().out
    assert exited.value.code == 0 and "(12 days left: corral pki renew --role controller --name controller)" in out
