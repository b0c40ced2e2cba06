"""Host emulation of kernels/*.cu: the .cu sources compiled by g++ with CUDA's built-ins defined as plain C++,
threads run one after another.  tests/test_kernels.py checks every kernel with it against the torch fallback
and the blake3 package; tests/fake_device.py's device digests with it, so CPU rounds run blake3.cu's code.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np

from fltorrent_hpc.chunks import kernels as K

EMU_PRELUDE = r"""
#include <cstring>
struct flt_dim3 { unsigned int x, y, z; };
static flt_dim3 threadIdx, blockIdx, blockDim, gridDim;
#define __global__
#define __device__
#define __forceinline__ inline
#define FLT_HOST_EMULATION 1
static inline float __uint_as_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline unsigned int __float_as_uint(float f) { unsigned int u; std::memcpy(&u, &f, 4); return u; }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  unsigned long long o = *p; *p = o + v; return o;
}
"""

EMU_WRAPPERS = r"""
#define EMU_LOOP(call) gridDim.x = g; blockDim.x = b; \
  for (unsigned bi = 0; bi < g; ++bi) { blockIdx.x = bi; \
    for (unsigned ti = 0; ti < b; ++ti) { threadIdx.x = ti; call; } }
extern "C" void emu_flt_copy_segments(unsigned g, unsigned b, const long long* items, long long n) {
  EMU_LOOP(flt_copy_segments(items, n))
}
extern "C" void emu_flt_accumulate(unsigned g, unsigned b, float* acc, const long long* items, long long n, float w) {
  EMU_LOOP(flt_accumulate(acc, items, n, w))
}
extern "C" void emu_flt_finalize(unsigned g, unsigned b, float* acc, const long long* items, long long n, float t) {
  EMU_LOOP(flt_finalize(acc, items, n, t))
}
extern "C" void emu_flt_blake3_leaves(unsigned g, unsigned b, const unsigned char* buf, long long nbytes,
    long long C, long long nch, long long lpc, const unsigned int* key, unsigned int* cv, unsigned int* d) {
  EMU_LOOP(flt_blake3_leaves(buf, nbytes, C, nch, lpc, key, cv, d))
}
extern "C" void emu_flt_blake3_parents(unsigned g, unsigned b, long long nbytes, long long C, long long nch,
    long long lpc, long long ppc, int level, const unsigned int* key, unsigned int* cv, unsigned int* d) {
  EMU_LOOP(flt_blake3_parents(nbytes, C, nch, lpc, ppc, level, key, cv, d))
}
"""


class EmuRunner:
    """KernelRunner that runs the .cu kernels on the host.

    A small grid exercises the grid-stride loops, and one-warp blocks make the kernels' 4-way unrolled
    loops run on test-sized tiles (they are block-size agnostic).
    """

    def __init__(self, lib: ctypes.CDLL, max_grid: int = 3, block: int = 32):
        self.lib, self.max_grid, self.block, self.launched = lib, max_grid, block, []

    def upload(self, table):
        arr = np.ascontiguousarray(table, dtype=np.int64).reshape(-1)
        self.last_table = np.asarray(table).copy()
        return arr.ctypes.data, arr

    def launch(self, name, grid, block, args):
        conv = {"ptr": ctypes.c_void_p, "i64": ctypes.c_longlong, "i32": ctypes.c_int, "f32": ctypes.c_float}
        assert block % 32 == 0 and grid >= 1
        self.launched.append(name)
        fn = getattr(self.lib, "emu_" + name)
        fn(ctypes.c_uint(min(grid, self.max_grid)), ctypes.c_uint(self.block), *[conv[k](v) for k, v in args])


def build_emu(directory: Path) -> EmuRunner | None:
    """Compile the emulation into `directory`; None when there is no C++ compiler (a failed compile raises)."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        return None
    src = Path(directory) / "emu.cpp"
    body = "".join(f'#include "{p}"\n' for p in K.kernel_sources())
    src.write_text(EMU_PRELUDE + body + EMU_WRAPPERS)
    so = Path(directory) / "emu.so"
    cmd = [cxx, "-O1", "-std=c++17", "-ffp-contract=off", "-fPIC", "-shared", "-Wall", "-Werror", "-o", str(so)]
    r = subprocess.run([*cmd, str(src)], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise RuntimeError(f"compiling the kernel emulation failed: {r.stderr[-2000:]}")
    return EmuRunner(ctypes.CDLL(str(so)))
