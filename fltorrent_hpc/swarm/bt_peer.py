"""One peer's side of a BitTorrent stage, sans-IO: `bt_kernel.bt_pass`'s decisions from local knowledge.

A real rank (engine_bt.py) holds a `PeerBT` for itself.  What it knows: its own have row, its neighbours'
have bits (bitfields at the start of the phase, then have-deltas after every stage), the budgets and
activity of its neighbours (budgets from the round's descriptors, then what each announces between
passes), and the requests, grants and keep notices its neighbours send it.  Each pass is four steps that
alternate with neighbour exchanges:

    requests()  -> send each neighbour the chunks asked of it          (receiver side)
    grant()     -> answer each requester: which of its requests granted (sender side)
    settle()    -> endgame keeps one grant per chunk; refusals choke    (receiver side)
    commit()    -> book the kept grants on the sender's budget          (sender side)

The compiled helpers are bt_kernel's own (`_bt_requests`, `_bt_grant`), fed the same inputs in the same
order as in `bt_pass`, so the decisions equal the simulator's (tests/mpi/test_engine.py compares traces).
Arrays keep global peer indices (row n pads neighbour lists); only this peer's rows and its neighbours'
bits are ever filled.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ..config import BT_GRANTS, SwarmConfig
from . import rng
from .bittorrent import MAX_DRAWS, OVERSAMPLE, request_pipeline
from .bt_kernel import _bt_grant, _bt_requests, _h, _mix, _unif, key_base, reverse_slots, set_pending


@njit(cache=True)
def _keep_draw(sb, s, N, c):
    """The endgame draw of bt_pass (typed as there: uint64 key, int64 ids)."""
    return _unif(_h(sb, s * N + c, 5))


def pack_bits(mask: np.ndarray) -> np.ndarray:
    """Bool vector -> uint64 words, bit i in word i // 64 at position i % 64 (the kernels' bit rows)."""
    m = np.asarray(mask, dtype=bool).reshape(-1)
    padded = np.zeros((m.size + 63) // 64 * 64, dtype=bool)
    padded[: m.size] = m
    return np.packbits(padded, bitorder="little").view("<u8").astype(np.uint64)


def unpack_bits(words: np.ndarray, size: int) -> np.ndarray:
    """Inverse of pack_bits."""
    raw = np.ascontiguousarray(words, dtype=np.uint64).astype("<u8").view(np.uint8)
    return np.unpackbits(raw, bitorder="little")[:size].astype(bool)


class PeerBT:
    """Peer `me`'s BitTorrent state for one round (global indices; see the module docstring)."""

    def __init__(
        self,
        cfg: SwarmConfig,
        me: int,
        nbr: np.ndarray,
        K: int,
        up: np.ndarray,
        down: np.ndarray,
        seed: int,
        have_row: np.ndarray,
        got_from: np.ndarray,
    ):
        n = up.size
        self.cfg, self.me, self.n, self.K, self.N, self.seed = cfg, int(me), n, int(K), n * int(K), int(seed)
        self.nbr = np.ascontiguousarray(nbr, dtype=np.int64)
        self.D = self.nbr.shape[1]
        self.rev = reverse_slots(self.nbr, n)
        self.deg = (self.nbr[:n] < n).sum(axis=1)
        self.up = np.asarray(up, dtype=np.int64)
        self.down = np.asarray(down, dtype=np.int64)
        row = self.nbr[self.me]
        self.neighbours = row[row < n]
        self.slot = np.full(n + 1, -1, dtype=np.int64)  # peer -> its slot in my row (-1: not a neighbour)
        self.slot[self.neighbours] = np.flatnonzero(row < n)
        W = (self.N + 63) // 64
        self.hbits = np.zeros((n + 1, W), dtype=np.uint64)
        self.hbits[self.me] = pack_bits(have_row)
        self.tbits = np.zeros((self.N, (n + 1 + 63) // 64), dtype=np.uint64)
        self.pbits = np.zeros_like(self.hbits)
        self.held = int(np.count_nonzero(have_row))
        self.recip = np.zeros((n + 1, self.D), dtype=np.int64)
        self.recip[self.me, self.slot[self.neighbours]] = got_from[self.neighbours]
        self.want_cap = int(request_pipeline(self.nbr[self.me : self.me + 1], self.up, self.deg, n)[0])

    # ------------------------------------------------------------------ have-state
    def neighbour_has(self, w: int, chunks: np.ndarray) -> None:
        """Neighbour w holds `chunks` (its bitfield or a have-delta)."""
        c = np.asarray(chunks, dtype=np.int64)
        self.tbits[c, w >> 6] |= np.uint64(1) << np.uint64(w & 63)

    def received(self, senders: np.ndarray, chunks: np.ndarray) -> None:
        """Chunks that arrived and passed their hash check (BitTorrent transfers count toward reciprocity)."""
        chunks = np.asarray(chunks, dtype=np.int64)
        set_pending(self.hbits, np.full(chunks.size, self.me, dtype=np.int64), chunks, True)
        j = self.slot[np.asarray(senders, dtype=np.int64)]
        np.add.at(self.recip[self.me], j[j >= 0], 1)
        self.held += int(chunks.size)

    def publish(self, chunks: np.ndarray) -> None:
        """Own chunks this peer holds publicly from now on (hidden protocol, its update's copies left)."""
        chunks = np.asarray(chunks, dtype=np.int64)
        set_pending(self.hbits, np.full(chunks.size, self.me, dtype=np.int64), chunks, True)
        self.held += int(chunks.size)

    # ------------------------------------------------------------------ one stage
    def begin_stage(self, stage: int, active: np.ndarray, can_send: np.ndarray) -> None:
        n = self.n
        self.stage = int(stage)
        self.active = np.zeros(n + 1, dtype=bool)
        self.active[:n] = active
        self.up_left = np.zeros(n + 1, dtype=np.int64)
        self.up_left[:n] = np.where(active, self.up, 0)
        self.down_left = int(self.down[self.me]) if active[self.me] else 0
        self.tau_left = np.full(n + 1, self.cfg.tau, dtype=np.int64)
        self.served = np.zeros((n + 1, self.D), dtype=bool)
        self.choked = np.zeros((n + 1, self.D), dtype=bool)
        self.can_send = np.zeros(n + 1, dtype=bool)
        self.can_send[:n] = can_send
        self.pbits[self.me] = 0

    def _base(self, p: int) -> np.uint64:
        return np.uint64(key_base(self.seed, rng.BT, self.stage, p))

    def _grant_key(self, p: int) -> np.uint64:
        # np.uint64 on purpose: a Python int would make the compiled hash take (and shift) a signed word
        return np.uint64(_mix(self._base(p) ^ np.uint64(0xC0FFEE)))

    def requests(self, p: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """This pass's requests (sender, chunk, sender's slot in my row, endgame group or -1), in bt_pass order."""
        me, N = self.me, self.N
        missing = self.missing
        z = np.zeros(0, dtype=np.int64)
        if not (self.active[me] and self.down_left > 0 and missing > 0 and self.deg[me] > 0):
            self.mine = (z, z, z, z)
            return self.mine
        want = min(self.down_left, self.want_cap, missing)
        eg = missing <= self.cfg.endgame_chunks
        cap = want * (self.D if eg else 1)
        q = [np.empty(cap, dtype=np.int64) for _ in range(5)]
        cnt, _, _ = _bt_requests(
            0,
            0,
            self._base(p),
            N,
            self.n,
            self.nbr,
            np.array([me], dtype=np.int64),
            np.array([want], dtype=np.int64),
            np.array([missing], dtype=np.int64),
            np.array([eg]),
            self.hbits,
            self.tbits,
            self.can_send,
            self.up_left,
            self.choked,
            self.pbits,
            OVERSAMPLE,
            MAX_DRAWS,
            *q,
        )
        s, _r, c, j, g = (a[:cnt].copy() for a in q)
        self.mine = (s, c, j, g)
        return self.mine

    @property
    def missing(self) -> int:
        """What this peer misses (announced with its requests: deficit-first senders serve it by that)."""
        return self.N - self.held

    def grant(self, p: int, asks: dict[int, np.ndarray], missing: dict[int, int]) -> dict[int, np.ndarray]:
        """Grant the requests neighbours sent me (receiver -> chunks in its order, receiver -> what it misses);
        returns receiver -> granted flags."""
        me = self.me
        rs = sorted(asks)
        q_r = np.concatenate([np.full(asks[r].size, r, dtype=np.int64) for r in rs]) if rs else np.zeros(0, np.int64)
        q_c = np.concatenate([np.asarray(asks[r], dtype=np.int64) for r in rs]) if rs else np.zeros(0, np.int64)
        # q_j: my slot in the receiver's row, which is rev[me, slot of the receiver in my row]
        q_j = self.rev[me, self.slot[q_r]]
        m = q_r.size
        granted = np.zeros(m, dtype=bool)
        deficit = np.zeros(self.n + 1, dtype=np.int64)
        for r in rs:
            deficit[r] = missing[r]
        if m:
            sb = self._grant_key(p)
            _bt_grant(
                me,
                0,
                m,
                np.arange(m, dtype=np.int64),
                sb,
                self.N,
                q_r,
                q_c,
                q_j,
                self.rev,
                self.recip,
                self.served,
                self.up_left,
                self.tau_left,
                np.empty(m, dtype=np.float64),
                granted,
                deficit,
                BT_GRANTS.index(self.cfg.bt_grant),
            )
        out, a = {}, 0
        for r in rs:
            out[r] = granted[a : a + asks[r].size]
            a += asks[r].size
        return out

    def settle(self, p: int, granted: np.ndarray) -> np.ndarray:
        """My requests' grants -> which I keep (one per chunk in endgame); refusals choke the pair."""
        s, c, j, g = self.mine
        keep = granted & (g < 0)
        if np.any(g >= 0):
            sb = self._grant_key(p)
            best: dict[int, tuple[float, int]] = {}
            for q in np.flatnonzero(granted & (g >= 0)).tolist():
                u = _keep_draw(sb, s[q], self.N, c[q])
                if int(g[q]) not in best or u < best[int(g[q])][0]:
                    best[int(g[q])] = (u, q)
            for _, q in best.values():
                keep[q] = True
        self.choked[self.me, j[~granted]] = True
        set_pending(self.pbits, np.full(int(keep.sum()), self.me, dtype=np.int64), c[keep], True)
        self.down_left -= int(np.count_nonzero(keep))
        return keep

    def commit(self, kept: dict[int, np.ndarray]) -> None:
        """Book the grants each receiver kept (receiver -> kept chunk count) on my budget and tau."""
        me = self.me
        for r, k in kept.items():
            if k <= 0:
                continue
            self.up_left[me] -= k
            sl = self.slot[r]
            if not self.served[me, sl]:
                self.served[me, sl] = True
                self.tau_left[me] -= 1


def compile_kernels(cfg: SwarmConfig) -> None:
    """Compile (or load from numba's cache) every kernel a real round runs, by playing one tiny round in-process:
    the tracker's passes (SwarmRound) and one peer's BitTorrent decisions (PeerBT).  A real round calls this
    before its first stage, so a first-use compile (seconds; tens on a loaded node) never eats a stage timeout:
    a peer that misses its neighbours' bitfields at the first BitTorrent stage cannot see what they held."""
    from .overlay import build_overlay
    from .round import SwarmRound

    small = cfg.replace(seed=0, degree=1, overlay="random")
    n, K = 3, 2
    up, down = np.full(n, 2, dtype=np.int64), np.full(n, 2, dtype=np.int64)
    rnd = SwarmRound(small, n, K, up, down, seed=0)
    while not rnd.done and rnd.stage < 64:
        rnd.complete(rnd.next_stage())
    nbr = build_overlay(n, small, 0).nbr.astype(np.int64)
    have = np.zeros(n * K, dtype=bool)
    have[:K] = True
    pb = PeerBT(small, 0, nbr, K, up, down, 0, have, np.zeros(n, dtype=np.int64))
    for w in nbr[0][nbr[0] < n].tolist():
        pb.neighbour_has(int(w), np.arange(w * K, (w + 1) * K, dtype=np.int64))
    pb.begin_stage(0, np.ones(n, dtype=bool), np.ones(n, dtype=bool))
    s, c, _j, _g = pb.requests(0)
    askers = [int(w) for w in nbr[0][nbr[0] < n]]
    grants = pb.grant(0, {w: np.arange(0, 1, dtype=np.int64) for w in askers}, {w: n * K for w in askers})
    keep = pb.settle(0, np.ones(s.size, dtype=bool))
    pb.commit({int(w): int(g.sum()) for w, g in grants.items()})
    pb.received(s[keep], c[keep])
    unpack_bits(pack_bits(np.ones(n, dtype=bool)), n)
