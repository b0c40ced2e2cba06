"""Privacy evaluation of FLTorrent rounds (PAPER.md §4), on the same HDF5 traces the simulator and MPI write.

- observations: what each receiver / coalition sees (the observation-only adversary)
- attacks: Sequence, Count and Cluster attribution attacks, ASR per view
- bounds: Eq. 1 on every warm-up transfer, Eq. 2 from the trace's spray mass, lags and degree, Eq. 3-5
- audit: commit-then-reveal tracker log and its verification (fail-open on failure)
- cli: `fltorrent attack`; sweeps / plots: the privacy study of the paper's Figs. 6-7

See docs/PRIVACY.md for the exact definitions.
"""

from .attacks import (
    ATTACKS,
    Attribution,
    Elimination,
    cluster_attack,
    count_attack,
    elimination_attack,
    run_attacks,
    sequence_attack,
)
from .audit import AuditReport, Commitment, RoundLog, audit_trace, commit, round_log, verify
from .bounds import CollusionEval, Eq1Check, Eq2Eval, check_eq1, eval_collusion, eval_eq2
from .observations import AdversaryModel, Views, build_views, observation_window, random_coalitions

__all__ = [
    "ATTACKS",
    "AdversaryModel",
    "Attribution",
    "AuditReport",
    "CollusionEval",
    "Commitment",
    "Eq1Check",
    "Elimination",
    "Eq2Eval",
    "RoundLog",
    "Views",
    "audit_trace",
    "build_views",
    "check_eq1",
    "cluster_attack",
    "commit",
    "count_attack",
    "elimination_attack",
    "eval_collusion",
    "eval_eq2",
    "observation_window",
    "random_coalitions",
    "round_log",
    "run_attacks",
    "sequence_attack",
    "verify",
]
