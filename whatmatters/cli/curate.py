"""``whatmatters curate ...``: decide which training data to keep (``dsir``: select documents like a target)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import typer

from whatmatters.cli.commands import _clean_errors, _console, escape_markup
from whatmatters.core.errors import InputError

curate_app = typer.Typer(
    name="curate",
    help="Decide which training data matter: select documents that resemble a target corpus (dsir).",
    no_args_is_help=True,
)


def _quotas(items: list[str] | None) -> dict[str, float] | None:
    """``["wiki=0.3", "web=0.7"]`` -> ``{"wiki": 0.3, "web": 0.7}`` (whole numbers stay counts)."""
    if not items:
        return None
    quotas: dict[str, float] = {}
    for item in items:
        name, sep, value = item.rpartition("=")
        try:
            number = int(value) if value.strip().isdigit() else float(value)
        except ValueError:
            number = None
        if not sep or not name or number is None:
            raise InputError(f"--quota {item!r} is not DOMAIN=COUNT or DOMAIN=FRACTION (e.g. --quota wiki=0.3)")
        quotas[name] = number
    return quotas


def _sample_tokens(value: str) -> int | str:
    if value in ("auto", "all"):
        return value
    try:
        return int(value.replace("_", ""))
    except ValueError:
        raise InputError(f"--raw-sample-tokens must be 'auto', 'all' or a number of tokens, got {value!r}") from None


@curate_app.command("dsir")
@_clean_errors
def dsir_cmd(
    target: list[str] = typer.Option(
        ...,
        "--target",
        "-t",
        help="Target documents: JSON-lines / Parquet files, a folder or a quoted glob (repeatable).",
    ),
    raw: list[str] = typer.Option(
        ..., "--raw", "-r", help="The raw pool: files, folders or quoted globs such as 'shards/*.jsonl' (repeatable)."
    ),
    k: int = typer.Option(..., "-k", "--k", help="How many documents to select."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder: selected/*.parquet, weights/, manifest."),
    text_field: str = typer.Option("text", "--text-field", help="The field (column) holding the text."),
    target_text_field: str | None = typer.Option(None, "--target-text-field", help="The target's, if it differs."),
    engine: str = typer.Option("local", "--engine", help="local (processes on this machine) or ray."),
    workers: int | None = typer.Option(
        None, "--workers", "-w", help="Processes (local) or local Ray CPUs; default all."
    ),
    ray_address: str | None = typer.Option(
        None, "--ray-address", help="Ray cluster to run on (default: RAY_ADDRESS, else a local Ray)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the Gumbel noise of the resampling."),
    topk: bool = typer.Option(False, "--topk", help="Take the k largest weights instead of resampling."),
    buckets: int = typer.Option(10_000, "--buckets", help="Hash buckets of the n-gram features."),
    ngrams: int = typer.Option(2, "--ngrams", help="Longest n-gram (2: unigrams and bigrams)."),
    hash_: str = typer.Option("fast", "--hash", help="fast, or sha256: the data-selection package's exact buckets."),
    raw_sample_tokens: str = typer.Option(
        "auto", "--raw-sample-tokens", help="Raw tokens to fit the raw model on: auto (100,000 x buckets), all, or N."
    ),
    min_tokens: int = typer.Option(0, "--min-tokens", help="Never select documents with fewer tokens."),
    domain_field: str | None = typer.Option(None, "--domain-field", help="The field naming each document's domain."),
    quota: list[str] | None = typer.Option(
        None,
        "--quota",
        help="DOMAIN=FRACTION or DOMAIN=COUNT documents of a domain (repeatable, needs --domain-field).",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start over in an OUT folder of another run."),
) -> None:
    """Select K documents of the raw pool that resemble the target (DSIR: importance resampling on hashed n-grams).

    Streams the shards, writes the selected documents with all their fields plus dsir_log_weight to
    OUT/selected/*.parquet, and resumes: rerun the same command after a crash to go on.
    """
    from whatmatters.curate.dsir import dsir

    console = _console()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the summary below reports bad lines and empty files
        result = dsir(
            target,
            raw,
            k,
            out,
            text_field=text_field,
            target_text_field=target_text_field,
            buckets=buckets,
            ngrams=ngrams,
            hash=hash_,
            raw_sample_tokens=_sample_tokens(raw_sample_tokens),
            min_tokens=min_tokens,
            seed=seed,
            topk=topk,
            domain_field=domain_field,
            quotas=_quotas(quota),
            engine=engine,
            workers=workers,
            ray_address=ray_address,
            overwrite=overwrite,
            progress=sys.stderr.isatty(),
        )
    for line in summary_lines(result):
        console.print(escape_markup(line), soft_wrap=True)


def summary_lines(result) -> list[str]:
    """The summary of a DSIR run: what was read, what was skipped, what was selected, how long it took."""
    target = f"target: {result.target_documents:,} documents"
    if result.target_bad_lines:
        target += f", {result.target_bad_lines:,} bad lines skipped"
    lines = [target]
    raw = (
        f"raw: {result.documents:,} documents read from {result.raw_files:,} files ({result.pieces:,} pieces), "
        f"{result.bad_lines:,} bad lines skipped, {result.blank_lines:,} blank lines"
    )
    lines.append(raw)
    lines.extend(f"  bad: {example}" for example in result.bad_examples[:5])
    if result.bad_lines > len(result.bad_examples[:5]):
        lines.append(f"  ... {result.bad_lines - len(result.bad_examples[:5]):,} more bad lines")
    if result.empty_files:
        shown = ", ".join(map(str, result.empty_files[:3])) + (" ..." if len(result.empty_files) > 3 else "")
        lines.append(f"  {len(result.empty_files)} empty files (no document): {shown}")
    files = len(result.selected_files)
    selected = f"selected: {result.selected:,} documents -> {result.out / 'selected'} ({files} files)"
    if result.selected_by_domain:
        selected += "; by domain: " + ", ".join(f"{d}: {n:,}" for d, n in result.selected_by_domain.items())
    lines.append(selected)
    stages = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in result.stage_seconds.items())
    timing = f"time: {result.seconds:.2f} s ({result.documents_per_second:,.0f} documents/s; {stages})"
    reused = {stage: n for stage, n in result.reused.items() if n}
    if reused:
        timing += "; reused from an earlier run: " + ", ".join(f"{stage} {n} pieces" for stage, n in reused.items())
    lines.append(timing)
    return lines
