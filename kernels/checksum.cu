// Per-chunk 64-bit hash on the device, bit-identical to fltorrent_hpc/checksum.py:
//
//     words  = chunk zero-padded to a multiple of 8 bytes, little-endian uint64 w_0..w_{L-1}
//     h      = sum_i splitmix64(w_i XOR (i * GOLDEN))            (mod 2**64)
//     digest = splitmix64(h XOR (nbytes * LEN_SALT))
//
// The sum is over Z/2^64, which is associative and commutative, so the partial sums of the blocks can be
// combined with atomicAdd in any order and still give the same bits: no determinism caveat here.
//
// flt_chunk_hash_partial: the grid walks (chunk, part) items; a part is `words_per_part` words of one
// chunk.  Each thread sums its words, the warp reduces with shuffles and lane 0 adds to h[chunk]
// (h must start zeroed).  flt_chunk_hash_final then mixes in the length.  Launched from
// fltorrent_hpc/kernels.py through a CuPy RawModule (NVRTC); no headers.

#define FLT_GOLDEN 0x9E3779B97F4A7C15ull
#define FLT_MIX1 0xBF58476D1CE4E5B9ull
#define FLT_MIX2 0x94D049BB133111EBull
#define FLT_LEN_SALT 0xD6E8FEB86659FD93ull

__device__ __forceinline__ unsigned long long flt_splitmix64(unsigned long long z) {
  z += FLT_GOLDEN;
  z = (z ^ (z >> 30)) * FLT_MIX1;
  z = (z ^ (z >> 27)) * FLT_MIX2;
  return z ^ (z >> 31);
}

__device__ __forceinline__ void flt_add_u64(unsigned long long* dst, unsigned long long v) {
#ifdef FLT_HOST_EMULATION
  atomicAdd(dst, v);  // host emulation runs threads one by one: no shuffles there
#else
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  if ((threadIdx.x & 31u) == 0u) atomicAdd(dst, v);
#endif
}

// aligned8 != 0 promises buf % 8 == 0 and chunk_bytes % 8 == 0, so full words load as one 8-byte read.
extern "C" __global__ void flt_chunk_hash_partial(const unsigned char* __restrict__ buf, long long nbytes,
                                                  long long chunk_bytes, long long n_chunks,
                                                  long long parts_per_chunk, long long words_per_part,
                                                  int aligned8, unsigned long long* __restrict__ h) {
  const long long n_items = n_chunks * parts_per_chunk;
  // blockDim.x must be a multiple of 32 and every thread of a block reaches flt_add_u64 for each item
  for (long long k = blockIdx.x; k < n_items; k += gridDim.x) {
    const long long c = k / parts_per_chunk;
    const long long p = k - c * parts_per_chunk;
    const long long start = c * chunk_bytes;
    const long long rest = nbytes - start;
    const long long clen = rest < chunk_bytes ? rest : chunk_bytes;
    const long long n_words = (clen + 7) / 8;
    const long long w0 = p * words_per_part;
    const long long w1 = w0 + words_per_part < n_words ? w0 + words_per_part : n_words;
    const unsigned char* base = buf + start;
    unsigned long long s = 0ull;
    for (long long i = w0 + (long long)threadIdx.x; i < w1; i += (long long)blockDim.x) {
      const long long at = 8 * i;
      unsigned long long word;
      if (aligned8 && at + 8 <= clen) {
        word = *reinterpret_cast<const unsigned long long*>(base + at);
      } else {  // the short last word of a chunk, or a buffer that is not 8-byte aligned
        word = 0ull;
        for (int b = 0; b < 8; ++b) {
          if (at + b < clen) word |= ((unsigned long long)base[at + b]) << (8 * b);
        }
      }
      s += flt_splitmix64(word ^ ((unsigned long long)i * FLT_GOLDEN));
    }
    flt_add_u64(h + c, s);
  }
}

extern "C" __global__ void flt_chunk_hash_final(unsigned long long* __restrict__ h, long long nbytes,
                                                long long chunk_bytes, long long n_chunks) {
  for (long long c = (long long)blockIdx.x * blockDim.x + threadIdx.x; c < n_chunks;
       c += (long long)gridDim.x * blockDim.x) {
    const long long rest = nbytes - c * chunk_bytes;
    const long long clen = rest < chunk_bytes ? rest : chunk_bytes;
    h[c] = flt_splitmix64(h[c] ^ ((unsigned long long)clen * FLT_LEN_SALT));
  }
}
