"""The ``whatmatters`` command (``commands.py``), its demo (``demo.py``), ``curate``, ``tune`` and
``compress`` commands."""

from whatmatters.cli import tune as _tune  # noqa: F401  (registers `whatmatters tune` on the app)
from whatmatters.cli.commands import app, parse_params
from whatmatters.cli.compress import compress_app
from whatmatters.cli.curate import curate_app

app.add_typer(curate_app, name="curate")
app.add_typer(compress_app, name="compress")

__all__ = ["app", "parse_params"]
