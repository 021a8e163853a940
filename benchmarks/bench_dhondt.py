"""D'Hondt seat allocation: whatmatters vs the DhondtXAI package (``pip install dhondtxai``), side by side.

DhondtXAI hands out seats one at a time from a heap (a Python loop per seat, one election per call);
whatmatters ranks all ``votes / (1..seats)`` quotients of all elections in one tensor sort.
Cases: one election (global importance) of several sizes, and one election per sample (local seats
for n samples). Results must be identical (continuous votes, so no ties). Prints a table and one JSON line.

    python benchmarks/bench_dhondt.py [--runs 5]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from timing import best_of


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs of each; the best is reported")
    args = parser.parse_args()

    import pandas as pd
    import torch
    from dhondtxai import DhondtXAI

    import whatmatters as wm
    from whatmatters.explain.dhondt import allocate, dhondt_seats

    torch.set_num_threads(1)  # the reference is single-threaded; also steadier on a shared machine
    reference = DhondtXAI(
        score_fn=lambda X: np.asarray(X).sum(1), background_data=pd.DataFrame(np.zeros((2, 2)), columns=["a", "b"])
    )
    rng = np.random.default_rng(0)
    rows = []
    for rows_n, parties, seats in [(1, 30, 100), (1, 300, 1000), (1, 1000, 10000), (200, 30, 100), (2000, 30, 100)]:
        votes = rng.gamma(0.7, size=(rows_n, parties))

        def ref(votes=votes, seats=seats):
            return np.stack([reference.dhondt_method(v, seats) for v in votes])

        if rows_n == 1:
            imp = None

            def ours(votes=votes, seats=seats):
                return dhondt_seats(votes[0], seats=seats).values.numpy()[None]

        else:
            imp = wm.Importance(torch.from_numpy(votes))

            def ours(imp=imp, seats=seats):
                return dhondt_seats(imp, seats=seats, how=None).values.numpy()

        def core(votes=votes, seats=seats):
            return allocate(torch.from_numpy(votes), seats).numpy()

        ours()  # warm up
        t_ref, r = best_of(ref, args.runs)
        t_ours, o = best_of(ours, args.runs)
        t_core, c = best_of(core, args.runs)
        rows.append(
            {
                "elections": rows_n,
                "parties": parties,
                "seats": seats,
                "dhondtxai_s": t_ref,
                "whatmatters_s": t_ours,
                "allocate_only_s": t_core,
                "speedup": t_ref / t_ours,
                "identical": bool(np.array_equal(r, o) and np.array_equal(r, c)),
            }
        )

    header = ("elections", "parties", "seats", "dhondtxai", "whatmatters", "allocate", "x", "same")
    print("{:>9} {:>7} {:>6} {:>10} {:>11} {:>9} {:>7}  {}".format(*header))
    for r in rows:
        print(
            f"{r['elections']:>9} {r['parties']:>7} {r['seats']:>6} {r['dhondtxai_s'] * 1e3:>8.2f}ms "
            f"{r['whatmatters_s'] * 1e3:>9.2f}ms {r['allocate_only_s'] * 1e3:>7.2f}ms {r['speedup']:>7.1f}  "
            f"{r['identical']}"
        )
    print(json.dumps({"benchmark": "dhondt_allocation", "torch_threads": torch.get_num_threads(), "cases": rows}))


if __name__ == "__main__":
    main()
