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


class Engine:
    """Runs tasks on ``engine`` for the length of a ``with`` block: one process pool (or one Ray session) for
    every stage of a pipeline, so workers keep what they loaded and remembered between stages.
    """

    def __init__(self, engine: str = "local", workers: int | None = None, ray_address: str | None = None) -> None:
        from whatmatters.core.fractions import whole

        self.engine = check_engine(engine)
        self.workers = None if workers is None else whole(workers, "workers")
        self.ray_address = ray_address
        self._pool: Any = None
        self._ray_started = False

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._ray_started:
            import ray

            ray.shutdown()
            self._ray_started = False

    def run(
        self, fn: Callable[[Any], Any], tasks: Sequence[Any], on_done: Callable[[int, Any], None] | None = None
    ) -> list[Any]:
        """``[fn(t) for t in tasks]``; ``on_done(i, result)`` runs in this process as each task finishes.

        The first task that raises stops the run: tasks not started are cancelled, and the error is raised
        here as the task raised it (a whatmatters error keeps its type and message).
        """
        results: list[Any] = [None] * len(tasks)

        def done(i: int, result: Any) -> None:
            results[i] = result
            if on_done is not None:
                on_done(i, result)

        if not tasks:
            return results
        if self.engine == "ray":
            self._run_ray(fn, tasks, done)
        else:
            self._run_local(fn, tasks, done)
        return results

    def _run_local(self, fn: Callable, tasks: Sequence[Any], done: Callable[[int, Any], None]) -> None:
        workers = cpu_count() if self.workers is None else self.workers
        if workers == 1 or (len(tasks) == 1 and self._pool is None):
            for i, task in enumerate(tasks):
                done(i, fn(task))
            return
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
        from concurrent.futures.process import BrokenProcessPool

        if self._pool is None:
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            self._pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method))
        futures = {self._pool.submit(fn, task): i for i, task in enumerate(tasks)}
        pending = set(futures)
        try:
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in sorted(finished, key=futures.__getitem__):
                    done(futures[future], future.result())
        except BrokenProcessPool:
            self._pool = None
            raise WhatMattersError(
                "a worker process died (killed, or out of memory); the pieces that finished are kept: "
                "rerun the same command to go on, with fewer workers if memory ran out"
            ) from None
        except BaseException:
            for future in pending:
                future.cancel()
            wait(pending)  # the running ones finish (their files are complete) before the error goes up
            raise

    def _run_ray(self, fn: Callable, tasks: Sequence[Any], done: Callable[[int, Any], None]) -> None:
        import ray

        if not ray.is_initialized():
            options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if self.ray_address is None and not os.environ.get("RAY_ADDRESS") and self.workers is not None:
                options["num_cpus"] = self.workers
            ray.init(address=self.ray_address, **options)
            self._ray_started = True
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


def run_tasks(
    fn: Callable[[Any], Any],
    tasks: Sequence[Any],
    *,
    engine: str = "local",
    workers: int | None = None,
    ray_address: str | None = None,
    on_done: Callable[[int, Any], None] | None = None,
) -> list[Any]:
    """One :meth:`Engine.run` on an engine of its own (started and closed around it)."""
    with Engine(engine, workers, ray_address) as runner:
        return runner.run(fn, tasks, on_done)


def _ray_get(ray: Any, ref: Any) -> Any:
    """``ray.get(ref)``, raising a task's own exception (not Ray's wrapper) for whatmatters and OS errors."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        cause = getattr(err, "cause", None)
        if isinstance(cause, (WhatMattersError, OSError)):
            raise cause from None
        raise
