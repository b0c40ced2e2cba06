"""Real swarm rounds over MPI: the swarm core's stages executed with real bytes.

Roles: every rank is a peer; the tracker role runs on `config.tracker_rank` (rank 0 by default) over its
own communicator and handles only fixed-width int64 control frames (directives, completion reports, the
end-of-round verdict).  Payload moves peer to peer on a separate communicator with nonblocking sends and
receives straight into the destination buffers; contiguous chunks of one update between one pair form one
message.  Every received chunk is checked against the hash in its owner's descriptor; a chunk that fails
is discarded (never aggregated), reported undelivered, re-fetched from another holder in a later stage,
and its sender recorded.

The tracker drives `SwarmRound` exactly as the simulator does, so a real round makes the simulator's
transfer decisions for the same seed, budgets and overlay (tests compare the traces).  Warm-up stages are
the tracker's (directives).  BitTorrent stages are the peers' own (`bt_decisions="peers"`, engine_bt.py):
the tracker sends each peer a stage frame (who is active, who may send), the peers exchange bitfields,
budgets, requests, grants, keeps and have-deltas with their overlay neighbours, move the bytes, and report
what they received, from which the tracker rebuilds the stage.  `bt_decisions="tracker"` has the tracker
evaluate the same decisions on the peers' behalf and relay them as directives (one control frame per peer
and stage instead of eight neighbour exchanges).  `bt_decisions="pipelined"` drops the stage clock from the
BitTorrent phase: one open frame, then each peer requests and serves on its own until the end frame
(bt_pipeline.py).  A peer that stops answering within `stage_timeout_s` is
excluded; the round then completes over the others and, with consensus, every rank averages the same
agreed reconstructable set.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from ..chunks.digest import DIGEST_WORDS, round_key
from ..chunks.plane import HOST, HostPlane, RunAccumulator, TorchPlane
from ..config import BT_DECISIONS, PRIVACY_MECHANISMS, PROTOCOLS, SCHEDULERS, SwarmConfig, parse_privacy
from ..errors import ConfigError, PeerTimeoutError, ProtocolError, ShapeMismatchError, TransportError
from ..swarm import rng
from ..swarm.bt_peer import pack_bits
from ..swarm.budget import chunk_budgets, direct_round, small_round
from ..swarm.round import BT, SPRAY, Stage, SwarmRound
from ..trace import Trace
from ..transport import base as tb
from ..transport.base import MAGIC, Transport, data_tag
from ..transport.mpi import MPITransport
from . import frames
from .frames import KIND_BT_STAGE, KIND_DIRECTIVE, KIND_END, KIND_REPORT, own_frame
from .recorder import RoundRecorder

KIND_ACK = 5  # a follower's confirmation of the end frame (read here, not by frames.py)
DESC_HEAD = 8  # descriptor words before the digests: MAGIC, round, owner, K, then 4 float64 (weight, links, seed)
TAG_DIRECTIVE, TAG_REPORT = 11, 12


class Late(NamedTuple):
    """A receive still unfinished at its stage's data deadline, kept posted (with its buffer) to tell a sender
    that never sent from a slow one; completed or cancelled before the round's buffers go."""

    sender: int
    req: Any
    chunks: int
    buf: np.ndarray  # what MPI may still write: referenced until the request completes or is cancelled


@dataclass
class RoundResult:
    """What one rank holds after a round."""

    updates: list[np.ndarray | None]  # index = rank; that rank's payload bytes, None outside the agreed set
    weights: np.ndarray  # float64 [size]: the weight each rank published
    participants: np.ndarray  # int64 sorted ranks in the agreed reconstructable set
    stats: dict[str, Any] = field(default_factory=dict)


RUN_BYTES = 4 * 2**20  # longest message of coalesced chunks: its digests are checked while the next one moves
# without digests nothing overlaps a message's arrival, so runs go whole up to the longest message every transport
# takes (transport/torch_p2p.py leaves a body over 64 MiB unread): fewer messages, fewer requests to poll
RUN_BYTES_UNHASHED = 64 * 2**20
# digests of up to this many chunks ride in the round's shape all-gather (a fixed width, the same on every rank
# whatever its payload), so a small round agrees on its shape and its descriptors in one all-gather; a round of
# more chunks all-gathers its descriptors after it, as before
FOLD_CHUNKS = 64
ROUND_META_WORDS = 14  # SwarmEngine.round_meta's width


def shape_bytes(hashed: bool = True) -> int:
    """Bytes of one rank's contribution to a round's shape all-gather (`disseminate` with agreed=False): the
    round_meta words, then its descriptor (digest slots for FOLD_CHUNKS chunks with integrity "blake3").  Tests
    aim all-gather faults by size."""
    return 8 * (ROUND_META_WORDS + DESC_HEAD + (DIGEST_WORDS * FOLD_CHUNKS if hashed else 0))


