"""Every int64 control frame a rank reads from another rank, validated and decoded at the boundary.

Pure functions (no I/O, no MPI): each takes the words that arrived plus what the reader knows (who sent them,
the round, the stage it expects, n peers and K chunks per peer) and returns a small typed result, or raises
`ProtocolError` naming the sender, the round, the stage and what was wrong.  Nothing else escapes them for
any input: counts are checked against the frame's length before anything is sliced or allocated, so a
length of 2**63 - 1 costs nothing, and all arithmetic on announced values is done on Python ints.

Headers are (MAGIC, round, stage, kind) for tracker frames and (MAGIC, round, stage, code) for neighbour
frames.  A frame of an earlier round, or of an earlier stage of this round, is stale (`StaleFrame`, a
`ProtocolError`): a late or replayed frame that the reader may discard while it keeps waiting.  A wrong
magic, a future round or stage, or a wrong kind or code is a bad frame (`ProtocolError`).

Layouts (after the 4-word header; n peers, K chunks each, N = n*K chunk ids, W(x) = ceil(x / 64) words):

    directive   tracker -> peer   ns, nr, s_to[ns], s_chunk[ns], r_from[nr], r_chunk[nr], r_kind[nr]
    BT stage    tracker -> peer   n, active bits[W(n)], may-send bits[W(n)]
    end         tracker -> peer   stages, s_bt, warm_us, failed_open, agreed[n], left[n]
    report      peer -> tracker   nr, ok[nr], tail...                          (a directed stage)
    BT report   peer -> tracker   nr, senders[nr], chunks[nr], ok[nr], tail...
                                  tail: s for each sender the reporter banned, n + s for each sender whose
                                  directed data never came though the tracker moved on (the tracker decides)
    bitfield    neighbours        have bits[W(N)]
    budget      neighbours        upload left (1 word)
    ask         neighbours        missing, chunk ids...
    grant       neighbours        one 0/1 flag per chunk asked (empty: no ask reached the granter in time)
    keep        neighbours        one 0/1 flag per chunk asked (a subset of the grants)
    have        neighbours        flags, then chunk ids received and verified this stage, or (flag FULL)
                                  have bits[W(N)]: everything the neighbour holds; flag WANT: "I lack your
                                  have set, send me a FULL frame" (bitfield resync)

Pipelined BitTorrent (`bt_decisions="pipelined"`, runtime/bt_pipeline.py): no stage clock; every frame's
stage word is the stage the phase opened at, its kinds and neighbour codes are distinct from the ones above.

    open        tracker -> peer   seq (0: open, k >= 1: the k-th update), n, window, budget_ms,
                                  active bits[W(n)], may-send bits[W(n)], exposed bits[W(n)]
    progress    peer -> tracker   seq, status (RUNNING, DONE, STUCK), base (entries reported before), nr,
                                  senders[nr], chunks[nr], ok[nr], t_us[nr] (non-decreasing), tail (as a report)
    neighbour frames, one tag, (MAGIC, round, stage, code) + body:
      PIPE_BITFIELD   seq, have bits[W(N)], once, when the phase opens
      PIPE_HAVE       seq, chunk ids verified since my last have frame (none: a keep-alive)
      PIPE_WANT       (empty) I lack your whole have set (no bitfield, or a gap in your seqs): send PIPE_FULL
      PIPE_FULL       seq, have bits[W(N)]: everything I hold, the answer to a want
      PIPE_REQUEST    (q, chunk) pairs: send me `chunk` on the data tag of request number q
      PIPE_CANCEL     request numbers I no longer need (endgame duplicates)
      PIPE_NOPE       request numbers I will not serve (refused, or cancelled before they were sent)
    seq numbers a sender's bitfield, have and full frames to one neighbour 0, 1, 2, ... in the phase, so the
    receiver sees a lost one as a gap (bitfield resync, as HAVE_WANT / HAVE_FULL in the stage mode).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import numpy as np

from ..errors import ProtocolError, StaleFrameError
from ..swarm.stage import BT, SPRAY, WARMUP
from ..transport.base import MAGIC

StaleFrame = StaleFrameError  # the name callers read: "discard it, keep waiting"

KIND_DIRECTIVE, KIND_REPORT, KIND_END, KIND_BT_STAGE = 1, 2, 3, 4
KIND_PIPE_OPEN, KIND_PIPE_REPORT = 6, 7  # pipelined BitTorrent (5 is the engine's end confirmation)
PIPE_BITFIELD, PIPE_HAVE, PIPE_CANCEL, PIPE_REQUEST, PIPE_NOPE = 40, 41, 42, 43, 44  # above every stage code
PIPE_WANT, PIPE_FULL = 45, 46  # pipelined bitfield resync
PIPE_CODES = (PIPE_BITFIELD, PIPE_HAVE, PIPE_CANCEL, PIPE_REQUEST, PIPE_NOPE, PIPE_WANT, PIPE_FULL)
RUNNING, DONE, STUCK = 0, 1, 2  # a progress report's status
MAX_WINDOW = 1 << 10  # the largest request window an open frame may set
MAX_SEQ = 1 << 62  # request and report numbers stay far from int64 overflow
HAVE_WANT, HAVE_FULL = 1, 2  # have-frame flags: send me your full have set / this frame carries mine
HEAD = 4  # header words: MAGIC, round, stage, kind (or neighbour code)
PHASES = (SPRAY, WARMUP, BT)
_INT64 = np.dtype(np.int64)


# ---------------------------------------------------------------------------------------------- results
class Header(NamedTuple):
    round: int
    stage: int
    kind: int  # a tracker frame's kind or a neighbour frame's code


class Directive(NamedTuple):
    stage: int
    s_to: np.ndarray  # int64 [ns] receivers of my sends
    s_chunk: np.ndarray  # int64 [ns]
    r_from: np.ndarray  # int64 [nr] senders of my receives
    r_chunk: np.ndarray  # int64 [nr]
    r_kind: np.ndarray  # int64 [nr] phase codes (SPRAY, WARMUP, BT)


class BTStage(NamedTuple):
    stage: int
    active: np.ndarray  # bool [n]
    can_send: np.ndarray  # bool [n]
    exposed: np.ndarray  # bool [n]: hidden-protocol owners that now hold their own update publicly


class End(NamedTuple):
    stage: int
    stages: int
    s_bt: int
    warm_us: int
    failed_open: bool
    agreed: np.ndarray  # bool [n]
    left: np.ndarray  # bool [n]


class Report(NamedTuple):
    stage: int
    ok: np.ndarray  # bool [nr], in the order of the directive's receives
    banned: np.ndarray  # int64: senders the reporter banned (the round so far)
    unserved: np.ndarray  # int64: senders whose directed data never reached the reporter (the round so far)


class BTReport(NamedTuple):
    stage: int
    senders: np.ndarray  # int64 [nr]
    chunks: np.ndarray  # int64 [nr]
    ok: np.ndarray  # bool [nr]
    banned: np.ndarray  # int64
    unserved: np.ndarray  # int64


class PipeOpen(NamedTuple):
    stage: int  # the stage the pipelined phase opened at
    seq: int  # 0: the open frame; k >= 1: the k-th update (peers left, owners exposed, lags over)
    window: int  # requests a peer keeps outstanding per neighbour
    budget_s: float  # how long the tracker gives the phase
    active: np.ndarray  # bool [n]
    can_send: np.ndarray  # bool [n]
    exposed: np.ndarray  # bool [n]


class PipeReport(NamedTuple):
    stage: int
    seq: int
    status: int  # RUNNING, DONE or STUCK
    base: int  # receive-log entries the peer reported before this frame
    senders: np.ndarray  # int64 [nr]
    chunks: np.ndarray  # int64 [nr]
    ok: np.ndarray  # bool [nr]
    t_us: np.ndarray  # int64 [nr]: microseconds since the peer's round start, non-decreasing (the log's order)
    banned: np.ndarray  # int64
    unserved: np.ndarray  # int64


class PipeHave(NamedTuple):
    seq: int  # the sender's have-frame number to me (bitfield 0, then every have or full frame)
    chunks: np.ndarray  # int64: chunks announced (a have frame's delta, or all the sender holds)


class PipeRequest(NamedTuple):
    seqs: np.ndarray  # int64: request numbers (the data tag each chunk comes on)
    chunks: np.ndarray  # int64


class Bitfield(NamedTuple):
    have: np.ndarray  # bool [N]
    chunks: np.ndarray  # int64: flatnonzero(have)


class Have(NamedTuple):
    chunks: np.ndarray  # int64: chunks the neighbour announces (this stage's delta, or all it holds if full)
    full: bool  # the frame carries the neighbour's whole have set (a bitfield), not a delta
    want: bool  # the neighbour lacks my have set: my next have frame to it must be full


class Ask(NamedTuple):
    missing: int  # what the requester announces it misses
    chunks: np.ndarray  # int64, in the requester's order


# ---------------------------------------------------------------------------------------------- helpers
def _where(sender: int, round_id: int, stage, what: str) -> str:
    st = "?" if stage is None else stage
    return f"rank {sender} round {round_id} stage {st}: {what} frame"


def _words(frame, where: str) -> np.ndarray:
    """The frame as a 1-D int64 array, or ProtocolError."""
    if isinstance(frame, np.ndarray):
        a = frame
    else:
        try:
            a = np.asarray(frame)
        except Exception as e:  # a ragged or otherwise unconvertible object: never a frame of ours
            raise ProtocolError(f"{where} is not an int64 array ({type(e).__name__})") from None
    if a.ndim != 1:
        raise ProtocolError(f"{where} is not a flat int64 array (shape {a.shape})")
    if a.dtype != _INT64:
        if a.size == 0 or a.dtype.kind not in "iub":
            if a.size:
                raise ProtocolError(f"{where} has dtype {a.dtype}, not int64")
            return np.zeros(0, dtype=np.int64)
        if a.dtype.kind == "u" and a.size and int(a.max()) > np.iinfo(np.int64).max:
            raise ProtocolError(f"{where} has words beyond int64")
        a = a.astype(np.int64)
    return a


def _in_range(x: np.ndarray, lo: int, hi: int) -> bool:
    """Every value in [lo, hi)."""
    return bool(x.size == 0 or (int(x.min()) >= lo and int(x.max()) < hi))


def _flags(x: np.ndarray, where: str, what: str) -> np.ndarray:
    if x.size and not np.all((x == 0) | (x == 1)):
        bad = int(np.flatnonzero((x != 0) & (x != 1))[0])
        raise ProtocolError(f"{where}: {what} word {bad} is {int(x[bad])}, not 0 or 1")
    return x.astype(bool)


def _ids(x: np.ndarray, hi: int, where: str, what: str, unique: bool = False) -> np.ndarray:
    if not _in_range(x, 0, hi):
        bad = x[(x < 0) | (x >= hi)]
        raise ProtocolError(f"{where}: {what} {int(bad[0])} outside 0..{hi - 1}")
    if unique and x.size > 1 and np.unique(x).size != x.size:
        u, c = np.unique(x, return_counts=True)
        raise ProtocolError(f"{where}: {what} {int(u[c > 1][0])} appears more than once")
    return x


def _bits(words: np.ndarray, size: int, where: str, what: str) -> np.ndarray:
    """Bit-packed words (pack_bits layout) -> bool [size]; bits beyond `size` must be 0."""
    raw = np.ascontiguousarray(words).view("<u8").view(np.uint8)
    bits = np.unpackbits(raw, bitorder="little")
    if bits[size:].any():
        raise ProtocolError(f"{where}: {what} sets bits beyond {size}")
    return bits[:size].astype(bool)


def _masks(words: np.ndarray, n: int, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The active, may-send and exposed masks (W(n) words each) that stage and open frames end with."""
    W = _n_words(n)
    names = ("active mask", "may-send mask", "exposed mask")
    return tuple(_bits(words[i * W : (i + 1) * W], n, where, names[i]) for i in range(3))


