"""Chunk kernels: pack/unpack, FedAvg accumulate/finalize and the per-chunk hash, on the update's device.

Each operation has two implementations with bit-identical results:

* ``cupy``: kernels/*.cu compiled by a CuPy RawModule (NVRTC) and launched on torch's current CUDA stream,
  so they order with the caller's kernels without a host sync;
* ``torch``: vectorised torch ops (one op per run of same-dtype segments, never per element); it is the
  CPU path users run, and the CUDA path when CuPy is missing.

The backend is chosen by device: CUDA tensors with CuPy importable use ``cupy``, everything else ``torch``.
``backend=`` or ``FLTORRENT_KERNELS=torch|cupy|auto`` overrides it (tests compare both on one GPU).

The device path is split into a host *planner* (numpy tables of work items: addresses, element indices,
counts) and a *runner* that uploads a table and launches a kernel.  tests/test_kernels.py drives the same
planners with a host-emulation runner (the .cu files compiled by g++), so planner + kernel are checked
bit for bit against the torch fallback on machines without a GPU.

FedAvg determinism: ``accumulate_`` does ``acc = fl(acc + fl(w * x))`` once per element per call, with no
FMA contraction and fp32 ``w``.  The result therefore depends only on the order in which each element
receives its sources.  Feed every chunk's sources in rank order (chunk order, batching, and the
interleaving of different chunks do not matter) and the average is bit-identical whether updates arrive
whole or in chunks, on CPU or GPU.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from ..errors import ConfigError, ShapeMismatchError
from .digest import GOLDEN, LEN_SALT, MIX1, MIX2
from .layout import Layout, torch_dtype


def _kernel_dir() -> Path:
    """FLTORRENT_KERNELS_DIR if set; else the package data of an installed wheel (fltorrent_hpc/chunks/cuda/,
    which pyproject.toml maps to the repository's kernels/); else kernels/ of the source checkout that this
    file lives in (editable install, PYTHONPATH).  The sources live only in the repository's kernels/."""
    env = os.environ.get("FLTORRENT_KERNELS_DIR")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent
    packaged = here / "cuda"
    return packaged if packaged.is_dir() else here.parents[1] / "kernels"


KERNEL_DIR = _kernel_dir()
"""Where the .cu sources live (see `_kernel_dir`; FLTORRENT_KERNELS_DIR overrides)."""

KERNEL_FILES: dict[str, str] = {
    "flt_copy_segments": "pack.cu",
    "flt_accumulate": "accumulate.cu",
    "flt_finalize": "accumulate.cu",
    "flt_chunk_hash_partial": "checksum.cu",
    "flt_chunk_hash_final": "checksum.cu",
}

ACC_DTYPES = ("float32", "float16", "bfloat16")
"""Parameter dtypes FedAvg accumulates (in fp32); others raise ConfigError."""
_ACC_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}  # kernels/accumulate.cu dtype codes
_CODE_TORCH = {0: torch.float32, 1: torch.float16, 2: torch.bfloat16}

PACK_TILE = 256 * 1024  # bytes per pack/unpack work item (multiple of 16)
ACC_TILE = 64 * 1024  # elements per accumulate/finalize work item
HASH_WORDS_PER_PART = 2048  # 8-byte words per hash work item (16 KiB)
BLOCK = 256  # threads per block (multiple of 32: the hash reduces per warp)
MAX_GRID = 16384  # blocks per launch; the kernels loop grid-stride over the rest
_TORCH_TILE = 1 << 18  # fallback accumulate tile: 1 MiB of fp32, converted, scaled and added in L2
_scratch_local = threading.local()
_HASH_TILE_WORDS = 1 << 17  # fallback hash tile on CPU: 1 MiB of words, so the temporaries stay in L2
_HASH_TILE_WORDS_DEVICE = 1 << 23  # on a GPU without CuPy: 64 MiB tiles (launch overhead, not cache, rules)


def _s64(u: int | np.uint64) -> int:
    """A uint64 constant as the signed int64 with the same bits (torch has no full uint64 arithmetic)."""
    u = int(u)
    return u - (1 << 64) if u >= 1 << 63 else u


_GOLDEN, _MIX1, _MIX2, _LEN_SALT = (_s64(x) for x in (GOLDEN, MIX1, MIX2, LEN_SALT))


# ------------------------------------------------------------------------------------------------------
# backend choice
# ------------------------------------------------------------------------------------------------------
_cupy_state: dict[str, Any] = {}
_cupy_lock = threading.Lock()


def _cupy():
    """The cupy module, or None where it cannot be imported (no CUDA, no wheel)."""
    if "mod" not in _cupy_state:
        try:
            import cupy  # noqa: PLC0415

            _cupy_state["mod"] = cupy
        except Exception as e:  # ImportError, or a CUDA driver/runtime mismatch at import
            _cupy_state["mod"] = None
            _cupy_state["err"] = f"{type(e).__name__}: {e}"
    return _cupy_state["mod"]


def cupy_available() -> bool:
    """True when CuPy imports, i.e. CUDA tensors can use the kernels/*.cu path."""
    return _cupy() is not None


