"""A fault-injecting Transport wrapper: one rank misbehaves on purpose, the runtime cannot tell it apart.

Wrap the transport of the rank that should misbehave and hand it to the engine:

    net = FaultyTransport(MPITransport(comm), [Fault("silent", from_stage=1)])
    engine = SwarmEngine(net, config)

A `Fault` says what to do (drop, delay, duplicate, corrupt, silent), to which messages: a context
("data", "ctrl", "nbr" or None for all), a peer (None: all), a round and a stage window.  The wrapper
learns the current round from the control frames it sees pass (every frame starts MAGIC, round, stage,
kind) and from the round's all-gathers (shape and descriptors start MAGIC, round), and a data message's
stage from its tag (`base.data_tag`), so a test names "round 1, stage 3" the way the trace does.
Requests of dropped sends complete at once, as if the bytes had left; a delayed send is posted when its
time comes, during the wrapper's `test` calls.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from .base import MAGIC, Request, Transport, stage_of_data_tag

ACTIONS = ("drop", "delay", "duplicate", "corrupt", "forge", "oversize", "truncate", "flood", "silent", "replay")
FLOOD = 2000  # duplicate requests a "flood" fault appends to an ask frame
FORGED_BYTE = 0x71  # a forged float32 reads 0x71717171, about 1.2e30: a chunk of the right length, poisoned


@dataclass(frozen=True)
class Fault:
    """One misbehaviour of the wrapped rank's outgoing messages.

    action: "drop" (never sent), "delay" (sent `delay_s` late), "duplicate" (sent twice), "corrupt" (one
        byte flipped every `stride` bytes from byte `offset`), "forge" (every byte replaced: same length,
        poisoned values), "oversize" (`stride` bytes appended), "truncate" (only the first half sent),
        "flood" (neighbour ask frames: FLOOD duplicate requests appended), "silent" (every message dropped:
        the rank stops talking but keeps listening, so it still learns the round's outcome), "replay"
        (all-gathers only: this rank contributes what it contributed to the first all-gather of the same
        size, e.g. an earlier round's descriptor).
    channel: "data", "ctrl", "nbr" (the engine's contexts) or None for every context; "data" also covers "pipe",
        the pipelined BitTorrent phase's payload (runtime/bt_pipeline.py), whose messages take the stage of the
        last control frame the wrapper saw (the phase's).
    peer: the destination it applies to, None for all.
    code: only control frames whose fourth word (a tracker frame's kind, a neighbour frame's code, e.g.
        bt_stages.BITFIELD) is `code`; None for every message.  A data message has no code and never matches.
    after: only from the first control frame of this kind or code on that the rank sent or received in the round
        (e.g. frames.KIND_PIPE_OPEN: from the moment its pipelined BitTorrent phase opened, a phase that is one
        stage whatever its length); None: from the round's start.
    count: at most this many messages are faulted (the first `count` that match); None: every one.
    round_id / from_stage / to_stage: the window (None: any round; stages inclusive).  A send that is no
        control frame and no data message has no stage and matches only a fault for any round from stage
        0.  All-gathers (the round's descriptors) are faulted only by "corrupt" (this rank's own
        contribution, from byte `offset`) and "replay", in every round, whatever the window says, and only
        when `nbytes` names their size (the engine's descriptors, not its shape agreement).
    """

    action: str
    channel: str | None = None
    peer: int | None = None
    round_id: int | None = None
    from_stage: int = 0
    to_stage: int | None = None
    delay_s: float = 0.0
    stride: int = 4096
    offset: int = 0
    nbytes: int | None = None  # set: an all-gather fault, for contributions of this many bytes only
    code: int | None = None  # set: only control frames of this kind or neighbour code
    after: int | None = None  # set: only once a control frame of this kind or code passed in the round
    count: int | None = None  # set: at most this many messages

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ConfigError(f"Fault action {self.action!r}: choose one of {ACTIONS}")
        if self.action == "delay" and self.delay_s <= 0:
            raise ConfigError("a 'delay' Fault needs delay_s > 0")
        if self.stride < 1:
            raise ConfigError("Fault stride must be >= 1")
        if self.count is not None and self.count < 1:
            raise ConfigError("Fault count must be >= 1 (None: every matching message)")

    def matches(
        self,
        channel: str,
        dest: int,
        round_id: int | None,
        stage: int | None,
        code: int | None = None,
        seen: frozenset | set = frozenset(),
    ) -> bool:
        """`seen`: the kinds and codes of the control frames that passed in the round so far (for `after`)."""
        if self.channel is not None and self.channel != channel and (self.channel, channel) != ("data", "pipe"):
            return False
        if self.code is not None and code != self.code:
            return False
        if self.after is not None and self.after not in seen:
            return False
        if self.peer is not None and self.peer != dest:
            return False
        if self.round_id is not None and round_id != self.round_id:
            return False
        if stage is None:
            return self.from_stage <= 0 and self.round_id is None
        return stage >= self.from_stage and (self.to_stage is None or stage <= self.to_stage)


class _Done:
    """A request that is already complete (a dropped send)."""

    reported = False


class _Later:
    """A send to post at `when` (a delayed send); complete once the posted send is."""

    def __init__(self, when: float, buf: np.ndarray, dest: int, tag: int):
        self.when, self.buf, self.dest, self.tag = when, buf, dest, tag
        self.inner: Request | None = None
        self.reported = False


class _Pair:
    """Two inner sends (a duplicated message): complete when both are."""

    def __init__(self, a: Request, b: Request):
        self.reqs, self.done = [a, b], [False, False]
        self.reported = False


class _Epoch:
    """What the wrapper has learned of the current round (shared by every context of one wrapper)."""

    round_id: int | None = None
    stage: int | None = None  # of the last control frame seen: a pipelined payload message's stage
    seen: set  # kinds and codes of the control frames seen in the newest round (Fault.after)
    seen_round: int | None = None
    fired: dict  # Fault -> messages it faulted (Fault.count)

    def __init__(self) -> None:
        self.seen, self.fired = set(), {}


class FaultyTransport(Transport):
    """Wraps `inner`; the given faults apply to this rank's outgoing messages.  Counts what it did in
    `injected` (action -> messages), so a test can check its fault really fired."""

    def __init__(self, inner: Transport, faults: Sequence[Fault] = (), *, _epoch: _Epoch | None = None, _log=None):
        self.inner = inner
        self.faults = list(faults)
        self.rank, self.size, self.name = inner.rank, inner.size, inner.name
        self._epoch = _epoch or _Epoch()
        self.injected: dict[str, int] = _log if _log is not None else {}
        self._gathered: dict[int, np.ndarray] = {}  # first all-gather contribution of each size (replay)

    def dup(self, name: str) -> FaultyTransport:
        return FaultyTransport(self.inner.dup(name), self.faults, _epoch=self._epoch, _log=self.injected)

    # ----------------------------------------------------------------------------- what a message is
    def _learn(self, buf: np.ndarray) -> int | None:
        """The stage of a control frame (and its round, remembered); None when `buf` is no frame."""
        if buf.dtype == np.int64 and buf.ndim == 1 and buf.size >= 4 and (int(buf[0]) & 0xFFFFFFFF) == MAGIC:
            ep, rid = self._epoch, int(buf[1])
            if ep.seen_round is None or rid > ep.seen_round:  # a new round (a late frame of an old one is not)
                ep.seen, ep.seen_round = set(), rid
            if rid == ep.seen_round:
                ep.seen.add(int(buf[3]))
            ep.round_id = rid
            ep.stage = int(buf[2])
            return int(buf[2])
        return None

    def _stage_of(self, buf: np.ndarray, tag: int) -> int | None:
        if self.name == "data":
            return stage_of_data_tag(tag)
        if self.name == "pipe":  # pipelined payload: tags number requests, the phase is the frames' stage
            return self._epoch.stage
        return self._learn(buf)

    def _fault(self, buf: np.ndarray, dest: int, tag: int) -> Fault | None:
        stage = self._stage_of(buf, tag)
        code = int(buf[3]) if self.name not in ("data", "pipe") and stage is not None else None
        for f in self.faults:
            if f.nbytes is not None or f.action == "replay":
                continue  # all-gather faults
            if f.count is not None and self._epoch.fired.get(id(f), 0) >= f.count:
                continue
            if f.matches(self.name, dest, self._epoch.round_id, stage, code, self._epoch.seen):
                self._epoch.fired[id(f)] = self._epoch.fired.get(id(f), 0) + 1
                return f
        return None

    # ----------------------------------------------------------------------------- Transport
    def post_send(self, buf: np.ndarray, dest: int, tag: int) -> Request:
        f = self._fault(buf, dest, tag)
        if f is None:
            return self.inner.post_send(buf, dest, tag)
        self.injected[f.action] = self.injected.get(f.action, 0) + 1
        if f.action in ("drop", "silent"):
            return _Done()
        if f.action == "delay":
            return _Later(time.monotonic() + f.delay_s, buf, dest, tag)
        if f.action == "duplicate":
            return _Pair(self.inner.post_send(buf, dest, tag), self.inner.post_send(buf, dest, tag))
        if f.action == "flood":
            if buf.dtype != np.int64 or buf.size < 5 or buf[3] % 4 != 3:
                return self.inner.post_send(buf, dest, tag)  # only ask frames (code 2 + 4 * pass + 1)
            first = buf[5] if buf.size > 5 else 0
            return self.inner.post_send(np.concatenate([buf, np.full(FLOOD, first, np.int64)]), dest, tag)
        raw = np.ascontiguousarray(buf).reshape(-1).view(np.uint8)
        if f.action == "oversize":
            return self.inner.post_send(np.concatenate([raw, np.zeros(f.stride, np.uint8)]), dest, tag)
        if f.action == "truncate":
            return self.inner.post_send(raw[: raw.size // 2].copy(), dest, tag)
        bad = np.array(buf, copy=True).reshape(-1).view(np.uint8)  # the rank's own data stays intact
        if f.action == "forge":
            bad[:] = FORGED_BYTE
        else:
            bad[f.offset :: f.stride] ^= 0xFF
        return self.inner.post_send(bad, dest, tag)

    def post_recv(self, buf: np.ndarray, source: int, tag: int) -> Request:
        return self.inner.post_recv(buf, source, tag)

    def post_recv_status(self, buf: np.ndarray, source: int, tag: int) -> Request:
        return self.inner.post_recv_status(buf, source, tag)

    def recv_status(self, req: Request) -> tuple[int, int]:
        return self.inner.recv_status(req)

    def test(self, reqs: Sequence[Request]) -> list[int]:
        out: list[int] = []
        plain = [(i, r) for i, r in enumerate(reqs) if not isinstance(r, (_Done, _Later, _Pair))]
        if plain:
            got = self.inner.test([r for _, r in plain])
            out.extend(plain[j][0] for j in got)
        now = time.monotonic()
        for i, r in enumerate(reqs):
            if isinstance(r, _Done) and not r.reported:
                r.reported = True
                out.append(i)
            elif isinstance(r, _Later) and not r.reported:
                if r.inner is None and now >= r.when:
                    r.inner = self.inner.post_send(r.buf, r.dest, r.tag)
                if r.inner is not None and self.inner.test([r.inner]):
                    r.reported = True
                    out.append(i)
            elif isinstance(r, _Pair) and not r.reported:
                for j, q in enumerate(r.reqs):
                    if not r.done[j] and self.inner.test([q]):
                        r.done[j] = True
                if all(r.done):
                    r.reported = True
                    out.append(i)
        return sorted(out)

    def cancel(self, reqs: Sequence[Request]) -> None:
        inner = []
        for r in reqs:
            if isinstance(r, _Later):
                if r.inner is not None:
                    inner.append(r.inner)
                r.reported = True
            elif isinstance(r, _Pair):
                inner.extend(q for q, d in zip(r.reqs, r.done) if not d)
                r.reported = True
            elif isinstance(r, _Done):
                r.reported = True
            else:
                inner.append(r)
        self.inner.cancel(inner)

    def failed(self, req: Request) -> str | None:
        if isinstance(req, (_Done, _Pair)):
            return None
        return self.inner.failed(req.inner if isinstance(req, _Later) else req)

    def abandon(self, reqs: Sequence[Request]) -> None:
        inner = [r.inner if isinstance(r, _Later) else r for r in reqs if not isinstance(r, (_Done, _Pair))]
        inner += [q for r in reqs if isinstance(r, _Pair) for q in r.reqs]
        self.inner.abandon([q for q in inner if q is not None])

    def poll_frame(self, source: int, tag: int) -> np.ndarray | None:
        msg = self.inner.poll_frame(source, tag)
        if msg is not None:
            self._learn(msg)
        return msg

    def post_allgather(self, send: np.ndarray, recv: np.ndarray) -> Request:
        words = np.asarray(send).reshape(-1)
        if words.dtype == np.int64 and words.size >= 4 and (int(words[0]) & 0xFFFFFFFF) == MAGIC:
            # a round's own all-gather (its shape, its descriptors: MAGIC, round, ...) opens that round at stage 0:
            # a direct round's data leaves before any control frame of the round passes here
            self._epoch.round_id, self._epoch.stage = int(words[1]), 0
        raw = np.ascontiguousarray(send).reshape(-1).view(np.uint8)
        earlier = self._gathered.get(raw.size)
        if earlier is None:
            self._gathered[raw.size] = raw.copy()
        for f in self.faults:
            if f.channel not in (None, self.name) or f.action not in ("corrupt", "replay"):
                continue
            if f.nbytes != raw.size:  # all-gather faults name the size they target (None: sends only)
                continue
            if f.action == "replay":
                if earlier is None:
                    break  # nothing to replay yet: this contribution is the one replayed later
                self.injected["replay"] = self.injected.get("replay", 0) + 1
                return self.inner.post_allgather(earlier.copy(), recv)
            self.injected["corrupt"] = self.injected.get("corrupt", 0) + 1
            bad = raw.copy()
            bad[f.offset :: f.stride] ^= 0xFF
            return self.inner.post_allgather(bad, recv)
        return self.inner.post_allgather(send, recv)

    def local_size(self) -> int:
        return self.inner.local_size()

    def close(self) -> None:
        self.inner.close()