def _n_words(bits: int) -> int:
    return (bits + 63) // 64


def _banned(tail: np.ndarray, n: int, reporter: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """A report's tail -> (banned senders, unserved senders): s is a ban, n + s an unserved directed transfer;
    each value at most once, never the reporter itself."""
    _ids(tail, 2 * n, where, "banned or unserved sender", unique=True)
    if tail.size and np.any(tail % n == reporter):
        raise ProtocolError(f"{where}: the reporter names itself as a banned or unserved sender")
    return tail[tail < n], tail[tail >= n] - n


# ---------------------------------------------------------------------------------------------- headers
def parse_header(
    frame,
    *,
    sender: int,
    round_id: int,
    kinds: int | Iterable[int],
    stage: int | None = None,
    min_stage: int = 0,
    what: str = "control",
) -> Header:
    """Check a (MAGIC, round, stage, kind) header.

    `stage`: the one stage the reader expects (earlier -> StaleFrame, later -> ProtocolError); without it
    the frame's stage must be >= `min_stage` (earlier -> StaleFrame).  A round before `round_id` is stale,
    one after it bad.  Staleness is decided before the kind: an old frame is discarded whatever it says.
    """
    where = _where(sender, round_id, stage, what)
    msg = _words(frame, where)
    if msg.size < HEAD:
        raise ProtocolError(f"{where} has {msg.size} words, shorter than its {HEAD}-word header")
    magic, rnd, st, kind = (int(x) for x in msg[:HEAD])
    if magic != MAGIC:
        raise ProtocolError(f"{where} has magic {magic:#x}, want {MAGIC:#x}")
    where = _where(sender, round_id, st, what)
    if rnd < round_id:
        raise StaleFrame(f"{where} is of an earlier round {rnd}")
    if rnd > round_id:
        raise ProtocolError(f"{where} is of a future round {rnd}")
    if st < 0:
        raise ProtocolError(f"{where} names a negative stage")
    if stage is not None:
        if st < stage:
            raise StaleFrame(f"{where} is of an earlier stage (want stage {stage})")
        if st > stage:
            raise ProtocolError(f"{where} is of a future stage (want stage {stage})")
    elif st < min_stage:
        raise StaleFrame(f"{where} is of an earlier stage (want stage >= {min_stage})")
    allowed = (kinds,) if isinstance(kinds, int) else tuple(kinds)
    if kind not in allowed:
        raise ProtocolError(f"{where} has kind {kind}, want {' or '.join(map(str, allowed))}")
    return Header(rnd, st, kind)


def parse_neighbour_header(frame, *, sender: int, round_id: int, stage: int, code: int) -> np.ndarray:
    """A neighbour frame (MAGIC, round, stage, code) + body: returns the body (int64) once the header is this
    round's, this stage's and this code's; StaleFrame for an earlier round or stage, ProtocolError otherwise."""
    where = _where(sender, round_id, stage, f"neighbour (code {code})")
    msg = _words(frame, where)
    parse_header(msg, sender=sender, round_id=round_id, kinds=code, stage=stage, what=f"neighbour (code {code})")
    return msg[HEAD:]


# ---------------------------------------------------------------------------------------------- tracker -> peer
def parse_directive(
    frame,
    *,
    sender: int,
    round_id: int,
    n: int,
    K: int,
    me: int | None = None,
    stage: int | None = None,
    min_stage: int = 0,
    own_ok: bool = False,
) -> Directive:
    """A tracker-decided stage's directive for peer `me` (its sends and receives).  Peers in 0..n-1 (never
    `me`), chunks in 0..n*K-1 (never one of `me`'s own to receive, except, with `own_ok` (hidden protocol),
    outside the seed stages), phase codes, counts that add up to the length, and no (sender, chunk) receive
    twice (nor a (receiver, chunk) send)."""
    what = "directive"
    h = parse_header(
        frame, sender=sender, round_id=round_id, kinds=KIND_DIRECTIVE, stage=stage, min_stage=min_stage, what=what
    )
    where = _where(sender, round_id, h.stage, what)
    msg = _words(frame, where)
    if msg.size < HEAD + 2:
        raise ProtocolError(f"{where} has {msg.size} words, no room for its counts")
    ns, nr = int(msg[4]), int(msg[5])
    if ns < 0 or nr < 0:
        raise ProtocolError(f"{where} announces {ns} sends and {nr} receives")
    body = msg[HEAD + 2 :]
    if body.size != 2 * ns + 3 * nr:
        raise ProtocolError(f"{where} body has {body.size} words, {ns} sends and {nr} receives need {2 * ns + 3 * nr}")
    N = n * K
    s_to, s_chunk = body[:ns], body[ns : 2 * ns]
    r_from, r_chunk, r_kind = body[2 * ns : 2 * ns + nr], body[2 * ns + nr : 2 * ns + 2 * nr], body[2 * ns + 2 * nr :]
    _ids(s_to, n, where, "send to peer")
    _ids(r_from, n, where, "receive from peer")
    _ids(s_chunk, N, where, "send of chunk")
    _ids(r_chunk, N, where, "receive of chunk")
    if r_kind.size and not np.all(np.isin(r_kind, PHASES)):
        bad = int(r_kind[~np.isin(r_kind, PHASES)][0])
        raise ProtocolError(f"{where}: receive of phase {bad}, not one of {PHASES}")
    if me is not None:
        if np.any(s_to == me) or np.any(r_from == me):
            raise ProtocolError(f"{where}: a transfer between rank {me} and itself")
        if r_chunk.size and np.any((r_chunk // K == me) & ((r_kind == SPRAY) | (not own_ok))):
            raise ProtocolError(f"{where}: rank {me} is to receive a chunk of its own update")
    _ids(r_from * N + r_chunk, n * N, where, "(sender, chunk) receive", unique=True)
    _ids(s_to * N + s_chunk, n * N, where, "(receiver, chunk) send", unique=True)
    return Directive(h.stage, s_to, s_chunk, r_from, r_chunk, r_kind)


def parse_bt_stage(
    frame, *, sender: int, round_id: int, n: int, stage: int | None = None, min_stage: int = 0
) -> BTStage:
    """A peer-decided BitTorrent stage's clock frame: n, then the active, may-send and exposed masks (W(n)
    words each)."""
    what = "BitTorrent stage"
    h = parse_header(
        frame, sender=sender, round_id=round_id, kinds=KIND_BT_STAGE, stage=stage, min_stage=min_stage, what=what
    )
    where = _where(sender, round_id, h.stage, what)
    msg = _words(frame, where)
    W = _n_words(n)
    if msg.size != HEAD + 1 + 3 * W:
        raise ProtocolError(f"{where} has {msg.size} words, want {HEAD + 1 + 3 * W}")
    if int(msg[4]) != n:
        raise ProtocolError(f"{where} is for {int(msg[4])} peers, the round has {n}")
    return BTStage(h.stage, *_masks(msg[5:], n, where))


def parse_end(frame, *, sender: int, round_id: int, n: int, min_stage: int = 0) -> End:
    """The end-of-round frame: stages, s_bt, warm_us, failed_open, agreed[n], left[n] (flags 0/1)."""
    what = "end"
    h = parse_header(frame, sender=sender, round_id=round_id, kinds=KIND_END, min_stage=min_stage, what=what)
    where = _where(sender, round_id, h.stage, what)
    msg = _words(frame, where)
    if msg.size != HEAD + 4 + 2 * n:
        raise ProtocolError(f"{where} has {msg.size} words, want {HEAD + 4 + 2 * n}")
    stages, s_bt, warm_us, failed = (int(x) for x in msg[4:8])
    if stages != h.stage:
        raise ProtocolError(f"{where} counts {stages} stages, its header says {h.stage}")
    if not 0 <= s_bt <= stages:
        raise ProtocolError(f"{where}: BitTorrent start {s_bt} outside 0..{stages}")
    if warm_us < 0:
        raise ProtocolError(f"{where}: warm-up time {warm_us} us is negative")
    if failed not in (0, 1):
        raise ProtocolError(f"{where}: failed-open flag {failed}, not 0 or 1")
    agreed = _flags(msg[8 : 8 + n], where, "agreed")
    left = _flags(msg[8 + n :], where, "left")
    return End(h.stage, stages, s_bt, warm_us, bool(failed), agreed, left)


# ---------------------------------------------------------------------------------------------- peer -> tracker
def _counted_report(frame, sender: int, round_id: int, stage: int | None, what: str):
    """The part both report readers share: header, where, words, and the receive count after the header."""
    h = parse_header(frame, sender=sender, round_id=round_id, kinds=KIND_REPORT, stage=stage, what=what)
    where = _where(sender, round_id, h.stage, what)
    msg = _words(frame, where)
    if msg.size < HEAD + 1:
        raise ProtocolError(f"{where} has {msg.size} words, no room for its count")
    return h, where, msg, int(msg[4])


def parse_report(frame, *, sender: int, round_id: int, n: int, expected: int, stage: int | None = None) -> Report:
    """A directed stage's report: nr (== `expected`, the receives the tracker told `sender` of), ok[nr] (0/1),
    then the tail: senders `sender` banned (s) and whose directed data never came (n + s), distinct, not itself."""
    what = "report"
    h, where, msg, nr = _counted_report(frame, sender, round_id, stage, what)
    if nr != expected:
        raise ProtocolError(f"{where} reports {nr} receives, expected {expected}")
    if msg.size < HEAD + 1 + nr:
        raise ProtocolError(f"{where} has {msg.size} words, {nr} receives need {HEAD + 1 + nr}")
    ok = _flags(msg[5 : 5 + nr], where, "delivered")
    return Report(h.stage, ok, *_banned(msg[5 + nr :], n, sender, where))


def parse_bt_report(
    frame, *, sender: int, round_id: int, n: int, K: int, stage: int | None = None, own_ok: bool = False
) -> BTReport:
    """A peer-decided stage's report: nr, senders[nr], chunks[nr], ok[nr], then the tail (as in a report).
    Senders are peers other than `sender`; chunks are in the round and not `sender`'s own (unless `own_ok`: the
    hidden protocol, where an owner downloads its update back); no chunk arrived twice."""
    what = "BitTorrent report"
    h, where, msg, nr = _counted_report(frame, sender, round_id, stage, what)
    if nr < 0:
        raise ProtocolError(f"{where} reports {nr} receives")
    if msg.size < HEAD + 1 + 3 * nr:
        raise ProtocolError(f"{where} has {msg.size} words, {nr} receives need {HEAD + 1 + 3 * nr}")
    s, c = msg[5 : 5 + nr], msg[5 + nr : 5 + 2 * nr]
    _ids(s, n, where, "sender")
    if np.any(s == sender):
        raise ProtocolError(f"{where}: rank {sender} reports a receive from itself")
    _ids(c, n * K, where, "chunk")
    if c.size and not own_ok and np.any(c // K == sender):
        raise ProtocolError(f"{where}: rank {sender} reports receiving a chunk of its own update")
    ok = _flags(msg[5 + 2 * nr : 5 + 3 * nr], where, "ok")
    _ids(c[ok], n * K, where, "delivered chunk", unique=True)
    return BTReport(h.stage, s, c, ok, *_banned(msg[5 + 3 * nr :], n, sender, where))


# ---------------------------------------------------------------------------------------------- neighbours
# Bodies of neighbour frames (the header already stripped by parse_neighbour_header / NeighbourLink).
def parse_bitfield(body, *, sender: int, round_id: int, stage: int, N: int) -> Bitfield:
    """Exactly W(N) words of have bits; bits beyond N are 0."""
    where = _where(sender, round_id, stage, "bitfield")
    b = _words(body, where)
    W = _n_words(N)
    if b.size != W:
        raise ProtocolError(f"{where} has {b.size} words, expected {W}")
    have = _bits(b, N, where, "bitfield")
    return Bitfield(have, np.flatnonzero(have).astype(np.int64))


def parse_budget(body, *, sender: int, round_id: int, stage: int, max_value: int | None = None) -> int:
    """One word: the upload the neighbour has left (>= 0, and <= `max_value`, its whole budget, if given)."""
    where = _where(sender, round_id, stage, "budget")
    b = _words(body, where)
    if b.size != 1:
        raise ProtocolError(f"{where} has {b.size} words, expected 1")
    v = int(b[0])
    if v < 0 or (max_value is not None and v > max_value):
        raise ProtocolError(f"{where}: upload left {v} outside 0..{max_value if max_value is not None else 'inf'}")
    return v


def parse_ask(body, *, sender: int, round_id: int, stage: int, N: int, max_count: int) -> Ask:
    """The missing count the requester announces (0..N), then the chunks it asks of me: ids in 0..N-1, no
    duplicates, at most `max_count` of them (the requester's download budget, at most N) and no more than it
    says it misses.  An ask over the bound is a violation, never truncated."""
    where = _where(sender, round_id, stage, "ask")
    b = _words(body, where)
    if b.size < 1:
        raise ProtocolError(f"{where} is empty, no missing count")
    missing = int(b[0])
    if not 0 <= missing <= N:
        raise ProtocolError(f"{where}: announced missing count {missing} outside 0..{N}")
    chunks = b[1:]
    bound = min(int(max_count), N, missing)
    if chunks.size > bound:
        raise ProtocolError(
            f"{where} asks for {chunks.size} chunks, over its bound {bound} (budget {max_count}, missing {missing})"
        )
    _ids(chunks, N, where, "asked chunk", unique=True)
    return Ask(missing, chunks)


def parse_grant(body, *, sender: int, round_id: int, stage: int, asked: int) -> np.ndarray:
    """One 0/1 flag per chunk I asked of `sender` (exactly `asked` words); returns bool [asked].  An empty frame
    says that none of my asks reached `sender` before its exchange deadline: every request refused, not a
    violation (a late ask is the asker's delay, never the granter's fault)."""
    where = _where(sender, round_id, stage, "grant")
    b = _words(body, where)
    if b.size == 0:
        return np.zeros(max(0, int(asked)), dtype=bool)
    if b.size != asked:
        raise ProtocolError(f"{where} has {b.size} flags, {asked} chunks were asked")
    return _flags(b, where, "grant")


def parse_keep(body, *, sender: int, round_id: int, stage: int, granted: np.ndarray) -> np.ndarray:
    """One 0/1 flag per chunk `sender` asked of me (as many as my grant frame had), kept only where granted."""
    where = _where(sender, round_id, stage, "keep")
    b = _words(body, where)
    g = np.asarray(granted, dtype=bool).reshape(-1)
    if b.size != g.size:
        raise ProtocolError(f"{where} has {b.size} flags, the grant had {g.size}")
    k = _flags(b, where, "keep")
    if np.any(k & ~g):
        raise ProtocolError(f"{where} keeps chunk {int(np.flatnonzero(k & ~g)[0])}, which was not granted")
    return k


def parse_have(body, *, sender: int, round_id: int, stage: int, N: int) -> Have:
    """A flags word (HAVE_WANT | HAVE_FULL, nothing else), then either the chunks the neighbour received and
    verified this stage (ids in 0..N-1, no duplicates) or, with HAVE_FULL, exactly W(N) words of have bits
    (bits beyond N are 0): everything it holds, sent because I asked (HAVE_WANT in my last have frame)."""
    where = _where(sender, round_id, stage, "have")
    b = _words(body, where)
    if b.size < 1:
        raise ProtocolError(f"{where} is empty, no flags word")
    flags = int(b[0])
    if flags & ~(HAVE_WANT | HAVE_FULL):
        raise ProtocolError(f"{where}: flags {flags} outside 0..{HAVE_WANT | HAVE_FULL}")
    rest = b[1:]
    if flags & HAVE_FULL:
        if rest.size != _n_words(N):
            raise ProtocolError(f"{where} has {rest.size} have-bit words, expected {_n_words(N)}")
        chunks = np.flatnonzero(_bits(rest, N, where, "full have set")).astype(np.int64)
    else:
        chunks = _ids(rest, N, where, "chunk", unique=True)
    return Have(chunks, bool(flags & HAVE_FULL), bool(flags & HAVE_WANT))


# ---------------------------------------------------------------------------------------------- pipelined BitTorrent
def parse_pipe_open(
    frame, *, sender: int, round_id: int, n: int, stage: int | None = None, min_stage: int = 0
) -> PipeOpen:
    """The tracker's open (seq 0) or update (seq >= 1) frame of a pipelined phase: seq, n, window (1..MAX_WINDOW),
    budget_ms (>= 0), then the active, may-send and exposed masks (W(n) words each)."""
    what = "pipelined open"
    h = parse_header(
        frame, sender=sender, round_id=round_id, kinds=KIND_PIPE_OPEN, stage=stage, min_stage=min_stage, what=what
    )
    where = _where(sender, round_id, h.stage, what)
    msg = _words(frame, where)
    W = _n_words(n)
    if msg.size != HEAD + 4 + 3 * W:
        raise ProtocolError(f"{where} has {msg.size} words, want {HEAD + 4 + 3 * W}")
    seq, nn, window, budget = (int(x) for x in msg[HEAD : HEAD + 4])
    if not 0 <= seq < MAX_SEQ:
        raise ProtocolError(f"{where}: update number {seq} outside 0..{MAX_SEQ - 1}")
    if nn != n:
        raise ProtocolError(f"{where} is for {nn} peers, the round has {n}")
    if not 1 <= window <= MAX_WINDOW:
        raise ProtocolError(f"{where}: request window {window} outside 1..{MAX_WINDOW}")
    if not 0 <= budget < MAX_SEQ:
        raise ProtocolError(f"{where}: budget {budget} ms is negative or absurd")
    return PipeOpen(h.stage, seq, window, budget / 1e3, *_masks(msg[HEAD + 4 :], n, where))


def parse_pipe_report(
    frame, *, sender: int, round_id: int, n: int, K: int, stage: int | None = None, own_ok: bool = False
) -> PipeReport:
    """A pipelined phase's progress report: seq, status, base, nr, senders[nr], chunks[nr], ok[nr], t_us[nr], then
    the tail (as in a report).  Senders are peers other than `sender`, chunks in the round and not `sender`'s own
    (unless `own_ok`: the hidden protocol), t_us >= 0 and non-decreasing, no chunk delivered twice in the frame
    (across frames the reader checks: it knows what came before)."""
    what = "pipelined progress report"
    h = parse_header(frame, sender=sender, round_id=round_id, kinds=KIND_PIPE_REPORT, stage=stage, what=what)
    where = _where(sender, round_id, h.stage, what)
    msg = _words(frame, where)
    if msg.size < HEAD + 4:
        raise ProtocolError(f"{where} has {msg.size} words, no room for its counts")
    seq, status, base, nr = (int(x) for x in msg[HEAD : HEAD + 4])
    if not 0 <= seq < MAX_SEQ:
        raise ProtocolError(f"{where}: report number {seq} outside 0..{MAX_SEQ - 1}")
    if status not in (RUNNING, DONE, STUCK):
        raise ProtocolError(f"{where}: status {status}, not {RUNNING}, {DONE} or {STUCK}")
    if not 0 <= base < MAX_SEQ:
        raise ProtocolError(f"{where}: {base} entries reported before")
    if nr < 0 or msg.size < HEAD + 4 + 4 * nr:
        raise ProtocolError(f"{where} has {msg.size} words, {nr} receives need {HEAD + 4 + 4 * max(nr, 0)}")
    b = HEAD + 4
    s, c, t = msg[b : b + nr], msg[b + nr : b + 2 * nr], msg[b + 3 * nr : b + 4 * nr]
    _ids(s, n, where, "sender")
    if np.any(s == sender):
        raise ProtocolError(f"{where}: rank {sender} reports a receive from itself")
    _ids(c, n * K, where, "chunk")
    if c.size and not own_ok and np.any(c // K == sender):
        raise ProtocolError(f"{where}: rank {sender} reports receiving a chunk of its own update")
    ok = _flags(msg[b + 2 * nr : b + 3 * nr], where, "ok")
    _ids(c[ok], n * K, where, "delivered chunk", unique=True)
    if not _in_range(t, 0, MAX_SEQ) or (t.size > 1 and np.any(t[1:] < t[:-1])):
        raise ProtocolError(f"{where}: receive times are negative, absurd or out of order")
    return PipeReport(h.stage, seq, status, base, s, c, ok, t, *_banned(msg[b + 4 * nr :], n, sender, where))


def parse_pipe_header(frame, *, sender: int, round_id: int, stage: int) -> tuple[int, np.ndarray]:
    """A pipelined neighbour frame (MAGIC, round, stage, code) + body: (code, body) once the header is this round's
    and phase's and the code one of PIPE_CODES; StaleFrame for an earlier round or phase, ProtocolError otherwise."""
    what = "pipelined neighbour"
    where = _where(sender, round_id, stage, what)
    msg = _words(frame, where)
    h = parse_header(msg, sender=sender, round_id=round_id, kinds=PIPE_CODES, stage=stage, what=what)
    return h.kind, msg[HEAD:]


def _pipe_seq(b: np.ndarray, where: str) -> int:
    if b.size < 1:
        raise ProtocolError(f"{where} is empty, no sequence number")
    seq = int(b[0])
    if not 0 <= seq < MAX_SEQ:
        raise ProtocolError(f"{where}: sequence number {seq} outside 0..{MAX_SEQ - 1}")
    return seq


def parse_pipe_have(body, *, sender: int, round_id: int, stage: int, N: int) -> PipeHave:
    """A sequence number (0..MAX_SEQ-1), then the chunk ids the neighbour verified since its last have frame: in
    0..N-1, no duplicates (none: a keep-alive)."""
    where = _where(sender, round_id, stage, "pipelined have")
    b = _words(body, where)
    seq = _pipe_seq(b, where)
    return PipeHave(seq, _ids(b[1:], N, where, "chunk", unique=True))


def parse_pipe_full(body, *, sender: int, round_id: int, stage: int, N: int) -> PipeHave:
    """A bitfield or full frame: a sequence number, then exactly W(N) words of have bits (bits beyond N are 0)."""
    where = _where(sender, round_id, stage, "pipelined bitfield")
    b = _words(body, where)
    seq = _pipe_seq(b, where)
    if b.size != 1 + _n_words(N):
        raise ProtocolError(f"{where} has {b.size - 1} have-bit words, expected {_n_words(N)}")
    return PipeHave(seq, np.flatnonzero(_bits(b[1:], N, where, "have set")).astype(np.int64))


def parse_pipe_want(body, *, sender: int, round_id: int, stage: int) -> None:
    """A want frame: no body (the asker lacks my whole have set)."""
    where = _where(sender, round_id, stage, "pipelined want")
    b = _words(body, where)
    if b.size:
        raise ProtocolError(f"{where} has {b.size} words, expected none")


def parse_pipe_request(body, *, sender: int, round_id: int, stage: int, N: int, window: int) -> PipeRequest:
    """(q, chunk) pairs: at most `window` of them (more in one frame is a flood), request numbers in
    0..MAX_SEQ-1 and distinct, chunks in 0..N-1 and distinct."""
    where = _where(sender, round_id, stage, "pipelined request")
    b = _words(body, where)
    if b.size % 2:
        raise ProtocolError(f"{where} has {b.size} words, not (request, chunk) pairs")
    if b.size // 2 > window:
        raise ProtocolError(f"{where} asks for {b.size // 2} chunks at once, over the window of {window}")
    q, c = b[0::2], b[1::2]
    _ids(q, MAX_SEQ, where, "request number", unique=True)
    _ids(c, N, where, "requested chunk", unique=True)
    return PipeRequest(q, c)


def parse_pipe_seqs(body, *, sender: int, round_id: int, stage: int, what: str, max_count: int) -> np.ndarray:
    """Request numbers (a cancel or a refusal): in 0..MAX_SEQ-1, distinct, at most `max_count` of them."""
    where = _where(sender, round_id, stage, f"pipelined {what}")
    q = _words(body, where)
    if q.size > max_count:
        raise ProtocolError(f"{where} names {q.size} requests, more than the {max_count} possible")
    return _ids(q, MAX_SEQ, where, "request number", unique=True)


def own_frame(msg: np.ndarray, magic: int) -> np.ndarray | None:
    """This engine's control frame with its session magic replaced by MAGIC (what frames.py checks), None
    for a frame of an earlier engine (MAGIC with another nonce: left on a communicator MPI recycled), and
    anything else unchanged (frames.py refuses it)."""
    if msg.size < 4 or (int(msg[0]) & 0xFFFFFFFF) != MAGIC:
        return msg
    if msg[0] != magic:
        return None
    out = msg.copy()
    out[0] = MAGIC
    return out
