// int8 x int8 products for a few activation rows (decoding, recurrent steps): exact int32 sums
// with AVX-512 VNNI (vpdpbusd: four uint8 x int8 products added into each int32 lane, no
// intermediate saturation), or on AVX2 with both operands widened to int16 and vpmaddwd (pairs of
// int16 products summed into int32: |255 * 128| * 2 fits, exact for full 8-bit weights; vpmaddubsw
// would saturate its int16 pair sums). PyTorch's CPU `_int_mm` is tuned for GEMMs and, at one to a few
// rows, reads the weight more slowly than this streaming loop (measured in kernels/linear.py).
#include "common.h"

#include <sys/mman.h>

#include <cstdlib>
#include <cstring>
#include <string>
#if defined(__AVX2__)
#include <immintrin.h>
#endif


namespace quanta_native {

bool gemv_has_vnni() { return QUANTA_VNNI; }

std::string gemv_isa() {
#if QUANTA_VNNI
  return "avx512_vnni";
#elif defined(__AVX2__)
  return "avx2";
#else
  return "none";
#endif
}

namespace {

constexpr int64_t kRows = 4;    // activation rows per pass over the weight
constexpr int64_t kBlock = 16;  // weight rows per parallel task unit

// Plain sums of rows [n0, n1) for activation rows [0, MR): the kernel on CPUs without VNNI.
[[maybe_unused]] void sums_plain(const uint8_t* x, int64_t MR, int64_t K, const int8_t* w, int64_t N, int32_t* acc, uint8_t flip,
                int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < MR; ++m) {
      int32_t s = 0;
      const uint8_t* xr = x + m * K;
      const int8_t* wr = w + n * K;
      for (int64_t k = 0; k < K; ++k) s += static_cast<int32_t>(static_cast<uint8_t>(xr[k] ^ flip)) * wr[k];
      acc[m * N + n] = s;
    }
}

#if QUANTA_VNNI
// Sums of weight rows [n0, n1) against MR (<= 4) activation rows, one weight row at a time: the
// weight is read as one sequential stream (rows are contiguous), each 64-byte chunk once for all
// MR activation rows, into two accumulators per activation row (even / odd chunks). Measured
// against 4 interleaved weight rows (4 streams): 4 x 4096^2 from DRAM 2.20 -> 1.90 ms, and no
// slower on L2-resident weights.
template <int MR>
void sums_vnni(const uint8_t* x, int64_t K, const int8_t* w, int64_t N, int32_t* acc, uint8_t flip, int64_t n0,
               int64_t n1) {
  const int64_t K64 = K / 64 * 64, K128 = K / 128 * 128;
  const __mmask64 tail = K64 < K ? (~0ULL >> (64 - (K - K64))) : 0;
  const __m512i flipv = _mm512_set1_epi8(static_cast<char>(flip));
  auto xv = [&](int m, int64_t k) { return _mm512_xor_si512(_mm512_loadu_si512(x + m * K + k), flipv); };
  for (int64_t n = n0; n < n1; ++n) {
    __m512i a[MR][2];
    for (int m = 0; m < MR; ++m) a[m][0] = a[m][1] = _mm512_setzero_si512();
    const int8_t* wr = w + n * K;
    for (int64_t k = 0; k < K128; k += 128) {
      const __m512i w0 = _mm512_loadu_si512(wr + k), w1 = _mm512_loadu_si512(wr + k + 64);
      for (int m = 0; m < MR; ++m) {
        a[m][0] = _mm512_dpbusd_epi32(a[m][0], xv(m, k), w0);
        a[m][1] = _mm512_dpbusd_epi32(a[m][1], xv(m, k + 64), w1);
      }
    }
    if (K128 < K64) {
      const __m512i w0 = _mm512_loadu_si512(wr + K128);
      for (int m = 0; m < MR; ++m) a[m][0] = _mm512_dpbusd_epi32(a[m][0], xv(m, K128), w0);
    }
    if (tail) {  // masked loads read zeros past K: they add nothing
      const __m512i w0 = _mm512_maskz_loadu_epi8(tail, wr + K64);
      for (int m = 0; m < MR; ++m) {
        const __m512i xt = _mm512_maskz_mov_epi8(tail, _mm512_xor_si512(_mm512_maskz_loadu_epi8(tail, x + m * K + K64), flipv));
        a[m][1] = _mm512_dpbusd_epi32(a[m][1], xt, w0);
      }
    }
    for (int m = 0; m < MR; ++m) acc[m * N + n] = _mm512_reduce_add_epi32(_mm512_add_epi32(a[m][0], a[m][1]));
  }
}
#endif

#if !QUANTA_VNNI && defined(__AVX2__)
// AVX2 (no VNNI). Per 32 columns a weight row is one 32-byte load split into its even and odd bytes,
// each sign-extended in its int16 lane (shifts: no shuffle); the activation rows are widened once per
// call into the matching layout (`widen_rows`), so one vpmaddwd per half adds 16 exact products into
// 8 int32 lanes.
constexpr int64_t kCols = 32;

inline int64_t padded(int64_t K) { return (K + kCols - 1) / kCols * kCols; }

// xw [MR, padded(K)] int16: per block of 32 columns the 16 even columns, then the 16 odd ones, of
// (x ^ flip) read as uint8 (the low and the high byte of each 16-bit lane). Past K the values are
// whatever the padding gives: they meet the zero-padded weight tail, adding nothing.
void widen_rows(const uint8_t* x, int64_t MR, int64_t K, uint8_t flip, int16_t* xw) {
  const int64_t Kp = padded(K);
  const __m256i flipv = _mm256_set1_epi8(static_cast<char>(flip)), low = _mm256_set1_epi16(0xFF);
  for (int64_t m = 0; m < MR; ++m)
    for (int64_t k = 0; k < Kp; k += kCols) {
      __m256i v;
      if (k + kCols <= K) {
        v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + m * K + k));
      } else {
        alignas(32) uint8_t tail[kCols] = {};
        std::memcpy(tail, x + m * K + k, K - k);
        v = _mm256_load_si256(reinterpret_cast<const __m256i*>(tail));
      }
      v = _mm256_xor_si256(v, flipv);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(xw + m * Kp + k), _mm256_and_si256(v, low));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(xw + m * Kp + k + 16), _mm256_srli_epi16(v, 8));
    }
}

