"""Deprecated: the demo moved to ``whatmatters.cli.demo``."""

from whatmatters.core.moved import moved

moved("whatmatters.demo", "whatmatters.cli.demo")
