"""HDF5 round traces (schema in docs/TRACE.md): one layout for simulated and real rounds.

The simulator and the MPI engine both fill a `Trace`; reports and the privacy attacks read it back
with `read_trace`, so an attack measured on a simulated round runs unchanged on a real one.
Per-rank traces of a real round are joined with `merge`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA = "fltorrent-trace/1"
PHASE_SPRAY, PHASE_WARMUP, PHASE_BT = 0, 1, 2
PHASE_NAMES = {PHASE_SPRAY: "spray", PHASE_WARMUP: "warmup", PHASE_BT: "bittorrent"}

TRANSFER_COLUMNS: dict[str, Any] = {
    "stage": np.int32,
    "t": np.float64,
    "t_start": np.float64,
    "sender": np.int32,
    "receiver": np.int32,
    "owner": np.int32,
    "chunk": np.int32,
    "phase": np.int8,
    "sender_owned": np.int32,
    "sender_buffer": np.int32,
    "bytes": np.int64,
    "ok": np.bool_,
}
STAGE_COLUMNS: dict[str, Any] = {
    "stage": np.int32,
    "phase": np.int8,
    "transfers": np.int32,
    "capacity": np.int64,
    "utilization": np.float64,
    "maxflow": np.int32,
}
PEER_COLUMNS: dict[str, Any] = {
    "uplink": np.float64,
    "downlink": np.float64,
    "up_budget": np.int32,
    "down_budget": np.int32,
    "lag": np.int32,
    "active": np.bool_,
    "left_at": np.int32,
    "complete_stage": np.int32,
    "weight": np.float64,
}
GATE_COLUMNS: dict[str, Any] = {"stage": np.int32, "peer": np.int32, "chunk": np.int32}


class _Columns:
    """Append-only columnar table: batches of numpy arrays, concatenated once on read."""

    def __init__(self, schema: dict[str, Any]):
        self.schema = schema
        self._parts: dict[str, list[np.ndarray]] = {k: [] for k in schema}
        self._cache: dict[str, np.ndarray] | None = None

    def append(self, **cols: Any) -> None:
        n = None
        for k, v in cols.items():
            if k not in self.schema:
                raise KeyError(f"unknown column {k!r}")
            a = np.asarray(v, dtype=self.schema[k]).reshape(-1)
            n = a.size if n is None else n
            self._parts[k].append(a)
        missing = set(self.schema) - set(cols)
        for k in missing:  # columns a writer does not know get their null value
            if k == "ok":
                null = True
            elif self.schema[k] is np.bool_:
                null = False
            else:
                null = -1 if np.issubdtype(self.schema[k], np.integer) else np.nan
            self._parts[k].append(np.full(n or 0, null, dtype=self.schema[k]))
        self._cache = None

    def columns(self) -> dict[str, np.ndarray]:
        if self._cache is None:
            self._cache = {
                k: (np.concatenate(v) if v else np.zeros(0, dtype=self.schema[k])) for k, v in self._parts.items()
            }
            self._parts = {k: [a] for k, a in self._cache.items()}
        return self._cache

    def __len__(self) -> int:
        parts = self._parts[next(iter(self.schema))]
        return int(sum(p.size for p in parts))


@dataclass
class Trace:
    """Everything one round leaves behind; columns are numpy arrays (see docs/TRACE.md)."""

    attrs: dict[str, Any] = field(default_factory=dict)
    peers: dict[str, np.ndarray] = field(default_factory=dict)
    edges: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int32))
    overlay_attrs: dict[str, Any] = field(default_factory=dict)
    reconstructable: np.ndarray | None = None
    agreed: np.ndarray | None = None
    _transfers: _Columns = field(default_factory=lambda: _Columns(TRANSFER_COLUMNS))
    _stages: _Columns = field(default_factory=lambda: _Columns(STAGE_COLUMNS))
    _gates: _Columns = field(default_factory=lambda: _Columns(GATE_COLUMNS))

    def add_transfers(self, **cols: Any) -> None:
        self._transfers.append(**cols)

    def add_stage(self, **cols: Any) -> None:
        self._stages.append(**cols)

    def add_gate_releases(self, **cols: Any) -> None:
        self._gates.append(**cols)

    @property
    def transfers(self) -> dict[str, np.ndarray]:
        return self._transfers.columns()

    @property
    def stages(self) -> dict[str, np.ndarray]:
        return self._stages.columns()

    @property
    def gate_releases(self) -> dict[str, np.ndarray]:
        return self._gates.columns()

    @property
    def n_peers(self) -> int:
        return int(self.attrs["n_peers"])

    @property
    def chunks_per_peer(self) -> int:
        return int(self.attrs["chunks_per_peer"])

    def neighbors(self) -> list[np.ndarray]:
        """Adjacency lists of the round's overlay."""
        n = self.n_peers
        nb: list[list[int]] = [[] for _ in range(n)]
        for u, v in self.edges:
            nb[int(u)].append(int(v))
            nb[int(v)].append(int(u))
        return [np.array(sorted(x), dtype=np.int64) for x in nb]


