"""What the observation-only adversary sees: per-receiver and per-coalition views of a round trace.

PAPER.md §4.1: an honest-but-curious peer learns (i) the chunk ids it receives, keyed by the sender's
round pseudonym, (ii) their timing and order, (iii) the tracker directives addressed to it; colluding
peers pool all of that.  A chunk id names its update (descriptor = chunk // K), never the update's
owner.  The ground truth of the trace (owner column) is used only to score guesses, never to make them.

Choices (docs/PRIVACY.md, "Adversary model"):
- The observation window is the whole round by default (`window="round"`): an honest-but-curious peer
  keeps watching after the warm-up.  `window="warmup"` is the paper's scope (phase-1 transfers; for a
  round without warm-up, its equivalent span until every active peer first holds >= k chunks), kept for
  the reproduction studies; an integer is the first N stages.
- Attribution targets are the senders a view received *overlay* transfers from inside the window.
- Spray arrivals (phase 0) come from the owner itself under the paper's protocol, so the recipient learns
  "pseudonym s owns descriptor d" for certain.  With `spray=True` (default) the view uses that: the
  descriptor is excluded from every other target's candidates and, if s is a target of the view (a
  coalition member was sprayed by a peer another member sees on the overlay), s is attributed exactly.
  Spray hops are never targets themselves here (the `spray_recipient` attack scores them) and are
  reported separately as `spray_revealed`.  Under `protocol="hidden"` a spray need not come from its
  owner, so the adversary cannot take it as a revelation and `spray=True` learns nothing from it.
- A view always knows its members' own descriptors; members are never targets of their own coalition.
- What a peer sees of its neighbours' holdings (have-bitfields at the start of the BitTorrent phase,
  have-messages after) is `public_holdings`, keyed on the trace's protocol (`protocol_of`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..trace import PHASE_BT, PHASE_SPRAY, PHASE_WARMUP, Trace

PROTOCOLS = ("paper", "hidden")
NEVER = np.iinfo(np.int64).max // 4  # "never held" in stage arithmetic (no overflow when offsets are added)


@dataclass(frozen=True)
class AdversaryModel:
    """What the adversary may use.  `window`: "round" (everything observed in the round, the default),
    "warmup" (the paper's scope) or a stage count (the first `window` stages)."""

    window: str | int = "round"
    spray: bool = True


@dataclass
class Window:
    """The transfers attributions are computed over, and how the span was chosen."""

    mask: np.ndarray  # bool per transfer row: inside the window and an overlay transfer
    end_stage: int  # first stage after the window
    how: str  # "round" | "warmup" | "cover-equivalent" | "stages"


def degrees(trace: Trace) -> np.ndarray:
    """|N(v)| of every peer in the round's overlay."""
    e = np.asarray(trace.edges, dtype=np.int64).reshape(-1, 2)
    return np.bincount(e.reshape(-1), minlength=trace.n_peers).astype(np.int64)


def adjacency_matrix(trace: Trace) -> np.ndarray:
    """Dense bool adjacency (n is at most a few thousand in any trace we evaluate)."""
    n = trace.n_peers
    a = np.zeros((n, n), dtype=bool)
    e = np.asarray(trace.edges, dtype=np.int64).reshape(-1, 2)
    a[e[:, 0], e[:, 1]] = True
    a[e[:, 1], e[:, 0]] = True
    return a


def cover_stage(trace: Trace, k: int | None = None) -> int:
    """First stage s such that, after stages < s, every active peer has received >= k distinct chunks.

    This is the warm-up end criterion of PAPER.md §2.0 (chunks gained over the round; a peer's own update
    is not counted, so the span is never empty when k <= K).  Returns the trace's stage count when the
    threshold is never reached.
    """
    tr = trace.transfers
    n = trace.n_peers
    k = int(trace.attrs.get("cover_k", 1)) if k is None else int(k)
    stages_total = int(trace.attrs.get("stages", int(tr["stage"].max()) + 1 if tr["stage"].size else 0))
    if k <= 0:
        return 0
    ok = tr["ok"] & (tr["receiver"] != tr["owner"])
    key = tr["receiver"][ok].astype(np.int64) * (int(tr["chunk"].max(initial=0)) + 1) + tr["chunk"][ok]
    _, first = np.unique(key, return_index=True)  # first delivery of each (receiver, chunk)
    recv = tr["receiver"][ok][first]
    stage = tr["stage"][ok][first]
    active = trace.peers.get("active")
    peers = np.flatnonzero(active) if active is not None and active.size == n else np.arange(n)
    reach = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
    order = np.lexsort((stage, recv))
    recv, stage = recv[order], stage[order]
    starts = np.searchsorted(recv, np.arange(n))
    counts = np.bincount(recv, minlength=n)
    has = counts >= k
    idx = starts[has] + k - 1  # the k-th distinct chunk of each peer, in stage order
    reach[np.flatnonzero(has)] = stage[idx]
    worst = int(reach[peers].max()) if peers.size else 0
    return stages_total if worst == np.iinfo(np.int64).max else worst + 1


def round_stages(trace: Trace) -> int:
    """Number of stages of the round (the `stages` attribute, else one past the last transfer)."""
    st = trace.transfers["stage"]
    last = int(st.max()) + 1 if st.size else 0
    return max(int(trace.attrs.get("stages", last)), last)


def observation_window(trace: Trace, model: AdversaryModel | None = None) -> Window:
    """The overlay transfers the adversary attributes (see module docstring).  Every window is a prefix
    of the round: stages < `end_stage`."""
    model = model or AdversaryModel()
    tr = trace.transfers
    phase = tr["phase"]
    if isinstance(model.window, int) or (isinstance(model.window, str) and model.window.isdigit()):
        end = int(model.window)
        return Window((phase != PHASE_SPRAY) & (tr["stage"] < end), end, "stages")
    if model.window == "round":
        return Window(phase != PHASE_SPRAY, round_stages(trace), "round")
    if model.window != "warmup":
        raise ValueError(f"window must be 'round', 'warmup' or a stage count, got {model.window!r}")
    warm = phase == PHASE_WARMUP
    if warm.any():
        end = int(trace.attrs.get("warmup_stages", int(tr["stage"][warm].max()) + 1))
        return Window(warm, end, "warmup")
    end = cover_stage(trace)
    return Window((phase == PHASE_BT) & (tr["stage"] < end), end, "cover-equivalent")


def protocol_of(trace: Trace) -> str:
    """The dissemination protocol the round ran: "paper" (owners hold and announce their own update from the
    start; the default when the config has no `protocol` key) or "hidden" (an owner's public state starts
    without its own chunks and it announces only chunks it received, re-downloading its own update)."""
    from ..trace import config_of

    cfg = config_of(trace)
    proto = str(cfg.get("protocol", "paper") or "paper")
    if proto not in PROTOCOLS:
        raise ValueError(f"unknown protocol {proto!r} in the trace config (known: {', '.join(PROTOCOLS)})")
    # the hidden protocol applies to privacy "full" only; "none" and mechanism lists run the paper's rules
    return "hidden" if proto == "hidden" and str(cfg.get("privacy", "full")) == "full" else "paper"


def bt_start(trace: Trace) -> int | None:
    """First stage of the BitTorrent phase, from which peers exchange have-bitfields and have-messages.

    The first stage whose phase is 2 in `/stages` (else the first BitTorrent transfer); 0 for a round with
    no warm-up at all; None when the trace holds a warm-up but never reaches BitTorrent (warm-up-only runs).
    """
    st = trace.stages
    bt = np.flatnonzero(st["phase"] == PHASE_BT) if st["phase"].size else np.zeros(0, np.int64)
    if bt.size:
        return int(st["stage"][bt[0]])
    tr = trace.transfers
    rows = tr["phase"] == PHASE_BT
    if rows.any():
        return int(tr["stage"][rows].min())
    if not (tr["phase"] == PHASE_WARMUP).any() and not (st["phase"] == PHASE_WARMUP).any():
        return 0
    return None


@dataclass
class PublicHoldings:
    """Public holdings of every peer over time: entry i says peer `peer[i]` holds chunk `chunk[i]` in its
    public state (bitfield / have-messages) from the start of stage `since[i]` on.  Entries are sorted by
    (peer, chunk); a (peer, chunk) not listed is never held publicly (inside the window it was built for)."""

    n_peers: int
    chunks_per_peer: int
    protocol: str
    peer: np.ndarray
    chunk: np.ndarray
    since: np.ndarray

    def _codes(self) -> np.ndarray:
        return self.peer * (self.n_peers * self.chunks_per_peer) + self.chunk

    def since_of(self, peer: np.ndarray, chunk: np.ndarray) -> np.ndarray:
        """Stage from which `peer` publicly holds `chunk` (`NEVER` if it does not), element-wise."""
        codes = self._codes()
        want = np.asarray(peer, np.int64) * (self.n_peers * self.chunks_per_peer) + np.asarray(chunk, np.int64)
        if not codes.size:
            return np.full(want.shape, NEVER, dtype=np.int64)
        pos = np.clip(np.searchsorted(codes, want), 0, codes.size - 1)
        return np.where(codes[pos] == want, self.since[pos], NEVER)

    def count_by_update(self, stage: int) -> np.ndarray:
        """[peer, update]: chunks of each update a peer publicly holds at the start of `stage`."""
        n, K = self.n_peers, self.chunks_per_peer
        held = self.since <= stage
        key = self.peer[held] * n + self.chunk[held] // max(K, 1)
        return np.bincount(key, minlength=n * n).reshape(n, n)


def mixer_hops(trace: Trace, rows: np.ndarray) -> np.ndarray:
    """Which of the spray rows `rows` are a hidden-protocol first hop: their receiver forwards the same chunk in
    a later spray row (a mixer knows so, it is told to forward it; a seed's arrival is never forwarded)."""
    tr = trace.transfers
    span = trace.n_peers * max(trace.chunks_per_peer, 1)
    ch = tr["chunk"][rows].astype(np.int64)
    return np.isin(tr["receiver"][rows].astype(np.int64) * span + ch, tr["sender"][rows].astype(np.int64) * span + ch)


def public_holdings(trace: Trace, end: int | None = None) -> PublicHoldings:
    """What each peer announces it holds, over time, as its neighbours see it (keyed on `protocol_of`).

    A chunk delivered (and accepted) at stage s is announced from stage s + 1 (it arrives at the end of s).
    Under "paper" an owner's own chunks are public from stage 0; under "hidden" an owner starts with none
    of them in its public state and announces only what it received, its own re-downloaded chunks included.
    Deliveries at stages >= `end` (default: none) are left out: a window sees only its own past.
    """
    n, K = trace.n_peers, trace.chunks_per_peer
    tr = trace.transfers
    ok = tr["ok"].astype(bool)
    if end is not None:
        ok &= tr["stage"] < end
    if protocol_of(trace) == "hidden":  # a mixer's first hops are forwarded, never announced
        sp = np.flatnonzero(ok & (tr["phase"] == PHASE_SPRAY))
        ok[sp[mixer_hops(trace, sp)]] = False
    code = tr["receiver"][ok].astype(np.int64) * (n * K) + tr["chunk"][ok]
    since = tr["stage"][ok].astype(np.int64) + 1
    if protocol_of(trace) == "paper":
        own = np.arange(n * K, dtype=np.int64)
        code = np.concatenate([code, (own // max(K, 1)) * (n * K) + own])
        since = np.concatenate([since, np.zeros(own.size, np.int64)])
    order = np.lexsort((since, code))
    code, since = code[order], since[order]
    first = np.concatenate([[True], code[1:] != code[:-1]]) if code.size else np.zeros(0, bool)
    code, since = code[first], since[first]
    return PublicHoldings(n, K, protocol_of(trace), code // max(n * K, 1), code % max(n * K, 1), since)


@dataclass
class Views:
    """Pooled observations of `len(members)` views (a view = one receiver or one coalition).

    Rows are the overlay transfers each view received from non-member senders inside the window, sorted
    by (view, sender, arrival time, delivery order).  `pair` numbers the (view, sender) targets.
    """

    n_peers: int
    members: list[np.ndarray]
    view: np.ndarray
    sender: np.ndarray
    desc: np.ndarray
    t: np.ndarray
    seq: np.ndarray
    excluded: np.ndarray  # bool [V, n]: descriptors the view knows belong to none of its targets
    known: np.ndarray  # bool [V, n]: targets whose descriptor the view learned from a spray it received
    spray_revealed: np.ndarray  # int [V]: distinct owners the view learned from spray arrivals
    baseline: np.ndarray  # float [V]: mean over members of 1/|N(member)|
    window: Window
    pair: np.ndarray = field(init=False)  # per row: index of its (view, sender) target
    pair_view: np.ndarray = field(init=False)
    pair_sender: np.ndarray = field(init=False)
    pair_start: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        key = self.view.astype(np.int64) * self.n_peers + self.sender
        if key.size:
            change = np.concatenate([[True], key[1:] != key[:-1]])
        else:
            change = np.zeros(0, dtype=bool)
        self.pair_start = np.flatnonzero(change)
        self.pair = np.cumsum(change) - 1
        self.pair_view = self.view[self.pair_start]
        self.pair_sender = self.sender[self.pair_start]

    @property
    def n_views(self) -> int:
        return len(self.members)

    @property
    def n_pairs(self) -> int:
        return int(self.pair_start.size)

    def targets_per_view(self) -> np.ndarray:
        return np.bincount(self.pair_view, minlength=self.n_views)


def build_views(
    trace: Trace,
    observers: list[np.ndarray] | None = None,
    model: AdversaryModel | None = None,
) -> Views:
    """Views of `observers` (list of peer-id arrays; default: every peer alone)."""
    model = model or AdversaryModel()
    n = trace.n_peers
    kchunks = trace.chunks_per_peer
    tr = trace.transfers
    win = observation_window(trace, model)
    if observers is None:
        observers = [np.array([v]) for v in range(n)]
    observers = [np.unique(np.asarray(o, dtype=np.int64)) for o in observers]
    n_views = len(observers)
    member = np.zeros((n_views, n), dtype=bool)
    for i, o in enumerate(observers):
        member[i, o] = True

    rows = np.flatnonzero(win.mask)
    recv = tr["receiver"][rows].astype(np.int64)
    single = all(o.size == 1 for o in observers) and len({int(o[0]) for o in observers}) == n_views
    if single:
        # each peer observes alone: view index = position of the receiver in `observers`
        where = np.full(n, -1, dtype=np.int64)
        for i, o in enumerate(observers):
            where[o[0]] = i
        vid = where[recv]
        keep = vid >= 0
        rows, vid = rows[keep], vid[keep]
    else:
        parts_r, parts_v = [], []
        for i in range(n_views):
            hit = member[i, recv]
            parts_r.append(rows[hit])
            parts_v.append(np.full(int(hit.sum()), i, dtype=np.int64))
        rows = np.concatenate(parts_r) if parts_r else np.zeros(0, np.int64)
        vid = np.concatenate(parts_v) if parts_v else np.zeros(0, np.int64)
    snd = tr["sender"][rows].astype(np.int64)
    keep = ~member[vid, snd]  # a coalition does not attribute its own members
    rows, vid, snd = rows[keep], vid[keep], snd[keep]
    # sort by (view, sender, arrival time, delivery order) with one integer sort: arrival rank = position of
    # the row in the (t, row) order of the whole trace (a merged MPI trace need not be in time order)
    t_all = tr["t"]
    by_t = None
    arrival = rows
    if t_all.size > 1 and not bool(np.all(t_all[1:] >= t_all[:-1])):
        by_t = np.argsort(t_all, kind="stable")
        pos = np.empty_like(by_t)
        pos[by_t] = np.arange(by_t.size)
        arrival = pos[rows]
    span = max(int(t_all.size), 1)
    key = np.sort((vid * n + snd) * span + arrival)
    vs = key // span
    vid, snd = vs // n, vs % n
    rows = key % span if by_t is None else by_t[key % span]
    desc = (tr["chunk"][rows] // kchunks).astype(np.int64)
    t = t_all[rows]

    excluded = member.copy()  # members know their own descriptors
    known = np.zeros((n_views, n), dtype=bool)
    spray_revealed = np.zeros(n_views, dtype=np.int64)
    if model.spray:
        # under the paper's protocol a spray hop is a tunnel from the owner: its sender owns its update (the
        # audit checks it); under "hidden" only a mixer's first hops do (it is told to forward them), while a
        # seed's arrival comes from a mixer and names no owner
        sp = np.flatnonzero((tr["phase"] == PHASE_SPRAY) & (tr["stage"] < win.end_stage))
        s_recv = tr["receiver"][sp].astype(np.int64)
        s_send = tr["sender"][sp].astype(np.int64)
        if protocol_of(trace) == "hidden":
            fwd = mixer_hops(trace, sp)
            s_recv, s_send = s_recv[fwd], s_send[fwd]
        for i in range(n_views):
            hit = member[i, s_recv]
            learned = np.unique(s_send[hit])
            learned = learned[~member[i, learned]]
            known[i, learned] = True
            spray_revealed[i] = learned.size
        excluded |= known  # a revealed descriptor is not any *other* target's; its own target is `known`
    deg = degrees(trace).astype(np.float64)
    inv = np.divide(1.0, deg, out=np.full(n, np.nan), where=deg > 0)
    baseline = np.array([float(np.nanmean(inv[o])) if np.isfinite(inv[o]).any() else np.nan for o in observers])
    return Views(
        n_peers=n,
        members=observers,
        view=vid,
        sender=snd,
        desc=desc,
        t=t,
        seq=rows,
        excluded=excluded,
        known=known,
        spray_revealed=spray_revealed,
        baseline=baseline,
        window=win,
    )


def random_coalitions(n_peers: int, size: int, count: int, seed: int = 0) -> list[np.ndarray]:
    """`count` coalitions of `size` distinct peers drawn uniformly (static corruption before the round)."""
    if not 1 <= size <= n_peers:
        raise ValueError(f"coalition size must be in [1, {n_peers}], got {size}")
    gen = np.random.default_rng(seed)
    return [np.sort(gen.choice(n_peers, size=size, replace=False)) for _ in range(count)]


def synthetic_trace(
    n_peers: int,
    chunks_per_peer: int,
    edges: np.ndarray | list,
    transfers: dict[str, np.ndarray | list],
    privacy: str = "full",
    cover_k: int = 1,
    kappa: int = 1,
    lag: np.ndarray | list | None = None,
    gate_releases: dict[str, np.ndarray | list] | None = None,
    **config: object,
) -> Trace:
    """A hand-made `Trace` for tests and what-if studies: give stage, sender, receiver, chunk, phase.

    Missing columns are derived (owner = chunk // K, t = stage + 1, ok = True); O_u/B_u default to -1
    (not recorded).  `config` adds SwarmConfig fields to the stored JSON config.
    """
    import json

    tr = Trace()
    cfg = {"privacy": privacy, "degree": 1, "spray_ratio": 0.0, "lag_slots": 1, "kappa": kappa, "tau": 4}
    cfg.update(config)
    cols = {k: np.asarray(v) for k, v in transfers.items()}
    stage = cols["stage"].astype(np.int64)
    cols.setdefault("owner", cols["chunk"] // chunks_per_peer)
    cols.setdefault("t", stage + 1.0)
    cols.setdefault("t_start", stage.astype(np.float64))
    tr.add_transfers(**cols)
    n_stages = int(stage.max()) + 1 if stage.size else 0
    warm = cols["phase"] <= PHASE_WARMUP
    tr.attrs = {
        "source": "synthetic",
        "config": json.dumps(cfg),
        "n_peers": n_peers,
        "chunks_per_peer": chunks_per_peer,
        "chunk_bytes": 1,
        "cover_k": cover_k,
        "kappa": kappa,
        "seed": int(cfg.get("seed", 0)),
        "slot_seconds": 1.0,
        "warmup_stages": int(stage[warm].max()) + 1 if warm.any() else 0,
        "stages": n_stages,
        "warmup_failed_open": False,
    }
    tr.edges = np.asarray(edges, dtype=np.int32).reshape(-1, 2)
    lag = np.zeros(n_peers, np.int64) if lag is None else np.asarray(lag, np.int64)
    tr.peers = {
        "lag": lag.astype(np.int32),
        "active": np.ones(n_peers, bool),
        "up_budget": np.full(n_peers, 1 << 20, np.int32),
        "down_budget": np.full(n_peers, 1 << 20, np.int32),
    }
    if gate_releases is not None:
        tr.add_gate_releases(**gate_releases)
    return tr
