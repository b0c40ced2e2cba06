"""Chunk kernels: torch fallback against references, and the CUDA kernels without a GPU.

Three layers of evidence:
* the torch fallback (the CPU path) against numpy references: chunk digests against the `blake3` package, FedAvg against
  float64 within fp32 rounding and against numpy float32 bit for bit;
* kernels/*.cu compiled by g++ in host emulation (threads run one after another), driven by the very
  planners kernels.py uses for CUDA, compared bit for bit with the fallback; and nvcc compiling them;
* on a CUDA machine with CuPy (marked `cuda`): CuPy kernels against the fallback on the same GPU tensors.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_emu import EmuRunner, build_emu

from fltorrent_hpc.chunks import kernels as K
from fltorrent_hpc.chunks.digest import chunk_digests, round_key
from fltorrent_hpc.chunks.layout import Layout
from fltorrent_hpc.errors import ConfigError, ShapeMismatchError

FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(scope="module")
def emu(tmp_path_factory) -> EmuRunner:
    runner = build_emu(tmp_path_factory.mktemp("emu"))
    if runner is None:
        pytest.skip("no C++ compiler: the host emulation of kernels/*.cu needs g++")
    return runner


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------
def mixed_update(gen: torch.Generator, sizes: list[int], dtypes: list[torch.dtype], scale: float = 1.0):
    return [(torch.randn(n, generator=gen) * scale).to(dt) for n, dt in zip(sizes, dtypes)]


def flat64(ts) -> np.ndarray:
    return np.concatenate([t.double().reshape(-1).numpy() for t in ts]) if ts else np.zeros(0)


def eq_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


update_specs = st.lists(st.tuples(st.integers(0, 300), st.sampled_from(FLOAT_DTYPES)), min_size=1, max_size=6)


# ---------------------------------------------------------------------------------------------------
# chunk digests (keyed BLAKE3)
# ---------------------------------------------------------------------------------------------------
KEY = round_key(11, 2, 3)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(0, 5000), chunk=st.integers(1, 2100), skew=st.integers(0, 7), seed=st.integers(0, 2**31))
def test_digest_fallback_matches_host(n, chunk, skew, seed):
    g = torch.Generator().manual_seed(seed)
    buf = torch.randint(0, 256, (n + skew,), dtype=torch.uint8, generator=g)[skew:]  # misaligned starts too
    d = K.chunk_digests_t(buf, chunk, KEY)
    assert d.dtype == torch.int64 and tuple(d.shape) == (-(-n // chunk), 2)
    assert np.array_equal(K.digests_to_numpy(d), chunk_digests(buf.numpy(), chunk, KEY))


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 9000), chunk=st.integers(1, 5000), skew=st.integers(0, 7), seed=st.integers(0, 2**31))
def test_digest_kernel_emulated_matches_blake3(emu, n, chunk, skew, seed):
    """kernels/blake3.cu (leaves, then one launch per tree level) gives the blake3 package's bits."""
    g = torch.Generator().manual_seed(seed)
    buf = torch.randint(0, 256, (n + skew,), dtype=torch.uint8, generator=g)[skew:]
    d = K.chunk_digests_t(buf, chunk, KEY, runner=emu)
    assert np.array_equal(K.digests_to_numpy(d), chunk_digests(buf.numpy(), chunk, KEY))


def test_digest_kernel_emulated_deep_trees_and_ragged_last_chunk(emu):
    g = torch.Generator().manual_seed(5)
    buf = torch.randint(0, 256, (3 * 33 * 1024 + 999,), dtype=torch.uint8, generator=g)
    for chunk in (33 * 1024, 32 * 1024, 1024, 1025, 17 * 1024 + 3):  # 33 leaves (odd carries), powers of two
        d = K.chunk_digests_t(buf, chunk, KEY, runner=emu)
        assert np.array_equal(K.digests_to_numpy(d), chunk_digests(buf.numpy(), chunk, KEY)), chunk
    assert "flt_blake3_parents" in emu.launched


