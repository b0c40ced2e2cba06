"""Cluster attack (PAPER.md §4.6): match senders to updates one-to-one on per-pair features.

Every (sender u, descriptor d) pair of a view gets three features: frequency f = share of u's stream that
is d, specificity s = share of d's deliveries to the view that came from u, earliness e = 1 - (rank of d's
first arrival in u's stream) / (u's stream length).  Senders are then assigned to descriptors one-to-one
(each update has exactly one owner) by a maximum-weight assignment on f * s * (1 + e) / 2: an owner's stream
is dominated by its update, it is the main source of that update early on, and (without defences) it sends
it first.  The product keeps a sender that delivered a descriptor once from looking like its owner.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from ..observations import Views
from .base import Attribution, admissible, finish, pair_desc_stats


def cluster_attack(views: Views) -> Attribution:
    """Match senders to updates one-to-one on frequency, specificity and earliness features."""
    guess = np.full(views.n_pairs, -1, dtype=np.int64)
    rows = np.flatnonzero(admissible(views))
    if not rows.size:
        return finish(views, "cluster", guess)
    n = views.n_peers
    pair, desc, counts, rank = pair_desc_stats(views, rows)
    stream = np.bincount(views.pair[rows], minlength=views.n_pairs).astype(np.float64)
    freq = counts / stream[pair]  # share of the sender's stream that is this update
    pview = views.pair_view[pair]
    vd = pview * n + desc
    per_desc = np.bincount(vd, weights=counts, minlength=views.n_views * n)
    spec = counts / per_desc[vd]  # share of this update's deliveries (to the view) made by this sender
    early = 1.0 - rank / stream[pair]  # 1 for the sender's first admissible chunk, -> 0 for its last
    score_all = freq * spec * (0.5 + 0.5 * early)
    known_pair = views.known[views.pair_view, views.pair_sender]
    # pairs are numbered view-major, so each view's (pair, desc) entries form one contiguous block
    bounds = np.searchsorted(pview, np.arange(views.n_views + 1))
    for v in range(views.n_views):
        lo, hi = bounds[v], bounds[v + 1]
        free = ~known_pair[pair[lo:hi]]
        p, d, sc = pair[lo:hi][free], desc[lo:hi][free], score_all[lo:hi][free]
        if not p.size:
            continue
        up, pi = np.unique(p, return_inverse=True)
        ud, di = np.unique(d, return_inverse=True)
        score = np.full((up.size, ud.size), -1.0)  # a sender is never matched to an update it never sent
        score[pi, di] = sc
        r, c = linear_sum_assignment(score, maximize=True)
        good = score[r, c] >= 0
        guess[up[r[good]]] = ud[c[good]]
    return finish(views, "cluster", guess)
