// Batched segment copy: pack (tensors -> flat chunk runs) and unpack (flat -> tensors) in one launch.
//
// Launched from fltorrent_hpc/kernels.py through a CuPy RawModule (NVRTC), so this file includes no
// headers.  The host side plans a table of work items, one row per <= 256 KiB tile of a segment:
//
//     items[3*k + 0] = source address, or 0 to zero-fill (the pad bytes between layout entries)
//     items[3*k + 1] = destination address
//     items[3*k + 2] = byte count
//
// This is Horovod's BatchedD2DMemcpy idea (one launch for many tensors, element width from alignment)
// without its 160-entry cap: the table lives in device memory and blocks walk it grid-stride.  The
// planner splits a segment's 16-byte-aligned bulk from its tail, so only tails run narrower than 16 B.
//
// tests/test_kernels.py also compiles this file with g++ under FLT_HOST_EMULATION (threads run one by
// one on the host) to check the planner + kernel pair bit for bit against the torch fallback.

struct alignas(16) flt_v16 {
  unsigned int x, y, z, w;
};

template <typename T>
__device__ __forceinline__ void flt_copy_words(unsigned long long src, unsigned long long dst,
                                               unsigned long long count) {
  T* d = reinterpret_cast<T*>(dst);
  if (src == 0ull) {
    const T zero = T();
    for (unsigned long long i = threadIdx.x; i < count; i += blockDim.x) d[i] = zero;
    return;
  }
  const T* s = reinterpret_cast<const T*>(src);
  // four independent loads in flight per thread before the stores (memory-level parallelism)
  unsigned long long i = threadIdx.x;
  const unsigned long long step = blockDim.x;
  for (; i + 3 * step < count; i += 4 * step) {
    const T a = s[i], b = s[i + step], c = s[i + 2 * step], e = s[i + 3 * step];
    d[i] = a;
    d[i + step] = b;
    d[i + 2 * step] = c;
    d[i + 3 * step] = e;
  }
  for (; i < count; i += step) d[i] = s[i];
}

extern "C" __global__ void flt_copy_segments(const long long* __restrict__ items, long long n_items) {
  for (long long k = blockIdx.x; k < n_items; k += gridDim.x) {
    const unsigned long long src = (unsigned long long)items[3 * k];
    const unsigned long long dst = (unsigned long long)items[3 * k + 1];
    const unsigned long long n = (unsigned long long)items[3 * k + 2];
    const unsigned long long a = src | dst | n;  // src == 0 (zero fill) constrains nothing
    if ((a & 15ull) == 0ull) {
      flt_copy_words<flt_v16>(src, dst, n >> 4);
    } else if ((a & 7ull) == 0ull) {
      flt_copy_words<unsigned long long>(src, dst, n >> 3);
    } else if ((a & 3ull) == 0ull) {
      flt_copy_words<unsigned int>(src, dst, n >> 2);
    } else if ((a & 1ull) == 0ull) {
      flt_copy_words<unsigned short>(src, dst, n >> 1);
    } else {
      flt_copy_words<unsigned char>(src, dst, n);
    }
  }
}
