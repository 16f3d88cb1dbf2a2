"""Restarts, relocations, failed: what the fleet does with an HA container that keeps stopping
(controller/scheduler/recovery.py), decided from the record and its host's report alone."""

from dataclasses import replace

import pytest

from controller.config import ControllerConfig
from controller.scheduler.recovery import RecoveryKind, RecoveryPolicy, keeps_running, recovery_for
from corral.config import ConfigError
from corral.model import Container, ContainerState, DesiredState

POLICY = RecoveryPolicy(max_restart=2, max_relocate=1, restart_window=600)
WEB = Container("web", "n1", "busybox", ContainerState.RUNNING, storage="image", ha=True,
                desired_state=DesiredState.RUNNING)


def reported(state=ContainerState.STOPPED, restarts=0):
    return replace(WEB, state=state, ha_restarts=restarts)


@pytest.mark.parametrize("record, report, kind", [
    (WEB, reported(ContainerState.RUNNING, 2), RecoveryKind.NOTHING),  # runs: nothing to do
    (WEB, reported(restarts=0), RecoveryKind.NOTHING),  # its host restarts it
    (WEB, reported(restarts=1), RecoveryKind.NOTHING),
    (WEB, reported(restarts=2), RecoveryKind.RELOCATE),  # restarts used up
    (replace(WEB, ha_relocations=1), reported(restarts=2), RecoveryKind.FAIL),  # relocations too
    (replace(WEB, ha=False), reported(restarts=5), RecoveryKind.NOTHING),  # not HA
    (replace(WEB, desired_state=DesiredState.STOPPED), reported(restarts=5), RecoveryKind.NOTHING),  # stopped on purpose
    (replace(WEB, in_doubt="two copies?"), reported(restarts=5), RecoveryKind.NOTHING),  # the operator settles it
    (replace(WEB, ha_failed="kept failing"), reported(restarts=5), RecoveryKind.NOTHING),  # waits for the operator
])
def test_recovery_decision(record, report, kind):
    assert recovery_for(record, report, POLICY).kind == kind


def test_reasons_say_where_and_how_many():
    relocate = recovery_for(WEB, reported(restarts=2), POLICY)
    assert "on n1 after 2 restart(s)" in relocate.reason and "relocation 1 of 1" in relocate.reason
    failed = recovery_for(replace(WEB, ha_relocations=1), reported(restarts=2), POLICY)
    assert "1 relocation(s) did not keep it running" in failed.reason and "corral ct start" in failed.reason


def test_no_local_restarts_means_relocate_at_once():
    assert recovery_for(WEB, reported(restarts=0), replace(POLICY, max_restart=0)).kind == RecoveryKind.RELOCATE


def test_keeps_running_only_wanted_ha_containers():
    assert keeps_running(WEB)
    assert not keeps_running(replace(WEB, ha_failed="x"))
    assert not keeps_running(replace(WEB, desired_state=DesiredState.STOPPED))


BASE = """
listen: ["127.0.0.1:7000"]
store: {path: /tmp/x.db}
tls: {ca: ca.pem, cert: c.pem, key: c.key}
network: {subnet: 10.9.0.0/24, gateway: 10.9.0.1, range_start: 10.9.0.10, range_end: 10.9.0.20}
"""


def test_recovery_settings_in_the_controller_config(tmp_path):
    path = tmp_path / "c.yaml"
    for name in ("ca.pem", "c.pem", "c.key"):
        (tmp_path / name).write_text("")
    path.write_text(BASE)
    assert ControllerConfig.load(path).recovery == RecoveryPolicy(1, 1, 600.0)
    path.write_text(BASE + "ha_max_restart: 3\nha_max_relocate: 0\nha_restart_window: 60\n")
    assert ControllerConfig.load(path).recovery == RecoveryPolicy(3, 0, 60.0)
    for bad in ("ha_max_restart: -1", "ha_max_relocate: 1000", "ha_restart_window: 0", "ha_max_restart: two"):
        path.write_text(BASE + bad + "\n")
        with pytest.raises(ConfigError):
            ControllerConfig.load(path)
