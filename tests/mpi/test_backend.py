"""Differential tests of the "fltorrent" backend against gloo on the same inputs, in the same job.

For every group size k = 1..world, a fltorrent group and a gloo group over ranks 0..k-1 run the same
collective on the same inputs.  Inputs are small integers (exact in every dtype, so any summation order
gives the same bits): fltorrent must equal gloo bit for bit and equal a by-hand reduction in rank order.
Random float inputs check bit-identity across ranks and closeness to gloo (gloo sums in its own order).
Every test asserts only after all ranks agreed on pass/fail.

    .venv/bin/mpiexec -n 4 .venv/bin/python -m pytest --with-mpi -q tests/mpi/test_backend.py
"""

from __future__ import annotations

import threading
import time
import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from dist_harness import all_ok, gather, group_sizes
from torch.distributed.distributed_c10d import AllgatherOptions

import fltorrent_hpc  # noqa: F401  (registers the backend, fills env:// variables under mpiexec)
from fltorrent_hpc.api import bench, registration
from fltorrent_hpc.config import SwarmConfig
from fltorrent_hpc.errors import FLTorrentError, PeerTimeoutError, ShapeMismatchError

pytestmark = [
    pytest.mark.mpi(min_size=1),
    pytest.mark.timeout(150),
    pytest.mark.filterwarnings("ignore::FutureWarning"),  # torch 2.13 renames; we test old and new names
]
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning, module="torch.distributed")

CFG = SwarmConfig(chunk_bytes=256, privacy="none", timeout_s=60.0)
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64]
SIZES = [0, 1, 37, 1500]  # empty, one element, odd, several 256-byte chunks
R = dist.ReduceOp


# ------------------------------------------------------------------------------------------ harness


def _init() -> None:
    if not dist.is_initialized():
        dist.init_process_group("fltorrent", pg_options=CFG, timeout=timedelta(seconds=60))
    if dist.get_backend() != "fltorrent":  # another test file in this process made a different default group
        pytest.skip("needs 'fltorrent' as the default group: run this file in its own mpiexec")


