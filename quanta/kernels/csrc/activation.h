// Activations applied in place to float32 rows that a kernel has just written (the epilogue of an
// int8 linear): ReLU and GELU, exact-erf and tanh forms. Not bit-identical to torch's GELU (whose
// erf / tanh are other polynomial approximations): within ~2e-7 * max(1, |x|) of it (tested in
// tests/kernels/test_native_activation.py), far below one step of any integer grid.
//
// GELU(x) = x * Phi(x), Phi(x) = erfc(-x / sqrt 2) / 2. erfc(z) for z >= 0 is Abramowitz & Stegun
// 7.1.26: t = 1 / (1 + p z), erfc(z) = t (a1 + t (a2 + t (a3 + t (a4 + t a5)))) e^(-z^2), absolute
// error <= 1.5e-7; for z < 0, erfc(z) = 2 - erfc(-z). Evaluating erfc (not 1 + erf) keeps the
// left tail's small values accurate instead of cancelling them against 1.
// The tanh form: x * (1 + tanh(u)) / 2 = x / (1 + e^(-2u)), u = sqrt(2 / pi) (x + 0.044715 x^3).
#pragma once
#include "post_op.h"
#include "simd.h"

#include <cmath>
#include <cstdint>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace quanta_native {

namespace act {

constexpr float kP = 0.3275911f, kA1 = 0.254829592f, kA2 = -0.284496739f, kA3 = 1.421413741f,
                kA4 = -1.453152027f, kA5 = 1.061405429f;
constexpr float kSqrtHalf = 0.70710678118654752f, kSqrt2OverPi = 0.79788456080286536f, kCubic = 0.044715f;

inline float gelu(float x) {
  const float z = std::fabs(x) * kSqrtHalf;
  const float t = 1.f / (1.f + kP * z);
  const float poly = t * (kA1 + t * (kA2 + t * (kA3 + t * (kA4 + t * kA5))));
  const float e = poly * std::exp(-z * z);  // erfc(|x| / sqrt 2)
  return 0.5f * x * (x >= 0.f ? 2.f - e : e);
}

inline float gelu_tanh(float x) {
  const float v = -2.f * (kSqrt2OverPi * (x + kCubic * x * x * x));
  return v > 88.7f ? x * 0.f : x / (1.f + std::exp(v));
}

#if defined(__AVX512F__)
// e^v for v in [-87.3, 88.7] (clamped there: e^v is then 0 < e^v < 2^-126 or overflows to
// +inf beyond): v = n ln2 + r, |r| <= ln2 / 2, e^r by its degree-6 Taylor polynomial (relative
// error < 2e-7), scaled by 2^n.
inline __m512 exp16(__m512 v) {
  v = _mm512_max_ps(v, _mm512_set1_ps(-87.3f));
  v = _mm512_min_ps(v, _mm512_set1_ps(88.7f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // r = v - n ln2 with ln2 split in a part exact in float and the rest
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), v);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 720.f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

inline __m512 gelu16(__m512 x) {
  const __m512 z = _mm512_mul_ps(_mm512_abs_ps(x), _mm512_set1_ps(kSqrtHalf));
  const __m512 t = _mm512_div_ps(_mm512_set1_ps(1.f), _mm512_fmadd_ps(z, _mm512_set1_ps(kP), _mm512_set1_ps(1.f)));
  __m512 poly = _mm512_fmadd_ps(t, _mm512_set1_ps(kA5), _mm512_set1_ps(kA4));
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(kA3));
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(kA2));
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(kA1));
  poly = _mm512_mul_ps(poly, t);
  const __m512 e = _mm512_mul_ps(poly, exp16(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), z), z)));
  const __mmask16 pos = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GE_OQ);
  const __m512 phi2 = _mm512_mask_sub_ps(e, pos, _mm512_set1_ps(2.f), e);  // 2 Phi(x)
  return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), x), phi2);
}

inline __m512 gelu_tanh16(__m512 x) {
  const __m512 x3 = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
  const __m512 u = _mm512_mul_ps(_mm512_set1_ps(kSqrt2OverPi), _mm512_fmadd_ps(x3, _mm512_set1_ps(kCubic), x));
  const __m512 v = _mm512_mul_ps(u, _mm512_set1_ps(-2.f));
  const __m512 y = _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.f), exp16(v)));
  // far left (e^v past float's range): x * 0, a signed zero, as 1 + tanh(u) is there
  return _mm512_mask_mul_ps(y, _mm512_cmp_ps_mask(v, _mm512_set1_ps(88.7f), _CMP_GT_OQ), x, _mm512_setzero_ps());
}
#endif

