// Fused Adam/AdamW step over flat CPU buffers; dsl.ops.adam.cpu builds, loads and documents it.
//
// A C ABI on raw pointers (no torch headers: the build takes seconds, not the ~45 s that
// <torch/extension.h> costs). Per element, all arithmetic in fp32, in exactly the order of
// reference.py, without FMA contraction (-ffp-contract=off), so results equal the reference bit
// for bit on every element, whether it lands in the vector body or the tail:
//   g  = float(grad) * inv_scale
//   AdamW: p = p * decay (= 1 - lr*wd)          Adam (L2): g = g + wd * p
//   m  = b1 * m + (1 - b1) * g
//   v  = b2 * v + ((1 - b2) * g) * g
//   p  = p - (step_size * m) / (sqrt(v) * inv_bc2_sqrt + eps)
//   lp = round_to_nearest_even(p)                (optional bf16/fp16 copy)
// The loops are plain C++ that GCC vectorises (-O3 -march=native); OpenMP threads take chunks of
// 16K elements dynamically.

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace {

enum Dtype : int { kNone = 0, kF32 = 1, kBF16 = 2, kF16 = 3 };

struct Coef {
  float inv_scale, wd, decay, b1, one_minus_b1, b2, one_minus_b2, step_size, inv_bc2_sqrt, eps;
};

template <int D> struct Storage { using T = uint16_t; };
template <> struct Storage<kF32> { using T = float; };
template <> struct Storage<kF16> { using T = _Float16; };

template <int D>
inline float load_f32(const typename Storage<D>::T* x, int64_t i) {
  if constexpr (D == kBF16) {
    uint32_t u = static_cast<uint32_t>(x[i]) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  } else {
    return static_cast<float>(x[i]);
  }
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even; NaN -> 0x7fc0 (as c10::BFloat16)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return (f != f) ? uint16_t(0x7fc0) : uint16_t(rounded);
}

template <int G, int L, bool ADAMW>
void adam_range(const typename Storage<G>::T* __restrict__ g, float* __restrict__ p,
                float* __restrict__ m, float* __restrict__ v, typename Storage<L>::T* __restrict__ lp,
                int64_t n, const Coef c) {
#pragma GCC ivdep
  for (int64_t i = 0; i < n; ++i) {
    float gi = load_f32<G>(g, i) * c.inv_scale;
    float pi = p[i];
    if constexpr (ADAMW) pi = pi * c.decay;
    else gi = gi + c.wd * pi;
    float mi = c.b1 * m[i] + c.one_minus_b1 * gi;
    float vi = c.b2 * v[i] + (c.one_minus_b2 * gi) * gi;
    float denom = __builtin_sqrtf(vi) * c.inv_bc2_sqrt + c.eps;
    pi = pi - (c.step_size * mi) / denom;
    m[i] = mi;
    v[i] = vi;
    p[i] = pi;
    if constexpr (L == kBF16) lp[i] = f32_to_bf16(pi);
    else if constexpr (L == kF16) lp[i] = static_cast<_Float16>(pi);
  }
}

// The bf16/fp16 copy is written with non-temporal (streaming) stores where the AVX-512 build
// allows: a normal store first reads the destination line into the cache (2 more bytes per
// element); a streaming store writes the full line without reading it. p, m, v need no such
// thing: they were just read. The values are those of adam_range (it computes each 32-element
// block into an aligned stack buffer, which then goes out in one 64-byte streaming store).
template <int G, int L, bool ADAMW>
void adam_range_stream_lp(const typename Storage<G>::T* __restrict__ g, float* __restrict__ p,
                          float* __restrict__ m, float* __restrict__ v,
                          typename Storage<L>::T* __restrict__ lp, int64_t n, const Coef c) {
#if defined(__AVX512F__) && !defined(DSL_NO_STREAM)
  using LT = typename Storage<L>::T;
  constexpr int64_t kBlock = 64 / sizeof(LT);
  const uintptr_t addr = reinterpret_cast<uintptr_t>(lp);
  int64_t head = addr % 64 == 0 ? 0 : (64 - addr % 64) / sizeof(LT);
  if (addr % sizeof(LT) != 0 || head > n) head = n;  // cannot align: plain stores throughout
  adam_range<G, L, ADAMW>(g, p, m, v, lp, head, c);
  int64_t i = head;
  alignas(64) LT buf[kBlock];
  for (; i + kBlock <= n; i += kBlock) {
    adam_range<G, L, ADAMW>(g + i, p + i, m + i, v + i, buf, kBlock, c);
    _mm512_stream_si512(reinterpret_cast<__m512i*>(lp + i), _mm512_load_si512(buf));
  }
  adam_range<G, L, ADAMW>(g + i, p + i, m + i, v + i, lp + i, n - i, c);
  _mm_sfence();  // streaming stores are weakly ordered: make them visible before returning
#else
  adam_range<G, L, ADAMW>(g, p, m, v, lp, n, c);
#endif
}

// fp16 <-> fp32 with F16C/AVX-512 instructions (round to nearest even, as a _Float16 cast):
// GCC 12 does not vectorise _Float16 conversions inside adam_range, so fp16 gradients and
// copies go through 512-element fp32 stack buffers (in L1) converted by these loops.
inline void f16_to_f32(const _Float16* src, float* dst, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

inline void f32_to_f16(const float* src, _Float16* dst, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                        _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
  for (; i < n; ++i) dst[i] = static_cast<_Float16>(src[i]);
}

// One chunk of the step for any dtype pair (the per-element math is adam_range's in every case).
template <int G, int L, bool ADAMW>
void adam_chunk(const typename Storage<G>::T* g, float* p, float* m, float* v,
                typename Storage<L>::T* lp, int64_t n, const Coef& c) {
  if constexpr (G != kF16 && L != kF16) {
    if constexpr (L == kNone) adam_range<G, L, ADAMW>(g, p, m, v, nullptr, n, c);
    else adam_range_stream_lp<G, L, ADAMW>(g, p, m, v, lp, n, c);
  } else {
    constexpr int64_t kBuf = 512;
    constexpr int G2 = G == kF16 ? kF32 : G;
    constexpr int L2 = L == kF16 ? kNone : L;
    alignas(64) float gbuf[kBuf];
    for (int64_t i = 0; i < n; i += kBuf) {
      const int64_t len = n - i < kBuf ? n - i : kBuf;
      const typename Storage<G2>::T* gi;
      if constexpr (G == kF16) {
        f16_to_f32(g + i, gbuf, len);
        gi = gbuf;
      } else {
        gi = g + i;
      }
      if constexpr (L2 == kNone) adam_range<G2, kNone, ADAMW>(gi, p + i, m + i, v + i, nullptr, len, c);
      else adam_range<G2, L2, ADAMW>(gi, p + i, m + i, v + i, lp + i, len, c);
      if constexpr (L == kF16) f32_to_f16(p + i, lp + i, len);
    }
  }
}

// Work is handed out in chunks of kChunk elements (64 KiB of each fp32 array), dynamically:
// when one thread is descheduled (other processes on the cores, a communication thread) the
// others take its remaining chunks instead of waiting for it at the end of a static split.
// 16K measured ~4% faster than 64K and 256K on the shared 2-core machine (paired runs).
constexpr int64_t kChunk = int64_t(1) << 14;

template <int G, int L, bool ADAMW>
void adam_parallel(const void* g, float* p, float* m, float* v, void* lp, int64_t n, const Coef& c,
                   int nt) {
  using GT = typename Storage<G>::T;
  using LT = typename Storage<L>::T;
  auto* gg = static_cast<const GT*>(g);
  auto* ll = static_cast<LT*>(lp);
  const int64_t chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1 && chunks > 1)
  for (int64_t k = 0; k < chunks; ++k) {
    const int64_t lo = k * kChunk, len = (n - lo < kChunk) ? n - lo : kChunk;
    adam_chunk<G, L, ADAMW>(gg + lo, p + lo, m + lo, v + lo, L == kNone ? nullptr : ll + lo, len, c);
  }
}

template <int G, bool ADAMW>
int dispatch_lp(int l, const void* g, float* p, float* m, float* v, void* lp, int64_t n, const Coef& c, int nt) {
  switch (l) {
    case kNone: adam_parallel<G, kNone, ADAMW>(g, p, m, v, nullptr, n, c, nt); return 0;
    case kBF16: adam_parallel<G, kBF16, ADAMW>(g, p, m, v, lp, n, c, nt); return 0;
    case kF16: adam_parallel<G, kF16, ADAMW>(g, p, m, v, lp, n, c, nt); return 0;
    default: return -2;
  }
}

template <bool ADAMW>
int dispatch_grad(int gd, int l, const void* g, float* p, float* m, float* v, void* lp, int64_t n,
                  const Coef& c, int nt) {
  switch (gd) {
    case kF32: return dispatch_lp<kF32, ADAMW>(l, g, p, m, v, lp, n, c, nt);
    case kBF16: return dispatch_lp<kBF16, ADAMW>(l, g, p, m, v, lp, n, c, nt);
    case kF16: return dispatch_lp<kF16, ADAMW>(l, g, p, m, v, lp, n, c, nt);
    default: return -1;
  }
}

// Exponent bits all ones <=> inf or nan. No early exit: a branch per element would stop the
// vectorisation, and the scan reads at full bandwidth anyway.
template <typename U, U kMask>
int any_all_ones(const void* data, int64_t n, int nt) {
  auto* x = static_cast<const U*>(data);
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  int found = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1 && chunks > 1) reduction(| : found)
  for (int64_t k = 0; k < chunks; ++k) {
    const int64_t lo = k * kChunk, hi = (n - lo < kChunk) ? n : lo + kChunk;
    // Four interleaved streams: one read stream per core leaves memory bandwidth unused
    // (measured: a 1-stream scan ran at half the bytes/s of the 4-stream Adam pass).
    const int64_t q = (hi - lo) / 4;
    const U* x0 = x + lo;
    const U* x1 = x0 + q;
    const U* x2 = x1 + q;
    const U* x3 = x2 + q;
    U acc = 0;
    for (int64_t i = 0; i < q; ++i)
      acc |= static_cast<U>(((x0[i] & kMask) == kMask) | ((x1[i] & kMask) == kMask) |
                            ((x2[i] & kMask) == kMask) | ((x3[i] & kMask) == kMask));
    for (int64_t i = lo + 4 * q; i < hi; ++i) acc |= static_cast<U>((x[i] & kMask) == kMask);
    found |= acc != 0;
  }
  return found;
}

}  // namespace

