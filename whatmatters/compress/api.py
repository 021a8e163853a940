"""``whatmatters.compress.score``: which parts of a model matter, and the result type for weight scores.

Weight scores are a :class:`ModelImportance`: a read-only mapping ``layer name -> Importance``.
Every layer's :class:`~whatmatters.core.importance.Importance` has ``unit="weight"``,
``per_sample=False`` and values of shape ``(out_features, in_features)`` (also for GPT-2's ``Conv1D``,
whose weight is stored transposed: ``values[i, j]`` always scores the weight from input ``j`` to
output ``i``).

Why this shape: the layers' score matrices have different shapes, so one ``Importance`` would need
one flat vector that loses the row / column structure pruning needs (per-output-row comparison groups,
N:M groups along the input dimension), and ``Importance.extra`` is JSON metadata, not a place for
values. One full ``Importance`` per layer keeps every ``Importance`` operation (``top``, ``rank``,
``normalize``, ``agreement``, ``save``, ``plot``) available per layer; the mapping adds what spans
layers: :meth:`ModelImportance.global_top`, :meth:`~ModelImportance.to_frame` (a per-layer summary),
:meth:`~ModelImportance.layer_importance` (one score per layer as an ``Importance`` with
``unit="layer"``) and :meth:`~ModelImportance.save` / :meth:`~ModelImportance.load` (all layers in one
Parquet file, exact round trip).

Scorers of other units (channels, heads, layers) register with ``verb="compress"`` too and return a
tensor (or ``(tensor, extra)``, with ``extra["names"]`` naming the units): :func:`score` wraps it in
one ``Importance`` of the method's first unit.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from whatmatters._version import __version__
from whatmatters.compress.batches import as_batches
from whatmatters.compress.calibrate import ActivationStats, Calibration, GradientStats, LossFn
from whatmatters.compress.linear import is_transposed, select_layers, weight_matrix
from whatmatters.core.errors import InputError, MethodError, ModelError
from whatmatters.core.fractions import whole
from whatmatters.core.importance import Importance, jsonable
from whatmatters.core.params import check_params
from whatmatters.core.registry import get_method
from whatmatters.core.state import preserved
from whatmatters.core.storage import check_fields, list_column, read_parquet, string_column, write_parquet

_META_KEY = b"whatmatters.model_importance"
# the top-level metadata fields of a ModelImportance file and their JSON types, as ModelImportance.load checks them
_FIELDS: dict[str, tuple[type, ...]] = {
    "method": (str,),
    "params": (dict,),
    "seconds": (int, float, type(None)),
    "layers": (list,),
}

# Layer selection by unit for compress scorers that do not score linear weights (filled by the module registering
# them: ``channels`` for ``unit="channel"``, convolutions included); every other scorer uses ``select_layers``.
LAYER_SELECTORS: dict[str, Callable[[nn.Module, str | Sequence[str] | None], dict[str, nn.Module]]] = {}
# Scorers that read a second, general-purpose calibration set given as ``score(..., general=...)`` (D-Pruner);
# every other scorer refuses ``general=``.
GENERAL_DATA: set[str] = set()


@dataclass
class WeightTask:
    """What a compress scorer gets: the model, its selected layers and (lazy) calibration statistics."""

    model: nn.Module
    layers: dict[str, nn.Module]
    calibration: Calibration | None
    seed: int = 0
    method: str = ""
    general: Calibration | None = None

    def weights(self) -> dict[str, torch.Tensor]:
        """Each layer's weight as ``(out_features, in_features)`` (detached; a view, do not modify)."""
        return {n: weight_matrix(m).detach() for n, m in self.layers.items()}

    def _cal(self, what: str) -> Calibration:
        if self.calibration is None:
            raise InputError(
                f"{self.method} needs calibration data for {what}: pass data=texts (with tokenizer=), "
                "token id batches, or a Calibration from whatmatters.compress.calibrate(...)"
            )
        return self.calibration

    def activations(self) -> dict[str, ActivationStats]:
        cal = self._cal("input activation statistics")
        cal.need(activations=True)
        return {n: cal.activations[n] for n in self.layers}

    def gradients(self, *, squares: bool = False) -> dict[str, GradientStats]:
        """Gradient sums (and sums of squares of per-sample gradients when ``squares``)."""
        cal = self._cal("gradients")
        cal.need(gradient_sum=True, gradient_sumsq=squares)
        return {n: cal.gradients[n] for n in self.layers}

    @property
    def n_sequences(self) -> int:
        return self._cal("activation norms").n_sequences

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        return torch.Generator(device=device).manual_seed(self.seed)


