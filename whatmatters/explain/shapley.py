"""Shapley values of tabular features: exact, permutation sampling and a regression (KernelSHAP) estimator.

All estimators share one value function, interventional and background-averaged exactly like shap's
``maskers.Independent(background)``: ``v_x(S) = mean_b f(x_S, b_rest)`` over the background rows
``b``, ``f`` the model output at the sample's target. The background is ``task.background`` (the data
itself when none is given), subsampled to ``max_background`` rows with the task's seed when larger.

Budgets: ``max_evals`` is the number of coalition values ``v(S)`` computed per sample, the empty and
the full coalition included (each costs one pass over the background, like one of shap's
``max_evals``). When ``max_evals >= 2^d`` the sampling estimators return the exact values.

Every estimator builds all its coalitions first and sends them to the model in a few large batches;
the estimate itself is a batched linear solve.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import torch

from whatmatters.core.errors import InputError
from whatmatters.core.registry import scorer
from whatmatters.core.task import Task, progress_bar

EXACT_LIMIT = 16  # 2**16 coalitions per sample
_VARIANT_ELEMENTS = 2**19  # elements of masked inputs built per model call (cache-sized; memory bound)
_FIT_ELEMENTS = 2**23  # elements of the kernel matrices solved at once (memory bound)
_CANDIDATE_LIMIT = 20_000  # size layers up to this many coalitions are searched exhaustively by the design
_FIRST = 1e6  # first-order balance comes first: pairs only break ties


# ----------------------------------------------------------------------------------------------
# The value function


def background_rows(task: Task, max_background: int) -> torch.Tensor:
    """Background rows (the data when none is given), subsampled to ``max_background`` with the task's seed."""
    if max_background < 1:
        raise InputError(f"max_background must be a positive number of rows, got {max_background}")
    bg = task.background if task.background is not None else task.inputs
    bg = bg.to(task.inputs.dtype)
    if len(bg) > max_background:
        idx = torch.randperm(len(bg), generator=task.generator())[:max_background]
        bg = bg[idx.sort().values]
    return bg


