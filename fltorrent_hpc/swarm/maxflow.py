"""Stage max-flow upper bound (PAPER.md §3.1, Fig. 1), computed offline on the same state as the scheduler.

Network: s -> l_v (receiver v's download budget d_v) -> (v, c) for each chunk c that v lacks and some
neighbour may serve (capacity 1: no duplicate delivery) -> (w, c) for each such neighbour w (capacity 1)
-> r_w (capacity 1: a sender uploads a given chunk once per stage) -> t (sender's upload budget u_w).
The max-flow value is the most chunk transfers any schedule can make in the stage; its flow gives such a
schedule (the offline `maxflow` scheduler, used for the makespan ratio).  Solved with scipy's Dinic.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import maximum_flow

from .assign import first_occurrence
from .stage import RoundState, StageBudget


def _requests(rnd: RoundState, b: StageBudget) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All feasible (receiver, chunk, sender) triples of the stage."""
    n, K, N = rnd.n, rnd.K, rnd.N
    senders = np.flatnonzero(b.can_send[:n] & (b.up_left[:n] > 0) & (rnd.deg > 0))
    lists_w, lists_c = [], []
    for w in senders:  # each sender's eligible chunks
        own = rnd.win[w][rnd.win[w] >= 0] if rnd.gating else np.arange(w * K, (w + 1) * K)
        ch = np.concatenate([rnd.rlist[w, : rnd.rlen[w]], own]).astype(np.int64)
        lists_w.append(np.full(ch.size, w, dtype=np.int64))
        lists_c.append(ch)
    if not lists_w:
        z = np.zeros(0, np.int64)
        return z, z, z
    w = np.concatenate(lists_w)
    c = np.concatenate(lists_c)
    ok = rnd.eligible(w, c)
    if b.sent.size:
        ok &= ~np.isin(w * N + c, b.sent)
    w, c = w[ok], c[ok]
    # fan out to each neighbour of the sender that can still receive
    nb = rnd.nbr[w]
    v = nb.reshape(-1).astype(np.int64)
    ww = np.repeat(w, nb.shape[1])
    cc = np.repeat(c, nb.shape[1])
    ok = v < n
    v, ww, cc = v[ok], ww[ok], cc[ok]
    ok = (b.down_left[v] > 0) & ~rnd.have[v, cc]
    if b.pending.size:
        ok &= ~np.isin(v * N + cc, b.pending)
    return v[ok], cc[ok], ww[ok]


def stage_bound(
    rnd: RoundState, b: StageBudget, achieved: int | None = None, return_transfers: bool = False
) -> int | tuple[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Max transfers of this stage on residual budgets `b`; with `return_transfers`, also a schedule."""
    n, N = rnd.n, rnd.N
    v, c, w = _requests(rnd, b)
    z = np.zeros(0, np.int64)
    if v.size == 0:
        return (0, (z, z, z)) if return_transfers else 0
    req_code = v * N + c
    req_u, req_id = np.unique(req_code, return_inverse=True)
    wc_u, wc_id = np.unique(w * N + c, return_inverse=True)
    req_v = req_u // N
    wc_w = wc_u // N
    # cheap bound: if the scheduler already meets it, max-flow equals it and no solve is needed
    per_v = np.bincount(req_v, minlength=n)
    per_w = np.bincount(wc_w, minlength=n)
    ub = min(int(np.minimum(per_v, b.down_left[:n]).sum()), int(np.minimum(per_w, b.up_left[:n]).sum()))
    if achieved is not None and achieved >= ub and not return_transfers:
        return ub
    recv_u = np.flatnonzero(per_v)
    send_u = np.flatnonzero(per_w)
    lv = np.full(n, -1, np.int64)
    lv[recv_u] = np.arange(recv_u.size)
    rw = np.full(n, -1, np.int64)
    rw[send_u] = np.arange(send_u.size)
    S, T = 0, 1
    o_l = 2
    o_req = o_l + recv_u.size
    o_wc = o_req + req_u.size
    o_r = o_wc + wc_u.size
    total = o_r + send_u.size
    trip = first_occurrence(req_id.astype(np.int64) * wc_u.size + wc_id)  # one edge per (request, holder)
    rows = np.concatenate(
        [
            np.full(recv_u.size, S),
            o_l + lv[req_v],
            o_req + req_id[trip],
            o_wc + np.arange(wc_u.size),
            o_r + np.arange(send_u.size),
        ]
    )
    cols = np.concatenate(
        [
            o_l + np.arange(recv_u.size),
            o_req + np.arange(req_u.size),
            o_wc + wc_id[trip],
            o_r + rw[wc_w],
            np.full(send_u.size, T),
        ]
    )
    caps = np.concatenate(
        [
            b.down_left[recv_u],
            np.ones(req_u.size),
            np.ones(int(trip.sum())),
            np.ones(wc_u.size),
            b.up_left[send_u],
        ]
    ).astype(np.int32)
    g = sp.csr_matrix((caps, (rows, cols)), shape=(total, total))
    res = maximum_flow(g, S, T, method="dinic")
    value = int(res.flow_value)
    if not return_transfers:
        return value
    f = res.flow.tocoo()
    sel = (f.data > 0) & (f.row >= o_req) & (f.row < o_wc) & (f.col >= o_wc) & (f.col < o_r)
    r_idx = f.row[sel] - o_req
    w_idx = f.col[sel] - o_wc
    return value, (wc_w[w_idx], req_v[r_idx], req_u[r_idx] % N)
