"""CLI contexts (named controllers), in-process: no lab, no controller; a temp HOME."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from controller.cli.context import Ctx
from controller.cli.main import cli
from controller.cli.settings import CliSettings


def _tls(directory: Path) -> dict[str, str]:
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("ca.crt", "me.crt", "me.key"):
        (directory / name).write_text("x")
    return {"ca": str(directory / "ca.crt"), "cert": str(directory / "me.crt"), "key": str(directory / "me.key")}


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    for var in ("CORRAL_CONFIG", "CORRAL_CONTEXT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(home))
    return home


def config_path(home: Path) -> Path:
    return home / ".config" / "corral" / "config.yaml"


def write(home: Path, doc: dict) -> Path:
    path = config_path(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def corral(*args: str, env: dict | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args), prog_name="corral", env=env)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def two_contexts(home: Path) -> Path:
    return write(home, {
        "current-context": "prod",
        "contexts": {
            "prod": {"controller": "10.0.0.1:7700", "tls": _tls(home / "prod"), "timeout": 60},
            "staging": {"controller": "10.0.0.2:7700", "tls": _tls(home / "staging")},
        },
    })  # fmt: skip


def test_old_single_controller_format_is_context_default(home):
    write(home, {"controller": "10.0.0.9:7700", "tls": _tls(home / "pki")})
    settings = CliSettings.load(None)
    assert (settings.context, settings.controller, settings.timeout) == ("default", "10.0.0.9:7700", 900.0)
    code, out = corral("context", "ls", "--no-headers")
    assert code == 0 and out.split() == ["*", "default", "10.0.0.9:7700"]


def test_current_env_and_option_pick_the_context(home, monkeypatch):
    two_contexts(home)
    assert CliSettings.load(None).controller == "10.0.0.1:7700"
    assert CliSettings.load(None).timeout == 60.0
    assert CliSettings.load(None, "staging").controller == "10.0.0.2:7700"
    monkeypatch.setenv("CORRAL_CONTEXT", "staging")
    assert CliSettings.load(None).controller == "10.0.0.2:7700"
    assert CliSettings.load(None, "prod").controller == "10.0.0.1:7700"  # --context beats the environment


@pytest.mark.parametrize("args", [["--context", "staging", "context", "show"], ["context", "show", "--context", "staging"],
                                  ["context", "show", "staging"]])
def test_context_option_anywhere(home, args):
    two_contexts(home)
    code, out = corral(*args, "-o", "json")
    assert code == 0, out
    assert json.loads(out)["controller"] == "10.0.0.2:7700"


def test_the_client_is_made_for_the_chosen_context(home, monkeypatch):
    two_contexts(home)
    made = []
    monkeypatch.setattr("controller.client.ControllerClient.__init__",
                        lambda self, address, tls, timeout=900.0: made.append((address, timeout)))  # fmt: skip
    Ctx(context="staging").client()
    Ctx().client(timeout=2)
    assert made == [("10.0.0.2:7700", 900.0), ("10.0.0.1:7700", 2)]


def test_context_use_and_ls(home):
    path = two_contexts(home)
    code, out = corral("context", "use", "staging")
    assert code == 0 and "staging" in out
    assert yaml.safe_load(path.read_text())["current-context"] == "staging"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    code, out = corral("context", "ls")
    lines = out.splitlines()
    assert lines[0].split() == ["CURRENT", "NAME", "CONTROLLER"]
    assert [line.split() for line in lines[2:]] == [["prod", "10.0.0.1:7700"], ["*", "staging", "10.0.0.2:7700"]]
    code, out = corral("context", "use", "nope")
    assert code == 3 and "no context named 'nope'" in out
    assert yaml.safe_load(path.read_text())["current-context"] == "staging"  # unchanged


def test_bad_config_names_file_and_line(home):
    path = write(home, {"current-context": "prod", "contexts": {"prod": {"controler": "x:1"}}})
    code, out = corral("context", "show")
    assert code == 78 and f"{path}:4: contexts.prod.controler: unknown key" in out


def test_unknown_current_context_is_refused(home):
    write(home, {"current-context": "gone", "contexts": {}})
    code, out = corral("context", "show")
    assert code == 78 and "no context named 'gone'" in out


class FakeLab:
    """lab_up/lab_down as the lab package has them, without a lab: the lab's own CLI config
    is a single-controller file, as the real lab writes it."""

    def __init__(self, base: Path) -> None:
        self.base = base

    async def lab_up(self, name="demo", nodes=3, **kwargs):
        from types import SimpleNamespace

        assert "write_cli_config" not in kwargs  # the CLI adds its context; the lab writes no user file
        cli_config = self.base / name / "cli.yaml"
        tls = _tls(self.base / name / "pki")
        cli_config.write_text(yaml.safe_dump({"controller": f"10.213.{len(name)}.1:7700", "tls": tls}))
        return SimpleNamespace(name=name, hosts=[], controller_address="10.213.0.1:7700", controller_pid=1,
                               cli_config=cli_config)  # fmt: skip

    async def lab_down(self, name="demo", **kwargs):
        return None


@pytest.fixture
def fake_lab(tmp_path, monkeypatch) -> FakeLab:
    import lab

    fake = FakeLab(tmp_path / "labs")
    monkeypatch.setattr(lab, "lab_up", fake.lab_up)
    monkeypatch.setattr(lab, "lab_down", fake.lab_down)
    return fake


def test_lab_up_adds_its_context_and_lab_down_returns_to_the_previous(home, fake_lab):
    path = two_contexts(home)
    code, out = corral("lab", "up", "--name", "demo")
    assert code == 0, out
    doc = yaml.safe_load(path.read_text())
    assert doc["current-context"] == "lab-demo"
    assert list(doc["contexts"]) == ["prod", "staging", "lab-demo"]
    assert doc["contexts"]["prod"]["controller"] == "10.0.0.1:7700"  # the others untouched
    assert doc["contexts"]["lab-demo"]["previous-context"] == "prod"
    assert CliSettings.load(None).controller == "10.213.4.1:7700"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    code, out = corral("lab", "down", "--name", "demo")
    assert code == 0, out
    doc = yaml.safe_load(path.read_text())
    assert doc["current-context"] == "prod" and list(doc["contexts"]) == ["prod", "staging"]


def test_two_labs_unwind_in_any_order(home, fake_lab):
    path = two_contexts(home)
    corral("lab", "up", "--name", "a")
    corral("lab", "up", "--name", "bb")
    assert yaml.safe_load(path.read_text())["contexts"]["lab-bb"]["previous-context"] == "lab-a"
    corral("lab", "down", "--name", "a")  # not current: the current stays, bb now returns to prod
    doc = yaml.safe_load(path.read_text())
    assert doc["current-context"] == "lab-bb" and doc["contexts"]["lab-bb"]["previous-context"] == "prod"
    corral("lab", "down", "--name", "bb")
    assert yaml.safe_load(path.read_text())["current-context"] == "prod"


def test_lab_up_without_a_config_then_down_leaves_none_current(home, fake_lab):
    code, out = corral("lab", "up")
    assert code == 0, out
    path = config_path(home)
    doc = yaml.safe_load(path.read_text())
    assert doc["current-context"] == "lab-demo" and "previous-context" not in doc["contexts"]["lab-demo"]
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    corral("lab", "down")
    doc = yaml.safe_load(path.read_text())
    assert "current-context" not in doc and doc["contexts"] == {}
    code, out = corral("node", "ls")
    assert code == 78 and "no current context" in out


def test_lab_up_on_an_old_format_config_keeps_it_as_default(home, fake_lab):
    path = write(home, {"controller": "10.0.0.9:7700", "tls": _tls(home / "pki")})
    corral("lab", "up")
    doc = yaml.safe_load(path.read_text())
    assert set(doc["contexts"]) == {"default", "lab-demo"}
    assert doc["contexts"]["default"]["controller"] == "10.0.0.9:7700"
    corral("lab", "down")
    assert CliSettings.load(None).controller == "10.0.0.9:7700"


def test_lab_up_twice_keeps_the_first_previous(home, fake_lab):
    path = two_contexts(home)
    corral("lab", "up")
    corral("lab", "up")  # e.g. after `lab down` failed half-way: the lab's context is refreshed
    assert yaml.safe_load(path.read_text())["contexts"]["lab-demo"]["previous-context"] == "prod"
    corral("lab", "down")
    assert yaml.safe_load(path.read_text())["current-context"] == "prod"


def test_config_write_is_atomic(home, monkeypatch):
    from controller.cli import contexts

    path = two_contexts(home)
    before = path.read_text()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(contexts.os, "replace", broken_replace)
    with pytest.raises(OSError):
        with contexts.editing() as config:
            config.use("staging")
    assert path.read_text() == before
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_context_names_complete(home):
    from click.shell_completion import ShellComplete

    two_contexts(home)
    comp = ShellComplete(cli, {}, "corral", "_CORRAL_COMPLETE")
    assert [c.value for c in comp.get_completions(["context", "use"], "")] == ["prod", "staging"]
    assert [c.value for c in comp.get_completions(["--context"], "st")] == ["staging"]
    assert [c.value for c in comp.get_completions(["ct", "ls", "--context"], "p")] == ["prod"]