#if defined(__AVX2__) && defined(__FMA__)
// exp16 on 8 lanes (the same operations in the same order; 2^n as two exact power-of-2 factors
// where AVX-512 has scalef): the AVX2 activations below and the float attention's softmax
// (attention.cpp, on AVX-512 builds too).
#define QUANTA_EXP8 1
inline __m256 exp8(__m256 v) {
  v = _mm256_max_ps(v, _mm256_set1_ps(-87.3f));
  v = _mm256_min_ps(v, _mm256_set1_ps(88.7f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(v, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), v);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.f / 720.f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  // p * 2^n, n in [-126, 128]: 2^n1 * 2^n2 with n1 = floor(n / 2), both normal floats
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
  const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
  return _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
}
#endif

#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
// The activations on 8 lanes for AVX2 builds.
inline __m256 gelu8(__m256 x) {
  const __m256 z = _mm256_mul_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.f), x), _mm256_set1_ps(kSqrtHalf));
  const __m256 t = _mm256_div_ps(_mm256_set1_ps(1.f), _mm256_fmadd_ps(z, _mm256_set1_ps(kP), _mm256_set1_ps(1.f)));
  __m256 poly = _mm256_fmadd_ps(t, _mm256_set1_ps(kA5), _mm256_set1_ps(kA4));
  poly = _mm256_fmadd_ps(poly, t, _mm256_set1_ps(kA3));
  poly = _mm256_fmadd_ps(poly, t, _mm256_set1_ps(kA2));
  poly = _mm256_fmadd_ps(poly, t, _mm256_set1_ps(kA1));
  poly = _mm256_mul_ps(poly, t);
  const __m256 e = _mm256_mul_ps(poly, exp8(_mm256_mul_ps(_mm256_sub_ps(_mm256_setzero_ps(), z), z)));
  const __m256 pos = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_GE_OQ);
  const __m256 phi2 = _mm256_blendv_ps(e, _mm256_sub_ps(_mm256_set1_ps(2.f), e), pos);  // 2 Phi(x)
  return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), x), phi2);
}

inline __m256 gelu_tanh8(__m256 x) {
  const __m256 x3 = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
  const __m256 u = _mm256_mul_ps(_mm256_set1_ps(kSqrt2OverPi), _mm256_fmadd_ps(x3, _mm256_set1_ps(kCubic), x));
  const __m256 v = _mm256_mul_ps(u, _mm256_set1_ps(-2.f));
  const __m256 y = _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.f), exp8(v)));
  const __m256 far = _mm256_cmp_ps(v, _mm256_set1_ps(88.7f), _CMP_GT_OQ);
  return _mm256_blendv_ps(y, _mm256_mul_ps(x, _mm256_setzero_ps()), far);
}
#define QUANTA_ACT8 1
#endif

template <int64_t OP>
inline float apply1(float v) {
  if (OP == kPostRelu) return v > 0.f ? v : (v == v ? 0.f : v);  // NaN stays NaN, like torch.relu
  if (OP == kPostGelu) return gelu(v);
  return gelu_tanh(v);
}

#if defined(__AVX512F__)
template <int64_t OP>
inline __m512 apply16(__m512 v) {
  __m512 r;
  if (OP == kPostRelu) {
    r = _mm512_mask_mov_ps(v, _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_LT_OQ), _mm512_setzero_ps());
  } else if (OP == kPostGelu) {
    r = gelu16(v);
  } else {
    r = gelu_tanh16(v);
  }
  // NaN in, NaN out (the clamps inside exp16 would turn it into a number)
  return _mm512_mask_mov_ps(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), v);
}
#endif

#if defined(QUANTA_ACT8)
template <int64_t OP>
inline __m256 apply8(__m256 v) {
  __m256 r;
  if (OP == kPostRelu) {
    r = _mm256_blendv_ps(v, _mm256_setzero_ps(), _mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_LT_OQ));
  } else if (OP == kPostGelu) {
    r = gelu8(v);
  } else {
    r = gelu_tanh8(v);
  }
  return _mm256_blendv_ps(r, v, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));  // NaN in, NaN out
}
#endif

// Every element through the same code (the last partial vector by masked loads and stores): a
// value's result does not depend on where in a row it sits.
template <int64_t OP>
inline void apply_span(float* y, int64_t n) {
#if defined(__AVX512F__)
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) _mm512_storeu_ps(y + k, apply16<OP>(_mm512_loadu_ps(y + k)));
  if (k < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - k)) - 1);
    _mm512_mask_storeu_ps(y + k, m, apply16<OP>(_mm512_maskz_loadu_ps(m, y + k)));
  }
#elif defined(QUANTA_ACT8)
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) _mm256_storeu_ps(y + k, apply8<OP>(_mm256_loadu_ps(y + k)));
  if (k < n) {  // (the last partial vector through a buffer: the same code as the others)
    alignas(32) float b[8] = {};
    for (int64_t i = k; i < n; ++i) b[i - k] = y[i];
    _mm256_store_ps(b, apply8<OP>(_mm256_load_ps(b)));
    for (int64_t i = k; i < n; ++i) y[i] = b[i - k];
  }
#else
  for (int64_t k = 0; k < n; ++k) y[k] = apply1<OP>(y[k]);
#endif
}

}  // namespace act

// The post-op `op` (post_op.h: none, relu, gelu, gelu tanh) over n floats in place.
inline void apply_post_op(int64_t op, float* y, int64_t n) {
  switch (op) {
    case kPostRelu: return act::apply_span<kPostRelu>(y, n);
    case kPostGelu: return act::apply_span<kPostGelu>(y, n);
    case kPostGeluTanh: return act::apply_span<kPostGeluTanh>(y, n);
    default: return;
  }
}

}  // namespace quanta_native