extern "C" {

// Returns 0, or -1 (unknown grad dtype) / -2 (unknown lp dtype). Python checks shapes/dtypes.
// coef: inv_scale, wd, decay, b1, 1-b1, b2, 1-b2, step_size, inv_bc2_sqrt, eps (fp32, rounded
// from double by the caller).
int dsl_adam_step(int grad_dtype, const void* grad, float* param, float* exp_avg, float* exp_avg_sq,
                  int lp_dtype, void* param_lp, int64_t n, int adamw, const float* coef, int num_threads) {
  Coef c;
  std::memcpy(&c, coef, sizeof(Coef));
  const int nt = num_threads;
  return adamw ? dispatch_grad<true>(grad_dtype, lp_dtype, grad, param, exp_avg, exp_avg_sq, param_lp, n, c, nt)
               : dispatch_grad<false>(grad_dtype, lp_dtype, grad, param, exp_avg, exp_avg_sq, param_lp, n, c, nt);
}

// 1 when the buffer holds inf or nan, 0 when not, -1 for an unknown dtype.
int dsl_nonfinite(int dtype, const void* data, int64_t n, int num_threads) {
  const int nt = num_threads;
  switch (dtype) {
    case kF32: return any_all_ones<uint32_t, 0x7f800000u>(data, n, nt);
    case kBF16: return any_all_ones<uint16_t, 0x7f80u>(data, n, nt);
    case kF16: return any_all_ones<uint16_t, 0x7c00u>(data, n, nt);
    default: return -1;
  }
}

}  // extern "C"
