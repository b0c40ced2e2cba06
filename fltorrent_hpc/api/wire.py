"""What goes on the wire for a collective: tensor bytes in and out, and the fixed-width descriptor ranks agree on.

Data moves as raw bytes (so bf16 never meets MPI's datatype system); several tensors share one payload at
16-byte aligned offsets.  Before every collective each rank contributes one int64 descriptor: the op and its
arguments (`OP_FIELDS`) and, for swarm rounds, the engine's round words (`ROUND_FIELDS`, the order of
`SwarmEngine.round_meta`).  Every rank compares all of them, so one all-gather checks both.
"""

from __future__ import annotations

import ctypes
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..config import BT_DECISIONS, PRIVACY_MECHANISMS, PROTOCOLS, SCHEDULERS
from ..errors import ShapeMismatchError, UnsupportedError

ALIGN = 16  # byte alignment of tensors packed into one payload

_DTYPE_NAMES = (
    "float32 float64 float16 bfloat16 int64 int32 int16 int8 uint8 bool complex64 complex128 "
    "uint16 uint32 uint64 float8_e4m3fn float8_e5m2"
)
DTYPES = [getattr(torch, n) for n in _DTYPE_NAMES.split() if isinstance(getattr(torch, n, None), torch.dtype)]
DTYPE_CODE = {d: i + 1 for i, d in enumerate(DTYPES)}

OP_NAMES = (
    "allreduce allreduce_coalesced allgather all_gather_single allgather_coalesced all_gather_single_coalesced "
    "broadcast reduce reduce_scatter reduce_scatter_single reduce_scatter_single_coalesced alltoall "
    "all_to_all_single gather scatter barrier swarm_round"
).split()
OPCODE = {n: i + 1 for i, n in enumerate(OP_NAMES)}
OP_FIELDS = "magic seq op rejected dtype numel ndim dim0 dim1 dim2 dim3 dim4 dim5 shape_crc root redop".split()
# SwarmEngine.round_meta's words, in its order; -1 for ops that run no swarm round
ROUND_FIELDS = (
    "round_magic round_id nbytes chunk_bytes privacy degree scheduler tau consensus integrity bt_decisions bt_passes "
    "direct_bytes bt_window"
).split()
META_FIELDS = OP_FIELDS + ROUND_FIELDS
OP_W = len(OP_FIELDS)
META_W = len(META_FIELDS)
MAGIC = 0x464C54  # "FLT"


# --------------------------------------------------------------------------------------------- tensors <-> bytes


