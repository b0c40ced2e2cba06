"""Elimination: a protocol-aware reference attack (not in the paper), scored as an expected success.

It is not in `ATTACKS` because it does not make one guess per target: it counts the candidates left.  Its rule
("a sender serves none of its own chunks") holds only inside a gated warm-up, so `evaluate_trace` judges it there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..observations import Views
from .base import admissible, pair_desc_stats


@dataclass
class Elimination:
    """Protocol-aware reference attack: per target, the candidate updates left and the expected success."""

    view: np.ndarray
    target: np.ndarray
    candidates: np.ndarray  # updates not ruled out (1 when a spray revealed the target)
    success: np.ndarray  # expected success of a uniform guess among the candidates
    n_views: int

    def asr_per_view(self) -> np.ndarray:
        tot = np.bincount(self.view, minlength=self.n_views).astype(np.float64)
        hit = np.bincount(self.view, weights=self.success, minlength=self.n_views)
        return np.divide(hit, tot, out=np.full(self.n_views, np.nan), where=tot > 0)


def elimination_attack(views: Views) -> Elimination:
    """Rule out every update the target served in the window, then guess uniformly among the rest.

    This adversary knows the mechanism: with cover-set gating an honest sender serves none of its own chunks
    before its eligible buffer reaches k, so every update it was seen serving is someone else's (as are the
    view's own and spray-revealed ones).  Where the heuristics above score 0 because owners never serve their
    own chunks early, this gives the real residual risk: 1 / (size of the anonymity set).  If the target did
    serve its own update inside the window (its gate opened), the elimination rules the truth out and the
    expected success is 0, which is counted as such.
    """
    n = views.n_peers
    rows = np.flatnonzero(admissible(views))
    pair, desc, _, _ = pair_desc_stats(views, rows)
    distinct = np.bincount(pair, minlength=views.n_pairs)
    own_seen = np.zeros(views.n_pairs, dtype=bool)
    own_seen[pair[desc == views.pair_sender[pair]]] = True
    n_excl = views.excluded.sum(axis=1)[views.pair_view]
    cand = n - n_excl - distinct
    known = views.known[views.pair_view, views.pair_sender]
    success = np.where(known, 1.0, np.where(own_seen | (cand <= 0), 0.0, 1.0 / np.maximum(cand, 1)))
    return Elimination(views.pair_view, views.pair_sender, np.where(known, 1, cand), success, views.n_views)
