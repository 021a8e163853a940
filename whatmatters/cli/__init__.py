"""The ``whatmatters`` command (``commands.py``, ``tune.py``) and its demo (``demo.py``)."""

from whatmatters.cli import tune as _tune  # noqa: F401  (registers `whatmatters tune` on the app)
from whatmatters.cli.commands import app, parse_params

__all__ = ["app", "parse_params"]
