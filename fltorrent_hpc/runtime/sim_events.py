"""Event-driven model of a pipelined BitTorrent phase: predicted round time on given links (`sim_model="events"`).

The slotted simulator moves whole stages (every transfer of a stage ends at the slot boundary), so it
cannot say what a round takes when peers keep requests in flight and a chunk is forwarded the moment it is
verified.  This model runs that protocol in continuous time over a heap of events (heapq):

- each peer keeps up to W (`window`) chunk requests outstanding per neighbour;
- it requests rarest-first among the chunks its neighbours announced (copies counted in its own view; a
  seeded random key breaks ties), from the holder to which it has the fewest outstanding requests, the
  faster uplink first among those;
- a holder sends one chunk at a time at its uplink rate, in arrival (FIFO) order; a holder whose uplink is
  below the median serves the queued chunk with the fewest copies it knows of first (its scarce upload goes
  to what the swarm lacks);
- a receiver's downlink takes arriving bytes one after another at its rate (0 = unpaced), then it verifies
  the chunk (`hash_rate` bytes/s on one core) and announces it (HAVE) to its neighbours;
- a receiver whose missing chunks are all requested and at most `endgame_chunks` asks a second holder for
  each (one duplicate); the first copy wins, the other request is cancelled (sent anyway if already started);
- every message (request, HAVE, cancel, data) takes `latency_s` on top of its bytes.

The stages before BitTorrent (the hidden protocol's seeding, the paper's warm-up) are tracker stages, timed by
the slotted model: their count times `slot_seconds`; BitTorrent starts from the have state they leave.
The pipelined engine (`bt_decisions="pipelined"`) implements this protocol; the model is its prediction.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np

from ..config import SwarmConfig
from ..errors import ConfigError, FLTorrentError
from ..swarm import SwarmRound, rng
from ..swarm.budget import chunk_budgets
from ..swarm.round import BT

DEFAULT_WINDOW = 4  # requests in flight per neighbour when the config names none (SwarmConfig.bt_window)
_REQ, _SENT, _ARRIVE, _VERIFIED, _HAVE, _CANCEL = range(6)


@dataclass
class EventsResult:
    """One modelled round (times in seconds from the round's start)."""

    round_s: float  # warm-up + BitTorrent phase
    warmup_s: float  # tracker stages before BitTorrent (slotted model)
    warmup_stages: int
    bt_s: float  # BitTorrent phase: its start to the last peer's last verified chunk
    done_s: np.ndarray  # float [n]: when each peer held every chunk (from the round's start)
    sent_bytes: np.ndarray  # int [n]: bytes each peer uploaded in the BitTorrent phase
    transfers: int  # chunks sent in the BitTorrent phase (duplicates included)
    duplicates: int  # endgame copies that arrived after the chunk was already there
    have: np.ndarray  # bool [n, n*K]: every peer's chunks at the end
    events: int  # events processed
    round: SwarmRound | None = None  # the slotted round the warm-up ran on (its overlay, plans)


def capacity_bound(
    uplink: np.ndarray, update_bytes: int, downlink: np.ndarray | None = None, hidden: bool = False
) -> float:
    """Seconds no all-gather of `update_bytes` per peer can beat on these links.

    Every peer must receive the other n-1 updates, and every byte received was sent by some uplink:
    n(n-1)S / sum(U); the slowest peer must send its own S at least once: S / min(U); with paced downlinks each
    peer must take in (n-1)S: (n-1)S / min(D).  Unpaced downlinks (0) add no term: the uplinks bind.
    `hidden`: the hidden protocol's transfers (privacy "full"): each chunk also goes owner -> mixer -> seed and
    comes back to its owner, n + 1 uploads a chunk instead of n - 1 (n(n+1)S / sum(U)), and every peer takes in
    all n updates (nS / min(D)).
    """
    up = np.asarray(uplink, dtype=np.float64)
    n, S = up.size, float(update_bytes)
    if n < 2 or S <= 0:
        return 0.0
    extra = 2 if hidden and n > 2 else 0  # the hidden protocol needs an owner, a mixer and a seed
    terms = [n * (n - 1 + extra) * S / up.sum(), S / up.min()]
    if downlink is not None:
        d = np.asarray(downlink, dtype=np.float64)
        if np.all(d > 0):
            terms.append((n - 1 + extra // 2) * S / d.min())
    return float(max(terms))


def warmup_state(config: SwarmConfig, up: np.ndarray, down: np.ndarray, K: int) -> tuple[SwarmRound, int]:
    """Run the slotted model's tracker stages until BitTorrent starts; the round (have state, overlay) and
    the number of stages it took.  Unpaced links (0) get an unbounded budget, as in the engine."""
    n, C = up.size, config.chunk_bytes
    ub, db = chunk_budgets(up, C, config.slot_seconds), chunk_budgets(down, C, config.slot_seconds)
    rnd = SwarmRound(config, n, K, ub, db, seed=config.seed)
    s_max = rnd.deadline()
    while rnd.phase != BT and not rnd.done and rnd.stage < s_max:
        st = rnd.next_stage()
        if st.phase == BT:
            break
        rnd.complete(st)
    if rnd.phase != BT and not rnd.done:
        raise FLTorrentError(f"the warm-up did not reach BitTorrent within {s_max} stages")
    return rnd, int(rnd.s_bt if rnd.s_bt >= 0 else rnd.stage)


def simulate_events(
    config: SwarmConfig,
    uplink: np.ndarray,
    downlink: np.ndarray,
    update_bytes: int,
    *,
    window: int | None = None,
    latency_s: float = 0.0,
    hash_rate: float = math.inf,
) -> EventsResult:
    """Predict one round on exact per-peer link rates (bytes/s; a downlink of 0 is unpaced).

    `window`: requests in flight per neighbour (None: the config's `bt_window`, else DEFAULT_WINDOW);
    `latency_s`: one-way time of every message; `hash_rate`: verification bytes/s per peer (inf: free; the
    config's integrity "none" also makes it free).  Deterministic for the config's seed.
    """
    up = np.asarray(uplink, dtype=np.float64).reshape(-1)
    down = np.asarray(downlink, dtype=np.float64).reshape(-1)
    n, C, S = up.size, config.chunk_bytes, int(update_bytes)
    if down.size != n or n < 1:
        raise ConfigError(f"need one uplink and one downlink per peer, got {up.size} and {down.size}")
    if np.any(up <= 0) or np.any(down < 0) or latency_s < 0 or hash_rate <= 0:
        raise ConfigError("uplinks must be > 0, downlinks >= 0 (0: unpaced), latency >= 0 and hash rate > 0")
    W = int(window if window is not None else getattr(config, "bt_window", DEFAULT_WINDOW))
    if W < 1:
        raise ConfigError(f"window must be >= 1, got {W}")
    K = math.ceil(S / C) if S > 0 else 0
    if K == 0 or n == 1:
        z = np.zeros(n)
        return EventsResult(0.0, 0.0, 0, 0.0, z, np.zeros(n, np.int64), 0, 0, np.ones((n, n * K), bool), 0)
    rnd, s_bt = warmup_state(config, up, down, K)
    t0 = s_bt * config.slot_seconds
    sizes = np.minimum((np.arange(K) + 1) * C, S) - np.arange(K) * C
    model = _Pipelined(
        rnd.have[:n].copy(),
        [np.asarray(x, dtype=np.int64) for x in rnd.overlay.neighbors],
        up,
        down,
        np.tile(sizes, n).astype(np.float64),
        W,
        float(latency_s),
        math.inf if config.integrity == "none" else float(hash_rate),
        config.endgame_chunks,
        config.seed,
    )
    model.run()
    done = model.done_t + t0
    return EventsResult(
        round_s=float(done.max()),
        warmup_s=t0,
        warmup_stages=s_bt,
        bt_s=float(model.done_t.max()),
        done_s=done,
        sent_bytes=model.sent.astype(np.int64),
        transfers=model.transfers,
        duplicates=model.duplicates,
        have=model.have,
        events=model.events,
        round=rnd,
    )


class _Pipelined:
    """The BitTorrent phase's state and event handlers (times from the phase's start)."""

    def __init__(self, have, nbrs, up, down, size, W, lat, hash_rate, endgame, seed) -> None:
        n, N = have.shape
        self.n, self.N, self.W, self.lat, self.hash_rate, self.endgame = n, N, W, lat, hash_rate, endgame
        self.have, self.up, self.down, self.size = have, up, down, size
        self.nbrs = nbrs
        self.pos = [{int(u): j for j, u in enumerate(nb)} for nb in nbrs]  # neighbour -> its slot in my lists
        dmax = max((len(nb) for nb in nbrs), default=0)
        # known[v, j]: what v's j-th neighbour announced (bitfield at the start, then HAVEs)
        self.known = np.zeros((n, max(dmax, 1), N), dtype=bool)
        for v, nb in enumerate(nbrs):
            self.known[v, : len(nb)] = have[nb]
        self.avail = self.known.sum(axis=1).astype(np.int32)  # copies among v's neighbours, in v's view
        self.key = rng.uniform(seed, rng.BT, 0x5EED, np.arange(n)[:, None], np.arange(N)[None, :])
        self.wanted = have.copy()  # held, arrived or requested: not asked for again (outside endgame)
        self.arrived = have.copy()
        self.out = np.zeros((n, max(dmax, 1)), dtype=np.int64)  # my requests outstanding at each neighbour
        self.slow = up < np.median(up)
        self.queue: list[list[int]] = [[] for _ in range(n)]  # holder -> request ids, arrival order
        self.busy = np.zeros(n, dtype=bool)
        self.down_free = np.zeros(n)
        self.cpu_free = np.zeros(n)
        self.reqs: list[list] = []  # id -> [holder, receiver, chunk, state]; state 0 queued, 1 sent, 2 cancelled
        self.asked: dict[tuple[int, int], list[int]] = {}  # (receiver, chunk) -> request ids in flight
        self.done_t = np.where(have.all(axis=1), 0.0, np.nan)
        self.sent = np.zeros(n)
        self.transfers = self.duplicates = self.events = 0
        self.heap: list[tuple] = []
        self.seq = 0

    def push(self, t: float, kind: int, *args: int) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, kind, *args))

    def run(self) -> None:
        for v in range(self.n):
            self.request(v, self.lat)  # bitfields exchanged: one message time
        while self.heap:
            t, _, kind, *a = heapq.heappop(self.heap)
            self.events += 1
            if kind == _REQ:
                self.queue[a[0]].append(a[1])
                if not self.busy[a[0]]:
                    self.serve(a[0], t)
            elif kind == _SENT:
                self.busy[a[0]] = False
                self.serve(a[0], t)
            elif kind == _ARRIVE:
                self.arrive(t, *a)
            elif kind == _VERIFIED:
                self.verified(t, *a)
            elif kind == _HAVE:
                w, v, c = a
                j = self.pos[w].get(v)
                if j is not None and not self.known[w, j, c]:
                    self.known[w, j, c] = True
                    self.avail[w, c] += 1
                    self.request(w, t)
            elif kind == _CANCEL:
                r = self.reqs[a[0]]
                if r[3] == 0:
                    r[3] = 2
        missing = np.isnan(self.done_t)
        if missing.any():
            raise FLTorrentError(
                f"event model: peers {np.flatnonzero(missing).tolist()} never got every chunk (a chunk no neighbour "
                "holds: a disconnected overlay or a chunk left unseeded)"
            )

    def serve(self, u: int, t: float) -> None:
        """Holder u's uplink is free at t: send the next live request (FIFO; fewest copies first when slow)."""
        q = self.queue[u]
        q[:] = [i for i in q if self.reqs[i][3] == 0]
        if not q:
            return
        k = 0
        if self.slow[u] and len(q) > 1:
            copies = [self.avail[u, self.reqs[i][2]] for i in q]
            k = int(np.argmin(copies))  # first of the fewest: FIFO among ties
        i = q.pop(k)
        r = self.reqs[i]
        r[3] = 1
        c = r[2]
        end = t + self.size[c] / self.up[u]
        self.busy[u] = True
        self.sent[u] += self.size[c]
        self.transfers += 1
        self.push(end, _SENT, u)
        v = r[1]
        got = end + self.lat
        if self.down[v] > 0:  # the downlink takes arriving bytes one transfer after another
            took = max(end, max(self.down_free[v], t) + self.size[c] / self.down[v])
            self.down_free[v] = took
            got = took + self.lat
        self.push(got, _ARRIVE, v, c, i)

    def arrive(self, t: float, v: int, c: int, i: int) -> None:
        u = self.reqs[i][0]
        ids = self.asked.get((v, c), [])
        if i in ids:
            ids.remove(i)
            self.out[v, self.pos[v][u]] -= 1
        if self.arrived[v, c]:
            self.duplicates += 1
        else:
            self.arrived[v, c] = True
            for other in ids:  # endgame: the other copy is no longer wanted
                self.out[v, self.pos[v][self.reqs[other][0]]] -= 1
                self.push(t + self.lat, _CANCEL, other)
            self.asked.pop((v, c), None)
            ok = max(t, self.cpu_free[v]) + (self.size[c] / self.hash_rate if math.isfinite(self.hash_rate) else 0.0)
            self.cpu_free[v] = ok
            self.push(ok, _VERIFIED, v, c)
        self.request(v, t)

    def verified(self, t: float, v: int, c: int) -> None:
        self.have[v, c] = True
        if np.isnan(self.done_t[v]) and self.have[v].all():
            self.done_t[v] = t
        for w in self.nbrs[v]:
            self.push(t + self.lat, _HAVE, int(w), v, c)

    def request(self, v: int, t: float) -> None:
        """Fill v's free request slots: rarest-first among announced chunks, then endgame duplicates."""
        nb = self.nbrs[v]
        d = len(nb)
        if d == 0 or not np.isnan(self.done_t[v]):
            return
        while True:
            free = self.out[v, :d] < self.W
            if not free.any():
                return
            cand = ~self.wanted[v] & self.known[v, :d][free].any(axis=0)
            if cand.any():
                idx = np.flatnonzero(cand)
                c = int(idx[np.argmin(self.avail[v, idx] + self.key[v, idx])])
                self.ask(v, c, free & self.known[v, :d, c], t)
                continue
            left = np.flatnonzero(~self.arrived[v])
            if left.size == 0 or left.size > self.endgame or (~self.wanted[v]).any():
                return
            for c in left[np.argsort(self.key[v, left])]:  # endgame: one duplicate per chunk
                ids = self.asked.get((v, int(c)), [])
                if len(ids) != 1:
                    continue
                holders = free & self.known[v, :d, c]
                holders[self.pos[v][self.reqs[ids[0]][0]]] = False
                if holders.any():
                    self.ask(v, int(c), holders, t)
                    break
            else:
                return

    def ask(self, v: int, c: int, holders: np.ndarray, t: float) -> None:
        """Request c from the holder with the fewest of my requests outstanding, the faster uplink first."""
        nb = self.nbrs[v]
        js = np.flatnonzero(holders)
        j = int(js[np.lexsort((-self.up[nb[js]], self.out[v, js]))[0]])
        u = int(nb[j])
        i = len(self.reqs)
        self.reqs.append([u, v, c, 0])
        self.asked.setdefault((v, c), []).append(i)
        self.out[v, j] += 1
        self.wanted[v, c] = True
        self.push(t + self.lat, _REQ, u, i)
