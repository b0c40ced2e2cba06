"""Bandwidth of the chunk kernels against a plain device-to-device copy, nccl-tests style, plus JSON.

    python jobs/bench_kernels.py                          # 256 MiB, CUDA + CuPy kernels if present
    python jobs/bench_kernels.py --bytes 1GiB --iters 50 --json out.json
    python jobs/bench_kernels.py --backend torch          # the torch fallback on the same device

Columns (one row per operation, payload = --bytes of update):
    size    payload bytes          count  elements of the payload dtype      type  payload dtype
    time    median time per call, microseconds
    algbw   payload bytes / time  (GB/s, 1e9)
    busbw   memory traffic / time: every byte the operation must read or write once (copy, pack, unpack:
            2x payload; blake3: 1x; accumulate: payload + 8 B per element for the fp32 accumulator read and
            write; finalize: 8 B per element + the parameter write).  Compare it with the device's
            memory bandwidth; `copy` shows what this device reaches.
    #wrong  elements (bytes for copy/pack/unpack, chunk digests for blake3) that differ from an independent
            reference computed once (torch/numpy whole-array ops, the blake3 package)

On a machine without CUDA the script runs the torch fallback on the CPU (the path CPU users run) and
says so in the header and the JSON; the numbers are then CPU memory bandwidth, not GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fltorrent_hpc.chunks import kernels as K  # noqa: E402
from fltorrent_hpc.chunks.digest import chunk_digests, round_key  # noqa: E402
from fltorrent_hpc.chunks.layout import Layout  # noqa: E402
from fltorrent_hpc.config import parse_bytes  # noqa: E402


def timer(dev: torch.device, fn, iters: int, warmup: int) -> float:
    """Median seconds per call: CUDA events on a GPU, perf_counter on the CPU."""
    for _ in range(warmup):
        fn()
    times = []
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        for _ in range(iters):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_tensors(total: int, n: int, dtype: torch.dtype, dev: torch.device, seed: int) -> list[torch.Tensor]:
    """n tensors of uneven, odd sizes (like a model's layers) adding up to about `total` bytes."""
    g = np.random.default_rng(seed)
    w = g.uniform(0.2, 1.0, n)
    sizes = np.maximum(1, (w / w.sum() * total / dtype.itemsize).astype(np.int64) | 1)
    gen = torch.Generator(device=dev).manual_seed(seed)
    return [torch.randn(int(s), device=dev, generator=gen).to(dtype) for s in sizes]


def bench_bytes(dev, backend: str, B: int, C: int, iters: int, warmup: int, row) -> None:
    """copy (the device-to-device baseline) and keyed BLAKE3 chunk digests, on B random bytes."""
    src = torch.randint(0, 256, (B,), dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    t = timer(dev, lambda: dst.copy_(src), iters, warmup)
    row("copy", torch.uint8, B, t, 2 * B, int((dst != src).sum()))
    key = round_key(0, 0, 0)
    t = timer(dev, lambda: K.chunk_digests_t(src, C, key, backend=backend), iters, warmup)
    got = K.digests_to_numpy(K.chunk_digests_t(src, C, key, backend=backend))
    want = chunk_digests(src.cpu().numpy(), C, key)
    row("blake3", torch.uint8, B, t, B, int((got != want).any(axis=1).sum()))


def bench_layout(dev, backend: str, B: int, C: int, n_tensors: int, dtype, iters: int, warmup: int, row) -> None:
    """pack, unpack, accumulate and finalize on a layout of n_tensors uneven tensors of `dtype`."""
    ts = make_tensors(B, n_tensors, dtype, dev, seed=1)
    lay = Layout.from_tensors(ts)
    n = lay.numel
    flat = torch.empty(lay.total_bytes, dtype=torch.uint8, device=dev)
    ref = torch.zeros(lay.total_bytes, dtype=torch.uint8, device=dev)
    for e, x in zip(lay.entries, ts):
        ref[e.offset : e.end] = x.reshape(-1).view(torch.uint8)
    t = timer(dev, lambda: K.pack_segments(ts, lay, flat, backend=backend), iters, warmup)
    row("pack", dtype, n, t, 2 * lay.total_bytes, int((flat != ref).sum()))

    back = [torch.empty_like(x) for x in ts]
    t = timer(dev, lambda: K.unpack_segments(flat, lay, back, backend=backend), iters, warmup)
    row("unpack", dtype, n, t, 2 * lay.total_bytes, sum(int((x != y).sum()) for x, y in zip(ts, back)))

    ids = np.arange(lay.n_chunks(C))
    acc = torch.zeros(n, dtype=torch.float32, device=dev)
    w = 0.37
    t = timer(dev, lambda: K.accumulate_(acc, ids, flat, w, lay, C, backend=backend), iters, warmup)
    acc.zero_()
    K.accumulate_(acc, ids, flat, w, lay, C, backend=backend)
    expect = torch.cat([x.reshape(-1).float() * w for x in ts])  # 0 + fl(w*x), whole-array reference
    row("accumulate", dtype, n, t, lay.total_bytes + 8 * n, int((acc != expect).sum()))

    outs = [torch.empty_like(x) for x in ts]
    base = acc.clone()

    def fin() -> None:
        acc.copy_(base)  # finalize divides acc in place; restore it (its traffic is counted below)
        K.finalize_fedavg_(acc, 2.0, outs, lay, backend=backend)

    t = timer(dev, fin, iters, warmup)
    got = torch.cat([o.reshape(-1) for o in outs])
    row("finalize+restore", dtype, n, t, 16 * n + n * dtype.itemsize, int((got != (base / 2.0).to(dtype)).sum()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bytes", default="256MiB", help="payload per operation (default 256MiB)")
    ap.add_argument("--chunk", default="4MiB", help="chunk size for accumulate and digests (default 4MiB)")
    ap.add_argument("--tensors", type=int, default=64, help="tensors in the packed layout (default 64)")
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    ap.add_argument("--backend", default="auto", choices=["auto", "torch", "cupy"])
    ap.add_argument("--iters", type=int, default=0, help="timed calls per op (default 20 on GPU, 3 on CPU)")
    ap.add_argument("--warmup", type=int, default=0, help="untimed calls first (default 5 on GPU, 1 on CPU)")
    ap.add_argument("--json", default="bench_kernels.json", help="where to write the results")
    a = ap.parse_args(argv)

    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device)
    backend = K.resolve_backend(dev, a.backend)
    B, C = parse_bytes(a.bytes), parse_bytes(a.chunk)
    if C % 16:
        ap.error("--chunk must be a multiple of 16 bytes")
    gpu = dev.type == "cuda"
    iters = a.iters or (20 if gpu else 3)
    warmup = a.warmup or (5 if gpu else 1)
    note = (
        f"CUDA kernels/*.cu via CuPy on {torch.cuda.get_device_name(dev)}"
        if backend == "cupy"
        else (
            f"torch fallback on {torch.cuda.get_device_name(dev)} (CuPy not used)"
            if gpu
            else "NO GPU: torch fallback on the CPU (the CPU users' path); numbers are CPU memory bandwidth"
        )
    )
    rows = []

    def row(op: str, dtype: torch.dtype, count: int, seconds: float, traffic: int, wrong: int) -> None:
        r = {
            "op": op,
            "size": B,
            "count": int(count),
            "type": str(dtype).removeprefix("torch."),
            "time_us": seconds * 1e6,
            "algbw_GBps": B / seconds / 1e9,
            "busbw_GBps": traffic / seconds / 1e9,
            "traffic_bytes": int(traffic),
            "wrong": int(wrong),
        }
        rows.append(r)
        print(
            f"{r['size']:>12d} {r['count']:>12d} {r['type']:>9s} {op:>16s} {r['time_us']:>12.1f} "
            f"{r['algbw_GBps']:>8.2f} {r['busbw_GBps']:>8.2f} {r['wrong']:>7d}",
            flush=True,
        )

    print(f"# fltorrent kernel bench: device={dev} backend={backend} payload={B} B chunk={C} B iters={iters}")
    print(f"# {note}")
    head = ("size", "count", "type", "op", "time", "algbw", "busbw", "#wrong")
    print("# {:>10s} {:>12s} {:>9s} {:>16s} {:>12s} {:>8s} {:>8s} {:>7s}".format(*head))
    print(f"# {'(B)':>10s} {'(elements)':>12s} {'':>9s} {'':>16s} {'(us)':>12s} {'(GB/s)':>8s} {'(GB/s)':>8s} {'':>7s}")

    bench_bytes(dev, backend, B, C, iters, warmup, row)
    for dtype in (torch.bfloat16, torch.float32):
        bench_layout(dev, backend, B, C, a.tensors, dtype, iters, warmup, row)
        if gpu:
            torch.cuda.empty_cache()

    out = {
        "bench": "fltorrent_kernels",
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if gpu else platform.processor() or platform.machine(),
        "backend": backend,
        "note": note,
        "payload_bytes": B,
        "chunk_bytes": C,
        "tensors": a.tensors,
        "iters": iters,
        "torch": torch.__version__,
        "cupy": getattr(K._cupy(), "__version__", None) if backend == "cupy" else None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "rows": rows,
    }
    Path(a.json).write_text(json.dumps(out, indent=1))
    print(f"# wrote {a.json}")
    return 1 if any(r["wrong"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
