"""Warm-up stages: pre-round spray, then tracker-scheduled transfers until every active peer holds k.

The tracker sees the global have-state (PAPER.md §2.3).  Each pass, every receiver with download budget
left proposes chunks that its neighbours may serve (sampled from their relay lists plus the owners'
released window chunks); the scheduler picks a sender per request and senders accept within budget, tau
and once-per-chunk.  Schedulers (PAPER.md §3.2; tie-breaks in DESIGN.md):
  gff          fastest feasible sender (non-owner first, largest residual uplink, seeded random), senders
               favour fast requesters; repeated passes re-assign what was refused (greedy fill)
  random-ff    random feasible sender (non-owner first), senders favour fast requesters, one pass
  random-fifo  random feasible sender (non-owner first), senders serve in arrival order, one pass
  flooding     no tracker assignment: senders push random eligible chunks to random neighbours
Receivers still below k come first everywhere: they are what the warm-up waits for.
"""

from __future__ import annotations

import numpy as np

from . import rng
from .assign import accept, cumcount, first_occurrence, member, take_per_group
from .bittorrent import bt_passes, request_pipeline
from .bt_kernel import key_base, warm_pass
from .stage import BT, SPRAY, WARMUP, Collector, RoundState, Stage, StageBudget

GFF_PASSES = 3
# a receiver asks for at most ASK_SHARE x its fair share of its neighbours' remaining upload per pass
ASK_SHARE = 3.0


def _spray(rnd: RoundState, b: StageBudget, col: Collector) -> None:
    plan = rnd.spray
    if plan["sender"].size == 0:
        return
    s, r, c = plan["sender"], plan["receiver"], plan["chunk"]
    alive = rnd.active[s] & rnd.active[r]
    if not alive.all():  # an endpoint left: that spray item is void (a seed goes to another peer)
        if rnd.hidden:
            rnd._replan_seeds(rnd.banned_by)
        else:
            rnd.spray = {k: v[alive] for k, v in plan.items()}
        plan = rnd.spray
        s, r, c = plan["sender"], plan["receiver"], plan["chunk"]
    first = -np.arange(s.size, dtype=np.float64)  # plan order
    ok = take_per_group(s, first, b.up_left)
    ok &= take_per_group(np.where(ok, r, rnd.n), first, np.append(b.down_left[: rnd.n], 0))
    ok &= ~rnd.have[r, c]
    s, r, c = s[ok], r[ok], c[ok]
    col.add(s, r, c, np.full(s.size, SPRAY), np.ones(s.size), np.ones(s.size))
    b.commit(s, r, c)


SCHED_CODES = {"gff": 0, "random-ff": 1, "random-fifo": 2}


def _centralised_pass(rnd: RoundState, b: StageBudget, col: Collector, p: int, fill: bool = False) -> int:
    """One tracker pass (bt_kernel.warm_pass).  Only peers still below k ask, except in the `fill` pass,
    where everyone may use the capacity that is left."""
    n, K = rnd.n, rnd.K
    recv = np.flatnonzero((b.down_left[:n] > 0) & (fill | (rnd.received < rnd.k)) & (rnd.deg > 0))
    if recv.size == 0:
        return 0
    # draws sized by each receiver's recent share of usable draws
    draws = np.clip(np.ceil(1.5 * b.down_left[recv] / rnd.acc_est[recv]), 8, 1024).astype(np.int64)
    win = -np.sort(-rnd.win, axis=1)  # filled window slots first
    own = (win >= 0).sum(axis=1) if rnd.gating else np.full(n, K, dtype=np.int64)
    nbr64, rev = rnd.slot_tables()
    askers = np.bincount(nbr64[recv].ravel(), minlength=n + 1)
    s, r, c, slot, got, used, rnd.warm_stamp = warm_pass(
        np.uint64(key_base(rnd.seed, rng.WARMUP, rnd.stage, p)),
        SCHED_CODES[rnd.cfg.scheduler],
        n,
        rnd.N,
        K,
        rnd.k,
        nbr64,
        rev,
        recv,
        draws,
        rnd.hbits,
        rnd.tbits,
        rnd.rlist,
        rnd.rlen,
        win,
        own.astype(np.int64),
        bool(rnd.gating and rnd.phase == WARMUP),
        rnd.in_window,
        b.can_send,
        b.up_left,
        b.down_left,
        rnd.down,
        askers,
        ASK_SHARE,
        b.tau_left,
        b.served,
        rnd.received,
        rnd.pbits,
        b.sent_c,
        b.sent_len,
        rnd.warm_mark,
        rnd.warm_stamp,
    )
    tried = used > 0
    rnd.acc_est[recv[tried]] = np.clip(0.5 * rnd.acc_est[recv[tried]] + 0.5 * got[tried] / used[tried], 0.01, 1.0)
    if s.size == 0:
        return 0
    owned = rnd.owned_eligible
    col.add(s, r, c, np.full(s.size, WARMUP), owned[s], rnd.received[s] + owned[s])
    return int(s.size)


