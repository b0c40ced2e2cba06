"""Timing: the neighbour that showed o chunks of d earliest, relative to the other neighbours, owns d.

For each neighbour w and chunk c of d, o's earliest evidence that w held c is the stage w served c to o, or
the stage c appeared in w's public state (its bitfield at the start of the BitTorrent phase, or a later
have-message), whichever came first; never seen = the end of the window.  T(o, w, d) is the mean over d's
chunks.  An owner under the paper's protocol shows its whole update at the first BitTorrent stage while
relays show d chunk by chunk.  The score is the lead of w over the mean T of o's neighbours on d, so the
per-target framing compares updates on how far ahead of the others w was (U only needs the order of T).
"""

from __future__ import annotations

import numpy as np

from ..evidence import RoundEvidence
from .scoring import TripleScorer


def timing_scores(ev: RoundEvidence) -> TripleScorer:
    """Score = mean over o's neighbours of T(o, ., d) minus T(o, w, d), in stages."""
    n, K = ev.n, max(ev.K, 1)
    gain = np.minimum(ev.serve_stage - ev.serve_pubvis, 0).astype(np.float64)  # served before it was public
    uniq, corr = ev.row_sums(np.arange(ev.serve_key.size), gain)
    od = (uniq // (n * n)) * n + uniq % n
    corr_od = np.bincount(od, weights=corr, minlength=n * n).reshape(n, n)
    mean_t = (ev.adj.astype(np.float64) @ ev.vis_sum + corr_od) / (K * np.maximum(ev.deg, 1))[:, None]

    def score(o: np.ndarray, w: np.ndarray, d: np.ndarray) -> np.ndarray:
        t = (ev.vis_sum[w, d] + ev.lookup(uniq, corr, ev.key(o, w, d), 0.0)) / K
        return mean_t[o, d] - t

    return score
