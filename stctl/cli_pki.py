"""`stctl pki revoke device NAME|operator`, `stctl pki renew-operator`: the fleet CA's certificates
(library: stctl.revocation)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from stctl.cli_common import console, handles_errors, print_json, workspace_option
from stctl.pki import MAX_OPERATOR_DAYS, OPERATOR_VALIDITY
from stctl.workspace import open_workspace

pki_app = typer.Typer(help="The fleet CA: revoke device and operator certificates, renew the operator's.\n\n"
                      "Example: stctl pki revoke device line4-pc1", no_args_is_help=True)
revoke_app = typer.Typer(help="Revoke a certificate: publish a CRL (signed by the fleet CA, a TUF target) that "
                         "devices fetch with their updates and enforce on every TLS handshake.\n\n"
                         "Example: stctl pki revoke operator", no_args_is_help=True)
pki_app.add_typer(revoke_app, name="revoke")

_PICKED_UP = ("each device refuses what it revokes once it has the new CRL: with its next update, or within its "
              "CRL refresh interval (15 minutes by default)")


@revoke_app.command("device")
@handles_errors
def revoke_device(
    name: str = typer.Argument(..., help="Name of the enrolled device whose certificate is revoked."),
    workspace: Optional[Path] = workspace_option(),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Revoke a device's certificate (stolen or retired device); the name may then be enrolled again.

    Example: stctl pki revoke device line4-pc1 --workspace ./fleet
    """
    from stctl.revocation import revoke_device as revoke

    result = revoke(open_workspace(workspace), name)
    if as_json:
        print_json(result)
    else:
        console.print(f"revoked device {name} (certificate serial {', '.join(result['revoked_serials'])}); "
                      f"CRL {result['crl_number']} published (targets v{result['targets_version']}); {_PICKED_UP}",
                      markup=False, highlight=False)


@revoke_app.command("operator")
@handles_errors
def revoke_operator(
    workspace: Optional[Path] = workspace_option(),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Revoke every operator certificate not yet expired (a leaked operator key) and write a new one.

    The new certificate and key replace pki/operator.crt and pki/operator.key; copy them to every
    machine that manages devices. Example: stctl pki revoke operator --workspace ./fleet
    """
    from stctl.revocation import revoke_operator as revoke

    result = revoke(open_workspace(workspace))
    if as_json:
        print_json(result)
    else:
        console.print(f"revoked {len(result['revoked_serials'])} operator certificate(s); CRL {result['crl_number']} "
                      f"published (targets v{result['targets_version']}); {_PICKED_UP}.\n"
                      f"A new operator certificate is in {result['operator_cert']} (valid until "
                      f"{result['operator_not_after']}); it works on every device now",
                      markup=False, highlight=False)


@pki_app.command("renew-operator")
@handles_errors
def renew_operator(
    days: int = typer.Option(OPERATOR_VALIDITY.days, "--days",
                             help=f"How long the new operator certificate is valid (1 to {MAX_OPERATOR_DAYS} days)."),
    workspace: Optional[Path] = workspace_option(),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Write a fresh operator certificate and key (the one replaced stays valid until it expires).

    Example: stctl pki renew-operator --days 90 --workspace ./fleet
    """
    from stctl.revocation import renew_operator as renew

    result = renew(open_workspace(workspace), days)
    if as_json:
        print_json(result)
    else:
        console.print(f"new operator certificate in {result['operator_cert']}, valid until "
                      f"{result['operator_not_after']}; the one it replaces stays valid until "
                      f"{result['replaced_not_after']} (revoke it with `stctl pki revoke operator`)",
                      markup=False, highlight=False)
