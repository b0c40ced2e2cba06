"""Per-chunk cryptographic digests: keyed BLAKE3, 128 bits per chunk, bound to the round and the owner.

A relaying peer must not be able to swap a chunk for bytes of its choosing, so the digest an owner
publishes in its descriptor is a cryptographic hash (BLAKE3, the `blake3` package: Rust, SIMD, releases
the GIL) truncated to 16 bytes.  It is keyed: the key is derived from (group seed, round, owner), so a
digest list from another round, or another owner's, matches no bytes of this round, and a replayed
descriptor is refused even when its header is rewritten.

    key(seed, round, owner) = BLAKE3-derive-key("fltorrent_hpc 2026-12 chunk digest v1", le64(seed, round, owner))
    digest(chunk)           = BLAKE3-keyed(key, chunk bytes)[:16]    as two little-endian uint64 words

kernels/blake3.cu computes the same bits on the device (chunks, 1 KiB leaves and tree levels in parallel).
On the host, buffers of several chunks are hashed by the rank's share of cores, one chunk per task (the
package releases the GIL, so threads run in parallel).  The layout fingerprint uses the same hash
unkeyed; the schedule's randomness does not use it at all (swarm/rng.py has its own mixer).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

KEY_CONTEXT = "fltorrent_hpc 2026-12 chunk digest v1"
DIGEST_BYTES = 16
DIGEST_WORDS = DIGEST_BYTES // 8  # uint64 words per chunk digest
PARALLEL_MIN_BYTES = 8 << 20  # below this a thread hand-off costs more than it saves

_lock = threading.Lock()
_pools: dict[int, ThreadPoolExecutor] = {}


def _blake3() -> Any:
    try:
        from blake3 import blake3
    except ImportError as e:  # pragma: no cover - a declared dependency
        from ..errors import ConfigError

        raise ConfigError("chunk digests need the blake3 package: pip install blake3") from e
    return blake3


def round_key(seed: int, round_id: int, owner: int) -> bytes:
    """The 32-byte BLAKE3 key of `owner`'s chunks in round `round_id` of a group seeded `seed`."""
    words = np.array([seed, round_id, owner], dtype="<i8").tobytes()
    return _blake3()(words, derive_key_context=KEY_CONTEXT).digest(32)


def key_words(key: bytes) -> np.ndarray:
    """The key as the eight little-endian uint32 words the device kernel takes."""
    if len(key) != 32:
        raise ValueError(f"a BLAKE3 key has 32 bytes, got {len(key)}")
    return np.frombuffer(key, dtype="<u4").astype(np.uint32)


def chunk_digests(
    buf: np.ndarray | bytes | memoryview, chunk_bytes: int, key: bytes, threads: int | None = None
) -> np.ndarray:
    """uint64 [ceil(n / chunk_bytes), 2]: the keyed digest of every chunk of a flat buffer (last may be short).

    Any chunk size and alignment; a contiguous buffer is read in place.  Buffers of several chunks and at
    least PARALLEL_MIN_BYTES are hashed by `threads` threads (default: this process's numba thread count,
    which the engine sets to the rank's share of the node's cores).
    """
    b = _as_bytes(buf)
    n = b.size
    chunk_bytes = int(chunk_bytes)
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    K = -(-n // chunk_bytes)
    out = np.empty((K, DIGEST_WORDS), dtype=np.uint64)
    if K == 0:
        return out
    raw = out.view(np.uint8).reshape(K, DIGEST_BYTES)
    h = _blake3()
    mv = memoryview(b)

    def one(c: int) -> None:
        raw[c] = np.frombuffer(h(mv[c * chunk_bytes : (c + 1) * chunk_bytes], key=key).digest(DIGEST_BYTES), np.uint8)

    if threads is None:
        threads = _default_threads() if n >= PARALLEL_MIN_BYTES else 1
    threads = max(1, min(int(threads), K))
    if threads == 1:
        for c in range(K):
            one(c)
    else:
        list(_pool(threads).map(one, range(K)))
    return out


def fingerprint(data: np.ndarray | bytes | memoryview) -> int:
    """A 63-bit fingerprint of small metadata (a layout table): unkeyed BLAKE3, first 8 bytes."""
    d = _blake3()(memoryview(_as_bytes(data))).digest(8)
    return int.from_bytes(d, "little") & 0x7FFFFFFFFFFFFFFF


def _as_bytes(buf: np.ndarray | bytes | memoryview) -> np.ndarray:
    """The bytes of buf as a flat uint8 array, a view when buf is contiguous (arrays in C order)."""
    if isinstance(buf, np.ndarray):
        if not buf.flags.c_contiguous:
            buf = np.ascontiguousarray(buf)
        return buf.reshape(-1).view(np.uint8)
    return np.frombuffer(buf, dtype=np.uint8)


def _default_threads() -> int:
    import numba

    return int(numba.get_num_threads())


def _pool(threads: int) -> ThreadPoolExecutor:
    with _lock:
        if threads not in _pools:
            _pools[threads] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fltorrent-digest")
        return _pools[threads]
