"""The README's benchmark tables, generated from ``benchmarks/results.json`` (written by ``run_all``).

    python -m benchmarks.readme_tables [--check]

Each table sits between ``<!-- results:NAME -->`` and ``<!-- /results -->`` in README.md (NAME: an anchor
of ``results.json``); this rewrites what is between them. ``--check`` exits 1 if the README is out of date.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RESULTS = ROOT / "benchmarks" / "results.json"
BLOCK = re.compile(r"(<!-- results:(\w+) -->\n)(.*?)(<!-- /results -->)", re.DOTALL)


def _spread(value: float, low: float, high: float) -> str:
    """A median with its rounds' range."""
    return f"{value:.2f} ({low:.2f} to {high:.2f})"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _kv_table(rows: list[dict[str, Any]]) -> list[str]:
    """Added ms per decoded token and at the prefill, ours and (where it ran) kvpress's."""

    def added(row: dict[str, Any], key: str) -> str:
        return _spread(row[key], row[key + "_low"], row[key + "_high"]) if key in row else "-"

    header = ["case", "full cache ms/token", "added ms/token: ours", "kvpress", "full prefill ms",
              "added prefill ms: ours", "kvpress"]  # fmt: skip
    body = [
        [r["case"], f"{r['full_cache_ms_per_token']:.2f}", added(r, "added_ms_per_token"),
         added(r, "kvpress_added_ms_per_token"), f"{r['full_cache_prefill_ms']:.1f}", f"{r['added_prefill_ms']:.1f}",
         f"{r['kvpress_added_prefill_ms']:.1f}" if "kvpress_added_prefill_ms" in r else "-"]
        for r in rows
    ]  # fmt: skip
    return _table(header, body)


def render(name: str, results: dict[str, Any]) -> str:
    """The markdown of one anchor's table (ending in a newline)."""
    anchor = results["anchors"].get(name)
    if anchor is None:
        return "*not in this run of `run_all`*\n"
    if "skipped" in anchor:
        return f"*skipped in this run: {anchor['skipped']}*\n"
    m = results["machine"]
    note = f"; {m['note']}" if m.get("note") else ""
    what = (
        "added = ours - full cache, per round (its median decoded token), CPU time"
        if name == "kv_eviction"
        else f"ratio: whatmatters / {anchor['reference']}, per round"
    )
    head = (
        f"*{'`--quick`, ' if results['quick'] else ''}at least {results['repeats']} paired rounds (more until 1 s); "
        f"{what}: median (min to max); goal {anchor['goal']}; {m['cpu_count']} CPUs, {m['torch_threads']} torch "
        f"thread(s), load average {m['load_average_at_start'][0]} at the start{note}.*"
    )
    rows = anchor["rows"]
    if name == "kv_eviction":
        return "\n".join([head, *([anchor["note"] + "."] if anchor.get("note") else []), "", *_kv_table(rows)]) + "\n"
    extra = "x_forward_backward" in rows[0]
    header = ["case", "whatmatters ms", "reference ms", "ratio"] + (["x forward+backward"] if extra else [])
    body = [
        [r["case"], f"{r['ours_ms']:.1f}", f"{r['ref_ms']:.1f}", _spread(r["ratio"], r["low"], r["high"])]
        + ([f"{r['x_forward_backward']:.2f}"] if extra else [])
        for r in rows
    ]
    return "\n".join([head, "", *_table(header, body)]) + "\n"


def updated(text: str, results: dict[str, Any]) -> str:
    """``text`` with every results block replaced by its table."""
    return BLOCK.sub(lambda m: m.group(1) + render(m.group(2), results) + m.group(4), text)


def blocks(text: str) -> dict[str, str]:
    """``{anchor name: current block content}`` of the README."""
    return {m.group(2): m.group(3) for m in BLOCK.finditer(text)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 if the README differs")
    args = parser.parse_args(argv)
    results = json.loads(RESULTS.read_text())
    text = README.read_text()
    new = updated(text, results)
    if args.check:
        sys.exit(0 if new == text else 1)
    README.write_text(new)
    print(f"README tables: {', '.join(blocks(new))}")


if __name__ == "__main__":
    main()
