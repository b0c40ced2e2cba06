// Keyed BLAKE3 digests of every update chunk on the device, bit-identical to the `blake3` package
// (fltorrent_hpc/chunks/digest.py): digest(chunk c) = first 16 bytes of BLAKE3-keyed(key, chunk bytes).
//
// BLAKE3 splits an input into 1 KiB leaves (its "chunks"), compresses each leaf's 64-byte blocks in
// sequence into a chaining value (CV), then merges CVs pairwise up a left-balanced binary tree; the last
// compression carries the ROOT flag.  Merging level by level, pairing neighbours left to right and
// carrying an odd last node up unchanged, builds exactly that tree.  So the device work is:
//
//   flt_blake3_leaves   one thread per (update chunk, leaf): the leaf's CV into cv[] (or, for an update
//                       chunk of a single leaf, the root output straight into the digest);
//   flt_blake3_parents  one launch per tree level, one thread per pair: parent CVs in place
//                       (node i of level l lives at slot i << l); the pair that makes the root writes the
//                       digest.
//
// Every update chunk is hashed in parallel, and so is every leaf and every pair within one; levels are
// ordered by the launches, so no kernel needs a block-wide barrier (and host emulation, which runs the
// threads one after another, computes the same bits).  Launched from fltorrent_hpc/chunks/kernels.py
// through a CuPy RawModule (NVRTC); no headers.

#define FLT_B3_LEAF 1024ll
#define FLT_B3_CHUNK_START 1u
#define FLT_B3_CHUNK_END 2u
#define FLT_B3_PARENT 4u
#define FLT_B3_ROOT 8u
#define FLT_B3_KEYED 16u

__device__ __forceinline__ unsigned int flt_b3_rotr(unsigned int x, int n) { return (x >> n) | (x << (32 - n)); }

__device__ __forceinline__ void flt_b3_g(unsigned int* v, int a, int b, int c, int d, unsigned int x,
                                         unsigned int y) {
  v[a] = v[a] + v[b] + x;
  v[d] = flt_b3_rotr(v[d] ^ v[a], 16);
  v[c] = v[c] + v[d];
  v[b] = flt_b3_rotr(v[b] ^ v[c], 12);
  v[a] = v[a] + v[b] + y;
  v[d] = flt_b3_rotr(v[d] ^ v[a], 8);
  v[c] = v[c] + v[d];
  v[b] = flt_b3_rotr(v[b] ^ v[c], 7);
}

// The compression function: chaining value `cv`, 16 message words `m`, block counter `t`, block length
// and flags; `out` receives the 8 words of the new CV (the first half of BLAKE3's output block).
__device__ __forceinline__ void flt_b3_compress(const unsigned int* cv, const unsigned int* m_in,
                                                unsigned long long t, unsigned int block_len,
                                                unsigned int flags, unsigned int* out) {
  const unsigned int iv[4] = {0x6A09E667u, 0xBB67AE85u, 0x3C6EF372u, 0xA54FF53Au};
  // the message schedule: word j of round r+1 is word PERM[j] of round r
  const int perm[16] = {2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8};
  unsigned int v[16], m[16], p[16];
  for (int i = 0; i < 8; ++i) v[i] = cv[i];
  for (int i = 0; i < 4; ++i) v[8 + i] = iv[i];
  v[12] = (unsigned int)t;
  v[13] = (unsigned int)(t >> 32);
  v[14] = block_len;
  v[15] = flags;
  for (int i = 0; i < 16; ++i) m[i] = m_in[i];
  for (int r = 0; r < 7; ++r) {
    flt_b3_g(v, 0, 4, 8, 12, m[0], m[1]);
    flt_b3_g(v, 1, 5, 9, 13, m[2], m[3]);
    flt_b3_g(v, 2, 6, 10, 14, m[4], m[5]);
    flt_b3_g(v, 3, 7, 11, 15, m[6], m[7]);
    flt_b3_g(v, 0, 5, 10, 15, m[8], m[9]);
    flt_b3_g(v, 1, 6, 11, 12, m[10], m[11]);
    flt_b3_g(v, 2, 7, 8, 13, m[12], m[13]);
    flt_b3_g(v, 3, 4, 9, 14, m[14], m[15]);
    if (r < 6) {
      for (int i = 0; i < 16; ++i) p[i] = m[perm[i]];
      for (int i = 0; i < 16; ++i) m[i] = p[i];
    }
  }
  for (int i = 0; i < 8; ++i) out[i] = v[i] ^ v[i + 8];
}

// Little-endian words of up to 64 bytes at `src` (the rest zero): a block of the message.
__device__ __forceinline__ void flt_b3_load_block(const unsigned char* src, long long len, unsigned int* m) {
  for (int i = 0; i < 16; ++i) {
    unsigned int w = 0u;
    for (int b = 0; b < 4; ++b) {
      const long long at = 4 * i + b;
      if (at < len) w |= ((unsigned int)src[at]) << (8 * b);
    }
    m[i] = w;
  }
}

