"""DistributedDataParallel, FSDP and FSDP2 on the "fltorrent" backend, against the same runs on gloo.

With float64 models, dyadic weights (re-quantised after every SGD step) and small integer data every
product and sum is exact, so DDP gradients must equal
the gloo run bit for bit (at group sizes 1, 2 and 4, where DDP's divide by the world size is exact too);
random data must agree to rounding and be bit-identical across ranks.

    .venv/bin/mpiexec -n 4 .venv/bin/python -m pytest --with-mpi -q tests/mpi/test_backend_ddp.py
"""

from __future__ import annotations

import traceback
import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import fltorrent_hpc  # noqa: F401
from fltorrent_hpc.config import SwarmConfig

pytestmark = [
    pytest.mark.mpi(min_size=1),
    pytest.mark.timeout(150),
    pytest.mark.filterwarnings("ignore::FutureWarning"),  # torch 2.13 renames; we test old and new names
]
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning)

CFG = SwarmConfig(chunk_bytes=256, privacy="none", timeout_s=60.0)


def _init() -> None:
    if not dist.is_initialized():
        dist.init_process_group("fltorrent", pg_options=CFG, timeout=timedelta(seconds=60))
    if dist.get_backend() != "fltorrent":  # another test file in this process made a different default group
        pytest.skip("needs 'fltorrent' as the default group: run this file in its own mpiexec")


def all_ok(fn) -> None:
    from mpi4py import MPI

    try:
        errs = list(fn() or [])
    except Exception:
        errs = [traceback.format_exc()]
    reports = MPI.COMM_WORLD.allgather([e[-1500:] for e in errs[:4]])
    bad = {r: e for r, e in enumerate(reports) if e}
    assert not bad, "\n".join(f"rank {r}: {e}" for r, e in bad.items())


@pytest.fixture(scope="module")
def groups():
    _init()
    world = dist.get_world_size()
    out = {}
    for k in range(1, world + 1):
        fl = dist.new_group(list(range(k)), backend="fltorrent", pg_options=CFG)
        gl = dist.new_group(list(range(k)), backend="gloo")
        out[k] = (fl, gl) if dist.get_rank() < k else None
    return out


def _model(dyadic: bool, bn: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(8, 16), nn.ReLU()]
    if bn:
        layers.append(nn.BatchNorm1d(16))
    layers += [nn.Linear(16, 600), nn.ReLU(), nn.Linear(600, 4)]  # 600x16 weights: several DDP buckets
    m = nn.Sequential(*layers)
    if dyadic:  # float64 + small dyadic values: every product and sum of a few steps is exact
        m = m.double()
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(torch.randint(-4, 5, p.shape, generator=g).double() / 8)
    return m


def _batch(rank: int, step: int, dyadic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + 10 * step + rank)
    if dyadic:
        return torch.randint(-2, 3, (4, 8), generator=g).double(), torch.randint(-2, 3, (4, 4), generator=g).double()
    return torch.randn(4, 8, generator=g), torch.randn(4, 4, generator=g)


def _train(group, dyadic: bool, steps: int = 3, **ddp_kw) -> tuple[list, list]:
    m = _model(dyadic, bn=ddp_kw.pop("bn", False))
    ddp = DDP(m, process_group=group, bucket_cap_mb=0.01, **ddp_kw)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.125)
    grads = []
    for step in range(steps):
        x, y = _batch(dist.get_rank(), step, dyadic)
        opt.zero_grad()
        out = ddp(x)
        loss = (out * y).sum() if dyadic else ((out - y) ** 2).mean()
        loss.backward()
        grads.append([p.grad.clone() for p in m.parameters()])
        opt.step()
        if dyadic:  # quantise like low-precision training, so the next step's arithmetic stays exact too
            with torch.no_grad():
                for p in m.parameters():
                    p.copy_(torch.round(p * 64) / 64)
    return grads, [t.detach().clone() for t in m.state_dict().values()]


def _equal(a: list, b: list) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_ddp_gradients_equal_gloo_exactly(groups):
    def body():
        errs = []
        for k, pair in groups.items():
            if pair is None or k == 3:  # DDP divides by k before the sum: exact only for powers of two
                continue
            fl, gl = pair
            g1, p1 = _train(fl, dyadic=True)
            g2, p2 = _train(gl, dyadic=True)
            for s, (a, b) in enumerate(zip(g1, g2)):
                if not _equal(a, b):
                    errs.append(f"k={k} step {s}: gradients differ from gloo")
            if not _equal(p1, p2):
                errs.append(f"k={k}: parameters after 3 SGD steps differ from gloo")
        return errs

    all_ok(body)


def test_ddp_random_data_close_to_gloo_and_identical_across_ranks(groups):
    from mpi4py import MPI

    res = {}

    def body():
        errs = []
        for k, pair in groups.items():
            if pair is None:
                continue
            fl, gl = pair
            g1, p1 = _train(fl, dyadic=False)
            g2, p2 = _train(gl, dyadic=False)
            for a, b in zip(g1[-1], g2[-1]):
                if not torch.allclose(a, b, rtol=1e-5, atol=1e-6):
                    errs.append(f"k={k}: gradients far from gloo ({(a - b).abs().max():.3g})")
            if k == dist.get_world_size():
                res["params"] = b"".join(t.numpy().tobytes() for t in p1)
        return errs

    all_ok(body)
    blobs = MPI.COMM_WORLD.allgather(res.get("params"))
    assert all(b == blobs[0] for b in blobs), "DDP parameters differ across ranks"


