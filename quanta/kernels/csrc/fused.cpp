// quanta's fused CPU kernels: the element-wise work around an int8 GEMM done in one pass each,
// with exactly the float32 arithmetic of the Python implementations in quanta/kernels/activation.py and linear.py
// (compiled with -ffp-contract=off and without -ffast-math so that no operation is fused or
// reordered). Built on first use by quanta/kernels/native.py; every function has a
// pure-PyTorch twin that runs where this library cannot be built.
#include "common.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

using namespace quanta_native;


// Dynamic per-row (per-token) quantization of a row-major [M, K] float32 tensor:
// [codes [M, K] int8 / uint8, scale [M, 1] float32, zero_point [M, 1] int32], or [] when a row
// holds NaN / inf.
std::vector<torch::Tensor> quantize_rows(const torch::Tensor& x, int64_t qmin, int64_t qmax, bool symmetric,
                                         bool is_signed) {
  check_float_input(x, "quantize_rows");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.stride(0) == x.size(1), "quantize_rows: needs a row-major 2-D tensor");
  const int64_t M = x.size(0), K = x.size(1);
  auto codes = torch::empty({M, K}, x.options().dtype(is_signed ? torch::kInt8 : torch::kUInt8));
  auto scale = torch::empty({M, 1}, x.options());
  auto zp = torch::empty({M, 1}, x.options().dtype(torch::kInt32));
  const float lo = static_cast<float>(qmin), hi = static_cast<float>(qmax);
  const bool ok = is_signed
      ? quantize_rows_impl<int8_t>(x.data_ptr<float>(), codes.data_ptr<int8_t>(), scale.data_ptr<float>(),
                                   zp.data_ptr<int32_t>(), M, K, lo, hi, symmetric)
      : quantize_rows_impl<uint8_t>(x.data_ptr<float>(), codes.data_ptr<uint8_t>(), scale.data_ptr<float>(),
                                    zp.data_ptr<int32_t>(), M, K, lo, hi, symmetric);
  if (!ok) return {};
  return {codes, scale, zp};
}

// Static per-tensor quantization, clamp(round(x * inv) + zero_point), of a dense float32 tensor
// (any memory order: the codes keep x's strides).
torch::Tensor quantize_static(const torch::Tensor& x, double inv, int64_t zero_point, int64_t qmin, int64_t qmax,
                              bool is_signed) {
  check_float_input(x, "quantize_static");
  TORCH_CHECK(x.is_non_overlapping_and_dense(), "quantize_static: needs a dense tensor");
  auto codes = at::empty_like(x, x.options().dtype(is_signed ? torch::kInt8 : torch::kUInt8));
  TORCH_CHECK(codes.strides() == x.strides(), "quantize_static: could not keep the input's strides");
  const float* src = x.data_ptr<float>();
  const float finv = static_cast<float>(inv), z = static_cast<float>(zero_point);
  const float lo = static_cast<float>(qmin), hi = static_cast<float>(qmax);
  const int64_t n = x.numel();
  if (is_signed) {
    int8_t* dst = codes.data_ptr<int8_t>();
    at::parallel_for(0, n, 16384, [&](int64_t b, int64_t e) { quantize_span<int8_t>(src + b, dst + b, e - b, finv, z, lo, hi); });
  } else {
    uint8_t* dst = codes.data_ptr<uint8_t>();
    at::parallel_for(0, n, 16384, [&](int64_t b, int64_t e) { quantize_span<uint8_t>(src + b, dst + b, e - b, finv, z, lo, hi); });
  }
  return codes;
}