def resolve_backend(device: torch.device, backend: str | None = None) -> str:
    """'cupy' or 'torch' for tensors on `device` (see the module docstring for the rule)."""
    b = (backend or os.environ.get("FLTORRENT_KERNELS") or "auto").strip().lower()
    if b not in ("auto", "torch", "cupy"):
        raise ConfigError(f"kernel backend {b!r}: choose auto, torch or cupy (FLTORRENT_KERNELS)")
    if b == "torch":
        return "torch"
    if device.type == "cuda" and cupy_available():
        return "cupy"
    if b == "cupy":
        why = "tensors are on " + str(device) if device.type != "cuda" else _cupy_state.get("err", "")
        raise ConfigError(f"kernel backend 'cupy' needs CUDA tensors and an importable cupy ({why})")
    return "torch"


# ------------------------------------------------------------------------------------------------------
# runners: upload a work table and launch a kernel
# ------------------------------------------------------------------------------------------------------
class KernelRunner(Protocol):
    """What the device path needs from a launcher; CupyRunner on GPUs, an emulator in the tests."""

    def upload(self, table: np.ndarray) -> tuple[int, Any]:
        """Copy an int64 table where the kernel can read it; return (address, object to keep alive)."""
        ...

    def launch(self, name: str, grid: int, block: int, args: Sequence[tuple[str, int | float]]) -> None:
        """Launch kernel `name`; args are (kind, value) with kind in ptr, i64, i32, f32."""
        ...


class CupyRunner:
    """Launches kernels/*.cu through CuPy RawModule on torch's current stream of `device`."""

    def __init__(self, device: torch.device):
        cp = _cupy()
        if cp is None:
            raise ConfigError(f"CuPy is not importable ({_cupy_state.get('err')}); install cupy-cuda12x")
        self.cp = cp
        self.device = device
        self.index = device.index if device.index is not None else torch.cuda.current_device()

    def _function(self, name: str):
        key = (KERNEL_FILES[name], self.index)
        with _cupy_lock:
            mod = _cupy_state.setdefault("modules", {}).get(key)
            if mod is None:
                src = (KERNEL_DIR / KERNEL_FILES[name]).read_text()
                with self.cp.cuda.Device(self.index):
                    mod = self.cp.RawModule(code=src, options=("--std=c++17",))
                _cupy_state["modules"][key] = mod
        with self.cp.cuda.Device(self.index):
            return mod.get_function(name)

    def upload(self, table: np.ndarray) -> tuple[int, Any]:
        host = torch.from_numpy(np.ascontiguousarray(table, dtype=np.int64).reshape(-1)).pin_memory()
        dev = host.to(torch.device("cuda", self.index), non_blocking=True)  # ordered on the current stream
        return dev.data_ptr(), (dev, host)

    def launch(self, name: str, grid: int, block: int, args: Sequence[tuple[str, int | float]]) -> None:
        conv = {"ptr": np.uint64, "i64": np.int64, "i32": np.int32, "f32": np.float32}
        packed = tuple(conv[kind](value) for kind, value in args)
        fn = self._function(name)
        stream = torch.cuda.current_stream(torch.device("cuda", self.index))
        with self.cp.cuda.Device(self.index), self.cp.cuda.ExternalStream(stream.cuda_stream, self.index):
            fn((int(grid),), (int(block),), packed)


def _runner_for(device: torch.device, runner: KernelRunner | None) -> KernelRunner:
    return runner if runner is not None else CupyRunner(device)


def _grid(n_items: int) -> int:
    return max(1, min(int(n_items), MAX_GRID))


# ------------------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------------------
def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a tensor's elements (a contiguous copy when it is strided)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def _as_dtype(u8: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reinterpret uint8 bytes as `dtype`, copying first when the start is misaligned for a view."""
    if u8.storage_offset() % dtype.itemsize:
        u8 = u8.clone()
    return u8.view(dtype)


def _check_flat(t: torch.Tensor, what: str) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 1 or not t.is_contiguous():
        desc = f"{t.dtype} shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ShapeMismatchError(f"{what} must be a contiguous 1-D uint8 tensor, got {desc}")


