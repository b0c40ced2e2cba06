"""Per-round overlay graphs: random with minimum degree m, or a d-regular expander.

The overlay is regenerated from the round seed every round (PAPER.md §5.2), so no neighbour relation
outlives a round.  The random overlay is an m-regular random graph plus 10% extra random edges, which
gives the paper's "minimum degree m, heterogeneous above m".  The expander option is a random d-regular
graph whose second eigenvalue is checked against the Ramanujan bound 2*sqrt(d-1); it is repaired after
peers leave so the survivors keep degree d.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import numpy as np

from ..config import SwarmConfig
from . import rng

EXTRA_EDGE_FRACTION = 0.10  # extra random edges on top of the m-regular base, as a fraction of its edges
EXPANDER_TRIES = 8


@dataclass
class Overlay:
    """Undirected overlay on peers 0..n-1; `nbr` pads rows with the sentinel n."""

    n: int
    edges: np.ndarray  # int32 [E, 2], u < v, sorted
    kind: str = "random"
    target_degree: int = 0
    lambda2: float = float("nan")
    _nbr: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        e = np.asarray(self.edges, dtype=np.int32).reshape(-1, 2)
        if e.size:
            e = np.sort(e, axis=1)
            e = np.unique(e, axis=0)
            if np.any(e[:, 0] == e[:, 1]):
                raise ValueError("overlay has a self loop")
        self.edges = e

    @property
    def degree(self) -> np.ndarray:
        return np.bincount(self.edges.reshape(-1), minlength=self.n).astype(np.int64)

    @property
    def neighbors(self) -> list[np.ndarray]:
        nbr = self.nbr
        return [row[row < self.n].astype(np.int64) for row in nbr]

    @property
    def nbr(self) -> np.ndarray:
        """int32 [n, Dmax] sorted neighbour ids, padded with n (a sentinel peer that holds nothing)."""
        if self._nbr is None:
            n = self.n
            both = np.concatenate([self.edges, self.edges[:, ::-1]]) if self.edges.size else np.zeros((0, 2), np.int32)
            order = np.lexsort((both[:, 1], both[:, 0]))
            both = both[order]
            deg = np.bincount(both[:, 0], minlength=n) if both.size else np.zeros(n, np.int64)
            dmax = max(1, int(deg.max()) if n else 1)
            pad = np.full((n, dmax), n, dtype=np.int32)
            starts = np.concatenate([[0], np.cumsum(deg)[:-1]])
            col = np.arange(both.shape[0]) - np.repeat(starts, deg)
            pad[both[:, 0], col] = both[:, 1]
            self._nbr = pad
        return self._nbr

    def adjacency(self):
        import scipy.sparse as sp

        e = self.edges
        data = np.ones(2 * e.shape[0], dtype=np.float64)
        rows = np.concatenate([e[:, 0], e[:, 1]])
        cols = np.concatenate([e[:, 1], e[:, 0]])
        return sp.csr_matrix((data, (rows, cols)), shape=(self.n, self.n))

    def has_edge(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Vectorised adjacency test."""
        u = np.asarray(u, dtype=np.int64)
        v = np.asarray(v, dtype=np.int64)
        return np.any(self.nbr[np.minimum(u, self.n - 1)] == v[..., None], axis=-1) & (u < self.n)

    def second_eigenvalue(self, peers: np.ndarray | None = None) -> float:
        """max(|lambda_2|, |lambda_n|) of the adjacency (restricted to `peers`): the expansion figure."""
        a = self.adjacency()
        if peers is not None:
            a = a[peers][:, peers]
        m = a.shape[0]
        if m <= 2:
            return 0.0
        if m <= 400:
            ev = np.sort(np.abs(np.linalg.eigvalsh(a.toarray())))
            return float(ev[-2])
        from scipy.sparse.linalg import eigsh

        largest = np.sort(eigsh(a, k=2, which="LA", return_eigenvectors=False))  # [lambda_2, lambda_1]
        smallest = eigsh(a, k=1, which="SA", return_eigenvectors=False)[0]
        return float(max(abs(largest[0]), abs(smallest)))

    def without_edges(self, pairs: np.ndarray) -> Overlay:
        """The same overlay minus the undirected edges in `pairs` ([m, 2]; pairs that are no edge are ignored)."""
        p = np.sort(np.asarray(pairs, dtype=np.int64).reshape(-1, 2), axis=1)
        if not p.size or not self.edges.size:
            return self
        key = self.edges[:, 0].astype(np.int64) * self.n + self.edges[:, 1]
        keep = ~np.isin(key, p[:, 0] * self.n + p[:, 1])
        if keep.all():
            return self
        return Overlay(self.n, self.edges[keep], self.kind, self.target_degree, self.lambda2)

    def repair(self, departed: np.ndarray, seed: int, degree: int | None = None) -> Overlay:
        """Drop departed peers' edges and re-wire survivors back up to `degree` (default: target degree).

        Survivors keep every edge they had (no churn among them); deficient survivors are paired first, and a
        survivor whose deficient partners are all adjacent already joins the least-loaded survivor, so
        degrees end in [d, d+1] (exact d-regularity could require dropping survivors' edges).
        """
        d = degree or self.target_degree
        gone = np.zeros(self.n, dtype=bool)
        gone[np.asarray(departed, dtype=np.int64)] = True
        keep = ~(gone[self.edges[:, 0]] | gone[self.edges[:, 1]])
        g = nx.Graph()
        alive = np.flatnonzero(~gone)
        g.add_nodes_from(alive.tolist())
        g.add_edges_from(self.edges[keep].tolist())
        gen = rng.generator(seed, rng.OVERLAY, 7)
        d = min(d, len(alive) - 1)
        for _ in range(4 * len(alive) * max(d, 1)):
            low = [v for v in alive.tolist() if g.degree(v) < d]
            if not low:
                break
            u = low[int(gen.integers(len(low)))]
            partners = [v for v in low if v != u and not g.has_edge(u, v)]
            if not partners:  # every deficient peer is already adjacent: use the least-loaded other survivor
                others = [v for v in alive.tolist() if v != u and not g.has_edge(u, v)]
                if not others:
                    break
                least = min(g.degree(v) for v in others)
                partners = [v for v in others if g.degree(v) == least]
            g.add_edge(u, partners[int(gen.integers(len(partners)))])
        out = Overlay(self.n, np.array(list(g.edges()), dtype=np.int32).reshape(-1, 2), self.kind, self.target_degree)
        if self.kind == "expander":
            out.lambda2 = out.second_eigenvalue(alive)
        return out


