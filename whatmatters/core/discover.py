"""Import every module of a package so that their ``@scorer`` registrations run."""

from __future__ import annotations

import importlib
import pkgutil


def import_submodules(package_name: str) -> None:
    package = importlib.import_module(package_name)
    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package_name}.{info.name}")
