"""``whatmatters tune``: a small LoRA fine-tune of MiniLM with IST or LISA layer selection, and its HTML report."""

from __future__ import annotations

from pathlib import Path

import typer

from whatmatters.cli.commands import _clean_errors, _console, app
from whatmatters.core.errors import InputError


@app.command("tune")
@_clean_errors
def tune_cmd(
    model: str = typer.Option("minilm", "--model", help="The model to fine-tune: minilm (all-MiniLM-L6-v2 + LoRA)."),
    data: str = typer.Option("20newsgroups", "--data", help="Labelled text: 20newsgroups, reuters-r8, reuters-r52."),
    method: str = typer.Option("ist", "--method", help="Layer selection: ist, lisa, random."),
    steps: int = typer.Option(100, "--steps", help="Training steps."),
    train_docs: int = typer.Option(3000, "--train-docs", help="Training documents drawn from the corpus."),
    test_docs: int = typer.Option(800, "--test-docs", help="Held-out documents for the accuracy."),
    seed: int = typer.Option(0, "--seed"),
    out: Path = typer.Option(Path("tune-report.html"), "--out", "-o", help="The HTML report to write."),
) -> None:
    """Fine-tune a small text classifier with importance-aware layer selection; report the layer choices and scores."""
    from whatmatters.tune.finetune import finetune
    from whatmatters.tune.report import write_tune_report

    if model != "minilm":
        raise InputError(f"unknown model {model!r}; `whatmatters tune` fine-tunes --model minilm")
    if method not in ("ist", "lisa", "random"):
        raise InputError(f"unknown method {method!r}; choose ist, lisa or random")
    if steps < 1:
        raise InputError(f"--steps must be >= 1, got {steps}")
    result = finetune(method, data=data, steps=steps, n_train=train_docs, n_test=test_docs, seed=seed, progress=True)
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
