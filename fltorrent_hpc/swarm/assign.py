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
    _, idx = np.unique(codes, return_index=True)
    mask = np.zeros(codes.size, dtype=bool)
    mask[idx] = True
    return mask


def take_per_group(keys: np.ndarray, order_key: np.ndarray, limit: np.ndarray) -> np.ndarray:
    """Mask keeping, per group `keys`, the `limit[key]` items with the largest `order_key`."""
    if keys.size == 0:
        return np.zeros(0, dtype=bool)
    order = np.lexsort((-order_key, keys))
    rank = cumcount(keys[order])
    keep = np.zeros(keys.size, dtype=bool)
    keep[order] = rank < limit[keys[order]]
    return keep


def holder_matrix(
    have: np.ndarray, nbr: np.ndarray, recv: np.ndarray, chunk: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(W, H): W[i, j] = j-th neighbour of recv[i]; H[i, j] = that neighbour holds chunk[i]."""
    w = nbr[recv]
    h = have[w, chunk[:, None]]
    return w, h


def accept(
    sender: np.ndarray,
    receiver: np.ndarray,
    chunk: np.ndarray,
    prio: np.ndarray,
    up_left: np.ndarray,
    tau_left: np.ndarray,
    served_pairs: set[int] | np.ndarray,
    sent_codes: np.ndarray,
    n_peers: int,
    n_chunks: int,
) -> np.ndarray:
    """Which proposals senders accept this pass.

    Per sender, proposals are taken in decreasing `prio`; a proposal is dropped if the sender already
    sends that chunk this stage (`sent_codes`, or an earlier proposal), if it would open a new receiver
    beyond `tau_left[sender]`, or if the sender's `up_left` is spent.  Pairs already served this stage
    (`served_pairs`, codes sender*n+receiver) do not use a new tau slot.
    """
    m = sender.size
    if m == 0:
        return np.zeros(0, dtype=bool)
    order = np.lexsort((-prio, sender))
    s, r, c = sender[order], receiver[order], chunk[order]
    ok = np.ones(m, dtype=bool)
    sc = s.astype(np.int64) * n_chunks + c
    ok &= first_occurrence(sc)
    if sent_codes.size:
        ok &= ~np.isin(sc, sent_codes)
    pair = s.astype(np.int64) * n_peers + r
    served = np.asarray(sorted(served_pairs) if isinstance(served_pairs, set) else served_pairs, dtype=np.int64)
    old_pair = np.isin(pair, served) if served.size else np.zeros(m, dtype=bool)
    # new receivers get tau slots in priority order (s is sorted, so sub-selections stay grouped)
    fresh = ok & ~old_pair
    idx = np.flatnonzero(fresh & first_occurrence(np.where(fresh, pair, -1 - np.arange(m))))
    if idx.size:
        allowed = pair[idx][cumcount(s[idx]) < tau_left[s[idx]]]
        ok &= old_pair | np.isin(pair, allowed)
    else:
        ok &= old_pair
    idx = np.flatnonzero(ok)
    ok[idx] = cumcount(s[idx]) < up_left[s[idx]]
    out = np.zeros(m, dtype=bool)
    out[order] = ok
    return out


def choose_holder(w: np.ndarray, feasible: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the feasible neighbour with the highest score: (sender, column); rows with none are -1."""
    s = np.where(feasible, score, -np.inf)
    col = np.argmax(s, axis=1)
    rows = np.arange(w.shape[0])
    anyf = feasible.any(axis=1)
    snd = np.where(anyf, w[rows, col], -1)
    return snd.astype(np.int64), np.where(anyf, col, -1)
