"""`stctl device list`, `stctl rollout start|status|pause|resume|abort`, `stctl health`,
`stctl telemetry pull|show` (libraries: stctl.registry, stctl.rollout, stctl.fleet_health,
stctl.telemetry_pull). `register(app)` adds them to the root app; `device list` joins the
`device` sub-app of stctl.cli_device.

Rule: text that comes from a device or an error (failures, details, error messages) is printed as
plain text (`rich.text.Text`, `markup=False`), never as Rich markup."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table
from rich.text import Text

from stctl.cli_common import console, err_console, handles_errors, print_json, workspace_option
from stctl.cli_device import device_app
from stctl.workspace import open_workspace

rollout_app = typer.Typer(help="Staged rollouts: waves, soak, gates on telemetry, automatic halt and rollback.\n\n"
                               "Example: stctl rollout start --model st-demo --version 2.0.0 --plan plan.toml",
                          no_args_is_help=True)
telemetry_app = typer.Typer(help="Copy the devices' telemetry into fleet.db and summarize it.\n\n"
                                 "Example: stctl telemetry pull && stctl telemetry show", no_args_is_help=True)


def _json_option(what: str = "the result") -> bool:
    return typer.Option(False, "--json", help=f"Print {what} as JSON.")


def _num(value, fmt: str = "{:.1f}") -> str:
    return "-" if value is None else fmt.format(value)


def _mib(value) -> str:
    return "-" if value is None else f"{value / 2**20:.0f} MiB"


# ---- device list ----------------------------------------------------------------------------------


@device_app.command("list")
@handles_errors
def device_list(
    offline: bool = typer.Option(False, "--offline", help="Do not ask the devices; show what fleet.db last recorded."),
    workspace: Optional[Path] = workspace_option(),
    as_json: bool = _json_option("the devices"),
) -> None:
    """List the fleet: name, tags, reachable, model and version, last decode tokens/s, peak RSS, last health.

    Asks every device for its status first (a few seconds at most); speed, memory and health come from
    the telemetry pulled into fleet.db (`stctl telemetry pull`, `stctl health`).

    Example: stctl device list --json
    """
    from stctl.registry import fleet_table

    devices = fleet_table(open_workspace(workspace), probe_devices=not offline)
    if as_json:
        print_json(devices)
        return
    table = Table("name", "tags", "reachable", "release", "tok/s", "peak RSS", "health", title="devices")
    for d in devices:
        reachable = {True: "[green]yes[/]", False: "[red]no[/]", None: "?"}[d["reachable"]]
        release = f"{d['model']}@{d['version']}" if d["version"] else "-"
        health = {"passed": "[green]passed[/]", "failed": "[red]failed[/]", None: "-"}[d["last_health"]]
        table.add_row(d["name"], ",".join(f"{k}={v}" for k, v in d["tags"].items()), reachable, release,
                      _num(d["last_decode_tokens_per_s"]), _mib(d["last_peak_rss_bytes"]), health)
    console.print(table)


# ---- rollouts -------------------------------------------------------------------------------------
def _outage_text(outage: dict) -> str:
    return (f"unreachable since {outage['since']}: {outage['last_error']} ({outage['attempts']} failed attempts); "
            f"failed in {outage['time_left_s']:.0f}s unless it answers")


def rollout_table(status: dict) -> Table:
    table = Table("wave", "name", "state", "progress", "failed", "devices", title=(
        f"rollout {status['id']}: {status['model']} {status['version']}: {status['state']}"
        f"{' (' + status['requested'] + ' requested)' if status['requested'] else ''}"))
    for w in status["waves"]:
        width = 20
        filled = round(width * w["done"] / w["devices"]) if w["devices"] else width
        bar = "[green]" + "━" * filled + "[/][dim]" + "━" * (width - filled) + "[/]"
        names = Text(", ").join(Text.assemble(f"{d['device']}:{d['state']}",
                                              (" (unreachable)", "yellow") if d["unreachable"] else "")
                                for d in status["devices"] if d["wave"] == w["index"])
        table.add_row(str(w["index"] + 1), w["name"], w["state"], f"{bar} {w['done']}/{w['devices']}",
                      str(w["failed"]), names)
    return table


def _report(status: dict, as_json: bool) -> None:
    if as_json:
        print_json(status)
    else:
        console.print(rollout_table(status))
        for d in status["devices"]:
            if d["failure"]:
                console.print(Text.assemble("  ", (d["device"], "red"), f": {d['failure']}"), highlight=False)
    if status["state"] in ("halted", "aborted"):
        err_console.print(f"rollout {status['id']} {status['state']}: {status['detail']}", highlight=False,
                          markup=False, soft_wrap=True)
        raise typer.Exit(1)


def _say(as_json: bool):
    """The live output of the controller: one line per change, as plain text (it quotes devices)."""
    return (lambda _m: None) if as_json else (lambda m: console.print(m, highlight=False, markup=False))


@rollout_app.command("start")
@handles_errors
def rollout_start(
    model: str = typer.Option(..., "--model", help="Model name, as published."),
    version: str = typer.Option(..., "--version", help="Version to roll out (published in this workspace)."),
    plan: Path = typer.Option(..., "--plan", help="Rollout plan (TOML; see manifests/examples/)."),
    repository_url: Optional[str] = typer.Option(None, "--repository-url",
                                                 help="Repository devices fetch from (default: their enrolled one)."),
    allow_downgrade: bool = typer.Option(False, "--allow-downgrade", help="Allow an older version than a device runs."),
    detach: bool = typer.Option(False, "--detach", help="Only create the rollout and return; the fleet server "
                                                        "(stctl server serve) drives it."),
    workspace: Optional[Path] = workspace_option(),
    as_json: bool = _json_option("the final rollout status"),
) -> None:
    """Start a staged rollout and drive it until it completes, pauses, halts or is aborted.

    Bad plans, unpublished versions and empty waves are refused before any device is contacted.
    If stctl dies, `stctl rollout resume` continues without updating any device twice. With
    --detach the fleet server drives it instead (follow it with `stctl rollout status`).

    Example: stctl rollout start --model st-demo --version 2.0.0 --plan manifests/examples/canary-then-rest.toml
    """
    from stctl.rollout import start_rollout

    _report(start_rollout(open_workspace(workspace), model, version, plan, repository_url=repository_url,
                          allow_downgrade=allow_downgrade, detach=detach, say=_say(as_json)), as_json)


@rollout_app.command("status")
@handles_errors
def rollout_status_cmd(
    rollout_id: Optional[int] = typer.Argument(None, help="Rollout id (default: the newest)."),
    workspace: Optional[Path] = workspace_option(),
    as_json: bool = _json_option("the rollout, its waves and devices"),
) -> None:
    """Show a rollout: state, progress per wave, each device's state and gate figures, and which
    devices do not answer (since when, the last error, the time left before they are failed).

    Example: stctl rollout status --json
    """
    from stctl.rollout import rollout_status

    status = rollout_status(open_workspace(workspace), rollout_id)
    if as_json:
        print_json(status)
        return
    console.print(rollout_table(status))
    devices = Table("device", "wave", "state", "from", "tok/s", "peak RSS", "health", "failure / detail")
    for d in status["devices"]:
        devices.add_row(d["device"], str(d["wave"] + 1), d["state"], d["from_version"] or "-",
                        _num(d["decode_tokens_per_s"]), _mib(d["peak_rss_bytes"]), d["health"] or "-",
                        Text(_outage_text(d["unreachable"]), style="yellow") if d["unreachable"] else
                        Text(d["failure"] or d["detail"] or ""))
    console.print(devices)


@rollout_app.command("pause")
@handles_errors
def rollout_pause(
    rollout_id: Optional[int] = typer.Argument(None, help="Rollout id (default: the unfinished one)."),
    workspace: Optional[Path] = workspace_option(),
    as_json: bool = _json_option(),
) -> None:
    """Pause a running rollout: updates in flight finish, no new device starts.

    Example: stctl rollout pause
    """
    from stctl.rollout import pause_rollout

    result = pause_rollout(open_workspace(workspace), rollout_id)
    if as_json:
        print_json(result)
    else:
        console.print(f"rollout {result['id']}: " + ("paused" if result["state"] == "paused" else
                                                     "pause requested; its controller (stctl or the fleet server) "
                                                     "stops after the updates in flight"))


@rollout_app.command("resume")
@handles_errors
def rollout_resume(
    rollout_id: Optional[int] = typer.Argument(None, help="Rollout id (default: the unfinished one)."),
    detach: bool = typer.Option(False, "--detach", help="Only mark a paused rollout running and return; the "
                                                        "fleet server (stctl server serve) drives it."),
    workspace: Optional[Path] = workspace_option(),
    as_json: bool = _json_option("the final rollout status"),
) -> None:
    """Resume a paused rollout, or one whose stctl was killed (devices in flight are reconciled first).

    Example: stctl rollout resume
    """
    from stctl.rollout import resume_rollout

    _report(resume_rollout(open_workspace(workspace), rollout_id, say=_say(as_json), detach=detach), as_json)


@rollout_app.command("abort")
@handles_errors
def rollout_abort(
    rollout_id: Optional[int] = typer.Argument(None, help="Rollout id (default: the unfinished one)."),
    workspace: Optional[Path] = workspace_option(),
    as_json: bool = _json_option("the final rollout status"),
) -> None:
    """Abort a rollout and roll back every device it updated.

    Example: stctl rollout abort --json
    """
    from stctl.rollout import abort_rollout

    status = abort_rollout(open_workspace(workspace), rollout_id, say=_say(as_json))
    if as_json:
        print_json(status)
    else:
        console.print(rollout_table(status))


# ---- health ---------------------------------------------------------------------------------------
@handles_errors
def health(
    all_devices: bool = typer.Option(False, "--all", help="Every enrolled device (the default)."),
    device: list[str] = typer.Option([], "--device", "-d", help="Only this device (repeatable)."),
    workspace: Optional[Path] = workspace_option(),
    as_json: bool = _json_option("the results"),
) -> None:
    """Run the health check of the active release on devices; exits 1 if any fails or is unreachable.

    Example: stctl health --device line4-pc1 --json
    """
    from stctl.cli_common import fail
    from stctl.fleet_health import check_fleet

    if all_devices and device:
        fail("--all and --device exclude each other")
    results = check_fleet(open_workspace(workspace), device or None)
    if as_json:
        print_json(results)
    else:
        table = Table("device", "release", "health", "tok/s", "peak RSS", "detail", title="health checks")
        for r in results:
            verdict = "[green]passed[/]" if r["passed"] else ("[red]FAILED[/]" if r["reachable"] else "[red]unreachable[/]")
            table.add_row(r["device"], f"{r['model']}@{r['version']}" if r["version"] else "-", verdict,
                          _num(r["decode_tokens_per_s"]), _mib(r["peak_rss_bytes"]), Text(r["detail"] or ""))
        console.print(table)
    if not all(r["passed"] for r in results):
        raise typer.Exit(1)


# ---- telemetry ------------------------------------------------------------------------------------
@telemetry_app.command("pull")
@handles_errors
def telemetry_pull(
    device: list[str] = typer.Option([], "--device", "-d", help="Only this device (repeatable; default: all)."),
    workspace: Optional[Path] = workspace_option(),
    as_json: bool = _json_option("the rows pulled per device"),
) -> None:
    """Copy new telemetry rows from the devices into fleet.db (incremental; pulling twice adds nothing).

    Example: stctl telemetry pull --json
    """
    from stctl.telemetry_pull import pull_fleet

    results = pull_fleet(open_workspace(workspace), device or None)
    if as_json:
        print_json(results)
    else:
        table = Table("device", "generations", "updates", "health_checks", "error", title="rows pulled")
        for r in results:
            table.add_row(r["device"], str(r["generations"]), str(r["updates"]), str(r["health_checks"]),
                          Text(r["error"] or ""))
        console.print(table)
    if any(r["error"] for r in results):
        raise typer.Exit(1)


@telemetry_app.command("show")
@handles_errors
def telemetry_show(
    device: Optional[str] = typer.Option(None, "--device", "-d", help="Only this device."),
    workspace: Optional[Path] = workspace_option(),
    as_json: bool = _json_option("the summary"),
) -> None:
    """Per device and version: median decode tokens/s, p95 peak RSS, completions, failures (from fleet.db).

    Example: stctl telemetry show --device line4-pc1 --json
    """
    from stctl.telemetry_pull import show

    rows = show(open_workspace(workspace), device)
    if as_json:
        print_json(rows)
        return
    table = Table("device", "release", "completions", "median tok/s", "p95 peak RSS", "failures", title="telemetry")
    for r in rows:
        table.add_row(r["device"], f"{r['model']}@{r['version']}", str(r["completions"]),
                      _num(r["median_decode_tokens_per_s"]), _mib(r["p95_peak_rss_bytes"]), str(r["failures"]))
    console.print(table)


def register(app: typer.Typer) -> None:
    app.add_typer(rollout_app, name="rollout")
    app.add_typer(telemetry_app, name="telemetry")
    app.command("health")(health)
