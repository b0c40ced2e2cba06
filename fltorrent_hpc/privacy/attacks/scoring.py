"""Two ways to score one attack, from one score per (observer o, peer w, update d) triple.

A whole-round attack is a `TripleScorer`: higher = "w owns d" is more likely in o's eyes; -inf rules w out
(or d, read the other way).  It is scored twice, by expected success with ties broken uniformly at random
(an attack that cannot tell candidates apart scores exactly the random-guess rate, never 0 or 1 by an
accident of ordering):

- **U, owner among neighbours**: for each update d owned by a neighbour of o, guess which neighbour owns it
  (argmax over w in N(o)).  U(o) = hits / deg(o); random guessing gives 1/deg(o).
- **per sender target** (the project's framing, PAPER.md §4.6): for each target w (a sender o received
  transfers from), guess which update is w's own (argmax over d, minus updates o knows are not w's).  A
  target whose update o learned from a spray is attributed exactly, as in `Views`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..evidence import RoundEvidence

TripleScorer = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]

TARGET_BLOCK = 1 << 21  # triples scored at once in the per-target framing (memory: ~10 float arrays of this)


@dataclass
class RoundScore:
    """One attack's U and per-target success, per observer (NaN where the observer has nothing to score)."""

    attack: str
    u: np.ndarray  # float [n]: U of each observer (NaN: no neighbour)
    u_abstain: float  # fraction of U items where every candidate neighbour scored the same
    target: np.ndarray  # float [n]: mean success over the observer's targets (NaN: no target)
    targets: int  # targets scored over all observers


def expected_hits(scores: np.ndarray, truth: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per group (contiguous, starting at `starts`): P(a uniform pick among the top-scored is the truth), and
    whether the group carried no information (all scores equal).  An all -inf group scores 0."""
    s = np.where(np.isnan(scores), -np.inf, scores)
    sizes = np.diff(np.append(starts, s.size))
    gmax = np.maximum.reduceat(s, starts)
    gmin = np.minimum.reduceat(s, starts)
    top = s == np.repeat(gmax, sizes)
    ties = np.add.reduceat(top.astype(np.int64), starts)
    hit = np.add.reduceat((top & truth).astype(np.float64), starts)
    success = np.where(gmax > -np.inf, hit / np.maximum(ties, 1), 0.0)
    return success, (gmax == gmin) & np.isfinite(gmax)


def score_u(ev: RoundEvidence, scorer: TripleScorer) -> tuple[np.ndarray, float]:
    """U of every observer, and the fraction of items the attack abstained on (see module docstring)."""
    o, w, d = ev.u_triples()
    u = np.full(ev.n, np.nan)
    if not o.size:
        return u, float("nan")
    starts = np.flatnonzero(np.concatenate([[True], (o[1:] != o[:-1]) | (d[1:] != d[:-1])]))
    success, flat = expected_hits(scorer(o, w, d).astype(np.float64), w == d, starts)
    go = o[starts]
    hits = np.bincount(go, weights=success, minlength=ev.n)
    has = ev.deg > 0
    u[has] = hits[has] / ev.deg[has]
    return u, float(flat.mean())


def overlay_targets(ev: RoundEvidence) -> tuple[np.ndarray, np.ndarray]:
    """(o, w) pairs where o received at least one overlay transfer from w inside the window."""
    ow = np.unique(ev.serve_key // ev.n)
    return ow // ev.n, ow % ev.n


def spray_targets(ev: RoundEvidence) -> tuple[np.ndarray, np.ndarray]:
    """(o, w) pairs where o received a spray hop (phase 0) from w inside the window."""
    ow = np.unique(ev.spray_key // ev.n)
    return ow // ev.n, ow % ev.n


def score_targets(
    ev: RoundEvidence, scorer: TripleScorer, targets: tuple[np.ndarray, np.ndarray]
) -> tuple[np.ndarray, int]:
    """Per observer: mean expected success over its targets of guessing each target's own update."""
    tv, tw = (np.asarray(a, np.int64) for a in targets)
    n = ev.n
    success = np.zeros(tv.size)
    block = max(1, TARGET_BLOCK // max(n, 1))
    d_all = np.arange(n, dtype=np.int64)
    for lo in range(0, tv.size, block):
        v, w = tv[lo : lo + block], tw[lo : lo + block]
        b = v.size
        s = scorer(np.repeat(v, n), np.repeat(w, n), np.tile(d_all, b)).astype(np.float64).reshape(b, n)
        s = np.where(np.isnan(s) | ev.excluded[v], -np.inf, s)
        gmax = s.max(axis=1)
        ties = (s == gmax[:, None]).sum(axis=1)
        own = s[np.arange(b), w]
        success[lo : lo + b] = np.where((gmax > -np.inf) & (own == gmax), 1.0 / np.maximum(ties, 1), 0.0)
    success = np.where(ev.known[tv, tw], 1.0, success)
    tot = np.bincount(tv, minlength=n).astype(np.float64)
    hit = np.bincount(tv, weights=success, minlength=n)
    per = np.divide(hit, tot, out=np.full(n, np.nan), where=tot > 0)
    return per, int(tv.size)


def guess_scorer(n: int, view: np.ndarray, target: np.ndarray, guess: np.ndarray) -> TripleScorer:
    """A per-target attack's guesses as triple scores: 1 where d is the update guessed for (o, w), else 0.

    For U this means: the neighbour(s) whose guessed update is d; if none, every neighbour ties (chance).
    `view` must be the observer's peer id (single-peer views built for observers 0..n-1 in order)."""
    keys = np.asarray(view, np.int64) * n + np.asarray(target, np.int64)
    order = np.argsort(keys)
    keys, g = keys[order], np.asarray(guess, np.int64)[order]

    def score(o: np.ndarray, w: np.ndarray, d: np.ndarray) -> np.ndarray:
        want = o * n + w
        if not keys.size:
            return np.zeros(want.shape)
        pos = np.clip(np.searchsorted(keys, want), 0, keys.size - 1)
        found = keys[pos] == want
        return (found & (g[pos] == d)).astype(np.float64)

    return score


def random_guess_max(rates: np.ndarray, trials: np.ndarray, draws: int = 4000, seed: int = 0) -> float:
    """Expected max over observers of the success rate of a random guesser (observer i: `trials[i]` guesses,
    each right with probability `rates[i]`): the baseline a *max* over observers must be read against."""
    keep = (trials > 0) & np.isfinite(rates)
    if not keep.any():
        return float("nan")
    t, p = trials[keep].astype(np.int64), np.clip(rates[keep], 0.0, 1.0)
    gen = np.random.default_rng(seed)
    return float((gen.binomial(t, p, size=(draws, t.size)) / t).max(axis=1).mean())
