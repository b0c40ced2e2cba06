"""The one configuration object, and the unit parsing used at its edges.

Inside the project every size is bytes and every rate is bytes per second; strings such as "4MiB",
"17.1GB", "10Gbps" or ranges "7Gbps:10Gbps" are accepted only where a user types them (CLI, env
variables, `SwarmConfig.from_env`).  Every knob of the protocol lives in `SwarmConfig`, with the
paper's default and unit, so the simulator, the MPI engine and the torch backend read the same field.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

PRIVACY_MECHANISMS = ("spray", "lags", "gating")
SCHEDULERS = ("gff", "random-ff", "random-fifo", "flooding", "maxflow")  # maxflow: offline bound
OVERLAYS = ("random", "expander")
BT_DECISIONS = ("peers", "tracker", "pipelined")
BT_GRANTS = ("deficit", "reciprocity")
COVER_SCOPES = ("swarm", "update")
PROTOCOLS = ("hidden", "paper")
SIM_MODELS = ("slotted", "events")

_BYTE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "k": 2**10,
    "m": 2**20,
    "g": 2**30,
}
_RATE_UNITS = {  # bits per second; "B/s" forms are bytes per second
    "bps": 1,
    "kbps": 10**3,
    "mbps": 10**6,
    "gbps": 10**9,
    "tbps": 10**12,
}
_NUM = r"([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)"


def parse_bytes(text: str | int | float) -> int:
    """'4MiB' -> 4194304, '17.1GB' -> 17100000000, 1024 -> 1024."""
    if isinstance(text, (int, float)):
        if text < 0:
            raise ConfigError(f"size must be >= 0, got {text}")
        return int(text)
    m = re.fullmatch(_NUM + r"\s*([a-zA-Z]*)", text.strip())
    if not m or m.group(2).lower() not in _BYTE_UNITS:
        raise ConfigError(f"cannot parse size {text!r}; use e.g. 4MiB, 256KiB, 17.1GB or a byte count")
    return int(round(float(m.group(1)) * _BYTE_UNITS[m.group(2).lower()]))


def parse_rate(text: str | int | float) -> float:
    """'10Gbps' -> 1.25e9 bytes/s; '100MB/s' -> 1e8 bytes/s; a bare number is bytes/s."""
    if isinstance(text, (int, float)):
        if text <= 0:
            raise ConfigError(f"rate must be > 0, got {text}")
        return float(text)
    s = text.strip()
    m = re.fullmatch(_NUM + r"\s*([a-zA-Z]+)/s", s)
    if m:
        v = float(parse_bytes(m.group(1) + m.group(2)))
        if v <= 0:
            raise ConfigError(f"rate must be > 0, got {text!r}")
        return v
    m = re.fullmatch(_NUM + r"\s*([a-zA-Z]*)", s)
    if not m:
        raise ConfigError(f"cannot parse rate {text!r}; use e.g. 10Gbps, 25.3Mbps or 100MB/s")
    unit = m.group(2).lower()
    if unit and unit not in _RATE_UNITS:
        raise ConfigError(f"cannot parse rate {text!r}; units: bps, Kbps, Mbps, Gbps or <size>/s")
    v = float(m.group(1)) * (_RATE_UNITS[unit] / 8.0 if unit else 1.0)
    if v <= 0:
        raise ConfigError(f"rate must be > 0, got {text!r}")
    return v


def parse_range(text: str | tuple | list, parse=parse_rate) -> tuple[float, float]:
    """'7Gbps:10Gbps' -> (lo, hi); a single value gives (v, v)."""
    if isinstance(text, (tuple, list)):
        lo, hi = (parse(text[0]), parse(text[-1]))
    else:
        parts = str(text).split(":")
        if len(parts) not in (1, 2):
            raise ConfigError(f"range {text!r} must be LOW:HIGH or a single value")
        lo, hi = parse(parts[0]), parse(parts[-1])
    if hi < lo:
        raise ConfigError(f"range {text!r} has HIGH < LOW")
    return lo, hi


def parse_privacy(text: str | frozenset | set | tuple | list) -> frozenset[str]:
    """'full' -> all mechanisms, 'none' -> none, 'spray,lags' -> those two."""
    if isinstance(text, (frozenset, set, tuple, list)):
        items = set(text)
    else:
        t = text.strip().lower()
        if t == "full":
            return frozenset(PRIVACY_MECHANISMS)
        if t in ("none", ""):
            return frozenset()
        items = {p.strip() for p in t.split(",") if p.strip()}
    bad = items - set(PRIVACY_MECHANISMS)
    if bad:
        raise ConfigError(f"unknown privacy mechanism(s) {sorted(bad)}; choose from full, none or {PRIVACY_MECHANISMS}")
    return frozenset(items)


def privacy_label(privacy: frozenset[str]) -> str:
    if privacy == frozenset(PRIVACY_MECHANISMS):
        return "full"
    if not privacy:
        return "none"
    return ",".join(p for p in PRIVACY_MECHANISMS if p in privacy)


@dataclass(frozen=True)
class SwarmConfig:
    """Every knob of a round, with the paper's default (PAPER.md §6) and its unit.

    Environment variables FLTORRENT_<FIELD> (upper case) override defaults in `from_env`; an explicit
    argument (a field passed here, a `pg_options` config, fedavg_(privacy=...)) overrides both.
    """

    # overlay
    degree: int = 10  # minimum degree m
    overlay: str = "random"  # "random" (min degree m, heterogeneous above) or "expander" (d-regular)
    # chunks
    chunk_bytes: int = 4 * 2**20  # C; 4 MiB for real runs, the simulator CLI uses the paper's 256 KiB
    # privacy mechanisms (subset of spray, lags, gating); empty = BitTorrent only
    privacy: frozenset = frozenset(PRIVACY_MECHANISMS)
    # how privacy "full" is obtained (docs/PRIVACY.md): "hidden" (default) = each owner's update goes through
    # a mixer to seeds before the round, the owner hides it from its have state and downloads it back like
    # any other peer, so it acts as a non-owner for the whole round; "paper" = the paper's warm-up (spray,
    # lags, gating, non-owner-first).  A mechanism list (an ablation) always runs the paper's mechanisms.
    protocol: str = "hidden"
    seed_peers: int = 2  # hidden protocol: blocks per update, each through its own mixer to its own seed
    seed_overlap: bool = True  # hidden protocol: BitTorrent passes use what seed stages leave of the budgets
    spray_ratio: float = 0.2  # R: floor(R*K) chunks per owner sprayed to non-neighbours
    lag_slots: int = 3  # T_lag: lag ~ U{0..T_lag-1} slots
    cover: float = 0.10  # K: cover-set threshold fraction
    cover_scope: str = "swarm"  # "swarm": k = ceil(K*|C|); "update": k = ceil(K*K_v)
    kappa: int = 1  # owner throttle: eligible owner chunks at once
    # scheduling
    scheduler: str = "gff"
    tau: int = 4  # concurrent receivers per sender per stage
    bt_passes: int = 2  # request/grant passes per BitTorrent stage
    endgame_chunks: int = 8  # a receiver missing at most this many chunks enters endgame
    # real rounds: "pipelined" = no stage clock in the BitTorrent phase: each rank keeps `bt_window` requests
    # outstanding per neighbour and serves requests as its uplink frees (runtime/bt_pipeline.py; host-plane rounds
    # above `direct_bytes` only: small rounds and device-plane rounds keep the stages; the simulator stays slotted);
    # "peers" = stage-clocked, each rank makes its own BitTorrent decisions over neighbour exchanges (the
    # simulator's model, decision for decision); "tracker" = the tracker evaluates them on the peers' behalf and
    # relays directives (same decisions)
    bt_decisions: str = "pipelined"
    # privacy "none" rounds of at most this many bytes per rank, or on even links, are one direct exchange
    # (swarm.budget.direct_round); 0 = never (the swarm always runs)
    direct_bytes: int = 4 * 2**20
    bt_window: int = 8  # pipelined: requests outstanding per neighbour (chunks; 6-8 measured best, 16 worse paced)
    # BitTorrent senders grant first to the requester missing the most chunks ("deficit": cooperative ranks,
    # the round ends with its slowest peer) or, as vanilla BitTorrent, to whom they received most from
    # ("reciprocity", tit-for-tat)
    bt_grant: str = "deficit"
    slot_seconds: float = 1.0  # Delta
    # the simulator's model of the BitTorrent phase: "slotted" (stages of slot_seconds, the paper's; the studies'
    # numbers) or "events" (continuous time, requests pipelined per neighbour: runtime/sim_events.py)
    sim_model: str = "slotted"
    # deadlines
    deadline_stages: int = 0  # s_max for the simulator; 0 = derived from capacities (4x the ideal)
    warmup_deadline_stages: int = 0  # warm-up fails open after this many stages; 0 = s_max
    deadline_s: float = 0.0  # wall-clock deadline of a real round; 0 = none (only timeout_s)
    timeout_s: float = 300.0  # bound on every distributed wait
    stage_timeout_s: float = 30.0  # a peer silent this long within a stage is excluded from the round
    # "blake3": every chunk is checked against its owner's keyed BLAKE3 digest (chunks/digest.py), a failing
    # sender is banned; "none": trust the fabric's link-level integrity (no digests at all)
    integrity: str = "blake3"
    # "reject": an update holding NaN or Inf is left out of the average on every rank, named in the report;
    # "keep": average it anyway (it then spreads to every model)
    nonfinite: str = "reject"
    # fedavg_/aggregate_/swarm_round: agree on A = intersection of A_v so every rank holds the same result;
    # False = the paper's per-peer semantics (each rank averages its own A_v).  The torch collectives always agree.
    consensus: bool = True
    # real transport
    tracker_rank: int = 0
    uplink: float = 0.0  # emulated uplink bytes/s per rank (0 = unpaced)
    downlink: float = 0.0  # emulated downlink bytes/s per rank (0 = unpaced)
    seed: int = 0
    trace: str = ""  # HDF5 trace path ("" = no trace)
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "privacy", parse_privacy(self.privacy))
        object.__setattr__(self, "chunk_bytes", parse_bytes(self.chunk_bytes))
        object.__setattr__(self, "direct_bytes", parse_bytes(self.direct_bytes))
        checks = [
            (self.degree >= 1, "degree must be >= 1"),
            (self.overlay in OVERLAYS, f"overlay must be one of {OVERLAYS}"),
            (self.chunk_bytes >= 1, "chunk_bytes must be >= 1"),
            (0.0 <= self.spray_ratio < 1.0, "spray_ratio must be in [0, 1)"),
            (self.lag_slots >= 1, "lag_slots must be >= 1"),
            (0.0 <= self.cover <= 1.0, "cover must be in [0, 1]"),
            (self.cover_scope in COVER_SCOPES, f"cover_scope must be one of {COVER_SCOPES}"),
            (self.kappa >= 1, "kappa must be >= 1"),
            (self.scheduler in SCHEDULERS, f"scheduler must be one of {SCHEDULERS}"),
            (self.tau >= 1, "tau must be >= 1"),
            (1 <= self.bt_passes <= 7, "bt_passes must be in 1..7"),
            (self.direct_bytes >= 0, "direct_bytes must be >= 0"),
            (self.bt_decisions in BT_DECISIONS, f"bt_decisions must be one of {BT_DECISIONS}"),
            (1 <= self.bt_window <= 1024, "bt_window must be in 1..1024"),
            (self.bt_grant in BT_GRANTS, f"bt_grant must be one of {BT_GRANTS}"),
            (self.slot_seconds > 0, "slot_seconds must be > 0"),
            (self.sim_model in SIM_MODELS, f"sim_model must be one of {SIM_MODELS}"),
            (self.timeout_s > 0, "timeout_s must be > 0"),
            (self.stage_timeout_s > 0, "stage_timeout_s must be > 0"),
            (
                self.integrity in ("blake3", "none"),
                "integrity must be 'blake3' or 'none' (the non-cryptographic 'hash' was removed: it could be forged)",
            ),
            (self.nonfinite in ("reject", "keep"), "nonfinite must be 'reject' or 'keep'"),
            (self.deadline_stages >= 0 and self.warmup_deadline_stages >= 0, "deadlines must be >= 0"),
            (self.protocol in PROTOCOLS, f"protocol must be one of {PROTOCOLS}"),
            (self.seed_peers >= 1, "seed_peers must be >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"SwarmConfig: {msg}")

    def replace(self, **changes: Any) -> SwarmConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, base: SwarmConfig | None = None, environ: dict | None = None) -> SwarmConfig:
        """Apply FLTORRENT_<FIELD> overrides (e.g. FLTORRENT_CHUNK_BYTES=1MiB) to `base`.

        Precedence, highest first: an explicit argument (a field the caller sets after this, a `pg_options`
        config, an argument such as fedavg_'s `privacy`), then these variables, then `base` (SwarmConfig's
        defaults when None).  A group built without `pg_options` takes its config from here, and the api's
        None defaults (fedavg_'s privacy and deadline) mean "the group's config".
        """
        env = os.environ if environ is None else environ
        base = base or cls()
        changes: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            key = "FLTORRENT_" + f.name.upper()
            if f.name == "extra" or key not in env:
                continue
            raw = env[key]
            cur = getattr(base, f.name)
            try:
                if f.name in ("uplink", "downlink"):
                    changes[f.name] = parse_rate(raw)
                elif f.name in ("chunk_bytes", "direct_bytes"):
                    changes[f.name] = parse_bytes(raw)
                elif f.name == "privacy":
                    changes[f.name] = parse_privacy(raw)
                elif isinstance(cur, bool):
                    word = raw.strip().lower()
                    if word not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                        raise ValueError("expected one of 1/0, true/false, yes/no, on/off")
                    changes[f.name] = word in ("1", "true", "yes", "on")
                elif isinstance(cur, int):
                    changes[f.name] = int(raw)
                elif isinstance(cur, float):
                    changes[f.name] = float(raw)
                else:
                    changes[f.name] = raw
            except ValueError as e:
                raise ConfigError(f"{key}={raw!r}: {e}") from e
        return base.replace(**changes) if changes else base

    @property
    def hides_owners(self) -> bool:
        """Owners seed, hide and re-download their own update (protocol "hidden" with privacy "full")."""
        return self.protocol == "hidden" and self.privacy == frozenset(PRIVACY_MECHANISMS)

    def cover_threshold(self, n_peers: int, chunks_per_peer: int) -> int:
        """k: chunks every active peer must hold before warm-up ends (PAPER.md §2.0)."""
        import math

        if self.cover_scope == "swarm":
            return max(1, math.ceil(self.cover * n_peers * chunks_per_peer - 1e-9))
        return max(1, math.ceil(self.cover * chunks_per_peer - 1e-9))

    def to_dict(self) -> dict[str, Any]:
        """The knobs as plain values (a trace's attributes); a fresh dict, computed once per config (every
        round's trace asks, and dataclasses.asdict costs ~0.7 ms); a config holding an unhashable value (a
        list a study set) is converted each time."""
        try:
            return dict(_knobs(self))
        except TypeError:
            return _knobs.__wrapped__(self)


@functools.lru_cache(maxsize=64)
def _knobs(cfg: SwarmConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    d["privacy"] = privacy_label(cfg.privacy)
    d.pop("extra", None)
    return d
