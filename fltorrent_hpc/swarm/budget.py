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


EVEN_LINKS = 1.25  # uplinks within this factor of each other count as even (direct_round)
# uneven uplinks: a direct exchange only up to this many bytes a rank; the swarm wins above it (4 ranks, uplinks
# 400..1600 Mbit/s, jobs/bench_crossover.py: swarm/direct 0.76-0.95 at 1 MiB, 0.52-0.55 at 4 MiB)
UNEVEN_DIRECT_BYTES = 2**20


def small_round(config, nbytes: int) -> bool:
    """At most `config.direct_bytes` per rank (and not empty): a round whose cost is its control exchanges."""
    return 0 < nbytes <= config.direct_bytes


def direct_round(config, n: int, nbytes: int, uplinks: np.ndarray | None = None) -> bool:
    """Whether a real round of `nbytes` per rank over `n` ranks is one direct exchange (SwarmRound(direct=True)).

    Only without privacy (every privacy setting needs its hops) and with `config.direct_bytes > 0` (0: never
    direct, the swarm always runs).  Then direct when
    - the uplinks are even (all unpaced, or all within EVEN_LINKS of the slowest): each rank must upload
      (n-1) x nbytes in any all-gather, so sending it straight is already at the capacity bound, and relaying
      through the swarm only adds stages; or
    - the round is small (`nbytes <= config.direct_bytes`; on uneven or partly unknown uplinks also at most
      UNEVEN_DIRECT_BYTES): its cost is its control exchanges, which one direct stage cuts to the data and a
      report.  Above that the swarm lets fast peers carry the slow ones' chunks (bound max(n(n-1)S / sum U,
      S / min U) instead of (n-1)S / min U), which pays for its extra exchanges.
    Link rates unknown (`uplinks` None): small rounds only.  docs/ARCHITECTURE.md ("Small rounds and the direct
    exchange") gives the measured crossover.
    """
    if config.privacy or config.direct_bytes <= 0 or n < 2 or nbytes <= 0:
        return False
    small = small_round(config, nbytes)
    if uplinks is None:
        return small
    up = np.asarray(uplinks, dtype=np.float64)[:n]
    if np.all(up <= 0) or (np.all(up > 0) and up.max() <= EVEN_LINKS * up.min()):
        return True
    return small and nbytes <= UNEVEN_DIRECT_BYTES
