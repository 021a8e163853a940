"""``benchmark(model, data, methods)``: one table of methods x metrics x seconds."""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from whatmatters.core.errors import InputError, MethodError
from whatmatters.core.importance import Importance
from whatmatters.core.params import check_params
from whatmatters.core.ranks import ranks
from whatmatters.core.registry import get_method
from whatmatters.core.state import require_eval
from whatmatters.core.task import Task, make_task, torch_module
from whatmatters.evaluate.ground_truth import relevant_mask
from whatmatters.evaluate.metrics import CATEGORIES, Metric, get_metric
from whatmatters.evaluate.metrics import metrics as metric_names
from whatmatters.explain.api import explain

if TYPE_CHECKING:
    import pandas as pd

REFERENCE = "random"


def _empty_frame() -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame()


@dataclass
class BenchmarkResult:
    """What :func:`benchmark` measured.

    * ``table``: one row per method (index: method labels), one column per metric, then
      ``"seconds"`` (wall time of the ``explain`` call) and ``"error"`` (None, or why the method or a
      metric failed; its scores are then NaN);
    * ``importances``: method label -> :class:`Importance`;
    * ``curves``: method label -> curve name (``"deletion"``, ``"insertion"``, ...) -> ``(x, mean y)``;
    * ``agreement``: Spearman rank correlation between the methods' aggregated importances
      (mean absolute score per unit);
    * ``metric_info``: column -> ``(category, higher_is_better)``;
    * ``reference``: the label of the random-scores reference row (None when not added).
    """

    table: pd.DataFrame
    importances: dict[str, Importance] = field(default_factory=dict)
    curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)
    agreement: pd.DataFrame = field(default_factory=_empty_frame)
    metric_info: dict[str, tuple[str, bool]] = field(default_factory=dict)
    reference: str | None = None

    @property
    def errors(self) -> dict[str, str]:
        """Method label -> error message, for the rows where something failed."""
        if "error" not in self.table:
            return {}
        return {str(i): str(e) for i, e in self.table["error"].items() if isinstance(e, str) and e}

    def best(self) -> dict[str, list[str]]:
        """Column -> labels of the best methods (ties included; the reference row left out)."""
        out = {}
        rows = self.table.drop(index=[self.reference], errors="ignore") if self.reference else self.table
        for col, (_, higher) in self.metric_info.items():
            if col in rows and rows[col].notna().any():
                values = rows[col].astype(float)
                top = values.max() if higher else values.min()
                out[col] = [str(i) for i in values.index[values == top]]
        return out

    def _cells(self, bold: tuple[str, str]) -> tuple[list[str], list[list[str]]]:
        best = self.best()
        columns = [c for c in self.table.columns if c != "error"]
        head = ["method"] + [f"{c} {'↑' if self.metric_info.get(c, ('', True))[1] else '↓'}" for c in columns]
        rows = []
        for label, row in self.table.iterrows():
            cells = [str(label) + (" (reference)" if label == self.reference else "")]
            for c in columns:
                v = row[c]
                text = "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{float(v):.4g}"
                if label in best.get(c, ()) and text != "–":
                    text = f"{bold[0]}{text}{bold[1]}"
                cells.append(text)
            rows.append(cells)
        return head, rows

    def _footer(self) -> list[str]:
        lines = [f"- {label}: {msg}" for label, msg in self.errors.items()]
        return ["", "errors:", *lines] if lines else []

    def __str__(self) -> str:
        head, rows = self._cells(("", "*"))
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

        def line(cells: list[str]) -> str:
            return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

        out = [line(head), line(["-" * w for w in widths]), *map(line, rows)]
        out.append("(↑ higher is better, ↓ lower is better, * best)")
        return "\n".join(out + self._footer())

    def to_markdown(self) -> str:
        """The table as GitHub Markdown (best value of each column in bold), then any errors."""
        head, rows = self._cells(("**", "**"))

        def line(cells: list[str]) -> str:
            return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

        lines = [line(head), "|" + "|".join([" --- "] + [" ---: "] * (len(head) - 1)) + "|", *map(line, rows)]
        return "\n".join(lines + self._footer())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: table rows, metric info, agreement and mean curves (NaN becomes None)."""

        def clean(v: Any) -> Any:
            if isinstance(v, (float, np.floating)):
                return None if math.isnan(v) else float(v)
            if isinstance(v, np.integer):
                return int(v)
            return v

        return {
            "table": {str(i): {c: clean(v) for c, v in row.items()} for i, row in self.table.iterrows()},
            "metric_info": {k: {"category": c, "higher_is_better": h} for k, (c, h) in self.metric_info.items()},
            "agreement": {str(i): {str(c): clean(v) for c, v in row.items()} for i, row in self.agreement.iterrows()},
            "curves": {
                m: {k: {"x": x.tolist(), "y": y.tolist()} for k, (x, y) in cs.items()} for m, cs in self.curves.items()
            },
            "reference": self.reference,
        }


def _parse(items: Any, what: str) -> list[tuple[str, dict[str, Any]]]:
    """``[(name, params), ...]`` from names, ``(name, params)`` tuples or a ``{name: params}`` dict."""
    if isinstance(items, Mapping):
        items = [(k, v if v is not None else {}) for k, v in items.items()]
    if isinstance(items, str) or (isinstance(items, tuple) and len(items) == 2 and isinstance(items[1], Mapping)):
        items = [items]
    if not isinstance(items, Sequence) or isinstance(items, (bytes, bytearray)):
        raise InputError(f"{what} must be a list of names or (name, params) tuples, got {type(items).__name__}")
    out = []
    for item in items:
        if isinstance(item, str):
            out.append((item, {}))
        elif (
            isinstance(item, (tuple, list))
            and len(item) == 2
            and isinstance(item[0], str)
            and isinstance(item[1], Mapping)
        ):
            out.append((item[0], dict(item[1])))
        else:
            raise InputError(f"cannot read {item!r} in {what}: give a name or a (name, {{param: value}}) tuple")
    return out


def _labels(specs: list[tuple[str, dict[str, Any]]], what: str) -> list[str]:
    """The name, or ``name(p=v, ...)`` when a name is listed more than once."""
    counts: dict[str, int] = {}
    for name, _ in specs:
        counts[name] = counts.get(name, 0) + 1
    labels = []
    for name, params in specs:
        listed = ", ".join(f"{k}={v!r}" for k, v in params.items())
        label = name if counts[name] == 1 or not params else f"{name}({listed})"
        if label in labels:
            raise InputError(f"{what} lists {label!r} twice")
        labels.append(label)
    return labels


def _check_relevant(relevant: Any, inputs: torch.Tensor, names: Sequence[str] | None) -> None:
    array = relevant.detach().cpu().numpy() if isinstance(relevant, torch.Tensor) else relevant
    sample, n = tuple(inputs.shape[1:]), int(inputs.shape[0])
    if np.asarray(array).dtype == np.bool_:
        shape = np.shape(array)
        suffixes = [sample[i:] for i in range(len(sample))]
        if not any(shape in (s, (n, *s)) for s in suffixes):
            raise InputError(
                f"relevant mask has shape {shape}; give the units' shape (e.g. {sample}) "
                f"or one mask per sample {(n, *sample)}"
            )
        return
    relevant_mask(relevant, sample, names, n)  # raises on unknown names or indices out of range


def _progress(labels: list[str], enabled: bool | None, what: str = "benchmark") -> Iterator[str]:
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield from labels
        return
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task(what, total=len(labels))
        for label in labels:
            bar.update(task, description=f"{what}: {label}")
            yield label
            bar.advance(task)


def _agreement(importances: dict[str, Importance], labels: list[str]) -> pd.DataFrame:
    """Pairwise Spearman correlation of the aggregated (mean absolute) importances; NaN for failed methods."""
    import pandas as pd

    frame = pd.DataFrame(np.nan, index=labels, columns=labels, dtype=float)
    done = [label for label in labels if label in importances]
    if not done:
        return frame
    shapes = {importances[label].unit_shape for label in done}
    if len(shapes) > 1:  # e.g. per-pixel vs per-channel scores: not comparable unit by unit
        return frame
    rows = torch.stack([importances[label].aggregate()._flat()[0].detach().to("cpu", torch.float64) for label in done])
    r = ranks(rows.abs())
    r = r - r.mean(1, keepdim=True)
    norm = r.norm(dim=1, keepdim=True)
    corr = (r @ r.T) / (norm * norm.T)  # constant scores: 0 / 0 = NaN, correctly undefined
    frame.loc[done, done] = corr.numpy()
    return frame


def _make_task(
    model: Any, data: Any, *, y: Any, target: Any, relevant: Any, background: Any, seed: Any, batch_size: int | None
) -> Task:
    """The task shared by every method and metric of ``benchmark`` and ``compare``: built, checked and its
    target resolved once."""
    module = torch_module(model)
    if module is not None:
        require_eval(module)
    task = make_task(model, data, target, y=y, background=background, seed=seed, batch_size=batch_size, progress=False)
    if relevant is not None:
        _check_relevant(relevant, task.inputs, task.names)
    return task


def _metric_specs(metrics: Any, unit: str, relevant: Any) -> tuple[list[tuple[str, dict[str, Any]]], list[Metric]]:
    """The metrics to compute (default: every one for ``unit``; ground-truth ones when ``relevant`` is given)."""
    if metrics is None:
        chosen = [get_metric(m) for m in metric_names(unit=unit)]
        chosen = [m for m in chosen if m.needs is None or relevant is not None]
        chosen.sort(key=lambda m: (CATEGORIES.index(m.category), m.name))
        specs: list[tuple[str, dict[str, Any]]] = [(m.name, {}) for m in chosen]
    else:
        specs = _parse(metrics, "metrics")
    entries: list[Metric] = []
    for name, params in specs:
        entry = get_metric(name)
        if unit not in entry.units:
            raise MethodError(f"metric {name!r} applies to {', '.join(entry.units)} units, not {unit}s")
        if entry.needs == "relevant" and relevant is None:
            raise InputError(f"metric {name!r} compares with ground truth: pass relevant= (the units that matter)")
        check_params(entry.name, params, entry.defaults, fn=entry.fn)  # refused before any work
        entries.append(entry)
    return specs, entries


def _random_scores(inputs: torch.Tensor, names: list[str] | None, unit: str, seed: int) -> Importance:
    """The reference: uniform random scores per sample and input element."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.rand(inputs.shape, generator=gen, dtype=torch.float64)
    return Importance(values, unit=unit, names=names if inputs.ndim == 2 else None, method=REFERENCE, seed=seed)


