"""Both command lines print an error as exactly one line of text on stderr and exit 1, whatever
the message holds: Rich markup look-alikes (`[/PATH]`, `[bold]`) are printed as they are, never
parsed (a `MarkupError` traceback was the red team's finding), line breaks and control characters
cannot split the line. A device name with a trailing newline is refused."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from agent.cli import app as agent_app
from cli_helpers import assert_one_error_line
from common.cli import one_line
from stctl.bootstrap import init_workspace
from stctl.cli import app as stctl_app
from stctl.enroll import ENV_REPOSITORY_URL, list_devices

runner = CliRunner()
DEVICE_URL = "https://127.0.0.1:8443"
REPO_URL = "http://127.0.0.1:8080"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return init_workspace(tmp_path_factory.mktemp("cli-errors") / "fleet")


def enroll(workspace, *args: str):
    return runner.invoke(stctl_app, ["device", "enroll", *args, "--workspace", str(workspace.root)],
                         env={ENV_REPOSITORY_URL: None})


def test_enroll_without_repository_url_prints_one_line_not_a_traceback(workspace, tmp_path):
    """The reported case, run as the operator runs it: the installed `stctl` in a process of its own."""
    script = Path(sys.executable).with_name("stctl")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "stctl.cli"]
    env = {k: v for k, v in os.environ.items() if k not in (ENV_REPOSITORY_URL, "FORCE_COLOR", "TTY_COMPATIBLE")}
    out = tmp_path / "pc9.enroll"
    done = subprocess.run(command + ["device", "enroll", "pc9", "--url", DEVICE_URL, "-o", str(out),
                                     "--workspace", str(workspace.root)], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 1, done
    assert done.stderr.splitlines() == ["error: repository url: missing; expected http(s)://HOST[:PORT][/PATH]"], \
        done.stderr
    assert done.stdout == "" and not out.exists()


@pytest.mark.parametrize("repository_url, mention", [
    ("http://[::1", "'http://[::1'"),
    ("ftp://repo/[/PATH]", "[/PATH]"),
    ("http://repo/[bold]x[/bold]?q=1", "[bold]x[/bold]"),
    ("not a url", "'not a url'"),
])
def test_enroll_with_a_bad_repository_url_prints_one_line(workspace, tmp_path, repository_url, mention):
    out = tmp_path / "pc9.enroll"
    result = enroll(workspace, "pc9", "--url", DEVICE_URL, "--repository-url", repository_url, "-o", str(out))
    assert_one_error_line(result, "repository url", mention, "http(s)://HOST[:PORT][/PATH]")
    assert not out.exists()


@pytest.mark.parametrize("server_url", ["http://fleet:8444", "https://fleet:8444/api", "fleet:8444", "https://"])
def test_enroll_with_a_bad_server_url_prints_one_line(workspace, tmp_path, server_url):
    out = tmp_path / "pc9.enroll"
    result = enroll(workspace, "pc9", "--url", DEVICE_URL, "--repository-url", REPO_URL, "--server-url", server_url,
                    "-o", str(out))
    assert_one_error_line(result, "server url", "https://HOST[:PORT]")
    assert not out.exists()


def test_enroll_with_a_server_url_puts_it_in_the_enrollment_file(workspace, tmp_path):
    from manifests.enrollment import Enrollment

    out = tmp_path / "pc9.enroll"
    result = enroll(workspace, "pc9", "--url", DEVICE_URL, "--repository-url", REPO_URL, "--server-url",
                    "https://fleet.plant.lan:8444/", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert Enrollment.from_bytes(out.read_bytes()).server_url == "https://fleet.plant.lan:8444"


def test_error_messages_with_markup_are_printed_as_text(workspace, tmp_path):
    result = enroll(workspace, "pc9", "--url", "https://[bold]red[/bold]:8443", "--repository-url", REPO_URL,
                    "-o", str(tmp_path / "pc9.enroll"))
    assert_one_error_line(result, "device url 'https://[bold]red[/bold]:8443'")
    taken = tmp_path / "[bold]pc9[" / "PATH].enroll"  # the path reads ".../[bold]pc9[/PATH].enroll"
    taken.parent.mkdir()
    taken.write_text("keep me")
    result = enroll(workspace, "pc9", "--url", DEVICE_URL, "--repository-url", REPO_URL, "-o", str(taken))
    assert_one_error_line(result, str(taken), "already exists")
    assert taken.read_text() == "keep me"


def test_success_message_prints_a_path_with_brackets_as_text(workspace, tmp_path):
    out = tmp_path / "[red]pc8[" / "PATH].enroll"
    out.parent.mkdir()
    result = enroll(workspace, "pc8", "--url", DEVICE_URL, "--repository-url", REPO_URL, "-o", str(out))
    assert result.exit_code == 0, (result.output, result.exception)
    squeezed = "".join(result.stdout.split())  # Rich wraps long lines at 80 columns here
    assert "".join(f"copy {out} to the device".split()) in squeezed, result.stdout
    assert out.exists()


def test_device_name_with_a_trailing_newline_is_refused(workspace, tmp_path):
    result = enroll(workspace, "devnl\n", "--url", DEVICE_URL, "--repository-url", REPO_URL,
                    "-o", str(tmp_path / "devnl.enroll"))
    assert_one_error_line(result, "device name 'devnl\\n'")
    assert not (tmp_path / "devnl.enroll").exists()
    assert "devnl\n" not in {d["name"] for d in list_devices(workspace)}
    ok = enroll(workspace, "devnl", "--url", DEVICE_URL, "--repository-url", REPO_URL,
                "-o", str(tmp_path / "ok.enroll"))
    assert ok.exit_code == 0, ok.output  # the same name without the newline is fine


def test_agent_errors_with_brackets_print_one_line(tmp_path):
    missing = tmp_path / "[/PATH][bold]" / "line4.enroll"
    result = runner.invoke(agent_app, ["init", "--enroll", str(missing), "--data-dir", str(tmp_path / "d")])
    assert_one_error_line(result, str(missing))
    result = runner.invoke(agent_app, ["serve", "--data-dir", str(tmp_path / "d"), "--listen", "[/PATH]:x"])
    assert_one_error_line(result, "--listen '[/PATH]:x'")
    assert not (tmp_path / "d" / "agent.json").exists()


def test_one_line_keeps_text_and_defuses_line_breaks_and_control_characters():
    assert one_line("[/PATH] [bold]x") == "[/PATH] [bold]x"
    assert one_line("first\nsecond\r\nthird") == "first second third"
    assert one_line("red \x1b[31malert\x07") == "red \\x1b[31malert\\x07"
    assert one_line("bad \udcff byte") == "bad \\udcff byte"