def _runs(peer: np.ndarray, chunk: np.ndarray, K: int, most: int = 1 << 62) -> list[tuple[int, int, int, int]]:
    """(peer, owner, first_index, count) runs of consecutive chunks of one owner to/from one peer, each of at most
    `most` chunks (sender and receiver split alike: MPI keeps a pair's messages of one tag in order)."""
    if peer.size == 0:
        return []
    brk = np.ones(peer.size, dtype=bool)
    brk[1:] = (peer[1:] != peer[:-1]) | (chunk[1:] != chunk[:-1] + 1) | (chunk[1:] // K != chunk[:-1] // K)
    starts = np.flatnonzero(brk)
    ends = np.concatenate([starts[1:], [peer.size]])
    out = []
    for s, e in zip(starts.tolist(), ends.tolist()):
        for a in range(s, e, most):
            out.append((int(peer[a]), int(chunk[a] // K), int(chunk[a] % K), min(most, e - a)))
    return out


def direct_lists(me: int, active: np.ndarray, K: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rank `me`'s sends (receiver, chunk) and receives (sender, chunk) of the direct exchange's stage
    (SwarmRound._direct_stage: every active peer sends its own K chunks to every other active peer), sorted as a
    directive lists them (sends by receiver then chunk, receives by sender then chunk)."""
    others = np.flatnonzero(active)
    others = others[others != me].astype(np.int64)
    own = me * K + np.arange(K, dtype=np.int64)
    s_to, s_chunk = np.repeat(others, K), np.tile(own, others.size)
    r_from = np.repeat(others, K)
    r_chunk = (others[:, None] * K + np.arange(K, dtype=np.int64)[None, :]).reshape(-1)
    return s_to, s_chunk, r_from, r_chunk


class SwarmEngine:
    """Runs swarm rounds over a Transport (collective: every rank calls the same methods).

    `net` is a Transport (MPI, NCCL, a fault-injecting wrapper) or an mpi4py communicator, which is wrapped
    in an MPITransport.  The engine opens three contexts of its own on it: data, control, neighbour frames.
    """

    def __init__(self, net, config: SwarmConfig | None = None):
        self.cfg = config or SwarmConfig.from_env()
        if not isinstance(net, Transport):
            net = MPITransport(net, dup=False)
        self.net = net
        self.size = net.size
        self.rank = net.rank
        if not 0 <= self.cfg.tracker_rank < self.size:
            raise ConfigError(f"tracker_rank {self.cfg.tracker_rank} is outside the communicator (size {self.size})")
        self.tracker = self.cfg.tracker_rank
        self.data = net.dup("data")
        self.ctrl = net.dup("ctrl")
        self.nbrc = net.dup("nbr")  # neighbour frames of decentralised BitTorrent stages (bt_stages.py)
        # pipelined BitTorrent's payload (bt_pipeline.py): a tag per request, numbered per server across rounds
        self.pipe = net.dup("pipe")
        self.pipe_seq = np.zeros(self.size, dtype=np.int64)
        self._share_cores(net)
        _compile_once(self.cfg, self.rank)
        # the tracker's seed and a fresh nonce, learned once: digest keys are salted with both (a descriptor
        # of another job's or engine's round of the same number matches nothing here), and every control
        # frame starts with MAGIC | nonce << 32, so a frame left over from an earlier engine on a recycled
        # communicator is told apart from this engine's and discarded
        mine = np.array([self.cfg.seed % (1 << 31), int.from_bytes(os.urandom(4), "little") >> 1], np.int64)
        seed, nonce = (int(x) for x in tb.allgather(self.ctrl, mine, self.cfg.timeout_s, "seeds")[self.tracker])
        self.salt = (seed << 31) | nonce
        self.magic = MAGIC | (nonce << 32)
        self.round_id = 0
        self.out_of_step = ""  # set when a collective timed out: every later round fails with it
        # requests a round could not complete (sends to peers that went silent): MPI may still read their
        # buffers, so they stay referenced here until the transport reports them complete (`prune_orphans`)
        self._orphans: list[tuple[Transport, Any, Any]] = []
        self.last_trace: Trace | None = None

    @staticmethod
    def _share_cores(net: Transport) -> None:
        """Compiled swarm passes (tracker side) get this rank's share of the node's cores, not all of them.

        Ranks sharing a node would otherwise oversubscribe it, and every parallel region of the tracker's
        passes would wait on a descheduled thread.
        """
        import numba

        per_rank = max(1, (os.cpu_count() or 1) // net.local_size())
        numba.set_num_threads(min(per_rank, numba.config.NUMBA_NUM_THREADS))

    def orphan(self, net: Transport, reqs: list, keep: Any = None) -> None:
        """Park unfinished requests of `net` with what their buffers belong to, until they complete."""
        self._orphans.extend((net, r, keep) for r in reqs)

    def prune_orphans(self) -> int:
        """Drop the parked requests that have completed; ask MPI to cancel the rest (a send whose receiver
        is gone for good), so they complete too.  Returns how many are left."""
        left: list = []
        for net in {id(o[0]): o[0] for o in self._orphans}.values():
            mine = [o for o in self._orphans if o[0] is net]
            done = set(net.test([o[1] for o in mine]))
            rest = [o for i, o in enumerate(mine) if i not in done]
            net.abandon([o[1] for o in rest])
            left.extend(rest)
        self._orphans = left
        return len(left)

    def close(self) -> None:
        """Free the engine's contexts; parked requests are cancelled and given a moment to complete first."""
        deadline = time.monotonic() + 1.0
        while self.prune_orphans() and time.monotonic() < deadline:
            time.sleep(0.01)
        for c in (self.data, self.ctrl, self.nbrc, self.pipe):
            if c is not None:
                c.close()
        self.data = self.ctrl = self.nbrc = self.pipe = None

    # ------------------------------------------------------------------ collectives on the control comm
    def _allgather(self, arr: np.ndarray, what: str) -> np.ndarray:
        """An all-gather on the control context.  One that times out leaves that context out of step for good
        (a late rank's contribution would match the next one): the engine then fails every later call, the
        same way on every rank, and the abandoned buffers stay parked for MPI to finish writing."""
        if self.out_of_step:
            raise TransportError(self.out_of_step)
        try:
            return tb.allgather(self.ctrl, arr, self.cfg.timeout_s, what)
        except PeerTimeoutError as e:
            self.out_of_step = (
                f"rank {self.rank}: the control context fell out of step at round {self.round_id - 1} ({e}); "
                "this group cannot run more rounds: create a new one"
            )
            raise

    def agree(self, meta: np.ndarray, ref: int = 0) -> np.ndarray:
        """Raise ShapeMismatchError on every rank unless every rank passed the same int64 `meta`; returns every
        rank's `meta` ([size, words]).  With `ref` = -1 only the lengths must agree (the caller compares)."""
        meta = np.ascontiguousarray(meta, dtype=np.int64).reshape(-1)
        lens = self._allgather(np.array([meta.size], dtype=np.int64), "metadata lengths").reshape(-1)
        if np.any(lens != lens[0]):
            bad = int(np.flatnonzero(lens != lens[0])[0])
            raise ShapeMismatchError(f"rank {bad} sent {lens[bad]} metadata words where rank 0 sent {lens[0]}")
        allm = self._allgather(meta, "metadata")
        diff = np.flatnonzero(np.any(allm != allm[ref], axis=1)) if ref >= 0 else np.zeros(0, np.int64)
        if diff.size:
            r = int(diff[0])
            raise ShapeMismatchError(
                f"ranks disagree on the round's shape: rank {r} has {allm[r].tolist()} where rank {ref} has "
                f"{allm[ref].tolist()}"
            )
        return allm

    def _agree_round(
        self, meta: np.ndarray, tail: np.ndarray | None = None
    ) -> tuple[list[int], np.ndarray, np.ndarray]:
        """The round's agreement (`round_meta` words): the ranks whose words differ from the tracker's in the
        payload size or the round id alone (a replayed contribution), if they are fewer than half of all, and the
        gathered round words ([size, words]: row `tracker` is the reference); every rank gets the same answer.  Any
        other difference raises ShapeMismatchError on every rank, as `agree` does.  `tail`: int64 words of the same
        width on every rank that ride in the same all-gather (the descriptor); returned gathered ([size, words];
        [size, 0] without)."""
        # round_meta has a fixed width by construction, so one all-gather compares it (agree's length check first
        # is for callers whose words may differ in number)
        meta = np.ascontiguousarray(meta, dtype=np.int64).reshape(-1)
        words = meta if tail is None else np.concatenate([meta, np.asarray(tail, dtype=np.int64).reshape(-1)])
        got = self._allgather(words, "round shape")
        allm, rest_words = got[:, : meta.size], np.ascontiguousarray(got[:, meta.size :])
        ref = allm[self.tracker]
        odd = np.flatnonzero(np.any(allm != ref, axis=1))
        if not odd.size:
            return [], allm, rest_words
        rest = ~np.isin(np.arange(allm.shape[1]), [1, 2])  # every word but round_meta's round id and nbytes
        if 2 * odd.size < self.size and not np.any(allm[odd][:, rest] != ref[rest]):
            return odd.tolist(), allm, rest_words
        r = int(odd[0])
        raise ShapeMismatchError(
            f"ranks disagree on the round's shape: rank {r} has {allm[r].tolist()} where the tracker (rank "
            f"{self.tracker}) has {ref.tolist()}"
        )

    def round_meta(self, nbytes: int, cfg: SwarmConfig | None = None, consensus: bool = True, rid: int | None = None):
        """The int64 words every rank must agree on before a round: its shape and the protocol knobs that
        decide the schedule.  A caller with its own agreement folds these in and passes `agreed=True`."""
        cfg = cfg or self.cfg
        priv = sum(1 << i for i, m in enumerate(PRIVACY_MECHANISMS) if m in cfg.privacy)
        priv |= PROTOCOLS.index(cfg.protocol) << 3 | cfg.seed_peers << 8  # the privacy word: mechanisms, protocol
        return np.array(
            [
                MAGIC,
                self.round_id if rid is None else rid,
                nbytes,
                cfg.chunk_bytes,
                priv,
                cfg.degree,
                SCHEDULERS.index(cfg.scheduler),
                cfg.tau,
                int(consensus),
                int(cfg.integrity == "blake3"),
                BT_DECISIONS.index(cfg.bt_decisions),
                cfg.bt_passes,
                cfg.direct_bytes,
                cfg.bt_window,
            ],
            dtype=np.int64,
        )

    # ------------------------------------------------------------------ the round
    def disseminate(
        self,
        payload: np.ndarray,
        *,
        weight: float = 1.0,
        privacy=None,
        seed: int | None = None,
        deadline_s: float | None = None,
        consensus: bool = True,
        out: np.ndarray | Sequence[np.ndarray] | None = None,
        trace: str | None = None,
        agreed: bool = False,
        plane: HostPlane | TorchPlane | None = None,
        sink: RunAccumulator | None = None,
    ) -> RoundResult:
        """One round: every rank's `payload` (1-D contiguous bytes, same size everywhere) reaches every rank.

        `out` ([size, nbytes] uint8, or `size` contiguous uint8 arrays of nbytes) receives the updates in place:
        chunks are received straight into it, so a caller's output is the round's only copy.  Faults are
        injected through the transport (transport/faulty.py), never through this call.  `agreed=True`: the
        caller already agreed on `round_meta(...)` with the other ranks inside its own agreement (one agreement
        per collective).
        `plane` (chunks/plane.py): where the rows live and which transport moves their runs; default the host
        (numpy rows on the engine's data context).  A device plane takes a device payload and returns device rows.
        `sink`: gets every row's verified chunk runs as they arrive (the FedAvg accumulated during the round).
        Returns this rank's RoundResult.
        """
        cfg = self.cfg if privacy is None else self.cfg.replace(privacy=parse_privacy(privacy))
        plane = HOST if plane is None else plane
        pay = plane.adopt(payload)
        n, me, rid = self.size, self.rank, self.round_id
        self.round_id += 1
        self.prune_orphans()
        C = cfg.chunk_bytes
        nbytes = plane.nbytes(pay)
        odd: list[int] = []  # ranks whose payload size is not the tracker's: left out of the round
        hashed = cfg.integrity == "blake3"
        rseed = int(seed) if seed is not None else rng.round_seed(cfg.seed, rid)

        def descriptor(k: int, w: float) -> np.ndarray:
            """(MAGIC, round, owner, K), weight, links and seed, then the chunk digests (none without integrity)."""
            desc = np.zeros(DESC_HEAD + (DIGEST_WORDS * k if hashed else 0), dtype=np.int64)
            desc[:4] = [MAGIC, rid, me, k]
            desc[4:DESC_HEAD] = np.array([float(w), cfg.uplink, cfg.downlink, float(rseed)], np.float64).view(np.int64)
            return desc

        alld = None
        own_digests: list[np.ndarray] = []  # this rank's chunk digests, computed once

        def digest_own() -> None:
            if nbytes:
                own_digests.append(plane.digests(pay, C, round_key(self.salt, rid, me)))

        if not agreed:
            meta = self.round_meta(nbytes, cfg, consensus, rid)
            # the descriptor rides in the shape's all-gather: with digests, those of the first FOLD_CHUNKS chunks
            # (zero slots after the last), which are all of them in a small round
            k_own = math.ceil(nbytes / C)
            tail = descriptor(FOLD_CHUNKS if hashed else 0, weight)
            tail[3] = k_own
            if hashed and k_own:
                digest_own()
                m = min(k_own, FOLD_CHUNKS)
                tail[DESC_HEAD : DESC_HEAD + DIGEST_WORDS * m] = own_digests[0][:m].view(np.int64).reshape(-1)
            odd, allm, alld = self._agree_round(meta, tail)
            ref_nbytes = int(allm[self.tracker, 2])
            if me in odd:  # take part in the descriptors' all-gather (an empty update of the agreed size), then raise
                own = (int(allm[me, 1]), int(allm[me, 2]), int(allm[self.tracker, 1]))  # what the others saw
                nbytes, pay, weight, out = ref_nbytes, plane.zeros(ref_nbytes), 0.0, None
            K = math.ceil(nbytes / C) if nbytes else 0
            if hashed and K <= FOLD_CHUNKS:
                alld = alld[:, : DESC_HEAD + DIGEST_WORDS * K]
            elif hashed:
                alld = None  # more chunks than the shape's all-gather holds: the descriptors' own all-gather
        t0 = time.monotonic()
        K = math.ceil(nbytes / C) if nbytes else 0
        if alld is None:  # one all-gather of every owner's descriptor
            desc = descriptor(K, weight)
            if K and hashed and me not in odd:  # an odd rank's descriptor is refused whatever it holds
                if not own_digests:
                    digest_own()
                desc[DESC_HEAD:] = own_digests[0].view(np.int64).reshape(-1)
            alld = self._allgather(desc, "descriptors")
        if me in odd:
            raise ShapeMismatchError(
                f"rank {me}: round {own[0]}'s payload here is {own[1]} bytes, the tracker's (rank {self.tracker}) "
                f"is {ref_nbytes} bytes in its round {own[2]}: this rank is left out of the round and the others "
                "complete it without it"
            )
        # a descriptor not bound to this round and owner (replayed, forged), or whose weight or link rates are not
        # finite and >= 0, leaves its owner out on every rank (every rank sees the same all-gather)
        head = np.array([MAGIC, rid, 0, K], dtype=np.int64)
        all_info = np.ascontiguousarray(alld[:, 4:DESC_HEAD]).view(np.float64)
        sane = np.all(np.isfinite(all_info[:, :3]) & (all_info[:, :3] >= 0), axis=1)
        bad_desc = [u for u in range(n) if not (sane[u] and np.array_equal(alld[u, :4], head + [0, 0, u, 0]))]
        bad_desc = sorted(set(bad_desc) | set(odd))
        all_info[bad_desc] = [0.0, 0.0, 0.0, 0.0]
        all_hash = (
            np.ascontiguousarray(alld[:, DESC_HEAD:]).view(np.uint64).reshape(n, K, DIGEST_WORDS)
            if hashed
            else np.zeros((n, K, DIGEST_WORDS), dtype=np.uint64)  # unused: check() passes every chunk
        )
        weights = all_info[:, 0].copy()
        rseed = int(all_info[self.tracker, 3])
        rows = None if out is None else list(out)  # an [n, nbytes] array or n arrays (a torch all_gather's list)
        if rows is not None and (
            plane is not HOST
            or len(rows) != n
            or any(r.shape != (nbytes,) or r.dtype != np.uint8 or not r.flags.c_contiguous for r in rows)
        ):
            shapes = [f"{r.dtype} {list(r.shape)}" for r in rows]
            raise ShapeMismatchError(f"out must be {n} contiguous host uint8 rows of {nbytes} bytes, got {shapes}")
        bufs = [rows[u] if rows is not None else plane.empty(nbytes) for u in range(n)]
        # the output's own row gets the payload during the first stage's transfers (`_PeerState.own_due`): sends
        # read the payload itself, so the copy need not come first
        own_due = rows is not None and not np.shares_memory(rows[me], pay)
        bufs[me] = pay
        if sink is not None:
            sink.start(bufs, weights, bad_desc)
            sink.add(me, np.arange(K))
        if K == 0 or n == 1:
            if own_due:
                rows[me][:] = pay
            return RoundResult(
                [bufs[u] for u in range(n)],
                weights,
                np.arange(n, dtype=np.int64),
                {
                    "round_s": time.monotonic() - t0,
                    "stages": 0,
                    "warmup_stages": 0,
                    "warmup_s": 0.0,
                    "swarm_s": 0.0,
                    "bytes_sent": 0,
                    "bytes_recv": 0,
                    "refetched_chunks": 0,
                    "refused_bytes": 0,
                    "bad_senders": [],
                    "bad_descriptors": [],
                    "excluded": [],
                    "silent": False,
                    "warmup_failed_open": False,
                    "peer_decided_stages": 0,
                    "pipelined": False,
                },
            )
        peer = _PeerState(self, cfg, rid, K, C, nbytes, bufs, all_hash, all_info, rseed, bad_desc, plane, sink)
        if own_due:
            peer.own_in = rows[me]  # own chunks coming back are verified in the output row, not in scratch of S
            peer.own_due = True
        # a direct round's first stage follows from the agreed descriptors alone (the tracker's SwarmRound decides
        # it from the same inputs: swarm.budget.direct_round, the owners with a good descriptor), so every rank
        # runs it at once, without waiting for a directive; the tracker checks that its stage is this one
        active = np.ones(n, dtype=bool)
        active[bad_desc] = False
        derived = direct_round(cfg, n, nbytes, np.delete(all_info[:, 1], bad_desc)) and int(active.sum()) >= 2
        try:
            role: list = []
            if me == self.tracker:  # the tracker's round state is built while its first stage's transfers move

                def build() -> None:
                    try:
                        role.append(_Tracker(self, cfg, rid, K, all_info, rseed, deadline_s, peer, bad_desc, derived))
                    except Exception as e:  # raised once the stage's requests are settled, never from inside move
                        role.append(e)

            first = peer.direct(active, build if me == self.tracker else None) if derived and active[me] else None
            if me == self.tracker:
                if not role:
                    build()
                if isinstance(role[0], Exception):
                    raise role[0]
                role[0].own_report = first
                end = role[0].run()
            else:
                if first is not None:
                    what = f"round {rid} report"
                    tb.send_frame(self.ctrl, first, self.tracker, TAG_REPORT, cfg.timeout_s, what)
                end = peer.follow(1 if derived else 0)
        finally:
            peer.drop_late()  # no receive kept past its deadline outlives the round's buffers
            if peer.own_written or peer.own_due:
                peer.own_in[:] = pay  # whatever came back (a refused copy included), the output holds the payload
                peer.own_due = False
        res = peer.finish(end, weights, consensus, t0, trace or cfg.trace)
        res.stats["shape_mismatch"] = odd  # ranks left out for a payload size other than the tracker's
        return res


_COMPILED: list[bool] = []


def _compile_once(cfg: SwarmConfig, rank: int = 0) -> None:
    """Compile the swarm kernels before the first round of this process, outside any stage clock (engine
    construction, i.e. group creation), saying so once on rank 0 when numba's cache is cold (no silent wait)."""
    if not _COMPILED:
        from ..swarm.bt_kernel import compile_note
        from ..swarm.bt_peer import compile_kernels

        note = compile_note() if rank == 0 else None
        t0 = time.monotonic()
        if note:
            print(f"fltorrent: {note}", file=sys.stderr, flush=True)
        compile_kernels(cfg)
        if note:
            print(f"fltorrent: kernels compiled in {time.monotonic() - t0:.1f} s", file=sys.stderr, flush=True)
        _COMPILED.append(True)


class _PeerState:
    """One rank's side of a round: executes directives, verifies chunks, reports."""

    def __init__(
        self,
        eng: SwarmEngine,
        cfg: SwarmConfig,
        rid: int,
        K: int,
        C: int,
        nbytes: int,
        bufs,
        all_hash,
        all_info: np.ndarray,
        seed: int,
        bad_desc: list[int],
        plane: HostPlane | TorchPlane = HOST,
        sink: RunAccumulator | None = None,
    ):
        self.eng, self.cfg, self.rid, self.K, self.C, self.nbytes = eng, cfg, rid, K, C, nbytes
        # rows, runs and digests go through the plane; runs move on its data transport (device to device for a
        # device plane), control frames always on the engine's host contexts
        self.plane, self.sink = plane, sink
        self.data: Transport = plane.data if plane.data is not None else eng.data
        self.bufs, self.hashes, self.bad_desc = bufs, all_hash, bad_desc
        self.own_in: np.ndarray | None = None  # where own chunks coming back land (the caller's output row)
        self.own_written = False  # a receive was posted into own_in: restore it from the payload after the round
        self.own_due = False  # own_in still lacks the payload (copied while a stage's transfers move, or at the end)
        self.pipelined = False  # this rank ran a pipelined BitTorrent phase (bt_pipeline.PipePeer)
        self.keys = [round_key(eng.salt, rid, u) for u in range(eng.size)] if cfg.integrity == "blake3" else []
        self.refused_bytes = 0
        self.all_info, self.seed = all_info, seed
        n = eng.size
        self.have = np.zeros((n, K), dtype=bool)  # what this rank holds publicly (its BitTorrent have row)
        # hidden protocol: a rank's own update is not in its have row; it seeds it and downloads it back
        self.hidden = cfg.hides_owners and n > 2  # as SwarmRound.hidden: an owner, a mixer and a seed
        self.have[eng.rank] = not self.hidden
        self.got_from = np.zeros(n, dtype=np.int64)  # verified non-spray chunks from each peer (reciprocity)
        self.runner = None  # engine_bt.PeerStageRunner, from the first decentralised BitTorrent stage
        self.sent_bytes = self.recv_bytes = 0
        self.refetched = 0
        self.bad_senders: set[int] = set()
        self.protocol_errors: dict[int, str] = {}  # neighbours banned for a frame that does not fit the protocol
        self.unserved: dict[int, str] = {}  # senders named for granting (or being directed to send) and not sending
        self.late: list[Late] = []  # the last directed stage's receives unfinished at its deadline
        self.suspects: set[int] = set()  # senders whose directed data never came although the tracker moved on
        self.misbehaved: dict[int, str] = {}  # the tracker fills it: peers excluded for a bad report
        self.log: dict[str, list] = {
            k: [] for k in ("stage", "t_start", "t", "sender", "chunk", "phase", "bytes", "ok")
        }
        self.t0 = time.monotonic()
        self.silent = False  # set at the end of the round when the tracker excluded this rank
        self.exposed = False  # hidden protocol: had to publish its own update (its public copies left)

    def chunk_range(self, owner: int, first: int, count: int) -> tuple[int, int]:
        return first * self.C, min((first + count) * self.C, self.nbytes)

    def follow(self, nxt: int = 0) -> np.ndarray:
        """Non-tracker ranks: execute directives until the end-of-round frame (`nxt`: the first stage the tracker
        directs; 1 after a direct stage this rank derived itself).  Stages only move forward: a frame of a stage
        already run is stale (frames.py)."""
        eng = self.eng
        while True:
            # a stage may spend up to ~2.5 stage timeouts excluding a silent peer before the next frame comes
            wait = self.cfg.timeout_s + 3 * self.cfg.stage_timeout_s
            try:
                msg = tb.recv_frame(eng.ctrl, eng.tracker, TAG_DIRECTIVE, wait, f"round {self.rid} directive")
            except PeerTimeoutError as e:
                raise PeerTimeoutError(f"{e} (the tracker, rank {eng.tracker}, stalled or died)") from e
            msg = own_frame(msg, eng.magic)
            if msg is None:
                continue  # a frame of an earlier engine on a communicator MPI recycled
            kinds = (KIND_END, KIND_BT_STAGE, KIND_DIRECTIVE, frames.KIND_PIPE_OPEN)
            try:
                h = frames.parse_header(msg, sender=eng.tracker, round_id=self.rid, kinds=kinds, min_stage=nxt)
            except frames.StaleFrame:
                continue  # the end frame of a round this rank already gave up on, or a repeated stage
            if h.kind == frames.KIND_PIPE_OPEN:  # the pipelined BitTorrent phase, until the tracker's end frame
                from .bt_pipeline import follow_pipelined

                self.settle_late()
                msg = follow_pipelined(self, msg)
                h = frames.parse_header(msg, sender=eng.tracker, round_id=self.rid, kinds=KIND_END, min_stage=nxt)
            if h.kind == KIND_END:
                frames.parse_end(msg, sender=eng.tracker, round_id=self.rid, n=eng.size, min_stage=nxt)
                ack = np.array([eng.magic, self.rid, h.stage, KIND_ACK], dtype=np.int64)
                tb.send_frame(eng.ctrl, ack, eng.tracker, TAG_REPORT, self.cfg.timeout_s, f"round {self.rid} ack")
                return msg
            if h.kind == KIND_BT_STAGE:
                rep = self.bt_stage(msg)
            else:
                rep = self.execute(msg)
            nxt = h.stage + 1
            tb.send_frame(eng.ctrl, rep, eng.tracker, TAG_REPORT, self.cfg.timeout_s, f"round {self.rid} report")

    def bt_stage(self, msg: np.ndarray) -> np.ndarray:
        """A decentralised BitTorrent stage (engine_bt.py); returns the report frame."""
        from .bt_stages import PeerStageRunner

        n, me, K = self.eng.size, self.eng.rank, self.K
        stage, active, can_send, exposed = frames.parse_bt_stage(msg, sender=self.eng.tracker, round_id=self.rid, n=n)
        self.settle_late()
        publish = np.zeros(0, dtype=np.int64)
        if self.hidden and exposed[me] and not self.have[me].all():
            # its update's public copies left: it holds it publicly from now on (announced with this stage's haves)
            publish = me * K + np.flatnonzero(~self.have[me])
            self.have[me] = True
            self.exposed = True
        if self.runner is None:
            cfg, C = self.cfg, self.cfg.chunk_bytes
            up = chunk_budgets(self.all_info[:, 1], C, cfg.slot_seconds)
            down = chunk_budgets(self.all_info[:, 2], C, cfg.slot_seconds)
            self.runner = PeerStageRunner(self, cfg, self.rid, self.seed, up, down, self.got_from)
        # a neighbour this rank banned gets no requests and no grants from it, but its frames are still
        # answered (empty), so the stage keeps its pace on both sides
        banned = np.zeros(n, dtype=bool)
        banned[list(self.bad_senders)] = True
        body = self.runner.stage(self, stage, active, can_send & ~banned, refuse=banned, publish=publish)
        head = [self.eng.magic, self.rid, stage, KIND_REPORT]
        return np.concatenate([head, body, self.tail()]).astype(np.int64)

    def tail(self) -> np.ndarray:
        """A report's tail: every sender banned this round (s), every one whose directed data never came (n + s)."""
        n = self.eng.size
        return np.array(sorted(self.bad_senders) + sorted(n + s for s in self.suspects), dtype=np.int64)

    def settle_late(self) -> None:
        """The last directed stage's receives that had not arrived by its deadline, once the tracker moved on: it
        had every live peer's report, and a peer posts its sends before it reports, so a run still missing
        after a short grace was never sent.  Its sender becomes a suspect in this rank's reports (the tracker,
        which knows whether that sender had gone silent, names it and bans the pair); the receives are cancelled."""
        late, self.late = self.late, []
        if not late:
            return
        data = self.data
        done = tb.wait_until(data, [x.req for x in late], time.monotonic() + min(1.0, self.cfg.stage_timeout_s))
        data.cancel([x.req for x, d in zip(late, done) if not d])
        for x, d in zip(late, done):
            why = data.failed(x.req) if d else None
            if why:  # it came, late and longer than its run: refused, its sender banned
                self.bad_senders.add(x.sender)
                self.protocol_errors.setdefault(x.sender, why)
            elif not d:
                self.suspects.add(x.sender)

    def drop_late(self) -> None:
        """Cancel every receive kept past its deadline (the round is over, or failed)."""
        late, self.late = self.late, []
        if late:
            self.data.cancel([x.req for x in late])

    def execute(self, msg: np.ndarray) -> np.ndarray:
        """Run one stage's directive: post receives, paced sends, wait, verify; return the report frame."""
        eng, K = self.eng, self.K
        d = frames.parse_directive(
            msg, sender=eng.tracker, round_id=self.rid, n=eng.size, K=K, me=eng.rank, own_ok=self.hidden
        )
        self.settle_late()
        ok = self.move(d.stage, d.s_to, d.s_chunk, d.r_from, d.r_chunk, d.r_kind, self.late)
        return self.report(d.stage, ok)

    def direct(self, active: np.ndarray, meanwhile: Callable[[], None] | None = None) -> np.ndarray:
        """Stage 0 of a direct round, derived by this rank (`direct_lists`) instead of directed; the report frame.
        `meanwhile` runs once its transfers are posted (the tracker builds its round state)."""
        s_to, s_chunk, r_from, r_chunk = direct_lists(self.eng.rank, active, self.K)
        kind = np.full(r_from.size, BT, dtype=np.int64)
        ok = self.move(0, s_to, s_chunk, r_from, r_chunk, kind, self.late, meanwhile)
        return self.report(0, ok)

    def report(self, stage: int, ok: np.ndarray) -> np.ndarray:
        """A directed stage's report frame: which receives arrived intact, then the tail (`tail`)."""
        head = [self.eng.magic, self.rid, stage, KIND_REPORT, ok.size]
        return np.concatenate([head, ok.astype(np.int64), self.tail()]).astype(np.int64)

    def move(
        self,
        stage: int,
        s_to: np.ndarray,
        s_chunk: np.ndarray,
        r_from: np.ndarray,
        r_chunk: np.ndarray,
        r_kind: np.ndarray,
        late: list | None = None,
        meanwhile: Callable[[], None] | None = None,
    ) -> np.ndarray:
        """Move one stage's bytes: post receives, paced sends, wait, verify.  Lists sorted by (peer, chunk);
        returns which receives arrived intact.  `late`: receives still unfinished at the deadline go there (`Late`,
        with their buffers) instead of being cancelled, to tell a sender that never sent from a slow one
        (`settle_late` once the tracker moved on; bt_stages after the have frames); the caller completes or
        cancels them before the round's buffers go.  `meanwhile`: work to run once the transfers are posted."""
        eng, K, nr = self.eng, self.K, r_from.size
        now = time.monotonic() - self.t0
        tag = data_tag(self.rid, stage)
        most = max(1, (RUN_BYTES if self.cfg.integrity != "none" else RUN_BYTES_UNHASHED) // self.C)
        rruns = _runs(r_from, r_chunk, K, most)
        rreq = []
        into = []  # each receive's buffer: its slot, or for this rank's own chunks coming back (hidden protocol),
        # which are only verified, scratch or the output row (restored from the payload after the round): a bad
        # copy must never touch the rank's own update
        for src, owner, first, count in rruns:
            a, b = self.chunk_range(owner, first, count)
            run = self.bufs[owner][a:b]
            if owner != eng.rank:
                into.append(run)
            else:
                self.own_written |= self.own_in is not None
                into.append(self.own_in[a:b] if self.own_in is not None else self.plane.scratch(run))
            rreq.append(self.data.post_recv(into[-1], src, tag))
        sreq: list = []
        posts = []
        sviews: list = []  # each send's buffer: kept with its request if the round ends before it completes
        for dst, owner, first, count in _runs(s_to, s_chunk, K, most):
            a, b = self.chunk_range(owner, first, count)
            view = self.bufs[owner][a:b]
            nb = self.plane.nbytes(view)
            posts.append((lambda d=dst, v=view: self.data.post_send(v, d, tag), nb))
            sviews.append((view, dst))
            self.sent_bytes += nb
        ok = np.zeros(nr, dtype=bool)
        t_done = np.full(nr, np.nan)
        starts = np.cumsum([0] + [run[3] for run in rruns])

        def arrived(idx) -> None:
            """Verify receive runs as they complete, so hashing overlaps the transfers still in flight."""
            for i in idx:
                if i >= len(rruns):
                    continue  # a send
                src, owner, first, count = rruns[i]
                a, b = self.chunk_range(owner, first, count)
                p0 = starts[i]
                t_done[p0 : p0 + count] = time.monotonic() - self.t0
                self.recv_bytes += b - a
                why = self.data.failed(rreq[i])
                if why:  # a message longer than the run it was granted for: refused whole, its sender banned
                    self.bad_senders.add(src)
                    self.protocol_errors.setdefault(src, f"stage {stage}: {why}")
                    self.refused_bytes += b - a
                    continue
                ok[p0 : p0 + count] = self.check(src, owner, first, count, into[i])

        early = np.zeros(len(rreq), dtype=bool)
        seen = np.zeros(len(rreq), dtype=bool)  # receives verified while this rank's sends waited for the link

        def early_arrived(idx: list[int]) -> None:
            seen[idx] = True
            arrived(idx)

        # a device transport starts nothing before `flush`: its receives are verified after it
        on_early = early_arrived if self.plane is HOST else None
        tb.post_paced(self.data, posts, tb.Pacer(self.cfg.uplink), sreq, rreq, early, on_early)
        self.data.flush()  # a device transport launches the stage's sends and receives together
        if self.own_due and not self.hidden:  # hidden: own chunks come back into own_in, restored after the round
            self._copy_own(rreq, early)
        if meanwhile is not None:
            meanwhile()
        arrived(np.flatnonzero(early & ~seen).tolist())
        deadline = time.monotonic() + self.cfg.stage_timeout_s
        done = tb.wait_until(
            self.data, rreq + sreq, deadline, np.concatenate([early, np.zeros(len(sreq), dtype=bool)]), on_done=arrived
        )
        rdone, sdone = done[: len(rreq)], done[len(rreq) :]
        if late is None:
            self.data.cancel([r for r, d in zip(rreq, rdone) if not d])
        else:
            for i, (r, d) in enumerate(zip(rreq, rdone)):
                if not d:  # kept posted with the buffer it writes (a slot, or scratch for own chunks coming back)
                    late.append(Late(rruns[i][0], r, rruns[i][3], into[i]))
        for r, v, d in zip(sreq, [v for v, _ in sviews], sdone):
            if not d:
                self.eng.orphan(self.data, [r], v)
        t_end = time.monotonic() - self.t0
        t_done[np.isnan(t_done)] = t_end
        # receive lists are sorted by (sender, chunk), the order runs were built in; a mixer's first hop of
        # the hidden protocol is forwarded from its slot but not held publicly
        public = ok & ~(self.hidden & (r_kind == SPRAY) & (r_from == r_chunk // K))
        self.have[r_chunk[public] // K, r_chunk[public] % K] = True
        counted = ok & (r_kind != SPRAY)
        np.add.at(self.got_from, r_from[counted], 1)
        lg = self.log
        lg["stage"].append(np.full(nr, stage))
        lg["t_start"].append(np.full(nr, now))
        lg["t"].append(t_done)
        lg["sender"].append(r_from)
        lg["chunk"].append(r_chunk)
        lg["phase"].append(r_kind)
        lg["bytes"].append(np.minimum((r_chunk % K + 1) * self.C, self.nbytes) - (r_chunk % K) * self.C)
        lg["ok"].append(ok)
        return ok

    def _copy_own(self, rreq: list, early: np.ndarray) -> None:
        """Copy the payload into the output's own row while this stage's transfers move, a piece at a time with
        a poll between pieces (MPI moves bytes only while some rank polls), marking receives that complete in
        `early`.  Why: a 64 MiB copy ahead of the round delayed its first message by as long as the copy."""
        pay, row = self.bufs[self.eng.rank], self.own_in
        step = RUN_BYTES
        for a in range(0, self.nbytes, step):
            row[a : a + step] = pay[a : a + step]
            live = np.flatnonzero(~early)
            if live.size:
                got = self.data.test([rreq[i] for i in live])
                early[live[got]] = True
        self.own_due = False

    def check(self, src: int, owner: int, first: int, count: int, buf: Any) -> np.ndarray:
        """Which of `count` chunks of `owner` from `first`, received from `src` into `buf`, match their owner's
        digests (all of them with integrity "none").  A chunk that fails is refused (fetched again from another
        holder) and its sender banned; the good ones go to the round's sink (the device FedAvg), if any."""
        if self.cfg.integrity == "none":
            good = np.ones(count, dtype=bool)
        else:
            got = self.plane.digests(buf, self.C, self.keys[owner])
            good = (got == self.hashes[owner, first : first + count]).all(axis=1)
        if self.sink is not None and owner != self.eng.rank:
            self.sink.add(owner, np.arange(first, first + count)[good])
        if not good.all():
            self.bad_senders.add(src)
            self.refetched += int((~good).sum())
            cb = (
                np.minimum((np.arange(first, first + count) + 1) * self.C, self.nbytes)
                - np.arange(first, first + count) * self.C
            )
            self.refused_bytes += int(cb[~good].sum())
        return good

    def finish(self, end: np.ndarray, weights: np.ndarray, consensus: bool, t0: float, trace_path: str) -> RoundResult:
        eng, n = self.eng, self.eng.size
        e = frames.parse_end(end, sender=eng.tracker, round_id=self.rid, n=n)
        stages, s_bt, warm_us, failed_open, agreed, left = e.stages, e.s_bt, e.warm_us, e.failed_open, e.agreed, e.left
        mine = self.have.all(axis=1)
        mine[eng.rank] = True  # its own update, whether or not it came back through the swarm
        self.silent = bool(left[eng.rank])
        part = agreed & mine if consensus else mine
        if consensus and self.silent and not np.array_equal(agreed & mine, agreed):
            part[:] = False  # left behind: it cannot rebuild the agreed set (its own update alone is no average)
        if consensus and not self.silent and not np.array_equal(agreed & mine, agreed):
            missing = np.flatnonzero(agreed & ~mine).tolist()
            raise ProtocolError(f"rank {eng.rank}: tracker agreed on updates {missing} this rank does not hold")
        round_s = time.monotonic() - t0
        stats = {
            "round_s": round_s,
            "stages": stages,
            "warmup_stages": s_bt,
            "warmup_s": warm_us / 1e6,
            "swarm_s": max(0.0, round_s - warm_us / 1e6),
            "bytes_sent": self.sent_bytes,
            "bytes_recv": self.recv_bytes,
            "refetched_chunks": self.refetched,
            "refused_bytes": self.refused_bytes,
            "bad_senders": sorted(self.bad_senders),
            "bad_descriptors": list(self.bad_desc),
            "protocol_errors": dict(self.protocol_errors),  # neighbour -> what its frame got wrong
            "unserved": dict(self.unserved),  # sender -> the grants (or directed sends) it did not serve
            "misbehaved": dict(self.misbehaved),  # tracker only: peer -> the report that got it excluded
            "excluded": np.flatnonzero(left).tolist(),
            "silent": self.silent,
            "exposed": self.exposed,
            "warmup_failed_open": bool(failed_open),
            "peer_decided_stages": self.runner.stages if self.runner is not None else 0,
            "pipelined": self.pipelined,
        }
        if trace_path:
            self._write_trace(trace_path)
            if eng.rank == eng.tracker and eng.last_trace is not None:
                from ..trace import write_trace

                write_trace(trace_path, eng.last_trace)
        return RoundResult(
            [self.bufs[u] if part[u] else None for u in range(n)], weights, np.flatnonzero(part).astype(np.int64), stats
        )

    def _write_trace(self, path: str) -> None:
        from ..trace import write_trace

        tr = Trace(
            attrs={
                "source": "mpi-rank",
                "rank": self.eng.rank,
                "n_peers": self.eng.size,
                "chunks_per_peer": self.K,
                "chunk_bytes": self.C,
                "banned": sorted(self.bad_senders),  # senders this rank refused chunks from (then banned)
                "refused_bytes": self.refused_bytes,
            }
        )
        cols = {k: (np.concatenate(v) if v else np.zeros(0)) for k, v in self.log.items()}
        if cols["chunk"].size:
            tr.add_transfers(
                stage=cols["stage"],
                t_start=cols["t_start"],
                t=cols["t"],
                sender=cols["sender"],
                receiver=np.full(cols["chunk"].size, self.eng.rank),
                owner=cols["chunk"] // self.K,
                chunk=cols["chunk"],
                phase=cols["phase"],
                bytes=cols["bytes"],
                ok=cols["ok"],
            )
        write_trace(f"{path}.rank{self.eng.rank}.h5", tr)


class _Tracker:
    """The tracker role: runs SwarmRound, sends each peer its directives, collects reports."""

    def __init__(
        self,
        eng: SwarmEngine,
        cfg: SwarmConfig,
        rid: int,
        K: int,
        all_info: np.ndarray,
        seed: int,
        deadline_s: float | None,
        peer: _PeerState,
        bad_desc: list[int],
        derived: bool = False,
        own_report: np.ndarray | None = None,
    ):
        """`derived`: every active rank already ran the direct stage it derived (`direct_lists`); `own_report`: this
        rank's report of it (None when this rank is not active)."""
        self.eng, self.cfg, self.rid, self.K, self.peer = eng, cfg, rid, K, peer
        self.derived, self.own_report = derived, own_report
        self.bad_desc = bad_desc
        self.bans: list[tuple[int, int, int]] = []  # (stage, sender, receiver): receiver refused sender's chunks
        self.misbehaved: dict[int, str] = peer.misbehaved  # peers excluded for a report that does not fit
        self.timed_out: set[int] = set()  # peers excluded for not answering in time
        self._banned: set[tuple[int, int]] = set()
        self._new_bans: list[tuple[int, int]] = []
        n, C = eng.size, cfg.chunk_bytes

        self.up = chunk_budgets(all_info[:, 1], C, cfg.slot_seconds)
        self.down = chunk_budgets(all_info[:, 2], C, cfg.slot_seconds)
        direct = direct_round(cfg, n, peer.nbytes, np.delete(all_info[:, 1], bad_desc))
        # a small round's BitTorrent stages are the tracker's (the same decisions: swarm/bt_peer.py): a directive,
        # the data and a report per stage instead of nine neighbour exchanges, which are all a small round costs
        # (a privacy-none round the rule sends to the swarm, small or not, runs the swarm's own phase: the relaying
        # that made the rule choose it is what the stages would slow down)
        small = small_round(cfg, peer.nbytes) and (direct or bool(cfg.privacy))
        # the pipelined phase moves host rows on its own context; a device plane's rounds keep the peers' stages
        self.pipelined = cfg.bt_decisions == "pipelined" and not small and peer.plane is HOST
        self.peer_decided = cfg.bt_decisions in ("peers", "pipelined") and not small and not self.pipelined
        self.rnd = SwarmRound(cfg.replace(seed=seed), n, K, self.up, self.down, seed=seed, direct=direct)
        self.deadline = (deadline_s if deadline_s is not None else cfg.deadline_s) or 0.0
        self.stages: list = []
        self.delivered: list[np.ndarray] = []
        self.times: list = []  # (t_start, t) arrays of a pipelined phase's stages, None for the others

    @staticmethod
    def _recv_index(st, p: int) -> np.ndarray:
        """The indices of `st`'s transfers to `p`, sorted by (sender, chunk): the order of p's receive list."""
        ri = np.flatnonzero(st.receiver == p)
        return ri[np.lexsort((st.chunk[ri], st.sender[ri]))]

    def _directive(self, st, p: int) -> tuple[np.ndarray, np.ndarray]:
        si = np.flatnonzero(st.sender == p)
        si = si[np.lexsort((st.chunk[si], st.receiver[si]))]
        ri = _Tracker._recv_index(st, p)
        msg = np.concatenate(
            [
                [self.eng.magic, self.rid, st.index, KIND_DIRECTIVE, si.size, ri.size],
                st.receiver[si],
                st.chunk[si],
                st.sender[ri],
                st.chunk[ri],
                st.kind[ri],
            ]
        ).astype(np.int64)
        return msg, ri

    def run(self) -> np.ndarray:
        rnd = self.rnd
        t0 = time.monotonic()
        s_max = rnd.deadline()
        warm_t = 0.0
        if self.bad_desc:  # owners whose descriptor is not of this round and owner take no part in it
            rnd.leave(self.bad_desc)
        if self.derived and not rnd.direct_due:
            raise ProtocolError(f"round {self.rid}: the peers derived a direct stage the tracker does not run")
        while not rnd.done and rnd.stage < s_max:
            if self.deadline and time.monotonic() - t0 > self.deadline:
                break
            if self.pipelined and rnd.begin_stage() == BT and not rnd.direct_due:
                from .bt_pipeline import run_pipelined

                warm_t = warm_t or time.monotonic() - t0
                left = self.deadline - (time.monotonic() - t0) if self.deadline else 0.0
                run_pipelined(self, left)  # the rest of the round: no stage clock (bt_pipeline.py)
                break
            if self.peer_decided and rnd.begin_stage() == BT and not rnd.direct_due:
                if rnd.s_bt == rnd.stage and warm_t == 0.0:
                    warm_t = time.monotonic() - t0
                st, delivered, silent = self._peer_stage()
            else:
                derived, self.derived = self.derived, False
                st = rnd.next_stage()
                if st.phase == BT and rnd.s_bt == st.index and warm_t == 0.0:
                    warm_t = time.monotonic() - t0
                delivered, silent = self._directed_stage(st, derived)
            rnd.complete(st, delivered)
            if silent:
                rnd.leave(silent)
                self.timed_out.update(p for p in silent if p not in self.misbehaved)
            self._apply_bans(st.index)
            self.stages.append(st)
            self.delivered.append(delivered)
            self.times.append(None)
        if warm_t == 0.0 and rnd.s_bt < 0:
            warm_t = time.monotonic() - t0
        return self._end(warm_t)

    def _directed_stage(self, st: Stage, derived: bool = False) -> tuple[np.ndarray, list[int]]:
        """A tracker-decided stage: one directive per peer, then every peer's delivered mask.  `derived`: the
        direct stage every active peer derived and ran itself (no directives; checked against `st`)."""
        eng, rnd = self.eng, self.rnd
        n, me = eng.size, eng.rank
        act = np.flatnonzero(rnd.active[:n])
        recv_idx: dict[int, np.ndarray] = {}
        sends = []
        for p in act:
            if derived:
                ri = self._recv_index(st, int(p))
                _, _, r_from, r_chunk = direct_lists(int(p), rnd.active[:n], self.K)
                if not (np.array_equal(st.sender[ri], r_from) and np.array_equal(st.chunk[ri], r_chunk)):
                    raise ProtocolError(f"round {self.rid}: rank {p}'s derived direct stage is not the tracker's")
                recv_idx[int(p)] = ri
                continue
            msg, ri = self._directive(st, int(p))
            recv_idx[int(p)] = ri
            if p != me:
                sends.append(eng.ctrl.post_send(msg, int(p), TAG_DIRECTIVE))
            else:
                own = msg
        delivered = np.zeros(st.size, dtype=bool)
        if rnd.active[me]:
            mine = self.own_report if derived else self.peer.execute(own_frame(own, eng.magic))
            rep = frames.parse_report(
                own_frame(mine, eng.magic),
                sender=me,
                round_id=self.rid,
                n=n,
                expected=recv_idx[me].size,
                stage=st.index,
            )
            delivered[recv_idx[me]] = rep.ok
            self._note_bans(me, rep)
        tb.wait_all(eng.ctrl, sends, self.cfg.timeout_s, lambda p, s=st.index: f"directive sends of stage {s}")
        reports, silent = self._collect_reports(act.tolist(), st.index, self.cfg.stage_timeout_s)
        for p, msg in reports.items():
            ri = recv_idx[p]
            try:
                rep = frames.parse_report(msg, sender=p, round_id=self.rid, n=n, expected=ri.size, stage=st.index)
                self._note_bans(p, rep)
            except ProtocolError as e:  # a report that does not fit: its sender is excluded, the round goes on
                self._misbehaved(p, st.index, e, silent)
                continue
            delivered[ri] = rep.ok
        # transfers to a silent peer did not happen; those from one did where its receiver verified the bytes
        # (the receiver holds them now: the tracker's state must say so, or it waits for them to the deadline)
        if silent:
            delivered &= ~np.isin(st.receiver, silent)
        return delivered, silent

    def _peer_stage(self) -> tuple[Stage, np.ndarray, list[int]]:
        """A decentralised BitTorrent stage: clock it, then rebuild it from what each peer received."""
        eng, rnd = self.eng, self.rnd
        n, me, K = eng.size, eng.rank, self.K
        act = rnd.active[:n]
        can = rnd.may_send()
        frame = np.concatenate(
            [
                [eng.magic, self.rid, rnd.stage, KIND_BT_STAGE, n],
                pack_bits(act).view(np.int64),
                pack_bits(can).view(np.int64),
                pack_bits(rnd.exposed[:n]).view(np.int64),
            ]
        ).astype(np.int64)
        peers = np.flatnonzero(act).tolist()
        sends = [eng.ctrl.post_send(frame, p, TAG_DIRECTIVE) for p in peers if p != me]
        reports: dict[int, np.ndarray] = {}
        if act[me]:
            reports[me] = own_frame(self.peer.bt_stage(own_frame(frame, eng.magic)), eng.magic)
        tb.wait_all(eng.ctrl, sends, self.cfg.timeout_s, lambda p, s=rnd.stage: f"stage frames of stage {s}")
        # a peer spends up to one stage timeout on its neighbour exchanges, one on the data and one on the
        # have-deltas (engine_bt.PeerStageRunner.stage)
        got, silent = self._collect_reports(peers, rnd.stage, 3 * self.cfg.stage_timeout_s)
        reports.update(got)
        parts = []
        for p in sorted(reports):
            try:
                rep = frames.parse_bt_report(
                    reports[p], sender=p, round_id=self.rid, n=n, K=K, stage=rnd.stage, own_ok=rnd.hidden
                )
                self._note_bans(p, rep)
            except ProtocolError as e:
                if p == me:
                    raise
                self._misbehaved(p, rnd.stage, e, silent)
                continue
            s, c, ok, nr = rep.senders, rep.chunks, rep.ok, rep.senders.size
            parts.append((s, np.full(nr, p, dtype=np.int64), c, ok))
        cat = lambda i: np.concatenate([x[i] for x in parts]) if parts else np.zeros(0, np.int64)  # noqa: E731
        s, r, c, ok = cat(0), cat(1), cat(2), cat(3).astype(bool)
        st = rnd.reported_bt_stage(s, r, c)
        # a silent sender's chunks that reached a reporting peer and passed its check were delivered
        return st, ok, silent

    def _misbehaved(self, p: int, stage: int, err: Exception, silent: list[int]) -> None:
        """A peer whose frame does not fit the protocol is excluded like a silent one, never a reason for the
        honest ranks to abort; the round's stats name it."""
        self.misbehaved.setdefault(p, f"stage {stage}: {err}")
        if p not in silent:
            silent.append(p)

    def _note_bans(self, receiver: int, rep) -> None:
        """The senders `receiver` reports it banned, and those whose directed data never reached it (the tail of its
        report: all of the round so far; in range, distinct and not the reporter, as frames.parse_report /
        parse_bt_report checked).  An unserved sender still in the round had reported in time when it should
        have sent (a peer posts its sends before it reports): it is named, and the pair banned; one that had gone
        silent was excluded for that already."""
        for s in rep.unserved.tolist():
            if (s, receiver) in self._banned or not self.rnd.active[s]:
                continue
            why = f"stage {self.rnd.stage}: rank {receiver} reports directed chunks it never sent"
            self.peer.unserved.setdefault(s, why)
            self._banned.add((s, receiver))
            self._new_bans.append((s, receiver))
        for s in rep.banned.tolist():
            if (s, receiver) not in self._banned:
                self._banned.add((s, receiver))
                self._new_bans.append((s, receiver))

    def _apply_bans(self, stage: int) -> None:
        """New bans take their overlay edge out of the round; a peer banned by all its neighbours leaves."""
        for s, r in self._new_bans:
            self.bans.append((stage, s, r))
            self.rnd.ban(s, r)
        self._new_bans = []

    def _collect_reports(self, peers: list[int], stage: int, busy_s: float) -> tuple[dict[int, np.ndarray], list[int]]:
        """Every other peer's report for `stage`, waiting up to `busy_s` (what a peer may spend on the stage)
        plus a margin; the peers that stay silent are returned for exclusion."""
        eng = self.eng
        deadline = time.monotonic() + busy_s + max(2.0, 0.5 * self.cfg.stage_timeout_s)
        reports: dict[int, np.ndarray] = {}
        silent: list[int] = []
        for p in peers:
            if p == eng.rank:
                continue
            while True:
                try:
                    wait_s = max(0.05, deadline - time.monotonic())
                    rep = tb.recv_frame(eng.ctrl, p, TAG_REPORT, wait_s, f"round {self.rid} stage {stage} report")
                except PeerTimeoutError:
                    silent.append(p)
                    break
                except ProtocolError as e:  # not whole int64 words
                    self._misbehaved(p, stage, e, silent)
                    break
                rep = own_frame(rep, eng.magic)
                if rep is None:
                    continue  # a frame of an earlier engine on a communicator MPI recycled
                try:
                    frames.parse_header(rep, sender=p, round_id=self.rid, kinds=KIND_REPORT, stage=stage, what="report")
                except frames.StaleFrame:
                    continue  # a late report of an earlier stage or round (a peer that slept): not this one
                except ProtocolError as e:
                    self._misbehaved(p, stage, e, silent)
                    break
                reports[p] = rep
                break
        return reports, silent

    def _end(self, warm_t: float) -> np.ndarray:
        eng, rnd = self.eng, self.rnd
        n, me = eng.size, eng.rank
        A = rnd.reconstructable()
        act = rnd.active[:n]
        agreed = A[act].all(axis=0) if act.any() else np.zeros(n, bool)
        left = ~act
        end = np.concatenate(
            [
                [
                    eng.magic,
                    self.rid,
                    rnd.stage,
                    KIND_END,
                    rnd.stage,
                    max(rnd.s_bt, 0),
                    int(warm_t * 1e6),
                    int(rnd.warmup_failed_open),
                ],
                agreed.astype(np.int64),
                left.astype(np.int64),
            ]
        ).astype(np.int64)
        dests = [p for p in range(n) if p != me]
        reqs = [eng.ctrl.post_send(end, p, TAG_DIRECTIVE) for p in dests]
        self.eng.last_trace = self._trace(A, agreed)
        live = [p for p in dests if act[p]]
        if n > 1 and not live and set(dests) <= self.timed_out:
            # every other peer fell silent: far likelier the tracker stalled than all of them; it never
            # reports success alone
            eng.orphan(eng.ctrl, reqs, end)
            raise PeerTimeoutError(
                f"round {self.rid}: every other rank went silent on the tracker (rank {me}): the round failed"
            )
        # the live peers confirm the end; none confirming means they gave up on a stalled tracker, and the
        # round fails here as it failed there (a peer that died after the end frame costs only itself)
        wait = min(self.cfg.timeout_s, max(2.0, 2 * self.cfg.stage_timeout_s))  # live peers answer at once
        acked = self._collect_acks(live, time.monotonic() + wait)
        done = tb.wait_until(eng.ctrl, reqs, time.monotonic() + 1.0)
        eng.orphan(eng.ctrl, [r for r, d in zip(reqs, done) if not d], end)
        if live and not acked:
            raise PeerTimeoutError(
                f"round {self.rid}: no rank confirmed the end of the round within {wait:.1f}s "
                "(they gave up waiting for the tracker): the round failed on every rank"
            )
        return own_frame(end, eng.magic)  # as a follower reads it (MAGIC, not the session word)

    def _collect_acks(self, peers: list[int], deadline: float) -> list[int]:
        """The first of `peers` to confirm this round's end frame by `deadline` ([] if none did).

        One confirmation is all the tracker's verdict needs (a live follower did not give up on it), so it does
        not wait for the slowest; the other confirmations stay queued and are skipped as stale frames of an
        earlier round by the next reads on the control context (`_collect_reports`, frames.parse_header)."""
        ctrl, live, idle = self.eng.ctrl, list(peers), 0
        while live:
            got = False
            for p in list(live):
                try:
                    msg = ctrl.poll_frame(p, TAG_REPORT)
                except ProtocolError:  # not whole int64 words: no confirmation from it
                    live.remove(p)
                    continue
                if msg is None:
                    continue
                got = True
                if msg.size == 4 and msg[0] == self.eng.magic and msg[1] == self.rid and msg[3] == KIND_ACK:
                    return [p]  # anything else is a late report of this round: skip it
            if time.monotonic() > deadline:
                break
            idle = 0 if got else idle + 1
            if idle:
                tb.pause(idle)
        return []

    def _trace(self, A: np.ndarray, agreed: np.ndarray) -> Trace:
        rnd, cfg = self.rnd, self.cfg
        attrs = {
            "config": cfg.to_dict(),
            "bans": [list(b) for b in self.bans],  # (stage, sender, receiver)
            "bad_descriptors": list(self.bad_desc),
            "misbehaved": {str(k): v for k, v in self.misbehaved.items()},  # peer -> why it was excluded
        }
        rec = RoundRecorder(rnd, cfg, "mpi", self.peer.nbytes, seed=rnd.seed, attrs=attrs)
        for st, d, tt in zip(self.stages, self.delivered, self.times):
            rec.stage(st, d, *(tt or ()))
        return rec.finish(A, agreed, max(rnd.s_bt, 0), rnd.stage)
