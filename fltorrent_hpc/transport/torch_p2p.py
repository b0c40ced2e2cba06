"""The torch-native transport: the Transport interface over torch's gloo point-to-point, for launches without
an MPI launcher (torchrun, any env:// rendezvous).

`connect(store, rank, size)` bootstraps it from the Store torch hands the backend creator: a private gloo
ProcessGroup (under its own PrefixStore, so it never meets a user's gloo group) holds one TCP connection per
pair of ranks.  Gloo's point-to-point is not MPI's; four of its properties shape this module [measured, torch
2.13 / its bundled gloo]:

1. A message longer than the receive posted for it aborts the receiving *process* (gloo::EnforceNotMet on
   gloo's I/O thread); a shorter one completes without saying its length.  So a receive must know the length
   of the message before it is posted.
2. There is no probe and no cancel: a posted receive stays posted until a message fills it.
3. A send or receive Work never reports completion unless someone waits on it, and a wait that times out
   closes every connection of the group.  So gloo waits run in threads without a gloo timeout (the group is
   built with a 30-day one); the callers' own deadlines (base.py's bounded waits) bound what they wait for.
4. Messages of one pair on one gloo tag ("slot") match in the order they were posted.

Hence the framing (a size-prefixed protocol).  Every message starts with a fixed 32-byte header (magic,
context, tag, nbytes) on the one header slot of its pair.  A body up to EAGER_BYTES (64 KiB: control frames,
small chunk runs) travels in the same gloo message: each peer's listener thread keeps HEADER_RING receives of
32 B + 64 KiB posted there (gloo accepts a shorter message), reads the header and copies the body out.  A
larger body goes on a slot of its own per (context, tag), posted by the sender *before* its header, and is
received only by a receive that knows its length:

- a header that a posted receive matches: the listener receives the body straight into that receive's buffer
  (the body is on its way: the sender posted it first);
- an unmatched one leaves the body at its sender (rendezvous) until a receive takes it, so a rank never holds
  a second copy of the data; the bodies of one (context, tag) are received in header order, so gloo's in-order
  matching never pairs a body with another message's receive;
- a message longer than its receive fails that receive as `Truncated` (MPI_ERR_TRUNCATE's meaning) and is
  consumed; one longer than DRAIN_BYTES is left unread and closes its (source, context, tag) stream.

Matching (context, source, tag, in order; ANY_SOURCE), probing and cancelling happen here, in Python.  A small
send completes once copied (as an MPI eager send; a reaper thread per peer waits for gloo, in order, to free the
copy); a large one completes when gloo sent its body, which a pooled waiter thread observes.  `dup` is local (a
new context number; every rank must dup in the same order, as with MPI).  `close` sends each peer a goodbye
header, which ends that peer's listener for this rank; at exit every transport closes and waits for its peers'
goodbyes (see `_drain_at_exit`).  Nothing a peer sends is unpickled: bodies land in numpy buffers, headers are
four int64 words checked before use.
"""

from __future__ import annotations

import atexit
import itertools
import os
import socket
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import numpy as np
import torch

from ..errors import PeerTimeoutError, ProtocolError, TransportError
from .base import ANY_SOURCE, Request, Transport, Truncated

__all__ = ["TorchTransport", "connect", "EAGER_BYTES", "DRAIN_BYTES"]

HDR_MAGIC = 0x464C5448  # "FLTH": first word of every header
HDR_BYTES = 32  # magic, context, tag, nbytes: four int64 words
HDR_SLOT = 0  # gloo tag of every header (with the body of a small message) between a pair
CLOSE = -1  # the context word of a closing header
TAG_SPAN = 1 << 16  # logical tags 0..65534 in each context; 65535 is the all-gather's
GATHER_TAG = TAG_SPAN - 1
MAX_CONTEXTS = (2**31 - 2) // TAG_SPAN  # body slot 1 + ctx * TAG_SPAN + tag stays a positive int32
EAGER_BYTES = 64 << 10  # a body up to this size travels with its header (fixed: every rank must post this size)
DRAIN_BYTES = 64 << 20  # a message longer than its receive is consumed up to this size; beyond, its stream closes
CANCEL_WAIT_S = 30.0  # cancel() of a receive whose body is already arriving waits at most this long
GLOO_TIMEOUT = timedelta(days=30)  # a gloo wait that expires closes every pair: our deadlines bound waits instead
HEADER_RING = 4  # header-slot receives a listener keeps posted per peer (4 x 64 KiB)
WAITER_LINGER_S = 2.0  # an idle pooled waiter thread ends after this long
EXIT_WAIT_S = float(os.environ.get("FLTORRENT_TORCH_EXIT_WAIT_S", "20"))  # at exit: wait for peers' goodbyes
_LIVE: weakref.WeakSet = weakref.WeakSet()  # wires of this process, closed and drained at exit


