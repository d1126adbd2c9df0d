"""`stctl`: the operator's command line. One Typer sub-app per noun; each command is a thin
call into the stctl or model library (see stctl/cli_*.py)."""
from __future__ import annotations

import typer

from stctl.cli_model import app as model_app

app = typer.Typer(
    name="stctl",
    help="Build, sign and publish SmallThinker models, and roll them out to a fleet of factory PCs.",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(model_app, name="model")

# Sub-apps and commands of other nouns register below (one module each).


def main() -> None:
    app()


if __name__ == "__main__":
    main()
