"""Layout table, its int64 wire form, and pack/unpack round trips (torch path, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fltorrent_hpc.chunks.kernels import pack_segments, unpack_segments
from fltorrent_hpc.chunks.layout import ALIGN, MAX_NDIM, Layout
from fltorrent_hpc.errors import ConfigError, ProtocolError, ShapeMismatchError

DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.bool,
    torch.complex64,
]


def random_tensor(gen: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Random bits of any dtype (NaN payloads included): round trips must be byte-exact, not value-exact."""
    n = int(np.prod(shape)) if shape else 1
    nbytes = n * dtype.itemsize
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)
    if dtype == torch.bool:
        raw = raw & 1
    return raw.view(dtype).reshape(shape)


def raw(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


shapes = st.lists(st.integers(0, 7), min_size=0, max_size=3).map(tuple)
specs = st.lists(st.tuples(shapes, st.sampled_from(DTYPES), st.booleans()), min_size=1, max_size=8)


def build(spec, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape, dtype, transposed in spec:
        if transposed and len(shape) == 2:  # a strided (non-contiguous) tensor
            out.append(random_tensor(g, shape[::-1], dtype).t())
        else:
            out.append(random_tensor(g, shape, dtype))
    return out


def test_offsets_aligned_pads_zero_and_bytes_in_place():
    ts = [torch.arange(3, dtype=torch.float32), torch.ones(5, dtype=torch.bfloat16), torch.tensor(7, dtype=torch.int64)]
    lay = Layout.from_tensors([("a", ts[0]), ("b", ts[1]), ("c", ts[2])])
    assert [e.offset for e in lay.entries] == [0, 16, 32]
    assert [(e.name, e.numel, e.dtype, e.shape) for e in lay.entries] == [
        ("a", 3, "float32", (3,)),
        ("b", 5, "bfloat16", (5,)),
        ("c", 1, "int64", ()),
    ]
    assert lay.total_bytes == 48 and lay.numel == 9
    flat = pack_segments(ts, lay)
    assert flat.dtype == torch.uint8 and flat.numel() == 48
    b = flat.numpy()
    assert np.array_equal(b[0:12].view(np.float32), [0, 1, 2])
    assert not b[12:16].any() and not b[26:32].any() and not b[40:48].any()
    assert b[32:40].view(np.int64)[0] == 7


def test_unnamed_list_names_and_canonical_validation():
    lay = Layout.from_tensors([torch.zeros(2), torch.zeros(3, 3)])
    assert [e.name for e in lay.entries] == ["0", "1"]
    named = Layout.from_tensors({"b": torch.zeros(2), "a": torch.zeros(3, 3)})
    assert [e.name for e in named.entries] == ["b", "a"] and named.total_bytes == lay.total_bytes
    with pytest.raises(ConfigError, match="canonical"):
        Layout(lay.entries, lay.total_bytes + ALIGN)
    with pytest.raises(ConfigError, match="duplicate"):
        Layout.from_specs([("x", "float32", (1,)), ("x", "float32", (1,))])
    with pytest.raises(ConfigError, match="not supported"):
        Layout.from_specs([("x", "float128", (1,))])
    with pytest.raises(ConfigError, match="dims"):
        Layout.from_specs([("x", "float32", (1,) * (MAX_NDIM + 1))])


@settings(max_examples=60, deadline=None)
@given(
    spec=st.lists(
        st.tuples(st.text(max_size=12), st.sampled_from([str(d).removeprefix("torch.") for d in DTYPES]), shapes),
        max_size=6,
        unique_by=lambda x: x[0],
    ),
    version=st.integers(0, 2**40),
)
def test_wire_round_trip(spec, version):
    lay = Layout.from_specs(spec, version=version)
    arr = lay.to_array()
    assert arr.dtype == np.int64 and arr.ndim == 1
    back = Layout.from_array(arr)
    assert back == lay and back.entries == lay.entries and back.version == version
    assert back.fingerprint == lay.fingerprint and hash(back) == hash(lay)


def test_wire_rejects_malformed():
    lay = Layout.from_specs([("w", "float32", (3, 4)), ("b", "bfloat16", (4,))], version=3)
    good = lay.to_array()
    with pytest.raises(ProtocolError, match="magic"):
        Layout.from_array(np.concatenate([[0], good[1:]]))
    with pytest.raises(ProtocolError):
        Layout.from_array(good[:-1])
    with pytest.raises(ProtocolError):
        Layout.from_array(good.astype(np.int32))
    bad = good.copy()
    bad[8] += 16  # first entry's offset no longer canonical
    with pytest.raises(ProtocolError, match="canonical"):
        Layout.from_array(bad)
    bad = good.copy()
    bad[8 + 2] = 999  # unknown dtype code
    with pytest.raises(ProtocolError, match="dtype code"):
        Layout.from_array(bad)
    other = Layout.from_specs([("w", "float32", (3, 4)), ("b", "bfloat16", (4,))], version=4)
    assert other != lay and other.fingerprint != lay.fingerprint


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=specs, seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trip_bit_exact(spec, seed):
    ts = build(spec, seed)
    lay = Layout.from_tensors(ts)
    flat = pack_segments(ts, lay)
    assert flat.numel() == lay.total_bytes
    for e, t in zip(lay.entries, ts):
        assert torch.equal(flat[e.offset : e.end], t.contiguous().reshape(-1).view(torch.uint8))
    mask = torch.ones(lay.total_bytes, dtype=torch.bool)
    for e in lay.entries:
        mask[e.offset : e.end] = False
    assert not flat[mask].any(), "pad bytes must be zero (the chunk hashes cover them)"
    outs = build(spec, seed + 1)
    unpack_segments(flat, lay, outs)
    for a, b in zip(ts, outs):
        assert torch.equal(raw(a), raw(b))


@settings(max_examples=60, deadline=None)
@given(spec=specs, seed=st.integers(0, 2**31 - 1), cut=st.tuples(st.floats(0, 1), st.floats(0, 1)))
def test_byte_ranges_match_whole_pack(spec, seed, cut):
    ts = build(spec, seed)
    lay = Layout.from_tensors(ts)
    whole = pack_segments(ts, lay)
    b0, b1 = sorted(int(c * lay.total_bytes) for c in cut)
    part = pack_segments(ts, lay, byte_start=b0, byte_end=b1)
    assert torch.equal(part, whole[b0:b1])
    # unpacking only [b0, b1) of another buffer changes exactly those bytes
    dst = build(spec, seed + 7)
    before = pack_segments(dst, lay)
    unpack_segments(whole[b0:b1].clone(), lay, dst, byte_start=b0)
    after = pack_segments(dst, lay)
    assert torch.equal(after[b0:b1], whole[b0:b1])
    assert torch.equal(after[:b0], before[:b0]) and torch.equal(after[b1:], before[b1:])


def test_pack_into_given_buffer_and_errors():
    ts = [torch.randn(5), torch.randn(2, 2)]
    lay = Layout.from_tensors(ts)
    out = torch.full((lay.total_bytes + 5,), 0xAB, dtype=torch.uint8)
    got = pack_segments(ts, lay, out)
    assert got.data_ptr() == out.data_ptr() and got.numel() == lay.total_bytes
    assert torch.all(out[lay.total_bytes :] == 0xAB)
    with pytest.raises(ShapeMismatchError, match="need >="):
        pack_segments(ts, lay, torch.empty(lay.total_bytes - 1, dtype=torch.uint8))
    with pytest.raises(ShapeMismatchError, match="'1'"):
        pack_segments([ts[0], torch.randn(4)], lay)
    with pytest.raises(ShapeMismatchError, match="bfloat16"):
        pack_segments([ts[0], ts[1].bfloat16()], lay)
    with pytest.raises(ShapeMismatchError, match="entries"):
        pack_segments(ts[:1], lay)
    with pytest.raises(ShapeMismatchError, match="uint8"):
        unpack_segments(torch.zeros(lay.total_bytes, dtype=torch.int8), lay, ts)


def test_parameters_requiring_grad_are_written_in_place():
    model = torch.nn.Linear(3, 2)
    named = list(model.named_parameters())
    lay = Layout.from_tensors(named)
    flat = pack_segments([p for _, p in named], lay)
    ptrs = [p.data_ptr() for _, p in named]
    with torch.no_grad():
        for _, p in named:
            p.zero_()
    unpack_segments(flat, lay, [p for _, p in named])
    assert [p.data_ptr() for _, p in named] == ptrs
    assert torch.equal(pack_segments([p for _, p in named], lay), flat)