def make(rank: int, case: int, dtype: torch.dtype, shape, lo: int = -8, hi: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(rank * 1_000_003 + case)
    return torch.randint(lo, hi + 1, tuple(shape) if isinstance(shape, tuple) else (shape,), generator=g).to(dtype)


def make_float(rank: int, case: int, dtype: torch.dtype, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(rank * 7_000_003 + case)
    return (torch.randn(n, generator=g, dtype=torch.float64) * 3).to(dtype)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def by_hand(parts, kind, factor=None):
    """Reduction in rank order in the tensors' own dtype (the backend's documented semantics)."""
    if kind == R.PREMUL_SUM:
        acc = parts[0] * factor
        for p in parts[1:]:
            acc = acc + p * factor
        return acc
    acc = parts[0].clone()
    for p in parts[1:]:
        if kind in (R.SUM, R.AVG):
            acc.add_(p)
        elif kind == R.PRODUCT:
            acc.mul_(p)
        elif kind == R.MIN:
            acc = torch.minimum(acc, p)
        elif kind == R.MAX:
            acc = torch.maximum(acc, p)
        elif kind == R.BAND:
            acc.bitwise_and_(p)
        elif kind == R.BOR:
            acc.bitwise_or_(p)
        elif kind == R.BXOR:
            acc.bitwise_xor_(p)
    if kind == R.AVG:
        acc.div_(len(parts))
    return acc


def run(fn, *args, async_op: bool, **kwargs):
    """Call a torch.distributed function sync or async; async returns the future's value after wait()."""
    w = fn(*args, async_op=async_op, **kwargs)
    if async_op:
        assert w is not None
        w.wait()
        return w.get_future().value()
    return None


@pytest.fixture(scope="module")
def groups():
    _init()
    world = dist.get_world_size()
    out = {}
    for k in group_sizes(world):
        fl = dist.new_group(list(range(k)), backend="fltorrent", pg_options=CFG)
        gl = dist.new_group(list(range(k)), backend="gloo")
        out[k] = (fl, gl) if dist.get_rank() < k else None
    return out


def each_group(groups):
    for k, pair in groups.items():
        if pair is not None:
            yield k, pair[0], pair[1]


# ------------------------------------------------------------------------------------------ identity


def test_registration_and_identity(groups):
    def body():
        errs = []
        pg = dist.group.WORLD
        if dist.get_backend() != "fltorrent" or pg.getBackendName() != "fltorrent" or pg.name() != "fltorrent":
            errs.append(f"backend name: {dist.get_backend()} {pg.getBackendName()}")
        registration.register_backend()  # idempotent
        if "FLTORRENT" not in dist.Backend._plugins:
            errs.append("not registered")
        if not pg.group_name:
            errs.append("group_name empty")
        return errs

    all_ok(body)


def test_new_group_is_exact_subcommunicator(groups):
    world = dist.get_world_size()
    ranks = [r for r in range(world) if r % 2 == 1] or [0]
    g = dist.new_group(ranks, backend="fltorrent", pg_options=CFG)

    def body():
        if dist.get_rank() not in ranks:
            return [] if g == dist.GroupMember.NON_GROUP_MEMBER else ["non-member got a group"]
        errs = []
        comm = g._comm
        if comm is not None:  # the MPI transport: the sub-communicator holds exactly those world ranks
            from mpi4py import MPI

            got = MPI.Group.Translate_ranks(comm.Get_group(), list(range(comm.Get_size())), MPI.COMM_WORLD.Get_group())
            errs += [] if list(got) == ranks else [f"sub-communicator holds world ranks {got}, wanted {ranks}"]
        if (g.rank(), g.size()) != (ranks.index(dist.get_rank()), len(ranks)):
            errs.append(f"group rank/size {g.rank()}/{g.size()} for world rank {dist.get_rank()} of {ranks}")
        t = torch.tensor([float(dist.get_rank())])
        dist.all_reduce(t, group=g)
        if t.item() != float(sum(ranks)):
            errs.append(f"subgroup all_reduce {t.item()} != {sum(ranks)}")
        if dist.get_process_group_ranks(g) != ranks:
            errs.append(f"torch ranks {dist.get_process_group_ranks(g)}")
        return errs

    all_ok(body)
    if g != dist.GroupMember.NON_GROUP_MEMBER:
        dist.destroy_process_group(g)


# ------------------------------------------------------------------------------------------ all_reduce

_GLOO_OPS = (R.SUM, R.PRODUCT, R.MIN, R.MAX, R.BAND, R.BOR, R.BXOR)


def _ops_for(dtype):
    if dtype.is_floating_point:
        return [R.SUM, R.AVG, "premul", R.PRODUCT, R.MIN, R.MAX]
    return [R.SUM, R.PRODUCT, R.MIN, R.MAX, R.BAND, R.BOR, R.BXOR]


def test_all_reduce_vs_gloo(groups):
    def body():
        errs = []
        case = 0
        for k, fl, gl in each_group(groups):
            case = k * 100_000
            me = dist.get_rank()
            for dtype in DTYPES:
                for n in SIZES:
                    for op in _ops_for(dtype):
                        case += 1
                        lo, hi = (-2, 2) if op == R.PRODUCT else (-8, 8)
                        xs = [make(r, case, dtype, n, lo, hi) for r in range(k)]
                        if op == "premul":
                            rop, kind, factor = dist._make_nccl_premul_sum(0.5), R.PREMUL_SUM, 0.5
                        else:
                            rop, kind, factor = op, op, None
                        ref = by_hand(xs, kind, factor)
                        t = xs[me].clone()
                        a = case % 2 == 1
                        val = run(dist.all_reduce, t, op=rop, group=fl, async_op=a)
                        if not same(t, ref):
                            errs.append(f"k={k} {dtype} n={n} {kind}: fl {t[:4]} != by-hand {ref[:4]}")
                        if val is not None and val[0] is not t:
                            errs.append(f"k={k} {dtype} n={n} {kind}: future value is not the input tensor")
                        if kind in _GLOO_OPS:
                            tg = xs[me].clone()
                            dist.all_reduce(tg, op=rop, group=gl)
                            if not same(t, tg):
                                errs.append(f"k={k} {dtype} n={n} {kind}: fl {t[:4]} != gloo {tg[:4]}")
        return errs

    all_ok(body)


def test_all_reduce_random_floats_rank_order_and_identical(groups):
    def body():
        errs = []
        for k, fl, gl in each_group(groups):
            me = dist.get_rank()
            for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
                xs = [make_float(r, 11, dtype, 1001) for r in range(k)]
                t = xs[me].clone()
                dist.all_reduce(t, group=fl)
                if not same(t, by_hand(xs, R.SUM)):
                    errs.append(f"k={k} {dtype}: not the rank-order sum")
                tg = xs[me].clone()
                dist.all_reduce(tg, group=gl)
                tol = {torch.float32: 1e-5, torch.float64: 1e-12}.get(dtype, 3e-2)
                if not torch.allclose(t.double(), tg.double(), rtol=tol, atol=tol * 10):
                    errs.append(f"k={k} {dtype}: far from gloo")
        return errs

    all_ok(body)
    # bit-identical on every rank of the world group
    t = make_float(dist.get_rank(), 5, torch.float32, 333)
    dist.all_reduce(t, op=R.AVG)
    digests = gather(t.numpy().tobytes())
    assert all(d == digests[0] for d in digests)


def test_all_reduce_bare_reduceop_and_options(groups):
    def body():
        errs = []
        pg = dist.group.WORLD
        k = dist.get_world_size()
        for opts in (R.MAX, dist.ReduceOp(R.MAX), _allreduce_opts(R.MAX), R.MAX):
            t = torch.tensor([float(dist.get_rank()), -float(dist.get_rank())])
            pg.allreduce([t], opts).wait()
            if t.tolist() != [float(k - 1), 0.0]:
                errs.append(f"{opts}: {t}")
        return errs

    all_ok(body)


def _allreduce_opts(op):
    o = dist.AllreduceOptions()
    o.reduceOp = op
    return o


def test_all_reduce_coalesced_vs_gloo(groups):
    def body():
        errs = []
        for k, fl, gl in each_group(groups):
            me = dist.get_rank()
            for case, dtype in enumerate(DTYPES):
                ts = [make(me, 100 + case * 3 + j, dtype, n) for j, n in enumerate((0, 5, 1501))]
                gs = [t.clone() for t in ts]
                fl.allreduce_coalesced(ts, dist.AllreduceCoalescedOptions()).wait()
                dist.all_reduce_coalesced(gs, group=gl)
                if not all(same(a, b) for a, b in zip(ts, gs)):
                    errs.append(f"k={k} {dtype}: allreduce_coalesced differs from gloo")
                # the coalescing manager fast path routes to allreduce_coalesced too
                cs = [make(me, 100 + case * 3 + j, dtype, n) for j, n in enumerate((0, 5, 1501))]
                with dist._coalescing_manager(group=fl):
                    for c in cs:
                        dist.all_reduce(c, group=fl)
                if not all(same(a, b) for a, b in zip(cs, gs)):
                    errs.append(f"k={k} {dtype}: coalescing manager result differs")
        return errs

    all_ok(body)


# ------------------------------------------------------------------------------------------ all_gather family


def test_all_gather_vs_gloo(groups):
    def body():
        errs = []
        case = 0
        for k, fl, gl in each_group(groups):
            case = k * 100_000
            me = dist.get_rank()
            for dtype in DTYPES:
                for shape in (0, 1, 37, 1500, (3, 7)):
                    case += 1
                    x = make(me, case, dtype, shape)
                    outs = [torch.empty_like(x) for _ in range(k)]
                    gouts = [torch.empty_like(x) for _ in range(k)]
                    a = case % 2 == 0
                    val = run(dist.all_gather, outs, x, group=fl, async_op=a)
                    dist.all_gather(gouts, x, group=gl)
                    ref = [make(r, case, dtype, shape) for r in range(k)]
                    if not all(same(o, g) and same(o, f) for o, g, f in zip(outs, gouts, ref)):
                        errs.append(f"k={k} {dtype} {shape}: all_gather differs")
                    if val is not None and not all(v is o for v, o in zip(val, outs)):
                        errs.append("all_gather future value is not the output list")
                    # in place: the input is this rank's slot of the output list
                    outs2 = [torch.zeros_like(x) for _ in range(k)]
                    outs2[me].copy_(x)
                    dist.all_gather(outs2, outs2[me], group=fl)
                    if not all(same(o, f) for o, f in zip(outs2, ref)):
                        errs.append(f"k={k} {dtype} {shape}: in-place all_gather differs")
        return errs

    all_ok(body)


def test_all_gather_into_tensor_vs_gloo(groups):
    def body():
        errs = []
        case = 0
        for k, fl, gl in each_group(groups):
            case = k * 100_000
            me = dist.get_rank()
            for dtype in DTYPES:
                for n in SIZES:
                    case += 1
                    x = make(me, case, dtype, n)
                    ref = torch.cat([make(r, case, dtype, n) for r in range(k)])
                    g = torch.empty(k * n, dtype=dtype)
                    dist.all_gather_into_tensor(g, x, group=gl)
                    for variant in ("dist", "single", "_allgather_base", "stacked", "inplace"):
                        out = torch.full((k * n,), 99, dtype=dtype)
                        a = (case + len(variant)) % 2 == 0
                        if variant == "dist":
                            run(dist.all_gather_into_tensor, out, x, group=fl, async_op=a)
                        elif variant == "single":
                            fl.all_gather_single(out, x, AllgatherOptions()).wait()
                        elif variant == "_allgather_base":
                            fl._allgather_base(out, x, AllgatherOptions()).wait()
                        elif variant == "stacked":
                            out2 = torch.empty((k, n), dtype=dtype)
                            dist.all_gather_into_tensor(out2, x, group=fl)
                            out = out2.reshape(-1)
                        else:
                            out[me * n : (me + 1) * n].copy_(x)
                            dist.all_gather_into_tensor(out, out[me * n : (me + 1) * n], group=fl)
                        if not (same(out, ref) and same(out, g)):
                            errs.append(f"k={k} {dtype} n={n} {variant}: differs from gloo/by-hand")
        return errs

    all_ok(body)


def test_all_gather_coalesced_vs_gloo(groups):
    def body():
        errs = []
        for k, fl, gl in each_group(groups):
            me = dist.get_rank()
            for case, dtype in enumerate(DTYPES):
                xs = [make(me, 300 + 3 * case + j, dtype, n) for j, n in enumerate((0, 3, 1501))]
                outs = [[torch.empty_like(x) for x in xs] for _ in range(k)]  # outs[r][j]: rank r's input j
                gouts = [[torch.empty_like(x) for x in xs] for _ in range(k)]
                fl.allgather_coalesced(outs, xs, AllgatherOptions()).wait()
                dist.all_gather_coalesced(gouts, xs, group=gl)
                if not all(same(a, b) for o, g in zip(outs, gouts) for a, b in zip(o, g)):
                    errs.append(f"k={k} {dtype}: allgather_coalesced differs from gloo")
                ref = [[make(r, 300 + 3 * case + j, dtype, n) for j, n in enumerate((0, 3, 1501))] for r in range(k)]
                if not all(same(a, b) for o, g in zip(outs, ref) for a, b in zip(o, g)):
                    errs.append(f"k={k} {dtype}: allgather_coalesced differs from by-hand")
                gouts = [[gouts[r][j] for r in range(k)] for j in range(len(xs))]  # per input, over ranks
                # into-tensor coalesced under both names
                for name in ("all_gather_single_coalesced", "allgather_into_tensor_coalesced"):
                    flats = [torch.empty(k * x.numel(), dtype=dtype) for x in xs]
                    getattr(fl, name)(flats, xs, AllgatherOptions()).wait()
                    if not all(same(f, torch.cat(g)) for f, g in zip(flats, gouts)):
                        errs.append(f"k={k} {dtype}: {name} differs")
        return errs

    all_ok(body)


# ------------------------------------------------------------------------------------------ broadcast / reduce


def test_broadcast_and_reduce_vs_gloo(groups):
    def body():
        errs = []
        case = 0
        for k, fl, gl in each_group(groups):
            case = k * 100_000
            me = dist.get_rank()
            for dtype in DTYPES:
                for n in SIZES:
                    for root in sorted({0, k - 1}):
                        case += 1
                        a = case % 2 == 0
                        t = make(me, case, dtype, n)
                        tg = t.clone()
                        run(dist.broadcast, t, src=root, group=fl, async_op=a)
                        dist.broadcast(tg, src=root, group=gl)
                        if not (same(t, tg) and same(t, make(root, case, dtype, n))):
                            errs.append(f"k={k} {dtype} n={n} root={root}: broadcast differs")
                        for op in (R.SUM, R.MAX) if dtype != torch.int64 else (R.SUM, R.BXOR):
                            x = make(me, case, dtype, n)
                            xg = x.clone()
                            run(dist.reduce, x, dst=root, op=op, group=fl, async_op=a)
                            dist.reduce(xg, dst=root, op=op, group=gl)
                            if me == root:
                                ref = by_hand([make(r, case, dtype, n) for r in range(k)], op)
                                if not (same(x, xg) and same(x, ref)):
                                    errs.append(f"k={k} {dtype} n={n} root={root} {op}: reduce differs")
                            elif not same(x, make(me, case, dtype, n)):
                                errs.append("reduce modified a non-root tensor")
        return errs

    all_ok(body)


# ------------------------------------------------------------------------------------------ reduce_scatter


def test_reduce_scatter_vs_gloo(groups):
    def body():
        errs = []
        case = 0
        for k, fl, gl in each_group(groups):
            case = k * 100_000
            me = dist.get_rank()
            for dtype in DTYPES:
                for n in SIZES:
                    ops = (R.SUM, R.MIN, R.MAX, R.PRODUCT) + ((R.AVG,) if dtype.is_floating_point else ())
                    for op in ops:
                        case += 1
                        lo, hi = (-2, 2) if op == R.PRODUCT else (-8, 8)
                        ins = {r: make(r, case, dtype, k * n, lo, hi) for r in range(k)}
                        ref = by_hand([ins[r][me * n : (me + 1) * n] for r in range(k)], op)
                        a = case % 2 == 0
                        out = torch.empty(n, dtype=dtype)
                        run(dist.reduce_scatter_tensor, out, ins[me].clone(), op=op, group=fl, async_op=a)
                        out_l = torch.empty(n, dtype=dtype)
                        pieces = list(ins[me].clone().chunk(k)) if n else [torch.empty(0, dtype=dtype)] * k
                        dist.reduce_scatter(out_l, pieces, op=op, group=fl)
                        inp = ins[me].clone()  # in place: output is this rank's chunk of the input
                        view = inp[me * n : (me + 1) * n]
                        fl._reduce_scatter_base(view, inp, _rs_opts(op)).wait()
                        inplace = view.clone()
                        for name, got in (("tensor", out), ("list", out_l), ("inplace", inplace)):
                            if not same(got, ref):
                                errs.append(f"k={k} {dtype} n={n} {op} {name}: {got[:4]} != by-hand {ref[:4]}")
                        if op != R.AVG:
                            og = torch.empty(n, dtype=dtype)
                            try:
                                dist.reduce_scatter_tensor(og, ins[me].clone(), op=op, group=gl)
                            except (RuntimeError, ValueError) as e:  # gloo lacks some dtype/op combinations
                                og = None if "support" in str(e).lower() or "not" in str(e).lower() else og
                            if og is not None and not same(out, og):
                                errs.append(f"k={k} {dtype} n={n} {op}: differs from gloo")
        return errs

    all_ok(body)


def _rs_opts(op):
    o = dist.ReduceScatterOptions()
    o.reduceOp = op
    return o


def test_reduce_scatter_coalesced(groups):
    def body():
        errs = []
        for k, fl, _ in each_group(groups):
            me = dist.get_rank()
            ins = [make(me, 500 + j, torch.float32, k * n) for j, n in enumerate((1, 9))]
            outs = [torch.empty(n) for n in (1, 9)]
            for name in ("reduce_scatter_single_coalesced", "reduce_scatter_tensor_coalesced"):
                getattr(fl, name)(outs, ins, dist.ReduceScatterOptions()).wait()
                for j, (o, n) in enumerate(zip(outs, (1, 9))):
                    ref = by_hand(
                        [make(r, 500 + j, torch.float32, k * n)[me * n : (me + 1) * n] for r in range(k)], R.SUM
                    )
                    if not same(o, ref):
                        errs.append(f"k={k} {name} tensor {j} differs")
        return errs

    all_ok(body)


# ------------------------------------------------------------------------------------------ all_to_all


def test_all_to_all_vs_gloo(groups):
    def body():
        errs = []
        case = 0
        for k, fl, gl in each_group(groups):
            case = k * 100_000
            me = dist.get_rank()
            for dtype in DTYPES:
                for n in (0, 1, 37, 700):
                    case += 1
                    a = case % 2 == 0
                    # even split
                    x = make(me, case, dtype, k * n)
                    out = torch.empty(k * n, dtype=dtype)
                    run(dist.all_to_all_single, out, x, group=fl, async_op=a)
                    ref = torch.cat([make(r, case, dtype, k * n)[me * n : (me + 1) * n] for r in range(k)])
                    og = torch.empty(k * n, dtype=dtype)
                    dist.all_to_all_single(og, x, group=gl)
                    if not (same(out, ref) and same(out, og)):
                        errs.append(f"k={k} {dtype} n={n}: all_to_all_single differs")

                    # uneven split, 2-D rows: rank r sends (r + s) % 3 + n rows to rank s
                    def rows(r, s, n=n):
                        return (r + s) % 3 + n

                    insplit = [rows(me, s) for s in range(k)]
                    outsplit = [rows(r, me) for r in range(k)]
                    xs = make(me, case + 10_000, dtype, (sum(insplit), 2))
                    out2 = torch.empty((sum(outsplit), 2), dtype=dtype)
                    dist.all_to_all_single(out2, xs, outsplit, insplit, group=fl)
                    og2 = torch.empty_like(out2)
                    dist.all_to_all_single(og2, xs, outsplit, insplit, group=gl)
                    pieces = []
                    for r in range(k):
                        xr = make(r, case + 10_000, dtype, (sum(rows(r, s) for s in range(k)), 2))
                        off = sum(rows(r, s) for s in range(me))
                        pieces.append(xr[off : off + rows(r, me)])
                    if not (same(out2, torch.cat(pieces)) and same(out2, og2)):
                        errs.append(f"k={k} {dtype} n={n}: uneven all_to_all_single differs")
                    # list form
                    ins = [make(me, case + 20_000 + s, dtype, n + s) for s in range(k)]
                    outs = [torch.empty(n + me, dtype=dtype) for _ in range(k)]
                    dist.all_to_all(outs, ins, group=fl)
                    for r in range(k):
                        if not same(outs[r], make(r, case + 20_000 + me, dtype, n + me)):
                            errs.append(f"k={k} {dtype} n={n}: all_to_all from {r} differs")
        return errs

    all_ok(body)


# ------------------------------------------------------------------------------------------ gather / scatter


def test_gather_scatter_vs_gloo(groups):
    def body():
        errs = []
        case = 0
        for k, fl, gl in each_group(groups):
            case = k * 100_000
            me = dist.get_rank()
            for dtype in DTYPES:
                for n in SIZES:
                    root = case % k
                    case += 1
                    a = case % 2 == 0
                    x = make(me, case, dtype, n)
                    gl_out = [torch.empty_like(x) for _ in range(k)] if me == root else None
                    fl_out = [torch.empty_like(x) for _ in range(k)] if me == root else None
                    run(dist.gather, x, fl_out, dst=root, group=fl, async_op=a)
                    dist.gather(x, gl_out, dst=root, group=gl)
                    if me == root:
                        ref = [make(r, case, dtype, n) for r in range(k)]
                        if not all(same(f, g) and same(f, h) for f, g, h in zip(fl_out, gl_out, ref)):
                            errs.append(f"k={k} {dtype} n={n} root={root}: gather differs")
                    src = [make(root, case * 31 + s, dtype, n) for s in range(k)] if me == root else None
                    out = torch.empty(n, dtype=dtype)
                    outg = torch.empty(n, dtype=dtype)
                    run(dist.scatter, out, src, src=root, group=fl, async_op=a)
                    dist.scatter(outg, src, src=root, group=gl)
                    if not (same(out, outg) and same(out, make(root, case * 31 + me, dtype, n))):
                        errs.append(f"k={k} {dtype} n={n} root={root}: scatter differs")
        return errs

    all_ok(body)


def test_object_collectives(groups):
    def body():
        errs = []
        me, n = dist.get_rank(), dist.get_world_size()
        objs = [None] * n
        dist.all_gather_object(objs, {"rank": me, "s": "x" * me})
        if objs != [{"rank": r, "s": "x" * r} for r in range(n)]:
            errs.append(f"all_gather_object {objs}")
        lst = [me, "hello"] if me == 0 else [None, None]
        dist.broadcast_object_list(lst, src=0)
        if lst != [0, "hello"]:
            errs.append(f"broadcast_object_list {lst}")
        got = [None] * n if me == n - 1 else None
        dist.gather_object(("g", me), got, dst=n - 1)
        if me == n - 1 and got != [("g", r) for r in range(n)]:
            errs.append(f"gather_object {got}")
        out = [None]
        dist.scatter_object_list(out, [("s", r) for r in range(n)] if me == 0 else None, src=0)
        if out != [("s", me)]:
            errs.append(f"scatter_object_list {out}")
        return errs

    all_ok(body)


# ------------------------------------------------------------------------------------------ point-to-point


def test_send_recv_isend_irecv_anysource(groups):
    def body():
        errs = []
        me, n = dist.get_rank(), dist.get_world_size()
        if n == 1:
            return errs
        for dtype in DTYPES:
            for size in (0, 1, 37, 300_000):  # 300k elements: MPI rendezvous protocol
                nxt, prv = (me + 1) % n, (me - 1) % n
                x = make(me, size, dtype, size)
                y = torch.empty(size, dtype=dtype)
                if me % 2 == 0:
                    dist.send(x, nxt)
                    dist.recv(y, prv)
                else:
                    r = dist.irecv(y, prv)
                    s = dist.isend(x, nxt)
                    r.wait()
                    s.wait()
                if not same(y, make(prv, size, dtype, size)):
                    errs.append(f"{dtype} size={size}: ring send/recv differs")
        # recv from any source: rank 0 receives from everyone, learns who sent
        if me == 0:
            seen = set()
            for _ in range(n - 1):
                t = torch.empty(3)
                src = dist.recv(t, tag=7)
                if not same(t, torch.full((3,), float(src))):
                    errs.append(f"anysource payload from {src}: {t}")
                seen.add(src)
            if seen != set(range(1, n)):
                errs.append(f"anysource sources {seen}")
        else:
            dist.send(torch.full((3,), float(me)), 0, tag=7)
        return errs

    all_ok(body)


def test_batch_isend_irecv_never_deadlocks(groups):
    def body():
        errs = []
        me, n = dist.get_rank(), dist.get_world_size()
        if n == 1:
            return errs
        for order in ("recv_first", "send_first"):
            for size in (5, 400_000):
                nxt, prv = (me + 1) % n, (me - 1) % n
                x = make(me, 77, torch.float32, size)
                y = torch.empty(size)
                ops = [dist.P2POp(dist.irecv, y, prv), dist.P2POp(dist.isend, x, nxt)]
                if order == "send_first":
                    ops.reverse()
                for w in dist.batch_isend_irecv(ops):
                    w.wait()
                if not same(y, make(prv, 77, torch.float32, size)):
                    errs.append(f"{order} size={size}: batch_isend_irecv differs")
        return errs

    all_ok(body)


def test_p2p_posting_never_blocks(groups):
    """isend of a large tensor returns at once although the peer posts its recv only later."""

    def body():
        me, n = dist.get_rank(), dist.get_world_size()
        if n == 1:
            return []
        errs = []
        if me == 0:
            t0 = time.monotonic()
            w = dist.isend(torch.ones(1_000_000), 1)
            if time.monotonic() - t0 > 0.5:
                errs.append("isend blocked at post time")
            w.wait()
        elif me == 1:
            time.sleep(0.3)
            y = torch.empty(1_000_000)
            dist.recv(y, 0)
            if not torch.all(y == 1):
                errs.append("payload")
        return errs

    all_ok(body)


# ------------------------------------------------------------------------------------------ barrier, async, threads


def test_barrier_and_monitored_barrier(groups):
    def body():
        errs = []
        for _, fl, _ in each_group(groups):
            dist.barrier(group=fl)
            w = dist.barrier(group=fl, async_op=True)
            w.wait()
            fl.monitored_barrier(timedelta(seconds=20))
        return errs

    all_ok(body)


def test_async_returns_immediately_and_future_resolves_to_outputs(groups):
    def body():
        errs = []
        ts = [torch.full((3000,), float(dist.get_rank())) for _ in range(6)]
        t0 = time.monotonic()
        works = [dist.all_reduce(t, async_op=True) for t in ts]
        post = time.monotonic() - t0
        futs = [w.get_future() for w in works]
        chained = futs[-1].then(lambda f: f.value()[0] * 2)
        for w in works:
            if w.wait() is not True:
                errs.append("wait() did not return True")
        total = float(sum(range(dist.get_world_size())))
        for t, f in zip(ts, futs):
            if not torch.all(t == total) or f.value()[0] is not t:
                errs.append("async all_reduce result / future value")
        if not torch.all(chained.wait() == 2 * total):
            errs.append("then() continuation")
        if post > 5:
            errs.append(f"posting 6 async all_reduces took {post:.2f}s")
        return errs

    all_ok(body)


def test_callers_from_several_threads(groups):
    """Two threads drive two groups at once; one comm thread per group serialises its MPI calls."""

    def body():
        world = dist.get_world_size()
        errs = []
        pair = groups[world]
        g1, g2 = dist.group.WORLD, pair[0]

        def worker(g, val, out):
            for i in range(20):
                t = torch.full((101,), float(val + i))
                dist.all_reduce(t, group=g)
                out.append(bool(torch.all(t == world * (val + i))))

        r1, r2 = [], []
        th = [threading.Thread(target=worker, args=(g1, 1, r1)), threading.Thread(target=worker, args=(g2, 1000, r2))]
        for t in th:
            t.start()
        for t in th:
            t.join(60)
        if not (all(r1) and all(r2) and len(r1) == len(r2) == 20):
            errs.append(f"threaded results {r1} {r2}")
        return errs

    all_ok(body)


# ------------------------------------------------------------------------------------------ errors


def test_mismatched_shape_or_dtype_raises_on_every_rank(groups):
    me, n = dist.get_rank(), dist.get_world_size()
    if n == 1:
        pytest.skip("needs two ranks")
    cases = [
        ("shape", lambda: torch.ones(4 if me != 1 else 5)),
        ("dtype", lambda: torch.ones(4, dtype=torch.float32 if me != 1 else torch.float64)),
        ("2d-shape", lambda: torch.ones((2, 3) if me != 1 else (3, 2))),
    ]

    def body():
        errs = []
        for name, mk in cases:
            for op in ("all_reduce", "all_gather_into_tensor", "broadcast", "reduce_scatter_tensor"):
                try:
                    t = mk()
                    if op == "all_reduce":
                        dist.all_reduce(t)
                    elif op == "broadcast":
                        dist.broadcast(t, 0)
                    elif op == "all_gather_into_tensor":
                        dist.all_gather_into_tensor(torch.empty(n * t.numel(), dtype=t.dtype), t)
                    else:
                        dist.reduce_scatter_tensor(t, torch.ones(n * t.numel(), dtype=t.dtype))
                    errs.append(f"{name}/{op}: no error")
                except ShapeMismatchError as e:
                    if "rank" not in str(e):
                        errs.append(f"{name}/{op}: unclear message {e}")
        # the group is still usable and in step afterwards
        t = torch.ones(2)
        dist.all_reduce(t)
        if not torch.all(t == n):
            errs.append("group not usable after mismatch errors")
        return errs

    all_ok(body)


def test_local_rejection_reaches_every_rank(groups):
    """A bad argument on one rank raises there at once and, via the agreement step, on all others."""
    me, n = dist.get_rank(), dist.get_world_size()
    if n == 1:
        pytest.skip("needs two ranks")

    def body():
        errs = []
        outs = [torch.empty(3) for _ in range(n if me != 0 else n + 1)]
        try:
            dist.all_gather(outs, torch.ones(3))
            errs.append("no error")
        except FLTorrentError as e:
            if me != 0 and "rejected" not in str(e):
                errs.append(f"unclear: {e}")
        t = torch.ones(2)
        dist.all_reduce(t)
        if not torch.all(t == n):
            errs.append("group not usable after a rejection")
        return errs

    all_ok(body)


def test_unsupported_op_and_dtype_raise_clearly(groups):
    def body():
        errs = []
        bad = [
            (lambda: dist.all_reduce(torch.ones(3), op=R.BAND), "BAND"),
            (lambda: dist.all_reduce(torch.ones(3, dtype=torch.int64), op=R.AVG), "AVG"),
            (lambda: dist.all_reduce(torch.ones(3, dtype=torch.complex64), op=R.MAX), "complex"),
            (lambda: dist.all_reduce(torch.ones(3).to_sparse()), "layout"),
        ]
        for fn, word in bad:
            try:
                fn()
                errs.append(f"{word}: no error")
            except (FLTorrentError, ValueError, RuntimeError) as e:
                if word.lower() not in str(e).lower() and word != "layout":
                    errs.append(f"{word}: unclear message {e}")
        t = torch.ones(2)
        dist.all_reduce(t)
        if not torch.all(t == dist.get_world_size()):
            errs.append("group not usable after unsupported-op errors")
        return errs

    all_ok(body)


def test_timeouts_raise_instead_of_hanging(groups):
    me, n = dist.get_rank(), dist.get_world_size()
    if n == 1:
        pytest.skip("needs two ranks")
    g = dist.new_group([0, 1], backend="fltorrent", timeout=timedelta(seconds=1.5), pg_options=CFG)

    def body():
        errs = []
        if me == 0:
            t0 = time.monotonic()
            try:
                dist.recv(torch.empty(4), 1, group=g)  # nobody sends
                errs.append("recv: no timeout")
            except PeerTimeoutError as e:
                if "rank 1" not in str(e):
                    errs.append(f"recv timeout does not name the peer: {e}")
            try:
                dist.all_reduce(torch.ones(3), group=g)  # rank 1 never joins
                errs.append("all_reduce: no timeout")
            except PeerTimeoutError as e:
                if "[1]" not in str(e) and "all" not in str(e):
                    errs.append(f"unclear: {e}")
            if time.monotonic() - t0 > 20:
                errs.append("timeouts took too long")
            try:
                dist.all_reduce(torch.ones(3), group=g)
                errs.append("broken group accepted more work")
            except FLTorrentError:
                pass
        return errs

    all_ok(body)
    if me in (0, 1):
        g.abort()


def test_abort_and_shutdown_are_idempotent(groups):
    g = dist.new_group(backend="fltorrent", pg_options=CFG)

    def body():
        errs = []
        t = torch.ones(2)
        dist.all_reduce(t, group=g)
        g.abort()
        g.abort()
        g.shutdown()
        try:
            dist.all_reduce(torch.ones(2), group=g)
            errs.append("aborted group accepted work")
        except FLTorrentError:
            pass
        return errs

    all_ok(body)
    g2 = dist.new_group(backend="fltorrent", pg_options=CFG)
    dist.all_reduce(torch.ones(1), group=g2)
    dist.destroy_process_group(g2)  # calls shutdown
    g2.shutdown()


def test_privacy_full_swarm_round(groups):
    """One all_gather through a group with the default (full) privacy config."""
    g = dist.new_group(backend="fltorrent", pg_options=SwarmConfig(chunk_bytes=128, timeout_s=60.0))

    def body():
        me, n = dist.get_rank(), dist.get_world_size()
        x = make(me, 4242, torch.bfloat16, 999)
        out = torch.empty(n * 999, dtype=torch.bfloat16)
        dist.all_gather_into_tensor(out, x, group=g)
        ref = torch.cat([make(r, 4242, torch.bfloat16, 999) for r in range(n)])
        return [] if same(out, ref) else ["privacy=full all_gather differs"]

    all_ok(body)
    dist.destroy_process_group(g)


def test_bench_hook(groups):
    secs = bench.bench_backend_allgather(4096, iters=3)
    all_ok(lambda: [] if secs > 0 else [f"bench returned {secs}"])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors_staged_through_host(groups):
    """CUDA inputs/outputs: staged through the host, results land on the tensor's device, futures carry it."""

    def body():
        errs = []
        me, n = dist.get_rank(), dist.get_world_size()
        dev = torch.device("cuda", me % torch.cuda.device_count())
        torch.cuda.set_device(dev)
        for dtype in DTYPES:
            x = make(me, 9, dtype, 1500).to(dev)
            t = x.clone()
            w = dist.all_reduce(t, async_op=True)
            w.wait()
            ref = by_hand([make(r, 9, dtype, 1500) for r in range(n)], R.SUM)
            if not (t.is_cuda and same(t.cpu(), ref) and w.get_future().value()[0] is t):
                errs.append(f"{dtype}: cuda all_reduce")
            out = torch.empty(n * 1500, dtype=dtype, device=dev)
            dist.all_gather_into_tensor(out, x)
            if not same(out.cpu(), torch.cat([make(r, 9, dtype, 1500) for r in range(n)])):
                errs.append(f"{dtype}: cuda all_gather_into_tensor")
            b = x.clone()
            dist.broadcast(b, 0)
            if not same(b.cpu(), make(0, 9, dtype, 1500)):
                errs.append(f"{dtype}: cuda broadcast")
            rs = torch.empty(1500 // n if 1500 % n == 0 else 0, dtype=dtype, device=dev)
            if rs.numel():
                dist.reduce_scatter_tensor(rs, torch.cat([x] * n)[: n * rs.numel()])
            if n > 1:
                y = torch.empty(1500, dtype=dtype, device=dev)
                ops = [dist.P2POp(dist.irecv, y, (me - 1) % n), dist.P2POp(dist.isend, x, (me + 1) % n)]
                for w in dist.batch_isend_irecv(ops):
                    w.wait()
                if not same(y.cpu(), make((me - 1) % n, 9, dtype, 1500)):
                    errs.append(f"{dtype}: cuda isend/irecv")
        return errs

    all_ok(body)
