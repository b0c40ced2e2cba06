"""Decentralised BitTorrent stages: rarest-first requests, budgeted grants, endgame.

Each peer decides from its own knowledge only: receiver v reads its own row, its neighbours' have rows
(kept current by have messages) and which neighbours choked it; sender w reads the requests it got, its
residual budget, what each requester says it misses (deficit-first grants, the default) or its
reciprocity counters (tit-for-tat).  Every random draw is keyed by (seed, stage, pass, peer),
so a real rank that evaluates only its own rows reproduces the simulator's decisions exactly.

Candidate chunks are sampled, not enumerated: a receiver visits its own have-words in a seeded permutation
and tries a few missing chunks of each (every word once its missing chunks are sparse), so no draw lands on
a chunk it holds; the passes are compiled (bt_kernel.py).
Rarity is the number of v's neighbours holding a chunk; v asks for the rarest first, each
from a random holder that has not choked it.  In endgame (at most `endgame_chunks` missing) v asks every
holder and keeps the first grant; the other grants are cancelled before any byte moves.
"""

from __future__ import annotations

import numpy as np

from ..config import BT_GRANTS
from . import rng
from .stage import BT, Collector, RoundState, Stage, StageBudget

PIPELINE_MIN = 4  # requests a peer keeps in flight on top of its share-based pipeline
REQUEST_FACTOR = 1.25
OVERSAMPLE = 1.5  # feasible candidates drawn per request: the rarest `want` of them are requested
MAX_DRAWS = 8  # draws per wanted candidate before a receiver gives up for this pass


def request_pipeline(nbr: np.ndarray, up: np.ndarray, deg: np.ndarray, n: int) -> np.ndarray:
    """Requests each peer (row of `nbr`) keeps in flight: REQUEST_FACTOR x its fair share of its neighbours'
    uplinks, plus PIPELINE_MIN.  Row-wise, so a peer computes its own value from its own row alone."""
    share = np.where(nbr < n, up[np.minimum(nbr, n - 1)] / np.maximum(deg[np.minimum(nbr, n - 1)], 1), 0)
    return np.ceil(REQUEST_FACTOR * share.sum(axis=1)).astype(np.int64) + PIPELINE_MIN


def bt_passes(rnd: RoundState, b: StageBudget, col: Collector, bt_want: np.ndarray) -> None:
    """The request/grant passes of one stage within the budgets `b` leaves (all of a BitTorrent stage's; what a
    hidden seed stage's first hops and forwards leave), transfers into `col`."""
    from .bt_kernel import bt_pass, key_base

    nbr64, rev = rnd.slot_tables()
    n, N = rnd.n, rnd.N
    D = nbr64.shape[1]
    choked = np.zeros((n + 1, D), dtype=bool)  # [receiver, neighbour slot] refused it this stage
    for p in range(rnd.cfg.bt_passes):
        missing = N - rnd.held
        recv = np.flatnonzero(rnd.active[:n] & (b.down_left[:n] > 0) & (missing > 0) & (rnd.deg > 0))
        if recv.size == 0:
            break
        want = np.minimum(np.minimum(b.down_left[recv], bt_want[recv]), missing[recv])
        endgame = missing[recv] <= rnd.cfg.endgame_chunks
        s, r, c, _slot = bt_pass(
            np.uint64(key_base(rnd.seed, rng.BT, rnd.stage, p)),
            N,
            n,
            nbr64,
            rev,
            recv,
            want,
            missing[recv],
            endgame,
            rnd.hbits,
            rnd.tbits,
            b.can_send,
            b.up_left,
            b.down_left,
            b.tau_left,
            b.served,
            rnd.recip,
            choked,
            rnd.pbits,
            OVERSAMPLE,
            MAX_DRAWS,
            BT_GRANTS.index(rnd.cfg.bt_grant),
            rnd.bt_stats,
        )
        # no early stop on a pass without grants: whether anyone got a grant is global knowledge, which a
        # peer running its own passes (engine, decentralised BitTorrent) does not have
        col.add(s, r, c, np.full(s.size, BT), np.full(s.size, rnd.K), rnd.held[s])


def bt_stage(rnd: RoundState) -> Stage:
    """One BitTorrent stage: up to `bt_passes` request/grant passes (bt_kernel.bt_pass)."""
    if rnd.bt_want is None:  # first BitTorrent stage: pipelines from the overlay as it is now
        rnd.bt_want = request_pipeline(rnd.nbr, rnd.up, rnd.deg, rnd.n)
    b = StageBudget(rnd)
    col = Collector()
    bt_passes(rnd, b, col, rnd.bt_want)
    s, r, c, kind, owned, buf = col.arrays()
    return Stage(
        index=rnd.stage,
        phase=BT,
        sender=s,
        receiver=r,
        chunk=c,
        kind=kind,
        sender_owned=owned,
        sender_buffer=buf,
        capacity=rnd.capacity(),
    )
