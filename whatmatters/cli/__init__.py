"""The ``whatmatters`` command (``commands.py``), its demo (``demo.py``), ``curate`` and ``tune`` commands."""

from whatmatters.cli import tune as _tune  # noqa: F401  (registers `whatmatters tune` on the app)
from whatmatters.cli.commands import app, parse_params
from whatmatters.cli.curate import curate_app

app.add_typer(curate_app, name="curate")

__all__ = ["app", "parse_params"]
