"""What one slot of a round is made of: phase codes, the `Stage` of transfers, and the bookkeeping its passes share.

The stage deciders (warmup.py, bittorrent.py, maxflow.py) read and update a round through `RoundState`,
the part of `SwarmRound` they use, so they never import round.py: round.py drives them, not the other way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from ..config import SwarmConfig
from .bt_kernel import book, set_pending

SPRAY, WARMUP, BT = 0, 1, 2
"""Phase of a round and kind of a transfer: pre-round spray, tracker-scheduled warm-up, BitTorrent."""


@dataclass
class Stage:
    """The transfers of one slot.  `kind` per transfer: 0 spray, 1 warm-up, 2 BitTorrent."""

    index: int
    phase: int
    sender: np.ndarray
    receiver: np.ndarray
    chunk: np.ndarray
    kind: np.ndarray
    sender_owned: np.ndarray
    sender_buffer: np.ndarray
    capacity: int
    release_peer: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    release_chunk: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    maxflow: int = -1

    @property
    def size(self) -> int:
        return int(self.sender.size)


class Collector:
    """Accumulates a stage's accepted transfers across passes."""

    def __init__(self) -> None:
        self.parts: list[tuple[np.ndarray, ...]] = []

    def add(self, s, r, c, kind, owned, buf) -> None:
        if np.size(s):
            self.parts.append(tuple(np.asarray(a, dtype=np.int64) for a in (s, r, c, kind, owned, buf)))

    def arrays(self) -> list[np.ndarray]:
        if not self.parts:
            return [np.zeros(0, np.int64) for _ in range(6)]
        return [np.concatenate([p[i] for p in self.parts]) for i in range(6)]

    def __len__(self) -> int:
        return int(sum(p[0].size for p in self.parts))


class RoundState(Protocol):
    """The round as the stage deciders see it (implemented by `SwarmRound`; see round.py for meanings)."""

    cfg: SwarmConfig
    n: int
    K: int
    N: int
    k: int
    seed: int
    stage: int
    phase: int
    gating: bool
    hidden: bool
    compute_maxflow: bool
    maxflow_every: int
    up: np.ndarray
    down: np.ndarray
    active: np.ndarray
    nbr: np.ndarray
    deg: np.ndarray
    have: np.ndarray
    hbits: np.ndarray
    tbits: np.ndarray
    pbits: np.ndarray
    held: np.ndarray
    recip: np.ndarray
    spray: dict[str, np.ndarray]
    win: np.ndarray
    in_window: np.ndarray
    rlist: np.ndarray
    rlen: np.ndarray
    acc_est: np.ndarray
    warm_mark: np.ndarray
    warm_stamp: int
    bt_want: np.ndarray | None
    bt_stats: np.ndarray

    @property
    def received(self) -> np.ndarray: ...

    @property
    def owned_eligible(self) -> np.ndarray: ...

    def slot_tables(self) -> tuple[np.ndarray, np.ndarray]: ...

    def eligible(self, w: np.ndarray, c: np.ndarray) -> np.ndarray: ...

    def may_send(self) -> np.ndarray: ...

    banned_by: dict[int, set[int]] | None

    def _replan_seeds(self, banned: dict[int, set[int]] | None = None) -> None: ...

    def capacity(self) -> int: ...

    def gated_release(self) -> tuple[np.ndarray, np.ndarray]: ...


class StageBudget:
    """Residual budgets and per-stage bookkeeping shared by the passes of one stage (padded with sentinel n)."""

    def __init__(self, rnd: RoundState):
        n = rnd.n
        act = rnd.active[:n]
        self.up_left = np.zeros(n + 1, dtype=np.int64)
        self.up_left[:n] = np.where(act, rnd.up, 0)
        self.down_left = np.zeros(n + 1, dtype=np.int64)
        self.down_left[:n] = np.where(act, rnd.down, 0)
        self.tau_left = np.full(n + 1, rnd.cfg.tau, dtype=np.int64)
        self.served = np.zeros((n + 1, rnd.nbr.shape[1]), dtype=bool)  # [sender, receiver slot] this stage
        self.can_send = np.zeros(n + 1, dtype=bool)
        self.can_send[:n] = rnd.may_send()
        self.sent = np.zeros(0, dtype=np.int64)  # sender*N + chunk
        self.pending = np.zeros(0, dtype=np.int64)  # receiver*N + chunk
        # the same as per-peer lists for the compiled passes: chunks each peer sends / is sent this stage
        self.sent_c = np.empty((n + 1, int(min(rnd.up.max(), rnd.N)) + 1), dtype=np.int64)
        self.sent_len = np.zeros(n + 1, dtype=np.int64)
        self.pbits = rnd.pbits  # chunks scheduled to each peer this stage (shared; cleared by rnd.complete)
        self.n, self.N = n, rnd.N

    def copy(self) -> StageBudget:
        out = object.__new__(StageBudget)
        out.__dict__.update(
            {k: (v.copy() if hasattr(v, "copy") and k != "pbits" else v) for k, v in self.__dict__.items()}
        )
        return out

    def commit(self, s: np.ndarray, r: np.ndarray, c: np.ndarray, slot: np.ndarray | None = None) -> None:
        """Book accepted transfers; `slot` (receiver's position in the sender's row) charges tau, None skips it."""
        n = self.n
        self.up_left[:n] -= np.bincount(s, minlength=n + 1)[:n]
        self.down_left[:n] -= np.bincount(r, minlength=n + 1)[:n]
        if slot is not None and s.size:
            fresh = ~self.served[s, slot]
            pairs = np.unique(s[fresh] * self.served.shape[1] + slot[fresh])
            self.tau_left[:n] -= np.bincount(pairs // self.served.shape[1], minlength=n + 1)[:n]
            self.served[s, slot] = True
        self.sent = np.concatenate([self.sent, s * self.N + c])
        self.pending = np.concatenate([self.pending, r * self.N + c])
        book(self.sent_c, self.sent_len, s, c)
        set_pending(self.pbits, r, c, True)
