// Shared helpers of quanta's native CPU kernels (fused.cpp, gemv.cpp, recurrent.cpp): the
// float32 arithmetic of quanta.core's quantization, written so that the compiler neither fuses
// nor reorders it (the library is built with -ffp-contract=off and without -ffast-math).
#pragma once
#include <torch/extension.h>

#include "activation.h"
#include "simd.h"

#include <cmath>
#include <limits>
#include <type_traits>

namespace quanta_native {


inline float round_half_even(float v) { return std::nearbyint(v); }  // default mode: to nearest even

// clamp(round(x * inv) + z, lo, hi) written to `out`, n elements
template <typename T>
inline void quantize_span(const float* __restrict__ x, T* __restrict__ out, int64_t n, float inv, float z,
                          float lo, float hi) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) {
    float q = round_half_even(x[k] * inv) + z;
    q = q < lo ? lo : (q > hi ? hi : q);
    out[k] = static_cast<T>(static_cast<int32_t>(q));
  }
}

// The range of n values: [lo, hi] holding 0 (symmetric: lo = 0, hi = max |x|) and whether any is NaN.
// Ranges of parts combine exactly (min / max / or) into the range of the whole.
struct Range {
  float lo = 0.f, hi = 0.f;
  int nan = 0;
  void merge(const Range& o) {
    lo = o.lo < lo ? o.lo : lo;
    hi = o.hi > hi ? o.hi : hi;
    nan |= o.nan;
  }
};

inline Range value_range(const float* __restrict__ r, int64_t n, bool symmetric) {
  Range out;
  int nan = 0;
  if (symmetric) {
    float amax = 0.f;
#pragma omp simd reduction(max : amax) reduction(| : nan)
    for (int64_t k = 0; k < n; ++k) {
      const float a = std::fabs(r[k]);
      amax = a > amax ? a : amax;
      nan |= (r[k] != r[k]);
    }
    out.hi = amax;
  } else {
    float lo = 0.f, hi = 0.f;  // the range always holds 0
#pragma omp simd reduction(min : lo) reduction(max : hi) reduction(| : nan)
    for (int64_t k = 0; k < n; ++k) {
      lo = r[k] < lo ? r[k] : lo;
      hi = r[k] > hi ? r[k] : hi;
      nan |= (r[k] != r[k]);
    }
    out.lo = lo;
    out.hi = hi;
  }
  out.nan = nan;
  return out;
}

// The qparams of a range, as quanta.kernels.activation._quantize_activation_fused computes them.
// Returns false when the range holds NaN / inf or overflows (the caller then takes the Python
// path, which raises a named error or handles the overflow).
inline bool range_qparams(const Range& r, float qmin, float qmax, bool symmetric, float* scale, float* zero) {
  const float tiny = std::numeric_limits<float>::min();
  if (symmetric) {
    const float amax = r.hi;
    if (r.nan || !std::isfinite(amax)) return false;
    float s = amax / qmax;
    *scale = amax > 0.f ? (s < tiny ? tiny : s) : 1.f;
    *zero = 0.f;
    return true;
  }
  const float width = r.hi - r.lo;
  if (r.nan || !std::isfinite(width)) return false;
  float s = width / (qmax - qmin);
  s = s < tiny ? tiny : s;
  if (width <= 0.f) s = 1.f;
  float z = -round_half_even(r.lo / s) + qmin;
  z = z < qmin ? qmin : (z > qmax ? qmax : z);
  *scale = s;
  *zero = z;
  return true;
}

// One row's qparams (see range_qparams).
inline bool row_qparams(const float* __restrict__ r, int64_t n, float qmin, float qmax, bool symmetric,
                        float* scale, float* zero) {
  return range_qparams(value_range(r, n, symmetric), qmin, qmax, symmetric, scale, zero);
}

template <typename T>
inline bool quantize_rows_impl(const float* x, T* out, float* scale, int32_t* zp, int64_t M, int64_t K, float qmin,
                        float qmax, bool symmetric) {
  std::vector<char> ok(M, 1);
  at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      float s, z;
      if (!row_qparams(x + m * K, K, qmin, qmax, symmetric, &s, &z)) {
        ok[m] = 0;
        continue;
      }
      scale[m] = s;
      zp[m] = static_cast<int32_t>(z);
      quantize_span<T>(x + m * K, out + m * K, K, 1.f / s, z, qmin, qmax);
    }
  });
  for (char v : ok)
    if (!v) return false;
  return true;
}

inline void check_float_input(const torch::Tensor& x, const char* what) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32, what, ": needs a float32 CPU tensor");
}


// acc[m, n] = sum_k (x[m, k] ^ flip) * w[n, k] for uint8 activation bytes x [M, K] (row-major; flip 0x80
// reads int8 codes as code + 128) and int8 weights w [N, K] (row-major), exact int32 (gemv.cpp).
void gemv_u8s8(const uint8_t* x, int64_t M, int64_t K, const int8_t* w, int64_t N, int32_t* acc, uint8_t flip);

