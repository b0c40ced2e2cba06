"""Auditable tracker (PAPER.md §5.4): commit to the round seed before the round, reveal seed and log after.

Why: a biased tracker could shape sparse or lopsided overlays, or steer owner chunks to chosen peers, to
weaken some peers' unlinkability.  Before the round it publishes `commit(seed, salt)`; after it reveals
(seed, salt) and the directive log (overlay, lags, budgets, every spray and warm-up directive, every
gated-start release).  Any peer then recomputes the overlay, lags and spray plan from the seed with the
same code the tracker runs, and checks the hard constraints of every directive.  A log that fails any
check flags the round fail-open: it stays live (vanilla BitTorrent semantics) but its unlinkability
guarantee is void.

The commitment is SHA-256(salt || seed) with a fresh 256-bit salt: a bare H(seed) of a small integer seed
could be inverted by brute force, and knowing the seed early would let a peer recompute the spray plan,
i.e. which chunk ids each owner sprays, before the round.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import SwarmConfig
from ..trace import PHASE_SPRAY, PHASE_WARMUP, Trace, config_of

DIRECTIVE_COLUMNS = ("stage", "sender", "receiver", "chunk", "phase", "ok")


@dataclass(frozen=True)
class Commitment:
    """What the tracker publishes before the round."""

    digest: str  # hex SHA-256(salt || seed as 8 little-endian bytes)


def _seed_bytes(seed: int) -> bytes:
    return int(seed).to_bytes(8, "little", signed=False)


def new_salt() -> bytes:
    return os.urandom(32)


def commit(seed: int, salt: bytes) -> Commitment:
    """The pre-round commitment to `seed` (hiding thanks to `salt`, binding thanks to SHA-256)."""
    if len(salt) < 16:
        raise ValueError("salt must be at least 16 bytes")
    return Commitment(hashlib.sha256(bytes(salt) + _seed_bytes(seed)).hexdigest())


@dataclass
class RoundLog:
    """What the tracker reveals after the round."""

    seed: int
    salt: bytes
    n_peers: int
    chunks_per_peer: int
    config: dict[str, Any]
    edges: np.ndarray  # int [E, 2]
    lag: np.ndarray  # int [n] lag slots
    up_budget: np.ndarray  # int [n] chunks per stage
    down_budget: np.ndarray  # int [n]
    directives: dict[str, np.ndarray]  # DIRECTIVE_COLUMNS, phases 0 (spray) and 1 (warm-up)
    releases: dict[str, np.ndarray] = field(default_factory=dict)  # gated-start releases: stage, peer, chunk

    def swarm_config(self) -> SwarmConfig:
        names = {f.name for f in dataclasses.fields(SwarmConfig)} - {"extra"}
        return SwarmConfig(**{k: v for k, v in self.config.items() if k in names})

    def save(self, path: str | Path) -> Path:
        """Publish the log as one .npz file (integer arrays and a JSON header; nothing is pickled)."""
        path = Path(path)
        head = {"seed": int(self.seed), "salt": self.salt.hex(), "n_peers": self.n_peers}
        head |= {"chunks_per_peer": self.chunks_per_peer, "config": self.config}
        arrays = {f"d_{k}": np.asarray(v) for k, v in self.directives.items()}
        arrays |= {f"r_{k}": np.asarray(v) for k, v in self.releases.items()}
        np.savez_compressed(
            path,
            header=np.frombuffer(json.dumps(head).encode(), dtype=np.uint8),
            edges=self.edges,
            lag=self.lag,
            up_budget=self.up_budget,
            down_budget=self.down_budget,
            **arrays,
        )
        return path

    @classmethod
    def load(cls, path: str | Path) -> RoundLog:
        with np.load(path, allow_pickle=False) as z:
            head = json.loads(z["header"].tobytes().decode())
            directives = {k[2:]: z[k] for k in z.files if k.startswith("d_")}
            releases = {k[2:]: z[k] for k in z.files if k.startswith("r_")}
            return cls(
                seed=int(head["seed"]),
                salt=bytes.fromhex(head["salt"]),
                n_peers=int(head["n_peers"]),
                chunks_per_peer=int(head["chunks_per_peer"]),
                config=head["config"],
                edges=z["edges"],
                lag=z["lag"],
                up_budget=z["up_budget"],
                down_budget=z["down_budget"],
                directives=directives,
                releases=releases,
            )


def round_log(trace: Trace, salt: bytes) -> RoundLog:
    """The tracker's reveal for the round recorded in `trace` (its warm-up directives and set-up)."""
    tr = trace.transfers
    m = (tr["phase"] == PHASE_SPRAY) | (tr["phase"] == PHASE_WARMUP)
    directives = {k: np.asarray(tr[k][m]).copy() for k in DIRECTIVE_COLUMNS}
    gr = trace.gate_releases
    n = trace.n_peers
    cfg = config_of(trace)
    return RoundLog(
        seed=int(trace.attrs.get("seed", cfg.get("seed", 0))),
        salt=bytes(salt),
        n_peers=n,
        chunks_per_peer=trace.chunks_per_peer,
        config=cfg,
        edges=np.asarray(trace.edges, dtype=np.int64).reshape(-1, 2).copy(),
        lag=np.asarray(trace.peers.get("lag", np.zeros(n)), dtype=np.int64).copy(),
        up_budget=np.asarray(trace.peers["up_budget"], dtype=np.int64).copy(),
        down_budget=np.asarray(trace.peers["down_budget"], dtype=np.int64).copy(),
        directives=directives,
        releases={k: np.asarray(v).copy() for k, v in gr.items()},
    )


