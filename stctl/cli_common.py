"""What every stctl command shares: error translation, JSON output, Rich console and progress.

Rule: a command body calls one library function; errors of the project's packages become one
line of text on stderr and exit code 1, never a traceback (`common.cli`, shared with
st-agent). Text that comes from outside (paths, names, messages of devices) is printed as text:
with `markup=False`, or through `escape` where a line mixes it with markup.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from manifests import ManifestError
from common.cli import err_console, fail, handles_errors as _handles, print_json
from model.errors import ModelError
from stctl.errors import StctlError
from stctl.workspace import ENV_WORKSPACE

console = Console()

HANDLED = (StctlError, ModelError, ManifestError)
handles_errors = _handles(*HANDLED)

__all__ = ["HANDLED", "console", "err_console", "escape", "fail", "handles_errors", "print_json", "progress_bar",
           "workspace_option"]


def workspace_option() -> Optional[Path]:
    """The `--workspace/-w` option every workspace command takes (default: $STCTL_WORKSPACE, else `.`)."""
    return typer.Option(None, "--workspace", "-w", envvar=ENV_WORKSPACE,
                        help="Fleet workspace directory (default: the current directory).")


@contextmanager
def progress_bar(description: str, enabled: bool = True):
    """Yields `update(done, total, label)`; draws a Rich bar on stderr when enabled."""
    if not enabled:
        yield lambda done, total, label="": None
        return
    label = TextColumn("{task.fields[label]}", markup=False)  # shard and file names are not markup
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), label, TimeElapsedColumn(),
                  console=err_console, transient=False) as bar:
        task = bar.add_task(description, total=None, label="")

        def update(done: int, total: int, label: str = "") -> None:
            bar.update(task, completed=done, total=total, label=label)

        yield update
