"""Decentralised BitTorrent stages of a real round: each rank decides its own requests and grants.

The tracker only clocks the stages (one frame per peer: stage index, who is active, who may send) and
collects what each peer received.  Between those, a rank talks to its overlay neighbours only, with small
int64 frames on a communicator of their own:

    bitfield   once, when the BitTorrent phase starts: my have row
    per pass   budget (pass >= 1: my upload left), requests (with what I miss), grants, keeps
    have       after the stage's data moved: the chunks I received and verified, or all I hold (resync)

Bitfield resync: a rank that lacks a neighbour's have set (its bitfield never came, or a have frame of a
stage it was active in) says so in its next have frame (HAVE_WANT); the neighbour's next have frame to it is
then its full have set (HAVE_FULL).  A lost frame thus costs a stage or two, never the chunks only that
neighbour holds.  Granted, then not served: a neighbour whose have frame of the stage came, but not the data
of grants it made and I kept (an honest rank posts those sends before it sends that frame), is banned and
named (`unserved`) after a short grace; one that went quiet costs a timeout, as before.

`swarm.bt_peer.PeerBT` turns those into exactly the decisions the simulator makes, so the round equals
the simulated one for the same seed, budgets and overlay.  Every frame carries (magic, round, stage, code)
and a tag derived from (stage, code), so a late frame of a silent peer is never read as a current one.
A neighbour that misses a frame before the stage's exchange deadline is dropped for the rest of the stage
(requests to it count as refused); the tracker excludes it when its report does not come.
"""

from __future__ import annotations

import time

import numpy as np

from ..errors import ProtocolError
from ..swarm.bt_peer import PeerBT, pack_bits
from ..swarm.overlay import build_overlay
from ..swarm.round import BT
from ..transport import base as tb
from ..transport.base import MAGIC, Transport
from .frames import (
    HAVE_FULL,
    HAVE_WANT,
    own_frame,
    parse_ask,
    parse_bitfield,
    parse_grant,
    parse_have,
    parse_keep,
    parse_neighbour_header,
)

TAG_NBR = 100  # + (stage % 1000) * 32 + code; codes: 0 bitfield, 1 have, 2 + 4 * pass + step
BITFIELD, HAVE = 0, 1
BUDGET, ASK, GRANT, KEEP = range(4)


def _tag(stage: int, code: int) -> int:
    return TAG_NBR + (stage % 1000) * 32 + code


class NeighbourLink:
    """Frame exchanges with a set of neighbours, each bounded by a deadline (no collective: a silent
    neighbour must cost a timeout, not a hang)."""

    def __init__(self, net: Transport, rid: int, magic: int = MAGIC):
        self.net, self.rid, self.magic = net, rid, magic
        self.sends: list = []  # (request, buffer) kept alive until the stage ends

    def exchange(self, stage: int, code: int, frames: dict[int, np.ndarray], deadline: float) -> dict[int, np.ndarray]:
        """Send frames[w] to every w and receive one frame from each; returns those that came in time."""
        tag = _tag(stage, code)
        head = np.array([self.magic, self.rid, stage, code], dtype=np.int64)
        for w, body in frames.items():
            buf = np.concatenate([head, np.asarray(body, dtype=np.int64)])
            self.sends.append((self.net.post_send(buf, int(w), tag), buf))
        out: dict[int, np.ndarray] = {}
        pending = set(frames)
        idle = 0
        while pending:
            moved = False
            for w in sorted(pending):
                try:
                    buf = self.net.poll_frame(w, tag)
                except ProtocolError:
                    moved = True
                    continue  # not whole int64 words: never one of ours
                if buf is None:
                    continue
                moved = True
                buf = own_frame(buf, self.magic)
                if buf is None:
                    continue  # a frame of an earlier engine on a communicator MPI recycled
                try:
                    out[w] = parse_neighbour_header(buf, sender=w, round_id=self.rid, stage=stage, code=code)
                except ProtocolError:
                    continue  # a stale frame of an earlier round or stage on the same tag (or a bad one): not ours
                pending.discard(w)
            if moved:
                idle = 0
            else:
                if time.monotonic() > deadline:
                    break
                idle += 1
                tb.pause(idle)
        return out

    def settle_sends(self, deadline: float, eng) -> None:
        """Complete this stage's frame sends; those to peers that stopped listening become the engine's
        orphans (kept with their buffers until they complete)."""
        reqs = [r for r, _ in self.sends]
        done = tb.wait_until(self.net, reqs, deadline)
        for (r, buf), d in zip(self.sends, done):
            if not d:
                eng.orphan(self.net, [r], buf)
        self.sends = []


