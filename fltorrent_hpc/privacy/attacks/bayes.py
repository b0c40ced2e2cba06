"""Bayesian elimination: a posterior over o's neighbours for the owner of d, from the elimination evidence.

Deterministic elimination (`exclusion`) trusts protocol rules; one owner that breaks a rule once (a gated
start release, a protocol variant) makes it rule the truth out.  This attack learns how much each kind of
evidence says instead.

Likelihood model.  For observer o and an update d owned by one of o's neighbours (uniform prior over N(o)),
each neighbour w contributes four counts n_e(o, w, d):

  ask     chunks of d that w asked o for (o delivered them to w),
  miss    chunks of d missing from w's bitfield at the start of the BitTorrent phase while o or another
          neighbour of o held them,
  warm    chunks of d that w served o during the warm-up,
  expose  chunks of d that w served o in the BitTorrent phase without having them in its public state.

Given the owner, the counts are independent Poisson with rate lambda_e^own for the owner and lambda_e^oth
for every other neighbour, so

  P(owner = w | evidence) ∝ prod_e (lambda_e^own / lambda_e^oth) ** n_e(o, w, d).

The rates are fitted by EM over every (observer, neighbour-owned update) of the round without the ground
truth: each update has exactly one owner among the observer's neighbours, which makes the mixture
identifiable.  An attacker can fit the same rates on rounds it simulates itself (the protocol is public),
so pooling over observers gives it nothing it could not have.  A Gamma(1/2, 1) prior on each rate keeps a
never-seen event (an owner that never asks for its own update, under "paper") at a small rate rather than
zero; the posterior is then nearly deterministic, but an owner that broke a rule once is outranked only by
neighbours with fewer contradictions.  Two starts (owners show less / more of every count) and the one with
the higher marginal likelihood is kept.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..evidence import RoundEvidence
from .exclusion import exposures, warmup_serves
from .scoring import TripleScorer

EVIDENCE = ("ask", "miss", "warm", "expose")
PRIOR_SHAPE, PRIOR_RATE = 0.5, 1.0
Counts = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


@dataclass
class PoissonFit:
    """Fitted rates per evidence kind (order `EVIDENCE`) and the marginal log-likelihood of the fit."""

    own: np.ndarray
    other: np.ndarray
    loglik: float
    iterations: int

    @property
    def log_ratio(self) -> np.ndarray:
        return np.log(self.own) - np.log(self.other)


def evidence_counts(ev: RoundEvidence) -> Counts:
    """A function (o, w, d) -> float [T, 4] of the counts in `EVIDENCE` order."""
    wk, wn = warmup_serves(ev)
    xk, xn = exposures(ev)

    def counts(o: np.ndarray, w: np.ndarray, d: np.ndarray) -> np.ndarray:
        keys = ev.key(o, w, d)
        return np.stack(
            [ev.ask_count(o, w, d), ev.miss(o, w, d), ev.lookup(wk, wn, keys, 0.0), ev.lookup(xk, xn, keys, 0.0)],
            axis=1,
        )

    return counts


def _group_softmax(logits: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sizes = np.diff(np.append(starts, logits.size))
    top = np.maximum.reduceat(logits, starts)
    e = np.exp(logits - np.repeat(top, sizes))
    z = np.add.reduceat(e, starts)
    return e / np.repeat(z, sizes), top + np.log(z)


def fit_rates(x: np.ndarray, starts: np.ndarray, iterations: int = 200, tol: float = 1e-9) -> PoissonFit:
    """EM for the one-owner-per-group Poisson mixture (see module docstring); `x` is [T, E] counts, groups
    are contiguous rows starting at `starts`."""
    sizes = np.diff(np.append(starts, x.shape[0]))
    mean = (x.sum(axis=0) + PRIOR_SHAPE) / (x.shape[0] + PRIOR_RATE)
    best: PoissonFit | None = None
    for factor in (0.5, 2.0):
        own, oth = mean * factor, mean.copy()
        prev = ll = -np.inf
        done = 0
        while done < iterations:
            done += 1
            logits = x @ (np.log(own) - np.log(oth))
            r, lse = _group_softmax(logits, starts)
            ll = float(
                (lse - np.log(sizes)).sum() + (x @ np.log(oth) - oth.sum()).sum() - starts.size * (own - oth).sum()
            )
            rs = r.sum()
            own = (r @ x + PRIOR_SHAPE) / (rs + PRIOR_RATE)
            oth = ((1.0 - r) @ x + PRIOR_SHAPE) / (x.shape[0] - rs + PRIOR_RATE)
            if abs(ll - prev) <= tol * max(1.0, abs(ll)):
                break
            prev = ll
        fit = PoissonFit(own, oth, ll, done)
        if best is None or fit.loglik > best.loglik:
            best = fit
    assert best is not None
    return best


def bayes_fit(ev: RoundEvidence) -> tuple[PoissonFit, Counts]:
    """The fitted model and the evidence-count function of `ev`."""
    counts = evidence_counts(ev)
    o, w, d = ev.u_triples()
    if not o.size:
        return PoissonFit(np.ones(len(EVIDENCE)), np.ones(len(EVIDENCE)), 0.0, 0), counts
    starts = np.flatnonzero(np.concatenate([[True], (o[1:] != o[:-1]) | (d[1:] != d[:-1])]))
    return fit_rates(counts(o, w, d), starts), counts


def bayes_scores(ev: RoundEvidence) -> TripleScorer:
    """Score = log posterior odds of "w owns d" (up to a per-(o, d) constant) under the fitted rates."""
    fit, counts = bayes_fit(ev)
    lr = fit.log_ratio

    def score(o: np.ndarray, w: np.ndarray, d: np.ndarray) -> np.ndarray:
        return counts(o, w, d) @ lr

    return score