void quanta_native::rescale_rows_raw(int32_t* a, int64_t M, int64_t N, const int32_t* zp, bool zrow,
                                     const int32_t* ws, const float* xs, bool srow, const float* wsc, const float* b,
                                     int64_t post_op) {
  at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const int32_t z = zp[zrow ? m : 0];
      const float s = xs[srow ? m : 0];
      int32_t* row = a + m * N;
      float* out = reinterpret_cast<float*>(row);  // same memory: element n is read, then written
      const int64_t n_cols = N;
      if (b) {
#pragma omp simd
        for (int64_t n = 0; n < n_cols; ++n) {
          float v = static_cast<float>(row[n] - z * ws[n]) * s;
          v = v * wsc[n];
          out[n] = v + b[n];
        }
      } else {
#pragma omp simd
        for (int64_t n = 0; n < n_cols; ++n) {
          float v = static_cast<float>(row[n] - z * ws[n]) * s;
          out[n] = v * wsc[n];
        }
      }
      apply_post_op(post_op, out, n_cols);
    }
  });
}

// In place over a row-major int32 [M, N] accumulator: y = float32(acc - zp[m] * w_sum[n]) * x_scale[m]
// * w_scale[n] (+ bias[n]), left to right in float32, then the activation post_op (activation.h);
// returns acc's memory viewed as float32.
torch::Tensor rescale_rows(torch::Tensor acc, const torch::Tensor& x_zp, const torch::Tensor& w_sum,
                           const torch::Tensor& x_scale, const torch::Tensor& w_scale,
                           const c10::optional<torch::Tensor>& bias, int64_t post_op) {
  check_post_op("rescale_rows", post_op);
  TORCH_CHECK(acc.scalar_type() == torch::kInt32 && acc.dim() == 2 && acc.is_contiguous(), "rescale_rows: acc must be contiguous int32 [M, N]");
  const int64_t M = acc.size(0), N = acc.size(1);
  const float* b = check_epilogue("rescale_rows", M, N, x_zp, w_sum, x_scale, w_scale, bias);
  rescale_rows_raw(acc.data_ptr<int32_t>(), M, N, x_zp.data_ptr<int32_t>(), x_zp.numel() > 1, w_sum.data_ptr<int32_t>(),
                   x_scale.data_ptr<float>(), x_scale.numel() > 1, w_scale.data_ptr<float>(), b, post_op);
  return acc.view(torch::kFloat32);
}

// The activation post_op (post_op.h: 1 relu, 2 gelu, 3 gelu tanh; activation.h) in place over a contiguous
// float32 tensor: what rescale_rows / int8_gemv apply after their epilogue, for callers that
// rescale otherwise and for tests.
torch::Tensor apply_post_op_(torch::Tensor y, int64_t post_op) {
  check_float_input(y, "apply_post_op_");
  check_post_op("apply_post_op_", post_op);
  TORCH_CHECK(y.is_contiguous(), "apply_post_op_: needs a contiguous tensor");
  float* p = y.data_ptr<float>();
  at::parallel_for(0, y.numel(), 16384, [&](int64_t b, int64_t e) { apply_post_op(post_op, p + b, e - b); });
  return y;
}

// One span of `add_codes`: y = (a - za) * sa + (b - zb) * sb, the post-op (0 none, 1 ReLU, 2 ReLU6),
// then float32 y or uint8 codes clamp(round(y * inv) + zo, lo, hi).
template <typename T, int POST>
void add_span(const uint8_t* __restrict__ a, const uint8_t* __restrict__ b, T* __restrict__ out, int64_t n,
              float sa, float za, float sb, float zb, float inv, float zo, float lo, float hi) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) {
    float y = (static_cast<float>(a[k]) - za) * sa;
    const float yb = (static_cast<float>(b[k]) - zb) * sb;
    y = y + yb;
    if (POST == kPostRelu || POST == kPostRelu6) y = y < 0.f ? 0.f : y;
    if (POST == kPostRelu6) y = y > 6.f ? 6.f : y;
    if constexpr (std::is_same_v<T, uint8_t>) {
      float q = round_half_even(y * inv) + zo;
      q = q < lo ? lo : (q > hi ? hi : q);
      out[k] = static_cast<uint8_t>(static_cast<int32_t>(q));
    } else {
      out[k] = y;
    }
  }
}

