"""Shapley values of tabular features: exact, permutation sampling and a kernel (regression) estimator.

All three share one value function, interventional and background-averaged like shap's
``maskers.Independent``: ``v_x(S) = mean_b f(x_S, b_rest)`` over background rows ``b``. Every
estimator evaluates one set of coalitions for all samples, so the whole explanation is a few
batched model calls, and the estimate itself is a matrix product or one least-squares solve.
"""

from __future__ import annotations

import torch

from whatmatters.core.errors import InputError
from whatmatters.core.registry import scorer
from whatmatters.core.task import Task

EXACT_LIMIT = 16  # 2**16 coalitions per sample
_ROWS_PER_CALL = 1_000_000  # model rows built at once (memory bound)


def _background(task: Task, max_background: int) -> torch.Tensor:
    """Background rows (the data when none is given), subsampled with the task's seed."""
    bg = task.background if task.background is not None else task.inputs
    bg = bg.to(task.inputs.dtype)
    if len(bg) > max_background:
        idx = torch.randperm(len(bg), generator=task.generator())[:max_background]
        bg = bg[idx.sort().values]
    return bg


def coalition_values(task: Task, masks: torch.Tensor, max_background: int = 100) -> torch.Tensor:
    """``v_x(S)`` for every sample ``x`` and coalition ``S`` (rows of the boolean ``masks``): shape (n, m)."""
    bg = _background(task, max_background)
    n, m, nb = task.n, len(masks), len(bg)
    per_coalition = max(1, _ROWS_PER_CALL // nb)
    out = torch.empty(n, m, dtype=torch.float64)
    for c0 in range(0, m, per_coalition):
        mk = masks[c0 : c0 + per_coalition]
        per_sample = max(1, _ROWS_PER_CALL // (len(mk) * nb))
        for s0 in range(0, n, per_sample):
            x = task.inputs[s0 : s0 + per_sample]
            # (samples, coalitions, background, d): x where the coalition holds, background elsewhere
            variants = torch.where(mk[None, :, None, :], x[:, None, None, :], bg[None, None])
            flat = variants.reshape(len(x), len(mk) * nb, -1)
            scores = task.score(flat, "shapley", target=task.target[s0 : s0 + per_sample])
            out[s0 : s0 + per_sample, c0 : c0 + len(mk)] = scores.reshape(len(x), len(mk), nb).mean(2).double().cpu()
    return out


def _all_masks(d: int) -> torch.Tensor:
    codes = torch.arange(2**d)
    return (codes[:, None] >> torch.arange(d)) & 1 == 1


def shapley_weights(masks: torch.Tensor) -> torch.Tensor:
    """Matrix ``W`` (coalitions x features) with ``phi = v @ W`` when ``masks`` are all coalitions."""
    d = masks.shape[1]
    size = masks.sum(1, dtype=torch.float64)
    log_fact = torch.lgamma(torch.arange(d + 1, dtype=torch.float64) + 1)

    def w(s: torch.Tensor) -> torch.Tensor:  # s! (d - s - 1)! / d!
        s = s.clamp(0, d - 1).long()
        return torch.exp(log_fact[s] + log_fact[d - s - 1] - log_fact[d])

    plus = w(size - 1)[:, None]  # weight of S as "S with j" (j in S)
    minus = w(size)[:, None]  # weight of S as "S without j" (j not in S)
    return torch.where(masks, plus, -minus)


@scorer("shapley_exact", family="shapley", units="feature", aliases=("exact_shapley",))
def shapley_exact(task: Task, *, max_background: int = 100) -> tuple[torch.Tensor, dict]:
    """Exact Shapley values from all ``2^d`` coalitions (``d <= 16``).

    The value of a coalition is the model output averaged over the background rows with the
    features outside the coalition taken from the background (shap's Independent masker);
    background defaults to the data, subsampled to ``max_background`` rows with the seed.
    ``extra["base_value"]`` is ``v(empty)`` per sample; values sum to ``f(x) - base_value``.
    """
    d = task.unit_shape[0]
    if d > EXACT_LIMIT:
        raise InputError(
            f"exact Shapley values need 2^{d} coalitions per sample; for more than {EXACT_LIMIT} features "
            "use method='kernel_shap' or 'shapley_sampling'"
        )
    masks = _all_masks(d)
    v = coalition_values(task, masks, max_background)
    phi = v @ shapley_weights(masks)
    return phi, {"base_value": v[:, 0]}


def _kernel_size_probs(d: int) -> torch.Tensor:
    """Probability of each coalition size 1..d-1 under the Shapley kernel, (d-1)/(s(d-s)), normalised."""
    s = torch.arange(1, d, dtype=torch.float64)
    p = (d - 1) / (s * (d - s))
    return p / p.sum()


def _kernel_weight(d: int, sizes: torch.Tensor) -> torch.Tensor:
    """Shapley kernel weight of one coalition of each size: (d - 1) / (C(d, s) s (d - s))."""
    s = sizes.double()
    return (d - 1) / (torch.exp(_log_binom(d, sizes)) * s * (d - s))


def _paired_coalitions(d: int, budget: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``budget`` distinct coalitions and their regression weights: empty, full, then pairs (S, not S).

    Sizes follow the Shapley kernel; whole size layers (smallest and largest first) are enumerated
    while they fit in the budget and weigh their kernel weight; the remaining budget is sampled
    without replacement from the other layers, which share those layers' kernel mass equally.
    """
    if budget >= 2**d:
        masks = _all_masks(d)
        return masks, torch.ones(len(masks), dtype=torch.float64)
    chosen = [torch.zeros(1, d, dtype=torch.bool), torch.ones(1, d, dtype=torch.bool)]
    left = budget - 2
    lo, hi = 1, d - 1
    while lo <= hi:  # enumerate layer pairs (lo, d - lo) while they fit
        layer = _layer(d, lo)
        both = layer if lo == hi else torch.cat([layer, ~layer])
        if len(both) > left:
            break
        chosen.append(both)
        left -= len(both)
        lo, hi = lo + 1, hi - 1
    if left >= 2 and lo <= hi:
        sizes = torch.arange(lo, hi + 1)
        probs = _kernel_size_probs(d)[sizes - 1]
        picked: dict[tuple[bool, ...], None] = {}
        draws = 0
        while len(picked) < left // 2 * 2 and draws < 50 * budget:
            k = int(sizes[torch.multinomial(probs, 1, generator=generator)])
            mask = torch.zeros(d, dtype=torch.bool)
            mask[torch.randperm(d, generator=generator)[:k]] = True
            for m in (mask, ~mask):
                picked.setdefault(tuple(m.tolist()), None)
            draws += 1
        if picked:
            chosen.append(torch.tensor(list(picked)[: left // 2 * 2]))
    masks = torch.cat(chosen)
    sizes = masks[2:].sum(1)
    weights = torch.cat([torch.ones(2, dtype=torch.float64), _kernel_weight(d, sizes)])
    sampled = (sizes >= lo) & (sizes <= hi)
    if bool(sampled.any()):
        layers = torch.arange(lo, hi + 1)
        mass = (_kernel_weight(d, layers) * torch.exp(_log_binom(d, layers))).sum()
        weights[2:][sampled] = mass / int(sampled.sum())
    return masks, weights


def _log_binom(d: int, k: torch.Tensor) -> torch.Tensor:
    k = k.double()
    return torch.lgamma(torch.tensor(d + 1.0)) - torch.lgamma(k + 1) - torch.lgamma(d - k + 1)


def _layer(d: int, k: int) -> torch.Tensor:
    combos = torch.combinations(torch.arange(d), r=k)
    mask = torch.zeros(len(combos), d, dtype=torch.bool)
    mask.scatter_(1, combos, True)
    return mask


def _design(masks: torch.Tensor, order: int) -> torch.Tensor:
    """Features of the surrogate game: indicators (order 1) and their pairwise products (order 2)."""
    z = masks.double()
    terms = [z]
    for k in range(2, order + 1):
        idx = torch.combinations(torch.arange(z.shape[1]), r=k)
        terms.append(z[:, idx].prod(-1))
    return torch.cat(terms, dim=1)


def _surrogate_shapley(coef: torch.Tensor, d: int, order: int) -> torch.Tensor:
    """Exact Shapley values of the fitted k-additive game: each interaction term is shared equally."""
    phi = coef[:d].clone()
    start = d
    for k in range(2, order + 1):
        idx = torch.combinations(torch.arange(d), r=k)
        term = coef[start : start + len(idx)]
        for col in range(k):
            phi = phi.index_add(0, idx[:, col], term / k)
        start += len(idx)
    return phi


@scorer("kernel_shap", family="shapley", units="feature")
def kernel_shap(
    task: Task, *, max_evals: int = 512, order: int = 1, max_background: int = 100
) -> tuple[torch.Tensor, dict]:
    """KernelSHAP-style regression estimate from ``max_evals`` coalition evaluations per sample.

    Coalitions: empty and full, whole small/large size layers while they fit, then complementary
    pairs sampled without replacement with sizes from the Shapley kernel (shared by all samples, so
    one weighted least-squares solve serves them all). Enumerated coalitions weigh their kernel
    weight; sampled ones share the kernel mass of the layers they come from. The fitted game is
    linear in the coalition indicators (KernelSHAP, ``order=1``) or a k-additive game (``order`` 2 or
    3, as in kADD-SHAP, Pelegrina et al. 2023) whose Shapley values are exact (each interaction
    shared equally). With paired sampling, order 2 gives the same values as order 1 and order 3
    overfits at small budgets, so 1 is the default. The fit passes exactly through ``v(full)``
    (relative to ``v(empty)``), so values always sum to ``f(x) - base_value``. With
    ``max_evals >= 2^d`` all coalitions are used and the result is exact.
    """
    d = task.unit_shape[0]
    if max_evals < 2 * d + 2 and max_evals < 2**d:
        raise InputError(f"kernel_shap needs max_evals >= 2 * n_features + 2 = {2 * d + 2}, got {max_evals}")
    if order not in (1, 2, 3):
        raise InputError(f"order must be 1, 2 or 3, got {order!r}")
    masks, weights = _paired_coalitions(d, max_evals, task.generator())
    v = coalition_values(task, masks, max_background)  # (n, m)
    if len(masks) == 2**d:
        phi = v @ shapley_weights(masks)
        return phi, {"base_value": v[:, 0], "order": 0, "evaluations": len(masks)}
    base, full = v[:, 0:1], v[:, 1:2]
    root_w = weights[2:].sqrt()[:, None]
    x = _design(masks, order)[2:] * root_w
    y = (v[:, 2:] - base).T * root_w  # (m - 2, n): the game relative to the empty coalition, weighted
    # Equality constraint g(full) = v(full) - v(empty): eliminate it by the null space of the all-ones row.
    ones = _design(torch.ones(1, d, dtype=torch.bool), order)[0]
    coef = _constrained_lstsq(x, y, ones, (full - base).T.squeeze(0))
    phi = torch.stack([_surrogate_shapley(coef[:, k], d, order) for k in range(coef.shape[1])])
    return phi, {"base_value": v[:, 0], "order": order, "evaluations": len(masks)}


def _constrained_lstsq(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Least squares ``min ||x c - y||`` subject to ``a . c = b`` (one constraint, many right-hand sides)."""
    k = int(a.abs().argmax())
    # c_k = (b - a_rest . c_rest) / a_k ; substitute into the objective.
    rest = [i for i in range(x.shape[1]) if i != k]
    xk, xr = x[:, k : k + 1], x[:, rest]
    ar = a[rest]
    x_red = xr - xk * (ar / a[k])[None, :]
    y_red = y - xk * (b / a[k])[None, :]
    sol = torch.linalg.lstsq(x_red, y_red, driver="gelsd").solution  # (p - 1, n)
    ck = (b - ar @ sol) / a[k]
    coef = torch.empty(x.shape[1], y.shape[1], dtype=x.dtype)
    coef[rest] = sol
    coef[k] = ck
    return coef


@scorer("shapley_sampling", family="shapley", units="feature", aliases=("permutation_shap",))
def shapley_sampling(task: Task, *, max_evals: int = 512, max_background: int = 100) -> tuple[torch.Tensor, dict]:
    """Permutation-sampling Shapley values with antithetic (reversed) permutations.

    Each permutation and its reverse cost ``2 (d - 1)`` coalition evaluations (empty and full are
    shared), as in shap's PermutationExplainer; a feature's value is its mean marginal contribution
    over the permutations. The same permutations serve every sample (one batched evaluation).
    """
    d = task.unit_shape[0]
    pairs = (max_evals - 2) // (2 * (d - 1)) if d > 1 else 1
    if pairs < 1:
        raise InputError(f"shapley_sampling needs max_evals >= 2 * n_features = {2 * d}, got {max_evals}")
    gen = task.generator()
    perms = torch.rand(pairs, d, generator=gen).argsort(1)
    perms = torch.cat([perms, perms.flip(1)])  # antithetic
    position = torch.empty_like(perms).scatter_(1, perms, torch.arange(d).expand_as(perms))
    # prefix masks: coalition k of permutation p holds its first k features, k = 1..d-1
    steps = torch.arange(1, d)
    prefixes = position[:, None, :] < steps[None, :, None]  # (P, d - 1, d)
    masks = torch.cat(
        [torch.zeros(1, d, dtype=torch.bool), torch.ones(1, d, dtype=torch.bool), prefixes.reshape(-1, d)]
    )
    v = coalition_values(task, masks, max_background)
    n, p = task.n, len(perms)
    chain = torch.cat([v[:, :1].expand(n, p)[:, None], v[:, 2:].reshape(n, p, d - 1).transpose(1, 2)], 1)
    chain = torch.cat([chain, v[:, 1:2].expand(n, p)[:, None]], 1)  # (n, d + 1, P): v along each chain
    gains = chain[:, 1:] - chain[:, :-1]  # (n, d, P): gain of the feature added at step k
    added = perms.T  # (d, P): feature added at step k of permutation p
    phi = torch.zeros(n, d, dtype=torch.float64)
    phi.scatter_add_(1, added.reshape(1, -1).expand(n, -1), gains.reshape(n, -1))
    return phi / p, {"base_value": v[:, 0], "evaluations": len(masks), "permutations": p}