def _run(
    model: Any,
    data: Any,
    jobs: dict[str, Callable[[], tuple[Importance, float]]],
    method_labels: list[str],
    specs: list[tuple[str, dict[str, Any]]],
    entries: list[Metric],
    context: dict[str, Any],
    progress: bool | None,
    what: str,
    reference: str | None,
) -> BenchmarkResult:
    """Make every importance (``jobs``: label -> () -> (importance, seconds)) and measure it with every metric."""
    import pandas as pd

    metric_labels = _labels(specs, "metrics")
    importances: dict[str, Importance] = {}
    curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    rows: dict[str, dict[str, Any]] = {}
    for label in _progress(list(jobs), progress, what):
        row: dict[str, Any] = dict.fromkeys(metric_labels, math.nan)
        errors: list[str] = []
        start = time.perf_counter()
        try:
            imp, seconds = jobs[label]()
        except Exception as err:  # a failing method is a row of the table, not the end of the benchmark
            errors.append(f"{type(err).__name__}: {err}")
            imp, seconds = None, time.perf_counter() - start
        row["seconds"] = seconds
        if imp is not None:
            importances[label] = imp
            for entry, mlabel, (_, mparams) in zip(entries, metric_labels, specs):
                kwargs = {k: v for k, v in context.items() if k in entry.accepted}
                try:
                    result = entry(model, data, imp, **kwargs, **mparams)
                except Exception as err:
                    errors.append(f"{mlabel}: {type(err).__name__}: {err}")
                    continue
                row[mlabel] = result.value
                for cname, curve in result.mean_curves().items():
                    key = cname if mlabel == entry.name else f"{cname} ({mlabel})"
                    curves.setdefault(label, {})[key] = curve
        row["error"] = "; ".join(errors) or None
        if errors:
            warnings.warn(f"{what}: {label} failed: {row['error']}", RuntimeWarning, stacklevel=3)
        rows[label] = row

    table = pd.DataFrame.from_dict(rows, orient="index", columns=[*metric_labels, "seconds", "error"])
    table[[*metric_labels, "seconds"]] = table[[*metric_labels, "seconds"]].astype(float)
    table["error"] = table["error"].astype(object).where(table["error"].notna(), None)
    table.index.name = "method"
    info = {lab: (e.category, e.higher_is_better) for lab, e in zip(metric_labels, entries)}
    info["seconds"] = ("cost", False)
    return BenchmarkResult(
        table=table,
        importances=importances,
        curves=curves,
        agreement=_agreement(importances, method_labels),
        metric_info=info,
        reference=reference,
    )