#if QUANTA_VNNI
// add_span for uint8 output, 16 codes at a time with AVX-512: the same float32 operations, in the
// same order (the compiler leaves the scalar loop's uint8 -> float conversions unvectorized).
template <int POST>
void add_span_u8(const uint8_t* __restrict__ a, const uint8_t* __restrict__ b, uint8_t* __restrict__ out, int64_t n,
                 float sa, float za, float sb, float zb, float inv, float zo, float lo, float hi) {
  const __m512 vsa = _mm512_set1_ps(sa), vza = _mm512_set1_ps(za), vsb = _mm512_set1_ps(sb), vzb = _mm512_set1_ps(zb);
  const __m512 vinv = _mm512_set1_ps(inv), vzo = _mm512_set1_ps(zo), vlo = _mm512_set1_ps(lo), vhi = _mm512_set1_ps(hi);
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) {
    const __m512 fa = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a + k))));
    const __m512 fb = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + k))));
    __m512 y = _mm512_mul_ps(_mm512_sub_ps(fa, vza), vsa);
    y = _mm512_add_ps(y, _mm512_mul_ps(_mm512_sub_ps(fb, vzb), vsb));
    if (POST == kPostRelu || POST == kPostRelu6) y = _mm512_max_ps(y, _mm512_setzero_ps());
    if (POST == kPostRelu6) y = _mm512_min_ps(y, _mm512_set1_ps(6.f));
    __m512 q = _mm512_roundscale_ps(_mm512_mul_ps(y, vinv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    q = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(q, vzo), vlo), vhi);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + k), _mm512_cvtusepi32_epi8(_mm512_cvttps_epi32(q)));
  }
  add_span<uint8_t, POST>(a + k, b + k, out + k, n - k, sa, za, sb, zb, inv, zo, lo, hi);
}
#elif QUANTA_AVX2
// add_span for uint8 output on AVX2, 16 codes at a time as two 8-lane halves: the same float32
// operations in the same order up to y (the scalar loop is left unvectorized: 0.6 ns a code, ~8x
// slower). Then, as the conv epilogue (conv_kernels.h's rounded8): the conversion is the rounding
// (NearestRounding, held by add_all's tasks), ReLU's max(y, 0) is the codes' floor zo (y -> y * inv
// keeps signs and rounds monotonically) and ReLU6's min(y, 6) a top of min(6 inv, hi - zo) before
// rounding; the zero point is added and the codes clamped by saturating packs, which is the clamp to
// [lo, hi] where that is [0, 255] (Int8Add's; add_all runs the scalar loop otherwise): the same codes.
template <int POST>
inline __m256i add8_rounded(const uint8_t* a, const uint8_t* b, __m256 vsa, __m256 vza, __m256 vsb, __m256 vzb,
                            __m256 vinv, __m256 top) {
  const __m256 fa = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(a))));
  const __m256 fb = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b))));
  __m256 y = _mm256_mul_ps(_mm256_sub_ps(fa, vza), vsa);
  y = _mm256_add_ps(y, _mm256_mul_ps(_mm256_sub_ps(fb, vzb), vsb));
  return _mm256_cvtps_epi32(_mm256_min_ps(_mm256_mul_ps(y, vinv), top));
}

template <int POST>
void add_span_u8(const uint8_t* __restrict__ a, const uint8_t* __restrict__ b, uint8_t* __restrict__ out, int64_t n,
                 float sa, float za, float sb, float zb, float inv, float zo, float lo, float hi) {
  const __m256 vsa = _mm256_set1_ps(sa), vza = _mm256_set1_ps(za), vsb = _mm256_set1_ps(sb), vzb = _mm256_set1_ps(zb);
  const __m256 vinv = _mm256_set1_ps(inv);
  const __m256 top = _mm256_set1_ps(POST == kPostRelu6 ? std::min(6.f * inv, 255.f - zo) : 255.f - zo);
  const __m256i z16 = _mm256_set1_epi16(static_cast<int16_t>(zo));
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) {
    const __m256i i0 = add8_rounded<POST>(a + k, b + k, vsa, vza, vsb, vzb, vinv, top);
    const __m256i i1 = add8_rounded<POST>(a + k + 8, b + k + 8, vsa, vza, vsb, vzb, vinv, top);
    // [i0 0-3, i1 0-3 | i0 4-7, i1 4-7] + zo (int16, saturating), the floor, -> [i0 0-7 | i1 0-7] -> bytes
    __m256i w = _mm256_adds_epi16(_mm256_packs_epi32(i0, i1), z16);
    if (POST == kPostRelu || POST == kPostRelu6) w = _mm256_max_epi16(w, z16);
    w = _mm256_permute4x64_epi64(w, 0xD8);
    const __m256i c = _mm256_packus_epi16(w, w);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + k),
                     _mm_unpacklo_epi64(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1)));
  }
  add_span<uint8_t, POST>(a + k, b + k, out + k, n - k, sa, za, sb, zb, inv, zo, lo, hi);
}
#endif