def check_tensor(t: Any, what: str) -> torch.Tensor:
    """t itself if the backend can move it (dense, cpu/cuda, a known dtype); UnsupportedError otherwise."""
    if not isinstance(t, torch.Tensor):
        raise UnsupportedError(f"{what}: expected a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise UnsupportedError(f"{what}: layout {t.layout} is not supported (dense tensors only)")
    if t.device.type not in ("cpu", "cuda"):
        raise UnsupportedError(f"{what}: device {t.device} is not supported (cpu and cuda only)")
    if t.dtype not in DTYPE_CODE:
        raise UnsupportedError(f"{what}: dtype {t.dtype} is not supported")
    return t


def one(tensors: Sequence[torch.Tensor], what: str) -> torch.Tensor:
    """The single tensor of a one-tensor op (torch passes lists)."""
    if len(tensors) != 1:
        raise UnsupportedError(f"{what}: expected exactly one tensor per call, got {len(tensors)}")
    return check_tensor(tensors[0], what)


def host_bytes(t: torch.Tensor) -> np.ndarray:
    """A uint8 numpy view (CPU, contiguous) or copy (CUDA, non-contiguous) of t's bytes."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")  # synchronous D2H on the caller's current stream: the bytes are ready when it returns
    t = t.contiguous().reshape(-1)
    if t.numel() == 0:
        return np.zeros(0, dtype=np.uint8)
    return t.view(torch.uint8).numpy()


def host_view(t: torch.Tensor) -> np.ndarray:
    """A writable uint8 numpy view of a contiguous CPU tensor's bytes that leaves its storage resizable.

    Why not `t.numpy()`: torch marks a storage that numpy shares as not resizable for good, and FSDP frees its
    gathered flat parameter by resizing that storage to 0 after the all-gather wrote into it.  The caller keeps
    `t` alive while the view is used (the collective's outputs live until its Work completes)."""
    nb = t.numel() * t.element_size()
    if nb == 0:
        return np.zeros(0, dtype=np.uint8)
    return np.frombuffer((ctypes.c_uint8 * nb).from_address(t.data_ptr()), dtype=np.uint8)


def from_bytes(buf: np.ndarray, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
    """A CPU tensor of dtype/shape over the bytes in buf (no copy unless buf is read-only)."""
    if buf.size == 0:
        return torch.empty(tuple(shape), dtype=dtype)
    if not buf.flags.writeable:
        buf = buf.copy()
    return torch.from_numpy(buf).view(dtype).view(tuple(shape))


def write(out: torch.Tensor, src: torch.Tensor) -> None:
    """Copy a CPU result into an output tensor on its own device."""
    if src is out:
        return
    with torch.no_grad():
        out.copy_(src.view(out.shape) if src.shape != out.shape else src)


def aligned_layout(sizes: Sequence[int]) -> tuple[list[int], int]:
    """Offsets of byte blocks packed at ALIGN boundaries, and the total length."""
    offs, pos = [], 0
    for n in sizes:
        offs.append(pos)
        pos += -(-n // ALIGN) * ALIGN
    return offs, pos


def pack(tensors: Sequence[torch.Tensor]) -> tuple[np.ndarray, list[int]]:
    """Concatenate tensors' bytes, each at a 16-byte aligned offset, into one uint8 payload.

    A single tensor is not copied: the payload is a view of its bytes (CPU) or its host copy (CUDA).
    """
    if len(tensors) == 1:
        return host_bytes(tensors[0]), [0]
    parts = [host_bytes(t) for t in tensors]
    offs, total = aligned_layout([p.size for p in parts])
    buf = np.zeros(total, dtype=np.uint8)
    for o, p in zip(offs, parts):
        buf[o : o + p.size] = p
    return buf, offs


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def devices_of(tensors: Sequence[torch.Tensor]) -> list[torch.device]:
    """The CUDA devices among tensors (a Work's future must know them to order the caller's streams)."""
    return sorted({t.device for t in tensors if t.device.type == "cuda"}, key=str)


def splits(t: torch.Tensor, split_sizes: Sequence[int] | None, n: int, what: str) -> list[int]:
    """Rows per rank of all_to_all_single's dim 0 (even split when no sizes are given)."""
    rows = t.shape[0] if t.dim() else 0
    if split_sizes is None or len(split_sizes) == 0:
        if rows % n:
            raise ShapeMismatchError(f"all_to_all_single: {what} dim 0 ({rows}) is not divisible by {n}")
        return [rows // n] * n
    s = [int(x) for x in split_sizes]
    if len(s) != n or any(x < 0 for x in s) or sum(s) != rows:
        raise ShapeMismatchError(f"all_to_all_single: {what} splits {s} do not cover dim 0 ({rows}) for {n} ranks")
    return s


# --------------------------------------------------------------------------------------------- the descriptor


def meta(
    seq: int,
    name: str,
    *,
    rejected: bool = False,
    dtype: int = 0,
    numel: int = 0,
    shape: Sequence[int] = (),
    root: int = -1,
    redop: int = -1,
    crc: int = 0,
) -> np.ndarray:
    """The op part of a descriptor (META_W words; the round words stay -1 until the comm thread fills them)."""
    m = np.full(META_W, -1, dtype=np.int64)
    m[0], m[1], m[2], m[3] = MAGIC, seq, OPCODE[name], int(rejected)
    m[4], m[5], m[6] = dtype, numel, len(shape)
    for i, d in enumerate(list(shape)[:6]):
        m[7 + i] = d
    m[13], m[14], m[15] = crc, root, redop
    return m


def meta_tensors(name: str, ts: Sequence[torch.Tensor], *, root: int = -1, redop: int = -1) -> np.ndarray:
    """Descriptor of an op over tensors: dtype and shape of one, or crcs of the (dtype, shape) list of several."""
    if len(ts) == 1:
        t = ts[0]
        shape = tuple(t.shape)
        return meta(
            0,
            name,
            dtype=DTYPE_CODE[t.dtype],
            numel=t.numel(),
            shape=shape,
            root=root,
            redop=redop,
            crc=zlib.crc32(repr(shape).encode()),
        )
    desc = repr([(str(t.dtype), tuple(t.shape)) for t in ts]).encode()
    return meta(
        0,
        name,
        dtype=zlib.crc32(desc),
        numel=sum(t.numel() for t in ts),
        shape=(len(ts),),
        root=root,
        redop=redop,
        crc=zlib.crc32(desc[::-1]),
    )


def decode(field: int, v: int) -> str:
    """A descriptor word as a person reads it (op and dtype names, reduce op, privacy mechanisms, ...)."""
    name = META_FIELDS[field] if 0 <= field < META_W else ""
    v = int(v)
    if name == "op":
        return OP_NAMES[v - 1] if 1 <= v <= len(OP_NAMES) else str(v)
    if name == "dtype":
        return str(DTYPES[v - 1]) if 1 <= v <= len(DTYPES) else str(v)
    if name == "redop" and v >= 0:
        return dist.ReduceOp.RedOpType(v).name
    if name == "privacy" and v >= 0:
        mech = ",".join(m for i, m in enumerate(PRIVACY_MECHANISMS) if v >> i & 1) or "none"
        if v < 8:  # no protocol words (a descriptor of mechanisms alone)
            return mech
        proto = PROTOCOLS[v >> 3 & 31] if (v >> 3 & 31) < len(PROTOCOLS) else str(v >> 3 & 31)
        return f"{mech} (protocol {proto}, seed_peers {v >> 8})"
    if name == "scheduler" and 0 <= v < len(SCHEDULERS):
        return SCHEDULERS[v]
    if name == "bt_decisions" and 0 <= v < len(BT_DECISIONS):
        return BT_DECISIONS[v]
    return str(v)


def differences(a: np.ndarray, b: np.ndarray, ra: int, rb: int) -> list[str]:
    """'field: rank ra X vs rank rb Y' for every descriptor word where a and b differ."""
    return [
        f"{META_FIELDS[i]}: rank {ra} {decode(i, a[i])} vs rank {rb} {decode(i, b[i])}"
        for i in range(min(a.size, b.size, META_W))
        if a[i] != b[i]
    ]