class PeerStageRunner:
    """One rank's decentralised BitTorrent stages within a round (built at the phase's first stage).

    It keeps no reference to the rank's round state (`peer`, passed to each stage): that state holds the
    update buffers, which must go the moment the round ends, not at the next cyclic garbage collection.
    """

    def __init__(self, peer, cfg, rid: int, seed: int, up: np.ndarray, down: np.ndarray, got_from: np.ndarray):
        self.cfg, self.rid = cfg, rid
        eng = peer.eng
        n, K = eng.size, peer.K
        nbr = build_overlay(n, cfg.replace(seed=seed), seed).nbr.astype(np.int64)
        self.bt = PeerBT(cfg, eng.rank, nbr, K, up, down, seed, peer.have.reshape(-1), got_from)
        self.link = NeighbourLink(eng.nbrc, rid, eng.magic)
        self.started = False
        self.stages = 0  # stages this rank decided itself
        self.N = n * K
        self.down = np.asarray(down, dtype=np.int64)
        self.synced = np.zeros(n, dtype=bool)  # neighbours whose whole have set I hold (bitfield, every delta)
        self.wanted: set[int] = set()  # neighbours that asked for my full have set: my next have frame is full

    def stage(
        self,
        peer,
        stage: int,
        active: np.ndarray,
        can_send: np.ndarray,
        refuse: np.ndarray | None = None,
        publish: np.ndarray | None = None,
    ) -> np.ndarray:
        """Run one stage for `peer` (the rank's engine._PeerState); returns the report body (senders,
        chunks, ok flags of what this rank received).  `refuse`: neighbours whose requests get no grant (the
        senders this rank banned; pass them as unable to send too)."""
        pb, cfg, me = self.bt, self.cfg, peer.eng.rank
        deadline = time.monotonic() + cfg.stage_timeout_s
        alive = [int(w) for w in pb.neighbours if active[w]]

        def misbehaved(w: int, err: ProtocolError) -> None:
            """A neighbour whose frame does not fit the protocol is dropped for the stage and banned: the ban
            goes to the tracker in this rank's report (evidence), never a reason for this rank to abort."""
            peer.bad_senders.add(w)
            peer.protocol_errors.setdefault(w, f"stage {stage}: {err}")
            if w in alive:
                alive.remove(w)

        if not self.started:  # bitfields: what each neighbour holds when the phase starts
            self.started = True
            mine = pack_bits(peer.have.reshape(-1)).view(np.int64)
            got = self.link.exchange(stage, BITFIELD, {w: mine for w in alive}, deadline)
            for w, body in got.items():
                try:
                    have = parse_bitfield(body, sender=w, round_id=self.rid, stage=stage, N=self.N).chunks
                except ProtocolError as e:
                    misbehaved(w, e)
                    continue
                pb.neighbour_has(w, have)
                self.synced[w] = True
            alive[:] = [w for w in alive if w in got]
        published = np.zeros(0, np.int64) if publish is None else np.asarray(publish, dtype=np.int64)
        if published.size and self.started:  # own chunks it holds publicly from now on (hidden protocol)
            pb.publish(published)
        pb.begin_stage(stage, active, can_send)
        self.stages += 1
        recv_s, recv_c, send_r, send_c = [], [], [], []
        for p in range(cfg.bt_passes):
            base = 2 + 4 * p
            if p:  # what each neighbour can still upload after the previous pass
                got = self.link.exchange(stage, base + BUDGET, {w: pb.up_left[me : me + 1] for w in alive}, deadline)
                for w in list(alive):
                    if w in got and (got[w].size != 1 or got[w][0] < 0):
                        misbehaved(w, ProtocolError(f"rank {w} sent a budget frame {got[w][:4].tolist()}"))
                    pb.up_left[w] = int(got[w][0]) if w in got and w in alive else 0
                alive[:] = [w for w in alive if w in got]
            s, c, _j, _g = pb.requests(p)
            # an ask frame: what I miss, then the chunks I request of you
            ask_frames = {w: np.concatenate([[pb.missing], c[s == w]]) for w in alive}
            got = self.link.exchange(stage, base + ASK, ask_frames, deadline)
            # chunks outside the round, a chunk twice, more than the asker misses or than its download budget
            # lets it take this stage (a request flood): a violation, the asker is banned and not served
            asks, announced = {}, {}
            for w, a in got.items():
                try:
                    most = int(min(self.down[w], self.N))
                    ask = parse_ask(a, sender=w, round_id=self.rid, stage=stage, N=self.N, max_count=most)
                except ProtocolError as e:
                    misbehaved(w, e)
                    continue
                asks[w], announced[w] = ask.chunks, ask.missing
            # a request for a chunk I do not hold (only a faulty peer sends one) is refused, not served
            held = {w: peer.have.reshape(-1)[a] for w, a in asks.items()}
            served = {w: a[held[w]] for w, a in asks.items() if held[w].any() and (refuse is None or not refuse[w])}
            grants = pb.grant(p, served, announced)
            for w, a in asks.items():
                full = np.zeros(a.size, dtype=bool)
                if w in grants:
                    full[held[w]] = grants[w]
                grants[w] = full
            answers = self.link.exchange(
                stage, base + GRANT, {w: grants.get(w, np.zeros(0, bool)).astype(np.int64) for w in alive}, deadline
            )
            granted = np.zeros(s.size, dtype=bool)
            for w in np.unique(s).tolist():
                if w not in answers or w not in alive:
                    continue  # no answer in time: its requests count as refused
                try:
                    a = parse_grant(answers[w], sender=w, round_id=self.rid, stage=stage, asked=int(np.sum(s == w)))
                except ProtocolError as e:
                    misbehaved(w, e)
                    continue
                granted[s == w] = a
            keep = pb.settle(p, granted)
            kept = self.link.exchange(stage, base + KEEP, {w: keep[s == w].astype(np.int64) for w in alive}, deadline)
            counts = {}
            for w, k in kept.items():
                g = grants.get(w)
                if g is None or w not in alive:
                    continue
                try:
                    k = parse_keep(k, sender=w, round_id=self.rid, stage=stage, granted=g)
                except ProtocolError as e:
                    misbehaved(w, e)
                    continue
                counts[w] = int(np.count_nonzero(k))
                send_r.append(np.full(counts[w], w, dtype=np.int64))
                send_c.append(asks[w][k])
            pb.commit(counts)
            recv_s.append(s[keep])
            recv_c.append(c[keep])
            alive[:] = [w for w in alive if w in asks and w in answers and w in kept]
        cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int64)  # noqa: E731
        r_from, r_chunk, s_to, s_chunk = cat(recv_s), cat(recv_c), cat(send_r), cat(send_c)
        ro, so = np.lexsort((r_chunk, r_from)), np.lexsort((s_chunk, s_to))
        r_from, r_chunk, s_to, s_chunk = r_from[ro], r_chunk[ro], s_to[so], s_chunk[so]
        late: list = []  # receives of kept grants unfinished at the data deadline (engine.Late)
        try:
            ok = peer.move(stage, s_to, s_chunk, r_from, r_chunk, np.full(r_from.size, BT, dtype=np.int64), late)
            pb.received(r_from[ok], r_chunk[ok])
            fresh = np.concatenate([published, r_chunk[ok]])  # (own chunks published this stage: hidden protocol)
            talking = self._have_exchange(peer, stage, active, alive, fresh, misbehaved)
            # live neighbours took every frame during the exchanges; one still pending after a short grace went
            # to a peer that stopped listening (the tracker's report wait leaves this grace in its margin); the
            # late receives get the same grace
            grace = time.monotonic() + min(1.0, cfg.stage_timeout_s)
            self._settle_late(peer, stage, late, talking, grace)
        finally:
            peer.data.cancel([x.req for x in late])  # none outlives the stage, whatever raised
        self.link.settle_sends(grace, peer.eng)
        return np.concatenate([[r_from.size], r_from, r_chunk, ok.astype(np.int64)])

    def _have_exchange(self, peer, stage: int, active: np.ndarray, alive: list[int], fresh: np.ndarray, misbehaved):
        """Have frames: this stage's verified chunks to every live neighbour, or my full have set to one that
        asked for it; HAVE_WANT to each whose set I lack.  Returns the neighbours whose frame came."""
        pb = self.bt
        full = None
        out = {}
        for w in alive:
            flags = 0 if self.synced[w] else HAVE_WANT
            if w in self.wanted:
                if full is None:
                    full = pack_bits(peer.have.reshape(-1)).view(np.int64)
                out[w] = np.concatenate([[flags | HAVE_FULL], full]).astype(np.int64)
            else:
                out[w] = np.concatenate([[flags], fresh]).astype(np.int64)
        got = self.link.exchange(stage, HAVE, out, time.monotonic() + self.cfg.stage_timeout_s)
        sent_full = self.wanted & set(out)
        self.wanted -= sent_full
        for w in pb.neighbours.tolist():
            if active[w] and w not in got:
                self.synced[w] = False  # what it received this stage never reached me
        for w, d in got.items():
            try:
                h = parse_have(d, sender=w, round_id=self.rid, stage=stage, N=self.N)
            except ProtocolError as e:
                misbehaved(w, e)
                self.synced[w] = False
                continue
            pb.neighbour_has(w, h.chunks)
            if h.full:
                self.synced[w] = True
            if h.want and w not in sent_full:  # (a want crossing my full frame is answered by it)
                self.wanted.add(w)
        return set(got)

    @staticmethod
    def _settle_late(peer, stage: int, late: list, talking: set[int], deadline: float) -> None:
        """Receives of kept grants that had not arrived by the data deadline.  A sender that answered every
        exchange of the stage, its have frame included, had posted those sends before that frame, so a run still
        missing after the grace was never sent: granted, then not served.  It is banned (evidence for the
        tracker in this stage's report) and named; a sender that went quiet costs only the timeout."""
        data = peer.data
        wait = [i for i, x in enumerate(late) if x.sender in talking]
        done = np.zeros(len(late), dtype=bool)
        if wait:
            done[wait] = tb.wait_until(data, [late[i].req for i in wait], deadline)
        short: dict[int, int] = {}
        for x, d in zip(late, done):
            if d:  # it came, late: not counted as delivered (fetched again), but served
                why = data.failed(x.req)
                if why:
                    peer.bad_senders.add(x.sender)
                    peer.protocol_errors.setdefault(x.sender, f"stage {stage}: {why}")
            elif x.sender in talking:
                short[x.sender] = short.get(x.sender, 0) + x.chunks
        late[:] = [x for x, d in zip(late, done) if not d]  # the caller cancels these
        for src, k in short.items():
            peer.bad_senders.add(src)
            peer.unserved.setdefault(
                src, f"stage {stage}: granted {k} chunk(s), then sent its have frame but not the data"
            )
