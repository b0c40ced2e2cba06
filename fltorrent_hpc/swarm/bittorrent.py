"""Decentralised BitTorrent stages: rarest-first requests, budgeted grants, endgame.

Each peer decides from its own knowledge only: receiver v reads its own row, its neighbours' have rows
(kept current by have messages) and which neighbours choked it; sender w reads the requests it got, its
residual budget and its reciprocity counters.  Every random draw is keyed by (seed, stage, pass, peer),
so a real rank that evaluates only its own rows reproduces the simulator's decisions exactly.

Candidate chunks are sampled, not enumerated: while a peer misses more than N/8 chunks it draws chunk ids
uniformly and keeps the missing ones; below that it keeps a compact missing list, rebuilt whenever half
of it is stale.  Rarity is the number of v's neighbours holding a chunk; v asks for the rarest first, each
from a random holder that has not choked it.  In endgame (at most `endgame_chunks` missing) v asks every
holder and keeps the first grant; the other grants are cancelled before any byte moves.
"""

from __future__ import annotations

import numpy as np

from . import rng
from .assign import accept, choose_holder, cumcount, first_occurrence, member, slot_of, take_per_group
from .round import BT, Stage, SwarmRound, _Collector
from .warmup import StageBudget

ROW_BATCH_ELEMENTS = 64 * 2**20  # bound on the temporary bool matrix of a missing-list rebuild
PIPELINE_MIN = 4  # requests a peer keeps in flight on top of its share-based pipeline
REQUEST_FACTOR = 3.0


