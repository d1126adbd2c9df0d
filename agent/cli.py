"""`st-agent`: the device's command line. Each command is a thin call into the agent library.

Rule: the agent's, the update channel's, the model's and the formats' errors become one line of
text on stderr and exit code 1, never a traceback (`common.cli`, shared with stctl);
commands that report figures take `--json`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from agent.config import DEFAULT_LISTEN, ENV_DATA_DIR, load_config, resolve_data_dir
from agent.errors import AgentError
from common.cli import command_line, handles_errors as _handles, print_json
from manifests import ManifestError
from model.errors import ModelError

app = command_line("st-agent", "The SmallThinker Fleet device agent: verified updates, health checks, telemetry, "
                   "completions.\n\nExample: st-agent serve --data-dir /var/lib/st-agent --listen 0.0.0.0:8443")
bundle_app = typer.Typer(help="Offline bundles for air-gapped sites.\n\n"
                              "Example: st-agent bundle install st-demo-2.0.0.bundle --data-dir /var/lib/st-agent",
                         no_args_is_help=True)
app.add_typer(bundle_app, name="bundle")

HANDLED = (AgentError, ModelError, ManifestError)
handles_errors = _handles(*HANDLED)


def _data_dir_option() -> Optional[Path]:
    return typer.Option(None, "--data-dir", "-d", envvar=ENV_DATA_DIR, help="The agent's data directory.")


def _open(data_dir: Optional[Path]):
    from agent.telemetry import Telemetry
    from agent.updater import Updater

    config = load_config(resolve_data_dir(data_dir))
    return Updater(config, Telemetry(config.telemetry_db, config.limits.telemetry_max_rows))


@app.command("init")
@handles_errors
def init(
    enroll: Path = typer.Option(..., "--enroll", help="Enrollment file from `stctl device enroll`."),
    data_dir: Optional[Path] = _data_dir_option(),
    call_home_server: Optional[str] = typer.Option(
        None, "--call-home-server", metavar="URL",
        help="Call home to this fleet server (`stctl server serve`, https://HOST:PORT): the device polls it for "
             "its assignment and reports status and telemetry. Default: the enrollment file's server, if it "
             "names one (`stctl device enroll --server-url`); without either the device is push-only."),
    call_home_poll_s: float = typer.Option(60.0, "--call-home-poll-s", min=0.1, max=86400.0, help="Seconds between polls until the "
                                           "server sets the interval; also the first backoff delay."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Set up a data directory from an enrollment file (TLS identity, TUF root, repository URL).

    Example: st-agent init --enroll line4-pc1.enroll --data-dir /var/lib/st-agent

    Example (a device that calls home): st-agent init --enroll line4-pc1.enroll --data-dir /var/lib/st-agent
    --call-home-server https://fleet.example:8444
    """
    from dataclasses import replace

    from agent.config import CallHomeConfig
    from agent.enrollment import init_data_dir

    call_home = None if call_home_server is None else CallHomeConfig.from_dict(
        {"server_url": call_home_server, "poll_s": call_home_poll_s})  # checked before anything is written
    config = init_data_dir(enroll, resolve_data_dir(data_dir))
    if call_home is None and config.call_home is not None:  # the enrollment named the server
        call_home = CallHomeConfig.from_dict({"server_url": config.call_home.server_url, "poll_s": call_home_poll_s})
    if call_home is not None:
        config = replace(config, call_home=call_home)
        config.save()
    result = {"data_dir": str(config.data_dir), "name": config.name, "url": config.url,
              "repository_url": config.repository_url, "tags": config.tags,
              "call_home": config.call_home and config.call_home.server_url}
    if as_json:
        print_json(result)
    else:
        typer.echo(f"device {config.name} set up in {config.data_dir}; start it with "
                   f"`st-agent serve --data-dir {config.data_dir}`")


@app.command("serve")
@handles_errors
def serve(
    data_dir: Optional[Path] = _data_dir_option(),
    listen: str = typer.Option(DEFAULT_LISTEN, "--listen", help="HOST:PORT to serve the HTTPS API on."),
) -> None:
    """Run the daemon: the device API over mTLS, updates, health checks, completions.

    Example: st-agent serve --data-dir /var/lib/st-agent --listen 0.0.0.0:8443
    """
    from agent.config import parse_listen
    from agent.server import serve as run_server

    parse_listen(listen)
    run_server(load_config(resolve_data_dir(data_dir)), listen)


@app.command("status")
@handles_errors
def status(
    data_dir: Optional[Path] = _data_dir_option(),
    as_json: bool = typer.Option(False, "--json", help="Print the status as JSON."),
) -> None:
    """Show the active and previous release and the update in progress (read from the data dir).

    Example: st-agent status --data-dir /var/lib/st-agent --json
    """
    result = _open(data_dir).status()
    if as_json:
        print_json(result)
        return
    fmt = lambda r: f"{r['model']}@{r['version']}" if r else "none"  # noqa: E731
    typer.echo(f"device {result['device']}: active {fmt(result['active'])}"
               f"{' (on probation)' if result['probation'] else ''}, previous {fmt(result['previous'])}")
    if result["update"]:
        u = result["update"]
        typer.echo(f"update {u['id']}: {u['model']}@{u['version']} {u['state']}")


@app.command("health")
@handles_errors
def health(
    data_dir: Optional[Path] = _data_dir_option(),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Offline health check of the active release: re-hash every shard, golden outputs, held-out loss, tokens/s, RSS.

    Writes a health_checks row; exits 1 when the check fails.

    Example: st-agent health --data-dir /var/lib/st-agent --json
    """
    result, rolled_back = _open(data_dir).check_active()
    report = {**result.to_dict(), "rolled_back": rolled_back}
    if as_json:
        print_json(report)
    else:
        loss = "" if result.heldout_loss is None else f"held-out loss {result.heldout_loss:.4f}, "
        typer.echo(f"{result.model}@{result.version}: {'passed' if result.passed else 'FAILED'} ({result.detail}); "
                   f"{loss}{result.decode_tokens_per_s:.1f} tok/s, peak RSS {result.peak_rss_bytes} bytes"
                   f"{'; rolled back' if rolled_back else ''}")
    if not result.passed:
        raise typer.Exit(1)


@bundle_app.command("install")
@handles_errors
def bundle_install(
    bundle: Path = typer.Argument(..., help="Bundle file from `stctl bundle export`."),
    data_dir: Optional[Path] = _data_dir_option(),
    allow_downgrade: bool = typer.Option(False, "--allow-downgrade", help="Install even if older than the active release."),
    as_json: bool = typer.Option(False, "--json", help="Print the finished update job as JSON."),
) -> None:
    """Install an offline bundle: verify, stage, health-check, activate (a running daemon follows).

    Example: st-agent bundle install st-demo-2.0.0.bundle --data-dir /var/lib/st-agent
    """
    from agent.updater import job_view

    updater = _open(data_dir)
    job = updater.run(updater.request(None, None, allow_downgrade=allow_downgrade, bundle=bundle))
    if as_json:
        print_json(job_view(job))
    else:
        typer.echo(f"{job.model or 'bundle'}@{job.version or '?'}: {job.state}{f' ({job.detail})' if job.detail else ''}")
    if job.state != "active":
        raise typer.Exit(1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
