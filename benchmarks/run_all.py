"""One benchmark run for the README's ratio tables: every side-by-side benchmark whose reference is installed.

    python -m benchmarks.run_all [--quick] [--repeats 5] [--threads 1] [--out benchmarks/results.json]
    python -m benchmarks.run_all --quick --only lrp,gradient    # writes benchmarks/results.partial.json
    python -m benchmarks.readme_tables        # rewrite the README's tables from results.json

Each anchor times whatmatters and its reference (captum, scikit-learn, zennit, the full KV cache, the
minimal torch work) alternately in one process: one warm-up call each, then ``--repeats`` rounds; the ratio
is the median of the per-round ratios, the spread their minimum and maximum. CPU time of the process
(``time.process_time``: other processes' load on a shared machine does not count), except wall time for
permutation importance (scikit-learn's ``n_jobs=2`` runs in worker processes); ``--threads``
torch threads.
An anchor whose reference is not installed is recorded as skipped with the reason. ``results.json`` names
the machine, CPU count, load average and library versions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from importlib import metadata, util
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))  # the benchmark scripts import each other by module name

import whatmatters as wm  # noqa: E402

RESULTS = HERE / "results.json"
PARTIAL = RESULTS.with_name("results.partial.json")
LIBRARIES = ("torch", "numpy", "scikit-learn", "captum", "shap", "zennit", "transformers", "kvpress", "grad-cam")


class Skipped(Exception):
    """An anchor that cannot run here (its reference is not installed); the message says why."""


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def timed(
    fns: list[Callable[[], Any]], repeats: int, *, wall: bool = False, min_seconds: float = 1.0
) -> list[list[float]]:
    """Times of each function over interleaved rounds (after one warm-up call each): at least ``repeats``
    rounds, more (up to 50) until ``min_seconds`` have passed. CPU time of this process by default (all its
    threads; on a shared machine other processes' load does not count), wall time with ``wall``."""
    clock = time.perf_counter if wall else time.process_time
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    spent = 0.0
    while len(times[0]) < repeats or (spent < min_seconds and len(times[0]) < 50):
        for fn, out in zip(fns, times, strict=True):
            start = clock()
            fn()
            out.append(clock() - start)
            spent += out[-1]
    return times


def ratio_row(case: str, ours: list[float], ref: list[float], **extra: Any) -> dict[str, Any]:
    """Medians in ms and the median, min and max of the per-round ratios ours / reference."""
    ratios = [a / b for a, b in zip(ours, ref, strict=True)]
    return {
        "case": case,
        "ours_ms": round(1e3 * statistics.median(ours), 3),
        "ref_ms": round(1e3 * statistics.median(ref), 3),
        "ratio": round(statistics.median(ratios), 3),
        "low": round(min(ratios), 3),
        "high": round(max(ratios), 3),
        **extra,
    }


def _need(module: str, why: str) -> None:
    if util.find_spec(module) is None:
        raise Skipped(f"{module} is not installed ({why})")


def gradient(args: argparse.Namespace) -> dict[str, Any]:
    """Saliency, gradient x input and integrated gradients vs captum (``bench_gradient.py``'s models)."""
    _need("captum", "pip install captum")
    import bench_gradient

    rows = []
    steps = 16 if args.quick else 50
    for name, (model, x) in bench_gradient.models().items():
        target = model(x).argmax(1)
        runners = bench_gradient.runners(model, x, target, steps, 1024)
        for label in ("saliency", "gradient_x_input", "ig defaults"):
            ours, ref = timed(list(runners[label]), args.repeats)
            rows.append(ratio_row(f"{name}: {label.replace('ig defaults', f'integrated gradients, {steps} steps')}",
                                  ours, ref))  # fmt: skip
    return {"reference": f"captum {_version('captum')}", "goal": "saliency <= 1.0, IG <= 0.5", "rows": rows}


def permutation(args: argparse.Namespace) -> dict[str, Any]:
    """Permutation importance vs scikit-learn's ``permutation_importance`` (n_jobs None and 2)."""
    from sklearn.datasets import make_classification
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.inspection import permutation_importance

    n, d, reps = (2000 if args.quick else 5000), 30, 10
    x, y = make_classification(n_samples=n, n_features=d, n_informative=8, random_state=0)
    model = HistGradientBoostingClassifier(random_state=0, max_iter=50).fit(x, y)

    from threadpoolctl import threadpool_limits

    def ours(threads: int | None = None) -> Callable[[], Any]:
        def run() -> Any:
            with threadpool_limits(threads, user_api="openmp"):  # None: as set (--threads)
                return wm.explain(model, x, "permutation", y=y, n_repeats=reps, seed=0)

        return run

    def sk(jobs: int | None) -> Callable[[], Any]:
        return lambda: permutation_importance(model, x, y, n_repeats=reps, random_state=0, n_jobs=jobs)

    # n_jobs=2: two worker processes; ours then gets the same two cores as two OpenMP threads of the trees
    t_ours, t_ours2, t_sk, t_sk2 = timed([ours(), ours(2), sk(None), sk(2)], args.repeats, wall=True)
    case = f"HistGradientBoosting, n={n}, d={d}, {reps} repeats"
    rows = [
        ratio_row(f"{case}, sklearn n_jobs=None", t_ours, t_sk),
        ratio_row(f"{case}, sklearn n_jobs=2 (ours: 2 OpenMP threads)", t_ours2, t_sk2),
    ]
    return {"reference": f"scikit-learn {_version('scikit-learn')}", "goal": "<= 0.5", "rows": rows}


def lrp(args: argparse.Namespace) -> dict[str, Any]:
    """LRP vs zennit (``bench_lrp.py``'s BatchNorm ShapesCNN, both canonizing every call), and vs forward+backward."""
    import make_lrp_goldens as goldens

    if not goldens.zennit_available():
        raise Skipped("zennit is not installed (pip install --no-deps zennit==0.5.1)")
    from whatmatters.explain._lrp import lrp as run_lrp
    from whatmatters.vision.nets import ShapesCNN

    torch.manual_seed(0)
    model = goldens.randomize_batchnorm(ShapesCNN(n_classes=5, width=16))
    x = torch.randn(16, 3, 32, 32).clamp(goldens.LOW, goldens.HIGH)
    targets = torch.randint(0, 5, (16,))

    def fwd_bwd() -> None:
        leaf = x.clone().requires_grad_(True)
        torch.autograd.grad(model(leaf).gather(1, targets[:, None]).sum(), leaf)

    rows = []
    for name in ("epsilon", "epsilon_plus", "epsilon_gamma_box", "epsilon_alpha2_beta1"):
        ours, ref, base = timed(
            [
                lambda name=name: run_lrp(model, x, targets, name, low=goldens.LOW, high=goldens.HIGH),
                lambda name=name: goldens.zennit_relevance(model, x, targets, name),
                fwd_bwd,
            ],
            args.repeats,
        )
        fb = ratio_row("", ours, base)
        rows.append(ratio_row(f"ShapesCNN 16x32px: {name}", ours, ref, x_forward_backward=fb["ratio"]))
    return {"reference": f"zennit {_version('zennit')}", "goal": "<= 0.5 (and <= 1.5x forward+backward)", "rows": rows}


def occlusion(args: argparse.Namespace) -> dict[str, Any]:
    """Occlusion vs captum's ``Occlusion`` (same rows per model call)."""
    _need("captum", "pip install captum")
    from captum.attr import Occlusion

    from whatmatters.vision.nets import ShapesCNN
    from whatmatters.vision.shapes import make_shapes

    n, win, stride = (8, 8, 4) if args.quick else (16, 4, 2)
    torch.manual_seed(0)
    x, _, _ = make_shapes(n, 32, seed=5)
    model = ShapesCNN().eval()
    with torch.no_grad():
        target = model(x).argmax(1)

    def ours() -> Any:
        return wm.explain(model, x, "occlusion", target=target, window=win, stride=stride, batch_size=256)

    def ref() -> Any:
        return Occlusion(model).attribute(
            x, sliding_window_shapes=(3, win, win), strides=(3, stride, stride), target=target, baselines=0.0,
            perturbations_per_eval=256 // len(x),
        )  # fmt: skip

    t_ours, t_ref = timed([ours, ref], args.repeats)
    rows = [ratio_row(f"ShapesCNN {n}x32px, window {win}, stride {stride}, 256 rows per call", t_ours, t_ref)]
    return {"reference": f"captum {_version('captum')}", "goal": "<= 1.0", "rows": rows}


def kv_eviction(args: argparse.Namespace) -> dict[str, Any]:
    """KV eviction: ms each press adds per decoded token (a round's median token) and to the prefill against
    the full cache, ours and kvpress's in the same rounds (tiny random Llama; kvpress's hook adapted to today's
    transformers by ``bench_kvcache._press``, its kept positions checked identical there). ``sink_recent`` runs at the
    prefill only (``decoding=False``, as StreamingLLMPress); its rolling window has a row of its own."""
    import bench_kvcache as kv

    from whatmatters.compress.kvcache import evicting_kv
    from whatmatters.core import hf

    have_kvpress = util.find_spec("kvpress") is not None
    small = kv._tiny_llama(hidden=256, layers=4, heads=8, kv_heads=2)
    micro = kv._tiny_llama(hidden=32, layers=4, heads=4, kv_heads=2)  # hooks dominate: a press's fixed cost
    n_new = 64 if args.quick else 128

    def run(model: nn.Module, seq: int, ctx: Callable[[], Any]) -> tuple[float, float]:
        """The prefill's time and the median time of one decoded token (a token's time is a sum of ~5 % of
        hook work and the model's own: the median of a round's tokens leaves out the rare stalled one)."""
        ids = torch.randint(0, 1000, (1, seq), generator=torch.Generator().manual_seed(1))
        steps = []
        with ctx(), torch.no_grad():
            start = time.process_time()
            cache, logits = kv._prefill(model, ids)
            prefill = time.process_time() - start
            tok = logits[:, -1:].argmax(-1)
            for t in range(n_new):
                start = time.process_time()
                p = torch.tensor([seq + t])
                logits = model(tok, **hf.cache_kwargs(model, cache), use_cache=True, position_ids=p[None],
                               cache_position=p).logits  # fmt: skip
                tok = logits[:, -1:].argmax(-1)
                steps.append(time.process_time() - start)
        return prefill, statistics.median(steps)

    def added(times: list[tuple[float, float]], base: list[tuple[float, float]], part: int) -> list[float]:
        return [1e3 * (t[part] - b[part]) for t, b in zip(times, base, strict=True)]

    seq = 128 if args.quick else 512
    cases: list[tuple[str, nn.Module, int, str, dict[str, Any], bool]] = [
        ("hidden 256", small, seq, "snapkv", {"window_size": 32}, True),
        ("hidden 256", small, seq, "sink_recent", {"decoding": False}, True),
        ("hidden 256", small, seq, "knorm", {}, True),
        ("hidden 256", small, seq, "sink_recent", {"decoding": True}, False),  # rolling: kvpress has no counterpart
        ("hidden 32", micro, 64, "knorm", {}, True),
        ("hidden 32", micro, 64, "snapkv", {"window_size": 32}, True),
    ]
    rows = []
    for label, model, length, policy, params, paired in cases:
        ctxs = {"full": nullcontext, "ours": lambda m=model, p=policy, q=params: evicting_kv(m, p, 0.5, **q)}
        if paired and have_kvpress:
            ctxs["kvpress"] = lambda m=model, p=policy: kv._press(p, 0.5, 32)(m)
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in ctxs}
        for ctx in ctxs.values():
            run(model, length, ctx)  # warm-up
        for _ in range(max(args.repeats, 25)):  # a press adds ~5 % to a token: more rounds than elsewhere
            for name, ctx in ctxs.items():
                times[name].append(run(model, length, ctx))
        base = times["full"]
        where = "rolling window" if params.get("decoding") else "prefill only"
        row: dict[str, Any] = {
            "case": f"{policy} ({where}), {label}, 50 % kept, {length} prompt + {n_new} decoded tokens",
            "full_cache_ms_per_token": round(1e3 * statistics.median(b[1] for b in base), 3),
            "full_cache_prefill_ms": round(1e3 * statistics.median(b[0] for b in base), 2),
        }
        for name in ("ours", "kvpress"):
            if name not in times:
                continue
            dec = added(times[name], base, 1)
            key = "added_ms_per_token" if name == "ours" else "kvpress_added_ms_per_token"
            row[key] = round(statistics.median(dec), 3)
            row[f"{key}_low"], row[f"{key}_high"] = round(min(dec), 3), round(max(dec), 3)
            row[key.replace("ms_per_token", "prefill_ms")] = round(statistics.median(added(times[name], base, 0)), 2)
        rows.append(row)
    note = "kvpress is not installed here: ours against the full cache only" if not have_kvpress else ""
    reference = f"kvpress {_version('kvpress')} and the full cache" if have_kvpress else "the full cache"
    return {"reference": reference, "goal": "added ms per token <= kvpress's", "note": note, "rows": rows}


