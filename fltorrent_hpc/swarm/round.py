"""`SwarmRound`: the state of one FLTorrent round and its stage loop, with no I/O.

Use: `st = rnd.next_stage()` returns the transfers of the current slot; the caller moves the bytes (or
pretends to, in the simulator) and reports back with `rnd.complete(st, delivered)`.  Chunk ids are
global, `owner * K + i`.  The tracker's decisions (spray, warm-up) read the global state; the BitTorrent
phase reads, for each peer, only its own and its neighbours' rows (see bittorrent.py).
"""

from __future__ import annotations

import numba
import numpy as np

from ..config import SwarmConfig
from ..errors import ConfigError, ProtocolError
from . import rng
from .assign import cumcount
from .bittorrent import bt_stage, request_pipeline
from .bt_kernel import apply_delivered, pack_rows, reverse_slots, set_pending
from .overlay import Overlay, build_overlay
from .stage import BT, SPRAY, WARMUP, Stage
from .warmup import warmup_stage

WARM_STALL = 4  # empty warm-up stages (nothing lagged, nothing to spray or release) before warm-up fails open

__all__ = ["BT", "SPRAY", "WARMUP", "Stage", "SwarmRound"]  # phase codes and Stage live in stage.py


class SwarmRound:
    """One round: n peers, K chunks each, per-stage chunk budgets, a seed.  Deterministic."""

    def __init__(
        self,
        config: SwarmConfig,
        n_peers: int,
        chunks_per_peer: int,
        up_budget: np.ndarray,
        down_budget: np.ndarray,
        seed: int = 0,
        overlay: Overlay | None = None,
        compute_maxflow: bool = False,
        maxflow_every: int = 1,
        direct: bool = False,
    ) -> None:
        n, K = int(n_peers), int(chunks_per_peer)
        if n < 1 or K < 0:
            raise ValueError("a round needs n >= 1 peers and K >= 0 chunks per peer")
        self.cfg = config
        self.n, self.K, self.N = n, K, n * K
        self.seed = int(seed)
        self.up = np.asarray(up_budget, dtype=np.int64).reshape(n)
        self.down = np.asarray(down_budget, dtype=np.int64).reshape(n)
        if np.any(self.up < 1) or np.any(self.down < 1):
            raise ConfigError(
                "every peer needs an upload and download budget of >= 1 chunk per slot; "
                "use a longer slot or a smaller chunk"
            )
        self.overlay = overlay or build_overlay(n, config, self.seed)
        self.nbr = self.overlay.nbr
        self.deg = self.overlay.degree
        self.privacy = config.privacy
        # hidden protocol: an owner's chunks are not in its have row; they enter the swarm through seeds
        self.hidden = config.hides_owners and n > 2  # it takes an owner, a mixer and a seed
        self.gating = "gating" in self.privacy and not self.hidden
        self.k = 0 if self.hidden else config.cover_threshold(n, K)
        self.kappa = config.kappa
        self.compute_maxflow = compute_maxflow
        self.maxflow_every = max(1, int(maxflow_every))  # bound only every k-th stage: one solve costs ~1 s at n=100
        # have-state; row n is a sentinel peer that holds nothing (pads neighbour lists)
        self.have = np.zeros((n + 1, self.N), dtype=bool)
        own = np.arange(self.N) // max(K, 1)
        self.own_held = 0 if self.hidden else K  # own chunks in each peer's have row at the start
        # the same bits chunk-major: a chunk's holders among a peer's neighbours sit in one short row, so the
        # per-candidate neighbour gathers of the schedulers hit a few cache lines instead of D random rows
        self.have_t = np.zeros((self.N, n + 1), dtype=bool)
        if not self.hidden:
            self.have[own, np.arange(self.N)] = True
            self.have_t[np.arange(self.N), own] = True
        # hidden protocol: chunks whose only copy is still their owner's private one (planned seeds)
        self.unseeded = np.full(self.N, self.hidden, dtype=bool)
        self.exposed = np.zeros(n, dtype=bool)  # hidden owners that had to publish their update (lost copies)
        self._have_flat = self.have_t.reshape(-1)  # view; np.take on it is ~4x faster than 2-D fancy indexing
        # bit-packed copies of the same bits for the compiled BitTorrent passes (swarm/bt_kernel.py)
        self.hbits = pack_rows(self.have)
        self.tbits = pack_rows(self.have_t)
        self.pbits = np.zeros_like(self.hbits)  # scheduled this stage, not yet delivered (cleared on complete)
        self.held = np.full(n, self.own_held, dtype=np.int64)
        self.holders = np.full(self.N, 0 if self.hidden else 1, dtype=np.int32)  # active holders per chunk
        self.active = np.ones(n + 1, dtype=bool)
        self.active[n] = False
        self.left_at = np.full(n, -1, dtype=np.int64)
        self.complete_stage = np.where(self.held >= self.N, 0, -1).astype(np.int64)
        # lags
        if "lags" in self.privacy and config.lag_slots > 1 and not self.hidden:
            self.lag = rng.below(config.lag_slots, self.seed, rng.LAGS, np.arange(n))
        else:
            self.lag = np.zeros(n, dtype=np.int64)
        # spray plan: floor(R*K) distinct own chunks per owner, each to a random non-neighbour
        if self.hidden:
            self.spray = self._plan_seeds()
        else:
            self.spray = self._plan_spray() if "spray" in self.privacy else self._empty_plan()
        # gating: a window of at most kappa owner chunks, opened once the eligible buffer reaches k
        self.win = np.full((n, self.kappa), -1, dtype=np.int64)
        self.in_window = np.zeros(self.N, dtype=bool)
        self.gate_open = np.zeros(n, dtype=bool)
        keys = rng.uniform(self.seed, rng.RELEASE, np.arange(n)[:, None], np.arange(K)[None, :])
        self.release_order = (np.argsort(keys, axis=1) + (np.arange(n) * K)[:, None]).astype(np.int64)
        # warm-up relay lists: non-owner chunks each peer received (append-only), for candidate sampling
        cap = int(min(self.N, self.k + 4 * int(self.down.max()) + 64))
        self.rlist = np.full((n, max(cap, 1)), -1, dtype=np.int64)
        self.rlen = np.zeros(n, dtype=np.int64)
        # BitTorrent per-peer state (each row is that peer's own knowledge); bt_want, the requests each peer
        # keeps in flight, is set by the first BitTorrent stage from the overlay as it is then
        self.bt_want: np.ndarray | None = None
        self.bt_stats = np.zeros(3, dtype=np.int64)  # candidate draws, feasible candidates, requests
        self.recip = np.zeros(self.nbr.shape, dtype=np.int64)  # chunks v received from its j-th neighbour
        self.acc_est = np.full(n, 0.2)
        # candidate de-duplication stamps of the warm-up passes, one row per compiled worker thread
        self.warm_mark = np.zeros((numba.config.NUMBA_NUM_THREADS, max(self.N, 1)), dtype=np.int64)
        self.warm_stamp = 0
        self._slots: tuple | None = None
        # phase and clocks
        self.stage = 0
        self.phase = WARMUP if self.privacy else BT
        self.s_bt = 0 if self.phase == BT else -1
        # a small round without privacy: one direct exchange first (swarm.budget.direct_round says when)
        self.direct_due = bool(direct) and self.phase == BT and n > 1 and K > 0
        self.warmup_failed_open = False
        self.warm_idle = 0  # consecutive warm-up stages with nothing to send although every peer may send
        self.warmup_deadline = config.warmup_deadline_stages or 0
        self.releases = 0
        self.round_start = 0  # first stage after the pre-round spray; lags count from here
        self.banned_by: dict[int, set[int]] | None = None  # sender -> receivers that refused its chunks (ban)
        self._refresh_windows()

    # ------------------------------------------------------------------ set-up helpers
    def _empty_plan(self) -> dict[str, np.ndarray]:
        z = np.zeros(0, dtype=np.int64)
        return {"sender": z, "receiver": z, "chunk": z}

    def _plan_spray(self) -> dict[str, np.ndarray]:
        n, K = self.n, self.K
        sigma = int(np.floor(self.cfg.spray_ratio * K + 1e-9))
        non_nbr = n - 1 - self.deg
        self.spray_to_neighbours = 0
        if sigma == 0 or K == 0 or n < 2:
            return self._empty_plan()
        owners = np.repeat(np.arange(n), sigma)
        slot = np.tile(np.arange(sigma), n)
        # sigma distinct chunks per owner: the first sigma of a seeded permutation
        keys = rng.uniform(self.seed, rng.SPRAY, np.arange(n)[:, None], np.arange(K)[None, :])
        pick = np.argsort(keys, axis=1)[:, :sigma]
        chunk = owners * K + pick.reshape(-1)
        # recipient: uniform over non-neighbours (index into the sorted complement of N(u) u {u}); an owner
        # adjacent to everyone (small swarms) sprays to random other peers instead, and is counted
        self.spray_to_neighbours = int(np.count_nonzero(non_nbr == 0))
        pool = np.where(non_nbr > 0, non_nbr, n - 1)[owners]
        idx = rng.below(np.maximum(pool, 1), self.seed, rng.SPRAY, owners, slot, 1)
        recv = np.full(owners.size, -1, dtype=np.int64)
        for u in np.unique(owners):
            excl = np.zeros(n, dtype=bool)
            excl[u] = True
            if non_nbr[u] > 0:
                excl[self.nbr[u][self.nbr[u] < n]] = True
            comp = np.flatnonzero(~excl)
            sel = owners == u
            recv[sel] = comp[idx[sel]]
        keep = recv >= 0
        return {"sender": owners[keep], "receiver": recv[keep], "chunk": chunk[keep]}

    # hidden protocol: each chunk goes owner -> mixer (a non-neighbour of the owner, which forwards it
    # and keeps it hidden) -> seed (any other peer, which holds it publicly); per-chunk state below
    AT_OWNER, AT_MIXER, SEEDED, DROPPED = 0, 1, 2, -1

    def _candidates(self, u: int, exclude: set[int], non_nbr: bool) -> np.ndarray:
        """Active peers other than u and `exclude`; with `non_nbr`, u's non-neighbours when it has any."""
        n = self.n
        ok = self.active[:n].copy()
        ok[u] = False
        ok[list(exclude)] = False
        if non_nbr:
            row = self.nbr[u]
            nb = row[row < n]
            far = ok.copy()
            far[nb] = False
            if far.any():
                return np.flatnonzero(far)
        return np.flatnonzero(ok)

    def _pick(self, cand: np.ndarray, *key: int) -> int:
        return int(cand[np.argmin(rng.uniform(self.seed, rng.SPRAY, *key, cand))]) if cand.size else -1

    def _balanced(self, bad: np.ndarray, *key: int) -> np.ndarray:
        """A seeded permutation p of the peers with bad[u, p[u]] False wherever swaps can make it so: every peer
        carries exactly one block per permutation, so no peer is a hot spot of the seed phase."""
        n = self.n
        p = np.argsort(rng.uniform(self.seed, rng.SPRAY, *key, np.arange(n)))
        order = np.argsort(rng.uniform(self.seed, rng.SPRAY, *key, 1, np.arange(n)))
        for u in np.flatnonzero(bad[np.arange(n), p]):
            if not bad[u, p[u]]:
                continue  # fixed by an earlier swap
            ok = ~bad[order, p[u]] & ~bad[u, p[order]]
            j = order[np.argmax(ok)] if ok.any() else -1
            if j >= 0:
                p[u], p[j] = p[j], p[u]
        return p

    def _mix_capacity(self) -> np.ndarray:
        """Chunks each peer can forward as a mixer in the time the seed phase must take anyway: water-filling on
        the uplink budgets, T = the least time with sum_u max(0, T up_u - K) = n K (every peer sends its own K
        first hops; the forwards, n K in all, fill what is left), capacity_u = max(0, T up_u - K).  Even
        uplinks give every peer K; a peer too slow to send more than its own update in T mixes nothing, so the
        slowest uplink's seed phase is its own first hops, not twice its update (4 ranks, 400..1600 Mbit/s:
        2S / U_min before)."""
        n, K = self.n, self.K
        up = self.up.astype(np.float64)
        order = np.argsort(-up, kind="stable")
        cum = np.cumsum(up[order])
        for j in range(1, n + 1):
            T = (n + j) * K / cum[j - 1]
            if j == n or T * up[order[j]] <= K:
                break
        return np.maximum(0.0, T * up - K)

    def _plan_seeds(self) -> dict[str, np.ndarray]:
        """Hidden protocol: every chunk of every owner is split over `seed_peers` contiguous blocks; each block
        has one mixer (a non-neighbour of its owner, which forwards and hides it) and one seed (any peer but
        owner and mixer, which holds it publicly), so a seed's receipt names a mixer, never the owner, and the
        owner's distance to its update's entry points is that of a random peer (docs/PRIVACY.md).  Mixers and
        seeds come from balanced permutations: each peer mixes and seeds one block per permutation.  A block's
        size follows its mixer's capacity (`_mix_capacity`: equal on even uplinks), so fast uplinks forward
        more; the choice of mixers does not depend on the links."""
        n, K, N = self.n, self.K, self.N
        self.seed_state = np.full(N, self.AT_OWNER, dtype=np.int64)
        self.mixer = np.full(N, -1, dtype=np.int64)
        self.seeder = np.full(N, -1, dtype=np.int64)
        self.block_off = np.zeros(N, dtype=np.int64)  # a chunk's place in its owner's send order
        self.bad_mixers: set[int] = set()  # peers a seed refused a forward from: never mixers again
        self.spray_to_neighbours = int(np.count_nonzero(n - 1 - self.deg == 0))  # owners adjacent to all
        r = int(min(self.cfg.seed_peers, K))
        adj = np.eye(n, dtype=bool)
        e = self.overlay.edges.reshape(-1, 2)
        adj[e[:, 0], e[:, 1]] = adj[e[:, 1], e[:, 0]] = True
        adj[self.deg >= n - 1] = np.eye(n, dtype=bool)[self.deg >= n - 1]  # adjacent to all: any other peer
        mixers = np.full((n, r), -1, dtype=np.int64)
        seeds = np.full((n, r), -1, dtype=np.int64)
        for b in range(r):
            mix = self._balanced(adj, b, 0)
            not_seed = np.eye(n, dtype=bool)
            not_seed[np.arange(n), mix] = True
            seed = self._balanced(not_seed, b, 1)
            for u in range(n):
                m, sd = int(mix[u]), int(seed[u])
                if adj[u, m]:  # no swap could fix it: an individual pick (slightly unbalanced)
                    m = self._pick(self._candidates(u, set(), True), u, b, 0)
                if sd in (u, m):
                    sd = self._pick(self._candidates(u, {m}, False), u, b, 1)
                mixers[u, b], seeds[u, b] = m, sd  # n >= 3: there is always a third peer
        uneven = bool(np.any(self.up != self.up[0]))
        x = np.zeros((n, r), dtype=np.int64)  # chunks of owner u through its mixer b
        x[:] = np.diff(-(-K * np.arange(r + 1) // r))  # even uplinks: equal blocks, ceil(K b / r) apart
        if uneven:
            x = self._size_blocks(mixers, adj)
        i = np.arange(K)
        for u in range(n):
            cuts = np.concatenate([[0], np.cumsum(x[u])])
            block = np.searchsorted(cuts, i, side="right") - 1
            off = i - cuts[block]
            # the blocks interleave in proportion to their sizes, so every mixer's share starts at once
            self.block_off[u * K : (u + 1) * K] = off * K // np.maximum(x[u, block], 1) if uneven else off
            sel = u * K + i
            self.mixer[sel], self.seeder[sel] = mixers[u, block], seeds[u, block]
        if uneven:
            self._spread_seeds()
        self.seed_state[self.mixer < 0] = self.DROPPED
        self.unseeded[:] = self.seed_state != self.DROPPED
        return self._seed_items()

    def _size_blocks(self, mixers: np.ndarray, adj: np.ndarray) -> np.ndarray:
        """Uneven uplinks: how many of its K chunks each owner sends through each of its mixers.  Chunk by
        chunk (all owners at once), to the mixer that would finish its own first hops and its forwards first,
        (K + forwards + 1) / uplink; ties to the owner's smaller block.  An owner whose mixers all lie beyond
        `_mix_capacity` (too slow to forward anything in the seed phase) swaps its first mixer for a
        non-neighbour that can.  Returns int64 [n, r]; `mixers` is updated in place."""
        n, K = self.n, self.K
        r = mixers.shape[1]
        cap = self._mix_capacity()
        for u in np.flatnonzero(np.all(cap[mixers] <= 0, axis=1)):
            cand = self._candidates(int(u), set(mixers[u].tolist()), True)
            cand = cand[(cap[cand] > 0) & ~adj[u, cand]]
            if cand.size:
                mixers[u, 0] = self._pick(cand, int(u), 0, 4)
        up = self.up.astype(np.float64)
        load = np.zeros(n, dtype=np.int64)
        x = np.zeros((n, r), dtype=np.int64)
        rows, bidx = np.arange(n), np.broadcast_to(np.arange(r), (n, r))
        for _ in range(K):
            t = (K + load[mixers] + 1) / up[mixers]
            best = np.lexsort((bidx, x, t), axis=-1)[:, 0]
            x[rows, best] += 1
            np.add.at(load, mixers[rows, best], 1)
        return x

    def _spread_seeds(self) -> None:
        """Uneven uplinks: a block's chunks go to several seeds, each peer seeding in proportion to its uplink
        (a smooth weighted round-robin over all blocks, owner and mixer excluded).  A seed is the first public
        copy of its chunks and must upload each once: one seed per block put a whole update's first copies
        behind whichever uplink the permutation drew (4 ranks, 400..1600 Mbit/s: the BitTorrent phase 1.7 ->
        2.8 s in the event model once blocks followed the mixers' capacity)."""
        n, K = self.n, self.K
        w = self.up.astype(np.float64)
        credit = np.zeros(n)
        jitter = rng.uniform(self.seed, rng.SPRAY, 7, np.arange(n)) * 1e-6  # a seeded tie-break
        for c in np.argsort(rng.uniform(self.seed, rng.SPRAY, 8, np.arange(self.N)), kind="stable"):
            m = int(self.mixer[c])
            if m < 0:
                continue
            ok = self.active[:n].copy()
            ok[[int(c) // K, m]] = False
            credit[ok] += w[ok]
            sd = int(np.argmax(np.where(ok, credit + jitter, -np.inf)))
            credit[sd] -= w[ok].sum()
            self.seeder[c] = sd

    def _seed_items(self) -> dict[str, np.ndarray]:
        """The seed sends due now: forwards (mixer -> seed) first, then first hops in block order."""
        K = max(self.K, 1)
        fwd = np.flatnonzero(self.seed_state == self.AT_MIXER)
        first = np.flatnonzero(self.seed_state == self.AT_OWNER)
        first = first[np.lexsort((first, first // K, self.block_off[first]))]
        c = np.concatenate([fwd, first])
        snd = np.concatenate([self.mixer[fwd], first // K])
        rcv = np.concatenate([self.seeder[fwd], self.mixer[first]])
        return {"sender": snd, "receiver": rcv, "chunk": c}

    def _seed_delivered(self, s: np.ndarray, c: np.ndarray) -> np.ndarray:
        """Advance delivered seed sends; returns which of them make the receiver a public holder (forwards)."""
        first_hop = s == c // max(self.K, 1)
        self.seed_state[c[first_hop]] = self.AT_MIXER
        self.seed_state[c[~first_hop]] = self.SEEDED
        self.unseeded[c[~first_hop]] = False
        return ~first_hop

    def _replan_seeds(self, banned: dict[int, set[int]] | None = None) -> None:
        """Re-route seeds whose next hop left or refused its sender.  A mixer that left, or whose forward a seed
        refused, never forwards again: its chunks go back to their owners' first hop, to a new mixer.  With no
        peer left to pick, or once BitTorrent runs (seeds are tracker stages before it), the owner publishes its
        update instead (`_expose`: it gives up hiding for this round); an inactive owner's chunks are dropped."""
        banned = banned or {}
        st, act = self.seed_state, self.active
        owner = np.arange(self.N) // max(self.K, 1)
        live = (st == self.AT_OWNER) | (st == self.AT_MIXER)
        st[live & ~act[owner]] = self.DROPPED
        expose = set()
        for c in np.flatnonzero((st == self.AT_OWNER) | (st == self.AT_MIXER)):
            u, m, sd = int(owner[c]), int(self.mixer[c]), int(self.seeder[c])
            key = (u, int(c), self.stage)
            if st[c] == self.AT_MIXER and (not act[m] or m in self.bad_mixers):
                st[c] = self.AT_OWNER
            if st[c] == self.AT_MIXER and not act[sd]:
                sd = self._pick(self._candidates(u, {m}, False), *key, 3)
                if sd < 0:
                    st[c] = self.AT_OWNER
            if st[c] == self.AT_OWNER:
                avoid = banned.get(u, set()) | self.bad_mixers
                cand = self._candidates(u, avoid, True)
                if m not in cand:  # gone, refused, or a neighbour since a repair
                    m = self._pick(cand, *key, 2)
                if m >= 0 and (sd < 0 or not act[sd] or sd == m):
                    sd = self._pick(self._candidates(u, {m}, False), *key, 3)
            if m < 0 or sd < 0 or self.phase == BT:
                expose.add(u)
                continue
            self.mixer[c], self.seeder[c] = m, sd
        if expose:
            gone = np.isin(owner, list(expose)) & ((st == self.AT_OWNER) | (st == self.AT_MIXER))
            st[gone] = self.SEEDED
            self.unseeded[gone] = False
            self._expose(np.array(sorted(expose), dtype=np.int64))
        self.unseeded &= st != self.DROPPED
        self.spray = self._seed_items()
        if self.spray["sender"].size == 0:
            self.round_start = self.stage

    def _expose(self, owners: np.ndarray) -> None:
        """Owners hold their own update publicly from now on (the paper's state), as the have state sees it."""
        for u in np.asarray(owners, dtype=np.int64):
            if self.exposed[u] or not self.active[u]:
                continue
            self.exposed[u] = True
            c = np.arange(u * self.K, (u + 1) * self.K, dtype=np.int64)
            c = c[~self.have[u, c]]
            if c.size == 0:
                continue
            self.have[u, c] = True
            self.have_t[c, u] = True
            set_pending(self.hbits, np.full(c.size, u, dtype=np.int64), c, True)
            set_pending(self.tbits, c, np.full(c.size, u, dtype=np.int64), True)
            self.held[u] += c.size
            self.holders[c] += 1
            done_now = (self.complete_stage < 0) & (self.held >= self.N)
            self.complete_stage[done_now] = self.stage

    # ------------------------------------------------------------------ views
    @property
    def received(self) -> np.ndarray:
        """X_v: non-owner chunks each peer holds (all it holds in the hidden protocol, where own chunks are
        held only once downloaded back)."""
        return self.held - self.own_held

    @property
    def owned_eligible(self) -> np.ndarray:
        """O_u: eligible owner chunks per peer (window size with gating, all K without)."""
        if self.gating and self.phase == WARMUP:
            return (self.win >= 0).sum(axis=1)
        return np.full(self.n, self.K, dtype=np.int64)

    def slot_tables(self) -> tuple[np.ndarray, np.ndarray]:
        """(nbr as int64, rev) with rev[v, j] the position of v in its j-th neighbour's row; rebuilt on repair."""
        if self._slots is None or self._slots[0] is not self.nbr:
            nbr64 = self.nbr.astype(np.int64)
            self._slots = (self.nbr, nbr64, reverse_slots(nbr64, self.n))
        return self._slots[1], self._slots[2]

    def holds(self, w: np.ndarray, c: np.ndarray) -> np.ndarray:
        """have[w, c] for broadcast index arrays, by a flat gather on the chunk-major copy."""
        return np.take(self._have_flat, c * (self.n + 1) + w)

    def eligible(self, w: np.ndarray, c: np.ndarray) -> np.ndarray:
        """Whether peer w may serve chunk c now (availability plus, in gated warm-up, the owner window)."""
        h = self.holds(w, c)
        if self.gating and self.phase == WARMUP:
            h &= (c // max(self.K, 1) != w) | self.in_window[c]
        return h

    @property
    def done(self) -> bool:
        """Every active peer holds every chunk that some active peer holds."""
        act = self.active[: self.n]
        if not act.any():
            return True
        exists = self.holders > 0
        if self.hidden:  # a chunk not yet seeded exists while its owner is active
            exists |= self.unseeded & self.active[np.arange(self.N) // max(self.K, 1)]
        u = int(np.count_nonzero(exists))
        return int(self.held[act].sum()) == int(act.sum()) * u

    def reconstructable(self) -> np.ndarray:
        """A[v, u]: peer v holds every chunk of peer u (PAPER.md §1.3)."""
        n, K = self.n, self.K
        if K == 0:
            return np.ones((n, n), dtype=bool)
        A = self.have[:n].reshape(n, n, K).all(axis=2)
        np.fill_diagonal(A, True)  # its own update (in the hidden protocol held privately until it comes back)
        return A

    # ------------------------------------------------------------------ stage loop
    def may_send(self) -> np.ndarray:
        """Peers that may send in slot `self.stage`: active and past their lag."""
        return self.active[: self.n] & (self.lag + self.round_start <= self.stage)

    def begin_stage(self) -> int:
        """The phase of slot `self.stage`: leaves warm-up once every active peer holds k (or warm-up fails
        open at its deadline).  Idempotent within a slot; a real round whose peers make their own
        BitTorrent decisions calls it instead of next_stage()."""
        if self.phase == WARMUP:
            act = self.active[: self.n]
            spray_left = self.spray["sender"].size > 0
            if not spray_left and np.all(self.received[act] >= self.k):
                self._enter_bt()
            elif (self.warmup_deadline and self.stage >= self.warmup_deadline) or self.warm_idle >= WARM_STALL:
                self.warmup_failed_open = True
                self._enter_bt()
        return self.phase

    def next_stage(self) -> Stage:
        """Decide the transfers of slot `self.stage` from the state after the previous slot."""
        if self.begin_stage() == WARMUP:
            return warmup_stage(self)
        if self.direct_due:
            return self._direct_stage()
        return bt_stage(self)

    def _direct_stage(self) -> Stage:
        """Every active peer sends every chunk it holds to every other active peer, in one stage.

        Why: below the crossover (swarm.budget.direct_round) a round's cost is its number of control
        exchanges, not its bytes, and no privacy asks for more than one hop.  Budgets do not bound this stage
        (a pacer stretches it instead); what does not arrive is fetched in BitTorrent stages after it.
        """
        self.direct_due = False
        act = np.flatnonzero(self.active[: self.n])
        parts = []
        for u in act:
            chunks = np.flatnonzero(self.have[u])
            others = act[act != u]
            parts.append(
                (np.full(chunks.size * others.size, u), np.repeat(others, chunks.size), np.tile(chunks, others.size))
            )
        s, r, c = (np.concatenate([p[i] for p in parts]).astype(np.int64) for i in range(3))
        return self.reported_bt_stage(s, r, c)  # the same BitTorrent-kind stage, of the tracker's own transfers

    def _enter_bt(self) -> None:
        self.phase = BT
        self.s_bt = self.stage
        self.win[:] = -1
        self.in_window[:] = False

    def capacity(self) -> int:
        return int(self.up[self.active[: self.n]].sum())

    def reported_bt_stage(self, sender: np.ndarray, receiver: np.ndarray, chunk: np.ndarray) -> Stage:
        """A BitTorrent-kind stage of the current slot made of given transfers: those the peers decided and
        reported themselves (a real round's decentralised or pipelined BitTorrent), for `complete`, the trace and
        the agreement, or the direct exchange's."""
        s = np.asarray(sender, dtype=np.int64)
        return Stage(
            index=self.stage,
            phase=BT,
            sender=s,
            receiver=np.asarray(receiver, dtype=np.int64),
            chunk=np.asarray(chunk, dtype=np.int64),
            kind=np.full(s.size, BT, dtype=np.int64),
            sender_owned=np.full(s.size, self.K, dtype=np.int64),
            sender_buffer=self.held[s],
            capacity=self.capacity(),
        )

    def complete(self, stage: Stage, delivered: np.ndarray | None = None) -> None:
        """Apply the transfers of `stage` that arrived (all of them when `delivered` is None)."""
        if stage.index != self.stage:
            raise ProtocolError(f"completion for stage {stage.index} while the round is at stage {self.stage}")
        m = np.ones(stage.size, dtype=bool) if delivered is None else np.asarray(delivered, dtype=bool)
        set_pending(self.pbits, stage.receiver.astype(np.int64), stage.chunk.astype(np.int64), False)
        r, c, s, kind = stage.receiver[m], stage.chunk[m], stage.sender[m], stage.kind[m]
        if self.hidden and np.any(kind == SPRAY):  # a mixer holds what it forwards, but not publicly
            sp = kind == SPRAY
            public = np.ones(r.size, dtype=bool)
            public[sp] = self._seed_delivered(s[sp], c[sp])
            r, c, s, kind = r[public], c[public], s[public], kind[public]
        if r.size:
            bad = apply_delivered(
                self.have,
                self.have_t,
                self.hbits,
                self.tbits,
                self.held,
                self.holders,
                self.recip,
                self.nbr,
                s.astype(np.int64),
                r.astype(np.int64),
                c.astype(np.int64),
                kind != SPRAY,
            )
            if bad == 1:
                raise ProtocolError(f"stage {stage.index}: duplicate delivery of a chunk a peer already held")
            if bad == 2:
                raise ProtocolError(f"stage {stage.index}: the same chunk delivered twice to one peer")
            if self.phase == WARMUP:
                self._append_rlist(r, c)
            done_now = (self.complete_stage < 0) & (self.held >= self.N)
            self.complete_stage[done_now] = stage.index
        if self.hidden:
            if stage.kind.size and np.any(stage.kind == SPRAY):
                self.spray = self._seed_items()
                if self.spray["sender"].size == 0:
                    self.round_start = self.stage + 1
        elif stage.kind.size and np.any(stage.kind == SPRAY):
            sp = stage.kind == SPRAY
            sent = stage.sender[sp & m] * self.N + stage.chunk[sp & m]
            plan = self.spray["sender"] * self.N + self.spray["chunk"]
            keep = ~np.isin(plan, sent)
            self.spray = {k: v[keep] for k, v in self.spray.items()}
            if self.spray["sender"].size == 0:
                self.round_start = self.stage + 1
        if self.phase == WARMUP:
            # a stalled warm-up (peers left and k is out of reach of what the gates let through) fails open
            idle = stage.size == 0 and stage.release_peer.size == 0 and self.spray["sender"].size == 0
            idle &= bool(np.array_equal(self.may_send(), self.active[: self.n]))
            self.warm_idle = self.warm_idle + 1 if idle else 0
        self.stage += 1
        if self.phase == WARMUP:
            self._refresh_windows()

    def _append_rlist(self, r: np.ndarray, c: np.ndarray) -> None:
        order = np.argsort(r, kind="stable")
        r, c = r[order], c[order]
        pos = self.rlen[r] + cumcount(r)
        need = int(pos.max()) + 1 if pos.size else 0
        if need > self.rlist.shape[1]:
            grow = np.full((self.n, max(need, 2 * self.rlist.shape[1]) - self.rlist.shape[1]), -1, np.int64)
            self.rlist = np.concatenate([self.rlist, grow], axis=1)
        self.rlist[r, pos] = c
        self.rlen += np.bincount(r, minlength=self.n)

    def _refresh_windows(self) -> None:
        """Drop replicated chunks from owner windows; refill windows of owners whose gate is open."""
        if not self.gating or self.K == 0:
            return
        w = self.win
        filled = w >= 0
        if filled.any():
            rep = np.zeros_like(filled)
            rep[filled] = self.holders[w[filled]] >= 2
            self.in_window[w[rep]] = False
            w[rep] = -1
        self.gate_open |= self.received >= self.k - self.kappa
        need = np.flatnonzero(self.gate_open & self.active[: self.n] & (w < 0).any(axis=1))
        for u in need:
            self._fill_window(int(u), self.kappa)

    def _fill_window(self, u: int, limit: int) -> list[int]:
        """Put up to `limit` unreplicated own chunks of u into its window, in u's seeded release order.

        Searched afresh each time: a chunk whose only copy left with a departed peer is unreplicated again.
        """
        slots = np.flatnonzero(self.win[u] < 0)[:limit]
        if slots.size == 0:
            return []
        order = self.release_order[u]
        free = order[(self.holders[order] < 2) & ~self.in_window[order]][: slots.size]
        self.win[u, slots[: free.size]] = free
        self.in_window[free] = True
        return [int(x) for x in free]

    def gated_release(self) -> tuple[np.ndarray, np.ndarray]:
        """Gated start (DESIGN.md): every gated, sending-capable owner releases one owner chunk."""
        can = self.may_send() & ~self.gate_open
        can &= (self.win < 0).all(axis=1)
        peers, chunks = [], []
        for u in np.flatnonzero(can):
            got = self._fill_window(int(u), 1)
            if got:
                peers.append(int(u))
                chunks.append(got[0])
        self.releases += len(peers)
        return np.asarray(peers, dtype=np.int64), np.asarray(chunks, dtype=np.int64)

    def leave(self, peers: np.ndarray | list[int], repair: bool = False) -> None:
        """Peers go silent from the current stage on: excluded from scheduling; their chunks stay only where copied."""
        peers = np.asarray(peers, dtype=np.int64)
        peers = peers[self.active[peers]]
        if peers.size == 0:
            return
        self.active[peers] = False
        self.left_at[peers] = self.stage
        self.holders -= self.have[peers].sum(axis=0).astype(np.int32)
        if self.hidden:  # a seeded chunk whose every public copy left is seeded again by its (active) owner
            lost = (self.seed_state == self.SEEDED) & (self.holders == 0)
            lost &= self.active[np.arange(self.N) // max(self.K, 1)]
            if lost.any():
                self.seed_state[lost] = self.AT_OWNER
                self.unseeded[lost] = True
                self._replan_seeds(self.banned_by)
        for u in peers:
            ch = self.win[u][self.win[u] >= 0]
            self.in_window[ch] = False
            self.win[u] = -1
        if repair:
            self.overlay = self.overlay.repair(np.flatnonzero(~self.active[: self.n]), self.seed + self.stage)
            # a pending spray item whose recipient became a neighbour would no longer hide the first hop
            sp = self.spray
            if sp["sender"].size:
                keep = ~self.overlay.has_edge(sp["sender"], sp["receiver"])
                if self.hidden:
                    self.nbr, self.deg = self.overlay.nbr, self.overlay.degree
                    self._replan_seeds(self.banned_by)
                else:
                    self.spray = {k: v[keep] for k, v in sp.items()}
                    if self.spray["sender"].size == 0:
                        self.round_start = self.stage
            old_nbr = self.nbr
            self.nbr = self.overlay.nbr
            self.deg = self.overlay.degree
            self.recip = np.zeros(self.nbr.shape, dtype=np.int64)
            del old_nbr

    def ban(self, sender: int, receiver: int) -> list[int]:
        """`receiver` refused a chunk from `sender` (it failed its digest): their overlay edge goes for the rest
        of the round, so no scheduler pairs them again (libtorrent's hash-fail rule).  A peer whose every
        neighbour has banned it can neither serve nor be served: it leaves.  Returns the peers that left.

        Only the edge goes, not the sender: one peer's report must not be able to exclude another peer.
        """
        sp = self.spray  # a pending spray item of that pair would be retried, and refused, every stage
        if self.banned_by is None:  # first ban of the round: remember who neighboured whom
            self.banned_by = {}
            self._nbr0 = self.overlay.neighbors
        self.banned_by.setdefault(int(sender), set()).add(int(receiver))
        if sp["sender"].size:
            keep = ~((sp["sender"] == sender) & (sp["receiver"] == receiver))
            if self.hidden:  # the seed goes through another peer (or, with none left, stays private)
                fwd = (self.seed_state[sp["chunk"]] == self.AT_MIXER) & ~keep
                if fwd.any():
                    self.bad_mixers.add(int(sender))
                self._replan_seeds(self.banned_by)
            elif not keep.all():
                self.spray = {k: v[keep] for k, v in sp.items()}
                if self.spray["sender"].size == 0:
                    self.round_start = self.stage
        ov = self.overlay.without_edges(np.array([[sender, receiver]]))
        if ov is self.overlay:
            return []
        old = self.nbr
        self.overlay = ov
        self.nbr = ov.nbr
        self.deg = ov.degree
        # per-slot state follows its neighbour into its new slot
        recip = np.zeros(self.nbr.shape, dtype=np.int64)
        for v in range(self.n):
            for j in range(old.shape[1]):
                w = int(old[v, j])
                if w >= self.n:
                    break
                hit = np.flatnonzero(self.nbr[v] == w)
                if hit.size:
                    recip[v, hit[0]] = self.recip[v, j]
        self.recip = recip
        if self.bt_want is not None:
            self.bt_want = request_pipeline(self.nbr, self.up, self.deg, self.n)
        # a peer every one of whose neighbours banned it (not one that banned its last neighbour itself)
        out = [
            u
            for u, by in self.banned_by.items()
            if self.active[u] and self._nbr0[u].size and set(self._nbr0[u].tolist()) <= by
        ]
        if out:
            self.leave(out)
        return out

    def deadline(self) -> int:
        """s_max in stages: the configured one, or 4x the uplink-bound ideal (at least 64 stages)."""
        if self.cfg.deadline_stages:
            return int(self.cfg.deadline_stages)
        need = self.N * (self.n - 1)
        ideal = need / max(1, int(self.up.sum()))
        return int(max(64, np.ceil(4 * ideal) + 4 * self.cfg.lag_slots))