template <typename T, int POST>
void add_all(const uint8_t* a, const uint8_t* b, T* out, int64_t n, float sa, float za, float sb, float zb,
             float inv, float zo, float lo, float hi) {
  at::parallel_for(0, n, 16384, [=](int64_t begin, int64_t end) {
#if QUANTA_VNNI || QUANTA_AVX2
    const NearestRounding rounding;  // (each worker's own MXCSR)
    if constexpr (std::is_same_v<T, uint8_t>) {
      if (QUANTA_VNNI || (lo == 0.f && hi == 255.f)) {  // (AVX2: the packs' saturation is the clamp)
        add_span_u8<POST>(a + begin, b + begin, out + begin, end - begin, sa, za, sb, zb, inv, zo, lo, hi);
        return;
      }
    }
#endif
    add_span<T, POST>(a + begin, b + begin, out + begin, end - begin, sa, za, sb, zb, inv, zo, lo, hi);
  });
}

template <typename T>
void add_dispatch(int64_t post_op, const uint8_t* a, const uint8_t* b, T* out, int64_t n, float sa, float za,
                  float sb, float zb, float inv, float zo, float lo, float hi) {
  if (post_op == kPostRelu) add_all<T, kPostRelu>(a, b, out, n, sa, za, sb, zb, inv, zo, lo, hi);
  else if (post_op == kPostRelu6) add_all<T, kPostRelu6>(a, b, out, n, sa, za, sb, zb, inv, zo, lo, hi);
  else add_all<T, kPostNone>(a, b, out, n, sa, za, sb, zb, inv, zo, lo, hi);
}

// Residual addition of two uint8 code tensors of the same shape and memory order (each on its
// own grid): y = (float(a) - za) * sa + (float(b) - zb) * sb, then ReLU / ReLU6 if asked (post_op.h), then
// float32 y, or uint8 codes clamp(round(y * out_inv) + out_zp, lo, hi) when out_inv > 0.
torch::Tensor add_codes(const torch::Tensor& a, double sa, int64_t za, const torch::Tensor& b, double sb, int64_t zb,
                        int64_t post_op, double out_inv, int64_t out_zp, int64_t lo, int64_t hi) {
  TORCH_CHECK(a.scalar_type() == torch::kUInt8 && b.scalar_type() == torch::kUInt8, "add_codes: needs uint8 codes");
  TORCH_CHECK(a.sizes() == b.sizes() && a.strides() == b.strides() && a.is_non_overlapping_and_dense(),
              "add_codes: needs two dense tensors of the same shape and strides");
  TORCH_CHECK(clamp_post_op_ok(post_op), "add_codes: post_op must be 0 (none), 1 (relu) or 4 (relu6), got ", post_op);
  const bool codes_out = out_inv > 0;
  auto out = at::empty_like(a, a.options().dtype(codes_out ? torch::kUInt8 : torch::kFloat32));
  TORCH_CHECK(out.strides() == a.strides(), "add_codes: could not keep the input's strides");
#if QUANTA_VNNI || QUANTA_AVX2
  const NearestRounding rounding;  // (the float32 arguments below are rounded to nearest, as in Python)
#endif
  const float args[] = {static_cast<float>(sa), static_cast<float>(za), static_cast<float>(sb),
                        static_cast<float>(zb), static_cast<float>(out_inv), static_cast<float>(out_zp),
                        static_cast<float>(lo), static_cast<float>(hi)};
  if (codes_out)
    add_dispatch<uint8_t>(post_op, a.data_ptr<uint8_t>(), b.data_ptr<uint8_t>(), out.data_ptr<uint8_t>(), a.numel(),
                          args[0], args[1], args[2], args[3], args[4], args[5], args[6], args[7]);
  else
    add_dispatch<float>(post_op, a.data_ptr<uint8_t>(), b.data_ptr<uint8_t>(), out.data_ptr<float>(), a.numel(),
                        args[0], args[1], args[2], args[3], args[4], args[5], args[6], args[7]);
  return out;
}

