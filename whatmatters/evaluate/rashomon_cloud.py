"""``RashomonCloud``: the importances of a set of near-equally-good models, their rank ranges and interactions."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from whatmatters.core.errors import InputError
from whatmatters.core.importance import Importance
from whatmatters.core.ranks import ranks
from whatmatters.core.task import progress_bar
from whatmatters.evaluate.interactions import pair_interactions


@dataclass
class RashomonCloud:
    """Importance of every feature in every kept model (``importances``, one :class:`Importance` per model,
    reduced to one score per feature), and pairwise interaction strengths (``pair_strength``: models x
    ``pairs``). ``info`` holds every candidate's held-out ``losses``, the ``kept`` indices, their drawn
    ``params``, the ``tolerance``, the ``loss`` name and the ``seconds`` of each stage (fit, explain,
    interactions). Rank 1 is the most important feature; ties share
    their mean rank.
    """

    models: list[Any]
    importances: list[Importance]
    names: list[str]
    method: str
    pairs: list[tuple[int, int]] = field(default_factory=list)
    pair_strength: torch.Tensor = field(default_factory=lambda: torch.empty(0, 0, dtype=torch.float64))
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def measure(
        cls,
        models: Sequence[Any],
        data: Any,
        y: Any,
        *,
        names: list[str],
        method: str = "permutation",
        method_params: Mapping[str, Any] | None = None,
        interactions: int = 10,
        seed: int = 0,
        progress: bool | None = None,
        info: dict[str, Any] | None = None,
    ) -> RashomonCloud:
        """Score the features of every model in ``models`` on ``(data, y)`` with ``method`` (any explain
        method; per-sample scores become the mean |score| per feature) and the interactions of every pair of
        the ``interactions`` features with the highest median importance."""
        from whatmatters.explain.api import explain

        if len(models) < 2:
            raise InputError(f"a Rashomon set needs at least 2 models, got {len(models)}")
        named = {} if hasattr(data, "columns") else {"feature_names": names}
        info = dict(info or {})
        seconds = info.setdefault("seconds", {})
        start = time.perf_counter()
        importances = []
        for i, model in enumerate(progress_bar(models, len(models), f"explaining ({method})", progress)):
            imp = explain(model, data, method, y=y, seed=seed + i, **named, **dict(method_params or {}))
            importances.append(imp.aggregate("mean_abs") if imp.per_sample else imp)
        seconds["explain"] = time.perf_counter() - start
        cloud = cls(list(models), importances, list(names), method, info=info)
        top = cloud.order()[: min(interactions, len(names))]
        start = time.perf_counter()
        if len(top) >= 2:
            results = [pair_interactions(m, data, top, seed=seed + i) for i, m in enumerate(models)]
            cloud.pairs = results[0][0]
            cloud.pair_strength = torch.stack([s for _, s in results])
        seconds["interactions"] = time.perf_counter() - start
        return cloud

    # ----------------------------------------------------------------- views
    @property
    def values(self) -> torch.Tensor:
        """Importances ``(models, features)`` in float64 on the CPU."""
        return torch.stack([imp.values.reshape(-1).double().cpu() for imp in self.importances])

    def ranks(self) -> torch.Tensor:
        """Rank of every feature in every model ``(models, features)``: 1 = most important, ties share the mean."""
        return ranks(-self.values) + 1

    def order(self) -> list[int]:
        """Feature indices from the highest median importance down."""
        return torch.sort(self.values.median(0).values, descending=True, stable=True).indices.tolist()

    def _span(self, span: int | None) -> int:
        return max(3, math.ceil(0.2 * len(self.names))) if span is None else int(span)

    def _top(self, top: int | None) -> int:
        top = min(10, max(3, math.ceil(0.25 * len(self.names)))) if top is None else top
        if isinstance(top, bool) or not isinstance(top, int) or top < 1:
            raise InputError(f"top must be a positive integer, got {top!r}")
        return top

    def rank_ranges(self, top: int | None = None, span: int | None = None):
        """Per feature, sorted by median rank: median / min / max importance over the set (min and max are
        Fisher et al.'s model class reliance bounds, over the sampled set), min / median / max rank, the
        rank span, the share of models ranking it in the ``top``, and the ``unstable`` flag (see
        :meth:`unstable`). A pandas DataFrame indexed by feature name."""
        import pandas as pd

        top = self._top(top)
        v, r = self.values, self.ranks()
        spans = r.amax(0) - r.amin(0)
        frame = pd.DataFrame(
            {
                "importance_median": v.median(0).values.numpy(),
                "importance_min": v.amin(0).numpy(),
                "importance_max": v.amax(0).numpy(),
                "rank_min": r.amin(0).numpy(),
                "rank_median": r.median(0).values.numpy(),
                "rank_max": r.amax(0).numpy(),
                "rank_span": spans.numpy(),
                f"top{top}_share": (r <= top).double().mean(0).numpy(),
                "unstable": self._unstable_mask(top, span).numpy(),
            },
            index=pd.Index(self.names, name="feature"),
        )
        return frame.sort_values(["rank_median", "rank_min"], kind="stable")

    def _unstable_mask(self, top: int, span: int | None) -> torch.Tensor:
        r = self.ranks()
        return (r.amin(0) <= top) & (r.amax(0) - r.amin(0) >= self._span(span))

    def unstable(self, top: int | None = None, span: int | None = None) -> list[str]:
        """Features that some good model ranks in the ``top`` (default: a quarter of the features, 3 to 10)
        while their rank moves by at least ``span`` places across the set (default ``max(3, 20 % of the
        features)``): trust their rank less. Features outside the top in every model are never flagged
        (their order among the unimportant ones is noise by nature). Sorted by median rank."""
        frame = self.rank_ranges(top, span)
        return list(frame.index[frame["unstable"].to_numpy(bool)])

    def interactions(self):
        """Per measured pair, sorted by median: median / min / max interaction strength over the set (a
        DataFrame; see :mod:`whatmatters.evaluate.interactions` for the statistic)."""
        import pandas as pd

        s = self.pair_strength
        if not self.pairs:
            return pd.DataFrame(columns=["feature_a", "feature_b", "strength_median", "strength_min", "strength_max"])
        frame = pd.DataFrame(
            {
                "feature_a": [self.names[j] for j, _ in self.pairs],
                "feature_b": [self.names[k] for _, k in self.pairs],
                "strength_median": s.median(0).values.numpy(),
                "strength_min": s.amin(0).numpy(),
                "strength_max": s.amax(0).numpy(),
            }
        )
        return frame.sort_values("strength_median", ascending=False, kind="stable").reset_index(drop=True)

    def median_importance(self) -> Importance:
        """The median importance over the set, as one :class:`Importance` (for reports and comparisons)."""
        first = self.importances[0]
        return Importance(
            self.values.median(0).values,
            unit=first.unit,
            names=tuple(self.names),
            per_sample=False,
            method=f"{self.method} (median over {len(self.importances)} models)",
            params=dict(first.params),
            extra={"rashomon_models": len(self.importances)},
        )

    def plot(self, ax: Any = None, k: int = 20):
        """The cloud: every kept model's importance of the ``k`` features with the highest median (dots),
        their range and quartiles; unstable features' names in red. Returns the axes."""
        from whatmatters.report.rashomon import cloud_plot

        return cloud_plot(self, ax=ax, k=k)

    def __repr__(self) -> str:
        losses = self.info.get("losses")
        where = f" of {len(losses)} candidates" if losses is not None else ""
        return (
            f"RashomonCloud(method={self.method!r}, {len(self.models)} models{where}, {len(self.names)} features, "
            f"{len(self.pairs)} pairs, unstable={self.unstable()})"
        )
