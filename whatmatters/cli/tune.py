"""``whatmatters tune``: a small fine-tune of MiniLM with IST / LISA layer selection (LoRA), LIFT principal-weight
sparse tuning or PST sparse training, and its HTML report."""

from __future__ import annotations

from pathlib import Path

import typer

from whatmatters.cli.commands import _clean_errors, _console, app
from whatmatters.core.errors import InputError
from whatmatters.core.fractions import kept_share, removed_share


@app.command("tune")
@_clean_errors
def tune_cmd(
    model: str = typer.Option("minilm", "--model", help="The model to fine-tune: minilm (all-MiniLM-L6-v2 + LoRA)."),
    data: str = typer.Option("20newsgroups", "--data", help="Labelled text: 20newsgroups, reuters-r8, reuters-r52."),
    method: str = typer.Option("ist", "--method", help="ist, lisa, random (layer selection), lift or pst."),
    steps: int = typer.Option(100, "--steps", help="Training steps."),
    train_docs: int = typer.Option(3000, "--train-docs", help="Training documents drawn from the corpus."),
    test_docs: int = typer.Option(800, "--test-docs", help="Held-out documents for the accuracy."),
    fraction: float = typer.Option(0.05, "--fraction", help="lift: share of each matrix's entries updated."),
    sparsity: float = typer.Option(0.5, "--sparsity", help="pst: target share of each matrix's weights pruned."),
    seed: int = typer.Option(0, "--seed"),
    out: Path = typer.Option(Path("tune-report.html"), "--out", "-o", help="The HTML report to write."),
) -> None:
    """Fine-tune a small text classifier with importance-aware layer selection or sparse tuning; write the report."""
    from whatmatters.tune.finetune import finetune
    from whatmatters.tune.report import write_tune_report

    if model != "minilm":
        raise InputError(f"unknown model {model!r}; `whatmatters tune` fine-tunes --model minilm")
    if method not in ("ist", "lisa", "random", "lift", "pst"):
        raise InputError(f"unknown method {method!r}; choose ist, lisa, random, lift or pst")
    if steps < 1:
        raise InputError(f"--steps must be >= 1, got {steps}")
    sizes = {"steps": steps, "n_train": train_docs, "n_test": test_docs, "seed": seed, "progress": True}
    if method in ("lift", "pst"):
        kept_share(fraction, "--fraction", of="each matrix's entries updated")
        removed_share(sparsity, "--sparsity", of="each matrix's weights pruned", example="0.5")
        _sparse(method, data, sizes, fraction, sparsity, out)
        return
    result = finetune(method, data=data, **sizes)
    summary = {
        "model": "all-MiniLM-L6-v2 + LoRA r=8",
        "data": data,
        "method": method,
        "steps": steps,
        "test accuracy": f"{result.accuracy:.3f}",
        "peak gradient bytes": result.gradients,
        "peak optimizer-state bytes": result.optimizer_state,
        "seconds": f"{result.seconds:.1f}",
    }
    path = write_tune_report(result.tuner, out, title=f"whatmatters tune: {method} on {data}", summary=summary)
    console = _console()
    console.print(f"{method}: test accuracy {result.accuracy:.3f}, peak grad+optimizer bytes {result.memory}")
    console.print(f"layer scores: {dict(zip(result.tuner.names, result.tuner.scores().tolist()))}", markup=False)
    console.print(f"report: {path}", markup=False)


def _sparse(method: str, data: str, sizes: dict, fraction: float, sparsity: float, out: Path) -> None:
    """LIFT or PST on MiniLM's 36 block matrices (the head trains in full); the report has one row per matrix."""
    from whatmatters.tune.finetune_sparse import sparse_finetune
    from whatmatters.tune.report import render_sparse_report, write_page

    run = sparse_finetune(method, data=data, fraction=fraction, sparsity=sparsity, **sizes)
    setting = f"{fraction:.0%} of each matrix's entries" if method == "lift" else f"sparsity {sparsity:.0%}"
    summary = {
        "model": "all-MiniLM-L6-v2" + (" + LoRA r=8" if method == "pst" else ""),
        "data": data,
        "method": f"{method} ({setting})",
        "steps": sizes["steps"],
        "test accuracy": f"{run.accuracy:.3f}",
        "trainable numbers": run.trainable,
        "peak gradient bytes": run.gradients,
        "peak optimizer-state bytes": run.optimizer_state,
        "seconds": f"{run.seconds:.1f}",
    }
    if method == "pst":
        summary["sparsity reached"] = f"{run.sparsity:.3f}"
    sparsities = run.tuner.sparsities if method == "pst" else None
    page = render_sparse_report(
        run.tuner.layer_rows(), run.losses, f"whatmatters tune: {method} on {data}", summary, sparsities
    )
    path = write_page(page, out)
    console = _console()
    console.print(
        f"{method}: test accuracy {run.accuracy:.3f}, {run.trainable} trainable numbers, peak "
        f"grad+optimizer bytes {run.gradients + run.optimizer_state}"
    )
    console.print(f"report: {path}", markup=False)
