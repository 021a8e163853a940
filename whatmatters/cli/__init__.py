"""The ``whatmatters`` command (``commands.py``), its demo (``demo.py``) and its command groups (``curate.py``)."""

from whatmatters.cli.commands import app, parse_params
from whatmatters.cli.curate import curate_app

app.add_typer(curate_app, name="curate")

__all__ = ["app", "parse_params"]
