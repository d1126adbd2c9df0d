"""What both command lines (stctl, st-agent) share: error lines, the error wrapper, JSON output.

Rules:
- an error is exactly one line `error: MESSAGE` on stderr, printed as text, never as Rich
  markup (a message may hold `[/PATH]` or `[bold]`); line breaks in the message become spaces,
  other control characters and unencodable characters their escapes, so no message can break
  the line or the terminal;
- a command wrapped with `handles_errors(*errors)` turns those errors and OSError into that line
  and exit code 1, Ctrl-C into `error: interrupted` and exit code 130, never a traceback;
- JSON goes to stdout, indented, keys sorted, anything unknown as its `str`.
"""
from __future__ import annotations

import functools
import json
import re
import sys
from collections.abc import Callable
from typing import NoReturn

import typer
from rich.console import Console
from rich.text import Text

err_console = Console(stderr=True)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def one_line(message: str) -> str:
    """`message` as one printable line (line breaks -> spaces, control characters -> \\xNN)."""
    text = " ".join(message.splitlines())
    text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
    return text.encode("utf-8", "backslashreplace").decode("utf-8")  # lone surrogates from argv or paths


def fail(message: str, code: int = 1) -> NoReturn:
    """Print `error: MESSAGE` as one line of text on stderr and end the command with `code`."""
    err_console.print(Text("error:", style="bold red") + Text(" " + one_line(message)), soft_wrap=True,
                      highlight=False)
    raise typer.Exit(code)


def handles_errors(*errors: type[BaseException]) -> Callable[[Callable], Callable]:
    """A decorator for Typer commands: `errors`, OSError and Ctrl-C end the command through `fail`."""

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except errors as e:
                fail(str(e))
            except KeyboardInterrupt:
                fail("interrupted", 130)
            except OSError as e:
                fail(f"{e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}")

        return wrapper

    return decorate


def command_line(name: str, help_text: str) -> typer.Typer:
    """A top-level Typer app as both CLIs make theirs: `-h` and `--help`, help when called without
    arguments, no shell-completion install commands."""
    return typer.Typer(name=name, help=help_text, no_args_is_help=True, add_completion=False,
                       context_settings={"help_option_names": ["-h", "--help"]})


def print_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
