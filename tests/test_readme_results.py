"""The README's benchmark tables are the ones benchmarks/results.json gives (one run_all run)."""

from __future__ import annotations

import copy
import json

from helpers import benchmark_script

TABLES = benchmark_script("readme_tables")


def test_readme_tables_are_results_json():
    results = json.loads(TABLES.RESULTS.read_text())
    found = TABLES.blocks(TABLES.README.read_text())
    assert set(results["anchors"]) <= set(found), "an anchor of results.json has no README table"
    for name, content in found.items():
        assert content == TABLES.render(name, results), (
            f"README table {name!r} is not results.json's: run python -m benchmarks.readme_tables"
        )


def test_a_changed_figure_is_seen():
    results = json.loads(TABLES.RESULTS.read_text())
    name = next(n for n, a in results["anchors"].items() if "rows" in a)
    changed = copy.deepcopy(results)
    changed["anchors"][name]["rows"][0]["high"] += 1.0
    text = TABLES.README.read_text()
    assert TABLES.updated(text, results) == text
    assert TABLES.updated(text, changed) != text
