"""Checks the misbehaving-peer suites share (test_robust.py, test_pipeline.py): what the honest ranks must agree on."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def honest_identical(
    comm, res, honest: list[int], expected: Callable[[int], np.ndarray], must: list[int] | None = None
) -> bool:
    """The honest ranks hold the same participants (every honest rank among them, `must` exactly if given) and
    every participant's true bytes (`expected(u)`).  Collective: every rank calls it; `res` may be None on a
    rank that has no result."""
    n = comm.Get_size()
    mask = np.zeros(n, dtype=np.int64)
    if res is not None:
        mask[res.participants] = 1
    allm = np.empty((n, n), dtype=np.int64)
    comm.Allgather(mask, allm)
    ok = all(np.array_equal(allm[honest[0]], allm[r]) for r in honest)
    parts = np.flatnonzero(allm[honest[0]]).tolist()
    ok &= set(honest) <= set(parts) and (must is None or parts == must)
    if comm.Get_rank() in honest:
        ok &= all(np.array_equal(res.updates[u], expected(u)) for u in parts)
    return bool(ok)