@dataclass
class Recomputed:
    """What a peer derives from the revealed seed: overlay edges, lags and the spray plan."""

    edges: np.ndarray
    lag: np.ndarray | None = None
    spray: dict[str, np.ndarray] | None = None  # sender, receiver, chunk
    mixer: np.ndarray | None = None  # hidden protocol: each chunk's mixer and seed as planned
    seeder: np.ndarray | None = None


Recompute = Callable[[RoundLog], Recomputed]


def recompute_round(log: RoundLog) -> Recomputed:
    """Re-derive the round's seeded set-up with the swarm core itself (the code the tracker ran)."""
    from ..swarm.round import SwarmRound

    rnd = SwarmRound(
        log.swarm_config(), log.n_peers, log.chunks_per_peer, log.up_budget, log.down_budget, seed=log.seed
    )
    if rnd.hidden:
        return Recomputed(edges=rnd.overlay.edges, lag=np.asarray(rnd.lag), mixer=rnd.mixer, seeder=rnd.seeder)
    return Recomputed(edges=rnd.overlay.edges, lag=np.asarray(rnd.lag), spray=dict(rnd.spray))


@dataclass
class AuditReport:
    """Outcome of verifying one round; `failures` maps a check to the number of offending items."""

    ok: bool
    failures: dict[str, int]
    details: list[str]
    checked: dict[str, int]

    @property
    def fail_open(self) -> bool:
        """A round whose log fails verification falls back to vanilla BitTorrent: no privacy claim."""
        return not self.ok


def _edge_codes(edges: np.ndarray, n: int) -> np.ndarray:
    e = np.sort(np.asarray(edges, dtype=np.int64).reshape(-1, 2), axis=1)
    return np.unique(e[:, 0] * n + e[:, 1])


def _count_over(keys: np.ndarray, limit: np.ndarray) -> int:
    """Number of groups (given by int64 `keys`) whose size exceeds `limit` (array aligned with keys)."""
    if not keys.size:
        return 0
    uniq, first, counts = np.unique(keys, return_index=True, return_counts=True)
    return int((counts > limit[first]).sum())


