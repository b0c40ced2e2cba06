"""Privacy evaluation of FLTorrent rounds (PAPER.md §4), on the same HDF5 traces the simulator and MPI write.

- observations: what each receiver / coalition sees (the observation-only adversary), public holdings
- evidence: everything one peer observes over the round, per (observer, peer, update)
- attacks: the registry `ATTACKS` (the paper's Sequence, Count, Cluster and the whole-round attacks), scored as
  U (owner among neighbours) and per sender target
- bounds: Eq. 1 on every warm-up transfer, Eq. 2 from the trace's spray mass, lags and degree, Eq. 3-5
- audit: commit-then-reveal tracker log and its verification (fail-open on failure)
- cli: `fltorrent attack`; sweeps / plots: the privacy study of the paper's Figs. 6-7

See docs/PRIVACY.md for the exact definitions.
"""

from .attacks import (
    ATTACKS,
    PAPER_ATTACKS,
    Attribution,
    Elimination,
    cluster_attack,
    count_attack,
    elimination_attack,
    run_attacks,
    run_round_attacks,
    sequence_attack,
)
from .audit import AuditReport, Commitment, RoundLog, audit_trace, commit, round_log, verify
from .bounds import CollusionEval, Eq1Check, Eq2Eval, check_eq1, eval_collusion, eval_eq2
from .evidence import RoundEvidence, build_evidence
from .observations import (
    AdversaryModel,
    PublicHoldings,
    Views,
    bt_start,
    build_views,
    observation_window,
    protocol_of,
    public_holdings,
    random_coalitions,
)

__all__ = [
    "ATTACKS",
    "PAPER_ATTACKS",
    "AdversaryModel",
    "Attribution",
    "AuditReport",
    "CollusionEval",
    "Commitment",
    "Eq1Check",
    "Elimination",
    "Eq2Eval",
    "PublicHoldings",
    "RoundEvidence",
    "RoundLog",
    "Views",
    "audit_trace",
    "bt_start",
    "build_evidence",
    "build_views",
    "check_eq1",
    "cluster_attack",
    "commit",
    "count_attack",
    "elimination_attack",
    "eval_collusion",
    "eval_eq2",
    "observation_window",
    "protocol_of",
    "public_holdings",
    "random_coalitions",
    "round_log",
    "run_attacks",
    "run_round_attacks",
    "sequence_attack",
    "verify",
]