class ModelImportance(Mapping[str, Importance]):
    """Weight importance of a model: one :class:`Importance` ``(out, in)`` per layer, in model order."""

    def __init__(
        self,
        layers: Mapping[str, Importance],
        *,
        method: str = "",
        params: dict[str, Any] | None = None,
        seconds: float = math.nan,
    ) -> None:
        if not layers:
            raise InputError("a ModelImportance needs at least one layer")
        for name, imp in layers.items():
            if not isinstance(imp, Importance):
                raise InputError(f"layer {name!r} maps to a {type(imp).__name__}, not an Importance")
            if imp.per_sample or len(imp.unit_shape) != 2:
                raise InputError(f"layer {name!r}: weight importance must be one (out, in) matrix per layer")
        self._layers = dict(layers)
        self.method = method
        self.params = dict(params or {})
        self.seconds = seconds

    # ------------------------------------------------------------ mapping
    def __getitem__(self, name: str) -> Importance:
        try:
            return self._layers[name]
        except KeyError:
            import difflib

            close = difflib.get_close_matches(name, list(self._layers), n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise KeyError(f"no layer {name!r} in this ModelImportance.{hint}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    @property
    def n_weights(self) -> int:
        return sum(imp.n_units for imp in self._layers.values())

    def __repr__(self) -> str:
        return (
            f"ModelImportance(method={self.method!r}, {len(self)} layers, {self.n_weights:,} weights, "
            f"seconds={self.seconds:.3g})"
        )

    # --------------------------------------------------------- operations
    def global_top(self, k: int = 10, *, largest: bool = True) -> list[tuple[str, tuple[int, int], float]]:
        """The ``k`` highest (``largest=False``: lowest) scored weights of the whole model.

        Returns ``[(layer, (out_index, in_index), score), ...]``, best first.
        """
        if k < 1:
            raise InputError(f"k must be at least 1, got {k}")
        names = list(self._layers)
        cand_scores, cand_layer, cand_index = [], [], []
        for li, name in enumerate(names):
            flat = self._layers[name].values.reshape(-1).float().cpu()
            top = flat.topk(min(k, flat.numel()), largest=largest)
            cand_scores.append(top.values)
            cand_index.append(top.indices)
            cand_layer.append(torch.full_like(top.indices, li))
        scores = torch.cat(cand_scores)
        best = scores.topk(min(k, scores.numel()), largest=largest).indices
        layer_ids, flat_ids = torch.cat(cand_layer)[best], torch.cat(cand_index)[best]
        out = []
        for li, fi, s in zip(layer_ids.tolist(), flat_ids.tolist(), scores[best].tolist()):
            cols = self._layers[names[li]].unit_shape[1]
            out.append((names[li], (fi // cols, fi % cols), s))
        return out

    def layer_importance(self, how: str = "mean") -> Importance:
        """One score per layer (``mean``, ``sum``, ``max`` or ``median`` of its weights), ``unit="layer"``."""
        reducers = {
            "mean": lambda v: v.float().mean(),
            "sum": lambda v: v.float().sum(),
            "max": lambda v: v.float().max(),
            "median": lambda v: v.float().median(),
        }
        if how not in reducers:
            raise InputError(f"unknown reduction {how!r}; choose one of {', '.join(reducers)}")
        values = torch.stack([reducers[how](imp.values).cpu() for imp in self._layers.values()])
        return Importance(
            values=values,
            unit="layer",
            names=tuple(self._layers),
            per_sample=False,
            method=self.method,
            params={**self.params, "layer_reduction": how},
            seconds=self.seconds,
        )

    def to_frame(self):
        """A pandas DataFrame with one row per layer: shape, count, mean, std, min, max, share of the total."""
        import pandas as pd

        rows = []
        for name, imp in self._layers.items():
            v = imp.values.float()
            rows.append(
                {
                    "layer": name,
                    "out_features": imp.unit_shape[0],
                    "in_features": imp.unit_shape[1],
                    "n_weights": imp.n_units,
                    "mean": float(v.mean()),
                    "std": float(v.std()) if v.numel() > 1 else 0.0,
                    "min": float(v.min()),
                    "max": float(v.max()),
                    "sum": float(v.double().sum()),
                }
            )
        frame = pd.DataFrame(rows).set_index("layer")
        total = frame["sum"].sum()
        frame["share"] = frame["sum"] / total if total else 0.0
        return frame

    # ------------------------------------------------------------ storage
    def save(self, path: str | Path) -> Path:
        """Write all layers to one Parquet file (one row per layer); :meth:`load` restores it exactly."""
        import numpy as np
        import pyarrow as pa

        path = Path(path)
        common = torch.float32
        for imp in self._layers.values():
            common = torch.promote_types(common, imp.values.dtype)
        flats = [imp.values.reshape(-1).to(common).cpu().numpy() for imp in self._layers.values()]
        offsets = np.cumsum([0, *[len(f) for f in flats]], dtype=np.int64)
        values = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate(flats)))
        table = pa.table({"layer": pa.array(list(self._layers)), "values": values})
        meta = {
            "method": self.method,
            "params": jsonable(self.params),
            "seconds": None if math.isnan(self.seconds) else self.seconds,
            "version": __version__,
            "layers": [imp.metadata() for imp in self._layers.values()],
        }
        return write_parquet(table, _META_KEY, meta, path)

    @classmethod
    def load(cls, path: str | Path) -> ModelImportance:
        """Read a file written by :meth:`save`; a missing, damaged or foreign file raises :class:`InputError`."""
        return read_parquet(path, _META_KEY, "ModelImportance.save", cls._decode)

    @classmethod
    def _decode(cls, table: Any, meta: dict[str, Any]) -> ModelImportance:
        check_fields(meta, _FIELDS)
        column = list_column(table, "values")
        names = string_column(table, "layer")
        if len(set(names)) != len(names):
            raise InputError("its 'layer' column names a layer twice")
        if not len(names) == len(meta["layers"]) == len(column):
            raise InputError(
                f"it holds {len(column)} value rows, {len(names)} layer names and metadata of "
                f"{len(meta['layers'])} layers"
            )
        layers = {
            name: Importance.from_metadata(m, column[i].values.to_numpy(zero_copy_only=False))
            for i, (name, m) in enumerate(zip(names, meta["layers"]))
        }
        seconds = math.nan if meta["seconds"] is None else meta["seconds"]
        return cls(layers, method=meta["method"], params=meta["params"], seconds=seconds)

    def equals(self, other: ModelImportance) -> bool:
        """Same layers in the same order, each an exactly equal :class:`Importance`, same provenance."""
        return (
            list(self) == list(other)
            and all(self[n].equals(other[n]) for n in self)
            and self.method == other.method
            and json.dumps(self.params, default=repr, sort_keys=True)
            == json.dumps(other.params, default=repr, sort_keys=True)
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ModelImportance) and self.equals(other)

    __hash__ = object.__hash__


def score(
    model: nn.Module,
    method: str,
    data: Any = None,
    *,
    tokenizer: Any = None,
    layers: str | Sequence[str] | None = None,
    loss: LossFn | None = None,
    batch_size: int = 8,
    max_length: int = 128,
    grad_batch_size: int = 1,
    seed: int = 0,
    progress: bool | None = None,
    general: Any = None,
    **params: Any,
) -> ModelImportance | Importance:
    """Score the parts of ``model`` with a compress ``method`` (``whatmatters.methods(verb="compress")``).

    Args:
        model: a PyTorch ``nn.Module`` (transformers models included). It is not changed: mode,
            ``requires_grad``, gradients, hooks and weights are as before, even on error.
        method: ``"magnitude"``, ``"wanda"``, ``"taylor"``, ``"fisher"``, ``"gradient_wanda"``, ...
        data: calibration data (not needed by ``magnitude``): texts (with ``tokenizer``), token id
            tensors ``(n, L)`` (see ``calibrate.lm_windows``), input tensors, dicts of model inputs, a
            DataLoader, or a :class:`Calibration` to reuse statistics across several scores.
        layers: regular expression(s) selecting layers by name; default every ``nn.Linear`` /
            ``Conv1D`` except output heads. A pattern matching nothing raises an error.
        loss: ``loss(output, inputs, labels) -> scalar`` for gradient scores; default
            :func:`~whatmatters.compress.batches.default_loss` (next-token loss for causal LMs).
        batch_size, max_length: rows per forward pass and token truncation for text data.
        grad_batch_size: rows per gradient for per-sample gradient squares (Fisher, gradient Wanda).
        general: open-domain calibration data (same forms as ``data``) for methods that weigh a domain
            against general text (``d_pruner``); ``data`` is then the domain corpus.
        **params: the method's own parameters (``whatmatters.describe(method)``).

    Returns:
        A :class:`ModelImportance` for weight scores; an :class:`Importance` for other units.
    """
    info = get_method(method)
    if info.verb != "compress":
        raise MethodError(f"{method!r} is a {info.verb} method; use whatmatters.{info.verb}(...) for it")
    params = check_params(info.name, params, info.defaults, fn=info.fn)
    if general is not None and info.name not in GENERAL_DATA:
        raise InputError(
            f"{info.name} does not use general= data; only {', '.join(sorted(GENERAL_DATA)) or 'no method'} does"
        )
    select = LAYER_SELECTORS.get(info.units[0], select_layers)
    chosen = select(model, layers)

    def calibration_of(source: Any, name: str) -> Calibration | None:
        if isinstance(source, Calibration):
            source.check_model(model, chosen if select is select_layers else ())
            return source
        if source is None:
            return None
        if (hasattr(source, "__len__") and len(source) == 0) or (isinstance(source, str) and not source.strip()):
            raise InputError(f"{name}= is empty; give texts (with tokenizer=), token ids or batches")
        size, length = whole(batch_size, "batch_size"), whole(max_length, "max_length")
        batches = as_batches(source, tokenizer, batch_size=size, max_length=length)
        per_grad = whole(grad_batch_size, "grad_batch_size")
        return Calibration(model, batches, chosen, loss=loss, grad_batch_size=per_grad, progress=progress)

    calibration = calibration_of(data, "data")
    task = WeightTask(model, chosen, calibration, seed, info.name, general=calibration_of(general, "general"))
    start = time.perf_counter()
    with preserved(model):
        out = info.fn(task, **params)
    seconds = time.perf_counter() - start
    all_params = {**info.defaults, **params}
    if isinstance(out, Importance):
        return out
    if isinstance(out, Mapping):
        return _model_importance(out, task, info.name, all_params, seconds, seed)
    return info.to_importance(out, unit=info.units[0], params=params, seed=seed, seconds=seconds)


def _model_importance(
    out: Mapping[str, torch.Tensor], task: WeightTask, method: str, params: dict[str, Any], seconds: float, seed: int
) -> ModelImportance:
    layers = {}
    for name, values in out.items():
        module = task.layers.get(name)
        if module is None:
            raise ModelError(f"scorer {method} returned scores for unknown layer {name!r}")
        expected = tuple(weight_matrix(module).shape)
        if tuple(values.shape) != expected:
            raise ModelError(f"scorer {method} returned shape {tuple(values.shape)} for {name}, expected {expected}")
        layers[name] = Importance(
            values=values.detach(),
            unit="weight",
            per_sample=False,
            method=method,
            params=params,
            seed=seed,
            seconds=seconds,
            extra={"layer": name, "module": type(module).__name__, "transposed": is_transposed(module)},
        )
    return ModelImportance(layers, method=method, params=params, seconds=seconds)