// 2d max pooling of channels-last uint8 codes [N, C, H, W] (memory order N, H, W, C), windows
// without ceil mode; padding never wins (it is outside the window's valid taps). A window with no
// tap inside the image (dilated pooling) gives the lowest code, 0, as float max pooling gives -inf.
torch::Tensor max_pool2d_codes(const torch::Tensor& x, c10::IntArrayRef kernel, c10::IntArrayRef stride,
                               c10::IntArrayRef padding, c10::IntArrayRef dilation) {
  TORCH_CHECK(x.scalar_type() == torch::kUInt8 && x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "max_pool2d_codes: needs channels-last uint8 [N, C, H, W]");
  TORCH_CHECK(kernel.size() == 2 && stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "max_pool2d_codes: 2 values per argument");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t kh = kernel[0], kw = kernel[1], sh = stride[0], sw = stride[1];
  const int64_t ph = padding[0], pw = padding[1], dh = dilation[0], dw = dilation[1];
  const int64_t OH = (H + 2 * ph - dh * (kh - 1) - 1) / sh + 1, OW = (W + 2 * pw - dw * (kw - 1) - 1) / sw + 1;
  TORCH_CHECK(OH > 0 && OW > 0, "max_pool2d_codes: empty output");
  auto out = torch::empty({N, C, OH, OW}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const uint8_t* src = x.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, N * OH, 1, [&](int64_t begin, int64_t end) {
    std::vector<const uint8_t*> taps(kh * kw);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / OH, oh = r % OH;
      for (int64_t ow = 0; ow < OW; ++ow) {
        uint8_t* __restrict__ o = dst + ((n * OH + oh) * OW + ow) * C;
        int64_t T = 0;  // the window's taps inside the image
        for (int64_t i = 0; i < kh; ++i) {
          const int64_t h = oh * sh - ph + i * dh;
          if (h < 0 || h >= H) continue;
          for (int64_t j = 0; j < kw; ++j) {
            const int64_t w = ow * sw - pw + j * dw;
            if (w >= 0 && w < W) taps[T++] = src + ((n * H + h) * W + w) * C;
          }
        }
        if (T == 0) {  // wholly in the padding
          std::memset(o, 0, C);
          continue;
        }
#if QUANTA_VNNI
        for (int64_t c = 0; c < C; c += 64) {  // 64 channels in a register across the taps
          const __mmask64 m = C - c >= 64 ? ~__mmask64(0) : ((__mmask64(1) << (C - c)) - 1);
          __m512i v = _mm512_maskz_loadu_epi8(m, taps[0] + c);
          for (int64_t t = 1; t < T; ++t) v = _mm512_max_epu8(v, _mm512_maskz_loadu_epi8(m, taps[t] + c));
          _mm512_mask_storeu_epi8(o + c, m, v);
        }
#else
        int64_t c0 = 0;
#if QUANTA_AVX2
        for (; c0 + 32 <= C; c0 += 32) {  // 32 channels in a register across the taps
          __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(taps[0] + c0));
          for (int64_t t = 1; t < T; ++t)
            v = _mm256_max_epu8(v, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(taps[t] + c0)));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + c0), v);
        }
        if (c0 == C) continue;
#endif
        std::memcpy(o + c0, taps[0] + c0, C - c0);
        for (int64_t t = 1; t < T; ++t) {
          const uint8_t* __restrict__ p = taps[t];
#pragma omp simd
          for (int64_t c = c0; c < C; ++c) o[c] = p[c] > o[c] ? p[c] : o[c];
        }