# ---------------------------------------------------------------------------------------------------
# FedAvg: accumulate / finalize (torch fallback)
# ---------------------------------------------------------------------------------------------------
def test_accumulate_matches_float64_within_fp32_rounding():
    g = torch.Generator().manual_seed(3)
    sizes, dtypes = [1, 17, 300, 5, 4097, 3], [torch.float32, torch.bfloat16, torch.float16, torch.float32] * 2
    dtypes = dtypes[: len(sizes)]
    peers = [mixed_update(g, sizes, dtypes, scale=10.0 ** (p - 2)) for p in range(4)]
    lay = Layout.from_tensors(peers[0])
    weights = [3.0, 1.0, 0.5, 7.25]
    C = 4096
    acc = torch.zeros(lay.numel)
    ref = np.zeros(lay.numel)
    mag = np.zeros(lay.numel)
    for p, w in zip(peers, weights):
        K.accumulate_(acc, range(lay.n_chunks(C)), K.pack_segments(p, lay), w, lay, C)
        ref += w * flat64(p)
        mag += np.abs(w * flat64(p))
    eps = np.finfo(np.float32).eps
    # each peer adds two roundings (product, sum), each bounded by eps/2 of the running magnitude
    bound = len(peers) * eps * mag + np.finfo(np.float32).tiny
    err = np.abs(acc.double().numpy() - ref)
    assert np.all(err <= bound), float(np.max(err / bound))
    assert acc.abs().sum() > 0


@settings(max_examples=40, deadline=None)
@given(spec=update_specs, seed=st.integers(0, 2**31), w=st.floats(1e-3, 1e3))
def test_accumulate_is_ieee_fp32_mul_then_add(spec, seed, w):
    """acc = fl(acc + fl(w*x)) exactly (no FMA), the contract the CUDA kernel implements with _rn intrinsics."""
    g = torch.Generator().manual_seed(seed)
    sizes, dtypes = [s for s, _ in spec], [d for _, d in spec]
    x = mixed_update(g, sizes, dtypes)
    lay = Layout.from_tensors(x)
    acc0 = torch.randn(lay.numel, generator=g)
    acc = acc0.clone()
    K.accumulate_(acc, range(lay.n_chunks(64)), K.pack_segments(x, lay), w, lay, 64)
    xs = np.concatenate([t.float().reshape(-1).numpy() for t in x]).astype(np.float32)
    expect = acc0.numpy() + np.float32(w) * xs  # numpy float32: two correctly rounded ops
    assert np.array_equal(acc.numpy().view(np.uint32), expect.astype(np.float32).view(np.uint32))


CONTAINERS = ["run", "rows", "list"]


