"""What every stctl command shares: error translation, JSON output, Rich console and progress.

Rule: a command body calls one library function; errors of the project's packages become one
line on stderr and exit code 1, never a traceback.
"""
from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from manifests import ManifestError
from model.errors import ModelError
from stctl.errors import StctlError

console = Console()
err_console = Console(stderr=True)

HANDLED = (StctlError, ModelError, ManifestError)


def fail(message: str, code: int = 1) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def handles_errors(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except HANDLED as e:
            fail(str(e))
        except KeyboardInterrupt:
            fail("interrupted", 130)
        except OSError as e:
            fail(f"{e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}")

    return wrapper


def print_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


@contextmanager
def progress_bar(description: str, enabled: bool = True):
    """Yields `update(done, total, label)`; draws a Rich bar on stderr when enabled."""
    if not enabled:
        yield lambda done, total, label="": None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[label]}"),
                  TimeElapsedColumn(), console=err_console, transient=False) as bar:
        task = bar.add_task(description, total=None, label="")

        def update(done: int, total: int, label: str = "") -> None:
            bar.update(task, completed=done, total=total, label=label)

        yield update
