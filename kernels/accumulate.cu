// FedAvg on the device: acc[e] += w * x[e] for a batch of received chunks, then the in-place write of
// the average back into the parameters.
//
// Launched from fltorrent_hpc/kernels.py through a CuPy RawModule (NVRTC); no headers.  The host plans
// one work item per <= 64 Ki-element tile of a (chunk, layout entry) overlap:
//
//     items[4*k + 0] = address of the tile's first element (chunk bytes for accumulate, parameter for
//                      finalize)
//     items[4*k + 1] = index of that element in the fp32 accumulator
//     items[4*k + 2] = element count
//     items[4*k + 3] = dtype code: 0 float32, 1 float16, 2 bfloat16 (kernels.py _ACC_CODES)
//
// Bit-exactness with the torch fallback (and so across devices and launch shapes):
//   * each element is touched by exactly one thread per launch, so no reduction order exists inside a
//     launch; the order across launches is the caller's (rank order per chunk);
//   * accumulate is acc = fl(acc + fl(w * x)), two IEEE roundings, written with __fmul_rn/__fadd_rn so
//     the compiler cannot contract it into an FMA (torch's mul then add_ does the same);
//   * finalize is avg = fl(acc / W) with the correctly rounded __fdiv_rn, then the same
//     round-to-nearest-even narrowing torch's .to(dtype) uses (c10's algorithms, written out below).

__device__ __forceinline__ float flt_bf16_to_f32(unsigned short h) { return __uint_as_float(((unsigned int)h) << 16); }

// c10::BFloat16 round_to_nearest_even (finite values and infinities; every NaN becomes a quiet NaN)
__device__ __forceinline__ unsigned short flt_f32_to_bf16(float f) {
  const unsigned int u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)0x7fc0u;
  return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// c10 fp16_ieee_to_fp32_value: exact, subnormals included
__device__ __forceinline__ float flt_f16_to_f32(unsigned short h) {
  const unsigned int w = ((unsigned int)h) << 16;
  const unsigned int sign = w & 0x80000000u;
  const unsigned int two_w = w + w;
  const float exp_scale = __uint_as_float(0x07800000u);  // 2^-112
  const float normalized = __fmul_rn(__uint_as_float((two_w >> 4) + (0xE0u << 23)), exp_scale);
  const float denormalized = __fadd_rn(__uint_as_float((two_w >> 17) | (126u << 23)), -0.5f);
  const unsigned int bits = two_w < (1u << 27) ? __float_as_uint(denormalized) : __float_as_uint(normalized);
  return __uint_as_float(sign | bits);
}

// c10 fp16_ieee_from_fp32_value: round to nearest even, overflow to inf, NaN -> 0x7e00 | sign
__device__ __forceinline__ unsigned short flt_f32_to_f16(float f) {
  const float scale_to_inf = __uint_as_float(0x77800000u);   // 2^112
  const float scale_to_zero = __uint_as_float(0x08800000u);  // 2^-110
  const unsigned int w = __float_as_uint(f);
  float base = __fmul_rn(__fmul_rn(__uint_as_float(w & 0x7fffffffu), scale_to_inf), scale_to_zero);
  const unsigned int shl1_w = w + w;
  const unsigned int sign = w & 0x80000000u;
  unsigned int bias = shl1_w & 0xff000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = __fadd_rn(__uint_as_float((bias >> 1) + 0x07800000u), base);
  const unsigned int bits = __float_as_uint(base);
  const unsigned int exp_bits = (bits >> 13) & 0x00007c00u;
  const unsigned int mantissa_bits = bits & 0x00000fffu;
  const unsigned int nonsign = exp_bits + mantissa_bits;
  return (unsigned short)((sign >> 16) | (shl1_w > 0xff000000u ? 0x7e00u : nonsign));
}

template <int CODE>
__device__ __forceinline__ float flt_load(const void* p, unsigned long long i) {
  if (CODE == 0) return reinterpret_cast<const float*>(p)[i];
  const unsigned short h = reinterpret_cast<const unsigned short*>(p)[i];
  return CODE == 1 ? flt_f16_to_f32(h) : flt_bf16_to_f32(h);
}

