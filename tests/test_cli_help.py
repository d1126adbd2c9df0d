"""Every command of `stctl` (and `st-agent`, once `agent.cli` exists) has help text with an example.

Commands are discovered from the Typer apps at collection time (typer.main.get_command, then
click groups recursively), so commands added later are covered without editing this file.
Groups count as commands: `stctl model --help` is what an operator types first.
"""
from __future__ import annotations

import importlib

import click
import pytest
import typer
from typer.main import get_command
from typer.testing import CliRunner

runner = CliRunner()
APPS = {"stctl": "stctl.cli", "st-agent": "agent.cli"}


def _load_app(module: str) -> typer.Typer | None:
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):  # the module itself is absent: not built yet
            return None
        raise
    return getattr(mod, "app")


def _is_group(cmd) -> bool:
    # duck-typed: typer's groups are not always subclasses of the installed click's Group
    return isinstance(cmd, click.Group) or (hasattr(cmd, "list_commands") and hasattr(cmd, "get_command"))


def _context(cmd):
    return getattr(cmd, "context_class", click.Context)(cmd)


def _walk(cmd, path: tuple[str, ...]):
    yield path, cmd
    if _is_group(cmd):
        ctx = _context(cmd)
        for name in cmd.list_commands(ctx):
            sub = cmd.get_command(ctx, name)
            if sub is not None and not getattr(sub, "hidden", False):
                yield from _walk(sub, path + (name,))


def _cases(groups: bool):
    cases = []
    for prog, module in APPS.items():
        app = _load_app(module)
        if app is None:
            cases.append(pytest.param(prog, module, (), id=f"{prog}-absent",
                                      marks=pytest.mark.skip(reason=f"{module} does not exist yet")))
            continue
        for path, cmd in _walk(get_command(app), ()):
            if _is_group(cmd) == groups:
                cases.append(pytest.param(prog, module, path, id=" ".join((prog,) + path)))
    return cases


COMMANDS = _cases(groups=False)
GROUPS = _cases(groups=True)


def test_command_discovery_finds_the_documented_model_commands():
    found = {c.values[2] for c in COMMANDS + GROUPS if c.values[0] == "stctl"}
    for path in [(), ("model",), ("model", "build"), ("model", "run")]:
        assert path in found, f"stctl {' '.join(path)} not discovered"


def _check_help(prog: str, module: str, path: tuple[str, ...]) -> None:
    app = _load_app(module)
    cmd = get_command(app)
    for name in path:
        cmd = cmd.get_command(_context(cmd), name)
    label = " ".join((prog,) + path)
    text = (cmd.help or cmd.short_help or "").strip()
    assert text, f"{label}: no help text"
    result = runner.invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output
    assert "Example" in result.output, f"`{label} --help` shows no 'Example'"


@pytest.mark.parametrize("prog,module,path", COMMANDS)
def test_command_help_has_text_and_an_example(prog, module, path):
    _check_help(prog, module, path)


@pytest.mark.parametrize("prog,module,path", GROUPS)
def test_command_group_help_has_text_and_an_example(prog, module, path):
    """`stctl --help`, `stctl model --help`, ...: DESIGN.md says every command has an example."""
    _check_help(prog, module, path)
