// The AVX2 build's int8 linear (no VNNI): y = float32(Σ_k (x[m, k] - x_zp[m]) w[n, k]) * x_scale[m]
// * w_scale[n] (+ bias[n]), left to right in float32 -- rescale_rows' arithmetic (fused.cpp), so the
// reference's bits (kernels/linear.py: _rescale) -- for weights within +-64 (7-bit codes), where a
// vpmaddubsw pair sum of uint8 x int8 products cannot saturate (2 * 255 * 64 = 32640).
//
// Register tiles of kMR rows x 16 output channels (12 of the 16 ymm registers hold int32 sums), 4
// input channels per step: a row's 4 codes broadcast, vpmaddubsw + vpmaddwd against the block's 16
// channels' packed weights. Weights packed [N/16][K/4][16][4] (zero rows and columns padding N and K:
// kernels/linear_avx2.py's avx2_pack), each 16-channel block one contiguous panel. The sums start
// at -x_zp[m] * w_sum[n] (exact int32), so they end at the corrected sums. Tasks: a chunk of rows,
// whose uint8 codes the task writes first into its own buffer (the float input's quantization
// fused into the GEMM's first pass: the codes never go to memory as a tensor) x a range of blocks;
// a block's panel stays in L1 while the chunk's tiles read it. Signed codes are read as code + 128
// (zero point + 128): the same sums. The activation post_op (activation.h: the code apply_post_op_
// runs) goes over each tile's output rows while they are in L1, not as a second pass over [M, N].
#include "activation.h"
#include "common.h"
#include "tile_u8s8.h"

#include <cstring>

namespace quanta_native {

#if QUANTA_AVX2 && !QUANTA_VNNI
namespace {

constexpr int kMR = 6;                     // rows per register tile
constexpr int64_t kChunkBytes = 128 << 10;  // a chunk's codes, at most (where K allows): they stay in L2

struct LinearEpilogue {
  const int32_t* zp;  // uint8 codes' zero point, per row (zrow) or one
  bool zrow;
  const float* xs;  // activation scale, per row (srow) or one
  bool srow;
  const int32_t* ws;  // [N16 * 16], zero past N
  const float* wsc;   // [N16 * 16]
  const float* bias;  // [N16 * 16] or null
  float* out;         // row-major [M, N]
  int64_t N;
  int64_t post;  // post_op.h's code: none, relu, gelu, gelu tanh
};

inline void store_tail(float* y, int64_t n, __m256 v) {
  alignas(32) float b[8];
  _mm256_store_ps(b, v);
  std::memcpy(y, b, static_cast<size_t>(n) * 4);
}

// rescale_rows' arithmetic on 8 lanes: float32(a) * xs, then * wsc, then + bias; then ReLU where
// relu (activation.h's, in registers: what apply_post_op gives)
inline __m256 rescale8(__m256i a, __m256 xs, const float* wsc, const float* bias, bool relu) {
  __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(a), xs);
  v = _mm256_mul_ps(v, _mm256_loadu_ps(wsc));
  v = bias ? _mm256_add_ps(v, _mm256_loadu_ps(bias)) : v;
#if defined(QUANTA_ACT8)
  return relu ? act::apply8<kPostRelu>(v) : v;
#else
  return v;
#endif
}

// MR rows (codes at x + m * Kp, global rows m0 + m) x the 16 channels from o0; NV = 1: only the
// first 8 (a last block of at most 8 channels)
template <int MR, int NV>
void tile(const uint8_t* x, int64_t Kp, int64_t m0, const int8_t* w, int64_t o0, const LinearEpilogue& epilogue) {
  const LinearEpilogue e = epilogue;  // (a local copy: the output stores cannot alias its fields)
  const int64_t C4 = Kp / 4;
  __m256i acc[MR][2];
  const __m256i ws0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(e.ws + o0));
  const __m256i ws1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(e.ws + o0 + 8));
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) {
    const __m256i z = _mm256_set1_epi32(e.zp[e.zrow ? m0 + m : 0]);
    acc[m][0] = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_mullo_epi32(z, ws0));
    acc[m][1] = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_mullo_epi32(z, ws1));
  }
  const uint8_t* p[MR];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) p[m] = x + m * Kp;
  accumulate_tile_u8s8<MR, NV>(p, C4, w, acc);  // (tile_u8s8.h: exact for weights within +-64)
  const int64_t n = std::min<int64_t>(16, e.N - o0);
  const float* b0 = e.bias ? e.bias + o0 : nullptr;
  const float* b1 = e.bias ? e.bias + o0 + 8 : nullptr;