template <int MR>
inline void block_avx2(__m256i wv, const int16_t* xw, int64_t Kp, int64_t k, __m256i (&a)[MR][2]) {
  const __m256i we = _mm256_srai_epi16(_mm256_slli_epi16(wv, 8), 8), wo = _mm256_srai_epi16(wv, 8);
  for (int m = 0; m < MR; ++m) {
    const __m256i* xr = reinterpret_cast<const __m256i*>(xw + m * Kp + k);
    a[m][0] = _mm256_add_epi32(a[m][0], _mm256_madd_epi16(we, _mm256_loadu_si256(xr)));
    a[m][1] = _mm256_add_epi32(a[m][1], _mm256_madd_epi16(wo, _mm256_loadu_si256(xr + 1)));
  }
}

inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// Sums of weight rows [n0, n1) against MR (<= 4) widened activation rows, one weight row at a time
// (one sequential stream, each 32-byte chunk read once for all MR rows), as sums_vnni.
template <int MR>
void sums_avx2(const int16_t* xw, int64_t K, const int8_t* w, int64_t N, int32_t* acc, int64_t n0, int64_t n1) {
  const int64_t K32 = K / kCols * kCols, Kp = padded(K);
  for (int64_t n = n0; n < n1; ++n) {
    __m256i a[MR][2];
    for (int m = 0; m < MR; ++m) a[m][0] = a[m][1] = _mm256_setzero_si256();
    const int8_t* wr = w + n * K;
    for (int64_t k = 0; k < K32; k += kCols)
      block_avx2<MR>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + k)), xw, Kp, k, a);
    if (K32 < K) {  // the tail: a zero-padded copy (never a read past the row)
      alignas(32) int8_t tail[kCols] = {};
      std::memcpy(tail, wr + K32, K - K32);
      block_avx2<MR>(_mm256_load_si256(reinterpret_cast<const __m256i*>(tail)), xw, Kp, K32, a);
    }
    for (int m = 0; m < MR; ++m) acc[m * N + n] = hsum_epi32(_mm256_add_epi32(a[m][0], a[m][1]));
  }
}
#endif

