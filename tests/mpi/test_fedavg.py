"""fedavg_: weighted FedAvg in place, bit-exact on every rank, with and without a silent peer.

.venv/bin/mpiexec -n 4 .venv/bin/python -m pytest --with-mpi -q tests/mpi/test_fedavg.py
"""

from __future__ import annotations

import dataclasses
import warnings
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
from dist_harness import all_ok, gather, group_sizes

import fltorrent_hpc
from fltorrent_hpc.api.fedavg import FedAvgReport, _standalone_group
from fltorrent_hpc.config import SwarmConfig
from fltorrent_hpc.errors import FLTorrentError, ShapeMismatchError

pytestmark = [
    pytest.mark.mpi(min_size=1),
    pytest.mark.timeout(120),
    pytest.mark.filterwarnings("ignore::FutureWarning"),  # torch 2.13 renames; we test old and new names
]
warnings.filterwarnings("ignore", category=FutureWarning)


def _cfg(**kw) -> SwarmConfig:
    """A SwarmConfig with the knobs this SwarmConfig knows (stage_timeout_s bounds the silent-peer round)."""
    known = {f.name for f in dataclasses.fields(SwarmConfig)}
    return SwarmConfig(**{k: v for k, v in kw.items() if k in known})


CFG = _cfg(chunk_bytes=256, privacy="none", timeout_s=60.0, stage_timeout_s=5.0)
FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _init() -> None:
    if not dist.is_initialized():
        dist.init_process_group("fltorrent", pg_options=CFG, timeout=timedelta(seconds=60))
    if dist.get_backend() != "fltorrent":  # another test file in this process made a different default group
        pytest.skip("needs 'fltorrent' as the default group: run this file in its own mpiexec")


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def by_hand(xs: dict[int, list[torch.Tensor]], ws: dict[int, float], parts: list[int]) -> list[torch.Tensor]:
    """The documented FedAvg: fp32 acc += fl32(fl32(w) * x) in rank order, then dtype(fl32(acc / fl32(W)))."""
    total = torch.tensor([sum(ws[r] for r in parts)], dtype=torch.float32)
    out = []
    for j, t0 in enumerate(xs[parts[0]]):
        acc = torch.zeros(t0.shape, dtype=torch.float32)
        for r in parts:
            acc = acc + xs[r][j].float() * torch.tensor(ws[r], dtype=torch.float32)
        out.append((acc / total).to(t0.dtype))
    return out


def exact_weights(k: int) -> list[float]:
    """Unequal weights 1, 2, 3, ... with the last one topping the sum up to a power of two (exact division)."""
    ws = [float(r + 1) for r in range(k - 1)]
    total = 1
    while total <= sum(ws):
        total *= 2
    return ws + [float(total - sum(ws))] if k > 1 else [1.0]


def tensors_for(rank: int, seed: int, exact: bool) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(rank * 1009 + seed)
    shapes = [(0,), (1,), (37,), (5, 7), (1200,)]  # several 256-byte chunks
    out = []
    for i, shp in enumerate(shapes):
        dt = FLOATS[i % len(FLOATS)]
        if exact:
            x = torch.randint(-16, 17, shp, generator=g).to(dt)
        else:
            x = torch.randn(shp, generator=g).to(dt)
        out.append(x)
    return out


def world_group(groups):  # the world-sized group made with this file's config
    return groups[dist.get_world_size()]


@pytest.fixture(scope="module")
def groups():
    _init()
    world = dist.get_world_size()
    out = {}
    for k in group_sizes(world):
        g = dist.new_group(list(range(k)), backend="fltorrent", pg_options=CFG)
        out[k] = g if dist.get_rank() < k else None
    return out


