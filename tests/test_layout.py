"""The package's rooms by dependency: no import cycle, and core imports nothing above it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "whatmatters"
ABOVE_CORE = (
    "explain",
    "compress",
    "tune",
    "curate",
    "evaluate",
    "lrp",
    "vision",
    "cli",
    "demo",
    "select",
    "models",
    "text",
)


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


FILES = {_module(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path, *, top_level: bool) -> set[str]:
    """Modules of whatmatters that ``path`` imports (at import time only when ``top_level``).

    ``from package import submodule`` depends on the submodule, not on the package's ``__init__``.
    """
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("whatmatters"):
            subs = {f"{node.module}.{a.name}" for a in node.names} & set(FILES)
            found.update(subs)
            if len(subs) < len(node.names):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("whatmatters"))
    return found


def _graph() -> dict[str, set[str]]:
    return {m: {i for i in _imports(p, top_level=True) if i in FILES and i != m} for m, p in FILES.items()}


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for dep in sorted(graph[m]):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path[path.index(dep) :], dep]))
            if dep not in state:
                visit(dep, [*path, dep])
        state[m] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_core_imports_nothing_above_it():
    bad = {}
    for path in (PACKAGE / "core").glob("*.py"):
        above = sorted(
            i for i in _imports(path, top_level=False) if i.split(".")[1:2] and i.split(".")[1] in ABOVE_CORE
        )
        if above:
            bad[path.name] = above
    assert not bad, f"core imports modules above it: {bad}"


def test_the_checks_can_fail(tmp_path):
    cyclic = tmp_path / "a.py"
    cyclic.write_text(
        "from whatmatters.explain import api, explain\nimport whatmatters.compress\n\n"
        "def f():\n    import whatmatters.tune\n"
    )
    assert _imports(cyclic, top_level=True) == {
        "whatmatters.explain",
        "whatmatters.explain.api",
        "whatmatters.compress",
    }
    assert "whatmatters.tune" in _imports(cyclic, top_level=False)


MOVED = [
    ("whatmatters.lrp", "whatmatters.explain._lrp", "token_relevance"),
    ("whatmatters.lrp.lm", "whatmatters.explain._lrp.lm", "lm_lrp"),
    ("whatmatters.lrp.rules", "whatmatters.explain._lrp.rules", "RULES"),
    ("whatmatters.select", "whatmatters.explain.select", "select_features"),
    ("whatmatters.demo", "whatmatters.cli.demo", "run_demo"),
    ("whatmatters.models", "whatmatters.text.pretrained", "load_smollm2"),
]


@pytest.mark.parametrize(("old", "new", "name"), MOVED)
def test_old_import_paths_work_with_a_deprecation_warning(old, new, name, monkeypatch):
    import importlib
    import sys

    for key in [k for k in sys.modules if k == old or k.startswith(old + ".") or k == old.rsplit(".", 1)[0]]:
        if key.startswith(("whatmatters.lrp", "whatmatters.select", "whatmatters.demo", "whatmatters.models")):
            monkeypatch.delitem(sys.modules, key)
    with pytest.warns(DeprecationWarning, match=r"moved to whatmatters\.(explain|cli|text)"):
        module = importlib.import_module(old)
    assert getattr(module, name) is getattr(importlib.import_module(new), name)


def test_new_paths_import_without_warnings():
    import subprocess
    import sys

    code = (
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    warnings.simplefilter('always')\n"
        "    import whatmatters as wm; wm.methods(); wm.metrics()\n"
        "    import whatmatters.cli, whatmatters.explain.lrp, whatmatters.explain.select, whatmatters.text.pretrained\n"
        "    wm.layer_relevance, wm.select_features\n"
        "moved = [str(w.message) for w in seen if 'moved to' in str(w.message)]\n"
        "assert not moved, moved\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_no_package_imports_another_packages_private_names():
    """What two packages share is public (inside core when it is shared widely); tests may reach in."""
    bad = []
    for module, path in FILES.items():
        package = module.split(".")[1] if module.count(".") else ""
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("whatmatters.")):
                continue
            other = node.module.split(".")[1]
            private = [a.name for a in node.names if a.name.startswith("_") and a.name != "__version__"]
            hidden = any(part.startswith("_") for part in node.module.split(".")[2:])
            if other != package and (private or hidden) and not module.startswith(("whatmatters.lrp", "whatmatters._")):
                bad.append(f"{module}: from {node.module} import {', '.join(a.name for a in node.names)}")
    assert not bad, "\n".join(bad)