#endif
      }
    }
  });
  return out;
}

// gemv.cpp
torch::Tensor int8_gemv(const torch::Tensor& x, const torch::Tensor& x_zp, const torch::Tensor& w,
                        const torch::Tensor& w_sum, const torch::Tensor& x_scale, const torch::Tensor& w_scale,
                        const c10::optional<torch::Tensor>& bias, int64_t post_op,
                        const c10::optional<torch::Tensor>& w_packed);
torch::Tensor int8_row_sums(const torch::Tensor& w);
torch::Tensor huge_page_copy(const torch::Tensor& t);
torch::Tensor int8_pack_rows4(const torch::Tensor& w);
// recurrent.cpp
bool rnn_layer_available();
std::vector<torch::Tensor> rnn_layer(const std::string& mode, const torch::Tensor& gi, std::vector<torch::Tensor> state,
                                     const torch::Tensor& w_hh, const torch::Tensor& s_hh,
                                     const torch::Tensor& b_hh, const torch::Tensor& w_sum, int64_t qmin, int64_t qmax,
                                     bool symmetric, bool is_signed, bool reverse,
                                     const c10::optional<torch::Tensor>& w_packed);

// linear_avx2.cpp
namespace quanta_native {
bool linear_avx2_available();
torch::Tensor int8_linear_avx2(const torch::Tensor& x, const torch::Tensor& x_zp, const torch::Tensor& x_scale,
                               const torch::Tensor& wpack, const torch::Tensor& w_sum, const torch::Tensor& w_scale,
                               const c10::optional<torch::Tensor>& bias, int64_t post_op);
torch::Tensor quantized_linear_avx2(const torch::Tensor& x, double inv, int64_t zero_point, int64_t qmin, int64_t qmax,
                                    const torch::Tensor& x_scale, const torch::Tensor& wpack, const torch::Tensor& w_sum,
                                    const torch::Tensor& w_scale, const c10::optional<torch::Tensor>& bias,
                                    int64_t post_op);
}  // namespace quanta_native