class _Req:
    """A send or receive of this transport; `done` is set by whichever thread completes it."""

    __slots__ = ("kind", "seq", "buf", "ctx", "source", "tag", "state", "done", "reported", "why", "got", "keep")

    def __init__(self, kind: str, seq: int, buf: np.ndarray, ctx: int, peer: int, tag: int):
        self.kind, self.seq, self.buf, self.ctx, self.source, self.tag = kind, seq, buf, ctx, peer, tag
        self.state = "waiting"  # receives: waiting (unmatched) -> matched (its body is arriving) -> done
        self.done = False
        self.reported = False
        self.why: str | None = None
        self.got: tuple[int, int] | None = None  # (source, nbytes) of a receive that succeeded
        self.keep: Any = None  # buffers and gloo Works that must outlive the transfer


class _Gather:
    """An all-gather: a receive from and a send to every other rank; complete when all of them are."""

    __slots__ = ("parts", "nbytes", "reported")

    def __init__(self, parts: list[_Req], nbytes: int):
        self.parts, self.nbytes, self.reported = parts, nbytes, False

    @property
    def done(self) -> bool:
        return all(p.done for p in self.parts)


class _Msg:
    """A message whose header arrived and that no receive has taken yet.

    state: "here" (`data` holds it), "at_sender" (rendezvous: a large body waits at its sender until a receive
    matches), "arriving" (a large frame `poll_frame` is fetching into `data`).
    """

    __slots__ = ("source", "nbytes", "seq", "state", "data")

    def __init__(self, source: int, nbytes: int, seq: int, state: str, data: np.ndarray | None = None):
        self.source, self.nbytes, self.seq, self.state, self.data = source, nbytes, seq, state, data


def _body_slot(ctx: int, tag: int) -> int:
    """The gloo tag of a large body of (context, tag): its own slot, so bodies of a stream match in order."""
    return 1 + ctx * TAG_SPAN + tag