void sums_rows(const uint8_t* x, int64_t MR, int64_t K, const int8_t* w, int64_t N, int32_t* acc, uint8_t flip,
               int64_t n0, int64_t n1) {
#if QUANTA_VNNI
  switch (MR) {
    case 1: return sums_vnni<1>(x, K, w, N, acc, flip, n0, n1);
    case 2: return sums_vnni<2>(x, K, w, N, acc, flip, n0, n1);
    case 3: return sums_vnni<3>(x, K, w, N, acc, flip, n0, n1);
    default: return sums_vnni<4>(x, K, w, N, acc, flip, n0, n1);
  }
#elif defined(__AVX2__)
  thread_local std::vector<int16_t> xw;  // (a few KiB per thread, reused)
  xw.resize(static_cast<size_t>(MR * padded(K)));
  widen_rows(x, MR, K, flip, xw.data());
  switch (MR) {
    case 1: return sums_avx2<1>(xw.data(), K, w, N, acc, n0, n1);
    case 2: return sums_avx2<2>(xw.data(), K, w, N, acc, n0, n1);
    case 3: return sums_avx2<3>(xw.data(), K, w, N, acc, n0, n1);
    default: return sums_avx2<4>(xw.data(), K, w, N, acc, n0, n1);
  }
#else
  sums_plain(x, MR, K, w, N, acc, flip, n0, n1);
#endif
}

}  // namespace

void gemv_u8s8_rows(const uint8_t* x, int64_t M, int64_t K, const int8_t* w, int64_t N, int32_t* acc, uint8_t flip,
                    int64_t n0, int64_t n1) {
  for (int64_t m = 0; m < M; m += kRows) sums_rows(x + m * K, std::min(kRows, M - m), K, w, N, acc + m * N, flip, n0, n1);
}

void gemv_u8s8(const uint8_t* x, int64_t M, int64_t K, const int8_t* w, int64_t N, int32_t* acc, uint8_t flip) {
  const int64_t blocks = (N + kBlock - 1) / kBlock;
  // a task reads at least ~64 KiB of weights: small layers run on one thread (no fork / join)
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, kBlock * K));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    gemv_u8s8_rows(x, M, K, w, N, acc, flip, b0 * kBlock, std::min(N, b1 * kBlock));
  });
}


// ---- The recurrent loop's gemv on AVX2: weights re-laid out once (int8_pack_rows4), 4 rows per pass.
// Layout: rows in groups of 4 (the last group padded with zero rows), K padded to a multiple of 16 with
// zeros; per group and per 16 columns the 16 bytes of row 0, then rows 1, 2, 3 (64 bytes): one
// sequential stream gives 4 rows' sums, each 16 weights sign-extended by one vpmovsxbw and multiplied
// by the activation row widened once to int16 in its natural order (one vpmaddwd: 16 exact products
// into 8 int32 lanes), and the 4 rows' horizontal sums are 3 vphaddd. Measured (AMD EPYC, one thread,
// 2048 x 512 weights, min ns per 32 weights): 0.65 vs 0.92 for sums_avx2's row-by-row loop, 0.56 vs 0.88
// when the weight is L2-resident.

int64_t pack4_cols(int64_t K) { return (K + 15) / 16 * 16; }

int64_t pack4_bytes(int64_t N, int64_t K) { return (N + 3) / 4 * 4 * pack4_cols(K); }

void pack_rows4(const int8_t* w, int64_t N, int64_t K, int8_t* out) {
  const int64_t Kp = pack4_cols(K);
  std::memset(out, 0, static_cast<size_t>(pack4_bytes(N, K)));
  for (int64_t n = 0; n < N; ++n) {
    int8_t* g = out + (n / 4) * 4 * Kp + (n % 4) * 16;
    for (int64_t k = 0; k < K; ++k) g[(k / 16) * 64 + (k % 16)] = w[n * K + k];
  }
}

void widen_codes(const uint8_t* x, int64_t M, int64_t K, uint8_t flip, int16_t* x16) {
  const int64_t Kp = pack4_cols(K);
  for (int64_t m = 0; m < M; ++m) {
    int64_t k0 = 0;
#if defined(__AVX2__)
    const __m128i flipv = _mm_set1_epi8(static_cast<char>(flip));
    for (; k0 + 16 <= K; k0 += 16) {
      const __m128i v = _mm_xor_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + m * K + k0)), flipv);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(x16 + m * Kp + k0), _mm256_cvtepu8_epi16(v));
    }
#endif
    for (int64_t k = k0; k < K; ++k) x16[m * Kp + k] = static_cast<uint8_t>(x[m * K + k] ^ flip);
    for (int64_t k = K; k < Kp; ++k) x16[m * Kp + k] = 0;
  }
}