def coalition_values(task: Task, masks: torch.Tensor, max_background: int = 100) -> torch.Tensor:
    """``v_x(S)`` for every sample ``x`` and coalition ``S``: float64, shape ``(n, m)``.

    ``masks`` is boolean, ``(m, d)`` (the same coalitions for every sample) or ``(n, m, d)``. A
    coalition's value is the model's target output averaged over the background rows, with the
    features outside the coalition taken from the background row.
    """
    bg = background_rows(task, max_background)
    n, d, nb = task.n, task.unit_shape[0], len(bg)
    shared = masks.ndim == 2
    m = masks.shape[-2]
    per_coalition = max(1, min(m, _VARIANT_ELEMENTS // (nb * d)))
    per_sample = max(1, _VARIANT_ELEMENTS // (per_coalition * nb * d))
    chunks = [
        (slice(s0, min(n, s0 + per_sample)), slice(c0, min(m, c0 + per_coalition)))
        for s0 in range(0, n, per_sample)
        for c0 in range(0, m, per_coalition)
    ]
    out = torch.empty(n, m, dtype=torch.float64)
    for rows, cols in progress_bar(chunks, len(chunks), "coalitions", task.progress):
        x = task.inputs[rows]
        sub = dataclasses.replace(task, inputs=x, target=task.target[rows], progress=False)
        mk = masks[cols][None] if shared else masks[rows, cols]
        # (samples, coalitions, background, d): the sample where the coalition holds, background elsewhere
        variants = torch.where(mk[:, :, None, :], x[:, None, None, :], bg[None, None])
        scores = sub.score(variants.reshape(len(x), -1, d), "shapley")
        out[rows, cols] = scores.reshape(len(x), -1, nb).double().mean(2).cpu()
    return out


def _empty_and_full(task: Task, max_background: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``v(empty)`` (the background's mean output) and ``v(full) = f(x)`` per sample, in two model calls."""
    bg = background_rows(task, max_background)
    size = task.rows_per_call()
    target = task.target.to(torch.long)
    mean_bg = task.model.predict(bg, batch_size=size).double().mean(0).cpu()
    fx = task.model.predict(task.inputs, batch_size=size).double().cpu()
    return mean_bg[target], fx.gather(1, target[:, None]).squeeze(1)


# ----------------------------------------------------------------------------------------------
# Exact values


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


def _exact(task: Task, max_background: int) -> tuple[torch.Tensor, dict]:
    d = task.unit_shape[0]
    masks = _all_masks(d)
    v = coalition_values(task, masks, max_background)
    return v @ shapley_weights(masks), {"base_value": v[:, 0], "evaluations": 2**d, "exact": True}


@scorer("shapley_exact", family="shapley", units="feature", aliases=("exact_shapley",))
def shapley_exact(task: Task, *, max_background: int = 100) -> tuple[torch.Tensor, dict]:
    """Exact Shapley values from all ``2^d`` coalitions (``d <= 16``).

    A coalition's value is the model output averaged over the background rows, the features outside
    the coalition taken from the background (shap's Independent masker). The background defaults to
    the data and is subsampled to ``max_background`` rows with the seed when larger.
    ``extra["base_value"]`` is ``v(empty)`` per sample; the values sum to ``f(x) - base_value``.
    """
    d = task.unit_shape[0]
    if d > EXACT_LIMIT:
        raise InputError(
            f"exact Shapley values need 2^{d} coalitions per sample; for more than {EXACT_LIMIT} features use "
            "method='kernel_shap' (most accurate per model call) or 'shapley_sampling' with a budget max_evals"
        )
    return _exact(task, max_background)


# ----------------------------------------------------------------------------------------------
# Coalition designs


def _kernel_mass(d: int, sizes: torch.Tensor) -> torch.Tensor:
    """Total Shapley-kernel weight of all coalitions of each size: (d - 1) / (s (d - s))."""
    s = sizes.double()
    return (d - 1) / (s * (d - s))


def _allocate(d: int, budget: int) -> tuple[list[int], dict[int, int]]:
    """Split ``budget`` coalitions between the size layers 1..d-1.

    Each size gets the same share (the leverage-score distribution of Musco & Witter 2024), and a
    layer and its mirror ``d - s`` are paired. Layers are enumerated from the outside in while their
    share covers them; the others get complementary pairs in proportion to their shares (largest
    remainder). Returns the enumerated sizes (``s <= d / 2``) and the number of pairs per sampled one.
    """
    strata = list(range(1, d // 2 + 1))
    share = {t: 1 if 2 * t == d else 2 for t in strata}
    cap = {t: math.comb(d, t) // (2 if 2 * t == d else 1) for t in strata}  # complementary pairs in the layer
    enumerated: list[int] = []
    while strata and budget * share[strata[0]] / sum(share[t] for t in strata) >= 2 * cap[strata[0]]:
        budget -= 2 * cap[strata[0]]
        enumerated.append(strata.pop(0))
    pairs: dict[int, int] = dict.fromkeys(strata, 0)
    left = budget // 2
    while left > 0 and strata:
        total = sum(share[t] for t in strata)
        raw = {t: left * share[t] / total for t in strata}
        give = {t: int(raw[t]) for t in strata}
        for t in sorted(strata, key=lambda t: raw[t] - give[t], reverse=True)[: left - sum(give.values())]:
            give[t] += 1
        for t in list(strata):
            take = min(give[t], cap[t] - pairs[t])
            pairs[t] += take
            left -= take
            if pairs[t] == cap[t]:
                strata.remove(t)
        if sum(give.values()) == 0:
            break
    return enumerated, {t: c for t, c in pairs.items() if c > 0}


def _layer(d: int, k: int) -> np.ndarray:
    combos = np.array(list(itertools.combinations(range(d), k)), dtype=np.int64).reshape(-1, k)
    mask = np.zeros((len(combos), d), dtype=bool)
    np.put_along_axis(mask, combos, True, axis=1)
    return mask


def _balanced_blocks(d: int, t: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` distinct coalitions of size ``t`` (their complements excluded) with balanced co-occurrence.

    Greedy: each next coalition minimizes how often its features and feature pairs were already
    chosen, so every feature and (nearly) every pair appears equally often in the layer. For
    ``t = d / 2`` a coalition and its complement count as one choice (both are evaluated).
    """
    self_paired = 2 * t == d
    if math.comb(d, t) <= _CANDIDATE_LIMIT:
        cand = _layer(d, t)
        if self_paired:
            cand = cand[cand[:, 0]]  # one of each complementary pair
        cf = cand.astype(np.float64)
        score = rng.random(len(cand)) * 1e-3  # random tie-break
        out = np.empty(count, dtype=np.int64)
        for i in range(count):
            k = int(np.argmin(score))
            out[i] = k
            for block in (cf[k], 1 - cf[k]) if self_paired else (cf[k],):
                o = cf @ block  # shared features of each candidate with the chosen coalition
                score += _FIRST * o + o * (o - 1) / 2  # added single and pair co-occurrences
            score[k] = np.inf
        return cand[out]
    # a large layer: build each coalition feature by feature
    cnt = np.zeros(d)
    pair = np.zeros((d, d))
    seen: set[bytes] = set()
    blocks, collisions = [], 0
    while len(blocks) < count:
        block = np.zeros(d, dtype=bool)
        jitter = rng.random(d) * (1e-3 if collisions < 10 else _FIRST * t)  # more randomness after collisions
        cost = _FIRST * cnt + jitter
        for _ in range(t):
            j = int(np.argmin(np.where(block, np.inf, cost)))
            block[j] = True
            cost = cost + pair[j]
        if block.tobytes() in seen or (~block).tobytes() in seen:
            collisions += 1
            continue
        seen.update((block.tobytes(), (~block).tobytes()))
        blocks.append(block)
        for b in (block, ~block) if self_paired else (block,):
            bf = b.astype(np.float64)
            cnt += bf
            pair += np.outer(bf, bf)
    return np.array(blocks)


def _stratified_design(d: int, max_evals: int, rng: np.random.Generator) -> np.ndarray:
    """Coalitions (without empty and full) for ``max_evals`` evaluations: whole outer layers, then
    complementary pairs from the inner layers, pair-balanced within each layer."""
    enumerated, pairs = _allocate(d, max_evals - 2)
    parts = []
    for t in enumerated:
        layer = _layer(d, t)
        parts.append(layer if 2 * t == d else np.concatenate([layer, ~layer]))
    for t, count in pairs.items():
        blocks = _balanced_blocks(d, t, count, rng)
        parts.append(np.concatenate([blocks, ~blocks]))
    return np.concatenate(parts) if parts else np.zeros((0, d), dtype=bool)


def _relabel(design: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """The design with its features randomly relabeled for each sample: ``(n, m, d)``.

    A relabeling keeps the design's balance; samples get independent designs at no search cost.
    """
    perm = torch.rand(n, design.shape[1], generator=generator).argsort(1)
    return design[:, perm].permute(1, 0, 2).contiguous()


# ----------------------------------------------------------------------------------------------
# Fits


def _weights(masks: torch.Tensor) -> torch.Tensor:
    """Regression weight of each coalition: its size's Shapley-kernel mass shared by the coalitions of
    that size in the design (so an enumerated layer gets the exact kernel weights); mean 1."""
    d = masks.shape[-1]
    size = masks[0].sum(1)  # every sample's design has the same sizes
    counts = torch.bincount(size, minlength=d + 1).double()
    w = _kernel_mass(d, size) / counts[size]
    return w / w.mean()


def _interaction_gammas(d: int) -> list[float]:
    """Prior scale of the interaction terms of order 1..4 of the surrogate game (penalty ``c_T^2 / gamma``).

    Orders 1 and 2 are unpenalized where the budget allows (see ``_interaction_fit``), else nearly
    so. Orders 3 and 4 are shrunk; their scale was tuned on 10 features (``benchmarks/bench_shapley.py``)
    and is divided by the number of terms of the order as ``d`` grows.
    """
    gam = [1e3, 1e3, float(math.comb(10, 3)), math.comb(10, 4) / 3]
    return [g / max(1, math.comb(d, k + 1)) if k >= 2 else g for k, g in enumerate(gam)]


def _binom(x: torch.Tensor, k: int) -> torch.Tensor:
    out = torch.ones_like(x)
    for i in range(k):
        out = out * (x - i) / (i + 1)
    return out


def _pairs(d: int) -> torch.Tensor:
    return torch.combinations(torch.arange(d), r=2).reshape(-1, 2)


def _interaction_fit(
    masks: torch.Tensor, y: torch.Tensor, v0: torch.Tensor, v1: torch.Tensor, w: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shapley values of a surrogate game fitted to the coalition values (regression adjustment).

    The surrogate is ``g(S) = v0 + sum_T c_T [T subset of S]`` over interactions ``T`` of 1..4
    features, fitted by Shapley-kernel-weighted least squares with ``g(full) = v1`` exactly. Terms
    of order 1 and 2 are unpenalized explicit features when there are at most half as many of them
    as coalitions (then every game with interactions of order <= 2 is fitted exactly, as paired
    KernelSHAP is); orders 3 and 4 are a ridge-penalized kernel part in dual form, with the kernel
    ``k(S, S') = sum_k gamma_k C(|S & S'|, k)``, so their cost depends on the number of coalitions,
    not of terms. The surrogate's Shapley values are exact (an interaction is shared equally by its
    features): ``phi_i = b_i + sum_j b_ij / 2 + sum_j alpha_j [i in S_j] c(|S_j|)``, with
    ``c(s) = sum_k gamma_k C(s - 1, k - 1) / k``. Returns ``phi`` ``(n, d)`` and the residuals
    ``v - g`` at the coalitions ``(n, m)``.
    """
    n, m, d = masks.shape
    gam = _interaction_gammas(d)
    explicit_pairs = d * (d - 1) // 2 <= (m + 1) // 2
    if explicit_pairs:
        gam[1] = 0.0
    gam[0] = 0.0  # the indicators are always explicit
    pairs = _pairs(d) if explicit_pairs else torch.zeros(0, 2, dtype=torch.long)
    z = torch.cat([masks, torch.ones(n, 1, d, dtype=torch.bool)], 1)
    feats = torch.cat([z, z[..., pairs[:, 0]] & z[..., pairs[:, 1]]], 2).double()  # (n, m + 1, p)
    zf = z.double()
    rhs = torch.cat([y - v0[:, None], (v1 - v0)[:, None]], 1)
    ridge = torch.cat([1 / w, torch.zeros(1, dtype=torch.float64)])  # no shrinkage at the full coalition
    sizes = torch.arange(d + 1, dtype=torch.float64)
    c = sum(g * _binom(sizes - 1, k) / (k + 1) for k, g in enumerate(gam))
    table = sum(g * _binom(sizes, k + 1) for k, g in enumerate(gam))  # kernel value by intersection size
    size = z[0].sum(1).long()
    phi = torch.empty(n, d, dtype=torch.float64)
    resid = torch.empty(n, m, dtype=torch.float64)
    step = max(1, _FIT_ELEMENTS // (m + 1) ** 2)
    for s0 in range(0, n, step):
        sl = slice(s0, s0 + step)
        zz, ff, rr = zf[sl], feats[sl], rhs[sl, :, None]
        zs = zz.float()  # |S & S'| <= d is exact in float32
        system = table[(zs @ zs.transpose(1, 2)).long()]  # the kernel depends on |S & S'| only
        system.diagonal(dim1=1, dim2=2).add_(ridge)
        # (K + ridge) alpha + F beta = r,  F^T alpha = 0. With K + ridge = L L^T: beta solves the small
        # normal equations of L^-1 F beta ~ L^-1 r, then alpha = L^-T (L^-1 r - L^-1 F beta).
        factor, info = torch.linalg.cholesky_ex(system)
        if bool((info != 0).any()):  # not positive definite in floating point: LU on the full system
            inv = torch.linalg.solve(system, torch.cat([ff, rr], 2))
            normal, right = ff.transpose(1, 2) @ inv[..., :-1], ff.transpose(1, 2) @ inv[..., -1:]
            beta = torch.linalg.lstsq(normal, right, driver="gelsd").solution
            alpha = (inv[..., -1:] - inv[..., :-1] @ beta).squeeze(2)
        else:
            half = torch.linalg.solve_triangular(factor, torch.cat([ff, rr], 2), upper=False)
            hf, hr = half[..., :-1], half[..., -1:]
            normal, right = hf.transpose(1, 2) @ hf, hf.transpose(1, 2) @ hr
            beta, bad = torch.linalg.solve_ex(normal, right)
            if bool((bad != 0).any()):  # pairwise terms the design cannot separate: least squares
                beta = torch.linalg.lstsq(normal, right, driver="gelsd").solution
            alpha = torch.linalg.solve_triangular(factor.mT, hr - hf @ beta, upper=True).squeeze(2)
        beta = beta.squeeze(2)
        out = beta[:, :d] + torch.einsum("nj,njd->nd", alpha * c[size], zz)
        if explicit_pairs:  # each pair's coefficient is shared by its two features
            shared = beta[:, d:] / 2
            out = out.index_add(1, pairs[:, 0], shared).index_add(1, pairs[:, 1], shared)
        phi[sl] = out
        resid[sl] = (alpha * ridge)[:, :m]  # v - g at the coalitions
    phi += ((v1 - v0) - phi.sum(1))[:, None] / d  # efficiency holds in exact arithmetic; remove round-off
    return phi, resid


def _linear_fit(
    masks: torch.Tensor, y: torch.Tensor, v0: torch.Tensor, v1: torch.Tensor, w: torch.Tensor
) -> torch.Tensor:
    """KernelSHAP: weighted least squares of ``v(S) - v0`` on the indicators, with ``sum phi = v1 - v0``."""
    n, _, d = masks.shape
    z = masks.double()
    zw = z * w[None, :, None]
    kkt = torch.zeros(n, d + 1, d + 1, dtype=torch.float64)
    kkt[:, :d, :d] = zw.transpose(1, 2) @ z
    kkt[:, :d, d] = kkt[:, d, :d] = 1
    rhs = torch.cat([(zw * (y - v0[:, None])[:, :, None]).sum(1), (v1 - v0)[:, None]], 1)
    return torch.linalg.lstsq(kkt, rhs[:, :, None]).solution[:, :d, 0]


# ----------------------------------------------------------------------------------------------
# KernelSHAP


ESTIMATORS = ("interaction", "linear")
DEFAULT_EVALS = 500  # like shap's PermutationExplainer


def _budget(max_evals: int | None, minimum: int) -> int:
    """The budget: as given, or by default 500 coalition values (more when the method needs more)."""
    if max_evals is None:
        return max(DEFAULT_EVALS, minimum)
    whole = isinstance(max_evals, (int, np.integer)) or (isinstance(max_evals, float) and max_evals.is_integer())
    if isinstance(max_evals, bool) or not whole:
        raise InputError(f"max_evals must be a whole number of coalition values per sample, got {max_evals!r}")
    return int(max_evals)


@scorer("kernel_shap", family="shapley", units="feature")
def kernel_shap(
    task: Task, *, max_evals: int | None = None, estimator: str = "interaction", max_background: int = 100
) -> tuple[torch.Tensor, dict]:
    """Shapley values from ``max_evals`` coalition values per sample by regression (KernelSHAP family).

    The most accurate estimator per model call here: in ``benchmarks/bench_shapley.py`` (10 features,
    200 evaluations, four models) 0.22-0.26x the error of shap's PermutationExplainer and 0.12-0.36x
    that of its KernelExplainer at the same number of model rows.

    Coalitions: whole size layers from the outside in while their share of the budget covers them,
    then complementary pairs ``(S, not S)`` without replacement, every size equally often (the
    leverage-score distribution of Leverage SHAP, Musco & Witter 2024), chosen so that each feature
    (and nearly each feature pair) appears equally often within a size; every sample gets its own
    random relabeling of the design. Regression weights are the Shapley kernel's mass of a size
    shared by its coalitions.

    ``estimator="interaction"`` (default) fits a surrogate game with interactions of up to four
    features (orders 1-2 unpenalized when ``max_evals`` exceeds ``d (d - 1)``, orders 3-4 by kernel
    ridge regression) and returns its exact Shapley values, a regression adjustment in the spirit of
    Witter et al. 2025. ``"linear"`` is classic KernelSHAP (Lundberg & Lee 2017), exact for games with
    interactions of order <= 2 thanks to the paired coalitions; the interaction fit is too once its
    orders 1-2 are unpenalized. Both pass through ``v(full)``, so values sum to
    ``f(x) - base_value``, and are exact when ``max_evals >= 2^d``. ``max_evals`` defaults to 500
    (at least ``2d + 2``). The interaction fit solves a ``max_evals``-sized system per sample, cheap
    next to the model calls up to a few thousand evaluations. ``extra``: ``base_value``,
    ``evaluations``, ``exact``.
    """
    if estimator not in ESTIMATORS:
        raise InputError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    d = task.unit_shape[0]
    max_evals = _budget(max_evals, 2 * d + 2)
    if max_evals >= 2**d:
        return _exact(task, max_background)
    if max_evals < 2 * d + 2:
        raise InputError(
            f"kernel_shap needs max_evals >= 2 * n_features + 2 = {2 * d + 2} coalition values per sample "
            f"for {d} features, got max_evals={max_evals}; raise max_evals"
        )
    design = torch.from_numpy(_stratified_design(d, max_evals, np.random.default_rng(task.seed)))
    masks = _relabel(design, task.n, task.generator())
    v0, v1 = _empty_and_full(task, max_background)
    y = coalition_values(task, masks, max_background)
    w = _weights(masks)
    if estimator == "interaction":
        phi, _ = _interaction_fit(masks, y, v0, v1, w)
    else:
        phi = _linear_fit(masks, y, v0, v1, w)
    extra = {"base_value": v0, "evaluations": int(masks.shape[1]) + 2, "exact": False, "estimator": estimator}
    return phi, extra


# ----------------------------------------------------------------------------------------------
# Permutation sampling


def _arc_plan(d: int, max_evals: int, blocks: bool) -> list[int]:
    """Cyclic shifts per random cycle: with ``blocks``, whole blocks of ``d`` shifts while they fit; then
    single shifts (one order and its reverse, each from its own random cycle) for the rest."""
    base, per_block, per_pair = 2 + 2 * d, d * (d - 3), 2 * (d - 3)
    full = (max_evals - base) // per_block if blocks else 0
    pairs = (max_evals - base - full * per_block) // per_pair
    return [d] * full + [1] * pairs


def _arcs(d: int, shifts: range) -> list[tuple[int, int]]:
    """Arcs (start, length) of lengths 2..d-2 that the prefixes of the given cyclic shifts and of their
    reverses visit (lengths 1 and d - 1 are singletons and their complements, shared by all blocks)."""
    arcs = {(k % d, j) for k in shifts for j in range(2, d - 1)}
    arcs |= {((k - j) % d, j) for k in shifts for j in range(2, d - 1)}
    return sorted(arcs)


def _cycle_orders(
    d: int, shifts: range, cycle: torch.Tensor, offset: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The orders of one random cycle: the given cyclic shifts and their reverses.

    Returns the masks of the arcs they visit ``(n, arcs, d)`` (values stored from ``offset`` on in
    the per-sample table ``v0, v1, singletons, complements, arcs...``), for every order the table
    index of each prefix ``(n, orders, d + 1)``, and the feature added at each step ``(n, orders, d)``.
    """
    n = len(cycle)
    arcs = _arcs(d, shifts)
    where = {a: offset + i for i, a in enumerate(arcs)}
    pos_mask = torch.zeros(len(arcs), d, dtype=torch.bool)
    for i, (a, j) in enumerate(arcs):
        pos_mask[i, [(a + r) % d for r in range(j)]] = True
    arc_masks = pos_mask[:, cycle.argsort(1)].permute(1, 0, 2)  # positions -> this sample's features
    # prefix j of shift k is the arc (k, j); of its reverse, the arc (k - j, j)
    starts = [[k if forward else (k - j) % d for j in range(d + 1)] for k in shifts for forward in (True, False)]
    steps = [
        [(k + j) % d if forward else (k - 1 - j) % d for j in range(d)] for k in shifts for forward in (True, False)
    ]
    start = torch.tensor(starts)
    length = torch.arange(d + 1).expand_as(start)
    arc_idx = torch.tensor([[where.get((a, j), 0) for j, a in enumerate(row)] for row in starts])
    single = 2 + cycle[:, start]  # arcs of length 1: the singleton of the start position's feature
    complement = 2 + d + cycle[:, (start - 1) % d]  # length d - 1: all but the position before the start
    idx = torch.where(length == 1, single, torch.where(length == d - 1, complement, arc_idx.expand(n, -1, -1)))
    idx = torch.where(length == 0, 0, torch.where(length == d, 1, idx))
    return arc_masks, idx, cycle[:, torch.tensor(steps)]


@scorer("shapley_sampling", family="shapley", units="feature", aliases=("permutation_shap",))
def shapley_sampling(
    task: Task, *, max_evals: int | None = None, control_variate: bool = True, max_background: int = 100
) -> tuple[torch.Tensor, dict]:
    """Permutation-sampling Shapley values: mean marginal contributions along random feature orders.

    Every order comes with its reverse (antithetic), and all orders share the empty, full, singleton
    and all-but-one coalitions (``2d + 2`` values), so an antithetic pair costs ``2 (d - 3)`` more.
    With ``control_variate`` (default) the marginal contributions are taken of the residual ``v - g``
    of the interaction surrogate ``g`` that ``kernel_shap`` fits to the same coalitions, and ``g``'s
    exact Shapley values are added back; the orders are then independent pairs. Without it, orders
    come in blocks: the ``d`` cyclic shifts of a random order (each feature visits every position
    once) and their reverses, which share their coalitions (arcs of the cycle), so a block of ``2d``
    orders costs ``d (d - 3)`` values: at 200 evaluations on 10 features, 44 orders where shap's
    PermutationExplainer affords 18. Both choices were the more accurate in
    ``benchmarks/bench_shapley.py``. Values sum to ``f(x) - base_value``; they are exact for games with
    interactions of order <= 2 (with the control variate once ``max_evals`` exceeds about ``d (d - 1)``)
    and, with ``max_evals >= 2^d``, for all games. ``max_evals`` (default 500,
    at least ``4d - 4``) is an upper bound; ``extra["evaluations"]`` is what was used.
    ``kernel_shap`` is more accurate at the same budget; without the control variate this is the
    classical unbiased estimator.
    """
    d = task.unit_shape[0]
    max_evals = _budget(max_evals, 4 * d - 4)
    if max_evals >= 2**d:
        return _exact(task, max_background)
    if max_evals < 4 * d - 4:
        raise InputError(
            f"shapley_sampling needs max_evals >= 4 * n_features - 4 = {4 * d - 4} coalition values per sample "
            f"for {d} features (one order, its reverse and the shared singletons), got max_evals={max_evals}; "
            "raise max_evals"
        )
    plan = _arc_plan(d, max_evals, blocks=not control_variate)
    n, gen = task.n, task.generator()
    eye = torch.eye(d, dtype=torch.bool)
    masks = [eye.expand(n, d, d), (~eye).expand(n, d, d)]
    orders_idx, orders_feat = [], []
    offset = 2 + 2 * d  # value layout per sample: v0, v1, singletons, complements, arcs of each block
    for n_shifts in plan:
        cycle = torch.rand(n, d, generator=gen).argsort(1)  # cycle[s, p]: the feature at position p
        arc_masks, idx, feat = _cycle_orders(d, range(n_shifts), cycle, offset)
        masks.append(arc_masks)
        orders_idx.append(idx)
        orders_feat.append(feat)
        offset += arc_masks.shape[1]
    masks_t = torch.cat(masks, 1)
    idx_t, feat_t = torch.cat(orders_idx, 1), torch.cat(orders_feat, 1)
    v0, v1 = _empty_and_full(task, max_background)
    y = coalition_values(task, masks_t, max_background)
    table = torch.cat([v0[:, None], v1[:, None], y], 1)
    phi = torch.zeros(n, d, dtype=torch.float64)
    if control_variate:
        phi, resid = _interaction_fit(masks_t, y, v0, v1, _weights(masks_t))
        table = torch.cat([torch.zeros(n, 2, dtype=torch.float64), resid], 1)
    chain = table.gather(1, idx_t.reshape(n, -1)).reshape(idx_t.shape)
    gains = chain[:, :, 1:] - chain[:, :, :-1]  # (n, orders, d): gain of the feature added at each step
    mc = torch.zeros(n, d, dtype=torch.float64).scatter_add_(1, feat_t.reshape(n, -1), gains.reshape(n, -1))
    phi = phi + mc / idx_t.shape[1]
    extra = {"base_value": v0, "evaluations": int(masks_t.shape[1]) + 2, "exact": False, "orders": int(idx_t.shape[1])}
    return phi, extra
