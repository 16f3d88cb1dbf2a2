"""Bad input is refused with a clear message before anything is touched (pure checks)."""

from pathlib import Path

import pytest

from agent.config import AgentConfig
from controller.config import ControllerConfig
from controller.scheduler.placement import PlacementRequest, place
from corral.errors import ConfigError, InvalidArgument, NoCapacity, NotFound
from corral.model import Limits, Node, NodeFacts, NodeState
from corral.names import validate_name
from corral.units import parse_cpus, parse_size


@pytest.mark.parametrize(
    "name, why",
    [
        ("a/b", "path separator"),
        ("..", "path separator"),
        ("a..b", "path separator"),
        ("has space", "invalid"),
        ("", "empty"),
        ("x" * 200, "200 characters"),
        ("café", "non-ASCII"),
        ("-lead", "invalid"),
        ("UPPER", "invalid"),
        ("web\n", "invalid"),  # '$' used to match before the newline, which then split LXC config lines
        ("web\r", "invalid"),
    ],
)
def test_bad_container_names_are_refused(name, why):
    with pytest.raises(InvalidArgument, match=why):
        validate_name(name)


def test_operation_ids_follow_the_name_rules():
    from corral.names import validate_op_id

    assert validate_op_id("mig-20261201000000-abc123") == "mig-20261201000000-abc123"
    for bad in ("../x", "op\n", "", "Op1"):
        with pytest.raises(InvalidArgument, match="operation id"):
            validate_op_id(bad)


def test_good_names_pass():
    for name in ("web1", "a", "db-primary-01", "x" * 63):
        assert validate_name(name) == name


@pytest.mark.parametrize("text", ["12XB", "-1M", "0", "1.5", "M", "", "1e9", "256 MB extra", "0.3K"])
def test_malformed_sizes_are_refused(text):
    with pytest.raises(InvalidArgument, match="invalid size"):
        parse_size(text)


@pytest.mark.parametrize("text, expected", [("256M", 256 << 20), ("1G", 1 << 30), ("512MiB", 512 << 20), ("4096", 4096), ("1.5G", 3 << 29)])
def test_sizes_parse_in_binary_units(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text, millis", [("1", 1000), ("0.5", 500), ("250m", 250), ("2.25", 2250)])
def test_cpu_amounts(text, millis):
    assert parse_cpus(text) == millis


@pytest.mark.parametrize("text", ["-1", "abc", "0", "1.2345", "1e3"])
def test_bad_cpu_amounts(text):
    with pytest.raises(InvalidArgument):
        parse_cpus(text)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "daemon.yaml"
    path.write_text(text)
    return path


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = _write(tmp_path, "node: n1\nlisten: 127.0.0.1:7701\ncontroller: [unclosed\n")
    with pytest.raises(ConfigError) as err:
        AgentConfig.load(path)
    assert str(path) in err.value.message
    assert ":4:" in err.value.message or ":3:" in err.value.message


def test_unknown_key_is_refused_with_its_line(tmp_path):
    path = _write(tmp_path, "node: n1\nlisten: 127.0.0.1:7701\ncontrolller: 127.0.0.1:7700\n")
    with pytest.raises(ConfigError, match=r"daemon.yaml:3: controlller: unknown key"):
        AgentConfig.load(path)


def test_wrong_type_and_bad_address(tmp_path):
    path = _write(tmp_path, "listen: 7700\n")
    with pytest.raises(ConfigError, match=r":1: listen: expected list"):
        ControllerConfig.load(path)
    path = _write(tmp_path, "node: n1\nlisten: nowhere\n")
    with pytest.raises(ConfigError, match=r":2: listen: invalid address"):
        AgentConfig.load(path)


def test_missing_config_file_is_clear(tmp_path):
    with pytest.raises(ConfigError, match="configuration file not found"):
        AgentConfig.load(tmp_path / "absent.yaml")


def _node(name, mem_gb=8, state=NodeState.READY, allocated_gb=0, cpus=2):
    facts = NodeFacts(name=name, address=f"{name}:1", cpus=cpus, memory_bytes=mem_gb << 30, disk_bytes=100 << 30,
                      disk_free_bytes=50 << 30, storage_drivers=("dir",))  # fmt: skip
    return Node(facts, state, 0.0, Limits(memory_bytes=allocated_gb << 30))


def test_placement_prefers_most_free_memory_and_explains_refusals():
    nodes = [_node("n1", allocated_gb=6), _node("n2", allocated_gb=1), _node("n3", state=NodeState.SUSPECT)]
    assert place(PlacementRequest("c", Limits(memory_bytes=1 << 30)), nodes).node == "n2"
    with pytest.raises(NoCapacity) as err:
        place(PlacementRequest("c", Limits(memory_bytes=64 << 30)), nodes)
    assert "n1: needs 64G memory" in err.value.message and "n3: node is suspect" in err.value.message


def test_placement_honours_named_node_and_its_capacity():
    nodes = [_node("n1"), _node("n2", allocated_gb=7)]
    assert place(PlacementRequest("c", Limits(), node="n2"), nodes).node == "n2"
    with pytest.raises(NoCapacity, match="node 'n2' cannot take"):
        place(PlacementRequest("c", Limits(memory_bytes=2 << 30), node="n2"), nodes)
    with pytest.raises(NotFound, match="node 'n9' is not registered"):
        place(PlacementRequest("c", Limits(), node="n9"), nodes)
    with pytest.raises(NoCapacity, match="needs 4 CPUs, has 2"):
        place(PlacementRequest("c", Limits(cpu_millis=4000), node="n1"), nodes)


def test_shared_volume_group_selects_lvm_and_bad_names_are_refused(tmp_path):
    for name in ("ca", "cert", "key"):
        (tmp_path / name).write_text("")
    base = "node: n1\nlisten: 127.0.0.1:7701\ncontroller: 127.0.0.1:7700\ntls: {ca: ca, cert: cert, key: key}\n"
    assert AgentConfig.load(_write(tmp_path, base + "shared_volume_group: corral-san\n")).shared_volume_group == "corral-san"
    assert AgentConfig.load(_write(tmp_path, base)).shared_volume_group is None
    for bad in ("../etc", "vg/x", "-vg", ".."):
        with pytest.raises(ConfigError, match=r"daemon.yaml:5: shared_volume_group"):
            AgentConfig.load(_write(tmp_path, base + f"shared_volume_group: '{bad}'\n"))