namespace {

// the sums of one 4-row group: rows 4g + r whose index lies in [n0, n1) are stored
inline void store_group(const int32_t* s, int64_t g, int32_t* acc, int64_t n0, int64_t n1) {
  for (int r = 0; r < 4; ++r) {
    const int64_t n = 4 * g + r;
    if (n >= n0 && n < n1) acc[n] = s[r];
  }
}

#if defined(__AVX2__)
template <int MR>
void sums_packed4(const int16_t* x16, int64_t Kp, const int8_t* wp, int64_t N, int32_t* acc, int64_t n0, int64_t n1) {
  for (int64_t g = n0 / 4; 4 * g < n1; ++g) {
    __m256i a[MR][4];
    for (int m = 0; m < MR; ++m)
      for (int r = 0; r < 4; ++r) a[m][r] = _mm256_setzero_si256();
    const int8_t* p = wp + g * 4 * Kp;
    for (int64_t k = 0; k < Kp; k += 16, p += 64) {
      __m256i xv[MR];
      for (int m = 0; m < MR; ++m) xv[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x16 + m * Kp + k));
      for (int r = 0; r < 4; ++r) {
        const __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * r)));
        for (int m = 0; m < MR; ++m) a[m][r] = _mm256_add_epi32(a[m][r], _mm256_madd_epi16(wv, xv[m]));
      }
    }
    for (int m = 0; m < MR; ++m) {
      const __m256i s = _mm256_hadd_epi32(_mm256_hadd_epi32(a[m][0], a[m][1]), _mm256_hadd_epi32(a[m][2], a[m][3]));
      const __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
      if (4 * g >= n0 && 4 * g + 4 <= n1) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(acc + m * N + 4 * g), s4);
      } else {
        alignas(16) int32_t t[4];
        _mm_store_si128(reinterpret_cast<__m128i*>(t), s4);
        store_group(t, g, acc + m * N, n0, n1);
      }
    }
  }
}
#else
template <int MR>
void sums_packed4(const int16_t* x16, int64_t Kp, const int8_t* wp, int64_t N, int32_t* acc, int64_t n0, int64_t n1) {
  for (int64_t g = n0 / 4; 4 * g < n1; ++g)
    for (int m = 0; m < MR; ++m) {
      int32_t t[4] = {0, 0, 0, 0};
      const int8_t* p = wp + g * 4 * Kp;
      for (int64_t k = 0; k < Kp; k += 16, p += 64)
        for (int r = 0; r < 4; ++r)
          for (int j = 0; j < 16; ++j) t[r] += static_cast<int32_t>(x16[m * Kp + k + j]) * p[16 * r + j];
      store_group(t, g, acc + m * N, n0, n1);
    }
}
#endif

}  // namespace

void gemv_packed4_rows(const int16_t* x16, int64_t M, int64_t K, const int8_t* wp, int64_t N, int32_t* acc, int64_t n0,
                       int64_t n1) {
  const int64_t Kp = pack4_cols(K);
  // activation rows 2 at a time: 8 accumulators (3 at a time spill registers: measured 64 x 2048 x 512,
  // 1 thread, 1.6 vs 1.1 ms)
  for (int64_t m = 0; m < M; m += 2) {
    if (m + 1 < M) sums_packed4<2>(x16 + m * Kp, Kp, wp, N, acc + m * N, n0, n1);
    else sums_packed4<1>(x16 + m * Kp, Kp, wp, N, acc + m * N, n0, n1);
  }
}

}  // namespace quanta_native

using namespace quanta_native;

