"""The ``whatmatters`` command (``commands.py``) and its demo (``demo.py``)."""

from whatmatters.cli.commands import app, parse_params

__all__ = ["app", "parse_params"]