#if defined(QUANTA_ACT8)
  const bool relu = e.post == kPostRelu, rows_after = e.post != kPostNone && !relu;
#else
  const bool relu = false, rows_after = e.post != kPostNone;
#endif
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) {
    const __m256 xs = _mm256_set1_ps(e.xs[e.srow ? m0 + m : 0]);
    float* y = e.out + (m0 + m) * e.N + o0;
    const __m256 lo = rescale8(acc[m][0], xs, e.wsc + o0, b0, relu);
    if (n >= 8) {
      _mm256_storeu_ps(y, lo);
      if (n == 16)
        _mm256_storeu_ps(y + 8, rescale8(acc[m][1], xs, e.wsc + o0 + 8, b1, relu));
      else if (n > 8)
        store_tail(y + 8, n - 8, rescale8(acc[m][1], xs, e.wsc + o0 + 8, b1, relu));
    } else {
      store_tail(y, n, lo);
    }
    if (rows_after) apply_post_op(e.post, y, n);  // (GELU: the row's 16 values while in L1)
  }
}

using Tile = void (*)(const uint8_t*, int64_t, int64_t, const int8_t*, int64_t, const LinearEpilogue&);

template <int NV>
Tile tile_for(int64_t mr) {
  switch (mr) {
    case 1: return tile<1, NV>;
    case 2: return tile<2, NV>;
    case 3: return tile<3, NV>;
    case 4: return tile<4, NV>;
    case 5: return tile<5, NV>;
    default: return tile<6, NV>;
  }
}

// The GEMM over M rows; fill(r0, r1, buf) writes rows r0 .. r1 - 1's uint8 codes to buf, Kp bytes a
// row (the bytes past K zero).
template <class Fill>
void linear_gemm(int64_t M, int64_t K, const int8_t* wpack, const LinearEpilogue& e, const Fill& fill) {
  const int64_t Kp = (K + 3) / 4 * 4, NB = (e.N + 15) / 16, threads = at::get_num_threads();
  const int64_t tiles = (M + kMR - 1) / kMR;
  const int64_t fit = std::max<int64_t>(1, kChunkBytes / (Kp * kMR));
  // as few chunks as fit L2, a multiple of the thread count (at::parallel_for hands each thread one
  // contiguous range of tasks: equal chunks, equal work), each chunk reading every weight panel once
  int64_t chunks = std::max((tiles + fit - 1) / fit, threads);
  chunks = std::min(tiles, (chunks + threads - 1) / threads * threads);
  const int64_t chunk_tiles = (tiles + chunks - 1) / chunks;
  chunks = (tiles + chunk_tiles - 1) / chunk_tiles;
  // fewer row chunks than threads: the 16-channel blocks split too, so that every thread works
  const int64_t splits = std::min(NB, std::max<int64_t>(1, (threads + chunks - 1) / chunks));
  const int64_t per = (NB + splits - 1) / splits;
  at::parallel_for(0, chunks * splits, 1, [&](int64_t t0, int64_t t1) {
    std::vector<uint8_t> buf(static_cast<size_t>(chunk_tiles * kMR * Kp));
    int64_t filled = -1;
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t chunk = task / splits, split = task % splits;
      const int64_t r0 = chunk * chunk_tiles * kMR, r1 = std::min(M, r0 + chunk_tiles * kMR);
      if (filled != chunk) fill(r0, r1, buf.data()), filled = chunk;
      const int64_t b1 = std::min(NB, (split + 1) * per);
      for (int64_t b = split * per; b < b1; ++b) {
        const bool half = e.N - b * 16 <= 8;
        for (int64_t q = r0; q < r1; q += kMR) {
          const int64_t mr = std::min<int64_t>(kMR, r1 - q);
          (mr == kMR ? (half ? tile<kMR, 1> : tile<kMR, 2>) : half ? tile_for<1>(mr) : tile_for<2>(mr))(
              buf.data() + (q - r0) * Kp, Kp, q, wpack + b * Kp * 16, b * 16, e);
        }
      }
    }
  });
}

