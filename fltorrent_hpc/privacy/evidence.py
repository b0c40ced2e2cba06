"""Everything one peer observes over a window of the round, as evidence about (observer o, peer w, update d).

The sequence/count/cluster attacks read `Views` (the chunks each view received, per sender).  The whole-round
attacks need more of what an honest-but-curious peer o sees (docs/PRIVACY.md, "Adversary model"):

- the transfers o receives: sender w, chunk (so update d = chunk // K), stage, arrival order; spray arrivals
  (phase 0) from non-neighbours included;
- the requests o receives, i.e. the transfers o sends: a neighbour w that o served a chunk of d lacked it
  (in the BitTorrent phase w asked o for it; in the warm-up the tracker told o to send it);
- its neighbours' public holdings (`public_holdings`): have-bitfields at the start of the BitTorrent phase,
  have-messages after it.

Everything is derived from the trace without its `owner` column: the owner is the ground truth, used only to
score.  Arrays are indexed by peer id; `n` is at most a few thousand in any trace evaluated here, so the
[n, n] per-(peer, update) tables are dense.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from ..config import parse_privacy
from ..errors import ConfigError
from ..trace import PHASE_SPRAY, Trace, config_of
from .observations import (
    AdversaryModel,
    adjacency_matrix,
    bt_start,
    mixer_hops,
    observation_window,
    protocol_of,
    public_holdings,
)


@dataclass
class RoundEvidence:
    """Per-observer evidence of one window of one round (see module docstring).

    Triples are keyed `(o * n + w) * n + d`.  `serve_*` are the overlay transfers (phase != 0) w -> o, sorted
    by (key, arrival); the requests o received from w are the same table read with o and w swapped
    (`ask_count`).  Public state is observed from `bt` (None: never inside the window) until `end`.
    """

    n: int
    K: int
    end: int  # first stage after the window
    bt: int | None  # first BitTorrent stage inside the window (public state visible from it)
    protocol: str
    gating: bool
    adj: np.ndarray  # bool [n, n]
    deg: np.ndarray  # int [n]
    nbr_ptr: np.ndarray  # CSR of the overlay, neighbours sorted
    nbr_idx: np.ndarray
    serve_key: np.ndarray  # per overlay row w -> o: triple key, sorted by (key, arrival)
    serve_stage: np.ndarray
    serve_rank: np.ndarray  # global arrival rank (by t, then delivery order)
    serve_phase: np.ndarray
    serve_pubvis: np.ndarray  # stage from which o could see, in w's public state, that w held that chunk
    spray_key: np.ndarray  # phase-0 arrivals w -> o, triple keys, sorted
    held0: np.ndarray  # int [w, d]: chunks of d in w's bitfield at bt (0 everywhere if bt is None)
    covered: np.ndarray  # int [o, d]: chunks of d some peer of o's closed neighbourhood held at bt
    vis_sum: np.ndarray  # float [w, d]: sum over d's chunks of the stage o could first see w holding it publicly
    excluded: np.ndarray  # bool [o, d]: updates o knows are none of its targets' (its own; spray-revealed)
    known: np.ndarray  # bool [o, w]: o learned w's update from a spray w sent it (paper protocol only)
    uniq_key: np.ndarray = field(init=False)  # unique serve keys, with their counts
    uniq_count: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.uniq_key, self.uniq_count = np.unique(self.serve_key, return_counts=True)

    def key(self, o: np.ndarray, w: np.ndarray, d: np.ndarray) -> np.ndarray:
        n = self.n
        return (np.asarray(o, np.int64) * n + np.asarray(w, np.int64)) * n + np.asarray(d, np.int64)

    def lookup(self, table: np.ndarray, values: np.ndarray, keys: np.ndarray, default: float) -> np.ndarray:
        """values[i] for the position of each key in the sorted unique `table`, `default` where absent."""
        if not table.size:
            return np.full(keys.shape, default, dtype=np.float64)
        pos = np.clip(np.searchsorted(table, keys), 0, table.size - 1)
        return np.where(table[pos] == keys, values[pos], default).astype(np.float64)

    def serve_count(self, o: np.ndarray, w: np.ndarray, d: np.ndarray) -> np.ndarray:
        """Chunks of d that w delivered to o in the window (overlay transfers)."""
        return self.lookup(self.uniq_key, self.uniq_count, self.key(o, w, d), 0.0)

    def ask_count(self, o: np.ndarray, w: np.ndarray, d: np.ndarray) -> np.ndarray:
        """Chunks of d that o delivered to w: w lacked them and asked o (or the tracker told o to send)."""
        return self.serve_count(w, o, d)

    def row_sums(self, rows: np.ndarray, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Unique serve keys among `rows` (indices into serve_*) and the sum of `weights` (or counts) per key."""
        k = self.serve_key[rows]
        uniq, inv = np.unique(k, return_inverse=True)
        w = np.ones(k.size) if weights is None else np.asarray(weights, np.float64)
        return uniq, np.bincount(inv, weights=w, minlength=uniq.size)

    def miss(self, o: np.ndarray, w: np.ndarray, d: np.ndarray) -> np.ndarray:
        """Chunks of d absent from w's bitfield at the start of the BitTorrent phase while a peer of o's closed
        neighbourhood held them (o sees its own holdings and every neighbour's bitfield)."""
        return np.maximum(self.covered[o, d] - self.held0[w, d], 0).astype(np.float64)

    def u_triples(self, observers: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(o, w, d) for every observer o, every update d owned by a neighbour of o and every candidate
        neighbour w, sorted by (o, d, w): the items score U is computed over."""
        obs = np.arange(self.n) if observers is None else np.asarray(observers, np.int64)
        k = self.deg[obs]
        sizes = k * k
        o = np.repeat(obs, sizes)
        local = np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        kk = np.repeat(k, sizes)
        base = np.repeat(self.nbr_ptr[obs], sizes)
        d = self.nbr_idx[base + local // np.maximum(kk, 1)]
        w = self.nbr_idx[base + local % np.maximum(kk, 1)]
        return o, w, d


def _csr(adj: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = np.nonzero(adj)  # row-major: rows sorted, columns sorted within a row
    ptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=adj.shape[0]))]).astype(np.int64)
    return ptr, cols.astype(np.int64)


def build_evidence(trace: Trace, model: AdversaryModel | None = None) -> RoundEvidence:
    """Per-observer evidence of the window `model.window` (default: the whole round), for every peer alone."""
    model = model or AdversaryModel()
    n, K = trace.n_peers, trace.chunks_per_peer
    win = observation_window(trace, model)
    end = int(win.end_stage)
    bt = bt_start(trace)
    if bt is not None and bt >= end:
        bt = None
    protocol = protocol_of(trace)
    cfg = config_of(trace)
    try:
        gating = protocol == "paper" and "gating" in parse_privacy(cfg.get("privacy", "full"))
    except ConfigError:  # an unparsable label in a foreign trace: do not assume gating
        gating = False
    adj = adjacency_matrix(trace)
    deg = adj.sum(axis=1).astype(np.int64)
    ptr, idx = _csr(adj)

    tr = trace.transfers
    keep = tr["ok"].astype(bool) & (tr["stage"] < end)
    t_all = tr["t"]
    rank = np.empty(t_all.size, np.int64)
    rank[np.lexsort((np.arange(t_all.size), t_all))] = np.arange(t_all.size)
    hold = public_holdings(trace, end)

    over = np.flatnonzero(keep & (tr["phase"] != PHASE_SPRAY))
    o = tr["receiver"][over].astype(np.int64)
    w = tr["sender"][over].astype(np.int64)
    c = tr["chunk"][over].astype(np.int64)
    skey = (o * n + w) * n + c // max(K, 1)
    order = np.lexsort((rank[over], skey))
    over, skey, w, c = over[order], skey[order], w[order], c[order]
    if bt is None:
        pubvis = np.full(over.size, end, np.int64)
    else:
        pubvis = np.minimum(np.maximum(hold.since_of(w, c), bt), end)

    spr = np.flatnonzero(keep & (tr["phase"] == PHASE_SPRAY))
    pkey = np.sort((tr["receiver"][spr].astype(np.int64) * n + tr["sender"][spr]) * n + tr["chunk"][spr] // max(K, 1))

    # public aggregates per (w, d), observed from bt on
    if bt is None:
        held0 = np.zeros((n, n), np.int64)
        vis_sum = np.full((n, n), float(end) * K)
        covered = np.zeros((n, n), np.int64)
    else:
        held0 = hold.count_by_update(bt)
        inside = hold.since < end
        wd = hold.peer[inside] * n + hold.chunk[inside] // max(K, 1)
        vis = np.maximum(hold.since[inside], bt)
        got = np.bincount(wd, minlength=n * n).reshape(n, n)
        vis_sum = np.bincount(wd, weights=vis, minlength=n * n).reshape(n, n) + (K - got) * float(end)
        at0 = hold.since <= bt
        h = sp.csr_matrix(
            (np.ones(int(at0.sum()), np.int8), (hold.peer[at0], hold.chunk[at0])), shape=(n, n * K), dtype=np.int8
        )
        closed = sp.csr_matrix(adj.astype(np.int8)) + sp.identity(n, dtype=np.int8, format="csr")
        reach = (closed @ h).tocoo()  # nonzero (o, c): some peer of o's closed neighbourhood held c at bt
        covered = np.bincount(reach.row.astype(np.int64) * n + reach.col // max(K, 1), minlength=n * n)
        covered = covered.reshape(n, n)

    excluded = np.eye(n, dtype=bool)  # o knows its own update
    known = np.zeros((n, n), bool)
    if model.spray:
        snd = tr["sender"][spr].astype(np.int64)
        rcv = tr["receiver"][spr].astype(np.int64)
        if protocol == "hidden":  # a mixer knows its first hops (it is told to forward them) came from owners
            fwd = mixer_hops(trace, spr)
            snd, rcv = snd[fwd], rcv[fwd]
        known[rcv, snd] = True  # a paper spray comes straight from its owner
        excluded[rcv, snd] = True
        known[np.arange(n), np.arange(n)] = False
    return RoundEvidence(
        n=n,
        K=K,
        end=end,
        bt=bt,
        protocol=protocol,
        gating=gating,
        adj=adj,
        deg=deg,
        nbr_ptr=ptr,
        nbr_idx=idx,
        serve_key=skey,
        serve_stage=tr["stage"][over].astype(np.int64),
        serve_rank=rank[over],
        serve_phase=tr["phase"][over].astype(np.int64),
        serve_pubvis=pubvis,
        spray_key=pkey,
        held0=held0,
        covered=covered,
        vis_sum=vis_sum,
        excluded=excluded,
        known=known,
    )