template <int CODE>
__device__ __forceinline__ void flt_store(void* p, unsigned long long i, float v) {
  if (CODE == 0) {
    reinterpret_cast<float*>(p)[i] = v;
  } else {
    reinterpret_cast<unsigned short*>(p)[i] = CODE == 1 ? flt_f32_to_f16(v) : flt_f32_to_bf16(v);
  }
}

template <int CODE>
__device__ __forceinline__ void flt_acc_tile(float* __restrict__ acc, const void* src, unsigned long long n, float w) {
  unsigned long long i = threadIdx.x;
  const unsigned long long step = blockDim.x;
  for (; i + 3 * step < n; i += 4 * step) {  // four independent element streams per thread
    const float x0 = flt_load<CODE>(src, i), x1 = flt_load<CODE>(src, i + step);
    const float x2 = flt_load<CODE>(src, i + 2 * step), x3 = flt_load<CODE>(src, i + 3 * step);
    const float a0 = acc[i], a1 = acc[i + step], a2 = acc[i + 2 * step], a3 = acc[i + 3 * step];
    acc[i] = __fadd_rn(a0, __fmul_rn(w, x0));
    acc[i + step] = __fadd_rn(a1, __fmul_rn(w, x1));
    acc[i + 2 * step] = __fadd_rn(a2, __fmul_rn(w, x2));
    acc[i + 3 * step] = __fadd_rn(a3, __fmul_rn(w, x3));
  }
  for (; i < n; i += step) acc[i] = __fadd_rn(acc[i], __fmul_rn(w, flt_load<CODE>(src, i)));
}

extern "C" __global__ void flt_accumulate(float* __restrict__ acc, const long long* __restrict__ items,
                                          long long n_items, float w) {
  for (long long k = blockIdx.x; k < n_items; k += gridDim.x) {
    const void* src = reinterpret_cast<const void*>((unsigned long long)items[4 * k]);
    float* a = acc + items[4 * k + 1];
    const unsigned long long n = (unsigned long long)items[4 * k + 2];
    const long long code = items[4 * k + 3];
    if (code == 0) {
      flt_acc_tile<0>(a, src, n, w);
    } else if (code == 1) {
      flt_acc_tile<1>(a, src, n, w);
    } else {
      flt_acc_tile<2>(a, src, n, w);
    }
  }
}

template <int CODE>
__device__ __forceinline__ void flt_final_tile(float* __restrict__ acc, void* dst, unsigned long long n, float total) {
  unsigned long long i = threadIdx.x;
  const unsigned long long step = blockDim.x;
  for (; i + 3 * step < n; i += 4 * step) {
    const float v0 = __fdiv_rn(acc[i], total), v1 = __fdiv_rn(acc[i + step], total);
    const float v2 = __fdiv_rn(acc[i + 2 * step], total), v3 = __fdiv_rn(acc[i + 3 * step], total);
    acc[i] = v0;
    acc[i + step] = v1;
    acc[i + 2 * step] = v2;
    acc[i + 3 * step] = v3;
    flt_store<CODE>(dst, i, v0);
    flt_store<CODE>(dst, i + step, v1);
    flt_store<CODE>(dst, i + 2 * step, v2);
    flt_store<CODE>(dst, i + 3 * step, v3);
  }
  for (; i < n; i += step) {
    const float v = __fdiv_rn(acc[i], total);
    acc[i] = v;
    flt_store<CODE>(dst, i, v);
  }
}

// acc <- acc / total (the fp32 average stays in acc) and parameter <- dtype(acc / total), in place.
extern "C" __global__ void flt_finalize(float* __restrict__ acc, const long long* __restrict__ items,
                                        long long n_items, float total) {
  for (long long k = blockIdx.x; k < n_items; k += gridDim.x) {
    void* dst = reinterpret_cast<void*>((unsigned long long)items[4 * k]);
    float* a = acc + items[4 * k + 1];
    const unsigned long long n = (unsigned long long)items[4 * k + 2];
    const long long code = items[4 * k + 3];
    if (code == 0) {
      flt_final_tile<0>(a, dst, n, total);
    } else if (code == 1) {
      flt_final_tile<1>(a, dst, n, total);
    } else {
      flt_final_tile<2>(a, dst, n, total);
    }
  }
}
