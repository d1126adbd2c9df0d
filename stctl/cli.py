"""`stctl`: the operator's command line. One Typer sub-app per noun; each command is a thin
call into the stctl or model library (see stctl/cli_*.py)."""
from __future__ import annotations

import typer

from common.cli import command_line
from stctl.cli_common import console, handles_errors, print_json
from stctl.cli_model import app as model_app

app = command_line("stctl", "Build, sign and publish SmallThinker models, and roll them out to a fleet of factory "
                   "PCs.\n\nExample: stctl model build --demo --out demo-v1")
app.add_typer(model_app, name="model")


@app.command("demo")
@handles_errors
def demo(
    tokens: int = typer.Option(40, "--tokens", help="Tokens to generate per completion."),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON."),
) -> None:
    """Run the main job on the built-in demo model, end to end, in a temporary directory.

    Example: stctl demo --json
    """
    from stctl.demo import run_demo

    say = (lambda _msg: None) if as_json else (lambda msg: console.print(msg, markup=False))  # generated text, paths
    result = run_demo(tokens=tokens, say=say)
    if as_json:
        print_json(result)

# Sub-apps and commands of other nouns register below (one module each).
from stctl import cli_release  # noqa: E402  (also registers `model publish` and `model diff`)

app.command("init")(cli_release.init)
app.add_typer(cli_release.repo_app, name="repo")
app.add_typer(cli_release.keys_app, name="keys")
app.add_typer(cli_release.bundle_app, name="bundle")

from stctl.cli_device import device_app  # noqa: E402

app.add_typer(device_app, name="device")

from stctl.cli_pki import pki_app  # noqa: E402

app.add_typer(pki_app, name="pki")

from stctl.cli_server import server_app  # noqa: E402

app.add_typer(server_app, name="server")

# Fleet commands: `device list`, `rollout ...`, `health`, `telemetry ...` (stctl/cli_fleet.py).
from stctl import cli_fleet  # noqa: E402

cli_fleet.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