def overhead(args: argparse.Namespace) -> dict[str, Any]:
    """``wm.explain`` vs the minimal torch work of each method (``bench_overhead.py``'s cases)."""
    import bench_overhead

    rows = []
    for label, model, x, method, params, minimal in bench_overhead.cases(args.quick):

        def ours(model=model, x=x, method=method, params=params) -> Any:
            return wm.explain(model, x, method, target=bench_overhead.TARGET, **params)

        t_ours, t_min = timed([ours, minimal], args.repeats)
        rows.append(ratio_row(f"{label}: {method}", t_ours, t_min))
    return {"reference": "the minimal torch work (written by hand)", "goal": "<= 1.1", "rows": rows}


def grad_cam(args: argparse.Namespace) -> dict[str, Any]:
    _need("pytorch_grad_cam", "pip install grad-cam; bench_cam.py runs the comparison")
    raise Skipped("pytorch-grad-cam is installed: run bench_cam.py (not yet part of run_all)")


ANCHORS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "gradient": gradient,
    "permutation": permutation,
    "lrp": lrp,
    "occlusion": occlusion,
    "kv_eviction": kv_eviction,
    "overhead": overhead,
    "grad_cam": grad_cam,
}
NOT_RUN = {
    "shap": "bench_shapley.py compares estimation error at equal budgets (not a speed ratio); run it on its own",
    "data-selection": "bench_dsir.py runs DSIR at corpus scale (minutes); run it on its own",
}


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller cases (under ~10 min on 2 cores)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", default=None, help="comma-separated anchors (default: all)")
    parser.add_argument("--note", default="", help="free text about the machine (e.g. shared, loaded)")
    parser.add_argument("--out", type=Path, default=None, help=f"default {RESULTS} ({PARTIAL.name} with --only)")
    args = parser.parse_args(argv)
    if args.out is None:  # a partial run never replaces the full run that the README's tables come from
        args.out = PARTIAL if args.only else RESULTS
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    names = args.only.split(",") if args.only else list(ANCHORS)
    result: dict[str, Any] = {
        "machine": {**machine(), "note": args.note},
        "versions": {lib: _version(lib) for lib in LIBRARIES} | {"whatmatters": wm.__version__},
        "quick": args.quick,
        "repeats": args.repeats,
        "anchors": {},
        "not_run": NOT_RUN,
    }
    start = time.perf_counter()
    for name in names:
        t0 = time.perf_counter()
        try:
            result["anchors"][name] = ANCHORS[name](args)
        except Skipped as why:
            result["anchors"][name] = {"skipped": str(why)}
        except Exception as err:  # recorded (and shown in the README), the other anchors still run
            result["anchors"][name] = {"skipped": f"failed: {type(err).__name__}: {err}"}
        result["anchors"][name]["seconds"] = round(time.perf_counter() - t0, 1)
        print(f"{name}: {json.dumps(result['anchors'][name])}", flush=True)
    result["seconds"] = round(time.perf_counter() - start, 1)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out} ({result['seconds']} s)")


if __name__ == "__main__":
    main()
