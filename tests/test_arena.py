"""Device memory accounting of a round: fp32 accumulator + bounded arena, LRU spill to host."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fltorrent_hpc.chunks.arena import (
    ARENA_ENV,
    DEFAULT_ARENA_BYTES,
    ChunkArena,
    arena_bytes_from_env,
    device_bytes_formula,
)
from fltorrent_hpc.chunks.layout import Layout
from fltorrent_hpc.errors import ConfigError, ShapeMismatchError


def storage_bytes(*ts: torch.Tensor) -> int:
    return sum(t.untyped_storage().nbytes() for t in ts)


def test_arena_size_from_argument_env_or_default():
    assert arena_bytes_from_env(None, {}) == DEFAULT_ARENA_BYTES
    assert arena_bytes_from_env(None, {ARENA_ENV: "3MiB"}) == 3 * 2**20
    assert arena_bytes_from_env("1KiB", {ARENA_ENV: "3MiB"}) == 1024
    with pytest.raises(ConfigError, match=ARENA_ENV):
        arena_bytes_from_env(None, {ARENA_ENV: "lots"})


def test_device_bytes_is_the_formula_and_the_real_allocation():
    lay = Layout.from_tensors([torch.zeros(1000), torch.zeros(33, dtype=torch.bfloat16)])
    ar = ChunkArena.for_layout(lay, chunk_bytes=256, arena_bytes=1000, environ={})
    assert ar.slots == 3  # whole slots only: 1000 // 256
    assert ar.device_bytes == device_bytes_formula(lay.numel, 256, 1000) == 4 * 1033 + 3 * 256
    assert ar.device_bytes == storage_bytes(ar.acc, ar.slab)
    assert ar.acc.dtype == torch.float32 and ar.acc.numel() == lay.numel and not ar.acc.any()
    with pytest.raises(ConfigError, match="holds no"):
        ChunkArena(10, 4096, arena_bytes=4095, environ={})


def test_spill_fill_keep_bytes_and_accounting():
    ar = ChunkArena(numel=10, chunk_bytes=64, arena_bytes=128, environ={})
    data = {k: torch.randint(0, 256, (64 if k != 4 else 17,), dtype=torch.uint8) for k in range(5)}
    for k in range(3):
        ar.put(k, data[k])
    st_ = ar.stats()
    assert (st_.resident, st_.spilled, st_.spills) == (2, 1, 1)  # chunk 0 (least recently used) went to host
    assert not ar.on_device(0) and ar.host_bytes == 64
    assert torch.equal(ar.get(0), data[0])
    ar.get(1)  # touch 1: now 2 is the least recently used
    ar.pin(1)
    ar.put(4, data[4])
    assert not ar.on_device(2) and ar.on_device(1) and ar.host_bytes == 128
    view = ar.fetch(0)  # back to the device; 4 is now the only unpinned resident, so it spills
    assert torch.equal(view, data[0]) and ar.on_device(0) and not ar.on_device(4)
    assert ar.host_bytes == 64 + 17 and ar.stats().fills == 1
    for k in (0, 1, 2, 4):
        assert torch.equal(ar.get(k), data[k])
    assert ar.device_bytes == device_bytes_formula(10, 64, 128) == storage_bytes(ar.acc, ar.slab)
    ar.pin(0)
    with pytest.raises(ConfigError, match="pinned"):
        ar.alloc(9)
    ar.release(4)
    assert ar.host_bytes == 64 and 4 not in ar
    with pytest.raises(ShapeMismatchError):
        ar.alloc(10, 65)
    ar.reset()
    # peak: during fetch(0), chunk 4 spilled while chunk 0's host copy still existed (128 + 17)
    assert len(ar) == 0 and ar.host_bytes == 0 and ar.stats().peak_host_bytes == 145


ops = st.lists(
    st.tuples(st.sampled_from(["put", "get", "fetch", "release", "pin", "unpin"]), st.integers(0, 9)),
    max_size=60,
)


@settings(max_examples=60, deadline=None)
@given(ops=ops, slots=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_accounting_invariants_under_random_use(ops, slots, seed):
    C = 32
    ar = ChunkArena(numel=7, chunk_bytes=C, arena_bytes=slots * C + 5, environ={})
    g = torch.Generator().manual_seed(seed)
    truth: dict[int, torch.Tensor] = {}
    pinned: set[int] = set()
    for op, k in ops:
        try:
            if op == "put" and k not in truth:
                d = torch.randint(0, 256, (int(torch.randint(0, C + 1, (1,), generator=g)),), dtype=torch.uint8)
                ar.put(k, d)
                truth[k] = d
            elif op == "get" and k in truth:
                assert torch.equal(ar.get(k), truth[k])
            elif op == "fetch" and k in truth:
                assert torch.equal(ar.fetch(k), truth[k]) and ar.on_device(k)
            elif op == "release" and k in truth:
                ar.release(k)
                del truth[k]
                pinned.discard(k)
            elif op == "pin" and k in truth and ar.on_device(k):
                ar.pin(k)
                pinned.add(k)
            elif op == "unpin":
                ar.unpin(k)
                pinned.discard(k)
        except ConfigError as e:  # only legal refusal: every slot pinned
            assert "pinned" in str(e) and len(pinned) >= slots
        s = ar.stats()
        assert s.device_bytes == device_bytes_formula(7, C, slots * C + 5) == storage_bytes(ar.acc, ar.slab)
        assert s.resident <= slots and s.resident + s.spilled == len(truth)
        assert s.host_bytes == sum(truth[k].numel() for k in truth if not ar.on_device(k))
        assert all(ar.on_device(k) for k in pinned)
    for k, d in truth.items():
        assert torch.equal(ar.get(k), d)


def _cuda() -> bool:
    return torch.cuda.is_available()


@pytest.mark.cuda
@pytest.mark.skipif(not _cuda(), reason="needs a CUDA device")
def test_cuda_allocation_matches_formula_and_spills_to_pinned_host():
    dev = torch.device("cuda")
    numel, C, A = 3_000_001, 1 << 20, (5 << 20) + 123
    src = [torch.randint(0, 256, (C,), dtype=torch.uint8, device=dev) for _ in range(8)]
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(dev)
    ar = ChunkArena(numel, C, dev, A, environ={})
    grown = torch.cuda.memory_allocated(dev) - before
    # the caching allocator rounds each block up to 512 B
    assert device_bytes_formula(numel, C, A) <= grown <= device_bytes_formula(numel, C, A) + 2 * 512
    for k, d in enumerate(src):
        ar.put(k, d)
    assert ar.stats().spilled == 3 and ar.get(0).is_pinned() and ar.get(0).device.type == "cpu"
    assert all(torch.equal(ar.fetch(k), d) for k, d in enumerate(src))
    assert torch.cuda.memory_allocated(dev) - before == grown
