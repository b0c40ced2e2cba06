"""Coalitions of attackers that each attack alone: the paper's "any succeeds" reading of Fig. 7(d)."""

from __future__ import annotations

import numpy as np

from .base import Attribution


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