// [N16 * 16] copies of the per-channel epilogue vectors (zero past N): full-vector loads in tiles
struct PaddedEpilogue {
  std::vector<int32_t> ws;
  std::vector<float> wsc, bias;
  PaddedEpilogue(int64_t N, const torch::Tensor& w_sum, const torch::Tensor& w_scale, const float* b)
      : ws((N + 15) / 16 * 16, 0), wsc(ws.size(), 0.f), bias(b ? ws.size() : 0, 0.f) {
    std::memcpy(ws.data(), w_sum.data_ptr<int32_t>(), N * 4);
    std::memcpy(wsc.data(), w_scale.data_ptr<float>(), N * 4);
    if (b) std::memcpy(bias.data(), b, N * 4);
  }
};

void check_pack(const torch::Tensor& wpack, int64_t K, int64_t N, const char* what) {
  TORCH_CHECK(wpack.scalar_type() == torch::kInt8 && wpack.is_contiguous() && wpack.dim() == 4 &&
                  wpack.size(0) == (N + 15) / 16 && wpack.size(1) == (K + 3) / 4 && wpack.size(2) == 16 &&
                  wpack.size(3) == 4,
              what, ": wpack must be contiguous int8 [", (N + 15) / 16, ", ", (K + 3) / 4,
              ", 16, 4] (avx2_pack of an [", N, ", ", K, "] weight), got ", wpack.sizes());
}

}  // namespace
#endif  // QUANTA_AVX2 && !QUANTA_VNNI

bool linear_avx2_available() { return QUANTA_AVX2 && !QUANTA_VNNI; }

// From int8 or uint8 codes x [M, K] (row-major) with zero points x_zp (int32, 1 or M) and scales
// x_scale (float32, 1 or M): the float32 [M, N] above (then post_op: activation.h's apply_post_op, in
// tiles). int8 codes are read as code + 128.
torch::Tensor int8_linear_avx2(const torch::Tensor& x, const torch::Tensor& x_zp, const torch::Tensor& x_scale,
                               const torch::Tensor& wpack, const torch::Tensor& w_sum, const torch::Tensor& w_scale,
                               const c10::optional<torch::Tensor>& bias, int64_t post_op) {
  check_post_op("int8_linear_avx2", post_op);
  TORCH_CHECK(x.device().is_cpu() && (x.scalar_type() == torch::kInt8 || x.scalar_type() == torch::kUInt8) &&
                  x.dim() == 2 && x.stride(1) == 1 && x.stride(0) == x.size(1),
              "int8_linear_avx2: x must be row-major int8 / uint8 codes [M, K], got ", x.scalar_type(), " ", x.sizes());
  const int64_t M = x.size(0), K = x.size(1), N = w_scale.numel();
  const float* b = check_epilogue("int8_linear_avx2", M, N, x_zp, w_sum, x_scale, w_scale, bias);
  auto out = torch::empty({M, N}, x.options().dtype(torch::kFloat32));
#if QUANTA_AVX2 && !QUANTA_VNNI
  check_pack(wpack, K, N, "int8_linear_avx2");
  if (M == 0 || N == 0) return out;
  const bool flip = x.scalar_type() == torch::kInt8;
  std::vector<int32_t> zp(x_zp.data_ptr<int32_t>(), x_zp.data_ptr<int32_t>() + x_zp.numel());
  if (flip)
    for (auto& z : zp) z += 128;
  const PaddedEpilogue pe(N, w_sum, w_scale, b);
  const LinearEpilogue e{zp.data(), zp.size() > 1, x_scale.data_ptr<float>(), x_scale.numel() > 1, pe.ws.data(),
                         pe.wsc.data(), b ? pe.bias.data() : nullptr, out.data_ptr<float>(), N, post_op};
  const uint8_t* src = reinterpret_cast<const uint8_t*>(x.data_ptr());
  const int64_t Kp = (K + 3) / 4 * 4;
  const uint8_t mask = flip ? 0x80 : 0;
  linear_gemm(M, K, wpack.data_ptr<int8_t>(), e, [&](int64_t r0, int64_t r1, uint8_t* buf) {
    for (int64_t r = r0; r < r1; ++r) {
      uint8_t* d = buf + (r - r0) * Kp;
      const uint8_t* s = src + r * K;
      for (int64_t k = 0; k < K; ++k) d[k] = s[k] ^ mask;
      std::memset(d + K, 0, Kp - K);
    }
  });
#else
  TORCH_CHECK(false, "int8_linear_avx2: this build is not AVX2 without VNNI");
#endif
  return out;
}

