"""Per-chunk 64-bit hash published in descriptors and checked on receipt.

It guards against corruption in transit and buggy peers, not a cryptographic adversary.  It is a sum of
independently mixed 8-byte words, so a GPU computes it as a parallel reduction and gets the same bits:

    words  = chunk zero-padded to a multiple of 8 bytes, read as little-endian uint64 w_0..w_{L-1}
    h      = sum_i splitmix64(w_i XOR (i * GOLDEN))            (mod 2**64)
    digest = splitmix64(h XOR (nbytes * LEN_SALT))

kernels/checksum.cu and the torch fallback in kernels.py compute exactly this.
"""

from __future__ import annotations

import numpy as np

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
MIX1 = np.uint64(0xBF58476D1CE4E5B9)
MIX2 = np.uint64(0x94D049BB133111EB)
LEN_SALT = np.uint64(0xD6E8FEB86659FD93)


def splitmix64(z: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on a uint64 array (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = z + GOLDEN
        z = (z ^ (z >> np.uint64(30))) * MIX1
        z = (z ^ (z >> np.uint64(27))) * MIX2
        return z ^ (z >> np.uint64(31))


def chunk_hashes(buf: np.ndarray | bytes | memoryview, chunk_bytes: int) -> np.ndarray:
    """Hashes of every chunk of a flat byte buffer (the last chunk may be short): uint64[ceil(n/C)]."""
    b = np.frombuffer(buf, dtype=np.uint8) if not isinstance(buf, np.ndarray) else buf.reshape(-1).view(np.uint8)
    n = b.size
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    if chunk_bytes <= 0 or chunk_bytes % 8:
        # any chunk size works; a multiple of 8 keeps the padded layout a plain reshape
        return np.array([chunk_hash(b[i : i + chunk_bytes]) for i in range(0, n, chunk_bytes)], dtype=np.uint64)
    nfull = n // chunk_bytes
    out = np.empty(-(-n // chunk_bytes), dtype=np.uint64)
    if nfull:
        words = b[: nfull * chunk_bytes].view("<u8").reshape(nfull, chunk_bytes // 8)
        acc = np.array([_mixed_word_sum(row) for row in words], dtype=np.uint64)
        with np.errstate(over="ignore"):
            out[:nfull] = splitmix64(acc ^ (np.uint64(chunk_bytes) * LEN_SALT))
    if nfull < out.size:
        out[-1] = chunk_hash(b[nfull * chunk_bytes :])
    return out


_BLOCK_WORDS = 1 << 14  # 128 KiB blocks keep the in-place passes in L2


def _mixed_word_sum(words: np.ndarray) -> np.uint64:
    """sum_i splitmix64(w_i ^ i*GOLDEN) over one chunk, blockwise and in place (7x faster than naive numpy)."""
    z = np.empty(min(_BLOCK_WORDS, words.size), dtype=np.uint64)
    t = np.empty_like(z)
    h = np.uint64(0)
    s30, s27, s31 = np.uint64(30), np.uint64(27), np.uint64(31)
    with np.errstate(over="ignore"):
        for o in range(0, words.size, _BLOCK_WORDS):
            m = min(_BLOCK_WORDS, words.size - o)
            zz, tt = z[:m], t[:m]
            np.multiply(np.arange(o, o + m, dtype=np.uint64), GOLDEN, out=zz)
            np.bitwise_xor(zz, words[o : o + m], out=zz)
            np.add(zz, GOLDEN, out=zz)
            np.right_shift(zz, s30, out=tt)
            np.bitwise_xor(zz, tt, out=zz)
            np.multiply(zz, MIX1, out=zz)
            np.right_shift(zz, s27, out=tt)
            np.bitwise_xor(zz, tt, out=zz)
            np.multiply(zz, MIX2, out=zz)
            np.right_shift(zz, s31, out=tt)
            np.bitwise_xor(zz, tt, out=zz)
            h = h + zz.sum(dtype=np.uint64)
    return h


def chunk_hash(chunk: np.ndarray | bytes | memoryview) -> np.uint64:
    """Hash of one chunk of any length."""
    b = np.frombuffer(chunk, dtype=np.uint8) if not isinstance(chunk, np.ndarray) else chunk.reshape(-1).view(np.uint8)
    n = b.size
    padded = np.zeros(-(-n // 8) * 8, dtype=np.uint8)
    padded[:n] = b
    words = padded.view("<u8")
    with np.errstate(over="ignore"):
        h = splitmix64(words ^ (np.arange(words.size, dtype=np.uint64) * GOLDEN)).sum(dtype=np.uint64)
        return splitmix64(np.array([h ^ (np.uint64(n) * LEN_SALT)], dtype=np.uint64))[0]