def chunk_batch(flat: torch.Tensor, ids: list[int], C: int, kind: str):
    """The same chunks in each of the three containers accumulate_ accepts."""
    parts = [flat[c * C : (c + 1) * C] for c in ids]
    if kind == "list":
        return [p.clone() for p in parts]
    if kind == "rows":
        rows = torch.zeros((len(ids), C + 16), dtype=torch.uint8)  # longer rows than needed are fine
        for b, p in enumerate(parts):
            rows[b, : p.numel()] = p
        return rows
    if ids and ids[-1] == -(-flat.numel() // C) - 1:
        return torch.cat(parts)
    return torch.cat([torch.nn.functional.pad(p, (0, C - p.numel())) for p in parts])


@settings(max_examples=40, deadline=None)
@given(
    spec=update_specs,
    n_peers=st.integers(1, 4),
    chunk16=st.integers(1, 40),
    seed=st.integers(0, 2**31),
    data=st.data(),
)
def test_fedavg_bit_identical_whole_or_chunked_any_order(spec, n_peers, chunk16, seed, data):
    g = torch.Generator().manual_seed(seed)
    sizes, dtypes = [s for s, _ in spec], [d for _, d in spec]
    peers = [mixed_update(g, sizes, dtypes) for _ in range(n_peers)]
    weights = [float(w) for w in torch.rand(n_peers, generator=g) * 10 + 0.1]
    lay = Layout.from_tensors(peers[0])
    C = 16 * chunk16
    n = lay.n_chunks(C)
    flats = [K.pack_segments(p, lay) for p in peers]

    whole = torch.zeros(lay.numel)
    for f, w in zip(flats, weights):  # rank order, each update whole
        K.accumulate_(whole, range(n), f, w, lay, C)

    # chunks arrive in a random order, in random batches and containers; per chunk, sources in rank order
    chunked = torch.zeros(lay.numel)
    order = data.draw(st.permutations(list(range(n))))
    i = 0
    while i < n:
        k = data.draw(st.integers(1, max(1, n - i)))
        ids = sorted(order[i : i + k]) if data.draw(st.booleans()) else order[i : i + k]
        for f, w in zip(flats, weights):
            kind = data.draw(st.sampled_from(CONTAINERS))
            if kind == "run":
                ids_run = sorted(ids)
                K.accumulate_(chunked, ids_run, chunk_batch(f, ids_run, C, "run"), w, lay, C)
            else:
                K.accumulate_(chunked, ids, chunk_batch(f, ids, C, kind), w, lay, C)
        i += k
    assert eq_bits(whole, chunked)

    total = float(sum(np.float32(w) for w in weights))
    outs_a = mixed_update(g, sizes, dtypes)
    outs_b = mixed_update(g, sizes, dtypes)
    K.finalize_fedavg_(whole, total, outs_a, lay)
    K.finalize_fedavg_(chunked, total, outs_b, lay)
    assert all(eq_bits(a, b) for a, b in zip(outs_a, outs_b))


def test_finalize_in_place_rounds_like_numpy():
    g = torch.Generator().manual_seed(4)
    ts = [torch.zeros(1000), torch.zeros(1000, dtype=torch.float16), torch.zeros(10, 100, dtype=torch.bfloat16)]
    lay = Layout.from_tensors(ts)
    acc = torch.randn(lay.numel, generator=g) * 1e3
    acc[1000:1010] = torch.tensor([7e4, -7e4, 1e-6, 3e-8, 65519.0, 65520.0, 0.0, -0.0, 1e-9, 6.1e-5]) * 3
    W = 3.0
    ptrs = [t.data_ptr() for t in ts]
    expect = acc.numpy() / np.float32(W)
    K.finalize_fedavg_(acc, W, ts, lay)
    assert [t.data_ptr() for t in ts] == ptrs
    assert np.array_equal(acc.numpy().view(np.uint32), expect.view(np.uint32)), "acc keeps the fp32 average"
    assert np.array_equal(ts[0].numpy(), expect[:1000])
    with np.errstate(over="ignore"):  # values past 65504 become inf, as they must
        f16 = expect[1000:2000].astype(np.float16)
    assert np.array_equal(ts[1].numpy().view(np.uint16), f16.view(np.uint16))
    bf = torch.from_numpy(expect[2000:].copy()).to(torch.bfloat16).view(10, 100)
    assert eq_bits(ts[2], bf)


def test_finalize_strided_parameters():
    base = torch.zeros(6, 4)
    ts = [base.t(), torch.zeros(3)]  # a non-contiguous parameter (a transposed view)
    lay = Layout.from_tensors(ts)
    acc = torch.arange(lay.numel, dtype=torch.float32) * 2
    K.finalize_fedavg_(acc, 2.0, ts, lay)
    assert torch.equal(base.t().reshape(-1), torch.arange(24, dtype=torch.float32))
    assert torch.equal(ts[1], torch.tensor([24.0, 25.0, 26.0]))


def test_accumulate_and_finalize_errors():
    lay = Layout.from_tensors([torch.zeros(10), torch.zeros(3, dtype=torch.bfloat16)])
    acc = torch.zeros(lay.numel)
    flat = torch.zeros(lay.total_bytes, dtype=torch.uint8)
    with pytest.raises(ShapeMismatchError, match="distinct"):
        K.accumulate_(acc, [0, 0], [flat[:16], flat[:16]], 1.0, lay, 16)
    with pytest.raises(ShapeMismatchError, match=r"\[0, 4\)"):
        K.accumulate_(acc, [4], [flat[:16]], 1.0, lay, 16)
    with pytest.raises(ConfigError, match="splits elements"):
        K.accumulate_(acc, [0], [flat[:6]], 1.0, lay, 6)
    with pytest.raises(ShapeMismatchError, match="accumulator"):
        K.accumulate_(torch.zeros(lay.numel + 1), [0], flat, 1.0, lay, 64)
    with pytest.raises(ShapeMismatchError, match="too short"):
        K.accumulate_(acc, [0, 1], flat[:20], 1.0, lay, 16)
    with pytest.raises(ConfigError, match="finite"):
        K.accumulate_(acc, [0], flat, float("nan"), lay, 64)
    with pytest.raises(ConfigError, match="total weight is 0"):
        K.finalize_fedavg_(acc, 0.0, [torch.zeros(10), torch.zeros(3, dtype=torch.bfloat16)], lay)
    ints = Layout.from_tensors([torch.zeros(4), torch.zeros(2, dtype=torch.int64)])
    with pytest.raises(ConfigError, match="int64|other dtypes"):
        K.accumulate_(torch.zeros(ints.numel), [0], torch.zeros(48, dtype=torch.uint8), 1.0, ints, 64)


def test_backend_resolution(monkeypatch):
    assert K.resolve_backend(torch.device("cpu")) == "torch"
    with pytest.raises(ConfigError, match="needs CUDA"):
        K.resolve_backend(torch.device("cpu"), "cupy")
    monkeypatch.setenv("FLTORRENT_KERNELS", "opencl")
    with pytest.raises(ConfigError, match="auto, torch or cupy"):
        K.resolve_backend(torch.device("cpu"))


# ---------------------------------------------------------------------------------------------------
# CUDA kernels in host emulation, bit for bit against the fallback
# ---------------------------------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(spec=update_specs, seed=st.integers(0, 2**31), cut=st.tuples(st.floats(0, 1), st.floats(0, 1)))
def test_pack_unpack_kernel_emulated(emu, spec, seed, cut):
    g = torch.Generator().manual_seed(seed)
    sizes, dtypes = [s for s, _ in spec], [d for _, d in spec]
    ts = mixed_update(g, sizes, dtypes)
    if ts[0].numel() >= 4:  # one strided entry
        ts[0] = ts[0][: ts[0].numel() // 2 * 2].view(2, -1).t()
    lay = Layout.from_tensors(ts)
    b0, b1 = sorted(int(c * lay.total_bytes) for c in cut)
    ref = K.pack_segments(ts, lay, byte_start=b0, byte_end=b1, backend="torch")
    out = torch.full((b1 - b0 + 3,), 0xEE, dtype=torch.uint8)[3:]  # misaligned destination
    got = K.pack_segments(ts, lay, out, byte_start=b0, byte_end=b1, runner=emu)
    assert eq_bits(got, ref)
    dst_a = [torch.full_like(t, 5) for t in ts]
    dst_b = [torch.full_like(t, 5) for t in ts]
    K.unpack_segments(ref.clone(), lay, dst_a, byte_start=b0, backend="torch")
    K.unpack_segments(ref.clone(), lay, dst_b, byte_start=b0, runner=emu)
    assert all(eq_bits(a, b) for a, b in zip(dst_a, dst_b))


def test_pack_kernel_emulated_tiles_and_tails(emu, monkeypatch):
    monkeypatch.setattr(K, "PACK_TILE", 48)  # many tiles per entry, 16-byte bulk + narrow tails
    g = torch.Generator().manual_seed(5)
    ts = [
        torch.randn(101, generator=g),
        torch.randn(33, generator=g).half(),
        torch.randint(0, 9, (7,), dtype=torch.int8),
    ]
    lay = Layout.from_tensors(ts)
    assert eq_bits(K.pack_segments(ts, lay, runner=emu), K.pack_segments(ts, lay))
    assert "flt_copy_segments" in emu.launched


@settings(max_examples=25, deadline=None)
@given(spec=update_specs, seed=st.integers(0, 2**31), chunk16=st.integers(1, 100), w=st.floats(1e-3, 1e3))
def test_accumulate_kernel_emulated(emu, spec, seed, chunk16, w):
    g = torch.Generator().manual_seed(seed)
    sizes, dtypes = [s for s, _ in spec], [d for _, d in spec]
    x = mixed_update(g, sizes, dtypes, scale=100.0)
    lay = Layout.from_tensors(x)
    C = 16 * chunk16
    n = lay.n_chunks(C)
    ids = torch.randperm(n, generator=g).tolist()
    chunks = [K.pack_segments(x, lay)[c * C : (c + 1) * C].clone() for c in ids]
    acc0 = torch.randn(lay.numel, generator=g)
    a, b = acc0.clone(), acc0.clone()
    K.accumulate_(a, ids, chunks, w, lay, C, backend="torch")
    K.accumulate_(b, ids, chunks, w, lay, C, runner=emu)
    assert eq_bits(a, b)


def test_accumulate_kernel_emulated_misaligned_chunks(emu):
    g = torch.Generator().manual_seed(8)
    x = [torch.randn(100, generator=g), torch.randn(70, generator=g).half()]
    lay = Layout.from_tensors(x)
    C = 128
    flat = K.pack_segments(x, lay)
    n = lay.n_chunks(C)
    holder = torch.zeros(n * (C + 1) + 1, dtype=torch.uint8)
    chunks = []
    for c in range(n):  # every chunk starts at an odd address
        piece = flat[c * C : (c + 1) * C]
        at = 1 + c * (C + 1)
        holder[at : at + piece.numel()] = piece
        chunks.append(holder[at : at + piece.numel()])
    a, b = torch.zeros(lay.numel), torch.zeros(lay.numel)
    K.accumulate_(a, range(n), flat, 0.7, lay, C, backend="torch")
    K.accumulate_(b, range(n), chunks, 0.7, lay, C, runner=emu)
    assert eq_bits(a, b) and a.abs().sum() > 0
    items = emu.last_table  # (address, acc index, count, code): a GPU faults on misaligned typed loads
    assert np.all(items[:, 0] % np.where(items[:, 3] == 0, 4, 2) == 0)


def test_accumulate_kernel_emulated_special_values(emu, monkeypatch):
    monkeypatch.setattr(K, "ACC_TILE", 7)  # tiles that end mid-run
    sub16 = torch.tensor([6e-8, -6e-8, 3e-5, 6.1e-5, 65504.0, float("inf"), -0.0, 1.0], dtype=torch.float16)
    bf = torch.tensor([1e-40, 3e38, -3e38, float("-inf"), 1.0 + 2**-7, 0.0], dtype=torch.bfloat16)
    f32 = torch.tensor([1e-45, 3.4e38, -1.5, 0.1], dtype=torch.float32)
    x = [sub16, bf, f32, torch.randn(50).half()]
    lay = Layout.from_tensors(x)
    a = torch.zeros(lay.numel)
    b = torch.zeros(lay.numel)
    for w in (1.0, 0.3, 2.0):
        K.accumulate_(a, [0], K.pack_segments(x, lay), w, lay, lay.total_bytes, backend="torch")
        K.accumulate_(b, [0], K.pack_segments(x, lay), w, lay, lay.total_bytes, runner=emu)
    assert eq_bits(a, b)


@pytest.mark.parametrize("tile", [5, K.ACC_TILE])
def test_finalize_kernel_emulated_rounding_edges(emu, monkeypatch, tile):
    monkeypatch.setattr(K, "ACC_TILE", tile)
    g = torch.Generator().manual_seed(6)
    edges = [
        1.0 + 2**-8,  # bf16 tie: round to even (down)
        1.0 + 3 * 2**-8,  # bf16 tie: round to even (up)
        1.0 + 2**-11,  # fp16 tie
        65519.0,  # fp16: rounds to 65504
        65520.0,  # fp16: overflows to inf
        5.96e-8,  # fp16 smallest subnormal region
        2.98e-8,  # fp16: ties to zero
        1e-39,  # fp32 subnormal
        -0.0,
        float("inf"),
        -3.3e38,
        1e-5,
    ]
    for dt in FLOAT_DTYPES:
        ts = [torch.zeros(len(edges) + 537, dtype=dt), torch.zeros(3, 5, dtype=dt).t()]
        lay = Layout.from_tensors(ts)
        acc = torch.randn(lay.numel, generator=g) * 1e4
        acc[: len(edges)] = torch.tensor(edges)
        for W in (1.0, 3.0):
            a_acc, b_acc = acc.clone(), acc.clone()
            a = [torch.zeros_like(t) for t in ts]
            b_base = torch.zeros(3, 5, dtype=dt)
            b = [torch.zeros_like(ts[0]), b_base.t()]
            K.finalize_fedavg_(a_acc, W, a, lay, backend="torch")
            K.finalize_fedavg_(b_acc, W, b, lay, runner=emu)
            assert eq_bits(a_acc, b_acc), dt
            assert all(eq_bits(x, y) for x, y in zip(a, b)), dt


# ---------------------------------------------------------------------------------------------------
# the .cu sources: names and nvcc
# ---------------------------------------------------------------------------------------------------
def test_kernel_names_match_sources():
    for name, fname in K.KERNEL_FILES.items():
        text = (K.KERNEL_DIR / fname).read_text()
        assert re.search(rf'extern "C" __global__ void {name}\(', text), f"{name} not in {fname}"
        assert "#include" not in text, f"{fname}: NVRTC (CuPy RawModule) compiles it without include paths"


NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)


@pytest.mark.parametrize("src", K.kernel_sources(), ids=lambda p: p.name)
def test_nvcc_compiles_kernel(src, tmp_path):
    if NVCC is None:
        pytest.skip("nvcc not found: the CUDA kernels are compiled in CI only where nvcc is installed")
    for mode in ("-cubin", "-ptx"):
        out = tmp_path / (src.stem + mode.replace("-", "."))
        cmd = [NVCC, "-arch=sm_90", mode, "-std=c++17", "-Werror", "all-warnings", "-o", str(out), str(src)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout}\n{r.stderr}"
        assert out.stat().st_size > 0
    ptx = (tmp_path / (src.stem + ".ptx")).read_text()
    for name, fname in K.KERNEL_FILES.items():
        if fname == src.name:
            assert f".entry {name}(" in ptx
    if src.name == "accumulate.cu":
        assert "fma.rn.f32" not in ptx, "accumulate/finalize must not be contracted to FMA (bit-exactness)"


def _find_nvrtc() -> str | None:
    """libnvrtc as CuPy would load it: FLTORRENT_NVRTC_LIB, the nvidia-cuda-nvrtc wheel, or the system."""
    import ctypes.util
    import importlib.util

    if os.environ.get("FLTORRENT_NVRTC_LIB"):
        return os.environ["FLTORRENT_NVRTC_LIB"]
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        lib = os.path.join(root, "cuda_nvrtc", "lib")
        names = sorted(n for n in os.listdir(lib) if n.startswith("libnvrtc.so")) if os.path.isdir(lib) else []
        if names:
            return os.path.join(lib, names[0])
    return ctypes.util.find_library("nvrtc")


@pytest.mark.parametrize("src", K.kernel_sources(), ids=lambda p: p.name)
def test_nvrtc_compiles_kernel(src):
    """What CuPy's RawModule does: NVRTC, no include paths, entry names unmangled."""
    path = _find_nvrtc()
    if path is None:
        pytest.skip("libnvrtc not found (set FLTORRENT_NVRTC_LIB, or install CuPy's nvidia-cuda-nvrtc)")
    lib = ctypes.CDLL(path)
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), src.read_bytes(), src.name.encode(), 0, None, None) == 0
    opts = (ctypes.c_char_p * 2)(b"--std=c++17", b"-arch=compute_90")
    rc = lib.nvrtcCompileProgram(prog, 2, opts)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    assert rc == 0, log.value.decode()
    lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
    ptx = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetPTX(prog, ptx)
    text = ptx.value.decode()
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    for name, fname in K.KERNEL_FILES.items():
        if fname == src.name:
            assert f".entry {name}(" in text


