"""TabEBM-style augmentation: one energy-based model per class, sampled with SGLD (Margeloiu et al., NeurIPS 2024).

For every class ``c`` a small torch MLP is trained on a surrogate binary task: the class's rows (standardised)
against surrogate negatives placed at random corners of a hypercube ``[-alpha, alpha]^d`` far from the data.
Its class probability defines the energy ``E_c(x) = -log p(c | x) = softplus(f_neg(x) - f_pos(x))``;
stochastic gradient Langevin dynamics ``x <- x - step_size * grad E_c(x) + noise * N(0, I)`` started from the
class's real rows gives new rows.

Where this differs from the paper: the paper's binary classifier is TabPFN (no training; its weights cannot be
downloaded here) and its energy is ``-logsumexp`` of TabPFN's logits. A trained MLP's logits are defined only
up to a shift shared by both classes, and its log-odds grow without bound away from the negatives (chains
drift off the data), so we use the shift-free, bounded ``-log p(c | x)``: flat where the class is certain.

DataFrames come back as DataFrames with the input's dtypes: integer columns are rounded and clipped to their
observed range, boolean and categorical (object / category) columns are sampled as one-hot blocks and decoded
by their largest coordinate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from whatmatters.core.errors import InputError, MethodError
from whatmatters.core.fractions import whole


@dataclass
class _Column:
    name: Any
    kind: str  # "float", "int", "bool" or "category"
    dtype: Any
    categories: list[Any] | None = None
    low: float = 0.0
    high: float = 0.0


class _Encoder:
    """Table <-> float matrix: numbers as they are, booleans and categories one-hot."""

    def __init__(self, data: Any) -> None:
        import pandas as pd

        self.frame = isinstance(data, pd.DataFrame)
        frame = data if self.frame else pd.DataFrame(np.asarray(data))
        if frame.shape[0] == 0 or frame.shape[1] == 0:
            raise InputError(f"data is empty (shape {frame.shape}); pass rows with at least one column")
        self.columns = []
        for name, series in frame.items():
            kind = self._kind(series)
            categories = list(pd.unique(series)) if kind in ("bool", "category") else None
            if kind == "category" and isinstance(series.dtype, pd.CategoricalDtype):
                categories = list(series.cat.categories)
            low, high = (float(series.min()), float(series.max())) if kind in ("float", "int") else (0.0, 0.0)
            self.columns.append(_Column(name, kind, series.dtype, categories, low, high))
        if frame.isna().to_numpy().any():
            raise InputError("data contains missing values; impute or drop them before augmenting")

    @staticmethod
    def _kind(series: Any) -> str:
        from pandas.api.types import is_bool_dtype, is_float_dtype, is_integer_dtype

        if is_bool_dtype(series.dtype):
            return "bool"
        if is_integer_dtype(series.dtype):
            return "int"
        if is_float_dtype(series.dtype):
            return "float"
        return "category"

    def encode(self, data: Any) -> torch.Tensor:
        import pandas as pd

        frame = data if isinstance(data, pd.DataFrame) else pd.DataFrame(np.asarray(data))
        blocks = []
        for col, (_, series) in zip(self.columns, frame.items()):
            if col.categories is None:
                blocks.append(series.to_numpy(dtype=np.float64)[:, None])
            else:
                values = series.to_numpy()
                blocks.append(np.stack([values == c for c in col.categories], 1).astype(np.float64))
        matrix = torch.from_numpy(np.concatenate(blocks, 1))
        if not bool(matrix.isfinite().all()):
            raise InputError("data contains NaN or infinite values; impute or drop them before augmenting")
        return matrix

    def decode(self, matrix: torch.Tensor) -> Any:
        import pandas as pd

        out, at = {}, 0
        values = matrix.cpu().numpy()
        for col in self.columns:
            width = 1 if col.categories is None else len(col.categories)
            block = values[:, at : at + width]
            at += width
            if col.kind == "float":
                out[col.name] = block[:, 0].astype(col.dtype)
            elif col.kind == "int":
                out[col.name] = np.clip(np.rint(block[:, 0]), col.low, col.high).astype(col.dtype)
            else:
                picked = np.asarray(col.categories, dtype=object)[block.argmax(1)]
                out[col.name] = pd.Series(picked).astype(col.dtype)
        frame = pd.DataFrame(out)
        return frame if self.frame else frame.to_numpy()


def _classifier(d: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 2))


class TabEBM:
    """Class-specific energy-based models of a table; :meth:`sample` draws new rows of every class.

    Args:
        alpha: distance of the surrogate negatives from the centre, in standard deviations (hypercube corners).
        negatives: surrogate negatives per class (default: as many as the class has rows, at least 32).
        hidden, epochs, lr, weight_decay: the class classifiers (full-batch Adam on a balanced loss).
        seed: seeds the negatives, the classifiers and the sampler.
    """

    def __init__(
        self,
        *,
        alpha: float = 5.0,
        negatives: int | None = None,
        hidden: int = 64,
        epochs: int = 300,
        lr: float = 1e-2,
        weight_decay: float = 1e-3,
        seed: int = 0,
    ) -> None:
        self.alpha, self.negatives, self.hidden = alpha, negatives, whole(hidden, "hidden")
        self.epochs, self.lr, self.weight_decay, self.seed = whole(epochs, "epochs"), lr, weight_decay, seed
        self.models: dict[Any, nn.Module] = {}

    def fit(self, data: Any, y: Any) -> TabEBM:
        """Train one energy model per class of ``y`` on the rows of ``data`` (array or DataFrame)."""
        self.encoder = _Encoder(data)
        x = self.encoder.encode(data).float()
        labels = np.asarray(y.to_numpy() if hasattr(y, "to_numpy") else y)
        if labels.ndim != 1 or len(labels) != len(x):
            raise InputError(f"y has shape {labels.shape} but data has {len(x)} rows; give one label per row")
        self.mean, self.std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
        z = (x - self.mean) / self.std
        self.classes, self.rows = np.unique(labels), {}
        gen = torch.Generator().manual_seed(self.seed)
        for c in self.classes:
            pos = z[torch.from_numpy(labels == c)]
            self.rows[c] = pos
            self.models[c] = self._fit_class(pos, gen)
        return self

    def _fit_class(self, pos: torch.Tensor, gen: torch.Generator) -> nn.Module:
        count = self.negatives or max(32, len(pos))
        neg = (torch.randint(0, 2, (count, pos.shape[1]), generator=gen).float() * 2 - 1) * self.alpha
        x = torch.cat([pos, neg])
        target = torch.cat([torch.ones(len(pos)), torch.zeros(count)]).long()
        balance = torch.tensor([len(x) / (2 * count), len(x) / (2 * len(pos))])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
            model = _classifier(x.shape[1], self.hidden)
        opt = torch.optim.Adam(model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        loss_fn = nn.CrossEntropyLoss(weight=balance)
        for _ in range(self.epochs):
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), target).backward()
            opt.step()
        return model.eval().requires_grad_(False)

    def energy(self, z: torch.Tensor, label: Any) -> torch.Tensor:
        """``E_c(z) = -log p(c | z) = softplus(f_neg - f_pos)`` of standardised rows ``z`` for class ``label``."""
        logits = self.models[label](z)
        return nn.functional.softplus(logits[:, 0] - logits[:, 1])

    def sample(
        self, n_per_class: int | dict[Any, int] | None = None, *, steps: int = 200, step_size: float = 0.1,
        noise: float = 0.01, start_noise: float = 0.01,
    ) -> tuple[Any, np.ndarray]:  # fmt: skip
        """New rows (same type and dtypes as the training data) and their labels, by SGLD per class.

        ``n_per_class``: rows per class (int, or a dict class -> count; default: as many as the class has).
        Chains start at random real rows of the class plus ``start_noise`` Gaussian noise.
        """
        if not self.models:
            raise InputError("TabEBM is not fitted; call fit(data, y) first")
        gen = torch.Generator().manual_seed(self.seed + 1)
        xs, ys = [], []
        for c in self.classes:
            count = n_per_class.get(c, 0) if isinstance(n_per_class, dict) else n_per_class
            count = len(self.rows[c]) if count is None else whole(count, "n_per_class", minimum=0)
            if count == 0:
                continue
            start = self.rows[c][torch.randint(len(self.rows[c]), (count,), generator=gen)]
            z = start + start_noise * torch.randn(start.shape, generator=gen)
            for _ in range(whole(steps, "steps")):
                z = z.detach().requires_grad_(True)
                (grad,) = torch.autograd.grad(self.energy(z, c).sum(), z)
                z = z - step_size * grad + noise * torch.randn(z.shape, generator=gen)
            xs.append(z.detach() * self.std + self.mean)
            ys.append(np.repeat(c, count))
        if not xs:
            raise InputError("n_per_class asks for no rows; ask for at least one")
        return self.encoder.decode(torch.cat(xs).double()), np.concatenate(ys)


def augment(data: Any, y: Any, n_per_class: int | dict[Any, int] | None = None, **options: Any) -> tuple[Any, Any]:
    """Synthetic rows for ``data`` with labels ``y`` from :class:`TabEBM` (concatenate them with yours).

    ``options`` go to :class:`TabEBM` (``alpha``, ``epochs``, ``seed``, ...) and to :meth:`TabEBM.sample`
    (``steps``, ``step_size``, ``noise``).
    """
    import inspect

    sample_keys = ("steps", "step_size", "noise", "start_noise")
    known = set(inspect.signature(TabEBM).parameters) | set(sample_keys)
    unknown = sorted(set(options) - known)
    if unknown:
        raise MethodError(f"augment got unknown option(s) {unknown}; it accepts {sorted(known)}")
    sampling = {k: options.pop(k) for k in sample_keys if k in options}
    return TabEBM(**options).fit(data, y).sample(n_per_class, **sampling)
