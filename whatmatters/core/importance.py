"""`Importance`: the one result type of every scorer in whatmatters."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from whatmatters._version import __version__
from whatmatters.core.errors import InputError
from whatmatters.core.storage import check_fields, list_column, read_parquet, write_parquet

UNITS = (
    "feature",
    "pixel",
    "token",
    "word",
    "concept",
    "weight",
    "neuron",
    "channel",
    "head",
    "layer",
    "kv",
    "example",
    "document",
    "domain",
    "expert",
)

_META_KEY = b"whatmatters"
_NONE = type(None)
# the fields of Importance.metadata() and their JSON types, as Importance.load checks them
_FIELDS: dict[str, tuple[type, ...]] = {
    "unit": (str,),
    "names": (list, _NONE),
    "per_sample": (bool,),
    "method": (str,),
    "params": (dict,),
    "target": (object,),
    "seed": (int, _NONE),
    "version": (str,),
    "seconds": (int, float, _NONE),
    "extra": (dict,),
    "shape": (list,),
    "dtype": (str,),
}
# dtypes a saved file may hold, and the NumPy dtypes of the stored values (bfloat16 is stored as float32)
_DTYPES = ("bool", "uint8", "int8", "int16", "int32", "int64", "float16", "bfloat16", "float32", "float64")
_STORED = ("bool", "uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64")


def _as_tensor(values: Any) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values.detach()
    array = np.asarray(values)
    if array.dtype == object or not np.issubdtype(array.dtype, np.number):
        raise InputError(f"importance values must be numeric, got dtype {array.dtype}")
    return torch.from_numpy(np.ascontiguousarray(array))


def jsonable(value: Any) -> Any:
    """Parameters and extras as JSON: arrays become lists, unknown objects their repr."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


