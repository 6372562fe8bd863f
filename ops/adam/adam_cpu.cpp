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
// The loops are plain C++ that GCC vectorises (-O3 -march=native); OpenMP splits the range into
// one contiguous, 64-element-aligned piece per thread.
#include <omp.h>

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

// [lo, hi) of thread `t` of `nt`: contiguous, boundaries on multiples of 64 elements.
inline void split(int64_t n, int nt, int t, int64_t* lo, int64_t* hi) {
  int64_t per = ((n + nt - 1) / nt + 63) / 64 * 64;
  *lo = per * t < n ? per * t : n;
  *hi = per * (t + 1) < n ? per * (t + 1) : n;
}

template <int G, int L, bool ADAMW>
void adam_parallel(const void* g, float* p, float* m, float* v, void* lp, int64_t n, const Coef& c,
                   int nt) {
  using GT = typename Storage<G>::T;
  using LT = typename Storage<L>::T;
  auto* gg = static_cast<const GT*>(g);
  auto* ll = static_cast<LT*>(lp);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    int64_t lo, hi;
    split(n, omp_get_num_threads(), omp_get_thread_num(), &lo, &hi);
    if (lo < hi) adam_range<G, L, ADAMW>(gg + lo, p + lo, m + lo, v + lo, ll ? ll + lo : nullptr, hi - lo, c);
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
  int found = 0;
#pragma omp parallel num_threads(nt) if (nt > 1) reduction(| : found)
  {
    int64_t lo, hi;
    split(n, omp_get_num_threads(), omp_get_thread_num(), &lo, &hi);
    U acc = 0;
    for (int64_t i = lo; i < hi; ++i) acc |= static_cast<U>((x[i] & kMask) == kMask);
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
  int nt = n < (int64_t(1) << 16) ? 1 : num_threads;
  return adamw ? dispatch_grad<true>(grad_dtype, lp_dtype, grad, param, exp_avg, exp_avg_sq, param_lp, n, c, nt)
               : dispatch_grad<false>(grad_dtype, lp_dtype, grad, param, exp_avg, exp_avg_sq, param_lp, n, c, nt);
}

// 1 when the buffer holds inf or nan, 0 when not, -1 for an unknown dtype.
int dsl_nonfinite(int dtype, const void* data, int64_t n, int num_threads) {
  int nt = n < (int64_t(1) << 16) ? 1 : num_threads;
  switch (dtype) {
    case kF32: return any_all_ones<uint32_t, 0x7f800000u>(data, n, nt);
    case kBF16: return any_all_ones<uint16_t, 0x7f80u>(data, n, nt);
    case kF16: return any_all_ones<uint16_t, 0x7c00u>(data, n, nt);
    default: return -1;
  }
}

}  // extern "C"
