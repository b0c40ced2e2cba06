"""The worker pool of a study: one fresh process per point, SIGTERM handled like Ctrl-C."""

from __future__ import annotations

import os
import signal
import threading
import traceback
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any

from .registry import Point
from .runner import run_point

Finished = Callable[[Point, "dict[str, Any] | None", "str | None"], None]  # (point, result, traceback text)


def run_pool(todo: list[Point], jobs: int, trace_dir: str | None, finished: Finished) -> None:
    """Run `todo` on `jobs` spawned workers, calling `finished` in this process as each point ends."""
    import multiprocessing as mp

    # one BLAS/OpenMP thread per worker: the cores are already shared out between workers
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    # the compiled swarm passes run their receivers in parallel: give each worker its share of the cores, since
    # oversubscribed threads stall every parallel region (tens of thousands per round) on a descheduled thread
    os.environ.setdefault("NUMBA_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(jobs, 1))))
    # a fresh process per point: a big point's memory goes back to the OS and each peak RSS is its own
    # SIGTERM (scancel, kill) stops the study like Ctrl-C: running points are dropped and their workers
    # terminated, instead of the workers computing on, orphaned, after the parent is gone
    main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, _interrupt) if main else None
    try:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"), max_tasks_per_child=1) as ex:
            pending: dict[Future, Point] = {ex.submit(run_point, p, trace_dir): p for p in todo}
            try:
                while pending:
                    ready, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in ready:
                        p = pending.pop(fut)
                        try:
                            res = fut.result()
                        except Exception:
                            finished(p, None, traceback.format_exc())
                        else:
                            finished(p, res, None)
            except KeyboardInterrupt:
                for fut in pending:
                    fut.cancel()
                # finished points are already committed; the running ones restart on resume
                for proc in list(getattr(ex, "_processes", {}).values()):
                    proc.terminate()
                ex.shutdown(wait=False, cancel_futures=True)
                raise
    finally:
        if main:
            signal.signal(signal.SIGTERM, old)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
