"""`fedavg_`: one federated round in place: pack -> swarm -> verify -> weighted FedAvg -> write back.

    report = fltorrent_hpc.fedavg_(model, weight=n_local_samples)
    report = fltorrent_hpc.aggregate_(tensors, start, update, "median")     # a robust rule over the swarm

Every rank packs its tensors by the layout table (layout.py), publishes the bytes with its FedAvg weight,
and the engine swarms them; with consensus every rank ends with the same reconstructable set A.  Each rank
then runs the project's FedAvg kernels (kernels.py) on the tensors' own device:

    acc = sum over i in A, in rank order, of fl32(fl32(w_i) * x_i)        (fp32 accumulator)
    x   = dtype(fl32(acc / fl32(sum_{i in A} w_i)))

Same bytes, same order, same ops: bit-identical on all ranks, CPU or GPU.  A peer that stays silent (or
misses the deadline) is simply not in A; the others are averaged.  The arithmetic is aggregate.py's (the one
FedAvg of the project); `aggregate_` runs aggregate.py's robust rules over the same kind of swarm round.

Settings: an explicit argument wins, then the group's SwarmConfig (from `FLTORRENT_*` variables unless the
caller passed a config), then SwarmConfig's defaults; `privacy=None` and `deadline=None` mean "the config's".
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..chunks.layout import Layout, torch_dtype
from ..chunks.plane import RunAccumulator, to_device, to_host
from ..config import SwarmConfig, parse_privacy
from ..errors import FLTorrentError, IntegrityError, NothingToAverageError
from . import aggregate as agg

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)  # kernels.ACC_DTYPES: accumulated in fp32
_STANDALONE: dict[str, Any] = {}
_PLANE_WORD = 0x5D3C1A0B_00000000  # folded into the round's agreement digest when its rows live on a device
_WARNED: list[str] = []


@dataclass
class FedAvgReport:
    """What one round did: who was averaged, with which weights, bytes moved and where the time went."""

    participants: list[int]
    weights: list[float]
    nbytes: int
    bytes_sent: int
    bytes_recv: int
    warmup_s: float
    swarm_s: float
    round_s: float
    applied: bool = True  # False only on a rank that went silent and could not rebuild the agreed set
    # the senders this rank refused chunks from (they failed their digest), and owners left out of the average
    # for a descriptor not bound to this round, or (config nonfinite="reject") for NaN/Inf in their update
    banned: list[int] = field(default_factory=list)
    bad_descriptors: list[int] = field(default_factory=list)
    nonfinite: list[int] = field(default_factory=list)
    # senders that granted this rank chunks (or were directed to send them; named by the tracker) and never sent them
    unserved: list[int] = field(default_factory=list)
    stats: dict = field(default_factory=dict, repr=False)


def finite_update(update: np.ndarray | torch.Tensor, layout: Layout) -> bool:
    """Whether every float of a packed update (layout form, host bytes or a device row) is finite, checked where
    it lives.  Every rank holds the same bytes of an agreed update, so every rank reaches the same verdict
    without exchanging a word."""
    t = update if isinstance(update, torch.Tensor) else torch.from_numpy(update)
    for e in layout.entries:
        if e.numel and not bool(t[e.offset : e.end].view(torch_dtype(e.dtype)).isfinite().all()):
            return False
    return True


def _row_bytes(u: np.ndarray | torch.Tensor) -> int:
    return int(u.numel()) if isinstance(u, torch.Tensor) else int(u.size)


def _plane_for(pg: Any, device: torch.device) -> Any:
    """The group's device plane for tensors on `device`, or None (host rows).  A CUDA round without one stages
    its update through host memory, with one warning per process."""
    plane = pg.device_plane(device)
    if plane is None and device.type == "cuda" and not _WARNED:
        _WARNED.append(pg.plane_why)
        warnings.warn(
            f"fltorrent: no device data plane ({pg.plane_why}); CUDA updates are staged through host memory "
            "(one device-to-host copy of this rank's update and one host-to-device copy per received update)",
            RuntimeWarning,
            stacklevel=3,
        )
    return plane


def _report(parts: list[int], weights: list[float], nbytes: int, st: dict) -> FedAvgReport:
    return FedAvgReport(
        participants=parts,
        weights=weights,
        nbytes=nbytes,
        bytes_sent=int(st.get("bytes_sent", 0)),
        bytes_recv=int(st.get("bytes_recv", 0)),
        warmup_s=float(st.get("warmup_s", 0.0)),
        swarm_s=float(st.get("swarm_s", 0.0)),
        round_s=float(st.get("round_s", 0.0)),
        banned=list(st.get("bad_senders", [])),
        bad_descriptors=list(st.get("bad_descriptors", [])),
        nonfinite=list(st.get("nonfinite", [])),
        unserved=sorted(int(u) for u in st.get("unserved", {})),
        stats=st,
    )


def fedavg_(
    model_or_tensors: torch.nn.Module | Mapping[str, torch.Tensor] | Iterable[torch.Tensor],
    weight: float = 1.0,
    group: Any = None,
    deadline: float | None = None,
    privacy: str | frozenset | None = None,
    *,
    buffers: bool = True,
    timeout: float | None = None,
) -> FedAvgReport:
    """Replace every tensor by the weighted FedAvg over the agreed set of peers; collective over `group`.

    model_or_tensors: a Module (parameters, plus fp32/fp16/bf16 buffers when `buffers`), a name->tensor
        mapping, or an iterable of tensors, all on one device; dtypes fp32, fp16, bf16 (cast fp64 to fp32).
        CUDA tensors stay on the device when the group has a device plane (group.device_plane); every rank
        must then have one, or the round's agreement fails on every rank (ShapeMismatchError on shape_crc).
    weight: this peer's FedAvg weight (e.g. its sample count), >= 0 and finite.
    group: an "fltorrent" process group; None = the default group, or, when torch.distributed is not
        initialised, a private group over every rank (MPI COMM_WORLD, or the torch-native transport).
    deadline: wall-clock seconds for the swarm; peers not reconstructed by then are left out of A.  None: the
        group config's `deadline_s` (FLTORRENT_DEADLINE_S); either way capped by the round's timeout.
    privacy: "full", "none", "spray,lags", ... (PAPER.md privacy mechanisms); None: the group config's
        (FLTORRENT_PRIVACY, default "full").
    timeout: bound on every wait of the round (default: the group's timeout).
    """
    pg = _resolve_group(group)
    try:  # a bad argument on one rank must not leave the others waiting: swarm_round tells them
        mechanisms = resolve_privacy(privacy, pg.config)
        named = _named_tensors(model_or_tensors, buffers)
        w = float(weight)
        if not np.isfinite(w) or w < 0:
            raise FLTorrentError(f"fedavg_: weight must be finite and >= 0, got {weight}")
        layout = Layout.from_tensors(named)
        tensors = [t for _, t in named]
        device = layout.check_tensors(tensors)
        plane = _plane_for(pg, device)
        payload = _pack(tensors, layout, plane)
        # device rounds accumulate each verified chunk run on the device while the round runs
        sink = None
        if plane is not None and layout.total_bytes:
            sink = RunAccumulator(layout, pg.config.chunk_bytes, plane.device, getattr(plane, "runner", None))
    except Exception as e:
        pg.swarm_round(np.zeros(0, dtype=np.uint8), reject=e, timeout_s=timeout)
        raise

    def average(res: Any) -> FedAvgReport:  # on the comm thread, while the engine's buffers are valid
        parts = [int(r) for r in np.asarray(res.participants).tolist()]
        weights = np.asarray(res.weights, dtype=np.float64)
        st = dict(res.stats or {})
        if st.get("silent") and not parts:
            report = _report(parts, [float(x) for x in weights], layout.total_bytes, st)
            report.applied = False  # the round went on without this rank, so it lacks the others' updates
            return report
        for r in parts:
            u = res.updates[r]
            if u is None or _row_bytes(u) != layout.total_bytes:
                raise IntegrityError(
                    f"fedavg_: participant {r}'s update is {None if u is None else _row_bytes(u)} bytes, "
                    f"expected {layout.total_bytes}"
                )
        if pg.config.nonfinite == "reject":
            st["nonfinite"] = [r for r in parts if not finite_update(res.updates[r], layout)]
            parts = [r for r in parts if r not in st["nonfinite"]]
        report = _report(parts, [float(x) for x in weights], layout.total_bytes, st)
        total = float(sum(weights[r] for r in parts))
        if not parts or total <= 0:
            raise NothingToAverageError(
                f"fedavg_: nothing to average (participants {parts}, total weight {total}); every rank raises this"
            )
        acc = sink.result(parts) if sink is not None else None
        st["streamed_fedavg"] = acc is not None  # the sum was built during the round (else from the rows now)
        if acc is not None:
            from ..chunks.kernels import finalize_fedavg_

            # fedavg_packed_'s total: float64 in rank order
            finalize_fedavg_(acc, float(sum(np.float64(weights[r]) for r in parts)), tensors, layout)
        else:
            # device rows are averaged where they are; host rows of a CUDA round (staging) go up once each, counted
            rows = [res.updates[r] if plane is not None else to_device(res.updates[r], device) for r in parts]
            agg.fedavg_packed_(tensors, layout, rows, [float(weights[r]) for r in parts])
        if device.type == "cuda":  # on the comm thread: finish before the caller's stream uses the tensors
            torch.cuda.current_stream(device).synchronize()
        return report

    return pg.swarm_round(
        payload,
        weight=w,
        privacy=mechanisms,
        deadline_s=deadline,
        timeout_s=timeout,
        digest=layout.fingerprint ^ (_PLANE_WORD if plane is not None else 0),
        consume=average,
        plane=plane,
        sink=sink,
    )


def _named_tensors(obj: Any, buffers: bool) -> list[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.nn.Module):
        named = [(n, p) for n, p in obj.named_parameters()]
        if buffers:
            named += [(n, b) for n, b in obj.named_buffers() if b.dtype in _FLOATS]
    elif isinstance(obj, Mapping):
        named = [(str(k), v) for k, v in obj.items()]
    elif isinstance(obj, torch.Tensor):
        named = [("0", obj)]
    else:
        named = [(str(i), t) for i, t in enumerate(obj)]
    for n, t in named:
        if not isinstance(t, torch.Tensor):
            raise FLTorrentError(f"fedavg_: {n!r} is {type(t).__name__}, not a tensor")
        if t.dtype not in _FLOATS:
            raise FLTorrentError(
                f"fedavg_: {n!r} has dtype {t.dtype}; FedAvg accumulates fp32, fp16 or bf16 in fp32 "
                "(cast fp64 to fp32, leave integer buffers out)"
            )
        if t.layout != torch.strided or t.device.type not in ("cpu", "cuda"):
            raise FLTorrentError(f"fedavg_: {n!r} must be a dense cpu or cuda tensor")
    return named


def _resolve_group(group: Any) -> Any:
    import torch.distributed as dist

    from .group import FLTorrentProcessGroup

    if group is None:
        if dist.is_available() and dist.is_initialized():
            group = dist.group.WORLD
        else:
            group = _standalone_group()
    if not isinstance(group, FLTorrentProcessGroup):
        raise FLTorrentError(
            f"fedavg_ needs an 'fltorrent' process group, got {type(group).__name__}; "
            "use dist.init_process_group('fltorrent') or dist.new_group(backend='fltorrent')"
        )
    return group


def _standalone_group() -> Any:
    """A private group over every rank for scripts that never pick a group (collective): MPI COMM_WORLD under
    an MPI launcher; otherwise the torch-native transport over torch's store (the default group's when
    torch.distributed is initialised, else env:// as torchrun sets it; one rank for a plain `python`)."""
    if "pg" not in _STANDALONE:
        from ..config import SwarmConfig
        from ..launch import env_store, transport_choice
        from .group import FLTorrentProcessGroup

        cfg = SwarmConfig.from_env()
        if transport_choice() == "mpi":
            from mpi4py import MPI

            net: Any = MPI.COMM_WORLD
        else:
            from ..transport.torch_p2p import connect

            store, rank, size = env_store(cfg.timeout_s)
            net = connect(store, rank, size, timeout_s=cfg.timeout_s, name="fedavg-standalone")
        _STANDALONE["pg"] = FLTorrentProcessGroup(net, timeout_s=cfg.timeout_s, config=cfg, name="fedavg")
    return _STANDALONE["pg"]


def _pack(tensors: list[torch.Tensor], layout: Layout, plane: Any = None) -> np.ndarray | torch.Tensor:
    """The uint8 payload in the layout's canonical form, packed on the tensors' device by kernels.py: a row of
    the device `plane` (it stays there), or host bytes (a counted D2H copy for CUDA tensors)."""
    from ..chunks.kernels import pack_segments

    if layout.total_bytes == 0:
        return np.zeros(0, dtype=np.uint8) if plane is None else plane.zeros(0)
    flat = pack_segments([t.detach() for t in tensors], layout)
    if plane is None:
        return to_host(flat)  # synchronous: ready when it returns
    if flat.device.type == "cuda":  # the comm thread's streams (NCCL's, a CUDA-aware MPI) must see the packed bytes
        torch.cuda.current_stream(flat.device).synchronize()
    return plane.adopt(flat)


def resolve_privacy(privacy: str | frozenset | set | None, config: SwarmConfig) -> frozenset[str]:
    """The mechanisms a round uses: an explicit `privacy` wins, None means the group's config (which holds
    FLTORRENT_PRIVACY when the group was built from the environment, else SwarmConfig's default "full")."""
    return frozenset(config.privacy) if privacy is None else parse_privacy(privacy)


def aggregate_(
    tensors: Sequence[torch.Tensor],
    start: Sequence[torch.Tensor],
    update: torch.Tensor,
    rule: str,
    weight: float = 1.0,
    group: Any = None,
    deadline: float | None = None,
    privacy: str | frozenset | None = None,
    *,
    f: int = 1,
    trim: int | None = None,
    multi: int = 1,
    timeout: float | None = None,
) -> FedAvgReport:
    """One FL round with an aggregation rule of aggregate.py (median, trimmed-mean, krum, fedavg); collective.

    Every rank publishes its flat fp32 `update` (e.g. `aggregate.flat_update(tensors, start)`) in one swarm
    round; every rank then applies `rule` over the agreed set A in rank order and sets
    tensors <- start + aggregate (aggregate.apply_update_), so all ranks end with the same bits.
    f, trim, multi: as in `aggregate.aggregate`.  group, deadline, privacy, timeout: as in `fedavg_`.
    Raises NothingToAverageError on every rank when A is empty (the caller keeps `start`, for example).
    """
    from ..chunks.kernels import pack_segments

    pg = _resolve_group(group)
    try:
        mechanisms = resolve_privacy(privacy, pg.config)
        rule = agg.canonical_rule(rule)
        if not isinstance(update, torch.Tensor) or update.dtype != torch.float32 or update.dim() != 1:
            raise FLTorrentError("aggregate_: update must be a 1-D float32 tensor (aggregate.flat_update)")
        w = float(weight)
        if not np.isfinite(w) or w < 0:
            raise FLTorrentError(f"aggregate_: weight must be finite and >= 0, got {weight}")
        layout = Layout.from_specs([("update", "float32", (update.numel(),))])
        payload = to_host(pack_segments([update.detach()], layout))
    except Exception as e:
        pg.swarm_round(np.zeros(0, dtype=np.uint8), reject=e, timeout_s=timeout)
        raise
    nb = update.numel() * 4

    def consume(res: Any) -> tuple[list[int], list[np.ndarray], list[float], dict]:
        """On the comm thread, while the engine's buffers are valid: copy the agreed updates out."""
        parts = [int(r) for r in np.asarray(res.participants).tolist()]
        for r in parts:
            u = res.updates[r]
            if u is None or u.size < nb:
                raise IntegrityError(
                    f"aggregate_: participant {r}'s update is {None if u is None else u.size} bytes, expected {nb}"
                )
        st = dict(res.stats or {})
        if pg.config.nonfinite == "reject":
            st["nonfinite"] = [r for r in parts if not finite_update(res.updates[r][:nb], layout)]
            parts = [r for r in parts if r not in st["nonfinite"]]
        rows = [np.array(res.updates[r][:nb], copy=True).view(np.float32) for r in parts]
        return parts, rows, [float(res.weights[r]) for r in parts], st

    parts, rows, weights, st = pg.swarm_round(
        payload,
        weight=w,
        privacy=mechanisms,
        deadline_s=deadline,
        timeout_s=timeout,
        digest=layout.fingerprint,
        consume=consume,
    )
    if not parts:  # nobody's update was reconstructed everywhere by the deadline: every rank sees this
        raise NothingToAverageError(f"aggregate_: nothing to aggregate with {rule} (the agreed set is empty)")
    upd = to_device(np.stack(rows), update.device)  # aggregate_ stages through the host: counted
    res = agg.aggregate(rule, upd, weights, f=f, trim=trim, multi=multi)
    agg.apply_update_(tensors, start, res)
    return _report(parts, weights, nb, st)
