"""`stctl server serve|assign|assignments|unassign`: the fleet server devices call home to
(library: stctl.fleet_server) and the assignments it hands them (library: stctl.assignments).

Rule: `assign`, `assignments` and `unassign` write and read fleet.db through the library, with no
server process needed: the server reads the assignments table at every poll, so a change takes
effect at each device's next poll. Text from fleet.db (names, versions) is printed as text."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table
from rich.text import Text

from stctl.cli_common import console, handles_errors, print_json, workspace_option
from stctl.workspace import open_workspace

server_app = typer.Typer(help="The fleet server devices call home to, and what it assigns them.\n\n"
                              "Example: stctl server serve --listen 0.0.0.0:8444 --name fleet.example.lan",
                         no_args_is_help=True)


@server_app.command("serve")
@handles_errors
def serve(
    listen: str = typer.Option(..., "--listen", help="HOST:PORT to listen on, e.g. 0.0.0.0:8444."),
    name: list[str] = typer.Option([], "--name", help="Host name or IP devices use to reach the server, repeatable "
                                                      "(goes into its certificate; default: the --listen host)."),
    poll_interval: float = typer.Option(60.0, "--poll-interval", help="Seconds a device waits between polls "
                                                                      "(it adds its own jitter)."),
    shutdown_grace: float = typer.Option(10.0, "--shutdown-grace", help="Seconds requests in flight get at "
                                                                        "SIGTERM/Ctrl-C."),
    drive_rollouts: bool = typer.Option(True, "--drive-rollouts/--no-drive-rollouts",
                                        help="Drive the workspace's rollouts (stctl rollout start --detach)."),
    rollout_interval: float = typer.Option(2.0, "--rollout-interval", help="Seconds between looks for a "
                                                                           "rollout to drive."),
    workspace: Optional[Path] = workspace_option(),
) -> None:
    """Run the fleet server over TLS until SIGTERM or Ctrl-C (then it finishes requests in flight).

    On its first start it issues its certificate from the fleet CA into pki/server.crt. It also
    drives the workspace's rollouts (soak, gates, halt, rollback), so they need no operator process;
    a rollout it was driving when it stopped resumes when it starts again.
    Example: stctl server serve --listen 0.0.0.0:8444 --name fleet.example.lan --workspace ./fleet
    """
    from stctl.fleet_server import ServerConfig, serve as run

    config = ServerConfig(poll_after_s=poll_interval, shutdown_grace_s=shutdown_grace,
                          rollout_interval_s=rollout_interval)
    run(open_workspace(workspace), listen, name, config,
        announce=lambda url: console.print(f"fleet server on {url} (Ctrl-C to stop)", markup=False, highlight=False),
        drive_rollouts=drive_rollouts, say=lambda m: console.print(m, markup=False, highlight=False))


def _fields(version: str, model: Optional[str], action: str, window: Optional[str], tz: Optional[str],
            install_later: bool, max_bytes_per_s: Optional[int], repository_url: Optional[str],
            allow_downgrade: bool) -> dict:
    from stctl.assignments import AssignmentError, parse_window

    if (window is None) != (tz is None):
        raise AssignmentError("--window and --tz go together (the window is in the device's local time zone)")
    return {"action": action, "model": model, "version": version, "repository_url": repository_url,
            "allow_downgrade": allow_downgrade, "window": parse_window(window, tz) if window else None,
            "download_now": not install_later, "max_bytes_per_s": max_bytes_per_s}


def _describe(a: dict) -> str:
    w = a["window"]
    when = "at once" if w is None else (f"in {w['start_minute'] // 60:02d}:{w['start_minute'] % 60:02d}-"
                                        f"{w['end_minute'] // 60:02d}:{w['end_minute'] % 60:02d} {w['tz']}")
    extra = "" if a["download_now"] else ", downloads in the window too"
    cap = "" if a["max_bytes_per_s"] is None else f", at most {a['max_bytes_per_s']} B/s"
    return f"{a['action']} {a['model']} {a['version']} {when}{extra}{cap}"


@server_app.command("assign")
@handles_errors
def assign(
    device: str = typer.Argument(..., help="Enrolled device that should run the release."),
    version: str = typer.Option(..., "--version", help="Published version to run."),
    model: Optional[str] = typer.Option(None, "--model", help="Model (default: the device's, else the only one "
                                                              "published)."),
    action: str = typer.Option("update", "--action", help="update or rollback."),
    window: Optional[str] = typer.Option(None, "--window", help="Daily maintenance window HH:MM-HH:MM in the "
                                                                "device's local time (needs --tz)."),
    tz: Optional[str] = typer.Option(None, "--tz", help="The window's time zone, e.g. Europe/Berlin."),
    install_later: bool = typer.Option(False, "--install-later", help="Download only inside the window too "
                                                                      "(default: download at once, install in it)."),
    max_bytes_per_s: Optional[int] = typer.Option(None, "--max-bytes-per-s", help="Download bandwidth cap."),
    repository_url: Optional[str] = typer.Option(None, "--repository-url", help="Repository to fetch from "
                                                                                "(default: the device's own)."),
    allow_downgrade: bool = typer.Option(False, "--allow-downgrade", help="Allow an older version."),
    workspace: Optional[Path] = workspace_option(),
    as_json: bool = typer.Option(False, "--json", help="Print the assignment as JSON."),
) -> None:
    """Assign a device the release to run; it gets it at its next poll (replaces its assignment).

    Example: stctl server assign line4-pc1 --version 2.0.0 --window 22:00-04:00 --tz Europe/Berlin
    """
    from stctl.assignments import assign as put

    fields = _fields(version, model, action, window, tz, install_later, max_bytes_per_s, repository_url,
                     allow_downgrade)
    result = put(open_workspace(workspace), device, fields)
    if as_json:
        print_json(result)
    else:
        console.print(f"{device}: {_describe(result)} (assignment {result['id']})", markup=False, highlight=False)


@server_app.command("assignments")
@handles_errors
def assignments(
    workspace: Optional[Path] = workspace_option(),
    as_json: bool = typer.Option(False, "--json", help="Print the assignments as JSON."),
) -> None:
    """List what each device is assigned.

    Example: stctl server assignments --json
    """
    from stctl.assignments import assignments as listing

    rows = listing(open_workspace(workspace))
    if as_json:
        print_json(rows)
        return
    table = Table("device", "assignment", "id", "assigned at", title="assignments")
    for a in rows:
        table.add_row(*(Text(str(cell)) for cell in (a["device"], _describe(a), a["id"], a["assigned_at"])))
    console.print(table if rows else "no assignments", markup=False, highlight=False)


@server_app.command("unassign")
@handles_errors
def unassign(
    device: str = typer.Argument(..., help="Device whose assignment is removed."),
    workspace: Optional[Path] = workspace_option(),
    as_json: bool = typer.Option(False, "--json", help="Print the removed assignment as JSON."),
) -> None:
    """Remove a device's assignment (the device keeps the release it runs).

    Example: stctl server unassign line4-pc1
    """
    from stctl.assignments import unassign as remove

    result = remove(open_workspace(workspace), device)
    if as_json:
        print_json(result)
    else:
        console.print(f"{device}: assignment {result['id']} removed", markup=False, highlight=False)