def _regular_edges(n: int, d: int, seed: int) -> np.ndarray:
    if d >= n - 1:
        iu = np.triu_indices(n, 1)
        return np.stack(iu, axis=1).astype(np.int32)
    if (n * d) % 2:
        d += 1  # n*d must be even; minimum degree stays >= m
        if d >= n - 1:
            return _regular_edges(n, n - 1, seed)
    g = nx.random_regular_graph(d, n, seed=seed % (2**32))
    return np.array(list(g.edges()), dtype=np.int32).reshape(-1, 2)


def build_overlay(n_peers: int, config: SwarmConfig, seed: int) -> Overlay:
    """The round's overlay, a pure function of (n_peers, config.degree, config.overlay, seed)."""
    n = int(n_peers)
    if n < 1:
        raise ValueError("an overlay needs at least one peer")
    m = min(config.degree, n - 1)
    if n == 1:
        return Overlay(1, np.zeros((0, 2), np.int32), config.overlay, 0)
    if config.overlay == "expander":
        bound = 2.0 * np.sqrt(max(m - 1, 0))
        best: Overlay | None = None
        for t in range(EXPANDER_TRIES):
            s = int(rng.hash_keys(seed, rng.OVERLAY, 1, t))
            ov = Overlay(n, _regular_edges(n, m, s), "expander", m)
            ov.lambda2 = ov.second_eigenvalue()
            if best is None or ov.lambda2 < best.lambda2:
                best = ov
            if ov.lambda2 <= bound + 1e-9:
                break
        return best
    base = _regular_edges(n, m, int(rng.hash_keys(seed, rng.OVERLAY, 0)))
    n_extra = int(round(EXTRA_EDGE_FRACTION * base.shape[0])) if m < n - 1 else 0
    if n_extra:
        gen = rng.generator(seed, rng.OVERLAY, 2)
        u = gen.integers(0, n, size=3 * n_extra)
        v = gen.integers(0, n, size=3 * n_extra)
        cand = np.stack([np.minimum(u, v), np.maximum(u, v)], axis=1)
        cand = cand[cand[:, 0] != cand[:, 1]]
        codes = cand[:, 0].astype(np.int64) * n + cand[:, 1]
        existing = base[:, 0].astype(np.int64) * n + base[:, 1]
        _, first = np.unique(codes, return_index=True)
        first.sort()
        cand = cand[first]
        cand = cand[~np.isin(cand[:, 0].astype(np.int64) * n + cand[:, 1], existing)][:n_extra]
        base = np.concatenate([base, cand.astype(np.int32)])
    return Overlay(n, base, "random", m)
