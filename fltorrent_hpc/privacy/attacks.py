"""The three observation-only attribution attacks of PAPER.md §4.6, vectorised over all views at once.

Each attack makes one guess per target (a sender pseudonym a view observed): "descriptor d is this
sender's own update".  The guess is correct iff d == sender (descriptor id = owner id in a trace).
ASR of a view = correct guesses / targets.  A target left without any admissible candidate (every
descriptor it sent is known to belong to someone else) counts as a wrong guess: the attack abstains.

- Sequence: the first admissible chunk received from the sender names its update.
- Count: the admissible descriptor the sender delivered most often in its first `horizon` transfers
  (all of the window by default); ties go to the one that arrived first.
- Cluster: every (sender u, descriptor d) pair of a view gets three features: frequency f = share of u's
  stream that is d, specificity s = share of d's deliveries to the view that came from u, earliness
  e = 1 - (rank of d's first arrival in u's stream) / (u's stream length).  Senders are then assigned to
  descriptors one-to-one (each update has exactly one owner) by a maximum-weight assignment on
  f * s * (1 + e) / 2: an owner's stream is dominated by its update, it is the main source of that update
  early on, and (without defences) it sends it first.  The product keeps a sender that delivered a
  descriptor once from looking like its owner.

Targets the view learned from a spray hop (`Views.known`) are attributed exactly by every attack.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from .observations import Views

ATTACKS = ("sequence", "count", "cluster")


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


def _admissible(views: Views) -> np.ndarray:
    return ~views.excluded[views.view, views.desc]


def _finish(views: Views, name: str, guess: np.ndarray) -> Attribution:
    guess = guess.copy()
    known = views.known[views.pair_view, views.pair_sender]
    guess[known] = views.pair_sender[known]
    return Attribution(name, views.pair_view, views.pair_sender, guess, views.n_views)


def sequence_attack(views: Views) -> Attribution:
    """Label the first admissible chunk from each sender as the sender's own."""
    guess = np.full(views.n_pairs, -1, dtype=np.int64)
    ok = np.flatnonzero(_admissible(views))
    if ok.size:
        pairs, first = np.unique(views.pair[ok], return_index=True)  # rows are in arrival order per pair
        guess[pairs] = views.desc[ok[first]]
    return _finish(views, "sequence", guess)


def _pair_desc_stats(views: Views, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Unique (pair, descriptor) among `rows`: pair, descriptor, count, rank of its first row in the pair."""
    n = views.n_peers
    key = views.pair[rows].astype(np.int64) * n + views.desc[rows]
    uniq, first, counts = np.unique(key, return_index=True, return_counts=True)
    pair = uniq // n
    desc = uniq % n
    rank = rows[first] - views.pair_start[pair]
    return pair, desc, counts, rank


def count_attack(views: Views, horizon: int | None = None) -> Attribution:
    """Attribute each sender to its most frequent admissible descriptor among its early transfers."""
    guess = np.full(views.n_pairs, -1, dtype=np.int64)
    rows = np.arange(views.view.size)
    if horizon is not None:
        rows = rows[(rows - views.pair_start[views.pair]) < horizon]
    rows = rows[_admissible(views)[rows]]
    if rows.size:
        pair, desc, counts, rank = _pair_desc_stats(views, rows)  # grouped by pair
        # per pair: most frequent, then earliest (ranks are distinct within a pair, so the best is unique)
        span = int(rank.max()) + 1
        score = counts.astype(np.int64) * span + (span - 1 - rank)
        starts = np.flatnonzero(np.concatenate([[True], pair[1:] != pair[:-1]]))
        best = np.maximum.reduceat(score, starts)
        win = score == np.repeat(best, np.diff(np.append(starts, pair.size)))
        guess[pair[win]] = desc[win]
    return _finish(views, "count", guess)


def cluster_attack(views: Views) -> Attribution:
    """Match senders to updates one-to-one on frequency, specificity and earliness features."""
    guess = np.full(views.n_pairs, -1, dtype=np.int64)
    rows = np.flatnonzero(_admissible(views))
    if not rows.size:
        return _finish(views, "cluster", guess)
    n = views.n_peers
    pair, desc, counts, rank = _pair_desc_stats(views, rows)
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
    return _finish(views, "cluster", guess)


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
    rows = np.flatnonzero(_admissible(views))
    pair, desc, _, _ = _pair_desc_stats(views, rows)
    distinct = np.bincount(pair, minlength=views.n_pairs)
    own_seen = np.zeros(views.n_pairs, dtype=bool)
    own_seen[pair[desc == views.pair_sender[pair]]] = True
    n_excl = views.excluded.sum(axis=1)[views.pair_view]
    cand = n - n_excl - distinct
    known = views.known[views.pair_view, views.pair_sender]
    success = np.where(known, 1.0, np.where(own_seen | (cand <= 0), 0.0, 1.0 / np.maximum(cand, 1)))
    return Elimination(views.pair_view, views.pair_sender, np.where(known, 1, cand), success, views.n_views)


def run_attacks(views: Views, count_horizon: int | None = None) -> dict[str, Attribution]:
    """All three attacks on the same views."""
    return {
        "sequence": sequence_attack(views),
        "count": count_attack(views, horizon=count_horizon),
        "cluster": cluster_attack(views),
    }


def any_member_success(
    n_peers: int, individual: dict[str, Attribution], coalitions: list[np.ndarray]
) -> dict[str, np.ndarray]:
    """Per coalition: fraction of its targets that at least one member, attacking alone, attributes correctly.

    `individual` are attributions on single-receiver views indexed by peer id (view i = peer i);
    this is the paper's "any succeeds" reading of Fig. 7(d).
    """
    out: dict[str, np.ndarray] = {}
    n = n_peers
    for name, att in individual.items():
        hit = np.zeros((n, n), dtype=bool)  # [member, target]
        seen = np.zeros((n, n), dtype=bool)
        hit[att.view, att.target] = att.correct
        seen[att.view, att.target] = True
        vals = []
        for c in coalitions:
            targets = seen[c].any(axis=0)
            targets[c] = False
            got = hit[c].any(axis=0) & targets
            vals.append(got.sum() / targets.sum() if targets.any() else np.nan)
        out[name] = np.array(vals)
    return out
