"""Vectorised building blocks shared by every scheduler: holder matrices, group ranks, sender acceptance.

A stage is decided in a few passes.  Each pass turns candidate requests (receiver v, chunk c) into
(sender w, v, c) proposals by scoring v's neighbours that can serve c, then every sender accepts
proposals within its residual upload budget, at most tau distinct receivers per stage, and at most one
send of a given chunk per stage (the paper's max-flow construction has that cap, so the bound holds).
"""

from __future__ import annotations

import numpy as np


def group_starts(keys: np.ndarray) -> np.ndarray:
    """Start index of each run of equal values in a sorted key array."""
    if keys.size == 0:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([[0], np.flatnonzero(keys[1:] != keys[:-1]) + 1])


def cumcount(keys: np.ndarray) -> np.ndarray:
    """0,1,2,... within each run of equal values of a sorted key array."""
    if keys.size == 0:
        return np.zeros(0, dtype=np.int64)
    starts = group_starts(keys)
    lens = np.diff(np.concatenate([starts, [keys.size]]))
    return np.arange(keys.size) - np.repeat(starts, lens)


def first_occurrence(codes: np.ndarray) -> np.ndarray:
    """Mask of the first occurrence of each value, in array order."""
    if codes.size == 0:
        return np.zeros(0, dtype=bool)
    order = np.argsort(codes, kind="stable")
    srt = codes[order]
    first = np.empty(codes.size, dtype=bool)
    first[0] = True
    np.not_equal(srt[1:], srt[:-1], out=first[1:])
    mask = np.zeros(codes.size, dtype=bool)
    mask[order[first]] = True
    return mask


def member(values: np.ndarray, table: np.ndarray) -> np.ndarray:
    """values in table, by binary search (table small, values many: cheaper than np.isin's joint sort)."""
    if table.size == 0 or values.size == 0:
        return np.zeros(values.shape, dtype=bool)
    t = np.sort(table)
    pos = np.minimum(np.searchsorted(t, values), t.size - 1)
    return t[pos] == values


def take_per_group(keys: np.ndarray, order_key: np.ndarray, limit: np.ndarray) -> np.ndarray:
    """Mask keeping, per group `keys`, the `limit[key]` items with the largest `order_key`."""
    if keys.size == 0:
        return np.zeros(0, dtype=bool)
    lo, hi = float(order_key.min()), float(order_key.max())
    frac = (hi - order_key) / ((hi - lo) * 1.000001 + 1e-300) if hi > lo else np.zeros(keys.size)
    order = np.argsort(keys + frac)  # group by key, largest order_key first; one float sort
    rank = cumcount(keys[order])
    keep = np.zeros(keys.size, dtype=bool)
    keep[order] = rank < limit[keys[order]]
    return keep


def accept(
    sender: np.ndarray,
    receiver: np.ndarray,
    chunk: np.ndarray,
    slot: np.ndarray,
    prio: np.ndarray,
    budget,
    n_chunks: int,
    once_per_chunk: bool = True,
) -> np.ndarray:
    """Which proposals senders accept this pass.

    Per sender, proposals are taken in decreasing `prio`; a proposal is dropped if the sender already
    sends that chunk this stage (or an earlier proposal does), if it would open a new receiver beyond the
    sender's tau slots left, or if its upload budget is spent.  `slot[i]` is the receiver's position in the
    sender's neighbour row; pairs already served this stage (`budget.served[sender, slot]`) need no new slot.
    `once_per_chunk` keeps the max-flow network's cap of one send of a chunk per sender and stage (warm-up);
    BitTorrent peers may upload one piece to several neighbours at once.
    """
    m = sender.size
    if m == 0:
        return np.zeros(0, dtype=bool)
    order = np.lexsort((-prio, sender))
    s, c, sl = sender[order], chunk[order], slot[order]
    ok = np.ones(m, dtype=bool)
    if once_per_chunk:
        sc = s * n_chunks + c
        ok &= first_occurrence(sc)
        if budget.sent.size:
            ok &= ~member(sc, budget.sent)
    old_pair = budget.served[s, sl]
    pair = s * (budget.served.shape[1]) + sl
    # new receivers get tau slots in priority order (s is sorted, so sub-selections stay grouped)
    fresh = ok & ~old_pair
    idx = np.flatnonzero(fresh & first_occurrence(np.where(fresh, pair, -1 - np.arange(m))))
    if idx.size:
        allowed = np.zeros(budget.served.shape, dtype=bool)
        take = cumcount(s[idx]) < budget.tau_left[s[idx]]
        allowed[s[idx][take], sl[idx][take]] = True
        ok &= old_pair | allowed[s, sl]
    else:
        ok &= old_pair
    idx = np.flatnonzero(ok)
    ok[idx] = cumcount(s[idx]) < budget.up_left[s[idx]]
    out = np.zeros(m, dtype=bool)
    out[order] = ok
    return out


def slot_of(nbr: np.ndarray, peer: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Position of `other` in `peer`'s padded neighbour row (0 if absent, e.g. for spray)."""
    if peer.size == 0:
        return np.zeros(0, dtype=np.int64)
    return np.argmax(nbr[peer] == other[:, None], axis=1)


def choose_holder(w: np.ndarray, feasible: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the feasible neighbour with the highest score: (sender, column); rows with none are -1.

    A 1-D `score` is a per-row random offset in [0, 1): the first feasible column at or after it
    (cyclically) wins, a cheap seeded random choice among holders.
    """
    if score.ndim == 1:
        d = w.shape[1]
        score = -((np.arange(d)[None, :] - np.floor(score * d)[:, None]) % d).astype(np.float64)
    s = np.where(feasible, score, -np.inf)
    col = np.argmax(s, axis=1)
    rows = np.arange(w.shape[0])
    anyf = feasible.any(axis=1)
    snd = np.where(anyf, w[rows, col], -1)
    return snd.astype(np.int64), np.where(anyf, col, -1)
