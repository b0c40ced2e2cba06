"""What every attribution attack shares: the `Attribution` result and the per-(view, sender) bookkeeping.

Each attack makes one guess per target (a sender pseudonym a view observed): "descriptor d is this
sender's own update".  The guess is correct iff d == sender (descriptor id = owner id in a trace).
ASR of a view = correct guesses / targets.  A target left without any admissible candidate (every
descriptor it sent is known to belong to someone else) counts as a wrong guess: the attack abstains.
Targets the view learned from a spray hop (`Views.known`) are attributed exactly by every attack.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..observations import Views


@dataclass
class Attribution:
    """One guess per (view, target) pair; guess -1 = abstained."""

    attack: str
    view: np.ndarray
    target: np.ndarray
    guess: np.ndarray
    n_views: int

    @property
    def correct(self) -> np.ndarray:
        return self.guess == self.target

    def asr_per_view(self) -> np.ndarray:
        """Attribution success rate of every view (NaN for a view that observed no sender)."""
        tot = np.bincount(self.view, minlength=self.n_views).astype(np.float64)
        hit = np.bincount(self.view, weights=self.correct.astype(np.float64), minlength=self.n_views)
        return np.divide(hit, tot, out=np.full(self.n_views, np.nan), where=tot > 0)


def admissible(views: Views) -> np.ndarray:
    """Rows whose descriptor the view has not already ruled out (its own, or known to be someone else's)."""
    return ~views.excluded[views.view, views.desc]


def finish(views: Views, name: str, guess: np.ndarray) -> Attribution:
    """Wrap per-pair guesses, overriding the targets a spray hop revealed (attributed exactly)."""
    guess = guess.copy()
    known = views.known[views.pair_view, views.pair_sender]
    guess[known] = views.pair_sender[known]
    return Attribution(name, views.pair_view, views.pair_sender, guess, views.n_views)


def pair_desc_stats(views: Views, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Unique (pair, descriptor) among `rows`: pair, descriptor, count, rank of its first row in the pair."""
    n = views.n_peers
    key = views.pair[rows].astype(np.int64) * n + views.desc[rows]
    uniq, first, counts = np.unique(key, return_index=True, return_counts=True)
    pair = uniq // n
    desc = uniq % n
    rank = rows[first] - views.pair_start[pair]
    return pair, desc, counts, rank