def test_ddp_options_buffers_no_sync_and_comm_hook(groups):
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    def body():
        errs = []
        world = dist.get_world_size()
        if world == 3:
            return errs
        fl, gl = groups[world]
        # BatchNorm buffers broadcast from rank 0 on every forward
        # (BatchNorm divides by a standard deviation: not exact, so gloo's summation order shows)
        _, p1 = _train(fl, dyadic=True, bn=True, broadcast_buffers=True)
        _, p2 = _train(gl, dyadic=True, bn=True, broadcast_buffers=True)
        if not all(torch.allclose(a.double(), b.double(), rtol=1e-12, atol=1e-12) for a, b in zip(p1, p2)):
            errs.append("broadcast_buffers run differs from gloo")
        # gradient_as_bucket_view and static_graph
        _, p1 = _train(fl, dyadic=True, gradient_as_bucket_view=True, static_graph=True)
        _, p2 = _train(gl, dyadic=True, gradient_as_bucket_view=True, static_graph=True)
        if not _equal(p1, p2):
            errs.append("gradient_as_bucket_view/static_graph run differs from gloo")
        # a Python comm hook (dist.all_reduce(async_op=True).get_future() on our group) and no_sync accumulation
        outs = []
        for group in (fl, gl):
            m = _model(True)
            ddp = DDP(m, process_group=group, bucket_cap_mb=0.01)
            ddp.register_comm_hook(group, default_hooks.allreduce_hook)
            x, y = _batch(dist.get_rank(), 0, True)
            with ddp.no_sync():
                (ddp(x) * y).sum().backward()
            (ddp(x * 2) * y).sum().backward()
            outs.append([p.grad.clone() for p in m.parameters()])
        if not _equal(*outs):
            errs.append("comm hook + no_sync gradients differ from gloo")
        return errs

    all_ok(body)


def test_fsdp2_fully_shard_forward_backward(groups):
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    def run(group):
        m = _model(True)
        mesh = DeviceMesh.from_group(group, "cpu")
        for layer in m:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(m, mesh=mesh)
        x, y = _batch(dist.get_rank(), 0, True)
        (m(x) * y).sum().backward()
        return [p.grad.full_tensor() for p in m.parameters()]

    def body():
        world = dist.get_world_size()
        fl, gl = groups[world]
        a, b = run(fl), run(gl)
        tol = 0 if world != 3 else 1e-6
        if not all(torch.allclose(x, y, rtol=tol, atol=tol) for x, y in zip(a, b)):
            return ["FSDP2 gradients differ from gloo"]
        return []

    all_ok(body)


def test_fsdp1_forward_backward(groups):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    def run(group):
        m = _model(True)
        f = FSDP(m, process_group=group, device_id=torch.device("cpu"), use_orig_params=True)
        x, y = _batch(dist.get_rank(), 0, True)
        (f(x) * y).sum().backward()
        with FSDP.summon_full_params(f, with_grads=True):
            return [p.grad.clone() for p in m.parameters()]

    def body():
        world = dist.get_world_size()
        fl, gl = groups[world]
        a, b = run(fl), run(gl)
        tol = 0 if world != 3 else 1e-6
        if not all(torch.allclose(x, y, rtol=tol, atol=tol) for x, y in zip(a, b)):
            return ["FSDP1 gradients differ from gloo"]
        return []

    all_ok(body)


def test_functional_collectives_and_dtensor(groups):
    """torch 2.13 routes functional collectives of a Python group to its *_coalesced methods: check them."""
    import torch.distributed._functional_collectives as fc
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    def body():
        errs = []
        me, n = dist.get_rank(), dist.get_world_size()
        pg = dist.group.WORLD
        r = fc.all_reduce(torch.full((3,), float(me)), "sum", pg)
        if not torch.equal(fc.wait_tensor(r), torch.full((3,), float(sum(range(n))))):
            errs.append("funcol all_reduce")
        g = fc.all_gather_tensor(torch.full((2,), float(me)), 0, pg)
        if not torch.equal(fc.wait_tensor(g), torch.arange(n).float().repeat_interleave(2)):
            errs.append("funcol all_gather_tensor")
        rs = fc.reduce_scatter_tensor(torch.arange(2.0 * n) + me, "sum", 0, pg)
        want = (torch.arange(2.0 * n) * n + sum(range(n)))[2 * me : 2 * me + 2]
        if not torch.equal(fc.wait_tensor(rs), want):
            errs.append("funcol reduce_scatter_tensor")
        mesh = DeviceMesh.from_group(pg, "cpu")
        d = distribute_tensor(torch.arange(4.0 * n), mesh, [Shard(0)])
        if not torch.equal(d.redistribute(mesh, [Replicate()]).to_local(), torch.arange(4.0 * n)):
            errs.append("DTensor Shard -> Replicate")
        return errs

    all_ok(body)