# ---------------------------------------------------------------------------------------------------
# on a CUDA GPU with CuPy
# ---------------------------------------------------------------------------------------------------
def _cuda_ready() -> bool:
    return torch.cuda.is_available() and K.cupy_available()


cuda = pytest.mark.skipif(not _cuda_ready(), reason="needs a CUDA device and an importable cupy")


@pytest.mark.cuda
@cuda
def test_cuda_kernels_match_fallback_on_gpu():
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(7)
    sizes = [1, 1000, 4097, 33, 1 << 20, 5]
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float32, torch.bfloat16, torch.float16]
    peers = [[torch.randn(n, device=dev, generator=g).to(dt) for n, dt in zip(sizes, dtypes)] for _ in range(3)]
    lay = Layout.from_tensors(peers[0])
    C = 64 * 1024
    flats_c = [K.pack_segments(p, lay, backend="cupy") for p in peers]
    flats_t = [K.pack_segments(p, lay, backend="torch") for p in peers]
    assert all(eq_bits(a, b) for a, b in zip(flats_c, flats_t))
    for f in flats_c:
        assert np.array_equal(
            K.digests_to_numpy(K.chunk_digests_t(f, C, KEY, backend="cupy")), chunk_digests(f.cpu().numpy(), C, KEY)
        )
    acc_c = torch.zeros(lay.numel, device=dev)
    acc_t = torch.zeros(lay.numel, device=dev)
    n = lay.n_chunks(C)
    for f, w in zip(flats_c, (1.0, 2.0, 0.5)):
        ids = torch.randperm(n).tolist()
        K.accumulate_(acc_c, ids, [f[c * C : (c + 1) * C] for c in ids], w, lay, C, backend="cupy")
        K.accumulate_(acc_t, range(n), f, w, lay, C, backend="torch")
    assert eq_bits(acc_c, acc_t)
    out_c = [torch.empty_like(t) for t in peers[0]]
    out_t = [torch.empty_like(t) for t in peers[0]]
    K.finalize_fedavg_(acc_c, 3.5, out_c, lay, backend="cupy")
    K.finalize_fedavg_(acc_t, 3.5, out_t, lay, backend="torch")
    assert all(eq_bits(a, b) for a, b in zip(out_c, out_t))
    back = [torch.empty_like(t) for t in peers[0]]
    K.unpack_segments(flats_c[0], lay, back, backend="cupy")
    assert all(eq_bits(a, b) for a, b in zip(back, peers[0]))


@pytest.mark.cuda
@cuda
def test_cuda_kernels_order_with_the_current_stream():
    """Launched on torch's current stream: a side stream's producer/consumer chain needs no host sync."""
    dev = torch.device("cuda")
    s = torch.cuda.Stream(device=dev)
    with torch.cuda.stream(s):
        ts = [torch.full((1 << 22,), 3.0, device=dev), torch.full((77,), 2.0, device=dev, dtype=torch.bfloat16)]
        lay = Layout.from_tensors(ts)
        flat = K.pack_segments(ts, lay, backend="cupy")
        acc = torch.zeros(lay.numel, device=dev)
        K.accumulate_(acc, range(lay.n_chunks(1 << 20)), flat, 2.0, lay, 1 << 20, backend="cupy")
        K.finalize_fedavg_(acc, 4.0, ts, lay, backend="cupy")
    s.synchronize()
    assert torch.all(ts[0] == 1.5) and torch.all(ts[1] == 1.0)