def test_unequal_weights_equal_hand_average_bit_exact(groups):
    def body():
        errs = []
        for k, g in groups.items():
            if g is None:
                continue
            me = dist.get_rank()
            ws = exact_weights(k)
            for exact in (True, False):
                xs = {r: tensors_for(r, 7 + k, exact) for r in range(k)}
                mine = [t.clone() for t in xs[me]]
                rep = fltorrent_hpc.fedavg_(mine, weight=ws[me], group=g)
                ref = by_hand(xs, dict(enumerate(ws)), list(range(k)))
                for j, (a, b) in enumerate(zip(mine, ref)):
                    if not same(a, b):
                        errs.append(f"k={k} exact={exact} tensor {j} {a.dtype}: {a.flatten()[:3]} != {b.flatten()[:3]}")
                if exact:  # with exact data the fp32 formula is the true weighted mean
                    W = sum(ws)
                    for j, a in enumerate(mine):
                        mean = sum(ws[r] * xs[r][j].double() for r in range(k)) / W
                        if not same(a, mean.to(a.dtype)):
                            errs.append(f"k={k} tensor {j}: not the exact weighted mean")
                if not isinstance(rep, FedAvgReport) or rep.participants != list(range(k)):
                    errs.append(f"report {rep}")
                if rep.weights != ws or rep.nbytes <= 0:
                    errs.append(f"report weights/bytes {rep.weights} {rep.nbytes}")
        return errs

    all_ok(body)
    # bit-identical on all ranks of the world group
    t = tensors_for(dist.get_rank(), 99, exact=False)
    fltorrent_hpc.fedavg_(t, weight=1.0 + dist.get_rank())
    blobs = gather(b"".join(x.view(torch.uint8).numpy().tobytes() for x in t if x.numel()))
    assert all(b == blobs[0] for b in blobs)


def silent_group(silent: int, cfg=CFG):
    """A world-sized fltorrent group whose rank `silent` goes silent from stage 1 of every round: its engine
    runs over a FaultyTransport (the test-only fault injection of the transport layer)."""
    from fltorrent_hpc.api import group as flg
    from fltorrent_hpc.runtime.engine import SwarmEngine
    from fltorrent_hpc.transport.faulty import Fault, FaultyTransport

    def factory(net, config):  # net: the group's transport (MPI or torch-native)
        if dist.get_rank() == silent:
            net = FaultyTransport(net, [Fault("silent", from_stage=1)])
        return SwarmEngine(net, config)

    flg._engine_factory = factory
    try:
        return dist.new_group(list(range(dist.get_world_size())), backend="fltorrent", pg_options=cfg)
    finally:
        flg._engine_factory = None


@pytest.mark.parametrize("protocol", ["paper", "hidden"])
def test_one_silent_peer_is_left_out_identically(groups, protocol):
    """The others average without the silent peer, bit-identically; the silent peer either holds the same
    result or (it stopped receiving too) keeps its own tensors with report.applied False.  Under the hidden
    protocol its whole update left in the seed stage (stage 0, unpaced) before it fell silent: it reached
    every rank and is averaged, while the silent rank itself, lacking the others', reports applied False."""
    world = dist.get_world_size()
    if world < 3:  # with two, the tracker is left alone, and a tracker left alone fails the round by design
        pytest.skip("needs three ranks")
    silent = world - 1
    me = dist.get_rank()
    ws = {r: float(r + 1) for r in range(world)}
    xs = {r: tensors_for(r, 555, exact=False) for r in range(world)}
    mine = [t.clone() for t in xs[me]]
    box = {}
    group = silent_group(silent, CFG.replace(protocol=protocol))

    def body():
        rep = fltorrent_hpc.fedavg_(mine, weight=ws[me], group=group, privacy="full")
        box["rep"] = rep
        parts = [r for r in range(world) if r != silent or protocol == "hidden"]
        if me == silent and not rep.applied:
            return [] if all(same(a, b) for a, b in zip(mine, xs[me])) else ["silent rank's tensors changed"]
        errs = [] if rep.participants == parts else [f"participants {rep.participants}, expected {parts}"]
        for j, (a, b) in enumerate(zip(mine, by_hand(xs, ws, parts))):
            if not same(a, b):
                errs.append(f"tensor {j}: silent-peer average differs from by-hand over {parts}")
        return errs

    all_ok(body)
    applied = box["rep"].applied
    blob = b"".join(x.view(torch.uint8).numpy().tobytes() for x in mine if x.numel()) if applied else None
    blobs = [b for b in gather(blob) if b is not None]
    assert len(blobs) >= world - 1 and all(b == blobs[0] for b in blobs), "ranks hold different averages"


