"""Chunk digests (fltorrent_hpc/chunks/digest.py): keyed BLAKE3, 16 bytes a chunk, against the `blake3`
package itself on chunks of odd sizes and alignments, bound to round and owner."""

from __future__ import annotations

import threading

import blake3
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fltorrent_hpc.chunks.digest import (
    DIGEST_BYTES,
    KEY_CONTEXT,
    chunk_digests,
    fingerprint,
    key_words,
    round_key,
)

KEY = round_key(7, 3, 1)


def ref(b: bytes, chunk: int, key: bytes) -> np.ndarray:
    """The documented digest: BLAKE3 keyed by `key`, first 16 bytes, per chunk (last one short)."""
    rows = [blake3.blake3(b[i : i + chunk], key=key).digest(DIGEST_BYTES) for i in range(0, len(b), chunk)]
    return np.frombuffer(b"".join(rows), dtype="<u8").reshape(-1, 2).astype(np.uint64)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 9000), chunk=st.integers(1, 3000), skew=st.integers(0, 7), seed=st.integers(0, 2**31))
def test_digests_equal_the_blake3_package_on_odd_sizes(n, chunk, skew, seed):
    b = np.random.default_rng(seed).integers(0, 256, n + skew, dtype=np.uint8)[skew:]  # misaligned too
    d = chunk_digests(b, chunk, KEY)
    assert d.dtype == np.uint64 and d.shape == (-(-n // chunk), 2)
    assert np.array_equal(d, ref(b.tobytes(), chunk, KEY).reshape(d.shape))


def test_key_is_bound_to_round_and_owner_and_derived_as_documented():
    want = blake3.blake3(np.array([7, 3, 1], "<i8").tobytes(), derive_key_context=KEY_CONTEXT).digest(32)
    assert KEY == want and len(KEY) == 32
    keys = {round_key(7, r, u) for r in range(3) for u in range(3)} | {round_key(8, 0, 0)}
    assert len(keys) == 10  # another round, owner or job salt: another key
    b = np.arange(5000, dtype=np.uint32).view(np.uint8)
    assert not np.array_equal(chunk_digests(b, 1024, round_key(7, 3, 1)), chunk_digests(b, 1024, round_key(7, 4, 1)))
    assert key_words(KEY).tolist() == np.frombuffer(KEY, "<u4").tolist()
    with pytest.raises(ValueError, match="32 bytes"):
        key_words(b"short")


def test_any_change_of_a_chunk_changes_its_digest_only():
    b = np.zeros(4096, dtype=np.uint8)
    d0 = chunk_digests(b, 1024, KEY)
    b[2048 + 5] ^= 1
    assert (chunk_digests(b, 1024, KEY) != d0).any(axis=1).tolist() == [False, False, True, False]


def test_inputs_of_every_kind_and_small_cases():
    x = np.arange(60, dtype=np.float32)
    want = ref(x.tobytes(), 24, KEY)
    for obj in (x, x.tobytes(), memoryview(x.tobytes()), x.view(np.uint8)):
        assert np.array_equal(chunk_digests(obj, 24, KEY), want), type(obj)
    assert np.array_equal(chunk_digests(x.reshape(6, 10).T, 24, KEY), ref(x.reshape(6, 10).T.tobytes(), 24, KEY))
    assert chunk_digests(b"", 8, KEY).shape == (0, 2)
    with pytest.raises(ValueError, match="positive"):
        chunk_digests(b"abc", 0, KEY)


@pytest.mark.parametrize("threads", [2, 3])
def test_threads_give_the_same_digests(threads):
    b = np.random.default_rng(2).integers(0, 256, 3 * 1024 * 1024 + 77, dtype=np.uint8)
    assert np.array_equal(chunk_digests(b, 65536, KEY, threads=threads), chunk_digests(b, 65536, KEY, threads=1))


def test_concurrent_callers_get_their_own_results():
    b = np.random.default_rng(3).integers(0, 256, 1 << 20, dtype=np.uint8)
    want = chunk_digests(b, 4096, KEY)
    got: list[np.ndarray] = []
    ts = [threading.Thread(target=lambda: got.append(chunk_digests(b, 4096, KEY))) for _ in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert len(got) == 3 and all(np.array_equal(g, want) for g in got)


def test_fingerprint_is_unkeyed_blake3_of_the_bytes():
    a = np.arange(40, dtype=np.int64)
    want = int.from_bytes(blake3.blake3(a.tobytes()).digest(8), "little") & 0x7FFFFFFFFFFFFFFF
    assert fingerprint(a.view(np.uint8)) == want and fingerprint(a[:-1].view(np.uint8)) != want
