"""`stctl device enroll` (library: stctl.enroll) and `stctl device app-key create|list|revoke`
(library: stctl.app_keys); `device list` is registered by stctl.cli_fleet.

Rule: text that comes from a device or an error (key names, messages) is printed as text
(`rich.text.Text`, `markup=False`), never as Rich markup; a new application key goes to stdout
alone (so a script can capture it), what it means to stderr."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table
from rich.text import Text

from stctl.cli_common import console, err_console, escape, handles_errors, print_json, workspace_option
from stctl.enroll import ENV_REPOSITORY_URL, ENV_SERVER_URL
from stctl.workspace import open_workspace

device_app = typer.Typer(help="Enroll devices and list the fleet's devices.\n\n"
                               "Example: stctl device enroll line4-pc1 --url https://10.0.4.17:8443 -o line4-pc1.enroll",
                         no_args_is_help=True)
app_key_app = typer.Typer(help="Application keys: what shop-floor applications send a device with their completions "
                               "(Authorization: Bearer stk_...).\n\n"
                               "Example: stctl device app-key create line4-pc1 line4-hmi",
                          no_args_is_help=True)
device_app.add_typer(app_key_app, name="app-key")


@device_app.command("enroll")
@handles_errors
def enroll(
    name: str = typer.Argument(..., help="Device name (a-z, 0-9, '.', '_', '-')."),
    url: str = typer.Option(..., "--url", help="https://HOST:PORT where the device serves its API."),
    out: Path = typer.Option(..., "--out", "-o", help="Enrollment file to write (must not exist; holds a private key)."),
    tag: list[str] = typer.Option([], "--tag", help="KEY=VALUE label, repeatable (e.g. line=4)."),
    repository_url: Optional[str] = typer.Option(None, "--repository-url", envvar=ENV_REPOSITORY_URL,
                                                 help="Where devices fetch releases (the served repository folder)."),
    server_url: Optional[str] = typer.Option(None, "--server-url", envvar=ENV_SERVER_URL,
                                             help="The fleet server the device calls home to (https://HOST:PORT; "
                                                  "`stctl server serve`); omitted: push only."),
    workspace: Optional[Path] = workspace_option(),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Issue a device certificate, write its enrollment file and register the device in fleet.db.

    Example: stctl device enroll line4-pc1 --url https://10.0.4.17:8443 --tag line=4 --repository-url http://10.0.0.2:8080 -o line4-pc1.enroll
    """
    from stctl.enroll import enroll_device

    result = enroll_device(open_workspace(workspace), name, url, out, repository_url, tag, server_url)
    if as_json:
        print_json(result)
    else:
        console.print(f"enrolled [bold]{escape(name)}[/]; copy {escape(str(out))} to the device and run "
                      f"`st-agent init --enroll {escape(out.name)} --data-dir DIR`")


# ---- app-key ---------------------------------------------------------------------------------------
def _devices_argument() -> Optional[list[str]]:
    return typer.Argument(None, metavar="DEVICE", show_default=False,
                          help="Enrolled device(s); may be omitted when --tag selects them.")


def _tag_option() -> list[str]:
    return typer.Option([], "--tag", help="Also every device whose tags hold this KEY=VALUE (repeatable: all of them).")


def _key_name_argument() -> str:
    return typer.Argument(..., metavar="NAME", help="Key name, shown in telemetry (a-z, 0-9, '.', '_', '-').")


@app_key_app.command("create")
@handles_errors
def app_key_create(
    devices: Optional[list[str]] = _devices_argument(),
    name: str = _key_name_argument(),
    tag: list[str] = _tag_option(),
    workspace: Optional[Path] = workspace_option(),
    as_json: bool = typer.Option(False, "--json", help="Print the result (the key included) as JSON."),
) -> None:
    """Make an application key, put it on the device(s) and print it, once: only its sha256 is kept.

    The key is printed alone on stdout; the same key is put on every device named or selected.

    Example: stctl device app-key create line4-pc1 line4-hmi

    Example: stctl device app-key create --tag line=4 mes-client --json
    """
    from stctl.app_keys import create_app_key

    result = create_app_key(open_workspace(workspace), name, devices or [], tag)
    if as_json:
        print_json(result)
    else:
        typer.echo(result["key"])
    err_console.print(Text(f"application key {result['name']!r} on {', '.join(result['devices'])}: copy it now, "
                           "it cannot be shown again (only its sha256 is stored)"), soft_wrap=True, highlight=False)


@app_key_app.command("list")
@handles_errors
def app_key_list(
    device: str = typer.Argument(..., help="Enrolled device."),
    workspace: Optional[Path] = workspace_option(),
    as_json: bool = typer.Option(False, "--json", help="Print the keys as JSON."),
) -> None:
    """List the keys the device accepts beside what fleet.db recorded; flags keys found on one side only.

    Example: stctl device app-key list line4-pc1 --json
    """
    from stctl.app_keys import DEVICE_ONLY, RECORDED_ONLY, list_app_keys

    result = list_app_keys(open_workspace(workspace), device)
    if as_json:
        print_json(result)
        return
    flags = {DEVICE_ONLY: Text("on the device, not in fleet.db", style="yellow"),
             RECORDED_ONLY: Text("in fleet.db, gone from the device", style="yellow")}
    table = Table("name", "on device since", "recorded", "digest", "differs",
                  title=Text(f"application keys of {device}"))
    for k in result["keys"]:
        table.add_row(Text(k["name"]), k["device_created"] or "-", k["recorded_created"] or "-",
                      Text(k["digest_prefix"] or "-"), flags.get(k["status"], Text("")))
    console.print(table)
    console.print(Text("completions need a key on this device" if result["required"] else
                       "keys are optional on this device (app_keys_required: false): keyless clients share one turn"))


@app_key_app.command("revoke")
@handles_errors
def app_key_revoke(
    devices: Optional[list[str]] = _devices_argument(),
    name: str = _key_name_argument(),
    tag: list[str] = _tag_option(),
    workspace: Optional[Path] = workspace_option(),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Revoke an application key: the device refuses it from its next request on; fleet.db records when.

    Example: stctl device app-key revoke line4-pc1 line4-hmi
    """
    from stctl.app_keys import revoke_app_key

    result = revoke_app_key(open_workspace(workspace), name, devices or [], tag)
    if as_json:
        print_json(result)
    else:
        console.print(Text(f"revoked application key {result['name']!r} on {', '.join(result['devices'])}"))