def verify(commitment: Commitment, log: RoundLog, recompute: Recompute | None = None) -> AuditReport:
    """Check `log` against `commitment` and the protocol's hard constraints (what every peer can do)."""
    fail: dict[str, int] = {}
    details: list[str] = []
    checked: dict[str, int] = {}

    def report(name: str, bad: int, what: str) -> None:
        checked[name] = checked.get(name, 0) + 1
        if bad:
            fail[name] = fail.get(name, 0) + int(bad)
            details.append(f"{name}: {bad} {what}")

    n, K = log.n_peers, log.chunks_per_peer
    report("commitment", int(commit(log.seed, log.salt).digest != commitment.digest), "revealed seed/salt do not match")
    try:
        cfg = log.swarm_config()
        rec = (recompute or recompute_round)(log)
    except (ValueError, KeyError, TypeError) as exc:  # a malformed log cannot be re-derived: that is a failure
        report("recompute", 1, f"cannot re-derive the round from the revealed seed and log ({exc})")
        return AuditReport(ok=False, failures=fail, details=details, checked=checked)
    got, want = _edge_codes(log.edges, n), _edge_codes(rec.edges, n)
    report("overlay", int(np.setxor1d(got, want).size), "edges differ from the overlay the seed gives")
    if rec.lag is not None:
        report("lags", int((np.asarray(rec.lag) != log.lag).sum()), "peers' lags differ from the seeded lags")

    d = log.directives
    stage = np.asarray(d["stage"], dtype=np.int64)
    snd = np.asarray(d["sender"], dtype=np.int64)
    rcv = np.asarray(d["receiver"], dtype=np.int64)
    chunk = np.asarray(d["chunk"], dtype=np.int64)
    phase = np.asarray(d["phase"], dtype=np.int64)
    ok = np.asarray(d.get("ok", np.ones(stage.size, bool)), dtype=bool)
    owner = chunk // max(K, 1)
    adj = np.zeros((n, n), dtype=bool)
    e = np.asarray(rec.edges, dtype=np.int64).reshape(-1, 2)
    adj[e[:, 0], e[:, 1]] = adj[e[:, 1], e[:, 0]] = True
    valid = (snd >= 0) & (snd < n) & (rcv >= 0) & (rcv < n) & (chunk >= 0) & (chunk < n * K)
    report("ids", int((~valid).sum()), "directives name a peer or chunk that does not exist")
    snd, rcv, chunk, stage, phase, ok, owner = (a[valid] for a in (snd, rcv, chunk, stage, phase, ok, owner))

    sp = phase == PHASE_SPRAY
    wu = phase == PHASE_WARMUP
    if cfg.hides_owners:
        _verify_hidden(cfg, rec, log, report, adj, snd, rcv, chunk, stage, sp, ok, owner)
        return AuditReport(ok=not fail, failures=fail, details=details, checked=checked)
    spray_on = "spray" in cfg.privacy
    report("spray_disabled", int(sp.sum()) if not spray_on else 0, "spray directives in a round without spray")
    report("spray_owner", int((sp & (snd != owner)).sum()), "spray directives not sent by the chunk's owner")
    report("spray_target", int((sp & (adj[snd, rcv] | (snd == rcv))).sum()), "spray directives to a neighbour/self")
    sigma = int(np.floor(cfg.spray_ratio * K + 1e-9)) if spray_on else 0
    report("spray_mass", int((np.bincount(snd[sp], minlength=n) > sigma).sum()), f"owners spraying more than {sigma}")
    if rec.spray is not None and sp.any():
        plan = np.asarray(rec.spray["sender"], np.int64) * n * K + np.asarray(rec.spray["chunk"], np.int64)
        plan = plan * n + np.asarray(rec.spray["receiver"], np.int64)
        done = (snd[sp] * n * K + chunk[sp]) * n + rcv[sp]
        report("spray_plan", int((~np.isin(done, plan)).sum()), "spray directives not in the seeded spray plan")
    report("adjacency", int((wu & ~adj[snd, rcv]).sum()), "warm-up directives between non-neighbours")
    if "lags" in cfg.privacy:
        report("lag", int((wu & (stage < log.lag[snd])).sum()), "warm-up sends before the sender's lag expired")

    # availability: the sender held the chunk before the stage (its own, or delivered at an earlier stage)
    nk = n * K
    got_code = rcv[ok] * nk + chunk[ok]
    got_stage = stage[ok]
    order = np.lexsort((got_stage, got_code))
    got_code, got_stage = got_code[order], got_stage[order]
    first = np.concatenate([[True], got_code[1:] != got_code[:-1]]) if got_code.size else np.zeros(0, bool)
    first_code, first_stage = got_code[first], got_stage[first]
    need = snd * nk + chunk
    pos = np.clip(np.searchsorted(first_code, need), 0, max(first_code.size - 1, 0))
    held_before = (
        (first_code[pos] == need) & (first_stage[pos] < stage) if first_code.size else np.zeros(need.size, bool)
    )
    report("availability", int((~((snd == owner) | held_before)).sum()), "directives for chunks the sender lacked")
    # no redundant deliveries: each (receiver, chunk) delivered at most once, never to its owner (ok=False rows
    # are logged retries and are allowed)
    dup = int(got_code.size - np.unique(got_code).size)
    report("redundant", dup + int((ok & (rcv == owner)).sum()), "redundant deliveries")
    # per-stage caps on every directive (spray rides in warm-up stages and uses the same links)
    report("upload_cap", _count_over(stage * n + snd, log.up_budget[snd]), "(stage, sender) over the upload budget")
    report("download_cap", _count_over(stage * n + rcv, log.down_budget[rcv]), "(stage, receiver) over download budget")
    pairs = np.unique((stage[wu] * n + snd[wu]) * n + rcv[wu])
    report("tau", _count_over(pairs // n, np.full(pairs.size, cfg.tau)), f"(stage, sender) with > tau={cfg.tau} peers")
    if "gating" in cfg.privacy:
        k = cfg.cover_threshold(n, K)
        # received non-owner chunks before each stage, per sender: count first deliveries at earlier stages
        gain = first & (got_code // nk != (got_code % nk) // max(K, 1))  # non-owner first deliveries
        peer_of = got_code[gain] // nk
        st_of = got_stage[gain]
        o2 = np.lexsort((st_of, peer_of))
        peer_of, st_of = peer_of[o2], st_of[o2]
        own_send = wu & (snd == owner)
        u, s = snd[own_send], stage[own_send]
        lo = np.searchsorted(peer_of, u, side="left")
        hi = np.searchsorted(peer_of * (1 << 32) + st_of, u * (1 << 32) + s, side="left")
        received_before = hi - lo
        rel = log.releases
        rel_code = (
            np.asarray(rel["peer"], np.int64) * nk + np.asarray(rel["chunk"], np.int64)
            if rel and len(rel.get("peer", []))
            else np.zeros(0, np.int64)
        )
        released = np.isin(u * nk + chunk[own_send], rel_code)
        report(
            "gating",
            int(((received_before < k - cfg.kappa) & ~released).sum()),
            "owner chunks sent before the sender's cover set reached k (and not a logged release)",
        )
        owner_pairs = np.unique((s * n + u) * nk + chunk[own_send])
        report(
            "throttle",
            _count_over(owner_pairs // nk, np.full(owner_pairs.size, cfg.kappa)),
            f"(stage, sender) with > kappa={cfg.kappa} distinct owner chunks",
        )
    return AuditReport(ok=not fail, failures=fail, details=details, checked=checked)


def _verify_hidden(cfg, rec, log, report, adj, snd, rcv, chunk, stage, sp, ok, owner) -> None:
    """The hidden protocol's hard rules: each chunk leaves its owner once, to its planned mixer (a
    non-neighbour), which forwards it to its planned seed; nobody serves a chunk it did not receive before,
    owners included (their own chunks come back like anyone's); each peer gets each chunk once."""
    n, K = log.n_peers, log.chunks_per_peer
    first = sp & (snd == owner)
    fwd = sp & ~first
    near = adj[snd, rcv] & (np.asarray(log.edges).size // 2 < n * (n - 1) // 2)  # complete overlay: no choice
    report("seed_target", int((first & (near | (snd == rcv))).sum()), "first hops to a neighbour or to self")
    if rec.mixer is not None:
        report("seed_plan", int((first & (rcv != rec.mixer[chunk])).sum()), "first hops not to the planned mixer")
        wrong = fwd & ((snd != rec.mixer[chunk]) | (rcv != rec.seeder[chunk]))
        report("seed_forward", int(wrong.sum()), "forwards not from the planned mixer to the planned seed")
    nk = n * K
    got = rcv[ok] * nk + chunk[ok]
    when = stage[ok]
    order = np.lexsort((when, got))
    got, when = got[order], when[order]
    need = snd * nk + chunk
    pos = np.clip(np.searchsorted(got, need), 0, max(got.size - 1, 0))
    before = (got[pos] == need) & (when[pos] < stage) if got.size else np.zeros(need.size, bool)
    report("availability", int((~(first | before)).sum()), "directives for chunks the sender lacked")
    public = ok & ~first
    codes = rcv[public] * nk + chunk[public]
    report("redundant", int(codes.size - np.unique(codes).size), "redundant deliveries")
    report("upload_cap", _count_over(stage * n + snd, log.up_budget[snd]), "(stage, sender) over the upload budget")
    report("download_cap", _count_over(stage * n + rcv, log.down_budget[rcv]), "(stage, receiver) over download budget")


def audit_trace(trace: Trace, recompute: Recompute | None = None) -> AuditReport:
    """Commit, reveal and verify the round of `trace` end to end (the honest-tracker path)."""
    salt = new_salt()
    seed = int(trace.attrs.get("seed", config_of(trace).get("seed", 0)))
    return verify(commit(seed, salt), round_log(trace, salt), recompute=recompute)