def _flooding_pass(rnd: RoundState, b: StageBudget, col: Collector, p: int) -> int:
    n, K, N = rnd.n, rnd.K, rnd.N
    snd = np.flatnonzero(b.can_send[:n] & (b.up_left[:n] > 0) & (rnd.deg > 0))
    if snd.size == 0:
        return 0
    draws = 3 * b.up_left[snd] + 4
    rows = np.repeat(snd, draws)
    t = cumcount(rows)
    key = (rnd.seed, rng.WARMUP, rnd.stage, p)
    jslot = rng.below(rnd.deg[rows], *key, 5, rows, t)
    v = rnd.nbr[rows, jslot].astype(np.int64)
    win = -np.sort(-rnd.win, axis=1)
    own = (win >= 0).sum(axis=1) if rnd.gating else np.full(n, K)
    total = rnd.rlen[rows] + own[rows]
    pos = rng.below(np.maximum(total, 1), *key, 6, rows, t)
    in_list = pos < rnd.rlen[rows]
    k_own = pos - rnd.rlen[rows]
    own_chunk = win[rows, np.clip(k_own, 0, win.shape[1] - 1)] if rnd.gating else rows * K + k_own
    c = np.where(in_list, rnd.rlist[rows, np.minimum(pos, rnd.rlist.shape[1] - 1)], own_chunk)
    ok = (total > 0) & (c >= 0)
    rows, v, c, jslot = rows[ok], v[ok], c[ok], jslot[ok]
    ok = ~rnd.have[v, c] & b.down_left[v].astype(bool)
    rows, v, c, jslot = rows[ok], v[ok], c[ok], jslot[ok]
    code = v * N + c
    ok = first_occurrence(code)
    if b.pending.size:
        ok &= ~member(code, b.pending)
    rows, v, c, jslot = rows[ok], v[ok], c[ok], jslot[ok]
    acc = accept(rows, v, c, jslot, rng.uniform(*key, 7, rows * N + c), b, N)
    rows, v, c, jslot = rows[acc], v[acc], c[acc], jslot[acc]
    keep = take_per_group(v, rng.uniform(*key, 8, v * N + c), b.down_left)
    s, r, c, jslot = rows[keep], v[keep], c[keep], jslot[keep]
    owned = rnd.owned_eligible
    col.add(s, r, c, np.full(s.size, WARMUP), owned[s], rnd.received[s] + owned[s])
    b.commit(s, r, c, jslot)
    return int(s.size)


def _schedule(rnd: RoundState, b: StageBudget, col: Collector) -> None:
    sched = rnd.cfg.scheduler
    if sched == "maxflow":  # offline bound executed as a schedule (no tau), for the makespan ratio
        from .maxflow import stage_bound

        _, (s, r, c) = stage_bound(rnd, b, return_transfers=True)
        owned = rnd.owned_eligible
        col.add(s, r, c, np.full(s.size, WARMUP), owned[s], rnd.received[s] + owned[s])
        b.commit(s, r, c)
        return
    if sched == "flooding":
        for p in range(2):
            if _flooding_pass(rnd, b, col, p) == 0:
                break
        return
    passes = GFF_PASSES if sched == "gff" else 1
    for p in range(passes):
        if _centralised_pass(rnd, b, col, p) == 0 and p > 0:
            break
    _centralised_pass(rnd, b, col, passes, fill=True)


def warmup_stage(rnd: RoundState) -> Stage:
    """Spray items first (they ride in the owners' budgets), then the scheduler fills what is left."""
    b = StageBudget(rnd)
    col = Collector()
    if rnd.spray["sender"].size:  # pre-round spray: the round proper (and the lag clock) starts after it
        _spray(rnd, b, col)
        if rnd.hidden and rnd.cfg.seed_overlap:
            # hidden seeds: what the first hops and forwards leave of the budgets goes to BitTorrent among the
            # chunks already seeded, so fast uplinks do not idle while slow owners send their first hops
            bt_passes(rnd, b, col, request_pipeline(rnd.nbr, rnd.up, rnd.deg, rnd.n))
        s, r, c, kind, owned, buf = col.arrays()
        return Stage(
            index=rnd.stage,
            phase=WARMUP,
            sender=s,
            receiver=r,
            chunk=c,
            kind=kind,
            sender_owned=owned,
            sender_buffer=buf,
            capacity=rnd.capacity(),
        )
    n_spray = 0
    sample = rnd.compute_maxflow and rnd.stage % rnd.maxflow_every == 0
    snap = b.copy() if sample else None
    _schedule(rnd, b, col)
    rel_p = rel_c = np.zeros(0, np.int64)
    act = rnd.active[: rnd.n]
    if len(col) == 0 and rnd.gating and np.any(rnd.received[act] < rnd.k):
        rel_p, rel_c = rnd.gated_release()
        if rel_p.size:
            snap = b.copy() if sample else None
            _schedule(rnd, b, col)
    mf = -1
    if snap is not None:
        from .maxflow import stage_bound

        mf = stage_bound(rnd, snap, achieved=len(col) - n_spray)
    s, r, c, kind, owned, buf = col.arrays()
    return Stage(
        index=rnd.stage,
        phase=WARMUP if rnd.phase != BT else BT,
        sender=s,
        receiver=r,
        chunk=c,
        kind=kind,
        sender_owned=owned,
        sender_buffer=buf,
        capacity=rnd.capacity(),
        release_peer=rel_p,
        release_chunk=rel_c,
        maxflow=mf,
    )
