"""`stctl init`, `model publish|diff`, `repo serve|refresh`, `keys rotate`, `bundle export`:
signed, delta-updated releases (library: stctl.bootstrap, repository, delta, serve, bundle)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from stctl.cli_common import console, escape, handles_errors, print_json, progress_bar, workspace_option
from stctl.cli_model import app as model_app
from stctl.workspace import open_workspace

repo_app = typer.Typer(help="Serve and maintain the signed TUF repository.\n\n"
                       "Example: stctl repo serve --port 8080", no_args_is_help=True)
keys_app = typer.Typer(help="Manage the repository's signing keys.\n\nExample: stctl keys rotate targets",
                       no_args_is_help=True)
bundle_app = typer.Typer(help="Offline bundles for air-gapped sites.\n\n"
                         "Example: stctl bundle export --model st-demo --version 2.0.0 --from-version 1.0.0 -o v2.bundle",
                         no_args_is_help=True)


@handles_errors
def init(
    directory: Path = typer.Argument(..., help="Directory to make a fleet workspace (created if missing)."),
    fleet_name: Optional[str] = typer.Option(None, "--fleet-name",
                                             help="Name in the fleet CA (default: the directory name)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Create a fleet workspace: TUF keys and repository, fleet CA and operator certificate, fleet.db.

    Keys are encrypted when $STCTL_KEY_PASSPHRASE is set. Refuses to touch an existing workspace.

    Example: stctl init ./fleet
    """
    from stctl.bootstrap import init_workspace

    ws = init_workspace(directory, fleet_name=fleet_name)
    result = {"workspace": str(ws.root), "root_json": str(ws.metadata_dir / "1.root.json"),
              "ca": str(ws.pki_dir / "ca.crt"), "keys_encrypted": ws.config.keys_encrypted}
    if as_json:
        print_json(result)
    else:
        console.print(f"fleet workspace ready at [bold]{escape(str(ws.root))}[/]; "
                      f"devices trust {escape(result['root_json'])}")


@model_app.command("publish")
@handles_errors
def publish(
    package: Path = typer.Argument(..., help="Model package directory (from `stctl model build`)."),
    workspace: Optional[Path] = workspace_option(),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Sign a model package into the repository as a new release (shards content-addressed).

    Example: stctl model publish demo-v1 --workspace ./fleet
    """
    from stctl.repository import Repository

    repo = Repository(open_workspace(workspace))
    with progress_bar("publishing", enabled=not as_json) as update:
        result = repo.publish(package, progress=update)
    if as_json:
        print_json(result.to_dict())
    else:
        console.print(f"published [bold]{result.model}@{result.version}[/]: {result.shards} shards, "
                      f"{result.bytes_new} new bytes of {result.bytes_full} (targets v{result.targets_version})")


@model_app.command("diff")
@handles_errors
def diff(
    old: str = typer.Argument(..., help="Package directory or NAME@VERSION published in the workspace."),
    new: str = typer.Argument(..., help="Package directory or NAME@VERSION published in the workspace."),
    workspace: Optional[Path] = workspace_option(),
    as_json: bool = typer.Option(False, "--json", help="Print changed_shards, bytes_to_ship, bytes_full as JSON."),
) -> None:
    """Show what a device holding OLD downloads to get NEW.

    Example: stctl model diff st-demo@1.0.0 st-demo@2.0.0 --json
    """
    from stctl.delta import diff_manifests, load_manifest

    report = diff_manifests(load_manifest(old, workspace), load_manifest(new, workspace))
    if as_json:
        print_json(report.to_dict())
        return
    for name in report.changed_shards:
        console.print(f"  changed  {name}", highlight=False, markup=False)
    share = report.bytes_to_ship / report.bytes_full if report.bytes_full else 0.0
    console.print(f"{report.old} -> {report.new}: {len(report.changed_shards)} changed shards, "
                  f"{report.bytes_to_ship} of {report.bytes_full} bytes to ship ({share:.1%})", markup=False)


@repo_app.command("serve")
@handles_errors
def serve(
    workspace: Optional[Path] = workspace_option(),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8080, "--port", help="Port to listen on (0: any free port)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log every request."),
) -> None:
    """Serve the repository folder over HTTP, with Range support for resumed downloads.

    Example: stctl repo serve --workspace ./fleet --host 0.0.0.0 --port 8080
    """
    from stctl.serve import make_server

    server = make_server(open_workspace(workspace).repository, host, port, quiet=not verbose)
    bound_host, bound_port = server.server_address[:2]
    console.print(f"serving the repository at http://{bound_host}:{bound_port}/ (Ctrl-C stops)", markup=False)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


@repo_app.command("refresh")
@handles_errors
def refresh(
    workspace: Optional[Path] = workspace_option(),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Re-sign the timestamp (and snapshot/targets when half their validity is gone); run it from cron.

    Example: stctl repo refresh --workspace ./fleet
    """
    from stctl.repository import Repository

    result = Repository(open_workspace(workspace)).refresh()
    if as_json:
        print_json(result)
    else:
        console.print(f"re-signed {', '.join(result['resigned'])}; timestamp valid until {result['timestamp_expires']}",
                      markup=False)


@keys_app.command("rotate")
@handles_errors
def rotate(
    role: str = typer.Argument(..., help="Role whose key to replace: root, targets, snapshot or timestamp."),
    workspace: Optional[Path] = workspace_option(),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Replace a role's signing key through a new root version; the old key's signatures are rejected.

    Example: stctl keys rotate timestamp --workspace ./fleet
    """
    from stctl.repository import Repository

    result = Repository(open_workspace(workspace)).rotate(role)
    if as_json:
        print_json(result)
    else:
        console.print(f"rotated the {role} key: root v{result['root_version']} trusts {result['new_keyid'][:16]}",
                      markup=False)


@bundle_app.command("export")
@handles_errors
def export(
    model: str = typer.Option(..., "--model", help="Model name."),
    version: str = typer.Option(..., "--version", help="Release version to ship."),
    from_version: Optional[str] = typer.Option(None, "--from-version",
                                               help="Version the site already has: ship only new blobs."),
    out: Path = typer.Option(..., "--out", "-o", help="Bundle file to write (must not exist)."),
    workspace: Optional[Path] = workspace_option(),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Write an offline bundle (signed metadata + needed targets) for an air-gapped site.

    Example: stctl bundle export --model st-demo --version 2.0.0 --from-version 1.0.0 -o st-demo-2.0.0.bundle
    """
    from stctl.bundle import export_bundle

    with progress_bar("bundling", enabled=not as_json) as update:
        result = export_bundle(open_workspace(workspace), model, version, out, from_version, progress=update)
    if as_json:
        print_json(result)
    else:
        console.print(f"wrote {out}: {result['blobs']} blobs, {result['bundle_bytes']} bytes, "
                      f"valid until {result['expires']}", markup=False)