// The float input's static per-tensor quantization (quantize_static's: clamp(round_half_even(x *
// inv) + zero_point, qmin, qmax), signed codes where qmin < 0) fused into int8_linear_avx2's first
// pass: the same codes, the same sums, the same float32 [M, N].
torch::Tensor quantized_linear_avx2(const torch::Tensor& x, double inv, int64_t zero_point, int64_t qmin, int64_t qmax,
                                    const torch::Tensor& x_scale, const torch::Tensor& wpack, const torch::Tensor& w_sum,
                                    const torch::Tensor& w_scale, const c10::optional<torch::Tensor>& bias,
                                    int64_t post_op) {
  check_float_input(x, "quantized_linear_avx2");
  check_post_op("quantized_linear_avx2", post_op);
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.stride(0) == x.size(1),
              "quantized_linear_avx2: x must be row-major [M, K]");
  TORCH_CHECK((qmin >= -128 && qmax <= 127 && qmin < qmax) || (qmin >= 0 && qmax <= 255 && qmin < qmax),
              "quantized_linear_avx2: codes must be 8-bit, got [", qmin, ", ", qmax, "]");
  const int64_t M = x.size(0), K = x.size(1), N = w_scale.numel();
  const bool flip = qmin < 0;
  auto zp_t = torch::full({1}, zero_point, x.options().dtype(torch::kInt32));
  const float* b = check_epilogue("quantized_linear_avx2", M, N, zp_t, w_sum, x_scale, w_scale, bias);
  TORCH_CHECK(x_scale.numel() == 1, "quantized_linear_avx2: x_scale must hold one value");
  auto out = torch::empty({M, N}, x.options());
#if QUANTA_AVX2 && !QUANTA_VNNI
  check_pack(wpack, K, N, "quantized_linear_avx2");
  if (M == 0 || N == 0) return out;
  const int32_t zp = static_cast<int32_t>(zero_point) + (flip ? 128 : 0);
  const PaddedEpilogue pe(N, w_sum, w_scale, b);
  const LinearEpilogue e{&zp, false, x_scale.data_ptr<float>(), false, pe.ws.data(), pe.wsc.data(),
                         b ? pe.bias.data() : nullptr, out.data_ptr<float>(), N, post_op};
  const float* src = x.data_ptr<float>();
  const int64_t Kp = (K + 3) / 4 * 4;
  const float finv = static_cast<float>(inv), z = static_cast<float>(zero_point);
  const float lo = static_cast<float>(qmin), hi = static_cast<float>(qmax);
  linear_gemm(M, K, wpack.data_ptr<int8_t>(), e, [&](int64_t r0, int64_t r1, uint8_t* buf) {
    for (int64_t r = r0; r < r1; ++r) {
      uint8_t* d = buf + (r - r0) * Kp;
      if (flip) {  // quantize_static's int8 codes, then read as code + 128
        quantize_span<int8_t>(src + r * K, reinterpret_cast<int8_t*>(d), K, finv, z, lo, hi);
        for (int64_t k = 0; k < K; ++k) d[k] ^= 0x80;
      } else {
        quantize_span<uint8_t>(src + r * K, d, K, finv, z, lo, hi);
      }
      std::memset(d + K, 0, Kp - K);
    }
  });
#else
  TORCH_CHECK(false, "quantized_linear_avx2: this build is not AVX2 without VNNI");
#endif
  return out;
}

}  // namespace quanta_native
