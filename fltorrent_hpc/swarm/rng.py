"""Counter-based randomness: a random value is a pure hash of (seed, stage, pass, peer, slot).

Every decision of the swarm core draws from here instead of a stateful generator.  A decision of peer v
then depends only on v's own keys, so a real rank that computes only its own row (the decentralised
BitTorrent phase) draws exactly the numbers the simulator drew for that row.
"""

from __future__ import annotations

import numpy as np

SEED0 = np.uint64(0x243F6A8885A308D3)
GOLDEN = np.uint64(0x9E3779B97F4A7C15)
MIX1 = np.uint64(0xBF58476D1CE4E5B9)
MIX2 = np.uint64(0x94D049BB133111EB)

# stream tags keep the uses of one seed apart
OVERLAY, LAGS, SPRAY, RELEASE, WARMUP, BT, RATES, LEAVE, PIPE = range(1, 10)


def mix(z):
    """The splitmix64 finaliser: the schedule's one mixer, independent of any chunk digest, so a change of
    digest never changes a schedule.  Written once: numpy runs it on uint64 arrays (splitmix64 below), and
    bt_kernel compiles this very function with numba for the compiled passes."""
    z = z + GOLDEN
    z = (z ^ (z >> np.uint64(30))) * MIX1
    z = (z ^ (z >> np.uint64(27))) * MIX2
    return z ^ (z >> np.uint64(31))


def splitmix64(z: np.ndarray) -> np.ndarray:
    """`mix` on a uint64 array or scalar (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        return mix(z)


def round_seed(seed: int, seq: int) -> int:
    """The seed of round `seq` of a group whose configured seed is `seed` (one rule for every caller)."""
    return (int(seed) * 1_000_003 + int(seq)) & 0x7FFFFFFF


def hash_keys(*keys: int | np.ndarray) -> np.ndarray:
    """uint64 hash of broadcast integer keys (non-negative)."""
    h = np.asarray(SEED0, dtype=np.uint64)
    for k in keys:
        k = np.asarray(k)
        if k.dtype != np.uint64:
            k = k.astype(np.int64).astype(np.uint64)
        h = splitmix64(h ^ k)
    return h


def uniform(*keys: int | np.ndarray) -> np.ndarray:
    """Uniform float64 in [0, 1) for each broadcast key tuple."""
    return (hash_keys(*keys) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def below(bound: int | np.ndarray, *keys: int | np.ndarray) -> np.ndarray:
    """Integer uniform in [0, bound) (bound >= 1) for each broadcast key tuple."""
    b = np.asarray(bound, dtype=np.uint64)
    return (hash_keys(*keys) % np.maximum(b, np.uint64(1))).astype(np.int64)


def generator(*keys: int) -> np.random.Generator:
    """A numpy Generator for one-off set-up draws (overlay, link rates), keyed like the rest."""
    return np.random.default_rng(int(hash_keys(*keys)))
