"""Where the work of a curation pipeline runs: this process, a pool of processes, or a Ray cluster.

An engine runs one function over a list of independent tasks (one per piece of a shard) and hands each
result back to the driver as soon as it is done, in completion order, through ``on_done(index,
result)``. Tasks write their own output files (atomically), so whatever finished before a crash is kept
and a rerun schedules only the rest.

* ``"local"`` (default): up to ``workers`` processes on this machine (``fork`` where the platform has it,
  so workers start at once and inherit the loaded modules), or this process itself for one worker or
  one task.
* ``"ray"``: one Ray task per piece (``num_cpus=1``). With Ray already initialized (``ray.init(address=...)``)
  the tasks run there; otherwise ``ray.init(address=ray_address)`` connects to ``ray_address`` or to the
  cluster in ``RAY_ADDRESS``, or starts a local Ray (with ``workers`` CPUs), and shuts down what it started.
  On a cluster, the input files and the output folder must be on storage every node sees.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from collections.abc import Callable, Sequence
from typing import Any

from whatmatters.core.errors import InputError, WhatMattersError

ENGINES = ("local", "ray")
RAY_PIP = "pip install 'whatmatters[ray]'"


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def check_engine(engine: str) -> str:
    if engine not in ENGINES:
        raise InputError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if engine == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise InputError(f"engine='ray' needs Ray, which is not installed; run: {RAY_PIP}") from None
    return engine


def run_tasks(
    fn: Callable[[Any], Any],
    tasks: Sequence[Any],
    *,
    engine: str = "local",
    workers: int | None = None,
    ray_address: str | None = None,
    on_done: Callable[[int, Any], None] | None = None,
) -> list[Any]:
    """``[fn(t) for t in tasks]`` on ``engine``; ``on_done(i, result)`` runs in this process as each finishes.

    The first task that raises stops the run: tasks not started are cancelled, and the error is raised
    here as the task raised it (a whatmatters error keeps its type and message).
    """
    check_engine(engine)
    results: list[Any] = [None] * len(tasks)

    def done(i: int, result: Any) -> None:
        results[i] = result
        if on_done is not None:
            on_done(i, result)

    if not tasks:
        return results
    if engine == "ray":
        _run_ray(fn, tasks, done, workers, ray_address)
    else:
        _run_local(fn, tasks, done, workers)
    return results


def _run_local(fn: Callable, tasks: Sequence[Any], done: Callable[[int, Any], None], workers: int | None) -> None:
    from whatmatters.core.fractions import whole

    workers = cpu_count() if workers is None else whole(workers, "workers")
    if workers == 1 or len(tasks) == 1:
        for i, task in enumerate(tasks):
            done(i, fn(task))
        return
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    pool = ProcessPoolExecutor(min(workers, len(tasks)), mp_context=multiprocessing.get_context(method))
    futures = {pool.submit(fn, task): i for i, task in enumerate(tasks)}
    pending = set(futures)
    try:
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in sorted(finished, key=futures.__getitem__):
                done(futures[future], future.result())
    except BrokenProcessPool:
        raise WhatMattersError(
            "a worker process died (killed, or out of memory); the pieces that finished are kept: "
            "rerun the same command to go on, with fewer workers if memory ran out"
        ) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _run_ray(
    fn: Callable,
    tasks: Sequence[Any],
    done: Callable[[int, Any], None],
    workers: int | None,
    address: str | None,
) -> None:
    import ray

    started = False
    if not ray.is_initialized():
        options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if address is None and not os.environ.get("RAY_ADDRESS") and workers is not None:
            options["num_cpus"] = workers
        ray.init(address=address, **options)
        started = True
    try:
        remote = ray.remote(num_cpus=1)(fn)
        refs = {remote.remote(task): i for i, task in enumerate(tasks)}
        pending = list(refs)
        try:
            while pending:
                finished, pending = ray.wait(pending, num_returns=1)
                for ref in finished:
                    done(refs[ref], _ray_get(ray, ref))
        except BaseException:
            for ref in pending:
                ray.cancel(ref)
            for ref in pending:  # collected, so Ray does not print them as unhandled errors
                with contextlib.suppress(Exception):
                    ray.get(ref, timeout=10)
            raise
    finally:
        if started:
            ray.shutdown()


def _ray_get(ray: Any, ref: Any) -> Any:
    """``ray.get(ref)``, raising a task's own exception (not Ray's wrapper) for whatmatters and OS errors."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        cause = getattr(err, "cause", None)
        if isinstance(cause, (WhatMattersError, OSError)):
            raise cause from None
        raise
