"""The ``whatmatters`` command line: list and describe methods, explain a saved model, evaluate, report, demo.

Every error (bad input, unknown method, a missing, unreadable or damaged file, and bugs) prints one
line, ``error: ...``, on stderr and exits with status 2; ``whatmatters --debug ...`` shows the
traceback instead, for bug reports.
"""

from __future__ import annotations

import ast
import functools
import warnings
from collections.abc import Callable
from contextvars import ContextVar
from pathlib import Path
from typing import Any, TypeVar

import typer

from whatmatters.core.errors import InputError, ModelError, WhatMattersError

F = TypeVar("F", bound=Callable[..., Any])

_DEBUG: ContextVar[bool] = ContextVar("whatmatters_debug", default=False)  # set by `whatmatters --debug`
# click's usage-error base class (recent typer versions bundle their own copy of click)
_CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")

PICKLE_WARNING = (
    "Security: MODEL files are pickles (joblib / pickle, or a torch .pt file read with "
    "torch.load(weights_only=False)); loading a pickle runs code from the file, so only load files you trust."
)

app = typer.Typer(
    name="whatmatters",
    help="Find out what matters in a model and its data: score features, evaluate the scores, write reports.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


def _console(stderr: bool = False):
    from rich.console import Console

    console = Console(stderr=stderr, highlight=False)
    if not console.is_terminal and console.width < 160:  # piped or captured: room for wide tables
        console = Console(stderr=stderr, highlight=False, width=160)
    return console


def _clean_errors(fn: F) -> F:
    """Every error as one ``error: ...`` line on stderr and exit status 2; with ``--debug``, the traceback.

    whatmatters errors print their message, I/O errors the file and the reason, anything else (a bug)
    ``internal error: <type>: <message>`` with a hint to rerun with ``--debug``.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, _CLICK_ERROR):
            raise  # exits and usage errors: click reports them itself
        except Exception as err:
            if _DEBUG.get():
                raise
            from rich.markup import escape

            message = escape(" ".join(error_message(err).split()))  # one line, whatever the error holds
            _console(stderr=True).print(f"[bold red]error:[/bold red] [red]{message}[/red]", soft_wrap=True)
            raise typer.Exit(2) from None

    wrapper.clean_errors = True  # type: ignore[attr-defined]  # tests check that every command has it
    return wrapper  # type: ignore[return-value]


def error_message(err: Exception) -> str:
    """The text after ``error:`` for an exception a command raised."""
    if isinstance(err, WhatMattersError):
        return str(err)
    if isinstance(err, FileNotFoundError) and err.filename is not None:
        return f"no such file: {err.filename}"
    if isinstance(err, OSError) and err.strerror:  # PermissionError, IsADirectoryError, disk full, ...
        where = f"{err.filename}: " if err.filename is not None else ""
        return f"{where}{err.strerror} (check the path and its permissions)"
    if isinstance(err, OSError):  # no errno: a library's I/O error, its message names the problem
        return str(err) or type(err).__name__
    return f"internal error: {type(err).__name__}: {err} (rerun with --debug to see the traceback for a bug report)"


def _version(value: bool) -> None:
    if value:
        from whatmatters import __version__

        typer.echo(f"whatmatters {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    debug: bool = typer.Option(
        False, "--debug", help="On an error, show the full traceback (for bug reports) instead of one line."
    ),
) -> None:
    """Find out what matters in a model and its data."""
    _DEBUG.set(debug)


# ------------------------------------------------------------------ loading
def _existing(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(2, f"no {what} file", str(path))
    if path.is_dir():
        raise InputError(f"{path} is a folder; give the {what} file")
    return path


def load_model(path: Path) -> Any:
    """A model from a joblib/pickle file or a torch ``.pt``/``.pth`` file holding a whole module.

    Loading runs code from the file (pickle): only load files you trust. Torch modules are put in
    eval mode (this copy only; the file is not changed).
    """
    path = _existing(Path(path), "model")
    suffix = path.suffix.lower()
    try:
        if suffix in (".pt", ".pth"):
            import torch

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = torch.load(path, map_location="cpu", weights_only=False)
            if isinstance(model, dict):
                raise ModelError(
                    f"{path} holds a state dict (parameters only), not a model; save the whole module with "
                    "torch.save(model, path), or a TorchScript module with torch.jit.save"
                )
            if isinstance(model, torch.nn.Module):
                model.eval()
            return model
        import joblib

        return joblib.load(path)
    except WhatMattersError:
        raise
    except Exception as err:  # unpickling errors: missing classes, wrong format, corrupt file
        raise ModelError(
            f"could not load a model from {path}: {type(err).__name__}: {err}. Give a joblib/pickle file of a "
            "fitted scikit-learn estimator or a torch .pt file saved with torch.save(model); the classes it uses "
            "must be importable here"
        ) from None


def load_table(path: Path):
    """A pandas DataFrame from a CSV (``.csv``, ``.tsv``, ``.txt``) or Parquet (``.parquet``, ``.pq``) file."""
    import pandas as pd

    path = _existing(Path(path), "data")
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            return pd.read_parquet(path)
        if suffix in (".csv", ".txt"):
            return pd.read_csv(path)
        if suffix == ".tsv":
            return pd.read_csv(path, sep="\t")
    except (ValueError, OSError) as err:
        raise InputError(f"could not read {path}: {err}") from None
    raise InputError(f"cannot read {path.name}: data must be a .csv, .tsv or .parquet file")


def split_label(frame: Any, label_column: str | None, rows: int | None = None) -> tuple[Any, Any]:
    """(features, labels or None): ``label_column`` is taken out of ``frame``; only the first ``rows`` rows."""
    if rows is not None:
        if rows < 1:
            raise InputError(f"--rows must be at least 1, got {rows}")
        frame = frame.iloc[:rows]
    if label_column is None:
        return frame, None
    if label_column not in frame.columns:
        raise InputError(
            f"no column {label_column!r} in the data; its columns are {', '.join(map(str, frame.columns[:20]))}"
            + (" ..." if len(frame.columns) > 20 else "")
        )
    return frame.drop(columns=[label_column]), frame[label_column].to_numpy()


def parse_params(items: list[str] | None) -> dict[str, Any]:
    """``["steps=50", "baseline=zero"]`` -> ``{"steps": 50, "baseline": "zero"}`` (Python literals or strings)."""
    params: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise InputError(f"--param {item!r} is not of the form key=value (e.g. --param steps=50)")
        try:
            params[key] = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            params[key] = raw.strip()
    return params


def _label_hint(err: InputError, label_column: str | None) -> InputError:
    """The error, with a hint to name the label column when the data may still hold it."""
    text = str(err)
    if label_column is None and ("columns" in text or "shape" in text):
        return InputError(f"{text} (if the data file holds the labels, name their column with --label-column)")
    return err


def _target(value: str | None) -> Any:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise InputError(f"--target must be an output index (an integer), got {value!r}") from None


def _top_table(importance: Any, k: int):
    from rich.table import Table

    agg = importance.aggregate("mean_abs") if importance.per_sample else importance
    table = Table(title=f"{importance.method}: top {min(k, agg.n_units)} {importance.unit}s")
    table.add_column("rank", justify="right")
    table.add_column(importance.unit)
    table.add_column("mean |score|" if importance.per_sample else "score", justify="right")
    for i, (name, score) in enumerate(agg.top(k), 1):
        table.add_row(str(i), str(name), f"{score:.4g}")
    return table


def metrics_table(result: Any, title: str = "benchmark"):
    """A rich table of a BenchmarkResult: methods x metrics (with ↑/↓, best in bold green) x seconds."""
    from rich.table import Table

    info = dict(getattr(result, "metric_info", {}) or {})
    info.setdefault("seconds", ("cost", False))
    reference = getattr(result, "reference", None)
    frame = result.table
    columns = [c for c in frame.columns if c != "error"]
    ranked = frame.drop(index=[reference], errors="ignore") if reference is not None else frame
    table = Table(title=title, caption="↑ higher is better, ↓ lower is better, best in bold")
    table.add_column("method")
    best: dict[str, float] = {}
    for col in columns:
        arrow = ""
        if col in info:
            arrow = " ↑" if info[col][1] else " ↓"
            values = [float(v) for v in ranked[col] if _finite(v)]
            if len(values) > 1:
                best[col] = max(values) if info[col][1] else min(values)
        table.add_column(f"{col}{arrow}", justify="right")
    for method, row in frame.iterrows():
        is_ref = method == reference
        cells = [f"{method} (reference)" if is_ref else str(method)]
        for col in columns:
            value = row[col]
            if not _finite(value):
                cells.append("–")
                continue
            v = float(value)
            text = f"{v:.3g}" if col == "seconds" else f"{v:.4g}"
            cells.append(f"[bold green]{text}[/bold green]" if not is_ref and best.get(col) == v else text)
        table.add_row(
            *(escape_markup(c) if i == 0 else c for i, c in enumerate(cells)), style="dim" if is_ref else None
        )
    return table


def _finite(value: Any) -> bool:
    import math

    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def escape_markup(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def print_errors(result: Any) -> None:
    """Methods or metrics that failed in a benchmark, one line each on stderr."""
    frame = result.table
    if "error" not in frame.columns:
        return
    console = _console(stderr=True)
    for method, message in frame["error"].items():
        if isinstance(message, str) and message:
            console.print(f"[yellow]failed: {escape_markup(str(method))}: {escape_markup(message)}[/yellow]")


# ----------------------------------------------------------------- commands
@app.command("methods")
@_clean_errors
def methods_cmd(
    unit: str | None = typer.Option(None, "--unit", help="Only methods for this unit (feature, pixel, token, ...)."),
    verb: str | None = typer.Option(
        None, "--verb", help="Only methods of this verb (explain, compress, tune, curate)."
    ),
    family: str | None = typer.Option(
        None, "--family", help="Only methods of this family (gradient, perturbation, ...)."
    ),
) -> None:
    """List the registered methods."""
    from rich.table import Table

    from whatmatters.core.registry import get_method, methods

    names = methods(unit=unit, verb=verb, family=family)
    if not names:
        raise InputError(
            "no method matches "
            + ", ".join(f"{k}={v!r}" for k, v in (("unit", unit), ("verb", verb), ("family", family)) if v)
            + "; run `whatmatters methods` to see them all"
        )
    table = Table(title=f"{len(names)} method{'s' if len(names) != 1 else ''}")
    table.add_column("name", no_wrap=True, style="bold")
    for column in ("verb", "family", "units", "needs"):
        table.add_column(column, overflow="fold")
    table.add_column("summary", overflow="fold", ratio=1, min_width=20)
    for name in names:
        m = get_method(name)
        table.add_row(m.name, m.verb, m.family, ", ".join(m.units), m.needs, m.summary)
    _console().print(table)


@app.command("describe")
@_clean_errors
def describe_cmd(method: str = typer.Argument(..., help="A method name from `whatmatters methods`.")) -> None:
    """Show a method's documentation, units and default parameters."""
    from whatmatters.core.registry import describe

    _console().print(describe(method), markup=False)


@app.command(
    "explain",
    help="Score the features of a saved model on a data file, or the tokens of a text (--text, MODEL minilm, "
    "news or smollm2).\n\n" + PICKLE_WARNING,
)
@_clean_errors
def explain_cmd(
    model: Path = typer.Argument(
        ...,
        help="Model file: .joblib / .pkl (scikit-learn) or .pt (torch.save(model)); "
        "with --text: minilm, news or smollm2.",
    ),
    data: list[Path] | None = typer.Argument(
        None, help="Data file: .csv or .parquet, one row per sample; or one or more image files (.png, .jpg)."
    ),
    method: str = typer.Option(..., "--method", "-m", help="Method name (see `whatmatters methods`)."),
    target: str | None = typer.Option(None, "--target", "-t", help="Output index to explain; default: predicted."),
    label_column: str | None = typer.Option(
        None, "--label-column", "-y", help="Column with the true labels: removed from the features, passed as y."
    ),
    out: Path | None = typer.Option(None, "--out", "-o", help="Parquet file for the scores; default: METHOD.parquet."),
    param: list[str] | None = typer.Option(None, "--param", "-p", help="A method parameter as key=value (repeatable)."),
    rows: int | None = typer.Option(None, "--rows", "-n", help="Explain only the first N rows."),
    seed: int = typer.Option(0, "--seed", help="Seed of every random draw."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Rows per model call."),
    top: int = typer.Option(10, "--top", help="How many units to print."),
    image_size: int = typer.Option(224, "--image-size", help="Images: resized to this square size."),
    image_norm: str = typer.Option("imagenet", "--image-norm", help="Images: 'imagenet' mean/std or 'none' ([0, 1])."),
    overlay: Path | None = typer.Option(None, "--overlay", help="Images: PNG of the maps; default: METHOD.png."),
    text: list[str] | None = typer.Option(
        None, "--text", help="A text to explain (repeatable); MODEL: minilm/news/smollm2."
    ),
    text_file: Path | None = typer.Option(None, "--text-file", help="A file of texts to explain, one per line."),
    generate: int | None = typer.Option(None, "--generate", help="smollm2: tokens to generate and explain (8)."),
    report: Path | None = typer.Option(None, "--report", help="Text: also write an HTML report to this file."),
) -> None:
    from whatmatters.explain import explain

    params = parse_params(param)
    if text or text_file is not None:
        from whatmatters.cli.text import explain_texts

        explain_texts(str(model), text, text_file, method, target, generate, params, out, report, batch_size, seed)
        return
    if not data:
        raise InputError(
            "give a data file (.csv / .parquet) or image files, or --text with MODEL minilm, news or smollm2"
        )
    estimator = load_model(model)
    # --- vision: image files are loaded as one batch (n, 3, size, size) and their maps drawn as overlays
    from whatmatters.vision.transforms import is_image_file, load_images, normalization

    images = None
    if all(is_image_file(p) for p in data):
        mean, std = normalization(image_norm)
        images = load_images(data, size=image_size, mean=mean, std=std)
        features, y = (images if rows is None else images[:rows]), None
    elif len(data) != 1:
        raise InputError("give one data file (.csv / .parquet), or only image files (.png / .jpg)")
    else:  # --- end vision
        features, y = split_label(load_table(data[0]), label_column, rows)
    try:
        importance = explain(
            estimator,
            features,
            method,
            _target(target),
            y=y,
            seed=seed,
            batch_size=batch_size,
            progress=None,
            **params,
        )
    except InputError as err:
        raise _label_hint(err, label_column) from None
    out = out if out is not None else Path(f"{importance.method}.parquet")
    importance.save(out)
    console = _console()
    console.print(_top_table(importance, top))
    console.print(
        f"wrote {' x '.join(map(str, importance.values.shape))} {importance.unit} scores to {out} "
        f"({importance.seconds:.2f} s)",
        markup=False,
    )
    if images is not None:  # --- vision: overlay PNG (methods x images)
        from whatmatters.vision.overlay import overlay_grid

        picture = overlay if overlay is not None else Path(f"{importance.method}.png")
        overlay_grid({importance.method: importance}, features, picture, mean=mean, std=std)
        console.print(f"overlay: {picture}", markup=False)


def _load_scores(paths: list[Path]) -> list[Any]:
    from whatmatters.core.importance import Importance

    return [Importance.load(_existing(Path(p), "scores")) for p in paths]


@app.command("evaluate", help="Measure saved scores against the model and data (a metrics table).\n\n" + PICKLE_WARNING)
@_clean_errors
def evaluate_cmd(
    model: Path = typer.Argument(..., help="Model file: .joblib / .pkl (scikit-learn) or .pt (torch.save(model))."),
    data: Path = typer.Argument(..., help="The data file the scores were computed on (.csv or .parquet)."),
    scores: list[Path] = typer.Option(..., "--scores", "-s", help="A Parquet file from `whatmatters explain`."),
    metric: list[str] | None = typer.Option(
        None, "--metric", help="Metric to compute (repeatable); default: the benchmark's default metrics."
    ),
    label_column: str | None = typer.Option(None, "--label-column", "-y", help="Column with the true labels."),
    rows: int | None = typer.Option(None, "--rows", "-n", help="Use only the first N rows (as given to explain)."),
    target: str | None = typer.Option(None, "--target", "-t", help="Output index; default: the scores' target."),
    report: Path | None = typer.Option(None, "--report", help="Also write an HTML report to this file."),
    seed: int = typer.Option(0, "--seed", help="Seed of every random draw."),
    no_reference: bool = typer.Option(False, "--no-reference", help="Leave out the random-scores reference row."),
) -> None:
    from whatmatters.report.html import labelled

    importances = labelled(_load_scores(scores))
    estimator = load_model(model)
    features, y = split_label(load_table(data), label_column, rows)
    for path, imp in zip(scores, importances.values()):
        if imp.per_sample and imp.n_samples != len(features):
            raise InputError(
                f"{path} holds scores of {imp.n_samples} samples but the data has {len(features)} rows; "
                f"evaluate on the rows that were explained (e.g. --rows {imp.n_samples})"
            )
    from whatmatters.evaluate import compare

    result = compare(
        estimator,
        features,
        importances,
        list(metric) if metric else None,
        y=y,
        target=_target(target),  # None: each importance at the output it explained
        seed=seed,
        reference=not no_reference,
        progress=None,
    )
    _console().print(metrics_table(result, title=f"evaluation on {data.name}"))
    print_errors(result)
    if report is not None:
        from whatmatters.report.html import write_report

        write_report(result, report, title=f"whatmatters: {model.name} on {data.name}", data=features, model=estimator)
        _console().print(f"report: {report}", markup=False)


@app.command("report")
@_clean_errors
def report_cmd(
    scores: list[Path] = typer.Argument(..., help="Parquet files from `whatmatters explain`."),
    out: Path = typer.Option(Path("report.html"), "--out", "-o", help="The HTML file to write."),
    title: str = typer.Option("whatmatters report", "--title", help="Title of the page."),
    images: list[Path] | None = typer.Option(
        None, "--images", help="The explained image files, in order (repeat the option): maps drawn over them."
    ),
    image_size: int = typer.Option(224, "--image-size", help="Images: resized to this square size."),
) -> None:
    """Write a self-contained HTML report (charts and method agreement) of saved scores."""
    from whatmatters.report.html import write_report

    data = None
    if images:
        from whatmatters.vision.transforms import load_images

        data = load_images([_existing(Path(p), "image") for p in images], size=image_size, mean=None, std=None)
    path = write_report(_load_scores(scores), out, title=title, data=data)
    _console().print(f"report: {path}", markup=False)


@app.command("demo")
@_clean_errors
def demo_cmd(
    out: Path = typer.Option(Path("whatmatters-demo"), "--out", "-o", help="Folder for the report and the scores."),
    quick: bool = typer.Option(False, "--quick", help="Fewer samples and methods (a few seconds)."),
) -> None:
    """Train a small model on scikit-learn's breast cancer data, score it with several methods, write a report."""
    from whatmatters.cli.demo import run_demo

    console = _console()
    result = run_demo(out, quick=quick, console=console)
    console.print(metrics_table(result.benchmark, title="breast cancer: methods x metrics"))
    print_errors(result.benchmark)
    console.print(f"report: {result.report}", markup=False)
    console.print(f"scores: {result.folder}/*.parquet", markup=False)
    import shlex

    model_file, data_file, out_file = (shlex.quote(str(result.folder / n)) for n in ("model.pt", "data.csv", "mine.pq"))
    console.print(
        f"next: whatmatters explain {model_file} {data_file} -m ablation -y target -o {out_file}", markup=False
    )