def test_module_parameters_and_buffers_in_place(groups):
    def body():
        errs = []
        me, n = dist.get_rank(), dist.get_world_size()
        torch.manual_seed(1234 + me)  # different models per rank
        m = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 2))
        m(torch.randn(8, 6))  # moves BatchNorm running stats
        ids = {name: p.data_ptr() for name, p in m.named_parameters()}
        before = {k: v.clone() for k, v in m.state_dict().items()}
        states = [None] * n
        dist.all_gather_object(states, before)  # to compute the expected average by hand
        rep = fltorrent_hpc.fedavg_(m, weight=2.0 if me == 0 else 1.0, group=world_group(groups))
        ws = {r: 2.0 if r == 0 else 1.0 for r in range(n)}
        for name, t in m.state_dict().items():
            if t.dtype == torch.int64:  # num_batches_tracked stays local
                if not same(t, before[name]):
                    errs.append(f"{name} (int) changed")
                continue
            ref = by_hand({r: [states[r][name]] for r in range(n)}, ws, list(range(n)))[0]
            if not same(t, ref):
                errs.append(f"{name}: not the weighted average")
        if any(p.data_ptr() != ids[name] for name, p in m.named_parameters()):
            errs.append("parameters were replaced instead of written in place")
        if rep.participants != list(range(n)):
            errs.append(f"participants {rep.participants}")
        return errs

    all_ok(body)


def test_mismatched_models_raise_on_every_rank(groups):
    if dist.get_world_size() < 2:
        pytest.skip("needs two ranks")

    def body():
        me = dist.get_rank()
        ts = [torch.ones(4 if me != 1 else 5)]
        try:
            fltorrent_hpc.fedavg_(ts, weight=1.0, group=world_group(groups))
            return ["no error"]
        except ShapeMismatchError as e:
            return [] if "rank" in str(e) else [f"unclear: {e}"]

    all_ok(body)

    def body2():  # same sizes, different shapes: the layout digest differs
        me = dist.get_rank()
        ts = [torch.ones((2, 3) if me != 1 else (3, 2))]
        try:
            fltorrent_hpc.fedavg_(ts, weight=1.0, group=world_group(groups))
            return ["no error"]
        except ShapeMismatchError:
            return []

    all_ok(body2)


def test_bad_argument_on_one_rank_raises_everywhere(groups):
    if dist.get_world_size() < 2:
        pytest.skip("needs two ranks")

    def body():
        me = dist.get_rank()
        errs = []
        for bad in ("weight", "dtype"):
            ts = [torch.ones(3, dtype=torch.int64 if (bad == "dtype" and me == 1) else torch.float32)]
            w = -1.0 if (bad == "weight" and me == 1) else 1.0
            try:
                fltorrent_hpc.fedavg_(ts, weight=w, group=world_group(groups))
                errs.append(f"{bad}: no error")
            except FLTorrentError as e:
                if me != 1 and "rejected" not in str(e):
                    errs.append(f"{bad}: unclear on a healthy rank: {e}")
        t = [torch.full((3,), float(me))]
        fltorrent_hpc.fedavg_(t, weight=1.0, group=world_group(groups))  # the group is still in step
        if not torch.allclose(t[0], torch.full((3,), (dist.get_world_size() - 1) / 2)):
            errs.append(f"after errors: {t[0]}")
        return errs

    all_ok(body)


def test_zero_total_weight_raises_everywhere(groups):
    def body():
        try:
            fltorrent_hpc.fedavg_([torch.ones(3)], weight=0.0, group=world_group(groups))
            return ["no error"]
        except FLTorrentError as e:
            return [] if "weight" in str(e) else [f"unclear: {e}"]

    all_ok(body)