def _tile_items(src: np.ndarray, dst: np.ndarray, n: np.ndarray, tile: int) -> np.ndarray:
    """Split byte segments (src 0 = zero fill) into <= tile-byte items; a 16-aligned segment's tail < 16 B
    becomes its own item so the bulk keeps the 16-byte path.  Returns int64 [k, 3]."""
    src, dst, n = (np.asarray(a, dtype=np.int64) for a in (src, dst, n))
    keep = n > 0
    src, dst, n = src[keep], dst[keep], n[keep]
    aligned = ((src | dst) & 15) == 0
    bulk = np.where(aligned, n & ~np.int64(15), n)
    tail = n - bulk
    k = -(-bulk // tile)
    seg = np.repeat(np.arange(n.size), k)
    first = np.cumsum(k) - k
    off = (np.arange(seg.size, dtype=np.int64) - np.repeat(first, k)) * tile
    cnt = np.minimum(tile, bulk[seg] - off)
    s = np.where(src[seg] == 0, 0, src[seg] + off)
    bulk_items = np.stack([s, dst[seg] + off, cnt], axis=1)
    t = tail > 0
    tail_items = np.stack([np.where(src[t] == 0, 0, src[t] + bulk[t]), dst[t] + bulk[t], tail[t]], axis=1)
    return np.concatenate([bulk_items, tail_items]).astype(np.int64, copy=False).reshape(-1, 3)


def _tile_elems(addr: np.ndarray, acc_idx: np.ndarray, count: np.ndarray, code: np.ndarray, itemsize: np.ndarray):
    """Split element runs into <= ACC_TILE-element items: int64 [k, 4] of (address, acc index, count, code)."""
    keep = count > 0
    addr, acc_idx, count, code, itemsize = (a[keep] for a in (addr, acc_idx, count, code, itemsize))
    k = -(-count // ACC_TILE)
    seg = np.repeat(np.arange(count.size), k)
    first = np.cumsum(k) - k
    off = (np.arange(seg.size, dtype=np.int64) - np.repeat(first, k)) * ACC_TILE
    return np.stack(
        [addr[seg] + off * itemsize[seg], acc_idx[seg] + off, np.minimum(ACC_TILE, count[seg] - off), code[seg]],
        axis=1,
    ).astype(np.int64, copy=False)


# ------------------------------------------------------------------------------------------------------
# pack / unpack
# ------------------------------------------------------------------------------------------------------
def range_segments(layout: Layout, byte_start: int, byte_end: int) -> tuple[np.ndarray, ...]:
    """The pieces of flat bytes [byte_start, byte_end), in order: (entry index, lo, hi, is_pad) arrays.

    A data piece is bytes of entry j's tensor; a pad piece is the zero bytes after entry j.
    """
    if not (0 <= byte_start <= byte_end <= layout.total_bytes):
        raise ShapeMismatchError(f"byte range [{byte_start}, {byte_end}) outside the layout's {layout.total_bytes} B")
    a = layout.entry_arrays()
    nxt_all = layout.cached("next_offset", lambda: np.append(a["offset"][1:], layout.total_bytes).astype(np.int64))
    # entry j owns [offset_j, next_j): its bytes, then its pad; those regions tile the buffer in order
    j0 = int(np.searchsorted(nxt_all, byte_start, side="right"))
    j1 = int(np.searchsorted(a["offset"], byte_end, side="left"))
    off, nb, nxt = a["offset"][j0:j1], a["nbytes"][j0:j1], nxt_all[j0:j1]
    n = off.size
    ends = off + nb
    lo = np.stack([np.maximum(off, byte_start), np.maximum(ends, byte_start)], axis=1).reshape(-1)
    hi = np.stack([np.minimum(ends, byte_end), np.minimum(nxt, byte_end)], axis=1).reshape(-1)
    j = np.repeat(np.arange(j0, j1, dtype=np.int64), 2)
    pad = np.tile(np.array([False, True]), n)
    keep = hi > lo
    return j[keep], lo[keep], hi[keep], pad[keep]


@torch.no_grad()
def pack_segments(
    tensors: Sequence[torch.Tensor],
    layout: Layout,
    out: torch.Tensor | None = None,
    *,
    byte_start: int = 0,
    byte_end: int | None = None,
    backend: str | None = None,
    runner: KernelRunner | None = None,
) -> torch.Tensor:
    """Gather flat bytes [byte_start, byte_end) of the layout from `tensors` into `out`, in one launch.

    The range may start and end anywhere, e.g. one chunk or a run of chunks, so a peer can serve its own
    chunks straight from its parameters without keeping a packed copy.  `out` (contiguous uint8, at
    least the range long) defaults to a new buffer on the tensors' device; returns the written view.
    """
    dev = layout.check_tensors(tensors)
    byte_end = layout.total_bytes if byte_end is None else int(byte_end)
    n = byte_end - byte_start
    j, lo, hi, pad = range_segments(layout, byte_start, byte_end)
    if out is None:
        out = torch.empty(n, dtype=torch.uint8, device=dev)
    _check_flat(out, "pack output")
    if out.device != dev or out.numel() < n:
        raise ShapeMismatchError(f"pack output is {out.numel()} B on {out.device}, need >= {n} B on {dev}")
    out = out[:n]
    if n == 0:
        return out
    if runner is not None or resolve_backend(dev, backend) == "cupy":
        _device_pack(tensors, layout, out, byte_start, j, lo, hi, pad, _runner_for(dev, runner))
        return out
    offs = layout.entry_arrays()["offset"]
    zeros = torch.zeros(16, dtype=torch.uint8, device=dev)
    views, cache = [], {}
    for jj, a, b, p in zip(j.tolist(), lo.tolist(), hi.tolist(), pad.tolist()):
        if p:
            views.append(zeros[: b - a])
        else:
            if jj not in cache:
                cache[jj] = _bytes_of(tensors[jj])
            base = int(offs[jj])
            views.append(cache[jj][a - base : b - base])
    torch.cat(views, out=out)
    return out


def _device_pack(tensors, layout, out, byte_start, j, lo, hi, pad, runner: KernelRunner) -> None:
    offs = layout.entry_arrays()["offset"]
    keep, addr = [], np.zeros(len(tensors), dtype=np.int64)
    for jj in np.unique(j[~pad]).tolist():
        t = tensors[jj]
        if not t.is_contiguous():
            t = t.contiguous()  # freed after the launch: the caching allocator orders reuse on this stream
            keep.append(t)
        addr[jj] = t.data_ptr()
    src = np.where(pad, 0, addr[j] + (lo - offs[j]))
    dst = out.data_ptr() + (lo - byte_start)
    items = _tile_items(src, dst, hi - lo, PACK_TILE)
    if not len(items):
        return
    ptr, hold = runner.upload(items)
    runner.launch("flt_copy_segments", _grid(len(items)), BLOCK, [("ptr", ptr), ("i64", len(items))])
    del hold, keep


@torch.no_grad()
def unpack_segments(
    flat: torch.Tensor,
    layout: Layout,
    tensors: Sequence[torch.Tensor],
    *,
    byte_start: int = 0,
    backend: str | None = None,
    runner: KernelRunner | None = None,
) -> None:
    """Scatter flat bytes [byte_start, byte_start + flat.numel()) back into the tensors, in place.

    Pad bytes in `flat` are ignored; a range may cover part of an entry (only those bytes change).
    """
    dev = layout.check_tensors(tensors)
    _check_flat(flat, "unpack input")
    if flat.device != dev:
        raise ShapeMismatchError(f"unpack input is on {flat.device}, tensors on {dev}")
    byte_end = byte_start + flat.numel()
    j, lo, hi, pad = range_segments(layout, byte_start, byte_end)
    j, lo, hi = j[~pad], lo[~pad], hi[~pad]
    if j.size == 0:
        return
    offs = layout.entry_arrays()["offset"]
    nbytes = layout.entry_arrays()["nbytes"]
    # strided tensors go through a contiguous temporary (a full-entry write needs no read of the old bytes)
    temps: dict[int, torch.Tensor] = {}
    for jj, a, b in zip(j.tolist(), lo.tolist(), hi.tolist()):
        t = tensors[jj]
        if not t.is_contiguous() and jj not in temps:
            whole = a == offs[jj] and b == offs[jj] + nbytes[jj]
            temps[jj] = torch.empty(t.shape, dtype=t.dtype, device=dev) if whole else t.contiguous()
    targets = [temps.get(i, t) for i, t in enumerate(tensors)]
    if runner is not None or resolve_backend(dev, backend) == "cupy":
        run = _runner_for(dev, runner)
        addr = np.zeros(len(tensors), dtype=np.int64)
        for jj in np.unique(j).tolist():
            addr[jj] = targets[jj].data_ptr()
        items = _tile_items(flat.data_ptr() + (lo - byte_start), addr[j] + (lo - offs[j]), hi - lo, PACK_TILE)
        ptr, hold = run.upload(items)
        run.launch("flt_copy_segments", _grid(len(items)), BLOCK, [("ptr", ptr), ("i64", len(items))])
        del hold
    else:
        bviews = {jj: targets[jj].view(-1).view(torch.uint8) for jj in np.unique(j).tolist()}
        outs = [
            bviews[jj][a - int(offs[jj]) : b - int(offs[jj])] for jj, a, b in zip(j.tolist(), lo.tolist(), hi.tolist())
        ]
        src = flat[int(lo[0]) - byte_start : int(hi[-1]) - byte_start]
        if len(outs) == 1:
            outs[0].copy_(src)
        else:
            # pad gaps between pieces go to a scratch buffer so one split_with_sizes_copy covers the run
            sizes, dsts, pos = [], [], int(lo[0])
            gaps = int((lo[1:] - hi[:-1]).sum())
            scratch = torch.empty(gaps, dtype=torch.uint8, device=dev)
            g = 0
            for o, a, b in zip(outs, lo.tolist(), hi.tolist()):
                if a > pos:
                    sizes.append(a - pos)
                    dsts.append(scratch[g : g + a - pos])
                    g += a - pos
                sizes.append(b - a)
                dsts.append(o)
                pos = b
            torch.split_with_sizes_copy(src, sizes, out=dsts)
    for jj, tmp in temps.items():
        tensors[jj].copy_(tmp)


# ------------------------------------------------------------------------------------------------------
# FedAvg: accumulate / finalize
# ------------------------------------------------------------------------------------------------------
def _check_acc_dtypes(layout: Layout) -> None:
    bad = [e.name for e in layout.entries if e.dtype not in ACC_DTYPES]
    if bad:
        raise ConfigError(
            f"FedAvg accumulates {ACC_DTYPES} in fp32; entries {bad[:5]} have other dtypes "
            "(leave integer buffers out of the FedAvg layout, cast float64 parameters to float32)"
        )


class ChunkPlan:
    """Per (layout, chunk_bytes): which accumulator elements each chunk carries, as CSR numpy tables.

    Segment s of chunk c: bytes [off_in_chunk, off_in_chunk + count*itemsize) of the chunk are elements
    [acc_idx, acc_idx + count) of entry `entry` (dtype code `code`).  Built once, vectorised.
    """

    def __init__(self, layout: Layout, chunk_bytes: int):
        if chunk_bytes <= 0:
            raise ConfigError(f"chunk_bytes must be > 0, got {chunk_bytes}")
        _check_acc_dtypes(layout)
        C = int(chunk_bytes)
        a = layout.entry_arrays()
        off, nb, isz, eoff = a["offset"], a["nbytes"], a["itemsize"], a["elem_offset"]
        code = np.array([_ACC_CODES[e.dtype] for e in layout.entries], dtype=np.int64)
        has = nb > 0
        c0 = np.where(has, off // C, 0)
        c1 = np.where(has, (off + nb - 1) // C, -1)
        k = c1 - c0 + 1
        e = np.repeat(np.arange(off.size, dtype=np.int64), k)
        first = np.cumsum(k) - k
        c = c0[e] + (np.arange(e.size, dtype=np.int64) - np.repeat(first, k))
        lo = np.maximum(off[e], c * C)
        hi = np.minimum(off[e] + nb[e], (c + 1) * C)
        rel_lo, rel_hi = lo - off[e], hi - off[e]
        straddle = (rel_lo % isz[e] != 0) | (rel_hi % isz[e] != 0)
        if straddle.any():
            name = layout.entries[int(e[np.argmax(straddle)])].name
            raise ConfigError(
                f"chunk_bytes={C} splits elements of entry {name!r} across chunks; use a multiple of 16 bytes"
            )
        order = np.argsort(c, kind="stable")  # by chunk, then by offset (entries are in offset order)
        self.layout = layout
        self.chunk_bytes = C
        self.n_chunks = layout.n_chunks(C)
        self.entry = e[order]
        self.off_in_chunk = (lo - c * C)[order]
        self.acc_idx = (eoff[e] + rel_lo // isz[e])[order]
        self.count = ((hi - lo) // isz[e])[order]
        self.code = code[e][order]
        self.itemsize = isz[e][order]
        self.start = np.searchsorted(c[order], np.arange(self.n_chunks + 1, dtype=np.int64)).astype(np.int64)

    def chunk_len(self, c: np.ndarray) -> np.ndarray:
        return np.minimum(self.chunk_bytes, self.layout.total_bytes - c * self.chunk_bytes)

    def segments(self, chunk_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(batch position b, segment index s) of every segment of the given chunks, in batch order."""
        cnt = self.start[chunk_ids + 1] - self.start[chunk_ids]
        b = np.repeat(np.arange(chunk_ids.size, dtype=np.int64), cnt)
        first = np.cumsum(cnt) - cnt
        s = np.repeat(self.start[chunk_ids], cnt) + (np.arange(b.size, dtype=np.int64) - np.repeat(first, cnt))
        return b, s


def chunk_plan(layout: Layout, chunk_bytes: int) -> ChunkPlan:
    """The cached ChunkPlan of a layout at a chunk size."""
    return layout.cached(("chunk_plan", int(chunk_bytes)), lambda: ChunkPlan(layout, int(chunk_bytes)))


def _chunk_sources(chunks, ids: np.ndarray, plan: ChunkPlan, dev: torch.device) -> list[tuple[torch.Tensor, int]]:
    """Per batch position: (uint8 tensor, byte offset of the chunk in it); validates lengths and devices."""
    need = plan.chunk_len(ids)
    srcs: list[tuple[torch.Tensor, int]] = []
    if isinstance(chunks, torch.Tensor):
        if chunks.dtype != torch.uint8 or chunks.device != dev:
            raise ShapeMismatchError(f"chunks must be uint8 on {dev}, got {chunks.dtype} on {chunks.device}")
        if chunks.dim() == 2:
            if chunks.shape[0] != ids.size or chunks.stride(1) != 1:
                raise ShapeMismatchError(f"chunks are {tuple(chunks.shape)} rows, need {ids.size} unit-stride rows")
            if ids.size and chunks.shape[1] < int(need.max()):
                raise ShapeMismatchError(f"chunk rows of {chunks.shape[1]} B, chunks need up to {int(need.max())} B")
            srcs = [(chunks[b], 0) for b in range(ids.size)]
        elif chunks.dim() == 1 and chunks.is_contiguous():
            ends = np.arange(ids.size, dtype=np.int64) * plan.chunk_bytes + need
            if ids.size and chunks.numel() < int(ends.max()):
                raise ShapeMismatchError(
                    f"chunk run of {chunks.numel()} B is too short for {ids.size} chunks of {plan.chunk_bytes} B"
                )
            srcs = [(chunks, b * plan.chunk_bytes) for b in range(ids.size)]
        else:
            raise ShapeMismatchError("chunks must be a 2-D [n, chunk] or contiguous 1-D uint8 tensor, or a list")
    else:
        chunks = list(chunks)
        if len(chunks) != ids.size:
            raise ShapeMismatchError(f"{len(chunks)} chunk tensors for {ids.size} chunk ids")
        for b, t in enumerate(chunks):
            _check_flat(t, f"chunk {int(ids[b])}")
            if t.device != dev or t.numel() < int(need[b]):
                raise ShapeMismatchError(f"chunk {int(ids[b])} is {t.numel()} B on {t.device}, need {int(need[b])} B")
            srcs.append((t, 0))
    return srcs


def _check_ids(chunk_ids, plan: ChunkPlan) -> np.ndarray:
    if isinstance(chunk_ids, torch.Tensor):
        chunk_ids = chunk_ids.detach().cpu().numpy()
    ids = np.asarray(chunk_ids, dtype=np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= plan.n_chunks):
        raise ShapeMismatchError(f"chunk ids must be in [0, {plan.n_chunks}), got {ids.min()}..{ids.max()}")
    if np.unique(ids).size != ids.size:
        raise ShapeMismatchError("chunk ids in one accumulate batch must be distinct")
    return ids


def _check_acc(acc: torch.Tensor, layout: Layout) -> None:
    if acc.dtype != torch.float32 or acc.dim() != 1 or not acc.is_contiguous() or acc.numel() != layout.numel:
        raise ShapeMismatchError(
            f"accumulator must be contiguous 1-D float32 of {layout.numel} elements, got {acc.dtype} {tuple(acc.shape)}"
        )


def _f32(x: float, what: str) -> float:
    v = float(np.float32(x))
    if not np.isfinite(v):
        raise ConfigError(f"{what} {x!r} is not a finite float32")
    return v


@torch.no_grad()
def accumulate_(
    acc: torch.Tensor,
    chunk_ids: Sequence[int] | np.ndarray | torch.Tensor,
    chunks: torch.Tensor | Sequence[torch.Tensor],
    weight: float,
    layout: Layout,
    chunk_bytes: int,
    *,
    backend: str | None = None,
    runner: KernelRunner | None = None,
) -> torch.Tensor:
    """acc[elements of chunks] += weight * chunk values, in fp32, in one launch; returns acc.

    `chunks` holds the batch's chunk bytes: a 2-D uint8 [n, >=chunk_bytes] tensor (row b is chunk
    chunk_ids[b]), a 1-D run of n chunks back to back, or a list of 1-D uint8 tensors.  Pad bytes are
    skipped.  `weight` is rounded to float32 first.  Chunk ids in one call must be distinct; call once per
    source, in rank order per chunk, for bit-identical FedAvg (module docstring).
    """
    plan = chunk_plan(layout, chunk_bytes)
    _check_acc(acc, layout)
    ids = _check_ids(chunk_ids, plan)
    w = _f32(weight, "FedAvg weight")
    srcs = _chunk_sources(chunks, ids, plan, acc.device)
    if ids.size == 0:
        return acc
    b, s = plan.segments(ids)
    if runner is not None or resolve_backend(acc.device, backend) == "cupy":
        run = _runner_for(acc.device, runner)
        base = np.array([t.data_ptr() + o for t, o in srcs], dtype=np.int64)
        addr = base[b] + plan.off_in_chunk[s]
        odd = addr % plan.itemsize[s] != 0
        if odd.any():  # a chunk at an odd address: the kernel's typed loads need an aligned copy
            lens = plan.chunk_len(ids)
            for p in np.unique(b[odd]).tolist():
                t, o = srcs[p]
                srcs[p] = (t[o : o + int(lens[p])].clone(), 0)
            base = np.array([t.data_ptr() + o for t, o in srcs], dtype=np.int64)
            addr = base[b] + plan.off_in_chunk[s]
        items = _tile_elems(addr, plan.acc_idx[s], plan.count[s], plan.code[s], plan.itemsize[s])
        if len(items):
            ptr, hold = run.upload(items)
            run.launch(
                "flt_accumulate",
                _grid(len(items)),
                BLOCK,
                [("ptr", acc.data_ptr()), ("ptr", ptr), ("i64", len(items)), ("f32", w)],
            )
            del hold
        return acc
    _torch_accumulate(acc, srcs, b, s, plan, w)
    return acc


def _scratch(dev: torch.device, dtype: torch.dtype, n: int) -> torch.Tensor:
    """A reusable per-thread CPU buffer: fresh allocations page-fault, which costs more than the arithmetic.

    On a GPU the caching allocator is already cheap and stream-aware; a shared buffer could race across
    streams, so every call gets its own.
    """
    if dev.type != "cpu":
        return torch.empty(n, dtype=dtype, device=dev)
    cache = _scratch_local.__dict__.setdefault("bufs", {})
    t = cache.get((dev, dtype))
    if t is None or t.numel() < n:
        t = torch.empty(n, dtype=dtype, device=dev)
        cache[(dev, dtype)] = t
    return t[:n]


def _torch_accumulate(acc, srcs, b, s, plan: ChunkPlan, w: float) -> None:
    # Cache-blocked: each tile of <= _TORCH_TILE elements is converted, scaled and added while it sits in
    # L2, through reused scratch buffers.  Segments smaller than a tile that are consecutive in the
    # accumulator (the entries of a run of chunks) are gathered with one cat, so Python work is per
    # segment or per tile, never per element.
    order = np.argsort(plan.acc_idx[s], kind="stable")
    b, s = b[order].tolist(), s[order]
    acc_idx, count, code = plan.acc_idx[s].tolist(), plan.count[s].tolist(), plan.code[s].tolist()
    off_in, isz = plan.off_in_chunk[s].tolist(), plan.itemsize[s].tolist()
    dev = acc.device
    y_buf = _scratch(dev, torch.float32, _TORCH_TILE)

    def run(u8: torch.Tensor, c: int, a0: int, n: int) -> None:
        dt = _CODE_TORCH[c]
        x = _as_dtype(u8, dt)
        for t0 in range(0, n, _TORCH_TILE):
            t1 = min(n, t0 + _TORCH_TILE)
            y = y_buf[: t1 - t0]
            if dt == torch.float32:
                torch.mul(x[t0:t1], w, out=y)
            else:
                y.copy_(x[t0:t1]).mul_(w)
            acc[a0 + t0 : a0 + t1].add_(y)

    pend: list[torch.Tensor] = []
    p_start = p_n = p_code = p_bytes = 0

    def flush() -> None:
        if len(pend) == 1:
            run(pend[0], p_code, p_start, p_n)
        elif pend:
            u8 = _scratch(dev, torch.uint8, 4 * _TORCH_TILE)[:p_bytes]
            torch.cat(pend, out=u8)
            run(u8, p_code, p_start, p_n)
        pend.clear()

    for i in range(len(b)):
        t, o = srcs[b[i]]
        lo = o + off_in[i]
        piece = t[lo : lo + count[i] * isz[i]]
        if count[i] >= _TORCH_TILE:
            flush()
            run(piece, code[i], acc_idx[i], count[i])
            continue
        if pend and (acc_idx[i] != p_start + p_n or code[i] != p_code or p_n + count[i] > _TORCH_TILE):
            flush()
        if not pend:
            p_start, p_n, p_code, p_bytes = acc_idx[i], 0, code[i], 0
        pend.append(piece)
        p_n += count[i]
        p_bytes += piece.numel()
    flush()


@torch.no_grad()
def finalize_fedavg_(
    acc: torch.Tensor,
    total_weight: float,
    tensors: Sequence[torch.Tensor],
    layout: Layout,
    *,
    backend: str | None = None,
    runner: KernelRunner | None = None,
) -> None:
    """FedAvg in place: every parameter <- dtype(acc / total_weight), rounded to nearest even.

    `total_weight` (rounded to float32) must be the sum of the weights accumulated.  acc is left holding
    the fp32 average (useful as an fp32 master copy); zero it before the next round.
    """
    dev = layout.check_tensors(tensors)
    _check_acc(acc, layout)
    if acc.device != dev:
        raise ShapeMismatchError(f"accumulator on {acc.device}, parameters on {dev}")
    _check_acc_dtypes(layout)
    W = _f32(total_weight, "FedAvg total weight")
    if W == 0.0:
        raise ConfigError("FedAvg total weight is 0: no update was accumulated")
    a = layout.entry_arrays()
    if runner is not None or resolve_backend(dev, backend) == "cupy":
        run = _runner_for(dev, runner)
        temps = {
            j: torch.empty(t.shape, dtype=t.dtype, device=dev)
            for j, t in enumerate(tensors)
            if not t.is_contiguous() and t.numel()
        }
        addr = np.array([temps.get(j, t).data_ptr() for j, t in enumerate(tensors)], dtype=np.int64)
        code = np.array([_ACC_CODES[e.dtype] for e in layout.entries], dtype=np.int64)
        items = _tile_elems(addr, a["elem_offset"], a["numel"], code, a["itemsize"])
        if len(items):
            ptr, hold = run.upload(items)
            run.launch(
                "flt_finalize",
                _grid(len(items)),
                BLOCK,
                [("ptr", acc.data_ptr()), ("ptr", ptr), ("i64", len(items)), ("f32", W)],
            )
            del hold
        for j, tmp in temps.items():
            tensors[j].copy_(tmp)
        return
    # a 1-element tensor on the device, not a Python scalar: CUDA torch turns division by a CPU scalar
    # into multiplication by its reciprocal, which is not the correctly rounded quotient the kernel uses
    acc.div_(torch.full((1,), W, dtype=torch.float32, device=dev))  # made on the device: no host sync
    for t, e0, n in zip(tensors, a["elem_offset"].tolist(), a["numel"].tolist()):
        t.copy_(acc[e0 : e0 + n].view(t.shape))


# ------------------------------------------------------------------------------------------------------
# checksum
# ------------------------------------------------------------------------------------------------------
def _splitmix_(z: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """splitmix64 in place on int64 (two's complement wrap = uint64 arithmetic; masks make shifts logical).

    `tmp` is a same-shape scratch tensor: with no allocation per op the CPU path stays in cache.
    """
    z.add_(_GOLDEN)
    for shift, mult in ((30, _MIX1), (27, _MIX2), (31, None)):
        torch.bitwise_right_shift(z, shift, out=tmp)
        z.bitwise_xor_(tmp.bitwise_and_((1 << (64 - shift)) - 1))
        if mult is not None:
            z.mul_(mult)
    return z


def _torch_hash_sums(flat: torch.Tensor, C: int, nrows: int, out: torch.Tensor) -> None:
    """out[r] = sum_i splitmix64(w_i ^ i*GOLDEN) over chunk r of `flat` (rows of C bytes, the last of which may
    be shorter than C when nrows == 1), cache-blocked: tiles of about _HASH_TILE_WORDS words."""
    nbytes = min(C, flat.numel())
    L = -(-nbytes // 8)
    dev = flat.device
    tile = _HASH_TILE_WORDS if dev.type == "cpu" else _HASH_TILE_WORDS_DEVICE
    direct = nbytes % 8 == 0 and flat.storage_offset() % 8 == 0
    kb = min(L, tile) if direct else L  # padded rows are copied whole
    rb = max(1, tile // kb)
    # i * GOLDEN for every word index, kept whole up to 32 MiB, else made per column tile
    idx = torch.arange(L, dtype=torch.int64, device=dev).mul_(_GOLDEN) if L <= 1 << 22 else None
    z = torch.empty(rb * kb, dtype=torch.int64, device=dev)
    tmp = torch.empty_like(z)
    if direct:  # nrows > 1 implies nbytes == C, so the rows are back to back
        words_all = flat[: (nrows - 1) * C + nbytes].view(torch.int64).view(nrows, L)
    else:
        rows_all = torch.as_strided(flat, (nrows, nbytes), (C, 1), flat.storage_offset())
        pad = torch.zeros((rb, 8 * L), dtype=torch.uint8, device=dev)
    out.zero_()
    for r0 in range(0, nrows, rb):
        r1 = min(nrows, r0 + rb)
        if direct:
            words = words_all[r0:r1]
        else:
            p = pad[: r1 - r0]
            p[:, :nbytes].copy_(rows_all[r0:r1])
            words = p.view(torch.int64)
        for k0 in range(0, L, kb):
            k1 = min(L, k0 + kb)
            zz = z[: (r1 - r0) * (k1 - k0)].view(r1 - r0, k1 - k0)
            tt = tmp[: zz.numel()].view_as(zz)
            ik = idx[k0:k1] if idx is not None else torch.arange(k0, k1, dtype=torch.int64, device=dev).mul_(_GOLDEN)
            torch.bitwise_xor(words[:, k0:k1], ik, out=zz)
            _splitmix_(zz, tt)
            out[r0:r1].add_(zz.sum(dim=1, dtype=torch.int64))


@torch.no_grad()
def chunk_hashes_t(
    flat: torch.Tensor, chunk_bytes: int, *, backend: str | None = None, runner: KernelRunner | None = None
) -> torch.Tensor:
    """Hashes of every chunk of a flat uint8 buffer, on its device, as int64 holding the uint64 bits.

    Equal bits to `checksum.chunk_hashes(flat.cpu().numpy(), chunk_bytes)`; `hashes_to_numpy` converts.
    """
    _check_flat(flat, "hashed buffer")
    if chunk_bytes <= 0:
        raise ConfigError(f"chunk_bytes must be > 0, got {chunk_bytes}")
    n, C = flat.numel(), int(chunk_bytes)
    nch = -(-n // C)
    dev = flat.device
    if nch == 0:
        return torch.zeros(0, dtype=torch.int64, device=dev)
    if runner is not None or resolve_backend(dev, backend) == "cupy":
        run = _runner_for(dev, runner)
        h = torch.zeros(nch, dtype=torch.int64, device=dev)
        words = -(-min(C, n) // 8)
        parts = -(-words // HASH_WORDS_PER_PART)
        aligned = int(flat.data_ptr() % 8 == 0 and C % 8 == 0)
        run.launch(
            "flt_chunk_hash_partial",
            _grid(nch * parts),
            BLOCK,
            [
                ("ptr", flat.data_ptr()),
                ("i64", n),
                ("i64", C),
                ("i64", nch),
                ("i64", parts),
                ("i64", HASH_WORDS_PER_PART),
                ("i32", aligned),
                ("ptr", h.data_ptr()),
            ],
        )
        run.launch(
            "flt_chunk_hash_final",
            _grid(-(-nch // BLOCK)),
            BLOCK,
            [("ptr", h.data_ptr()), ("i64", n), ("i64", C), ("i64", nch)],
        )
        return h
    out = torch.empty(nch, dtype=torch.int64, device=dev)
    nfull = n // C
    if nfull:
        _torch_hash_sums(flat[: nfull * C], C, nfull, out[:nfull])
    if nfull < nch:
        _torch_hash_sums(flat[nfull * C :], C, 1, out[nfull:])
    lens = torch.full((nch,), C, dtype=torch.int64, device=dev)
    lens[-1] = n - (nch - 1) * C
    out.bitwise_xor_(lens.mul_(_LEN_SALT))
    return _splitmix_(out, torch.empty_like(out))


def hashes_to_numpy(h: torch.Tensor) -> np.ndarray:
    """int64 hash tensor (any device) -> host uint64 array, the form descriptors carry."""
    return h.detach().to("cpu").contiguous().numpy().view(np.uint64)


def kernel_sources() -> list[Path]:
    """The .cu files the CuPy path compiles (for build checks)."""
    return sorted({KERNEL_DIR / f for f in KERNEL_FILES.values()})


__all__ = [
    "ACC_DTYPES",
    "ChunkPlan",
    "CupyRunner",
    "KernelRunner",
    "accumulate_",
    "chunk_hashes_t",
    "chunk_plan",
    "cupy_available",
    "finalize_fedavg_",
    "hashes_to_numpy",
    "kernel_sources",
    "pack_segments",
    "range_segments",
    "resolve_backend",
    "torch_dtype",
    "unpack_segments",
]
