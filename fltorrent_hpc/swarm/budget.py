"""Per-stage chunk budgets from link rates: the one rule the simulator and the real engine share.

A peer may send floor(rate * slot / C) chunks in a stage of `slot` seconds (PAPER.md §1.1); the 1e-9 keeps
a rate that is an exact multiple of C per slot from losing a chunk to rounding.  A paced link slower than
one chunk per slot still gets one (a real pacer then stretches the stage; the simulator refuses such
links instead, since its slots could not hold them).  Rate 0 means an unpaced link: no budget to speak of.
"""

from __future__ import annotations

import numpy as np

UNPACED_BUDGET = 1 << 30


def chunk_budgets(rate: np.ndarray, chunk_bytes: int, slot_seconds: float) -> np.ndarray:
    """int64 chunks per stage for each rate (bytes/s); rate <= 0 gives UNPACED_BUDGET."""
    rate = np.asarray(rate, dtype=np.float64)
    b = np.maximum(np.floor(rate * slot_seconds / chunk_bytes + 1e-9), 1)
    return np.where(rate > 0, b, UNPACED_BUDGET).astype(np.int64)


def too_slow(rate: np.ndarray, chunk_bytes: int, slot_seconds: float) -> np.ndarray:
    """Which paced links move less than one chunk per slot."""
    rate = np.asarray(rate, dtype=np.float64)
    return (rate > 0) & (np.floor(rate * slot_seconds / chunk_bytes + 1e-9) < 1)
