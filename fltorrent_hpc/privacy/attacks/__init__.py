"""The observation-only attribution attacks of PAPER.md §4.6, vectorised over all views at once.

`ATTACKS` is the registry: attack name -> function(views, **options) -> Attribution, in the order reports
list them.  A new attack is one new module in this package plus one line in the table below.

- sequence: the first admissible chunk received from the sender names its update.
- count: the admissible descriptor the sender delivered most often early on.
- cluster: a one-to-one maximum-weight matching of senders to updates on frequency, specificity, earliness.

Beside them: `elimination_attack` (a protocol-aware reference, scored as an expected success) and
`any_member_success` (coalitions whose members attack alone).  Shared bookkeeping is in `base`.
"""

from __future__ import annotations

from collections.abc import Callable

from ..observations import Views
from .base import Attribution
from .cluster import cluster_attack
from .coalition import any_member_success
from .count import count_attack
from .elimination import Elimination, elimination_attack
from .sequence import sequence_attack

Attack = Callable[..., Attribution]

ATTACKS: dict[str, Attack] = {
    "sequence": sequence_attack,
    "count": count_attack,
    "cluster": cluster_attack,
}


def run_attacks(views: Views, count_horizon: int | None = None) -> dict[str, Attribution]:
    """Every registered attack on the same views (`count_horizon` limits the count attack's early window)."""
    options: dict[str, dict[str, object]] = {"count": {"horizon": count_horizon}}
    return {name: attack(views, **options.get(name, {})) for name, attack in ATTACKS.items()}


__all__ = [
    "ATTACKS",
    "Attack",
    "Attribution",
    "Elimination",
    "any_member_success",
    "cluster_attack",
    "count_attack",
    "elimination_attack",
    "run_attacks",
    "sequence_attack",
]