// int8_linear for a few rows: y[m, n] = float32(sum_k (x[m, k] - x_zp[m]) * w[n, k]) * x_scale[m] * w_scale[n]
// (+ bias[n]), then the activation post_op: the same int32 sums as torch._int_mm and the same float32
// epilogue as rescale_rows.
// x: row-major int8 / uint8 codes [M, K]; w: row-major int8 [N, K]; w_sum: int32 [N] (sum_k w[n, k]).
// w_packed: optionally int8_pack_rows4(w), the sums then by the packed kernel (blocks of 32 weight rows,
// each held in L1 while every activation row, 3 at a time, passes over it): the same int32 sums.
torch::Tensor int8_gemv(const torch::Tensor& x, const torch::Tensor& x_zp, const torch::Tensor& w,
                        const torch::Tensor& w_sum, const torch::Tensor& x_scale, const torch::Tensor& w_scale,
                        const c10::optional<torch::Tensor>& bias, int64_t post_op,
                        const c10::optional<torch::Tensor>& w_packed) {
  check_post_op("int8_gemv", post_op);
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.stride(1) == 1 && x.stride(0) == x.size(1) &&
              (x.scalar_type() == torch::kInt8 || x.scalar_type() == torch::kUInt8),
              "int8_gemv: x must be row-major int8 / uint8 [M, K]");
  TORCH_CHECK(w.scalar_type() == torch::kInt8 && w.dim() == 2 && w.is_contiguous() && w.size(1) == x.size(1),
              "int8_gemv: w must be contiguous int8 [N, K] with x's K");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const float* b = check_epilogue("int8_gemv", M, N, x_zp, w_sum, x_scale, w_scale, bias);
  auto acc = torch::empty({M, N}, x.options().dtype(torch::kInt32));
  const bool is_signed = x.scalar_type() == torch::kInt8;
  const uint8_t* xb = static_cast<const uint8_t*>(x.data_ptr());
  if (w_packed.has_value() && w_packed->defined()) {
    TORCH_CHECK(w_packed->scalar_type() == torch::kInt8 && w_packed->is_contiguous() &&
                w_packed->numel() == pack4_bytes(N, K), "int8_gemv: w_packed must be int8_pack_rows4(w)");
    std::vector<int16_t> x16(static_cast<size_t>(M * pack4_cols(K)));
    widen_codes(xb, M, K, is_signed ? 0x80 : 0, x16.data());
    const int8_t* wp = w_packed->data_ptr<int8_t>();
    int32_t* a = acc.data_ptr<int32_t>();
    constexpr int64_t kPackedBlock = 32;
    at::parallel_for(0, (N + kPackedBlock - 1) / kPackedBlock, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        gemv_packed4_rows(x16.data(), M, K, wp, N, a, b * kPackedBlock, std::min(N, (b + 1) * kPackedBlock));
    });
  } else {
    gemv_u8s8(xb, M, K, w.data_ptr<int8_t>(), N, acc.data_ptr<int32_t>(), is_signed ? 0x80 : 0);
  }
  // int8 codes were read as code + 128: their zero points move by 128 too (the same exact sums)
  std::vector<int32_t> zp(x_zp.data_ptr<int32_t>(), x_zp.data_ptr<int32_t>() + x_zp.numel());
  if (is_signed)
    for (auto& z : zp) z += 128;
  rescale_rows_raw(acc.data_ptr<int32_t>(), M, N, zp.data(), zp.size() > 1, w_sum.data_ptr<int32_t>(),
                   x_scale.data_ptr<float>(), x_scale.numel() > 1, w_scale.data_ptr<float>(), b, post_op);
  return acc.view(torch::kFloat32);
}

// sum_k w[n, k] as int32 [N] for a contiguous int8 [N, K] (the zero-point term of the sums above):
// a row of ones times w, by the same kernel.
torch::Tensor int8_row_sums(const torch::Tensor& w) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == torch::kInt8 && w.dim() == 2 && w.is_contiguous(),
              "int8_row_sums: w must be contiguous int8 [N, K]");
  const int64_t N = w.size(0), K = w.size(1);
  auto out = torch::empty({N}, w.options().dtype(torch::kInt32));
  const std::vector<uint8_t> ones(K, 1);
  gemv_u8s8(ones.data(), 1, K, w.data_ptr<int8_t>(), N, out.data_ptr<int32_t>(), 0);
  return out;
}

// A contiguous copy of t in 2 MiB-aligned memory advised for transparent huge pages: a weight that
// is streamed from DRAM at every call (decoding shapes) then costs ~500x fewer TLB misses (measured:
// 4 x 4096^2 int8 gemv 2.8 -> 2.2 ms). Only a hint: without THP the copy behaves as before.
torch::Tensor huge_page_copy(const torch::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), "huge_page_copy: needs a CPU tensor");
  const auto c = t.contiguous();
  const size_t bytes = c.nbytes(), align = size_t(2) << 20;
  const size_t size = std::max(align, (bytes + align - 1) / align * align);
  void* p = std::aligned_alloc(align, size);
  TORCH_CHECK(p != nullptr, "huge_page_copy: could not allocate ", size, " bytes");
#ifdef MADV_HUGEPAGE
  madvise(p, size, MADV_HUGEPAGE);
#endif
  std::memcpy(p, c.data_ptr(), bytes);
  return torch::from_blob(p, c.sizes(), [](void* q) { std::free(q); }, c.options());
}


// w (contiguous int8 [N, K]) re-laid out for the recurrent loop's AVX2 gemv (see pack_rows4): int8
// [pack4_bytes(N, K)].
torch::Tensor int8_pack_rows4(const torch::Tensor& w) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == torch::kInt8 && w.dim() == 2 && w.is_contiguous(),
              "int8_pack_rows4: w must be contiguous int8 [N, K]");
  const int64_t N = w.size(0), K = w.size(1);
  auto out = torch::empty({pack4_bytes(N, K)}, w.options());
  pack_rows4(w.data_ptr<int8_t>(), N, K, out.data_ptr<int8_t>());
  return out;
}
