"""Layout of an update: which tensor lives where in the flat byte buffer that is cut into chunks.

A receiver never infers the layout; it arrives with the descriptor as a fixed-width int64 array
(`Layout.to_array`), never pickled.  Entries are placed in order, each at a 16-byte aligned offset
(the pad bytes are zero), so device copies stay vectorised and every element of a <= 8-byte dtype
sits inside one chunk whenever `chunk_bytes` is a multiple of 16.

    flat[e.offset : e.offset + e.nbytes] == tensor_e.reshape(-1).view(uint8)      (little-endian)
    total_bytes = align16(end of the last entry)

Moving bytes between tensors and the flat buffer is `kernels.pack_segments` / `unpack_segments` (whole
buffer or byte ranges, CuPy kernel or torch fallback by device); this module only describes the buffer, so
it imports no kernels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, ProtocolError, ShapeMismatchError
from .digest import fingerprint

ALIGN = 16
"""Byte alignment of every entry inside the flat buffer."""

FORMAT_VERSION = 1
"""Version of the `to_array` wire format (bumped on any change to it)."""

MAX_NDIM = 8
"""Most dimensions an entry may have (the wire format has a fixed-width shape field)."""

_MAGIC = 0x464C544C41594F55  # "FLTLAYOU"
_HEADER = 8  # magic, format, version, n_entries, total_bytes, align, name_bytes, row_width
_ROW = 5 + MAX_NDIM  # offset, numel, dtype_code, ndim, name_len, shape[MAX_NDIM]

# Stable wire codes: never renumber, only append.
DTYPE_CODES: dict[str, int] = {
    "float32": 1,
    "float16": 2,
    "bfloat16": 3,
    "float64": 4,
    "uint8": 5,
    "int8": 6,
    "int16": 7,
    "int32": 8,
    "int64": 9,
    "bool": 10,
    "complex64": 11,
    "complex128": 12,
    "float8_e4m3fn": 13,
    "float8_e5m2": 14,
    "uint16": 15,
    "uint32": 16,
    "uint64": 17,
}
_CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}


def align_up(n: int, a: int = ALIGN) -> int:
    return -(-n // a) * a


def dtype_name(dtype: torch.dtype) -> str:
    """'float32' for torch.float32: the string form used in entries and on the wire."""
    return str(dtype).removeprefix("torch.")


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of an entry's dtype string; ConfigError if this torch lacks it."""
    dt = getattr(torch, name, None)
    if name not in DTYPE_CODES or not isinstance(dt, torch.dtype):
        raise ConfigError(f"dtype {name!r} is not supported in a layout; supported: {sorted(DTYPE_CODES)}")
    return dt


@dataclass(frozen=True)
class LayoutEntry:
    """One tensor of the update: its name, byte offset in the flat buffer, element count, dtype, shape."""

    name: str
    offset: int
    numel: int
    dtype: str
    shape: tuple[int, ...]

    @property
    def itemsize(self) -> int:
        return torch_dtype(self.dtype).itemsize

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    @property
    def end(self) -> int:
        return self.offset + self.nbytes


