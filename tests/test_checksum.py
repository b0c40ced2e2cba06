"""Host chunk hash (fltorrent_hpc/checksum.py) against a plain numpy reference of the documented formula."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fltorrent_hpc.chunks import digest as checksum
from fltorrent_hpc.chunks.digest import chunk_hash, chunk_hashes, splitmix64

M64 = (1 << 64) - 1


def ref_splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def ref_chunk_hash(b: bytes) -> int:
    """digest = splitmix64(sum_i splitmix64(w_i ^ i*GOLDEN) ^ nbytes*LEN_SALT), words zero-padded little-endian."""
    n = len(b)
    words = np.frombuffer(b + bytes(-n % 8), dtype="<u8")
    h = sum(ref_splitmix64(int(w) ^ ((i * 0x9E3779B97F4A7C15) & M64)) for i, w in enumerate(words)) & M64
    return ref_splitmix64(h ^ ((n * 0xD6E8FEB86659FD93) & M64))


def ref_chunk_hashes(b: bytes, chunk: int) -> np.ndarray:
    return np.array([ref_chunk_hash(b[i : i + chunk]) for i in range(0, len(b), chunk)], dtype=np.uint64)


def rand_bytes(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


@pytest.mark.parametrize("n", list(range(18)) + [31, 63, 64, 65, 1000, 4099])
@pytest.mark.parametrize("skew", [0, 3])
def test_single_chunk_matches_reference(n, skew):
    b = rand_bytes(n + skew, seed=n)[skew:]  # misaligned starts too
    h = chunk_hash(b)
    assert isinstance(h, np.uint64) and int(h) == ref_chunk_hash(b.tobytes())
    assert np.array_equal(chunk_hashes(b, max(n, 1)), ref_chunk_hashes(b.tobytes(), max(n, 1)))


@pytest.mark.parametrize("chunk", [1, 3, 7, 8, 9, 16, 17, 24, 100, 1024, 1027, 5000])
@pytest.mark.parametrize("n", [1, 8, 9, 1000, 4096, 4097])
def test_many_chunks_match_reference(n, chunk):
    b = rand_bytes(n + 5, seed=n + chunk)[5:]
    h = chunk_hashes(b, chunk)
    assert h.dtype == np.uint64 and h.size == -(-n // chunk)
    assert np.array_equal(h, ref_chunk_hashes(b.tobytes(), chunk))


def test_empty_and_bad_chunk_size():
    assert chunk_hashes(b"", 8).shape == (0,) and chunk_hashes(np.zeros(0, np.float32), 8).dtype == np.uint64
    assert int(chunk_hash(b"")) == ref_chunk_hash(b"")
    with pytest.raises(ValueError):
        chunk_hashes(b"abc", 0)


def test_digests_unchanged():
    """Pinned values of the previous (numpy) implementation: published digests must not change."""
    data = (np.arange(1000, dtype=np.uint64) * 2654435761 % 251).astype(np.uint8)
    singles = [0xE220A8397B1DCDAF, 0x978F58F5A2DE735C, 0x57F9379C90870A14, 0xF2E10499307FEF87]
    singles += [0x611077770B6B6DD8, 0xD96D904B0B34AA5F, 0x549F1872ED32149C]
    assert [int(chunk_hash(data[:n])) for n in (0, 1, 7, 8, 9, 17, 1000)] == singles
    assert chunk_hashes(data, 300).tolist() == [
        0x784CA352F263FBE,
        0xA627AAC29AC7FB33,
        0x38AADA3C2775E920,
        0x309E3FA41E8514E8,
    ]
    assert chunk_hashes(data, 13)[-2:].tolist() == [0xF0981E562257BC26, 0x63B62359B9538756]


def test_buffer_kinds_read_in_place():
    x = np.random.default_rng(1).standard_normal((37, 11)).astype(np.float32)
    want = ref_chunk_hashes(x.tobytes(), 24)
    ro = x.copy()
    ro.flags.writeable = False
    for obj in (x, ro, x.tobytes(), bytearray(x.tobytes()), memoryview(x), x.view(np.int16)):
        assert np.array_equal(chunk_hashes(obj, 24), want), type(obj)
        assert int(chunk_hash(obj)) == ref_chunk_hash(x.tobytes())
    for obj in (x, memoryview(x), x.tobytes()):
        assert np.shares_memory(
            checksum._as_bytes(obj), np.frombuffer(obj, np.uint8) if not isinstance(obj, np.ndarray) else obj
        )
    # non-contiguous arrays hash their C-order bytes (a copy)
    assert np.array_equal(chunk_hashes(x.T, 24), ref_chunk_hashes(np.ascontiguousarray(x.T).tobytes(), 24))
    assert np.array_equal(chunk_hashes(x[::2], 24), ref_chunk_hashes(x[::2].tobytes(), 24))


def test_single_bit_flip_changes_only_its_chunk():
    b = np.zeros(4096, dtype=np.uint8)
    h0 = chunk_hashes(b, 1024)
    b[2048 + 5] ^= 1
    assert (chunk_hashes(b, 1024) != h0).tolist() == [False, False, True, False]


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 3000), chunk=st.integers(1, 1100), skew=st.integers(0, 7), seed=st.integers(0, 2**31))
def test_random_buffers_match_reference(n, chunk, skew, seed):
    b = rand_bytes(n + skew, seed)[skew:]
    assert np.array_equal(chunk_hashes(b, chunk), ref_chunk_hashes(b.tobytes(), chunk))


def test_splitmix64_vectorised_unchanged():
    z = np.arange(12, dtype=np.uint64).reshape(3, 4) * np.uint64(0x0123456789ABCDEF)
    out = splitmix64(z)
    assert out.dtype == np.uint64 and out.shape == (3, 4)
    assert out.ravel().tolist() == [ref_splitmix64(int(v)) for v in z.ravel()]
    assert int(splitmix64(np.uint64(0))) == 0xE220A8397B1DCDAF


def test_kernel_releases_gil_and_threads_agree():
    chunk_hash(b"x")  # compile (or load from cache) once
    assert checksum._kernel.targetoptions.get("nogil") is True
    b = rand_bytes(1 << 20, seed=9)
    want = chunk_hashes(b, 4096)
    got: list[np.ndarray] = []
    threads = [threading.Thread(target=lambda: got.append(chunk_hashes(b, 4096))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 3 and all(np.array_equal(g, want) for g in got)


def test_import_does_not_compile():
    """Loading the module imports neither numba nor compiles: that waits for the first hash."""
    path = Path(checksum.__file__)
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('ck', {str(path)!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "assert m._kernel is None and 'numba' not in sys.modules and not m._CACHEABLE\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_no_writable_cache_dir_compiles_uncached(monkeypatch):
    """Read-only tree and home: numba refuses cache=True, so the hash compiles per process instead."""
    from numba.core import caching

    def read_only(self):
        raise PermissionError(13, "Read-only file system", self.get_cache_path())

    monkeypatch.setattr(caching._CacheLocator, "ensure_cache_path", read_only)
    monkeypatch.setattr(checksum, "_kernel", None)
    b = rand_bytes(1001, seed=4)
    assert np.array_equal(chunk_hashes(b, 64), ref_chunk_hashes(b.tobytes(), 64))
    assert isinstance(checksum._kernel._cache, caching.NullCache)


def test_unloadable_cache_entry_falls_back(monkeypatch):
    good = checksum._get_kernel()

    def broken(*args):
        raise ImportError("cached kernel refers to a module that is gone")

    monkeypatch.setattr(checksum, "_kernel", broken)
    monkeypatch.setattr(checksum, "_build_kernel", lambda cache: good if not cache else broken)
    b = rand_bytes(77, seed=2)
    assert np.array_equal(chunk_hashes(b, 10), ref_chunk_hashes(b.tobytes(), 10))
    assert checksum._kernel is good


@pytest.mark.parametrize("threads", [2, 3, 5])
@pytest.mark.parametrize("nbytes,chunk", [(10 * 4096 + 13, 4096), (3 * 1000, 1000), (999, 1000), (64 << 10, 7)])
def test_threaded_hashing_gives_the_serial_digests(threads, nbytes, chunk):
    b = np.random.default_rng(nbytes + threads).integers(0, 256, nbytes, dtype=np.uint8)
    assert np.array_equal(chunk_hashes(b, chunk, threads=threads), chunk_hashes(b, chunk, threads=1))