def benchmark(
    model: Any,
    data: Any,
    methods: Sequence[str | tuple[str, Mapping[str, Any]]] | Mapping[str, Mapping[str, Any]],
    metrics: Sequence[str | tuple[str, Mapping[str, Any]]] | Mapping[str, Mapping[str, Any]] | None = None,
    *,
    y: Any = None,
    target: Any = None,
    relevant: Any = None,
    background: Any = None,
    seed: int = 0,
    progress: bool | None = None,
    method_params: Mapping[str, Mapping[str, Any]] | None = None,
    reference: bool = True,
    batch_size: int | None = None,
) -> BenchmarkResult:
    """Explain ``data`` with every method and score every importance with every metric.

    Args:
        model: a torch ``nn.Module``, a scikit-learn estimator or a callable (as for ``explain``).
        data: the samples to explain and evaluate on.
        methods: method names, ``(name, params)`` tuples, or a ``{name: params}`` dict; a name
            listed twice (with different params) gets the params in its label.
        metrics: metric names, ``(name, params)`` tuples or a dict; default: every registered metric for
            the data's units (``whatmatters.evaluate.metrics(unit=...)``), the ground-truth ones
            (precision@k, relevance mass, pointing game) only when ``relevant`` is given.
        y, target, background, seed: passed to ``explain`` and to the metrics that use them; with
            ``target=None`` each importance is evaluated at the output it explained.
        relevant: units known to matter (indices, names or a boolean mask; see
            :mod:`whatmatters.evaluate.ground_truth`): adds the ground-truth metrics.
        progress: a progress bar over methods (default: on a terminal).
        method_params: ``{method name: params}``, merged under the params of a tuple.
        reference: add a ``"random"`` row: uniform random scores, evaluated like a method, to read
            the table against chance.
        batch_size: rows per model call.

    ``seconds`` is the wall time of each ``explain`` call. A method or metric that fails is recorded
    (NaN scores, message in the ``"error"`` column, and a warning); bad arguments to ``benchmark``
    itself raise.
    """
    method_specs = _parse(methods, "methods")
    if not method_specs:
        raise InputError("methods is empty; name at least one method from whatmatters.methods()")
    extra = dict(method_params or {})
    for name, _ in method_specs:  # validate names and parameters before any work
        info = get_method(name)
        if info.verb != "explain":
            raise MethodError(f"{name!r} is a {info.verb} method; benchmark compares explain methods")
    listed = {n for n, _ in method_specs} | {get_method(n).name for n, _ in method_specs}
    if unknown := sorted(set(extra) - listed):
        raise InputError(f"method_params names {unknown}, which are not among the methods {sorted(listed)}")
    merged = []
    for name, params in method_specs:
        info = get_method(name)
        all_params = {**extra.get(info.name, {}), **extra.get(name, {}), **params}
        merged.append((name, check_params(info.name, all_params, info.defaults, fn=info.fn)))
    method_labels = _labels(merged, "methods")
    task = _make_task(
        model, data, y=y, target=target, relevant=relevant, background=background, seed=seed, batch_size=batch_size
    )
    inputs, names, unit = task.inputs, task.names, task.unit
    specs, entries = _metric_specs(metrics, unit, relevant)

    def explained(name: str, params: dict[str, Any]) -> Callable[[], tuple[Importance, float]]:
        def run() -> tuple[Importance, float]:
            start = time.perf_counter()
            imp = explain(model, task, name, **params)
            return imp, time.perf_counter() - start

        return run

    jobs = {label: explained(name, params) for label, (name, params) in zip(method_labels, merged)}
    ref_label = _add_reference(jobs, reference, inputs, names, unit, seed)
    context = {"target": target, "background": background, "y": y, "seed": seed, "batch_size": batch_size}
    context.update(progress=False, relevant=relevant)
    return _run(model, task, jobs, method_labels, specs, entries, context, progress, "benchmark", ref_label)


