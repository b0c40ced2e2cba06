"""Per-chunk 64-bit hash published in descriptors and checked on receipt.

It guards against corruption in transit and buggy peers, not a cryptographic adversary.  It is a sum of
independently mixed 8-byte words, so a GPU computes it as a parallel reduction and gets the same bits:

    words  = chunk zero-padded to a multiple of 8 bytes, read as little-endian uint64 w_0..w_{L-1}
    h      = sum_i splitmix64(w_i XOR (i * GOLDEN))            (mod 2**64)
    digest = splitmix64(h XOR (nbytes * LEN_SALT))

kernels/checksum.cu and the torch fallback in kernels.py compute exactly this.

On the host, one numba-compiled call hashes every chunk of a buffer (~10 GB/s a core, near memory speed).
It is compiled on first use, not at import (numba itself is imported then too), with cache=True so a
machine compiles it once; where no cache directory is writable it compiles per process instead.  It runs
with nogil=True, so a thread may hash beside MPI progress.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
MIX1 = np.uint64(0xBF58476D1CE4E5B9)
MIX2 = np.uint64(0x94D049BB133111EB)
LEN_SALT = np.uint64(0xD6E8FEB86659FD93)

_S8, _S16, _S24, _S27, _S30, _S31 = (np.uint64(s) for s in (8, 16, 24, 27, 30, 31))
_S32, _S40, _S48, _S56 = (np.uint64(s) for s in (32, 40, 48, 56))


def splitmix64(z: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on a uint64 array (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = z + GOLDEN
        z = (z ^ (z >> np.uint64(30))) * MIX1
        z = (z ^ (z >> np.uint64(27))) * MIX2
        return z ^ (z >> np.uint64(31))


def chunk_hashes(buf: np.ndarray | bytes | memoryview, chunk_bytes: int, threads: int | None = None) -> np.ndarray:
    """Hashes of every chunk of a flat byte buffer (the last chunk may be short): uint64[ceil(n/C)].

    Any chunk size and alignment; a contiguous buffer (numpy array of any dtype, bytes, memoryview) is
    read in place, in one compiled call for all chunks.  Buffers of several chunks and at least
    PARALLEL_MIN_BYTES are split into chunk-aligned parts hashed by `threads` threads at once (default: this
    process's numba thread count, which the engine sets to the rank's share of the node's cores).
    """
    b = _as_bytes(buf)
    n = b.size
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    chunk_bytes = int(chunk_bytes)
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    out = np.empty(-(-n // chunk_bytes), dtype=np.uint64)
    if threads is None:
        threads = _default_threads() if n >= PARALLEL_MIN_BYTES else 1
    threads = max(1, min(int(threads), out.size))
    if threads == 1:
        _run(b, chunk_bytes, out)
        return out
    # the kernel releases the GIL: contiguous runs of whole chunks, one per thread, give the same digests
    edges = np.linspace(0, out.size, threads + 1).round().astype(np.int64)
    parts = [(int(a), int(z)) for a, z in zip(edges[:-1], edges[1:]) if z > a]
    list(
        _pool(threads).map(
            lambda r: _run(b[r[0] * chunk_bytes : r[1] * chunk_bytes], chunk_bytes, out[r[0] : r[1]]), parts
        )
    )
    return out


def chunk_hash(chunk: np.ndarray | bytes | memoryview) -> np.uint64:
    """Hash of one chunk of any length."""
    b = _as_bytes(chunk)
    out = np.empty(1, dtype=np.uint64)
    _run(b, max(b.size, 1), out)
    return out[0]


def _as_bytes(buf: np.ndarray | bytes | memoryview) -> np.ndarray:
    """The bytes of buf as a flat uint8 array, a view when buf is contiguous (arrays in C order)."""
    if isinstance(buf, np.ndarray):
        if not buf.flags.c_contiguous:
            buf = np.ascontiguousarray(buf)
        return buf.reshape(-1).view(np.uint8)
    return np.frombuffer(buf, dtype=np.uint8)


def _hash_chunks_impl(buf, chunk_bytes, out):  # pragma: no cover - runs compiled
    """out[c] = digest of buf[c*C : (c+1)*C] (the last chunk may be short); compiled by numba.

    Words are assembled from bytes in little-endian order, so any alignment and chunk size works and the
    host's byte order does not matter; LLVM folds the eight byte loads of a full word into one load.
    """

    def mix(z):
        z = z + GOLDEN
        z = (z ^ (z >> _S30)) * MIX1
        z = (z ^ (z >> _S27)) * MIX2
        return z ^ (z >> _S31)

    n = buf.size
    for c in range(out.size):
        start = c * chunk_bytes
        m = min(chunk_bytes, n - start)
        ch = buf[start : start + m]  # indices from 0 let LLVM see they are in range and fuse the loads
        nw = m // 8
        h = np.uint64(0)
        key = np.uint64(0)  # i * GOLDEN
        for i in range(nw):
            p = 8 * i
            w = (
                np.uint64(ch[p])
                | (np.uint64(ch[p + 1]) << _S8)
                | (np.uint64(ch[p + 2]) << _S16)
                | (np.uint64(ch[p + 3]) << _S24)
                | (np.uint64(ch[p + 4]) << _S32)
                | (np.uint64(ch[p + 5]) << _S40)
                | (np.uint64(ch[p + 6]) << _S48)
                | (np.uint64(ch[p + 7]) << _S56)
            )
            h += mix(w ^ key)
            key += GOLDEN
        if m > 8 * nw:  # the zero-padded last word
            w = np.uint64(0)
            for j in range(m - 8 * nw):
                w |= np.uint64(ch[8 * nw + j]) << np.uint64(8 * j)
            h += mix(w ^ key)
        out[c] = mix(h ^ (np.uint64(m) * LEN_SALT))


PARALLEL_MIN_BYTES = 8 << 20  # below this a thread hand-off costs more than it saves

_kernel: Any = None
_kernel_lock = threading.Lock()
_pools: dict[int, Any] = {}


def _default_threads() -> int:
    import numba

    return int(numba.get_num_threads())


def _pool(threads: int) -> Any:
    from concurrent.futures import ThreadPoolExecutor

    with _kernel_lock:
        if threads not in _pools:
            _pools[threads] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fltorrent-hash")
        return _pools[threads]


# A cached kernel records the module that compiled it and imports it on load, so only the package module
# writes to the cache (not a copy of this file loaded under another name, which would break the cache).
_CACHEABLE = __name__ == "fltorrent_hpc.chunks.digest"


def _build_kernel(cache: bool) -> Any:
    import numba

    try:
        return numba.njit(cache=cache, nogil=True)(_hash_chunks_impl)
    except RuntimeError:  # "no locator available": no writable cache directory, so compile per process
        return numba.njit(cache=False, nogil=True)(_hash_chunks_impl)


def _get_kernel() -> Any:
    global _kernel
    if _kernel is None:
        with _kernel_lock:
            if _kernel is None:
                _kernel = _build_kernel(cache=_CACHEABLE)
    return _kernel


def _run(b: np.ndarray, chunk_bytes: int, out: np.ndarray) -> None:
    global _kernel
    kernel = _get_kernel()
    try:
        kernel(b, chunk_bytes, out)
    except (OSError, ImportError):  # the cache could not be written, or holds an entry it cannot load
        with _kernel_lock:
            _kernel = kernel = _build_kernel(cache=False)
        kernel(b, chunk_bytes, out)