def _frame_buffer(nbytes: int) -> np.ndarray:
    """`nbytes` of uint8 over int64 storage, so a frame can be read as int64 words without a copy."""
    return np.empty((nbytes + 7) // 8, dtype=np.int64).view(np.uint8)[:nbytes]


def _flat(buf: np.ndarray, what: str) -> np.ndarray:
    if not buf.flags.c_contiguous:
        raise TransportError(f"the torch transport needs a contiguous buffer to {what}")
    return buf.reshape(-1).view(np.uint8)


def _reason(e: BaseException) -> str:
    """Gloo's error text without its source path and its boilerplate."""
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    return text.split(". This is typically")[0][:240]


class _Wire:
    """What every context of one root TorchTransport shares: the gloo group, matching state, threads."""

    def __init__(self, pg: Any, rank: int, size: int, hosts: list[str], label: str):
        self.pg, self.rank, self.size, self.hosts, self.label = pg, rank, size, hosts, label
        mutex = threading.Lock()
        self.lock = threading.Condition(mutex)  # guards everything below; notified when a request completes
        self.outbox_cv = {p: threading.Condition(mutex) for p in range(size)}  # wakes one peer's reaper
        self.waiting: dict[tuple[int, int, int], deque[_Req]] = {}  # (ctx, source or ANY, tag) -> receives
        self.stash: dict[tuple[int, int, int], deque[_Msg]] = {}  # (ctx, source, tag) -> arrived messages
        self.poisoned: set[tuple[int, int, int]] = set()  # streams whose next body can no longer be framed
        self.gone: dict[int, str] = {}  # peer -> why nothing more will come from it
        self.streams: dict[tuple, deque] = {}  # large bodies in flight, per stream: (gloo works, on_done)
        self.ready: deque[tuple] = deque()  # streams with work that no waiter is serving
        self.waiters_idle = 0
        self.waiter_cv = threading.Condition(mutex)
        self.outbox: dict[int, deque] = {}  # peer -> header-slot sends (work, buffer) its reaper waits for
        self.seq = itertools.count()
        self.next_ctx = 1
        self.closed = False
        self.threads: set[threading.Thread] = set()  # every thread of this wire still running
        self.leftover: list = []  # gloo works that may never complete, kept referenced (gloo holds their buffers)
        for peer in range(size):
            if peer != rank:
                self._spawn(self._listen, peer, name=f"fltorrent-{label}-listen-{peer}")
                self.outbox[peer] = deque()
                self._spawn(self._reap, peer, self.outbox[peer], name=f"fltorrent-{label}-reap-{peer}")
        _LIVE.add(self)

    def _spawn(self, target: Callable[..., None], *args: Any, name: str) -> None:
        """Start a daemon thread that this wire tracks until it ends."""

        def run() -> None:
            try:
                target(*args)
            finally:
                self.threads.discard(threading.current_thread())

        th = threading.Thread(target=run, daemon=True, name=name)
        self.threads.add(th)
        th.start()

    # ------------------------------------------------------------------------------ gloo primitives
    @staticmethod
    def _wait(works: Sequence[Any]) -> str | None:
        """Block (no gloo timeout) until every work completed; the reason the first one failed, or None."""
        for w in works:
            try:
                w.wait()
            except Exception as e:  # noqa: BLE001 - gloo raises RuntimeError for a closed or failed pair
                return _reason(e)
        return None

    def _post_body(self, peer: int, ctx: int, tag: int, target: np.ndarray) -> list[Any]:
        """Post the gloo receive of a large body whose length is known (lock held: a stream's bodies in order)."""
        return [self.pg.recv([torch.from_numpy(target)], peer, _body_slot(ctx, tag))] if target.size else []

    def _defer(self, key: tuple, works: list[Any], on_done: Callable[[str | None], None]) -> None:
        """Have a waiter thread wait for `works` after the earlier works of stream `key`, then call `on_done(why)`
        under the lock.  Waiters are pooled: an idle one lingers WAITER_LINGER_S for the next stream, and a new
        one starts when none is idle (a waiter may wait long: a body its receiver has not asked for).  Lock held."""
        q = self.streams.get(key)
        if q is None:
            q = self.streams[key] = deque()
            self.ready.append(key)
            if self.waiters_idle:
                self.waiter_cv.notify()
            else:
                self._spawn(self._serve, name=f"fltorrent-{self.label}-wait")
        q.append((works, on_done))

    def _serve(self) -> None:
        """A pooled waiter: serve one stream until it is empty, then the next ready one; end after lingering."""
        while True:
            with self.lock:
                deadline = time.monotonic() + WAITER_LINGER_S
                while not self.ready:
                    left = deadline - time.monotonic()
                    if left <= 0 or self.closed and not self.streams:
                        return
                    self.waiters_idle += 1
                    self.waiter_cv.wait(min(left, 1.0))
                    self.waiters_idle -= 1
                key = self.ready.popleft()
                q = self.streams[key]
            while True:
                with self.lock:
                    if not q:
                        del self.streams[key]
                        break
                    works, on_done = q[0]
                why = self._wait(works)
                with self.lock:
                    q.popleft()
                    on_done(why)
                    self.lock.notify_all()

    def _reap(self, peer: int, q: deque) -> None:
        """Wait, in order, for this rank's header-slot messages to `peer` (gloo completes one slot in order and
        the peer's listener always has a receive posted), keeping their buffers alive until gloo sent them."""
        while True:
            with self.lock:
                while not q and not self.closed:
                    self.outbox_cv[peer].wait()
                if not q:
                    return
                work, _keep = q[0]
            why = self._wait([work])
            with self.lock:
                q.popleft()
            if why is not None:
                self._lose(peer, f"rank {peer} is unreachable ({why})")

    def _complete(self, req: _Req, why: str | None, got: tuple[int, int] | None = None) -> None:
        """Lock held."""
        req.why, req.got, req.state, req.done = why, None if why else got, "done", True

    # ------------------------------------------------------------------------------ receiving
    def _listen(self, peer: int) -> None:
        """This rank's listener for `peer`: HEADER_RING receives always posted on the header slot (so a burst of
        small messages is not one round trip each), handled in order, until the peer says goodbye or fails.  A
        message carries its header and, when small, its body."""
        bufs = [np.zeros(HDR_BYTES + EAGER_BYTES, dtype=np.uint8) for _ in range(HEADER_RING)]
        posted: deque = deque()
        self.leftover.append(posted)  # receives still posted when the listener ends stay referenced
        try:
            for b in bufs:
                posted.append((b, self.pg.recv([torch.from_numpy(b)], peer, HDR_SLOT)))
        except Exception as e:  # noqa: BLE001 - a pair gloo already closed
            self._lose(peer, f"rank {peer} is unreachable ({_reason(e)})")
            return
        while True:
            buf, work = posted[0]
            why = self._wait([work])
            if why is not None:
                self._lose(peer, f"rank {peer} is unreachable ({why})")
                return
            posted.popleft()
            head = buf[:HDR_BYTES].view(np.int64)
            magic, ctx, tag, nbytes = (int(x) for x in head)
            if magic == HDR_MAGIC and ctx == CLOSE:  # nothing more will come; receives still waiting for it
                return  # stay bounded by their callers' deadlines, as with MPI
            if magic != HDR_MAGIC or not (0 <= ctx < MAX_CONTEXTS and 0 <= tag < TAG_SPAN) or nbytes < 0:
                self._lose(peer, f"rank {peer} sent a malformed header {head.tolist()}; its messages cannot be framed")
                return
            body = buf[HDR_BYTES : HDR_BYTES + nbytes] if nbytes <= EAGER_BYTES else None
            why = self._on_message((ctx, peer, tag), nbytes, body)  # copies the body out of `buf`
            if why is not None:
                self._lose(peer, f"rank {peer} failed during a message ({why})")
                return
            try:
                posted.append((buf, self.pg.recv([torch.from_numpy(buf)], peer, HDR_SLOT)))
            except Exception as e:  # noqa: BLE001
                self._lose(peer, f"rank {peer} is unreachable ({_reason(e)})")
                return

    def _on_message(self, key: tuple, nbytes: int, body: np.ndarray | None) -> str | None:
        """Deliver or keep a small message (its body came with the header); match a large one's header to a
        posted receive and receive its body now, or leave the body at its sender.  Once this wire is closed,
        large bodies are received and dropped, so the sender's send completes.  The reason a body failed."""
        ctx, peer, tag = key
        finish: Callable | None = None
        with self.lock:
            if key in self.poisoned:
                return None
            if self.closed:
                works = [] if body is not None else self._discard(key, nbytes)
            else:
                msg = _Msg(peer, nbytes, next(self.seq), "here")
                q = self.stash.get(key)
                req = None if q else self._take_waiting(ctx, peer, tag)
                if body is not None:
                    if req is not None:
                        self._deliver(peer, body, req)
                    else:
                        msg.data = _frame_buffer(nbytes)
                        msg.data[:] = body
                        self.stash.setdefault(key, deque()).append(msg)
                    self.lock.notify_all()
                    return None
                if req is None:
                    msg.state = "at_sender"
                    self.stash.setdefault(key, deque()).append(msg)
                    return None
                plan = self._start_body(key, msg, req)
                if plan is None:
                    self.lock.notify_all()
                    return None
                target, finish = plan
                try:
                    works = self._post_body(peer, ctx, tag, target)
                except Exception as e:  # noqa: BLE001 - the pair is gone
                    finish(_reason(e))
                    return _reason(e)
        why = self._wait(works)  # the sender posted the body before the header: it is on its way
        if finish is not None:
            with self.lock:
                finish(why)
                self.lock.notify_all()
        return why

    def _discard(self, key: tuple, nbytes: int) -> list[Any]:
        """Post a receive that drops a large body nobody will take (lock held); too large to drop: the stream
        closes (the sender's send never completes)."""
        if nbytes > DRAIN_BYTES:
            self.poisoned.add(key)
            return []
        ctx, peer, tag = key
        try:
            return self._post_body(peer, ctx, tag, np.empty(nbytes, dtype=np.uint8))
        except Exception:  # noqa: BLE001 - the pair is gone: nothing to drop
            return []

    def _start_body(self, key: tuple, msg: _Msg, req: _Req) -> tuple[np.ndarray, Callable] | None:
        """Where a large body goes now that `req` takes it, and what completes `req` (None: nothing to receive:
        too long to drain, its stream closes).  Lock held."""
        peer, n, cap = msg.source, msg.nbytes, req.buf.size
        req.state = "matched"
        if n <= cap:
            return req.buf[:n], lambda why: self._complete(req, why, (peer, n))
        too_long = Truncated(
            f"rank {peer} sent {n} bytes (context {key[0]}, tag {key[2]}), longer than the {cap}-byte receive"
        )
        if n > DRAIN_BYTES:  # not worth the memory to consume: nothing more of this stream can be framed
            self.poisoned.add(key)
            self._complete(req, Truncated(f"{too_long}; the stream is closed"))
            return None
        return np.empty(n, dtype=np.uint8), lambda why: self._complete(req, why or too_long)

    def _arrived(self, key: tuple, msg: _Msg, why: str | None) -> None:
        """A large frame that `poll` fetched arrived (or failed).  Lock held."""
        if why:
            q = self.stash.get(key)
            if q and msg in q:
                q.remove(msg)
                if not q:
                    del self.stash[key]
            return
        msg.state = "here"

    def _deliver(self, source: int, data: np.ndarray, req: _Req) -> None:
        """Copy a message that is here into a receive and complete it.  Lock held."""
        n, cap = data.size, req.buf.size
        if n > cap:
            self._complete(req, Truncated(f"rank {source} sent {n} bytes, longer than the {cap}-byte receive"))
            return
        req.buf[:n] = data
        self._complete(req, None, (source, n))

    def _take_waiting(self, ctx: int, peer: int, tag: int) -> _Req | None:
        """The earliest posted receive that a message from `peer` matches (exact source or ANY).  Lock held."""
        best_key = None
        for key in ((ctx, peer, tag), (ctx, ANY_SOURCE, tag)):
            q = self.waiting.get(key)
            if q and (best_key is None or q[0].seq < self.waiting[best_key][0].seq):
                best_key = key
        if best_key is None:
            return None
        q = self.waiting[best_key]
        req = q.popleft()
        if not q:
            del self.waiting[best_key]
        return req

    def _take_stash(self, ctx: int, source: int, tag: int) -> tuple[_Msg, tuple] | None:
        """The first unclaimed message of stream (ctx, source, tag); for ANY_SOURCE the earliest of any source.
        A large frame `poll` is fetching is not yet claimable (None)."""
        if source == ANY_SOURCE:
            heads = [(q[0].seq, k) for k in ((ctx, s, tag) for s in range(self.size)) if (q := self.stash.get(k))]
            if not heads:
                return None
            key = min(heads)[1]
        else:
            key = (ctx, source, tag)
            if not self.stash.get(key):
                return None
        q = self.stash[key]
        if q[0].state == "arriving":
            return None
        msg = q.popleft()
        if not q:
            del self.stash[key]
        return msg, key

    def recv(self, ctx: int, source: int, tag: int, flat: np.ndarray, name: str) -> _Req:
        req = _Req("recv", next(self.seq), flat, ctx, source, tag)
        with self.lock:
            self._check_open(name)
            found = self._take_stash(ctx, source, tag)
            if found is None:
                if source != ANY_SOURCE and source in self.gone:
                    self._complete(req, self.gone[source])
                else:
                    self.waiting.setdefault((ctx, source, tag), deque()).append(req)
                return req
            msg, key = found
            if msg.state == "here":
                self._deliver(msg.source, msg.data, req)
                return req
            plan = self._start_body(key, msg, req)  # at_sender: fetch the body now
            if plan is not None:
                target, finish = plan
                try:
                    works = self._post_body(msg.source, ctx, tag, target)
                except Exception as e:  # noqa: BLE001 - the pair is gone
                    finish(_reason(e))
                    return req
                req.keep = target
                self._defer(("recv", *key), works, finish)
        return req

    def poll(self, ctx: int, source: int, tag: int, name: str) -> np.ndarray | None:
        key = (ctx, source, tag)
        with self.lock:
            self._check_open(name)
            q = self.stash.get(key)
            if not q or q[0].state == "arriving":
                return None
            msg = q[0]
            if msg.state == "at_sender":  # a frame too large to come with its header: fetch it, report it later
                if msg.nbytes > DRAIN_BYTES:
                    q.popleft()
                    self.poisoned.add(key)
                    raise ProtocolError(f"rank {source} announced a {msg.nbytes}-byte frame on {name}; refused")
                msg.state, msg.data = "arriving", _frame_buffer(msg.nbytes)
                try:
                    works = self._post_body(source, ctx, tag, msg.data)
                except Exception as e:  # noqa: BLE001 - the pair is gone
                    self._arrived(key, msg, _reason(e))
                    return None
                self._defer(("frame", *key), works, lambda why, m=msg: self._arrived(key, m, why))
                return None
            q.popleft()
            if not q:
                del self.stash[key]
        if msg.nbytes % 8:
            raise ProtocolError(f"rank {source} sent a {msg.nbytes}-byte frame on {name}, not int64 words")
        return msg.data.view(np.int64)

    def _lose(self, peer: int, why: str) -> None:
        """Nothing more will come from `peer`: fail the receives that wait for it alone."""
        with self.lock:
            self.gone.setdefault(peer, why)
            for key in [k for k in self.waiting if k[1] == peer]:
                for req in self.waiting.pop(key):
                    self._complete(req, why)
            self.lock.notify_all()

    # ------------------------------------------------------------------------------ sending
    def send(self, ctx: int, dest: int, tag: int, flat: np.ndarray, name: str) -> _Req:
        """Small messages go with their header in one gloo message and complete at once (the copy is the
        transport's); a large one's body goes on its own slot, before its header, and completes when gloo
        sent it, which is when the receiver took it."""
        req = _Req("send", next(self.seq), flat, ctx, dest, tag)
        n = flat.size
        work = None
        with self.lock:
            self._check_open(name)
            if dest == self.rank:
                self._send_to_self(ctx, tag, flat)
                self._complete(req, None)
                return req
            if dest in self.gone:
                self._complete(req, self.gone[dest])
                return req
            try:
                if n <= EAGER_BYTES:
                    msg = np.empty(HDR_BYTES + n, dtype=np.uint8)
                    msg[:HDR_BYTES].view(np.int64)[:] = (HDR_MAGIC, ctx, tag, n)
                    msg[HDR_BYTES:] = flat
                    self._post_header(dest, msg)
                    self._complete(req, None)
                    return req
                body = flat if flat.flags.writeable else flat.copy()  # torch.from_numpy wants it writeable
                work = self.pg.send([torch.from_numpy(body)], dest, _body_slot(ctx, tag))
                self._post_header(dest, np.array([HDR_MAGIC, ctx, tag, n], dtype=np.int64).view(np.uint8))
            except Exception as e:  # noqa: BLE001 - a pair gloo closed
                if work is not None:  # a body without its header: gloo may still hold it
                    self.leftover.append((work, body))
                self._complete(req, f"gloo could not send to rank {dest} on {name}: {_reason(e)}")
                return req
            req.keep = body
            self._defer(("send", dest, ctx, tag), [work], lambda why: self._complete(req, why))
        return req

    def _post_header(self, dest: int, msg: np.ndarray) -> None:
        """Send one header-slot message; its reaper keeps `msg` alive until gloo sent it.  Lock held."""
        work = self.pg.send([torch.from_numpy(msg)], dest, HDR_SLOT)
        self.outbox[dest].append((work, msg))
        self.outbox_cv[dest].notify()

    def _send_to_self(self, ctx: int, tag: int, flat: np.ndarray) -> None:
        """A message to this rank never touches gloo: deliver it, or keep a copy for the receive to come."""
        key = (ctx, self.rank, tag)
        req = None if self.stash.get(key) else self._take_waiting(ctx, self.rank, tag)
        if req is not None:
            self._deliver(self.rank, flat, req)
            return
        msg = _Msg(self.rank, flat.size, next(self.seq), "here", _frame_buffer(flat.size))
        msg.data[:] = flat
        self.stash.setdefault(key, deque()).append(msg)

    # ------------------------------------------------------------------------------ lifecycle
    def cancel(self, reqs: Sequence[_Req], abandon: bool) -> None:
        with self.lock:
            arriving = []
            for r in reqs:
                if r.kind == "recv" and r.state == "waiting":
                    q = self.waiting.get((r.ctx, r.source, r.tag))
                    if q is not None and r in q:
                        q.remove(r)
                    self._complete(r, None)
                elif r.kind == "recv" and r.state == "matched":
                    arriving.append(r)
                # a large send cannot be withdrawn from gloo; its stream's waiter keeps it until gloo sent it
                if not abandon:
                    r.reported = True
            if abandon:
                return
            deadline = time.monotonic() + CANCEL_WAIT_S
            while any(not r.done for r in arriving):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TransportError(
                        f"{self.label}: {sum(not r.done for r in arriving)} cancelled receive(s) whose message was "
                        f"already arriving did not complete within {CANCEL_WAIT_S:.0f}s"
                    )
                self.lock.wait(min(left, 0.1))

    def new_context(self) -> int:
        with self.lock:
            ctx = self.next_ctx
            if ctx >= MAX_CONTEXTS:
                raise TransportError(f"{self.label}: more than {MAX_CONTEXTS} contexts")
            self.next_ctx += 1
            return ctx

    def _check_open(self, name: str) -> None:
        if self.closed:
            raise TransportError(f"{name}: this transport is closed")

    def close(self) -> None:
        """Tell every peer this rank is done (its listener for us ends when the goodbye arrives), fail receives
        still waiting, and drop the large messages nobody will take, so the peers' sends of them complete."""
        with self.lock:
            if self.closed:
                return
            for q in self.waiting.values():
                for req in q:
                    self._complete(req, f"{self.label}: the transport was closed")
            self.waiting.clear()
            for key, q in self.stash.items():
                for msg in q:  # bodies left at their senders, in stream order
                    if msg.state == "at_sender" and key not in self.poisoned:
                        works = self._discard(key, msg.nbytes)
                        if works:
                            self._defer(("drop", *key), works, lambda why: None)
            self.stash.clear()
            for peer in range(self.size):
                if peer != self.rank and peer not in self.gone:
                    try:
                        self._post_header(peer, np.array([HDR_MAGIC, CLOSE, 0, 0], dtype=np.int64).view(np.uint8))
                    except Exception:  # noqa: BLE001 - a pair gloo closed already: that peer needs no goodbye
                        pass
            self.closed = True  # the reapers end once their goodbye is sent, idle waiters at once
            self.lock.notify_all()
            self.waiter_cv.notify_all()
            for cv in self.outbox_cv.values():
                cv.notify_all()

    def join(self, deadline: float) -> bool:
        """Wait (until `deadline`, monotonic) for this wire's threads to end; whether they all did."""
        while self.threads:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            th = next(iter(list(self.threads)), None)
            if th is not None:
                th.join(min(left, 0.2))
        return True


@atexit.register
def _drain_at_exit() -> None:
    """Close every wire and wait (bounded) until its threads ended.

    A Python thread that returns from gloo's wait while the interpreter finalizes aborts the process (on Python
    3.11 it is ended with pthread_exit, which cannot unwind through the C++ frames of the wait: "terminate called
    without an active exception").  So at exit every wire says goodbye to its peers and waits up to
    FLTORRENT_TORCH_EXIT_WAIT_S for theirs: once every rank closed, no thread is left inside gloo.
    """
    wires = list(_LIVE)
    for w in wires:
        try:
            w.close()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass
    deadline = time.monotonic() + EXIT_WAIT_S
    for w in wires:
        w.join(deadline)


class TorchTransport(Transport):
    """One context of a gloo-backed transport (see the module doc); build the root with `connect`."""

    def __init__(self, wire: _Wire, ctx: int, name: str):
        self._wire, self._ctx, self.name = wire, ctx, name
        self.rank, self.size = wire.rank, wire.size
        self._closed = False

    def __repr__(self) -> str:
        return f"TorchTransport({self.name!r}, rank={self.rank}, size={self.size}, context={self._ctx})"

    def _open(self) -> _Wire:
        if self._closed:
            raise TransportError(f"{self.name}: this transport is closed")
        return self._wire

    def _peer(self, peer: int, tag: int, what: str, any_ok: bool = False) -> None:
        if not (0 <= peer < self.size or (any_ok and peer == ANY_SOURCE)):
            raise TransportError(f"{self.name}: cannot {what} rank {peer} of a group of {self.size}")
        if not 0 <= tag < GATHER_TAG:
            raise TransportError(f"{self.name}: tag {tag} outside [0, {GATHER_TAG})")

    def dup(self, name: str) -> TorchTransport:
        return TorchTransport(self._wire, self._open().new_context(), name)

    def post_send(self, buf: np.ndarray, dest: int, tag: int) -> Request:
        self._peer(dest, tag, "send to")
        return self._open().send(self._ctx, dest, tag, _flat(buf, "send"), self.name)

    def post_recv(self, buf: np.ndarray, source: int, tag: int) -> Request:
        self._peer(source, tag, "receive from", any_ok=True)
        return self._open().recv(self._ctx, source, tag, _flat(buf, "receive"), self.name)

    def post_recv_status(self, buf: np.ndarray, source: int, tag: int) -> Request:
        return self.post_recv(buf, source, tag)

    def recv_status(self, req: Request) -> tuple[int, int]:
        if not isinstance(req, _Req) or req.got is None:
            raise TransportError(f"{self.name}: recv_status of a request that is not a completed receive")
        return req.got

    def test(self, reqs: Sequence[Request]) -> list[int]:
        out = []
        for i, r in enumerate(reqs):
            if not r.reported and r.done:
                r.reported = True
                out.append(i)
        return out

    def failed(self, req: Request) -> str | None:
        if isinstance(req, _Gather):
            for p in req.parts:
                why = p.why
                if why:
                    return f"all-gather: {why}"
                if p.kind == "recv" and p.got is not None and p.got[1] != req.nbytes:
                    return f"all-gather: rank {p.got[0]} contributed {p.got[1]} bytes, expected {req.nbytes}"
            return None
        why, req.why = req.why, None
        return why

    def cancel(self, reqs: Sequence[Request]) -> None:
        self._wire.cancel(self._parts(reqs), abandon=False)
        for r in reqs:
            r.reported = True

    def abandon(self, reqs: Sequence[Request]) -> None:
        self._wire.cancel(self._parts(reqs), abandon=True)

    @staticmethod
    def _parts(reqs: Sequence[Request]) -> list[_Req]:
        return [p for r in reqs for p in (r.parts if isinstance(r, _Gather) else [r])]

    def poll_frame(self, source: int, tag: int) -> np.ndarray | None:
        self._peer(source, tag, "poll")
        return self._open().poll(self._ctx, source, tag, self.name)

    def post_allgather(self, send: np.ndarray, recv: np.ndarray) -> Request:
        wire = self._open()
        flat = _flat(send, "send")
        rows = _flat(recv, "receive").reshape(self.size, -1) if recv.size else np.empty((self.size, 0), np.uint8)
        if rows.shape[1] != flat.size:
            raise TransportError(f"{self.name}: all-gather rows of {rows.shape[1]} bytes for {flat.size}-byte inputs")
        rows[self.rank] = flat
        parts = [wire.recv(self._ctx, r, GATHER_TAG, rows[r], self.name) for r in range(self.size) if r != self.rank]
        parts += [wire.send(self._ctx, r, GATHER_TAG, flat, self.name) for r in range(self.size) if r != self.rank]
        return _Gather(parts, flat.size)

    def local_size(self) -> int:
        hosts = self._wire.hosts
        return sum(h == hosts[self.rank] for h in hosts)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._ctx == 0:
            self._wire.close()


def connect(store: Any, rank: int, size: int, *, timeout_s: float, name: str = "world") -> TorchTransport:
    """The root TorchTransport of `size` ranks that share `store` (collective; bounded by `timeout_s`).

    `name` keys this transport's entries in the store: it must be the same on every rank and new for the store
    (torch gives each process group a store of its own, so "world" suits a group's one transport).
    """
    import torch.distributed as dist

    if not 0 <= rank < size:
        raise TransportError(f"torch transport {name}: rank {rank} outside a group of {size}")
    prefix = dist.PrefixStore(f"fltorrent/torch/{name}/", store)
    keys = [f"host/{r}" for r in range(size)]
    prefix.set(keys[rank], socket.gethostname())
    try:
        prefix.wait(keys, timedelta(seconds=timeout_s))
    except Exception as e:  # torch raises DistStoreError or RuntimeError on timeout
        missing = [r for r in range(size) if not prefix.check([keys[r]])]
        raise PeerTimeoutError(
            f"fltorrent torch transport {name}: rank(s) {missing} did not arrive within {timeout_s:.0f}s"
        ) from e
    hosts = [prefix.get(k).decode() for k in keys]
    pg = None
    if size > 1:
        box: dict[str, Any] = {}

        def build() -> None:
            try:
                box["pg"] = dist.ProcessGroupGloo(dist.PrefixStore("gloo/", prefix), rank, size, GLOO_TIMEOUT)
            except Exception as e:  # noqa: BLE001 - reported below, on the caller's thread
                box["error"] = e

        th = threading.Thread(target=build, daemon=True, name=f"fltorrent-{name}-connect")
        th.start()
        th.join(timeout_s)  # gloo's own connect would wait for the 30-day timeout
        if th.is_alive():
            raise PeerTimeoutError(f"fltorrent torch transport {name}: gloo did not connect within {timeout_s:.0f}s")
        if "error" in box:
            raise TransportError(f"fltorrent torch transport {name}: gloo could not connect: {box['error']}")
        pg = box["pg"]
    return TorchTransport(_Wire(pg, rank, size, hosts, name), 0, name)