def test_standalone_group_without_torch_distributed(groups):
    """fedavg_ over a private COMM_WORLD group (what group=None uses when dist is not initialised)."""

    def body():
        me, n = dist.get_rank(), dist.get_world_size()
        pg = _standalone_group()
        t = [torch.full((10,), float(me))]
        rep = fltorrent_hpc.fedavg_(t, weight=1.0, group=pg, privacy="none")
        want = torch.full((10,), sum(range(n)) / n)
        errs = [] if torch.allclose(t[0], want) else [f"standalone average {t[0][:3]}"]
        if rep.participants != list(range(n)):
            errs.append(f"participants {rep.participants}")
        return errs

    all_ok(body)


def test_fedavg_with_full_privacy_and_report_times(groups):
    g = dist.new_group(backend="fltorrent", pg_options=_cfg(chunk_bytes=128, timeout_s=60.0, stage_timeout_s=5.0))

    def body():
        me, n = dist.get_rank(), dist.get_world_size()
        xs = {r: tensors_for(r, 31, exact=True) for r in range(n)}
        mine = [t.clone() for t in xs[me]]
        rep = fltorrent_hpc.fedavg_(mine, weight=1.0, group=g, privacy="full")
        errs = []
        for a, b in zip(mine, by_hand(xs, dict.fromkeys(range(n), 1.0), list(range(n)))):
            if not same(a, b):
                errs.append("privacy=full FedAvg differs")
        if not (rep.round_s >= 0 and rep.swarm_s >= 0 and rep.warmup_s >= 0 and np.isfinite(rep.round_s)):
            errs.append(f"report times {rep}")
        return errs

    all_ok(body)
    dist.destroy_process_group(g)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fedavg_cuda_parameters_stay_on_device(groups):
    def body():
        me, n = dist.get_rank(), dist.get_world_size()
        dev = torch.device("cuda", me % torch.cuda.device_count())
        xs = {r: tensors_for(r, 77, exact=False) for r in range(n)}
        mine = [t.clone().to(dev) for t in xs[me]]
        ptrs = [t.data_ptr() for t in mine]
        fltorrent_hpc.fedavg_(mine, weight=float(me + 1), group=world_group(groups))
        ref = by_hand(xs, {r: float(r + 1) for r in range(n)}, list(range(n)))
        errs = [f"tensor {j}" for j, (a, b) in enumerate(zip(mine, ref)) if not same(a.cpu(), b)]
        if [t.data_ptr() for t in mine] != ptrs or not all(t.is_cuda for t in mine):
            errs.append("parameters moved off their device")
        return errs

    all_ok(body)


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_a_non_finite_update_is_left_out_and_named_on_every_rank(groups, bad_value):
    """One rank's update holds a NaN (or Inf): every rank leaves it out of the average (the same verdict
    everywhere, from the same agreed bytes), names it in the report, and averages the others bit-identically."""
    world = dist.get_world_size()
    if world < 2:
        pytest.skip("needs two ranks")
    bad, me = world - 1, dist.get_rank()
    ws = {r: float(r + 1) for r in range(world)}
    xs = {r: tensors_for(r, 777, exact=False) for r in range(world)}
    xs[bad][4][17] = bad_value  # one float32 of the 1200-element tensor
    mine = [t.clone() for t in xs[me]]

    def body():
        rep = fltorrent_hpc.fedavg_(mine, weight=ws[me], group=world_group(groups))
        parts = [r for r in range(world) if r != bad]
        errs = [] if rep.participants == parts else [f"participants {rep.participants}, expected {parts}"]
        errs += [] if rep.nonfinite == [bad] else [f"nonfinite {rep.nonfinite}, expected [{bad}]"]
        for j, (a, b) in enumerate(zip(mine, by_hand(xs, ws, parts))):
            if not same(a, b):
                errs.append(f"tensor {j}: average differs from by-hand over {parts}")
        return errs

    all_ok(body)