def compare(
    model: Any,
    data: Any,
    importances: Mapping[str, Importance],
    metrics: Sequence[str | tuple[str, Mapping[str, Any]]] | Mapping[str, Mapping[str, Any]] | None = None,
    *,
    y: Any = None,
    target: Any = None,
    relevant: Any = None,
    background: Any = None,
    seed: int = 0,
    progress: bool | None = None,
    reference: bool = True,
    batch_size: int | None = None,
) -> BenchmarkResult:
    """Like :func:`benchmark`, for importances computed earlier: ``{label: Importance}`` x metrics.

    ``seconds`` is each importance's own recorded time. Arguments as for :func:`benchmark`.
    """
    if not isinstance(importances, Mapping) or not importances:
        raise InputError("importances must be a non-empty dict {label: Importance}")
    if bad := [str(k) for k, v in importances.items() if not isinstance(v, Importance)]:
        raise InputError(f"importances {bad} are not Importance objects")
    task = _make_task(
        model, data, y=y, target=target, relevant=relevant, background=background, seed=seed, batch_size=batch_size
    )
    inputs, names, unit = task.inputs, task.names, task.unit
    specs, entries = _metric_specs(metrics, unit, relevant)
    labels = [str(k) for k in importances]
    jobs = {label: (lambda imp=imp: (imp, imp.seconds)) for label, imp in zip(labels, importances.values())}
    ref_label = _add_reference(jobs, reference, inputs, names, unit, seed)
    context = {"target": target, "background": background, "y": y, "seed": seed, "batch_size": batch_size}
    context.update(progress=False, relevant=relevant)
    return _run(model, task, jobs, labels, specs, entries, context, progress, "compare", ref_label)


def _add_reference(
    jobs: dict[str, Callable[[], tuple[Importance, float]]],
    reference: bool,
    inputs: torch.Tensor,
    names: list[str] | None,
    unit: str,
    seed: int,
) -> str | None:
    if not reference:
        return None
    label = REFERENCE if REFERENCE not in jobs else f"{REFERENCE} (reference)"

    def random_scores() -> tuple[Importance, float]:
        start = time.perf_counter()
        return _random_scores(inputs, names, unit, seed), time.perf_counter() - start

    jobs[label] = random_scores
    return label
