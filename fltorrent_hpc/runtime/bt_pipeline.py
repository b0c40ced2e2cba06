"""Pipelined BitTorrent phase of a real round (`SwarmConfig.bt_decisions = "pipelined"`): no stage clock.

The warm-up (or the hidden protocol's seed stages) stays tracker-scheduled.  When the round reaches its BitTorrent
phase the tracker sends each active peer one open frame (frames.parse_pipe_open: active, may-send and exposed
masks, the request window, the phase's time budget) and from then on only listens: each peer runs the event loop
below until the tracker's end frame, and the tracker rebuilds what the peers report into its mirror `SwarmRound`.

A peer's loop, per iteration (one neighbour tag, TAG_PIPE, for every frame; payload on the engine's `pipe` context):

    read frames     bitfield (once), have and full frames set the neighbour's have bits; requests are queued, or refused
                    (NOPE) for chunks I do not hold; cancels drop queued requests (answered NOPE); NOPEs free my
                    requests.  A frame that does not fit (out of range, a chunk the asker already announced, its
                    own chunk, a request number reused, more than the window outstanding: a flood) bans its sender.
                    A want frame is answered with a full frame (my whole have set) in this iteration's flush.
    receives        posted straight into the destination row before the request goes out (zero copy; an endgame
                    duplicate and an owner's own chunks coming back go to scratch); each completion is checked
                    against its owner's digest (`_PeerState.check`), a failure bans the sender and the chunk is
                    asked again elsewhere.
    timeouts        a request outstanding past (window x the server's degree + 1) chunks at its uplink plus
                    stage_timeout_s stalls the server (nothing new asked of it, the chunk asked elsewhere, the
                    receive kept posted); still unanswered stage_timeout_s later, a server that kept sending frames
                    took it and did not serve it (banned, named `unserved`), a quiet one is dropped until it talks.
    resync          bitfield, have and full frames to a neighbour are numbered 0, 1, 2, ...; a neighbour whose bitfield
                    has not come 2 heartbeats into the phase, or whose numbers skip (a frame was lost), is asked for
                    its whole have set (a want frame; again every 2 heartbeats until a full frame comes, at most
                    MAX_WANTS times a phase: more wants than that from one neighbour is a flood, and bans it).
                    While one is pending the peer reports RUNNING, not STUCK.
    requests        up to `window` outstanding per neighbour; rarest first among the chunks I lack and have not
                    asked for (a seeded random tie-break, swarm/rng.py), each from the holder with the least
                    expected wait (my outstanding requests there over its uplink, from the descriptors), so fast
                    uplinks carry the relay load.  Endgame (at most `endgame_chunks` missing, all requested): each
                    is asked of a second holder too, into scratch; the first good copy wins, the other is cancelled.
    serve           queued requests in arrival order as the paced uplink frees (transport.base.Pacer, store and
                    forward, at most 2 x window sends in flight); a peer whose uplink is below its neighbours'
                    median serves the chunk with the fewest known copies first (super-seeding), unless a request
                    has waited half its requester's timeout.
    announce        the chunks verified this iteration, in one have frame to every neighbour (an empty one as a
                    keep-alive when nothing else went to it for a while).
    report          to the tracker: the receive log since the last report (sender, chunk, ok, microseconds since the
                    round started) and a status, RUNNING, DONE (every chunk of the active owners) or STUCK (nothing
                    outstanding, nothing any live neighbour holds, for a while): on every status change and at least
                    every `heartbeat` seconds.  A DONE peer keeps serving until the end frame.

Every request is answered by exactly one message, its data or a NOPE frame (a cancelled request that was already
on the wire arrives and is drained), so a tag never leaves a stray message behind; a server that goes quiet is the
one exception (its receives are cancelled when it is dropped; tags are numbered per server across rounds, 32000
requests apart).

The tracker (`run_pipelined`) reads the reports as they come, with the same checks as every report (frames.py: the
numbers, the order; across reports: no chunk delivered twice), and applies the transfers to its mirror in buckets of
one heartbeat: a bucket holds the transfers whose sender held the chunk when the bucket began, so every stage of
the trace has its sender holding what it sends (what the attacks read).  A peer that sends nothing for
stage_timeout_s plus a margin is excluded (`SwarmRound.leave`), bans take their edge out of the round as before, and
an update frame tells the peers whenever the active, may-send or exposed masks change (a peer left; a hidden owner
whose public copies left publishes its own update).  The phase ends when every active peer is DONE, when every one
is DONE or STUCK for a settle time, or at the budget (stage_timeout_s x 4 x the phase's uplink-bound stages, at
least 8, within the round's deadline); then the end frame goes out as after a slotted round.
"""

from __future__ import annotations

import math
import time
from collections import deque
from typing import Any

import numpy as np

from ..errors import PeerTimeoutError, ProtocolError
from ..swarm import rng
from ..swarm.bt_peer import pack_bits
from ..swarm.overlay import build_overlay
from ..swarm.round import BT
from ..transport import base as tb
from . import frames
from .frames import (
    DONE,
    KIND_END,
    KIND_PIPE_OPEN,
    KIND_PIPE_REPORT,
    PIPE_BITFIELD,
    PIPE_CANCEL,
    PIPE_FULL,
    PIPE_HAVE,
    PIPE_NOPE,
    PIPE_REQUEST,
    PIPE_WANT,
    RUNNING,
    STUCK,
    own_frame,
)

TAG_PIPE = 32200  # every pipelined neighbour frame (nbr context): above every stage-based neighbour tag
TAG_SPAN = 32000  # data tags on the engine's pipe context: 1 + request number % TAG_SPAN
TAG_DIRECTIVE, TAG_REPORT = 11, 12  # the engine's control tags (engine.py)
BOOK_AHEAD = 2  # paced sends booked for the link ahead of time (a cancel no longer stops them)
FRAMES_PER_POLL = 64  # frames read from one neighbour per iteration, so one chatty neighbour cannot starve the rest
MAX_WANTS = 8  # want frames a peer sends one neighbour in a phase (resync); more received from one is a flood


def data_tag(q: int) -> int:
    return 1 + int(q) % TAG_SPAN


def heartbeat(cfg) -> float:
    """Seconds between a peer's progress reports (and keep-alives), and between the tracker's buckets."""
    return min(0.25, max(0.02, cfg.stage_timeout_s / 8))