// Leaves of each update chunk c (bytes [c*C, min((c+1)*C, nbytes))).  Item k = c * leaves_per_chunk + j.
// A leaf of an update chunk with a single leaf is the root: its last block carries ROOT and its output's
// first four words are the digest.  key: the 8 key words; cv: [n_chunks * leaves_per_chunk * 8] words.
extern "C" __global__ void flt_blake3_leaves(const unsigned char* __restrict__ buf, long long nbytes,
                                             long long chunk_bytes, long long n_chunks,
                                             long long leaves_per_chunk, const unsigned int* __restrict__ key,
                                             unsigned int* __restrict__ cv, unsigned int* __restrict__ digest) {
  const long long n_items = n_chunks * leaves_per_chunk;
  for (long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x; k < n_items;
       k += (long long)gridDim.x * blockDim.x) {
    const long long c = k / leaves_per_chunk;
    const long long j = k - c * leaves_per_chunk;
    const long long start = c * chunk_bytes;
    const long long rest = nbytes - start;
    const long long clen = rest < chunk_bytes ? rest : chunk_bytes;
    const long long n_leaves = clen > 0 ? (clen + FLT_B3_LEAF - 1) / FLT_B3_LEAF : 1;
    if (j >= n_leaves) continue;
    const long long l0 = j * FLT_B3_LEAF;
    const long long llen = clen - l0 < FLT_B3_LEAF ? clen - l0 : FLT_B3_LEAF;
    const long long n_blocks = llen > 0 ? (llen + 63) / 64 : 1;
    unsigned int h[8], m[16];
    for (int i = 0; i < 8; ++i) h[i] = key[i];
    for (long long b = 0; b < n_blocks; ++b) {
      const long long b0 = l0 + 64 * b;
      const long long blen = llen - 64 * b < 64 ? llen - 64 * b : 64;
      flt_b3_load_block(buf + start + b0, blen, m);
      unsigned int flags = FLT_B3_KEYED;
      if (b == 0) flags |= FLT_B3_CHUNK_START;
      if (b == n_blocks - 1) flags |= FLT_B3_CHUNK_END;
      if (b == n_blocks - 1 && n_leaves == 1) flags |= FLT_B3_ROOT;
      flt_b3_compress(h, m, (unsigned long long)j, (unsigned int)(blen > 0 ? blen : 0), flags, h);
    }
    if (n_leaves == 1) {
      for (int i = 0; i < 4; ++i) digest[4 * c + i] = h[i];
    } else {
      unsigned int* dst = cv + 8 * (c * leaves_per_chunk + j);
      for (int i = 0; i < 8; ++i) dst[i] = h[i];
    }
  }
}

// One tree level: pairs (2i, 2i+1) of level `level` of every update chunk with more than one node left.
// Item k = c * pairs_per_chunk + i.  Node i of level l sits at leaf slot i << l of its update chunk.
extern "C" __global__ void flt_blake3_parents(long long nbytes, long long chunk_bytes, long long n_chunks,
                                              long long leaves_per_chunk, long long pairs_per_chunk,
                                              int level, const unsigned int* __restrict__ key,
                                              unsigned int* __restrict__ cv, unsigned int* __restrict__ digest) {
  const long long n_items = n_chunks * pairs_per_chunk;
  for (long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x; k < n_items;
       k += (long long)gridDim.x * blockDim.x) {
    const long long c = k / pairs_per_chunk;
    const long long i = k - c * pairs_per_chunk;
    const long long rest = nbytes - c * chunk_bytes;
    const long long clen = rest < chunk_bytes ? rest : chunk_bytes;
    long long nodes = clen > 0 ? (clen + FLT_B3_LEAF - 1) / FLT_B3_LEAF : 1;
    for (int l = 0; l < level; ++l) nodes = (nodes + 1) / 2;  // nodes of this level
    if (nodes < 2 || 2 * i + 1 >= nodes) continue;            // done already, or an odd node carried up
    unsigned int* left = cv + 8 * (c * leaves_per_chunk + ((2 * i) << level));
    const unsigned int* right = cv + 8 * (c * leaves_per_chunk + ((2 * i + 1) << level));
    unsigned int m[16];
    for (int w = 0; w < 8; ++w) {
      m[w] = left[w];
      m[8 + w] = right[w];
    }
    unsigned int flags = FLT_B3_KEYED | FLT_B3_PARENT;
    if (nodes == 2) flags |= FLT_B3_ROOT;
    unsigned int h[8];
    flt_b3_compress(key, m, 0ull, 64u, flags, h);
    if (nodes == 2) {
      for (int w = 0; w < 4; ++w) digest[4 * c + w] = h[w];
    } else {
      for (int w = 0; w < 8; ++w) left[w] = h[w];
    }
  }
}