@dataclass(frozen=True, eq=False)
class Layout:
    """Immutable, canonical table of entries; equal layouts have equal `to_array()` on every rank.

    `version` is the caller's layout generation (e.g. bumped when a model grows a layer), carried on
    the wire so a peer holding an older layout fails loudly instead of mis-reading bytes.
    """

    entries: tuple[LayoutEntry, ...]
    total_bytes: int
    version: int = 0
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "entries", tuple(self.entries))
        pos = 0
        names: set[str] = set()
        for e in self.entries:
            torch_dtype(e.dtype)
            if e.name in names:
                raise ConfigError(f"layout: duplicate entry name {e.name!r}")
            names.add(e.name)
            if len(e.shape) > MAX_NDIM or any(int(s) < 0 for s in e.shape):
                raise ConfigError(f"layout: entry {e.name!r} has bad shape {e.shape} (at most {MAX_NDIM} dims)")
            if math.prod(e.shape) != e.numel:
                raise ConfigError(f"layout: entry {e.name!r} numel {e.numel} != prod(shape {e.shape})")
            if e.offset != align_up(pos):
                raise ConfigError(f"layout: entry {e.name!r} at offset {e.offset}, canonical is {align_up(pos)}")
            pos = e.end
        if self.total_bytes != align_up(pos):
            raise ConfigError(f"layout: total_bytes {self.total_bytes} != canonical {align_up(pos)}")
        if not (0 <= self.version < 2**62):
            raise ConfigError(f"layout: version {self.version} out of range")
        arr = self.to_array()
        # BLAKE3 of the wire form: stable across processes (unlike hash())
        self._cache["fingerprint"] = fingerprint(arr.view(np.uint8))
        self._cache["array"] = arr

    # identity --------------------------------------------------------------------------------------
    @property
    def fingerprint(self) -> int:
        """64-bit digest of the wire form: ranks compare this to agree on a layout in one integer."""
        return self._cache["fingerprint"]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Layout):
            return NotImplemented
        return self.fingerprint == other.fingerprint and np.array_equal(self._cache["array"], other._cache["array"])

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    # sizes -----------------------------------------------------------------------------------------
    @property
    def numel(self) -> int:
        """Elements over all entries: the length of the fp32 FedAvg accumulator."""
        return sum(e.numel for e in self.entries)

    def n_chunks(self, chunk_bytes: int) -> int:
        if chunk_bytes <= 0:
            raise ConfigError(f"chunk_bytes must be > 0, got {chunk_bytes}")
        return -(-self.total_bytes // chunk_bytes)

    def __len__(self) -> int:
        return len(self.entries)

    # construction ----------------------------------------------------------------------------------
    @classmethod
    def from_specs(cls, specs: Sequence[tuple[str, str, Sequence[int]]], version: int = 0) -> Layout:
        """Canonical layout from (name, dtype string, shape) triples, in that order."""
        entries = []
        pos = 0
        for name, dtype, shape in specs:
            shape_t = tuple(int(s) for s in shape)
            off = align_up(pos)
            e = LayoutEntry(str(name), off, math.prod(shape_t), str(dtype), shape_t)
            entries.append(e)
            pos = off + e.nbytes
        return cls(tuple(entries), align_up(pos), version)

    @classmethod
    def from_tensors(
        cls,
        tensors: Sequence[tuple[str, torch.Tensor]] | Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
        version: int = 0,
    ) -> Layout:
        """Layout of named tensors (`list(model.named_parameters())`, a state_dict-like mapping) or of a
        plain list (names '0', '1', ...), in the given order."""
        if isinstance(tensors, Mapping):
            tensors = list(tensors.items())
        specs = []
        for i, item in enumerate(tensors):
            name, t = item if isinstance(item, tuple) else (str(i), item)
            if not isinstance(t, torch.Tensor):
                raise ConfigError(f"layout: item {i} ({name!r}) is {type(t).__name__}, not a torch.Tensor")
            specs.append((name, dtype_name(t.dtype), tuple(t.shape)))
        return cls.from_specs(specs, version)

    # wire form -------------------------------------------------------------------------------------
    def to_array(self) -> np.ndarray:
        """Fixed-width int64 control message: header, one row per entry, then UTF-8 names packed in words."""
        if "array" in self._cache:
            return self._cache["array"].copy()
        names = [e.name.encode("utf-8") for e in self.entries]
        blob = b"".join(names)
        n = len(self.entries)
        out = np.zeros(_HEADER + n * _ROW + -(-len(blob) // 8), dtype=np.int64)
        out[:_HEADER] = (_MAGIC, FORMAT_VERSION, self.version, n, self.total_bytes, ALIGN, len(blob), _ROW)
        rows = out[_HEADER : _HEADER + n * _ROW].reshape(n, _ROW)
        for r, (e, nm) in enumerate(zip(self.entries, names)):
            rows[r, :5] = (e.offset, e.numel, DTYPE_CODES[e.dtype], len(e.shape), len(nm))
            rows[r, 5 : 5 + len(e.shape)] = e.shape
        padded = blob + b"\0" * (-len(blob) % 8)
        out[_HEADER + n * _ROW :] = np.frombuffer(padded, dtype="<i8")
        return out

    @classmethod
    def from_array(cls, arr: np.ndarray) -> Layout:
        """Inverse of `to_array`; ProtocolError for anything malformed (it came from another peer)."""
        a = np.asarray(arr)
        if a.dtype != np.int64 or a.ndim != 1:
            raise ProtocolError(f"layout array must be 1-D int64, got {a.dtype} with shape {a.shape}")
        if a.size < _HEADER or int(a[0]) != _MAGIC:
            raise ProtocolError("layout array: bad magic or truncated header")
        magic, fmt, version, n, total, align, nblob, row = (int(x) for x in a[:_HEADER])
        if fmt != FORMAT_VERSION or align != ALIGN or row != _ROW:
            raise ProtocolError(
                f"layout array: format {fmt}/align {align}/row {row}, this build speaks {FORMAT_VERSION}/{ALIGN}/{_ROW}"
            )
        if n < 0 or nblob < 0 or a.size != _HEADER + n * _ROW + -(-nblob // 8):
            raise ProtocolError(f"layout array: {a.size} words do not match {n} entries and {nblob} name bytes")
        rows = a[_HEADER : _HEADER + n * _ROW].reshape(n, _ROW)
        blob = a[_HEADER + n * _ROW :].astype("<i8").tobytes()[:nblob]
        specs, pos, offsets = [], 0, []
        for r in range(n):
            off, numel, code, ndim, nlen = (int(x) for x in rows[r, :5])
            if code not in _CODE_DTYPES or not (0 <= ndim <= MAX_NDIM) or nlen < 0 or pos + nlen > nblob:
                raise ProtocolError(f"layout array: entry {r} has bad dtype code {code}, ndim {ndim} or name length")
            if np.any(rows[r, 5 + ndim :] != 0):
                raise ProtocolError(f"layout array: entry {r} has shape words beyond ndim {ndim}")
            try:
                name = blob[pos : pos + nlen].decode("utf-8")
            except UnicodeDecodeError as e:
                raise ProtocolError(f"layout array: entry {r} name is not UTF-8") from e
            pos += nlen
            specs.append((name, _CODE_DTYPES[code], tuple(int(s) for s in rows[r, 5 : 5 + ndim])))
            offsets.append((off, numel))
        if pos != nblob:
            raise ProtocolError("layout array: name bytes left over")
        try:
            lay = cls.from_specs(specs, version)
        except ConfigError as e:
            raise ProtocolError(f"layout array: {e}") from e
        if lay.total_bytes != total or [(e.offset, e.numel) for e in lay.entries] != offsets:
            raise ProtocolError("layout array: offsets, element counts or total_bytes are not canonical")
        return lay

    # checks ----------------------------------------------------------------------------------------
    def check_tensors(self, tensors: Sequence[torch.Tensor]) -> torch.device:
        """Validate tensors against the entries; return their common device.

        ShapeMismatchError names the first entry whose numel, dtype or shape differs.
        """
        if len(tensors) != len(self.entries):
            raise ShapeMismatchError(f"layout has {len(self.entries)} entries, got {len(tensors)} tensors")
        dev = None
        for e, t in zip(self.entries, tensors):
            if not isinstance(t, torch.Tensor):
                raise ShapeMismatchError(f"entry {e.name!r}: expected a tensor, got {type(t).__name__}")
            if dtype_name(t.dtype) != e.dtype or tuple(t.shape) != e.shape:
                raise ShapeMismatchError(
                    f"entry {e.name!r}: layout says {e.dtype}{list(e.shape)}, tensor is {dtype_name(t.dtype)}"
                    f"{list(t.shape)}"
                )
            if dev is None:
                dev = t.device
            elif t.device != dev:
                raise ConfigError(f"entry {e.name!r} is on {t.device}, others on {dev}: one device per update")
        return dev if dev is not None else torch.device("cpu")

    def entry_arrays(self) -> dict[str, np.ndarray]:
        """Vectors over entries (offset, nbytes, itemsize, numel, elem_offset) for vectorised planning."""
        if "arrays" not in self._cache:
            n = len(self.entries)
            off = np.fromiter((e.offset for e in self.entries), np.int64, n)
            numel = np.fromiter((e.numel for e in self.entries), np.int64, n)
            isz = np.fromiter((e.itemsize for e in self.entries), np.int64, n)
            elem_off = np.zeros(n, np.int64)
            if n:
                np.cumsum(numel[:-1], out=elem_off[1:])
            self._cache["arrays"] = {
                "offset": off,
                "nbytes": numel * isz,
                "itemsize": isz,
                "numel": numel,
                "elem_offset": elem_off,
            }
        return self._cache["arrays"]

    def cached(self, key: Any, make: Any) -> Any:
        """Per-layout memo for derived tables (chunk plans, device copies), built once by `make()`."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]