def tracker_quiet(cfg) -> float:
    """Seconds a follower waits in the phase with nothing from the tracker before it gives up on it: the stage
    mode's wait for the next directive (engine `_PeerState.follow`), so a stalled tracker fails the round on the
    same bound in both modes (the tracker's own wait for end confirmations is shorter, so it fails too)."""
    return cfg.timeout_s + 3 * cfg.stage_timeout_s


class _Req:
    """One of my outstanding requests."""

    __slots__ = ("w", "q", "chunk", "req", "buf", "row", "t0", "deadline", "cancelled", "overdue")

    def __init__(self, w, q, chunk, req, buf, row, t0, deadline):
        self.w, self.q, self.chunk, self.req, self.buf, self.row = w, q, chunk, req, buf, row
        self.t0, self.deadline, self.cancelled, self.overdue = t0, deadline, False, False

    @property
    def live(self) -> bool:
        """Still counted on: neither cancelled nor past its deadline."""
        return not (self.cancelled or self.overdue)


class PipePeer:
    """One rank's side of a pipelined phase.  `sink(frame)` takes its progress reports (to the tracker)."""

    def __init__(self, peer, op: frames.PipeOpen, sink):
        eng, cfg = peer.eng, peer.cfg
        self.peer, self.eng, self.cfg, self.sink = peer, eng, cfg, sink
        peer.pipelined = True  # the round's stats say which BitTorrent phase ran
        self.n, self.K, self.me, self.rid, self.stage = eng.size, peer.K, eng.rank, peer.rid, op.stage
        n, K = self.n, self.K
        self.N = N = n * K
        self.C, self.W = cfg.chunk_bytes, op.window
        self.hb = heartbeat(cfg)
        self.hidden = peer.hidden
        ov = build_overlay(n, cfg.replace(seed=peer.seed), peer.seed)
        row = ov.nbr[self.me]
        self.nbrs = [int(w) for w in row[row < n]]
        self.slot = {w: j for j, w in enumerate(self.nbrs)}
        self.deg = (ov.nbr < n).sum(axis=1)
        self.nh = np.zeros((len(self.nbrs), N), dtype=bool)  # what each neighbour holds (its bitfield and haves)
        self.have = peer.have.reshape(-1)  # a view: what this rank holds publicly
        self.rate = np.asarray(peer.all_info[:, 1], dtype=np.float64)  # uplinks (bytes/s, 0 = unpaced)
        self.tie = rng.uniform(peer.seed, rng.PIPE, self.me, np.arange(N))  # rarest-first tie-break
        self.t_open = time.monotonic()
        self.budget = op.budget_s
        # my requests
        self.out: dict[tuple[int, int], _Req] = {}
        self.of: dict[int, list[_Req]] = {}  # chunk -> its outstanding requests
        self.n_out = dict.fromkeys(self.nbrs, 0)
        self.won: dict[int, tuple[np.ndarray, int]] = {}  # chunk -> (verified scratch copy, sender): row pending
        self.dropped: set[int] = set()  # neighbours that left or went quiet (no more requests until they talk)
        self.stalled: set[int] = set()  # neighbours with a request past its deadline (none new until it resolves)
        self.refusing: set[int] = set()  # neighbours that refused a request of mine (NOPE I did not ask for)
        self.heard = dict.fromkeys(self.nbrs, self.t_open)  # last frame from each neighbour
        # bitfield resync: have-set frames are numbered per (sender, receiver); a gap or no bitfield asks for a full
        self.seq_out = dict.fromkeys(self.nbrs, 0)  # my next have-set frame number to each neighbour
        self.seq_in = dict.fromkeys(self.nbrs, 0)  # the next number I expect from each neighbour
        self.whole: set[int] = set()  # neighbours whose whole have set I hold (bitfield or full, no gap since)
        self.want_at = dict.fromkeys(self.nbrs, -math.inf)  # when I last asked each for a full frame
        self.wants_out = dict.fromkeys(self.nbrs, 0)
        self.wants_in = dict.fromkeys(self.nbrs, 0)
        self.full_out: set[int] = set()  # neighbours that asked me for a full frame (answered in the next flush)
        # their requests
        self.jobs: deque = deque()  # (w, q, chunk, t) in arrival order
        self.queued = dict.fromkeys(self.nbrs, 0)  # per requester: queued or booked, not yet on the wire
        self.last_q = dict.fromkeys(self.nbrs, -1)
        self.asked: set[tuple[int, int]] = set()  # (requester, chunk) queued (not yet booked for the link)
        self.booked: deque = deque()  # (post_at, w, q, chunk): paced sends waiting for the link
        self.pacer = tb.Pacer(cfg.uplink)
        self.sends: list = []  # (request, view) on the wire
        self.fsends: list = []  # (request, frame) neighbour frames on the wire
        self.max_sends = 2 * self.W
        # outgoing frames of this iteration
        self.fresh: list[int] = []
        self.req_out: dict[int, list[int]] = {}
        self.cancel_out: dict[int, list[int]] = {}
        self.nope_out: dict[int, list[int]] = {}
        self.sent_at = dict.fromkeys(self.nbrs, 0.0)
        # the receive log and the reports
        self.entries: list[tuple[int, int, int, int]] = []  # (sender, chunk, ok, t_us)
        self.reported = 0
        self.report_seq = 0
        self.status = RUNNING
        self.last_report = 0.0
        self.stuck_since: float | None = None
        self.log_t0: list[float] = []
        self.apply(op)
        self._copies_dirty = True

    # ------------------------------------------------------------------ state
    def apply(self, op: frames.PipeOpen) -> None:
        """The open frame, or an update: who is active, who may send, who exposed its own update."""
        me, K = self.me, self.K
        self.active, self.can_send = op.active.copy(), op.can_send.copy()
        if self.hidden and op.exposed[me] and not self.have[me * K : (me + 1) * K].all():
            # its update's public copies left: it holds it publicly from now on (announced with this iteration's haves)
            own = me * K + np.flatnonzero(~self.have[me * K : (me + 1) * K])
            self.have[own] = True
            self.peer.exposed = True
            self.fresh.extend(own.tolist())
            for c in own.tolist():  # chunks of its own on their way back: no longer needed
                self._cancel_all(int(c))
        owners = self.active.copy()
        owners[list(self.peer.bad_desc)] = False
        if not self.hidden:
            owners[me] = False
        self.target = np.repeat(owners, K)
        for w in self.nbrs:
            if not self.active[w] and w not in self.dropped:
                self._drop(w)
        gone = [job for job in self.jobs if not self.active[job[0]]]  # requests of peers that left: not served
        for w, _q, c, _t in gone:
            self._unqueue(w, c)
        if gone:
            self.jobs = deque(job for job in self.jobs if self.active[job[0]])
        self._copies_dirty = True

    @property
    def missing(self) -> np.ndarray:
        return self.target & ~self.have

    def _servers(self) -> list[int]:
        """Neighbours I may ask: active, allowed to send, answering, not banned, not refusing me."""
        bad = self.peer.bad_senders
        return [
            w
            for w in self.nbrs
            if self.active[w]
            and self.can_send[w]
            and w not in self.dropped
            and w not in self.stalled
            and w not in bad
            and w not in self.refusing
        ]

    def _copies(self) -> np.ndarray:
        if self._copies_dirty:
            rows = [self.slot[w] for w in self._servers()]
            self.copies = self.nh[rows].sum(axis=0) if rows else np.zeros(self.N, dtype=np.int64)
            self._copies_dirty = False
        return self.copies

    def _ban(self, w: int, why: str) -> None:
        self.peer.bad_senders.add(w)
        self.peer.protocol_errors.setdefault(w, f"pipelined phase (stage {self.stage}): {why}")
        self._copies_dirty = True

    # ------------------------------------------------------------------ the loop
    def run(self, poll) -> None:
        """Iterate until `poll()` (the tracker's end frame, or the tracker side finishing) says stop."""
        bits = pack_bits(self.have).view(np.int64)
        for w in self.nbrs:
            if self.active[w]:
                self._have_frame(w, PIPE_BITFIELD, bits)
        self._report(time.monotonic(), force=True)
        idle = 0
        while not poll():
            now = time.monotonic()
            busy = self._read_frames(now)
            busy |= self._test_receives()
            busy |= self._test_sends()
            self._timeouts(now)
            self._resync(now)
            busy |= self._request(now)
            busy |= self._serve(time.monotonic())
            busy |= self._flush(time.monotonic())
            self._report(time.monotonic())
            if busy:
                idle = 0
            else:
                idle += 1
                tb.pause(idle)

    def drain(self, grace: float) -> None:
        """After the end: refuse what is queued, give my requests and sends `grace` seconds to resolve, then
        cancel the receives left (their servers went quiet) and park the sends left with the engine."""
        for _, w, q, _c in self.booked:
            self.nope_out.setdefault(w, []).append(q)
        self.booked.clear()
        for w, q, _c, _t in self.jobs:
            self.nope_out.setdefault(w, []).append(q)
        self.jobs.clear()
        for r in list(self.out.values()):
            if not r.cancelled:
                self._cancel(r)
        self._flush(time.monotonic(), keepalive=False)
        deadline = time.monotonic() + grace
        idle = 0
        while (self.out or self.sends) and time.monotonic() < deadline:
            busy = self._read_frames(time.monotonic(), serve=False)
            busy |= self._test_receives()
            busy |= self._test_sends()
            self._flush(time.monotonic(), keepalive=False)
            idle = 0 if busy else idle + 1
            if idle:
                tb.pause(idle)
        pipe = self.eng.pipe
        pipe.cancel([r.req for r in self.out.values()])
        self.out.clear()
        self.of.clear()
        for req, view in self.sends:
            self.eng.orphan(pipe, [req], view)
        self.sends = []
        done = tb.wait_until(self.eng.nbrc, [r for r, _ in self.fsends], time.monotonic() + min(0.2, grace))
        for (req, buf), d in zip(self.fsends, done):
            if not d:
                self.eng.orphan(self.eng.nbrc, [req], buf)
        self.fsends = []
        self._write_log()

    # ------------------------------------------------------------------ frames in
    def _read_frames(self, now: float, serve: bool = True) -> bool:
        nbrc, busy = self.eng.nbrc, False
        for w in self.nbrs:
            for _ in range(FRAMES_PER_POLL):
                try:
                    buf = nbrc.poll_frame(w, TAG_PIPE)
                except ProtocolError as e:  # not whole int64 words
                    self._ban(w, str(e))
                    busy = True
                    continue
                if buf is None:
                    break
                busy = True
                buf = own_frame(buf, self.eng.magic)
                if buf is None:
                    continue  # a frame of an earlier engine on a communicator MPI recycled
                try:
                    code, body = frames.parse_pipe_header(buf, sender=w, round_id=self.rid, stage=self.stage)
                except frames.StaleFrame:
                    continue  # a late frame of an earlier round
                except ProtocolError as e:
                    self._ban(w, str(e))
                    continue
                self.heard[w] = now
                if w in self.dropped and self.active[w]:  # it went quiet, and talks again: ask it again
                    self.dropped.discard(w)
                    self._copies_dirty = True
                try:
                    self._on_frame(w, code, body, serve)
                except ProtocolError as e:
                    self._ban(w, str(e))
        return busy

    def _on_frame(self, w: int, code: int, body: np.ndarray, serve: bool) -> None:
        kw = dict(sender=w, round_id=self.rid, stage=self.stage)
        j = self.slot[w]
        if code in (PIPE_BITFIELD, PIPE_FULL):
            h = frames.parse_pipe_full(body, **kw, N=self.N)
            self.nh[j, h.chunks] = True
            self._copies_dirty = True
            if h.seq >= self.seq_in[w]:  # (an older one, duplicated, adds its bits and no more)
                self.seq_in[w] = h.seq + 1
                self.whole.add(w)
        elif code == PIPE_HAVE:
            h = frames.parse_pipe_have(body, **kw, N=self.N)
            self.nh[j, h.chunks] = True
            self._copies_dirty = True
            if h.seq > self.seq_in[w]:  # a have-set frame of its never came: its row here is incomplete
                self.whole.discard(w)
            self.seq_in[w] = max(self.seq_in[w], h.seq + 1)
        elif code == PIPE_WANT:
            frames.parse_pipe_want(body, **kw)
            self.wants_in[w] += 1
            if self.wants_in[w] > MAX_WANTS:
                raise ProtocolError(f"rank {w} asked for my whole have set more than {MAX_WANTS} times (a flood)")
            self.full_out.add(w)
        elif code == PIPE_REQUEST:
            rq = frames.parse_pipe_request(body, **kw, N=self.N, window=self.W)
            self._on_requests(w, rq.seqs, rq.chunks, serve)
        elif code == PIPE_CANCEL:
            qs = set(frames.parse_pipe_seqs(body, **kw, what="cancel", max_count=self.W).tolist())
            keep = deque()
            for job in self.jobs:
                if job[0] == w and job[1] in qs:
                    self._unqueue(w, job[2])
                    self.nope_out.setdefault(w, []).append(job[1])
                else:
                    keep.append(job)
            self.jobs = keep  # a cancel of a request already booked or sent is ignored: its data comes
        elif code == PIPE_NOPE:
            for q in frames.parse_pipe_seqs(body, **kw, what="refusal", max_count=self.W).tolist():
                r = self.out.get((w, q))
                if r is None:
                    continue
                self.eng.pipe.cancel([r.req])  # no data comes for it
                if not r.cancelled:
                    self.refusing.add(w)  # it refused a chunk it announced: ask it for nothing more
                    self._copies_dirty = True
                self._resolve(r)
                self._settle(r.chunk)

    def _on_requests(self, w: int, qs: np.ndarray, cs: np.ndarray, serve: bool) -> None:
        K, refuse = self.K, w in self.peer.bad_senders or not serve
        for q, c in zip(qs.tolist(), cs.tolist()):
            if q <= self.last_q[w]:
                raise ProtocolError(f"rank {w} reused request number {q} (last {self.last_q[w]})")
            self.last_q[w] = q
            if self.nh[self.slot[w], c] or (c // K == w and not self.hidden):
                raise ProtocolError(f"rank {w} asked for chunk {c}, which it holds")
            if (w, c) in self.asked:  # (an honest asker cancels first, and its cancel comes first)
                raise ProtocolError(f"rank {w} asked for chunk {c} twice")
            # an asker that gave up on requests of mine already booked for the link may have asked anew meanwhile
            if self.queued[w] >= self.W + BOOK_AHEAD:
                raise ProtocolError(f"rank {w} has more than its window of {self.W} requests outstanding (a flood)")
            if refuse or not self.have[c]:
                self.nope_out.setdefault(w, []).append(q)  # a chunk I do not hold (or a sender I banned): refused
                continue
            self.jobs.append((w, q, c, time.monotonic()))
            self.queued[w] += 1
            self.asked.add((w, c))

    def _unqueue(self, w: int, c: int) -> None:
        self.queued[w] -= 1
        self.asked.discard((w, c))

    # ------------------------------------------------------------------ bitfield resync
    def _resyncing(self) -> list[int]:
        """Neighbours I may ask whose whole have set I lack and may still ask for."""
        return [w for w in self._servers() if w not in self.whole and self.wants_out[w] < MAX_WANTS]

    def _resync(self, now: float) -> None:
        """Ask a neighbour for its full have set when its bitfield has not come 2 heartbeats into the phase, or
        a have-set frame of its went missing (a gap in its numbers); again every 2 heartbeats until a full frame
        comes, at most MAX_WANTS times in the phase."""
        for w in self._resyncing():
            if self.seq_in[w] == 0 and now - self.t_open < 2 * self.hb:
                continue  # its bitfield may still be on the way
            if now - self.want_at[w] >= 2 * self.hb:
                self.want_at[w] = now
                self.wants_out[w] += 1
                self._frame(w, PIPE_WANT, ())

    def _have_frame(self, w: int, code: int, body) -> None:
        """A have-set frame (bitfield, have or full) to `w`, numbered."""
        q = self.seq_out[w]
        self.seq_out[w] += 1
        self._frame(w, code, np.concatenate([[q], np.asarray(body, dtype=np.int64)]))

    # ------------------------------------------------------------------ my requests
    def _timeout(self, w: int) -> float:
        extra = (self.W * int(self.deg[w]) + 1) * self.C / self.rate[w] if self.rate[w] > 0 else 0.0
        return extra + self.cfg.stage_timeout_s

    def _post(self, w: int, c: int, now: float, scratch: bool) -> None:
        K, peer = self.K, self.peer
        owner, i = divmod(c, K)
        a, b = peer.chunk_range(owner, i, 1)
        # one receive at a time writes a chunk's row; a second one (endgame, or past an overdue one) goes to scratch,
        # and an owner's own chunks coming back are only verified
        row = not scratch and owner != self.me and not any(x.row for x in self.of.get(c, []))
        buf = peer.bufs[owner][a:b] if row else np.empty(b - a, dtype=np.uint8)
        q = int(self.eng.pipe_seq[w])
        self.eng.pipe_seq[w] += 1
        req = self.eng.pipe.post_recv(buf, w, data_tag(q))  # before the request goes out
        r = _Req(w, q, c, req, buf, row, now, now + self._timeout(w))
        self.out[(w, q)] = r
        self.of.setdefault(c, []).append(r)
        self.n_out[w] += 1
        self.req_out.setdefault(w, []).extend((q, c))

    def _pick(self, c: int, free: dict[int, int], skip: int = -1) -> int:
        best, score = -1, math.inf
        for w, f in free.items():
            if f <= 0 or w == skip or not self.nh[self.slot[w], c]:
                continue
            s = (self.n_out[w] + 1) / (self.rate[w] if self.rate[w] > 0 else 1e30)
            s *= 1.0 + 1e-6 * ((c * 7919 + w * 104729 + self.me) % 997)  # seeded by ids: ties broken the same way
            if s < score:
                best, score = w, s
        return best

    def _request(self, now: float) -> bool:
        free = {w: self.W - self.n_out[w] for w in self._servers() if self.n_out[w] < self.W}
        if not free:
            return False
        miss = self.missing
        asked = np.zeros(self.N, dtype=bool)
        live = [c for c, rs in self.of.items() if any(x.live for x in rs)]
        if live:
            asked[live] = True
        if self.won:  # verified in scratch, waiting for its row receive to resolve
            asked[list(self.won)] = True
        cand = miss & ~asked & (self._copies() > 0)
        posted = 0
        if cand.any():
            rows = [self.slot[w] for w in free]
            cand &= self.nh[rows].any(axis=0)
            idx = np.flatnonzero(cand)
            for c in idx[np.lexsort((self.tie[idx], self.copies[idx]))].tolist():
                w = self._pick(c, free)
                if w < 0:
                    continue
                self._post(w, c, now, scratch=False)
                free[w] -= 1
                posted += 1
                if not any(f > 0 for f in free.values()):
                    break
        elif 0 < int(miss.sum()) <= self.cfg.endgame_chunks:
            for c in np.flatnonzero(miss).tolist():  # endgame: a second holder for each, first good copy wins
                rs = [x for x in self.of.get(c, []) if x.live]
                if len(rs) != 1 or len(self.of.get(c, [])) != 1:
                    continue
                w = self._pick(c, free, skip=rs[0].w)
                if w >= 0:
                    self._post(w, c, now, scratch=True)
                    free[w] -= 1
                    posted += 1
        return posted > 0

    def _resolve(self, r: _Req) -> None:
        """Forget a request that completed, was refused, or was cancelled for good."""
        self.out.pop((r.w, r.q), None)
        rs = self.of.get(r.chunk)
        if rs is not None:
            rs[:] = [x for x in rs if x is not r]
            if not rs:
                del self.of[r.chunk]
        self.n_out[r.w] -= 1
        if r.w in self.stalled and not any(x.overdue for x in self.out.values() if x.w == r.w):
            self.stalled.discard(r.w)  # it answered after all
            self._copies_dirty = True

    def _cancel(self, r: _Req) -> None:
        """No longer needed: tell its server (a queued request is answered NOPE, one on the wire arrives)."""
        if not r.cancelled:
            r.cancelled = True
            self.cancel_out.setdefault(r.w, []).append(r.q)

    def _cancel_all(self, c: int) -> None:
        for r in self.of.get(c, []):
            self._cancel(r)

    def _settle(self, c: int) -> None:
        """A verified scratch copy waits for the chunk's row receive to resolve; once none is pending, it goes in."""
        if c not in self.won or any(x.row for x in self.of.get(c, [])):
            return
        buf, src = self.won.pop(c)
        if not self.have[c]:
            owner, i = divmod(c, self.K)
            a, b = self.peer.chunk_range(owner, i, 1)
            self.peer.bufs[owner][a:b] = buf
            self._got(c)

    def _got(self, c: int) -> None:
        self.have[c] = True
        self.fresh.append(c)
        self._cancel_all(c)

    def _test_receives(self) -> bool:
        if not self.out:
            return False
        live = list(self.out.values())
        got = self.eng.pipe.test([r.req for r in live])
        for i in got:
            self._arrived(live[i])
        return bool(got)

    def _arrived(self, r: _Req) -> None:
        peer, c = self.peer, r.chunk
        self._resolve(r)
        owner, i = divmod(c, self.K)
        a, b = peer.chunk_range(owner, i, 1)
        peer.recv_bytes += b - a
        t_us = int((time.monotonic() - peer.t0) * 1e6)
        why = self.eng.pipe.failed(r.req)
        if why:  # a message longer than the chunk: refused whole, its sender banned
            self._ban(r.w, why)
            peer.refused_bytes += b - a
            good = False
        else:
            good = bool(peer.check(r.w, owner, i, 1, r.buf)[0])
            if not good:
                self._copies_dirty = True
        fresh = good and not self.have[c] and c not in self.won
        if not (r.cancelled and not fresh):  # a drained duplicate of a chunk already in is not logged
            self.entries.append((r.w, c, int(fresh), t_us))
            self.log_t0.append(r.t0 - peer.t0)
        if fresh:
            if r.row or owner == self.me:
                self.won.pop(c, None)
                self._got(c)
            else:
                self.won[c] = (r.buf, r.w)
                for x in self.of.get(c, []):
                    if x.row:
                        self._cancel(x)  # its answer (a NOPE, or the data, checked) settles the row
        self._settle(c)

    def _timeouts(self, now: float) -> None:
        """A request past its deadline: its server gets no new requests and the chunk is asked elsewhere (the
        receive stays posted: a late copy still counts).  Still unanswered a grace later: a server that kept
        sending frames all the while took the request and did not serve it (banned, named `unserved`); one that
        went quiet is dropped (its receives cancelled) until it talks again."""
        grace = self.cfg.stage_timeout_s
        verdict: dict[int, bool] = {}
        for r in self.out.values():
            if now <= r.deadline:
                continue
            if not r.overdue:
                r.overdue = True
                self.stalled.add(r.w)
                self._copies_dirty = True
            if now > r.deadline + grace:
                verdict[r.w] = verdict.get(r.w, False) or self.heard[r.w] > r.deadline + grace / 2
        for w, talking in verdict.items():
            if talking and w not in self.peer.bad_senders:
                self.peer.unserved.setdefault(
                    w, f"pipelined phase (stage {self.stage}): took requests, kept talking, never sent the data"
                )
                self._ban(w, "requests not served")
            self._drop(w)

    def _drop(self, w: int) -> None:
        """`w` left the round or stopped answering: cancel my requests to it (and tell it), ask others."""
        self.dropped.add(w)
        self.stalled.discard(w)
        self._copies_dirty = True
        mine = [r for r in self.out.values() if r.w == w]
        self.eng.pipe.cancel([r.req for r in mine])
        for r in mine:
            if not r.cancelled:
                self.cancel_out.setdefault(w, []).append(r.q)
            self._resolve(r)
            self._settle(r.chunk)

    # ------------------------------------------------------------------ serving
    def _slow(self) -> bool:
        up = self.rate[self.me]
        others = [self.rate[w] for w in self.nbrs if self.active[w]]
        return bool(up > 0 and others and up < float(np.median(others)))

    def _next_job(self, now: float):
        if not self._slow() or len(self.jobs) < 2:
            return self.jobs.popleft()
        oldest = self.jobs[0]
        if now - oldest[3] > self.cfg.stage_timeout_s / 2:
            return self.jobs.popleft()
        # super-seeding: a slow uplink spends itself on the chunks with the fewest known copies
        holders = self.nh.sum(axis=0)
        k = min(range(len(self.jobs)), key=lambda i: (holders[self.jobs[i][2]], i))
        job = self.jobs[k]
        del self.jobs[k]
        return job

    def _serve(self, now: float) -> bool:
        busy = False
        ahead = BOOK_AHEAD if self.pacer.rate > 0 else self.max_sends  # paced: the next send booked behind this one
        if self.can_send[self.me]:
            while self.jobs and len(self.booked) < ahead and len(self.sends) + len(self.booked) < self.max_sends:
                w, q, c, t = self._next_job(now)
                if w in self.peer.bad_senders:  # banned since it asked: refused
                    self._unqueue(w, c)
                    self.nope_out.setdefault(w, []).append(q)
                    busy = True
                    continue
                owner, i = divmod(c, self.K)
                a, b = self.peer.chunk_range(owner, i, 1)
                self.booked.append((now + self.pacer.delay(b - a), w, q, c))
                self.asked.discard((w, c))  # booked: a cancel no longer stops it, so the asker may ask again
                busy = True
        while self.booked and self.booked[0][0] <= time.monotonic():
            _, w, q, c = self.booked.popleft()
            self._unqueue(w, c)
            owner, i = divmod(c, self.K)
            a, b = self.peer.chunk_range(owner, i, 1)
            view = self.peer.bufs[owner][a:b]
            self.sends.append((self.eng.pipe.post_send(view, w, data_tag(q)), view))
            self.peer.sent_bytes += b - a
            busy = True
        return busy

    def _test_sends(self) -> bool:
        busy = False
        if self.sends:
            done = set(self.eng.pipe.test([r for r, _ in self.sends]))
            if done:
                self.sends = [x for i, x in enumerate(self.sends) if i not in done]
                busy = True
        if self.fsends:
            done = set(self.eng.nbrc.test([r for r, _ in self.fsends]))
            if done:
                self.fsends = [x for i, x in enumerate(self.fsends) if i not in done]
        return busy

    # ------------------------------------------------------------------ frames out
    def _frame(self, w: int, code: int, body) -> None:
        buf = np.concatenate([[self.eng.magic, self.rid, self.stage, code], np.asarray(body, dtype=np.int64)])
        buf = buf.astype(np.int64)
        self.fsends.append((self.eng.nbrc.post_send(buf, w, TAG_PIPE), buf))
        self.sent_at[w] = time.monotonic()

    def _flush(self, now: float, keepalive: bool = True) -> bool:
        busy = bool(self.req_out or self.cancel_out or self.nope_out or self.fresh or self.full_out)
        if self.full_out:
            bits = pack_bits(self.have).view(np.int64)
            for w in sorted(self.full_out):
                if self.active[w]:
                    self._have_frame(w, PIPE_FULL, bits)
            self.full_out.clear()
        for code, box in ((PIPE_NOPE, self.nope_out), (PIPE_CANCEL, self.cancel_out), (PIPE_REQUEST, self.req_out)):
            for w, body in box.items():
                self._frame(w, code, body)
            box.clear()
        if self.fresh:
            fresh = np.asarray(sorted(set(self.fresh)), dtype=np.int64)
            for w in self.nbrs:
                if self.active[w]:
                    self._have_frame(w, PIPE_HAVE, fresh)
            self.fresh = []
        elif keepalive:
            for w in self.nbrs:
                if self.active[w] and now - self.sent_at[w] > self.hb:
                    self._have_frame(w, PIPE_HAVE, ())
        return busy

    # ------------------------------------------------------------------ reports
    def _report(self, now: float, force: bool = False) -> None:
        if not self.missing.any():
            status = DONE
        elif self.out or ((self._copies() > 0) & self.missing).any() or self._resyncing():
            status, self.stuck_since = RUNNING, None
        else:
            self.stuck_since = self.stuck_since or now
            status = STUCK if now - self.stuck_since > 2 * self.hb else RUNNING
        if not force and status == self.status and now - self.last_report < self.hb:
            return
        self.status, self.last_report = status, now
        new = self.entries[self.reported :]
        cols = np.array(new, dtype=np.int64).reshape(-1, 4).T
        head = [
            self.eng.magic,
            self.rid,
            self.stage,
            KIND_PIPE_REPORT,
            self.report_seq,
            status,
            self.reported,
            len(new),
        ]
        frame = np.concatenate([head, cols.reshape(-1), self.peer.tail()]).astype(np.int64)
        self.report_seq += 1
        self.reported = len(self.entries)
        self.sink(frame)

    def _write_log(self) -> None:
        """The phase's receives in the rank's own log (its trace), stage = the phase's first stage."""
        if not self.entries:
            return
        e = np.array(self.entries, dtype=np.int64).reshape(-1, 4)
        lg, K = self.peer.log, self.K
        c = e[:, 1]
        lg["stage"].append(np.full(c.size, self.stage))
        lg["t_start"].append(np.asarray(self.log_t0, dtype=np.float64))
        lg["t"].append(e[:, 3] / 1e6)
        lg["sender"].append(e[:, 0])
        lg["chunk"].append(c)
        lg["phase"].append(np.full(c.size, BT))
        lg["bytes"].append(np.minimum((c % K + 1) * self.C, self.peer.nbytes) - (c % K) * self.C)
        lg["ok"].append(e[:, 2].astype(bool))


# ---------------------------------------------------------------------------------------------- followers
def follow_pipelined(peer, msg: np.ndarray) -> np.ndarray:
    """A follower's pipelined phase, from the open frame `msg` (own_frame'd) to the tracker's end frame, which it
    returns (own_frame'd) for `_PeerState.follow` to confirm."""
    eng, cfg = peer.eng, peer.cfg
    op = frames.parse_pipe_open(msg, sender=eng.tracker, round_id=peer.rid, n=eng.size)
    sends: list = []

    def sink(frame: np.ndarray) -> None:
        sends.append((eng.ctrl.post_send(frame, eng.tracker, TAG_REPORT), frame))
        if len(sends) > 8:
            done = set(eng.ctrl.test([r for r, _ in sends]))
            sends[:] = [x for i, x in enumerate(sends) if i not in done]

    pp = PipePeer(peer, op, sink)
    end: list = []
    last = [op.seq]
    give_up = pp.t_open + op.budget_s + cfg.timeout_s
    quiet = tracker_quiet(cfg)
    heard = [pp.t_open]  # the tracker's last frame (it sends an update at least every quiet / 4)

    def poll() -> bool:
        while True:
            got = eng.ctrl.poll_frame(eng.tracker, TAG_DIRECTIVE)
            if got is None:
                break
            got = own_frame(got, eng.magic)
            if got is None:
                continue
            heard[0] = time.monotonic()
            try:
                h = frames.parse_header(
                    got, sender=eng.tracker, round_id=peer.rid, kinds=(KIND_PIPE_OPEN, KIND_END), min_stage=op.stage
                )
            except frames.StaleFrame:
                continue
            if h.kind == KIND_END:
                end.append(got)
                return True
            upd = frames.parse_pipe_open(got, sender=eng.tracker, round_id=peer.rid, n=eng.size, stage=op.stage)
            if upd.seq > last[0]:
                last[0] = upd.seq
                pp.apply(upd)
        now = time.monotonic()
        if now > give_up:
            raise PeerTimeoutError(
                f"rank {eng.rank}: no end of round {peer.rid} from the tracker (rank {eng.tracker}) within "
                f"{op.budget_s + cfg.timeout_s:.1f}s of its pipelined phase (the tracker stalled or died)"
            )
        if now - heard[0] > quiet:
            raise PeerTimeoutError(
                f"rank {eng.rank}: nothing from the tracker (rank {eng.tracker}) for {quiet:.1f}s in the pipelined "
                f"phase of round {peer.rid} (the tracker stalled or died)"
            )
        return False

    try:
        pp.run(poll)
    finally:
        pp.drain(min(1.0, cfg.stage_timeout_s))
        done = tb.wait_until(eng.ctrl, [r for r, _ in sends], time.monotonic() + min(1.0, cfg.stage_timeout_s))
        for (r, f), d in zip(sends, done):
            if not d:
                eng.orphan(eng.ctrl, [r], f)
    return end[0]


# ---------------------------------------------------------------------------------------------- the tracker
class _TrackerSide:
    """The tracker's view of a pipelined phase: reports in, buckets into its mirror round, updates out."""

    def __init__(self, tr, budget_s: float):
        self.tr, self.rnd, self.eng, self.cfg = tr, tr.rnd, tr.eng, tr.cfg
        n, rnd = self.eng.size, tr.rnd
        self.n, self.K, self.stage = n, tr.K, rnd.stage
        self.t0 = time.monotonic()
        self.deadline = self.t0 + budget_s
        self.budget_s = budget_s
        self.hb = heartbeat(self.cfg)
        self.silence = self.cfg.stage_timeout_s + max(2.0, 0.5 * self.cfg.stage_timeout_s)
        peers = np.flatnonzero(rnd.active[:n]).tolist()
        self.status = dict.fromkeys(peers, RUNNING)
        self.heard = dict.fromkeys(peers, self.t0)
        self.count = dict.fromkeys(peers, 0)
        self.seq = dict.fromkeys(peers, -1)
        self.got = np.zeros((n, n * tr.K), dtype=bool)  # chunks each peer reported verified
        self.pend: list[np.ndarray] = []  # [5, m] blocks: sender, receiver, chunk, ok, t_us
        self.last_bucket = self.t0
        self.settled_since: float | None = None
        self.upd = 0
        self.masks = self._masks()
        self.sends: list = []
        self.local: PipePeer | None = None
        self.finished = False
        self.keepalive = max(self.hb, tracker_quiet(self.cfg) / 4)  # an update at least this often
        self.sent_at = self.t0

    def _masks(self) -> tuple:
        n, rnd = self.n, self.rnd
        return (rnd.active[:n].copy(), rnd.may_send().copy(), rnd.exposed[:n].copy())

    def frame(self, seq: int) -> np.ndarray:
        act, can, exp = self.masks
        return np.concatenate(
            [
                [self.eng.magic, self.tr.rid, self.stage, KIND_PIPE_OPEN, seq, self.n, self.cfg.bt_window],
                [int(self.budget_s * 1e3)],
                pack_bits(act).view(np.int64),
                pack_bits(can).view(np.int64),
                pack_bits(exp).view(np.int64),
            ]
        ).astype(np.int64)

    def send(self, frame: np.ndarray, peers) -> None:
        me = self.eng.rank
        for p in peers:
            if p != me:
                self.sends.append((self.eng.ctrl.post_send(frame, int(p), TAG_DIRECTIVE), frame))
        self.sent_at = time.monotonic()
        if len(self.sends) > 64:
            done = set(self.eng.ctrl.test([r for r, _ in self.sends]))
            self.sends = [x for i, x in enumerate(self.sends) if i not in done]

    def parsed(self, frame: np.ndarray) -> frames.PipeOpen:
        return frames.parse_pipe_open(
            own_frame(frame, self.eng.magic), sender=self.eng.rank, round_id=self.tr.rid, n=self.n
        )

    # ------------------------------------------------------------------ reports
    def accept(self, p: int, msg: np.ndarray) -> None:
        """One report of peer `p` (own_frame'd): checked, its entries queued for the next bucket."""
        rnd, K = self.rnd, self.K
        try:
            rep = frames.parse_pipe_report(
                msg, sender=p, round_id=self.tr.rid, n=self.n, K=K, stage=self.stage, own_ok=rnd.hidden
            )
            if rep.seq != self.seq[p] + 1 or rep.base != self.count[p]:
                raise ProtocolError(
                    f"rank {p}: report {rep.seq} starts at entry {rep.base}, want report {self.seq[p] + 1} at "
                    f"entry {self.count[p]}"
                )
            c = rep.chunks[rep.ok]
            if self.got[p, c].any():
                raise ProtocolError(f"rank {p} reports chunk {int(c[self.got[p, c]][0])} delivered twice")
        except ProtocolError as e:
            if p == self.eng.rank:
                raise
            self._exclude(p, e)
            return
        self.tr._note_bans(p, rep)
        self.got[p, c] = True
        self.seq[p], self.count[p] = rep.seq, self.count[p] + rep.senders.size
        self.status[p], self.heard[p] = rep.status, time.monotonic()
        if rep.senders.size:
            r = np.full(rep.senders.size, p, dtype=np.int64)
            self.pend.append(np.stack([rep.senders, r, rep.chunks, rep.ok.astype(np.int64), rep.t_us]))

    def _exclude(self, p: int, err: Exception | None) -> None:
        silent: list[int] = []
        if err is not None:
            self.tr._misbehaved(p, self.rnd.stage, err, silent)
        else:
            self.tr.timed_out.add(p)
        self.rnd.leave([p])
        self.status.pop(p, None)

    def _read(self) -> None:
        eng = self.eng
        for p in list(self.status):
            if p == eng.rank or not self.rnd.active[p]:
                continue
            while p in self.status:
                try:
                    got = eng.ctrl.poll_frame(p, TAG_REPORT)
                except ProtocolError as e:
                    self._exclude(p, e)
                    break
                if got is None:
                    break
                got = own_frame(got, eng.magic)
                if got is None:
                    continue
                try:
                    frames.parse_header(got, sender=p, round_id=self.tr.rid, kinds=KIND_PIPE_REPORT, stage=self.stage)
                except frames.StaleFrame:
                    continue  # a late report of an earlier stage or round
                except ProtocolError as e:
                    self._exclude(p, e)
                    break
                self.accept(p, got)

    # ------------------------------------------------------------------ the mirror
    def bucket(self, final: bool = False) -> None:
        """Apply the queued transfers whose sender held the chunk, one stage each pass (`final`: until none is left)."""
        rnd, tr = self.rnd, self.tr
        lagging = bool(np.any(rnd.active[: self.n] & ~rnd.may_send()))
        while self.pend or lagging:
            e = np.concatenate(self.pend, axis=1) if self.pend else np.zeros((5, 0), dtype=np.int64)
            s, r, c, ok = e[0], e[1], e[2], e[3].astype(bool)
            ready = ~ok | rnd.have[s, c]
            if not ready.any() and final:
                ready[:] = True  # the rest (a sender whose own receipt never reached the tracker): last
            elif not ready.any() and not lagging:
                break
            lagging = False  # one empty stage a bucket moves the lags' clock on
            self.pend = [e[:, ~ready]] if (~ready).any() else []
            s, r, c, ok, t = s[ready], r[ready], c[ready], ok[ready].copy(), e[4][ready] / 1e6
            ok &= ~rnd.have[r, c]  # already held (an exposed owner's own chunk, on its way back): not a delivery
            st = rnd.reported_bt_stage(s, r, c)
            rnd.complete(st, ok)
            tr._apply_bans(st.index)
            tr.stages.append(st)
            tr.delivered.append(ok)
            tr.times.append((t, t))
        if tr._new_bans:
            tr._apply_bans(rnd.stage)

    def poll(self) -> bool:
        """One step: read reports, exclude the silent, bucket, update the peers; True once the phase is over."""
        if self.finished:
            return True
        now = time.monotonic()
        self._read()
        for p in list(self.status):
            if p != self.eng.rank and now - self.heard[p] > self.silence:
                self._exclude(p, None)
        if now - self.last_bucket >= self.hb or self.tr._new_bans:
            self.last_bucket = now
            self.bucket()
        masks = self._masks()
        if any(not np.array_equal(a, b) for a, b in zip(masks, self.masks)):
            gone = np.flatnonzero(self.masks[0] & ~masks[0]).tolist()  # told too, so they stop
            self.masks = masks
            self.upd += 1
            frame = self.frame(self.upd)
            self.send(frame, np.flatnonzero(masks[0]).tolist() + gone)
            if self.local is not None:
                self.local.apply(self.parsed(frame))
        elif now - self.sent_at > self.keepalive:  # nothing changed: the same masks again, so followers know
            self.upd += 1  # the tracker is alive (they give up after tracker_quiet without a frame)
            self.send(self.frame(self.upd), np.flatnonzero(masks[0]).tolist())
        live = [p for p in self.status if self.rnd.active[p]]
        states = {self.status[p] for p in live}
        if states <= {DONE}:
            self.finished = True
        elif states <= {DONE, STUCK}:
            self.settled_since = self.settled_since or now
            self.finished = now - self.settled_since > 2 * self.hb
        else:
            self.settled_since = None
        self.finished |= now > self.deadline
        return self.finished


def phase_budget(rnd, cfg, left_s: float) -> float:
    """Seconds the tracker gives a pipelined phase: stage_timeout_s for each of 4 x the phase's uplink-bound
    stages (at least 8), within what is left of the round's deadline (`left_s`, 0 = none)."""
    act = rnd.active[: rnd.n]
    need = int(np.maximum(rnd.N - rnd.held[act], 0).sum())
    cap = max(1, int(rnd.up[act].sum()))
    budget = cfg.stage_timeout_s * max(8, 4 * math.ceil(need / cap))
    return min(budget, max(left_s, 0.1)) if left_s else budget


def run_pipelined(tr, left_s: float) -> None:
    """The tracker's pipelined phase (called from `_Tracker.run` when the round reaches BitTorrent): open frames,
    its own peer's loop with the tracker side polled each iteration, the last bucket.  `_end` follows."""
    eng, rnd, peer, cfg = tr.eng, tr.rnd, tr.peer, tr.cfg
    side = _TrackerSide(tr, phase_budget(rnd, cfg, left_s))
    frame = side.frame(0)
    side.send(frame, np.flatnonzero(rnd.active[: eng.size]).tolist())
    try:
        if rnd.active[eng.rank]:
            peer.settle_late()
            me = eng.rank
            pp = PipePeer(peer, side.parsed(frame), lambda f: side.accept(me, own_frame(f, eng.magic)))
            side.local = pp
            try:
                pp.run(side.poll)
            finally:
                pp.drain(min(0.2, cfg.stage_timeout_s))
        else:
            idle = 0
            while not side.poll():
                idle += 1
                tb.pause(idle)
        side._read()
        side.bucket(final=True)
    finally:
        done = tb.wait_until(eng.ctrl, [r for r, _ in side.sends], time.monotonic() + 0.5)
        for (r, f), d in zip(side.sends, done):
            if not d:
                eng.orphan(eng.ctrl, [r], f)


__all__: list[Any] = ["PipePeer", "follow_pipelined", "run_pipelined", "TAG_PIPE", "data_tag"]