class MissingLists:
    """Per-peer compact missing lists for peers that miss at most N/8 chunks."""

    def __init__(self, n: int, N: int):
        self.cap = int(min(N, max(64, N // 8)))
        self.items = np.full((n, max(self.cap, 1)), -1, dtype=np.int64 if N >= 2**31 else np.int32)
        self.length = np.zeros(n, dtype=np.int64)
        self.on = np.zeros(n, dtype=bool)

    def refresh(self, rnd: SwarmRound) -> None:
        missing = rnd.N - rnd.held
        need = rnd.active[: rnd.n] & (missing <= self.cap) & (~self.on | (2 * missing < self.length))
        rows = np.flatnonzero(need)
        step = max(1, ROW_BATCH_ELEMENTS // max(rnd.N, 1))
        for i in range(0, rows.size, step):
            batch = rows[i : i + step]
            rr, cc = np.nonzero(~rnd.have[batch])
            self.items[batch] = -1
            self.items[batch[rr], cumcount(rr)] = cc
            self.length[batch] = np.bincount(rr, minlength=batch.size)
        self.on[rows] = True


def _bt_pass(rnd: SwarmRound, b: StageBudget, col: _Collector, p: int, choked: np.ndarray) -> int:
    n, N, K = rnd.n, rnd.N, rnd.K
    ml: MissingLists = rnd.bt
    key = (rnd.seed, rng.BT, rnd.stage, p)
    missing = N - rnd.held
    recv = np.flatnonzero(rnd.active[:n] & (b.down_left[:n] > 0) & (missing > 0) & (rnd.deg > 0))
    if recv.size == 0:
        return 0
    eg = missing[recv] <= rnd.cfg.endgame_chunks
    # request pipeline (like a BitTorrent request queue), within the download budget
    want = np.minimum(b.down_left[:n], rnd.bt_want)
    rs = recv[~eg]
    draws = np.clip(np.ceil(1.5 * want[rs] / rnd.acc_est[rs]), 8, 2048).astype(np.int64)
    rows = np.repeat(rs, draws)
    t = rows * 4096 + cumcount(rows)
    listed = ml.on[rows]
    lpos = rng.below(np.maximum(ml.length[rows], 1), *key, 0, t)
    c = np.where(listed, ml.items[rows, np.minimum(lpos, ml.items.shape[1] - 1)], rng.below(N, *key, 1, t))
    v = rows
    # endgame peers consider their whole (short) missing list
    re = recv[eg]
    if re.size:
        width = int(ml.length[re].max())
        m = np.arange(width)[None, :] < ml.length[re][:, None]
        v = np.concatenate([v, np.broadcast_to(re[:, None], m.shape)[m]])
        c = np.concatenate([c, ml.items[re][:, :width][m]])
    c = c.astype(np.int64)
    ok = c >= 0
    v, c = v[ok], c[ok]
    ok = ~rnd.holds(v, c)
    v, c = v[ok], c[ok]
    code = v * N + c
    ok = first_occurrence(code)
    if b.pending.size:
        ok &= ~member(code, b.pending)
    v, c = v[ok], c[ok]
    w = rnd.nbr[v].astype(np.int64)
    hold = rnd.holds(w, c[:, None])
    feas = hold & b.can_send[w] & (b.up_left[w] > 0) & ~choked[v]
    anyf = feas.any(axis=1)
    got = np.bincount(v[anyf], minlength=n)[rs]
    rnd.acc_est[rs] = np.clip(0.5 * rnd.acc_est[rs] + 0.5 * got / draws, 0.01, 1.0)
    v, c, w, hold, feas = v[anyf], c[anyf], w[anyf], hold[anyf], feas[anyf]
    if v.size == 0:
        return 0
    # rarest first among what v's neighbours hold
    rarity = hold.sum(axis=1)
    pick = take_per_group(v, -rarity + 0.5 * rng.uniform(*key, 2, v * N + c), np.append(want, 0))
    v, c, w, feas = v[pick], c[pick], w[pick], feas[pick]
    in_eg = missing[v] <= rnd.cfg.endgame_chunks
    # normal requests: one random feasible holder each; endgame: every feasible holder
    nv = ~in_eg
    snd, jcol = choose_holder(w[nv], feas[nv], rng.uniform(*key, 3, v[nv] * N + c[nv]))
    ps, pr, pc, pj = snd, v[nv], c[nv], jcol
    if np.any(in_eg):
        fe = feas[in_eg]
        ps = np.concatenate([ps, w[in_eg][fe]])
        pr = np.concatenate([pr, np.broadcast_to(v[in_eg][:, None], fe.shape)[fe]])
        pc = np.concatenate([pc, np.broadcast_to(c[in_eg][:, None], fe.shape)[fe]])
        pj = np.concatenate([pj, np.nonzero(fe)[1]])
    # sender side: peers already unchoked this stage first, then reciprocity, then chance
    slot = slot_of(rnd.nbr, ps, pr)
    prio = b.served[ps, slot] * 1e12 + rnd.recip[ps, slot] * 1.0 + rng.uniform(*key, 4, ps * N + pc)
    ok = accept(ps, pr, pc, slot, prio, b, N, once_per_chunk=False)
    choked[pr[~ok], pj[~ok]] = True
    s, r, c, slot = ps[ok], pr[ok], pc[ok], slot[ok]
    if np.any(in_eg):  # endgame: one grant per (r, c) survives, the others are cancelled
        order = np.argsort(rng.uniform(*key, 5, s * N + c), kind="stable")
        mask = np.zeros(s.size, dtype=bool)
        mask[order] = first_occurrence((r * N + c)[order])
        s, r, c, slot = s[mask], r[mask], c[mask], slot[mask]
    col.add(s, r, c, np.full(s.size, BT), np.full(s.size, K), rnd.held[s])
    b.commit(s, r, c, slot)
    return int(s.size)


def bt_stage(rnd: SwarmRound) -> Stage:
    if rnd.bt is None:
        rnd.bt = MissingLists(rnd.n, rnd.N)
        # requests a peer keeps in flight: REQUEST_FACTOR times its fair share of its neighbours' uplinks
        nb = rnd.nbr
        share = np.where(
            nb < rnd.n, rnd.up[np.minimum(nb, rnd.n - 1)] / np.maximum(rnd.deg[np.minimum(nb, rnd.n - 1)], 1), 0
        )
        rnd.bt_want = np.ceil(REQUEST_FACTOR * share.sum(axis=1)).astype(np.int64) + PIPELINE_MIN
    rnd.bt.refresh(rnd)
    b = StageBudget(rnd)
    col = _Collector()
    choked = np.zeros((rnd.n + 1, rnd.nbr.shape[1]), dtype=bool)  # [receiver, neighbour slot] refused it
    for p in range(rnd.cfg.bt_passes):
        if _bt_pass(rnd, b, col, p, choked) == 0:
            break
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
