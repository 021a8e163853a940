"""GradientSHAP (expected gradients with noise): gradients at random points between background rows and noisy inputs.

For each sample ``x`` and draw ``j``: a background row ``b_j``, a noisy copy ``x_j = x + noise`` and a
position ``a_j ~ U(0, 1)``; the attribution is the mean over draws of ``(x_j - b_j) * grad f(b_j + a_j (x_j - b_j))``
(captum's ``GradientShap``, which draws the same three things). Draws, from one generator seeded by ``seed``,
in this order: background indices ``randint(len(background), (n, n_samples))``, positions
``rand(n, n_samples)``, noise ``randn(n, n_samples, *shape)`` times the standard deviation.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from whatmatters.core.adapters import row_slices
from whatmatters.core.errors import MethodError
from whatmatters.core.registry import scorer
from whatmatters.core.task import Task, progress_bar
from whatmatters.explain.gradient import GRADIENT_UNITS, _noise_sigma, input_gradients, rows_per_call
from whatmatters.explain.shapley import background_rows


def expected_gradients(task: Task, noisy: torch.Tensor, baselines: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """Mean over draws of ``(noisy - baseline) * gradient`` at ``baseline + alpha (noisy - baseline)``.

    ``noisy`` and ``baselines`` are ``(n, m, *shape)``, ``alphas`` ``(n, m)``; rows go through the model in
    batches (``batch_size``, else about ``ROW_ELEMENTS`` values per call).
    """
    model = task.torch_model
    n, m, shape = noisy.shape[0], noisy.shape[1], noisy.shape[2:]
    rows = rows_per_call(task, int(np.prod(shape)))
    flat_x, flat_b = noisy.reshape(n * m, *shape), baselines.reshape(n * m, *shape)
    flat_a = alphas.reshape(n * m, *(1,) * len(shape))
    targets = task.target.repeat_interleave(m)
    total = torch.empty((n * m, *shape), dtype=model.dtype, device=model.device)
    chunks = row_slices(n * m, rows)
    for s in progress_bar(chunks, len(chunks), "gradient shap", task.progress):
        x, b = model.to_model(flat_x[s]), model.to_model(flat_b[s])
        a = flat_a[s].to(model.device, model.dtype)
        total[s] = (x - b) * input_gradients(task, b + a * (x - b), targets[s])
    return total.view(n, m, *shape).mean(1)


@scorer("gradient_shap", family="gradient", units=GRADIENT_UNITS, needs="gradients", aliases=("gradientshap",))
def gradient_shap(
    task: Task, *, n_samples: int = 50, noise: float = 0.0, max_background: int = 100
) -> tuple[torch.Tensor, dict[str, Any]]:
    """GradientSHAP: expected gradients between background rows and noisy inputs, times their difference.

    Args:
        n_samples: draws per sample (background row, position on the path, noise).
        noise: Gaussian noise standard deviation as a fraction of the input range, as for ``smoothgrad``
            (0: none, captum's default ``stdevs=0``).
        max_background: at most this many background rows (the data when no background is given).
    """
    if not isinstance(n_samples, int) or isinstance(n_samples, bool) or n_samples < 1:
        raise MethodError(f"n_samples must be a positive integer, got {n_samples!r}")
    if not isinstance(max_background, int) or isinstance(max_background, bool):
        raise MethodError(f"max_background must be a positive integer, got {max_background!r}")
    sigma = _noise_sigma(task, noise)
    bg = background_rows(task, max_background)
    n, shape = task.n, task.unit_shape
    generator = task.generator()
    index = torch.randint(len(bg), (n, n_samples), generator=generator)
    alphas = torch.rand((n, n_samples), generator=generator, dtype=torch.float64)
    draws = torch.randn((n, n_samples, *shape), generator=generator, dtype=torch.float64)
    spread = sigma.unsqueeze(1) if task.inputs.ndim > 2 else sigma.view(1, 1, -1)
    noisy = task.inputs.unsqueeze(1).double() + draws * spread
    values = expected_gradients(task, noisy.to(task.inputs.dtype), bg[index], alphas)
    return values, {"sigma": sigma.flatten().numpy()}