// attention.cpp
namespace quanta_native {
at::Tensor attention_f32(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const c10::optional<at::Tensor>& mask, double scale);
}  // namespace quanta_native

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int8_gemv", &int8_gemv, "int8 x int8 linear for a few rows (AVX-512 VNNI), rescaled like rescale_rows",
        py::arg("x"), py::arg("x_zp"), py::arg("w"), py::arg("w_sum"), py::arg("x_scale"), py::arg("w_scale"),
        py::arg("bias"), py::arg("post_op") = 0, py::arg("w_packed") = py::none());
  m.def("int8_gemm", &quanta_native::int8_gemm,
        "int8 x int8 linear on a dense-packed weight (AVX-512 VNNI), rescaled like rescale_rows", py::arg("x"),
        py::arg("x_zp"), py::arg("x_scale"), py::arg("wpack"), py::arg("w_sum"), py::arg("w_scale"), py::arg("bias"),
        py::arg("post_op") = 0);
  m.def("huge_page_copy", &huge_page_copy, "contiguous copy in memory advised for transparent huge pages");
  m.def("int8_row_sums", &int8_row_sums, "sum over each row of an int8 matrix, int32");
  m.def("gemv_has_vnni", &gemv_has_vnni, "whether int8_gemv was compiled with AVX-512 VNNI");
  m.def("gemv_isa", &gemv_isa, "the fast loop int8_gemv was compiled with: avx512_vnni, avx2 or none");
  m.def("rnn_layer_available", &rnn_layer_available, "whether rnn_layer can run on this build");
  m.def("rnn_layer", &rnn_layer, "one layer and direction of a dynamic int8 LSTM / GRU / RNN", py::arg("mode"),
        py::arg("gi"), py::arg("state"), py::arg("w_hh"), py::arg("s_hh"), py::arg("b_hh"), py::arg("w_sum"),
        py::arg("qmin"), py::arg("qmax"), py::arg("symmetric"), py::arg("is_signed"), py::arg("reverse"),
        py::arg("w_packed") = py::none());
  m.def("int8_pack_rows4", &int8_pack_rows4, "int8 [N, K] re-laid out for the recurrent loop's AVX2 gemv");
  m.def("max_pool2d_codes", &max_pool2d_codes, "2d max pooling of channels-last uint8 codes");
  m.def("add_codes", &add_codes, "residual addition of uint8 codes");
  m.def("quantize_rows", &quantize_rows, "dynamic per-row quantization");
  m.def("quantize_static", &quantize_static, "static per-tensor quantization");
  m.def("rescale_rows", &rescale_rows, "int32 accumulator -> float32 output, in place", py::arg("acc"),
        py::arg("x_zp"), py::arg("w_sum"), py::arg("x_scale"), py::arg("w_scale"), py::arg("bias"),
        py::arg("post_op") = 0);
  m.def("apply_post_op_", &apply_post_op_, "activation post-op (post_op.h: 1 relu, 2 gelu, 3 gelu tanh) in place");
  m.def("linear_avx2_available", &quanta_native::linear_avx2_available,
        "whether int8_linear_avx2 runs here (an AVX2 build without VNNI)");
  m.def("int8_linear_avx2", &quanta_native::int8_linear_avx2,
        "int8 linear of codes on an avx2_pack weight (|w| <= 64), rescaled like rescale_rows", py::arg("x"),
        py::arg("x_zp"), py::arg("x_scale"), py::arg("wpack"), py::arg("w_sum"), py::arg("w_scale"),
        py::arg("bias"), py::arg("post_op") = 0);
  m.def("quantized_linear_avx2", &quanta_native::quantized_linear_avx2,
        "static per-tensor quantization fused into int8_linear_avx2", py::arg("x"), py::arg("inv"),
        py::arg("zero_point"), py::arg("qmin"), py::arg("qmax"), py::arg("x_scale"), py::arg("wpack"),
        py::arg("w_sum"), py::arg("w_scale"), py::arg("bias"), py::arg("post_op") = 0);
  bind_conv(m);
}

// The graph operators, for compiled graphs (settled convs and Linears, residual additions and
// max-pooling of uint8 codes, static quantization of a float input): a call from an inductor wrapper goes straight to C++
// (no Python per call), to the same functions the eager calls run. Their fake (shape) kernels are
// registered from Python (kernels/conv_native.py, kernels/linear_native.py).
TORCH_LIBRARY(quanta_native, m) {
  m.def("conv_packed(Tensor x, Tensor wpack, Tensor corr, Tensor mult, Tensor bias, Tensor pad, int[] params, "
        "float inv, float z) -> Tensor");
  m.def("linear_packed(Tensor x, Tensor w, Tensor w_sum, Tensor w_scale, Tensor? bias, int qmin, int qmax, "
        "bool symmetric, float inv_scale, int zero_point, float scale, int kernel, int post_op) -> Tensor");
  m.def("add_codes(Tensor a, float sa, int za, Tensor b, float sb, int zb, int post_op, float out_inv, int out_zp, "
        "int lo, int hi) -> Tensor");
  m.def("max_pool2d_codes(Tensor x, int[] kernel, int[] stride, int[] padding, int[] dilation) -> Tensor");
  m.def("quantize_static(Tensor x, float inv, int zero_point, int qmin, int qmax, bool is_signed) -> Tensor");
  m.def("quantize_to_channels_last(Tensor x, float inv, int zero_point, int qmin, int qmax) -> Tensor");
  m.def("attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(quanta_native, CPU, m) {
  m.impl("conv_packed", &quanta_native::conv_packed);
  m.impl("linear_packed", &quanta_native::linear_packed);
  m.impl("add_codes", &add_codes);
  m.impl("max_pool2d_codes", &max_pool2d_codes);
  m.impl("quantize_static", &quantize_static);
  m.impl("quantize_to_channels_last", &quanta_native::quantize_to_channels_last);
  m.impl("attention", &quanta_native::attention_f32);
}
