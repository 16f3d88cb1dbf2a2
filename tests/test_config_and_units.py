"""Config values that would load and break later, and unit strings that are not what they
look like, are refused up front with a clear error (pure checks, no lab)."""

from pathlib import Path

import pytest

from agent.config import AgentConfig
from controller.config import ControllerConfig
from corral import log as corral_log
from corral.errors import ConfigError, InvalidArgument
from corral.units import parse_cpus, parse_size


def _controller(tmp_path: Path, network: str, extra: str = "") -> Path:
    for name in ("ca.crt", "c.crt", "c.key"):
        (tmp_path / name).write_text("x")
    path = tmp_path / "controller.yaml"
    path.write_text(
        'listen: ["127.0.0.1:7700"]\n'
        f"store: {{path: {tmp_path / 'x.db'}}}\n"
        "tls: {ca: ca.crt, cert: c.crt, key: c.key}\n"
        f"network: {network}\n" + extra
    )
    return path


GOOD_NET = "{subnet: 10.0.0.0/24, gateway: 10.0.0.1, range_start: 10.0.0.100, range_end: 10.0.0.250}"


def test_a_sound_controller_config_loads(tmp_path):
    config = ControllerConfig.load(_controller(tmp_path, GOOD_NET, "placement: {cpu_overcommit: 2, memory_overcommit: 1.5}\n"))
    assert config.placement.cpu_overcommit == 2.0 and config.placement.memory_overcommit == 1.5
    assert config.addresses.allocate([]).ipv4_cidr == "10.0.0.100/24"


@pytest.mark.parametrize("key", ["cpu_overcommit", "memory_overcommit"])
@pytest.mark.parametrize("value", [".inf", ".nan", "-.inf", "-1", "0"])
def test_overcommit_must_be_finite_and_positive(tmp_path, key, value):
    path = _controller(tmp_path, GOOD_NET, f"placement:\n  {key}: {value}\n")
    with pytest.raises(ConfigError, match=rf"controller.yaml:6: placement.{key}: must be a finite number above 0"):
        ControllerConfig.load(path)


def test_heartbeat_timeout_must_be_finite(tmp_path):
    with pytest.raises(ConfigError, match=r"controller.yaml:5: heartbeat_timeout: must be a finite number"):
        ControllerConfig.load(_controller(tmp_path, GOOD_NET, "heartbeat_timeout: .inf\n"))


@pytest.mark.parametrize("network, key, why", [
    ("{subnet: 10.0.0.0/24, gateway: 10.9.9.9, range_start: 10.0.0.100, range_end: 10.0.0.250}",
     "gateway", "not inside the subnet"),
    ("{subnet: 10.0.0.0/24, gateway: 10.0.0.255, range_start: 10.0.0.100, range_end: 10.0.0.250}",
     "gateway", "broadcast"),
    ("{subnet: 10.0.0.0/24, gateway: 10.0.0.1, range_start: 10.0.0.0, range_end: 10.0.0.250}",
     "range_start", "network or broadcast"),
    ("{subnet: 10.0.0.0/24, gateway: 10.0.0.1, range_start: 10.0.0.100, range_end: 10.0.0.255}",
     "range_end", "network or broadcast"),
])  # fmt: skip
def test_gateway_off_the_subnet_and_unusable_range_ends_are_refused(tmp_path, network, key, why):
    with pytest.raises(ConfigError, match=rf"controller.yaml:4: network.{key}: .*{why}"):
        ControllerConfig.load(_controller(tmp_path, network))


def test_bogus_log_level_is_a_config_error_in_both_daemons(tmp_path):
    path = _controller(tmp_path, GOOD_NET, "log_level: bogus\n")
    with pytest.raises(ConfigError, match=r"controller.yaml:5: log_level: unknown log level 'bogus'"):
        ControllerConfig.load(path)
    agent = tmp_path / "agent.yaml"
    agent.write_text("node: n1\nlisten: 127.0.0.1:7701\ncontroller: 127.0.0.1:7700\n"
                     "tls: {ca: ca.crt, cert: c.crt, key: c.key}\nlog_level: bogus\n")  # fmt: skip
    with pytest.raises(ConfigError, match=r"agent.yaml:5: log_level: unknown log level"):
        AgentConfig.load(agent)
    agent.write_text(agent.read_text().replace("bogus", "WARNING"))
    assert AgentConfig.load(agent).log_level == "warning"
    with pytest.raises(ValueError):
        corral_log.configure(json_output=True, level="bogus")


@pytest.mark.parametrize("text", ["²m", "١m", "²", "١", "1²", "٣.5", "１"])
def test_non_ascii_digits_are_refused_as_cpus_and_sizes(text):
    with pytest.raises(InvalidArgument, match="invalid CPU amount"):
        parse_cpus(text)
    with pytest.raises(InvalidArgument, match="invalid size"):
        parse_size(text)


def test_sizes_are_exact_above_two_to_the_53():
    assert parse_size("9007199254740993") == 9007199254740993
    assert parse_size("1152921504606846975") == (1 << 60) - 1
    assert parse_size("1024P") == 1 << 60
    assert parse_size("0.5K") == 512
    with pytest.raises(InvalidArgument, match="not a whole number"):
        parse_size("1125899906842624.0000000000001")  # float (and 28-digit Decimal) would round it away
    with pytest.raises(InvalidArgument, match="at most 1 EiB"):
        parse_size("1152921504606846977")


def test_overlong_numbers_are_refused_without_a_traceback():
    with pytest.raises(InvalidArgument):
        parse_size("1" * 5000)
    with pytest.raises(InvalidArgument):
        parse_cpus("1" * 5000 + "m")


def test_cpu_fractions_are_exact():
    assert parse_cpus("0.001") == 1
    assert parse_cpus(".5") == 500
    assert parse_cpus("2.25") == 2250
    for bad in ("1.", ".", "1.0001", "1\n2"):
        with pytest.raises(InvalidArgument):
            parse_cpus(bad)


def test_a_wildcard_listen_needs_advertise_and_the_error_names_that_key(tmp_path):
    for name in ("ca.crt", "c.crt", "c.key"):
        (tmp_path / name).write_text("x")
    agent = tmp_path / "agent.yaml"
    base = "node: n1\ncontroller: 127.0.0.1:7700\ntls: {ca: ca.crt, cert: c.crt, key: c.key}\n"
    agent.write_text(base + "listen: 0.0.0.0:7701\n")
    with pytest.raises(ConfigError, match=r"agent.yaml:4: listen: 0.0.0.0:7701 is a wildcard address: set `advertise`"):
        AgentConfig.load(agent)
    agent.write_text(base + "listen: 0.0.0.0:7701\nadvertise: '[::]:7701'\n")
    with pytest.raises(ConfigError, match=r"agent.yaml:5: advertise: .*set `advertise`"):
        AgentConfig.load(agent)
    agent.write_text(base + "listen: 0.0.0.0:7701\nadvertise: 10.0.0.2:7701\n")
    assert AgentConfig.load(agent).advertise == "10.0.0.2:7701"