def _attr(v: Any) -> Any:
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v)
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    return v


def write_trace(path: str | Path, trace: Trace) -> Path:
    """Write `trace` to an HDF5 file (overwrites)."""
    import h5py

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.attrs["schema"] = SCHEMA
        for k, v in trace.attrs.items():
            f.attrs[k] = _attr(v)
        g = f.create_group("peers")
        for k, v in trace.peers.items():
            g.create_dataset(k, data=np.asarray(v, dtype=PEER_COLUMNS.get(k, None)))
        o = f.create_group("overlay")
        o.create_dataset("edges", data=np.asarray(trace.edges, dtype=np.int32).reshape(-1, 2))
        for k, v in trace.overlay_attrs.items():
            o.attrs[k] = _attr(v)
        tables = (("transfers", trace.transfers), ("stages", trace.stages), ("gate_releases", trace.gate_releases))
        for name, table in tables:
            t = f.create_group(name)
            for k, v in table.items():
                big = v.size > 4096
                t.create_dataset(k, data=v, compression="gzip" if big else None, compression_opts=1 if big else None)
        r = f.create_group("result")
        if trace.reconstructable is not None:
            r.create_dataset("reconstructable", data=np.asarray(trace.reconstructable, dtype=bool))
        if trace.agreed is not None:
            r.create_dataset("agreed", data=np.asarray(trace.agreed, dtype=bool))
    return path


def read_trace(path: str | Path) -> Trace:
    """Read a trace written by `write_trace` (simulator or merged MPI round)."""
    import h5py

    with h5py.File(path, "r") as f:
        schema = f.attrs.get("schema", "")
        if schema != SCHEMA:
            raise ValueError(f"{path}: not an fltorrent trace (schema={schema!r}, expected {SCHEMA!r})")
        tr = Trace(attrs={k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()})
        tr.peers = {k: f["peers"][k][()] for k in f["peers"]}
        tr.edges = f["overlay/edges"][()]
        tr.overlay_attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f["overlay"].attrs.items()}
        tr._transfers.append(**{k: f["transfers"][k][()] for k in TRANSFER_COLUMNS if k in f["transfers"]})
        tr._stages.append(**{k: f["stages"][k][()] for k in STAGE_COLUMNS if k in f["stages"]})
        tr._gates.append(**{k: f["gate_releases"][k][()] for k in GATE_COLUMNS if k in f["gate_releases"]})
        if "reconstructable" in f["result"]:
            tr.reconstructable = f["result/reconstructable"][()]
        if "agreed" in f["result"]:
            tr.agreed = f["result/agreed"][()]
    return tr


def config_of(trace: Trace) -> dict[str, Any]:
    """The JSON configuration stored with a trace."""
    c = trace.attrs.get("config", "{}")
    return json.loads(c) if isinstance(c, str) else dict(c)


def merge_round(path: str | Path, out: str | Path | None = None) -> Trace:
    """Join a real round's tracker trace (`path`) with its per-rank receive logs (`path.rankR.h5`).

    The tracker knows every decision; each rank knows when its chunks arrived and whether they passed
    their hash check.  Rows are matched on (stage, receiver, chunk); the result has the simulator's schema.
    """
    base = read_trace(path)
    t = base.transfers
    n = base.n_peers
    N = n * base.chunks_per_peer
    key = (t["stage"].astype(np.int64) * n + t["receiver"]) * max(N, 1) + t["chunk"]
    t_arr, ts_arr = t["t"].copy(), t["t_start"].copy()
    ok = t["ok"].copy()
    for r in range(n):
        rp = Path(f"{path}.rank{r}.h5")
        if not rp.exists():
            continue
        rt = read_trace(rp).transfers
        rkey = (rt["stage"].astype(np.int64) * n + rt["receiver"]) * max(N, 1) + rt["chunk"]
        order = np.argsort(key)
        pos = np.searchsorted(key[order], rkey)
        pos = np.minimum(pos, key.size - 1)
        hit = key[order][pos] == rkey
        idx = order[pos[hit]]
        t_arr[idx], ts_arr[idx] = rt["t"][hit], rt["t_start"][hit]
        ok[idx] &= rt["ok"][hit]
    merged = Trace(
        attrs={**base.attrs, "source": "mpi"},
        peers=base.peers,
        edges=base.edges,
        overlay_attrs=base.overlay_attrs,
        reconstructable=base.reconstructable,
        agreed=base.agreed,
    )
    merged.add_transfers(**{**t, "t": t_arr, "t_start": ts_arr, "ok": ok})
    merged.add_stage(**base.stages)
    merged.add_gate_releases(**base.gate_releases)
    if out is not None:
        write_trace(out, merged)
    return merged