// The same sums for weight rows [n0, n1) only, on the calling thread (for callers that split
// the rows between threads themselves).
void gemv_u8s8_rows(const uint8_t* x, int64_t M, int64_t K, const int8_t* w, int64_t N, int32_t* acc, uint8_t flip,
                    int64_t n0, int64_t n1);

// y = float32(acc - zp[m] * ws[n]) * xs[m] * wsc[n] (+ b[n]) in place over a row-major int32 [M, N]
// (fused.cpp's rescale_rows); zrow / srow: zp / xs hold M values, else one. Then the activation
// post_op (activation.h's PostOp) over each row while it is in cache.
void rescale_rows_raw(int32_t* acc, int64_t M, int64_t N, const int32_t* zp, bool zrow, const int32_t* ws,
                      const float* xs, bool srow, const float* wsc, const float* b, int64_t post_op = kPostNone);

// Checks a linear post-op code (post_op.h: 0 none, 1 relu, 2 gelu, 3 gelu tanh) given to `what`.
inline void check_post_op(const char* what, int64_t post_op) {
  TORCH_CHECK(linear_post_op_ok(post_op), what,
              ": post_op must be 0 (none), 1 (relu), 2 (gelu) or 3 (gelu tanh), got ", post_op);
}

// Checks the epilogue arguments of an [M, N] int32 accumulator (rescale_rows, int8_gemv): x_zp int32 and
// x_scale float32 with 1 or M values, w_sum int32 and w_scale float32 with N, an optional float32 bias
// with N (all contiguous); returns the bias pointer (or null). `what` names the caller in the errors.
inline const float* check_epilogue(const char* what, int64_t M, int64_t N, const torch::Tensor& x_zp,
                                   const torch::Tensor& w_sum, const torch::Tensor& x_scale,
                                   const torch::Tensor& w_scale, const c10::optional<torch::Tensor>& bias) {
  auto ok = [](const torch::Tensor& t, c10::ScalarType dtype, int64_t n, int64_t alt) {
    return t.scalar_type() == dtype && t.is_contiguous() && (t.numel() == n || t.numel() == alt);
  };
  TORCH_CHECK(ok(x_zp, torch::kInt32, 1, M), what, ": x_zp must be contiguous int32 with 1 or ", M, " values");
  TORCH_CHECK(ok(x_scale, torch::kFloat32, 1, M), what, ": x_scale must be contiguous float32 with 1 or ", M, " values");
  TORCH_CHECK(ok(w_sum, torch::kInt32, N, N), what, ": w_sum must be contiguous int32 with ", N, " values");
  TORCH_CHECK(ok(w_scale, torch::kFloat32, N, N), what, ": w_scale must be contiguous float32 with ", N, " values");
  if (!bias.has_value()) return nullptr;
  TORCH_CHECK(ok(*bias, torch::kFloat32, N, N), what, ": bias must be contiguous float32 with ", N, " values");
  return bias->data_ptr<float>();
}

// Whether gemv_u8s8 was compiled with AVX-512 VNNI (the int8 GEMM and convs need it).
bool gemv_has_vnni();

// Which fast loop gemv_u8s8 was compiled with: "avx512_vnni", "avx2" (exact vpmaddwd on int16-widened
// operands) or "none" (a plain loop).
std::string gemv_isa();

// The graph operators (registered in fused.cpp as quanta_native::conv_packed / linear_packed):
// a settled conv plan's convolution (conv.cpp) and a settled int8 Linear (linear_op.cpp).
torch::Tensor conv_packed(const torch::Tensor& x, const torch::Tensor& wpack, const torch::Tensor& corr,
                          const torch::Tensor& mult, const torch::Tensor& bias, const torch::Tensor& pad,
                          c10::IntArrayRef params, double inv, double z);
torch::Tensor linear_packed(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& w_sum,
                            const torch::Tensor& w_scale, const c10::optional<torch::Tensor>& bias, int64_t qmin,
                            int64_t qmax, bool symmetric, double inv_scale, int64_t zero_point, double scale,
                            int64_t kernel, int64_t post_op);
// The int8 linear on a dense-packed weight (linear_op.cpp; the loop: conv_dense.cpp's dense_gemm).
torch::Tensor int8_gemm(const torch::Tensor& x, const torch::Tensor& x_zp, const torch::Tensor& x_scale,
                        const torch::Tensor& wpack, const torch::Tensor& w_sum, const torch::Tensor& w_scale,
                        const c10::optional<torch::Tensor>& bias, int64_t post_op);

// Static per-tensor uint8 quantization of a contiguous NCHW float32 x into channels-last codes
// (conv.cpp): what an integer conv's float input becomes in one pass.
torch::Tensor quantize_to_channels_last(const torch::Tensor& x, double inv, int64_t zero_point, int64_t qmin,
                                        int64_t qmax);

// Registers conv.cpp's ConvPlan with the Python module (called by fused.cpp's bindings).
void bind_conv(pybind11::module& m);

}  // namespace quanta_native
