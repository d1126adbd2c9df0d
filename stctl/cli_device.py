"""`stctl device enroll`: enrollment files and the device registry (library: stctl.enroll;
`device list` is registered by stctl.cli_fleet)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from stctl.cli_common import console, escape, handles_errors, print_json
from stctl.enroll import ENV_REPOSITORY_URL
from stctl.workspace import ENV_WORKSPACE, open_workspace

device_app = typer.Typer(help="Enroll devices and list the fleet's devices.\n\n"
                               "Example: stctl device enroll line4-pc1 --url https://10.0.4.17:8443 -o line4-pc1.enroll",
                         no_args_is_help=True)


def _workspace_option() -> Optional[Path]:
    return typer.Option(None, "--workspace", "-w", envvar=ENV_WORKSPACE,
                        help="Fleet workspace directory (default: the current directory).")


@device_app.command("enroll")
@handles_errors
def enroll(
    name: str = typer.Argument(..., help="Device name (a-z, 0-9, '.', '_', '-')."),
    url: str = typer.Option(..., "--url", help="https://HOST:PORT where the device serves its API."),
    out: Path = typer.Option(..., "--out", "-o", help="Enrollment file to write (must not exist; holds a private key)."),
    tag: list[str] = typer.Option([], "--tag", help="KEY=VALUE label, repeatable (e.g. line=4)."),
    repository_url: Optional[str] = typer.Option(None, "--repository-url", envvar=ENV_REPOSITORY_URL,
                                                 help="Where devices fetch releases (the served repository folder)."),
    workspace: Optional[Path] = _workspace_option(),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Issue a device certificate, write its enrollment file and register the device in fleet.db.

    Example: stctl device enroll line4-pc1 --url https://10.0.4.17:8443 --tag line=4 --repository-url http://10.0.0.2:8080 -o line4-pc1.enroll
    """
    from stctl.enroll import enroll_device

    result = enroll_device(open_workspace(workspace), name, url, out, repository_url, tag)
    if as_json:
        print_json(result)
    else:
        console.print(f"enrolled [bold]{escape(name)}[/]; copy {escape(str(out))} to the device and run "
                      f"`st-agent init --enroll {escape(out.name)} --data-dir DIR`")