@dataclass(frozen=True, eq=False)
class Importance:
    """Scores of units (features, pixels, tokens, heads, examples, ...) for one method.

    ``values`` is a tensor of shape ``(n_samples, *unit_shape)`` when ``per_sample`` is true and
    ``unit_shape`` otherwise; it stays on the device and in the dtype it was computed in.
    ``names`` name the units when ``unit_shape`` is one-dimensional (feature names, layer names, ...).
    Provenance (method, params, target, seed, version, seconds) travels with the values and
    through :meth:`save` / :meth:`load`.
    """

    values: torch.Tensor
    unit: str = "feature"
    names: tuple[str, ...] | None = None
    per_sample: bool = True
    method: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    target: Any = None
    seed: int | None = None
    version: str = __version__
    seconds: float = math.nan
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        values = _as_tensor(self.values)
        object.__setattr__(self, "values", values)
        if self.unit not in UNITS:
            raise InputError(f"unknown unit {self.unit!r}; choose one of {', '.join(UNITS)}")
        if self.per_sample and values.ndim < 1:
            raise InputError("per-sample importance needs a leading sample axis")
        if self.names is not None:
            names = tuple(str(n) for n in self.names)
            object.__setattr__(self, "names", names)
            if len(self.unit_shape) != 1 or len(names) != self.unit_shape[0]:
                raise InputError(
                    f"{len(names)} unit names given for unit shape {tuple(self.unit_shape)}; "
                    "names need a one-dimensional unit axis of the same length"
                )

    # ----------------------------------------------------------------- shape
    @property
    def unit_shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape[1:] if self.per_sample else self.values.shape)

    @property
    def n_units(self) -> int:
        return math.prod(self.unit_shape)

    @property
    def n_samples(self) -> int | None:
        return int(self.values.shape[0]) if self.per_sample else None

    def numpy(self) -> np.ndarray:
        return self.values.cpu().numpy()

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        array = self.numpy()
        return array.astype(dtype) if dtype is not None else array

    def __len__(self) -> int:
        return int(self.values.shape[0])

    def __repr__(self) -> str:
        sample = f"{self.n_samples} samples x " if self.per_sample else ""
        return (
            f"Importance(method={self.method!r}, unit={self.unit!r}, "
            f"{sample}{'x'.join(map(str, self.unit_shape)) or 'scalar'} units, seconds={self.seconds:.3g})"
        )

    def _with(self, values: torch.Tensor, **changes: Any) -> Importance:
        return replace(self, values=values, **changes)

    def _flat(self) -> torch.Tensor:
        """Values as (n_samples, n_units) (a single row when aggregated)."""
        values = self.values if self.per_sample else self.values.unsqueeze(0)
        return values.reshape(values.shape[0], -1)

    # ------------------------------------------------------------ operations
    def aggregate(self, how: Literal["mean_abs", "mean", "sum", "max_abs", "median"] = "mean_abs") -> Importance:
        """Reduce over samples to one score per unit (no-op when already aggregated)."""
        if not self.per_sample:
            return self
        v = self.values
        reducers = {
            "mean_abs": lambda: v.abs().mean(0),
            "mean": lambda: v.mean(0),
            "sum": lambda: v.sum(0),
            "max_abs": lambda: v.abs().amax(0),
            "median": lambda: v.median(0).values,
        }
        if how not in reducers:
            raise InputError(f"unknown aggregation {how!r}; choose one of {', '.join(reducers)}")
        return self._with(reducers[how](), per_sample=False, params={**self.params, "aggregate": how})

    def rank(self, by_abs: bool = True) -> torch.Tensor:
        """Rank of every unit, 0 = most important; same shape as ``values``."""
        flat = self._flat()
        key = flat.abs() if by_abs else flat
        order = key.argsort(dim=1, descending=True, stable=True)
        ranks = torch.empty_like(order)
        ranks.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order))
        return ranks.reshape(self.values.shape)

    def top(self, k: int = 10, by_abs: bool = True) -> list:
        """The ``k`` most important units: ``[(name_or_index, score), ...]``.

        Aggregated importance gives one list; per-sample importance gives one list per sample.
        """
        if k < 1:
            raise InputError(f"k must be at least 1, got {k}")
        flat = self._flat()
        k = min(k, flat.shape[1])
        key = flat.abs() if by_abs else flat
        idx = key.topk(k, dim=1).indices
        scores = flat.gather(1, idx)

        def label(i: int) -> Any:
            if self.names is not None:
                return self.names[i]
            return tuple(int(j) for j in np.unravel_index(i, self.unit_shape)) if len(self.unit_shape) > 1 else i

        rows = [
            [(label(int(i)), float(s)) for i, s in zip(ir, sr)]
            for ir, sr in zip(idx.cpu().tolist(), scores.cpu().tolist())
        ]
        return rows if self.per_sample else rows[0]

    def normalize(self, how: Literal["max_abs", "sum_abs", "minmax", "zscore"] = "max_abs") -> Importance:
        """Rescale each sample's scores (NaN-free: an all-zero row stays zero)."""
        flat = self._flat().to(torch.promote_types(self.values.dtype, torch.float32))
        eps = torch.finfo(flat.dtype).tiny
        if how == "max_abs":
            out = flat / flat.abs().amax(1, keepdim=True).clamp_min(eps)
        elif how == "sum_abs":
            out = flat / flat.abs().sum(1, keepdim=True).clamp_min(eps)
        elif how == "minmax":
            lo, hi = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
            out = (flat - lo) / (hi - lo).clamp_min(eps)
        elif how == "zscore":
            sd = flat.std(1, keepdim=True) if flat.shape[1] > 1 else torch.ones_like(flat[:, :1])
            out = (flat - flat.mean(1, keepdim=True)) / sd.clamp_min(eps)
        else:
            raise InputError(f"unknown normalization {how!r}; choose max_abs, sum_abs, minmax or zscore")
        return self._with(out.reshape(self.values.shape), params={**self.params, "normalize": how})

    def to_words(self, how: Literal["sum", "mean"] = "sum") -> Importance:
        """Token scores aggregated to words: sub-word scores summed (``how="sum"``, the default) or averaged.

        Needs a token importance with ``extra["word_ids"]`` (one word index per token, ``-1`` for special and
        padding tokens, as token attribution writes it). Values keep their leading axes: ``(n, words)`` or
        ``(n, generated, words)``, padded with 0 after a text's last word; ``extra["words"]`` holds the words.
        """
        word_ids = self.extra.get("word_ids")
        if self.unit != "token" or word_ids is None or not self.per_sample:
            raise InputError("to_words needs per-sample token scores with extra['word_ids'] (from token attribution)")
        if how not in ("sum", "mean"):
            raise InputError(f"unknown word aggregation {how!r}; choose 'sum' or 'mean'")
        ids = torch.as_tensor(word_ids, dtype=torch.long, device=self.values.device)
        if ids.shape != (self.values.shape[0], self.values.shape[-1]):
            raise InputError(f"word_ids of shape {tuple(ids.shape)} do not match values {tuple(self.values.shape)}")
        n_words = int(ids.max()) + 1 if ids.numel() else 0
        bucket = torch.where(ids >= 0, ids, n_words)  # tokens of no word go to a bucket that is dropped
        flat = self.values.reshape(self.values.shape[0], -1, self.values.shape[-1])
        index = bucket[:, None, :].expand_as(flat)
        total = torch.zeros((*flat.shape[:2], n_words + 1), dtype=flat.dtype, device=flat.device)
        total.scatter_add_(2, index, flat)
        if how == "mean":
            counts = torch.zeros_like(total).scatter_add_(2, index, torch.ones_like(flat))
            total = total / counts.clamp_min(1)
        values = total[..., :n_words].reshape(*self.values.shape[:-1], n_words)
        extra = {**self.extra, "word_aggregation": how}
        extra.pop("word_ids")
        return self._with(values, unit="word", names=None, extra=extra)

    def agreement(self, other: Importance, k: int | None = None) -> dict[str, float]:
        """Rank agreement with another importance over the same units.

        Returns Spearman and Kendall rank correlation and the top-k overlap (fraction of the
        ``k`` most important units, by absolute score, that both share; ``k`` defaults to 10 % of
        the units). Per-sample scores are compared sample by sample and averaged.
        """
        from whatmatters.core.ranks import rank_agreement

        return rank_agreement(self, other, k=k)

    # ---------------------------------------------------------------- export
    def to_frame(self):
        """A pandas DataFrame: one row per sample (or one row when aggregated), one column per unit."""
        import pandas as pd

        flat = self._flat().cpu().numpy()
        if self.names is not None:
            columns: list[Any] = list(self.names)
        elif len(self.unit_shape) > 1:
            columns = [str(ix) for ix in np.ndindex(*self.unit_shape)]
        else:
            columns = list(range(flat.shape[1]))
        frame = pd.DataFrame(flat, columns=columns)
        frame.index.name = "sample" if self.per_sample else None
        return frame

    def metadata(self) -> dict[str, Any]:
        """Everything but the values, as JSON-ready data."""
        return {
            "unit": self.unit,
            "names": list(self.names) if self.names is not None else None,
            "per_sample": self.per_sample,
            "method": self.method,
            "params": jsonable(self.params),
            "target": jsonable(self.target),
            "seed": self.seed,
            "version": self.version,
            "seconds": None if math.isnan(self.seconds) else self.seconds,
            "extra": jsonable(self.extra),
            "shape": list(self.values.shape),
            "dtype": str(self.values.dtype).removeprefix("torch."),
        }

    def save(self, path: str | Path) -> Path:
        """Write a Parquet file: one row per sample, the values as a list column, metadata as JSON.

        The write is atomic (a temporary file renamed onto ``path``: a crash never leaves a half-written
        or clobbered file) and the file holds a format version and a checksum that :meth:`load` checks.
        """
        import pyarrow as pa

        flat = self._flat().cpu()
        if flat.dtype == torch.bfloat16:  # NumPy has no bfloat16: stored as float32 (exact), loaded as bfloat16
            flat = flat.float()
        flat = flat.numpy()
        column = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])
        return write_parquet(pa.table({"values": column}), _META_KEY, self.metadata(), path)

    @classmethod
    def load(cls, path: str | Path) -> Importance:
        """Read a file written by :meth:`save`; the result equals the saved object exactly.

        A missing, damaged or foreign file raises :class:`InputError` naming the file and the problem.
        """
        return read_parquet(path, _META_KEY, "Importance.save", cls._decode)

    @classmethod
    def _decode(cls, table: Any, meta: dict[str, Any]) -> Importance:
        return cls.from_metadata(meta, list_column(table, "values").flatten().to_numpy(zero_copy_only=False))

    @classmethod
    def from_metadata(cls, meta: dict[str, Any], flat: np.ndarray) -> Importance:
        """Rebuild an importance from :meth:`metadata` and its flattened values (as :meth:`save` writes them).

        Raises :class:`InputError` when a field is missing or of the wrong type, or the values do not
        match the shape and dtype.
        """
        _check_metadata(meta)
        _check_values(meta, flat)
        values = torch.from_numpy(flat.copy()).to(getattr(torch, meta["dtype"])).reshape(meta["shape"])
        return cls(
            values=values,
            unit=meta["unit"],
            names=tuple(meta["names"]) if meta["names"] is not None else None,
            per_sample=meta["per_sample"],
            method=meta["method"],
            params=meta["params"],
            target=meta["target"],
            seed=meta["seed"],
            version=meta["version"],
            seconds=math.nan if meta["seconds"] is None else meta["seconds"],
            extra=meta["extra"],
        )

    def equals(self, other: Importance) -> bool:
        """Exact equality of values (bitwise, NaN == NaN) and of all metadata."""
        same_values = (
            self.values.shape == other.values.shape
            and self.values.dtype == other.values.dtype
            and torch.equal(torch.nan_to_num(self.values.cpu(), nan=0.0), torch.nan_to_num(other.values.cpu(), nan=0.0))
            and torch.equal(self.values.cpu().isnan(), other.values.cpu().isnan())
        )
        return same_values and self.metadata() == other.metadata()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Importance) and self.equals(other)

    __hash__ = object.__hash__

    def plot(self, ax=None, k: int = 20, **kwargs: Any):
        """A ranked bar chart of the ``k`` most important units (aggregated over samples)."""
        from whatmatters.report.plots import bar_chart

        return bar_chart(self, ax=ax, k=k, **kwargs)


def _check_metadata(meta: Any) -> None:
    """Raise :class:`InputError` unless ``meta`` has the fields of :meth:`Importance.metadata`, validly typed."""
    if not isinstance(meta, dict):
        raise InputError("its metadata is not a JSON object")
    check_fields(meta, _FIELDS)
    shape, names = meta["shape"], meta["names"]
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise InputError(f"its shape {shape} is not a list of sizes")
    if meta["dtype"] not in _DTYPES:
        raise InputError(f"its dtype {meta['dtype']!r} is not one of {', '.join(_DTYPES)}")
    if names is not None and not all(isinstance(n, str) for n in names):
        raise InputError("its unit names are not all strings")


def _check_values(meta: dict[str, Any], flat: np.ndarray) -> None:
    """Raise :class:`InputError` unless ``flat`` holds numbers, as many as ``meta["shape"]`` needs."""
    if flat.dtype.name not in _STORED:
        raise InputError(f"its values are {flat.dtype}, not one of {', '.join(_STORED)}")
    expected = math.prod(meta["shape"])
    if flat.size != expected:
        raise InputError(
            f"its metadata gives shape {meta['shape']} ({expected} values) but it holds {flat.size} values"
        )
