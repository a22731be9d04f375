// Shared by the direct int8 convolution's files (conv.cpp: ConvPlan and bindings; conv_dense.cpp,
// conv_depthwise.cpp: the AVX-512 VNNI loops): the epilogue's constants and arithmetic, the
// geometry, and the loops' entry points. See conv.cpp for the arithmetic.
#pragma once
#include "activation.h"
#include "simd.h"

#include <algorithm>
#include <cstring>

namespace quanta_native {

struct Epilogue {
  const int32_t* corr;  // x_zp * sum of the channel's weights
  const float* mult;    // float32(x_scale * w_scale[o])
  const float* bias;    // bias[o], 0 without bias (adding +0.0 changes no value here: y is never -0.0)
  int post;             // post_op.h: kPostNone, kPostRelu or kPostRelu6
  bool codes;           // uint8 output, else float32
  float inv, z;         // 1 / out_scale (float32), out_zp
};

// The int8 linear's epilogue (rescale_rows' arithmetic, fused.cpp): y[m, n] = float32(acc - zp[m]
// * ws[n]) * xs[m] * wsc[n] (+ bias[n]), left to right, then the activation post (activation.h).
struct RowEpilogue {
  const int32_t* zp;  // int8 codes' zero point, per row (zrow) or one
  bool zrow;
  const float* xs;  // activation scale, per row (srow) or one
  bool srow;
  const int32_t* ws;  // sum of each output channel's weights [N]
  const float* wsc;   // weight scale [N]
  const float* bias;  // [N] or null
  int64_t post;
  float* out;  // row-major [M, N]
  int64_t N;
};

struct Geometry {
  int64_t N, C, H, W, O, OH, OW, KH, KW, SH, SW, PH, PW, DH, DW;
  int64_t pixels() const { return N * OH * OW; }
  int64_t taps() const { return KH * KW; }
  // Writes the input pixels that the taps of output pixel (n, oy, ox) read to ptr[t * step]
  // (`pad`, a pixel of zero-point codes, outside the image); `off` holds each tap's offset from
  // the first tap, used where all taps fall inside the image (most pixels).
  void taps_of(const uint8_t* x, const uint8_t* pad, const int64_t* off, int64_t n, int64_t oy, int64_t ox,
               const uint8_t** ptr, int64_t step) const {
    const int64_t iy0 = oy * SH - PH, ix0 = ox * SW - PW, T = KH * KW;
    if (iy0 >= 0 && iy0 + (KH - 1) * DH < H && ix0 >= 0 && ix0 + (KW - 1) * DW < W) {
      const uint8_t* base = x + ((n * H + iy0) * W + ix0) * C;
      for (int64_t t = 0; t < T; ++t) ptr[t * step] = base + off[t];
      return;
    }
    for (int64_t ky = 0; ky < KH; ++ky)
      for (int64_t kx = 0; kx < KW; ++kx) {
        const int64_t iy = iy0 + ky * DH, ix = ix0 + kx * DW;
        ptr[(ky * KW + kx) * step] = iy < 0 || iy >= H || ix < 0 || ix >= W ? pad : x + ((n * H + iy) * W + ix) * C;
      }
  }
  std::vector<int64_t> tap_offsets() const {
    std::vector<int64_t> off;
    for (int64_t ky = 0; ky < KH; ++ky)
      for (int64_t kx = 0; kx < KW; ++kx) off.push_back((ky * DH * W + kx * DW) * C);
    return off;
  }
};

// channel of position p (0..63) of the interleaved order: p = 16 k + 4 l + i -> 16 l + 4 k + i
inline int64_t dw_channel(int64_t p) { return (p % 16) / 4 * 16 + p / 16 * 4 + p % 4; }

#if QUANTA_AVX2 || QUANTA_VNNI
// AVX2 has no byte masks: a vector past the last channel is read (zero-filled) and written through
// a bounce buffer, n bytes of it
template <class I>
inline I bounce_load(int64_t n, const void* p) {
  alignas(32) uint8_t b[sizeof(I)] = {};
  std::memcpy(b, p, static_cast<size_t>(n));
  I v;
  std::memcpy(&v, b, sizeof(I));
  return v;
}
template <class I>
inline void bounce_store(void* p, int64_t n, I v) {
  alignas(32) uint8_t b[sizeof(I)];
  std::memcpy(b, &v, sizeof(I));
  std::memcpy(p, b, static_cast<size_t>(n));
}

// The epilogue on 8 lanes (values16 / codes16 below, in 256-bit vectors): y of the 8 constants'
// positions from o, from their corrected sums a (acc - corr), post-op applied
inline __m256 values8_corrected(__m256i a, int64_t o, const Epilogue& e) {
  __m256 y = _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(a), _mm256_loadu_ps(e.mult + o)), _mm256_loadu_ps(e.bias + o));
  if (e.post != kPostNone) y = _mm256_max_ps(y, _mm256_setzero_ps());  // relu or relu6 (conv_packed checks)
  if (e.post == kPostRelu6) y = _mm256_min_ps(y, _mm256_set1_ps(6.f));
  return y;
}
// (the conversions below, cvtps_epi32, round as MXCSR says: the loops hold it at nearest even, simd.h's
// NearestRounding, which makes the conversion the epilogue's rounding)

// codes16's arithmetic (round half to even: the conversion, under NearestRounding)
inline __m256i codes8(__m256 y, const Epilogue& e) {
  const __m256 q = _mm256_min_ps(_mm256_mul_ps(y, _mm256_set1_ps(e.inv)), _mm256_set1_ps(255.f - e.z));
  return _mm256_add_epi32(_mm256_cvtps_epi32(q), _mm256_set1_epi32(static_cast<int32_t>(e.z)));
}
// The codes' arithmetic of store16 / store16x2, up to the zero point: round_half_even(min(y * inv,
// top)) with y = float32(a) * mult + bias, top = code_top(e) (the conversion rounds: NearestRounding).
// relu / relu6 leave y alone: y -> y * inv (inv > 0) rounds monotonically and keeps signs, so
// max(y, 0) gives code z exactly where y * inv rounds to at most 0, which the int16 max with z in
// codes16_in_lanes applies to 16 channels at once; relu6's min(y, 6) is folded into top (min(y, 6)
// * inv rounds to min(y * inv, 6 * inv)). The codes are codes8's of values8_corrected's y bit for bit.
inline __m256 code_top(const Epilogue& e) {
  const float top = 255.f - e.z;
  return _mm256_set1_ps(e.post == kPostRelu6 ? std::min(6.f * e.inv, top) : top);
}
inline __m256i rounded8(__m256i a, int64_t o, const Epilogue& e, __m256 top) {
  const __m256 y = _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(a), _mm256_loadu_ps(e.mult + o)),
                                 _mm256_loadu_ps(e.bias + o));
  return _mm256_cvtps_epi32(_mm256_min_ps(_mm256_mul_ps(y, _mm256_set1_ps(e.inv)), top));
}
// channels o .. o + 15 of a pixel as int16 codes (saturating packs; the zero point added with
// saturation: a sum below 0 stays below 0 (huge negative y convert to INT_MIN), a rounded value is
// at most 255 - z, so after the unsigned byte packs every code is codes8's), relu's floor z applied,
// in the in-lane pack order [o 0-3, o 8-11 | o 4-7, o 12-15]
inline __m256i codes16_in_lanes(const __m256i* acc, int64_t o, const Epilogue& e, __m256 top) {
  const __m256i r = _mm256_packs_epi32(rounded8(acc[0], o, e, top), rounded8(acc[1], o + 8, e, top));
  const __m256i z = _mm256_set1_epi16(static_cast<int16_t>(e.z));
  return e.post == kPostNone ? _mm256_adds_epi16(r, z) : _mm256_max_epi16(_mm256_adds_epi16(r, z), z);
}
// channels o .. o + 15 (up to O) of a pixel's output row from their corrected sums acc[0] (channels
// o .. o + 7) and acc[1] (o + 8 ..): uint8 codes or float32 values; tails through a bounce buffer
inline void store16(const __m256i* acc, int64_t o, int64_t O, const Epilogue& e, char* row) {
  if (o >= O) return;
  const int64_t n = std::min<int64_t>(16, O - o);
  if (!e.codes) {
    const __m256 lo = values8_corrected(acc[0], o, e), hi = values8_corrected(acc[1], o + 8, e);
    float* y = reinterpret_cast<float*>(row) + o;
    if (n > 8) {
      _mm256_storeu_ps(y, lo);
      bounce_store(y + 8, (n - 8) * 4, hi);
    } else {
      bounce_store(y, n * 4, lo);
    }
    return;
  }
  // [o 0-3, o 8-11 | o 4-7, o 12-15] -> 64-bit permute -> [o 0-7 | o 8-15] -> bytes
  const __m256i w = _mm256_permute4x64_epi64(codes16_in_lanes(acc, o, e, code_top(e)), 0xD8);
  const __m256i b = _mm256_packus_epi16(w, w);
  const __m128i c = _mm_unpacklo_epi64(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
  if (n == 16)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(row + o), c);
  else
    bounce_store(row + o, n, c);
}
// store16 for two pixels (sums a and b, rows ra and rb): full blocks of codes share the byte pack
// and one dword permute (half the packing work); other cases run store16 twice
inline void store16x2(const __m256i* a, const __m256i* b, int64_t o, int64_t O, const Epilogue& e, char* ra, char* rb) {
  if (!e.codes || O - o < 16) {
    store16(a, o, O, e, ra);
    store16(b, o, O, e, rb);
    return;
  }
  const __m256 top = code_top(e);
  // bytes: dwords [a 0-3, a 8-11, b 0-3, b 8-11 | a 4-7, a 12-15, b 4-7, b 12-15] -> [a 0-15 | b 0-15]
  const __m256i bytes = _mm256_packus_epi16(codes16_in_lanes(a, o, e, top), codes16_in_lanes(b, o, e, top));
  const __m256i c = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(ra + o), _mm256_castsi256_si128(c));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(rb + o), _mm256_extracti128_si256(c, 1));
}
#endif

#if QUANTA_VNNI
inline __mmask16 lanes(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }
inline __mmask64 bytes(int64_t n) { return n >= 64 ? ~__mmask64(0) : ((__mmask64(1) << n) - 1); }

// y of channels o .. o+15 from their corrected int32 sums (acc - corr), post-op applied
inline __m512 values16_corrected(__m512i a, int64_t o, const Epilogue& e) {
  __m512 y = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(a), _mm512_loadu_ps(e.mult + o)),
                           _mm512_loadu_ps(e.bias + o));
  if (e.post != kPostNone) y = _mm512_max_ps(y, _mm512_setzero_ps());  // relu or relu6 (conv_packed checks)
  if (e.post == kPostRelu6) y = _mm512_min_ps(y, _mm512_set1_ps(6.f));
  return y;
}

// y of channels o .. o+15 from their int32 sums (before the correction), post-op applied
inline __m512 values16(__m512i acc, int64_t o, const Epilogue& e) {
  return values16_corrected(_mm512_sub_epi32(acc, _mm512_loadu_si512(e.corr + o)), o, e);
}

// the uint8 codes clamp(round_half_even(y * inv) + z, 0, 255) of y as int32 lanes, up to the lower
// clamp: a lane < 0 stands for code 0, which the saturating packs that follow (packus_epi32,
// packus_epi16) make of it. The upper clamp is taken in float before rounding: 255 - z is an
// integer, so min(q, 255 - z) rounds to the same code as q wherever q's code is below 255; huge
// negative q convert to INT_MIN, which stays negative after + z.
inline __m512i codes16(__m512 y, const Epilogue& e) {
  const __m512 q = _mm512_min_ps(_mm512_mul_ps(y, _mm512_set1_ps(e.inv)), _mm512_set1_ps(255.f - e.z));
  return _mm512_add_epi32(_mm512_cvt_roundps_epi32(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
                          _mm512_set1_epi32(static_cast<int32_t>(e.z)));
}

// NB (<= 4) blocks of 16 consecutive channels of one pixel, from channel o of `out` (a pixel's
// row of O values), stored up to channel O: uint8 codes packed into one 64-byte store, or floats.
// acc: corrected sums (the dense loop starts its sums at -corr).
template <int NB>
inline void store_blocks(const __m512i* acc, int64_t o, int64_t O, const Epilogue& e, char* out) {
  if (!e.codes) {
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j)
      if (o + j * 16 < O)
        _mm512_mask_storeu_ps(reinterpret_cast<float*>(out) + o + j * 16, lanes(O - o - j * 16),
                              values16_corrected(acc[j], o + j * 16, e));
    return;
  }
  __m512i c[4];
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j)
    c[j] = j < NB ? codes16(values16_corrected(acc[j], o + j * 16, e), e) : _mm512_setzero_si512();
  // in-lane packs give, per 128-bit lane l, the l-th quarter of c0, c1, c2, c3: permute dwords back
  const __m512i packed = _mm512_packus_epi16(_mm512_packus_epi32(c[0], c[1]), _mm512_packus_epi32(c[2], c[3]));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  _mm512_mask_storeu_epi8(out + o, bytes(std::min<int64_t>(NB * 16, O - o)), _mm512_permutexvar_epi32(order, packed));
}

// y [M, N] (r.out) of int8 codes x (row-major [M, K], K % 4 == 0) and the weight packed as a dense
// 1x1 convolution's [N/16][1][K/4][16][4]
void dense_gemm(const int8_t* x, int64_t M, int64_t K, const int8_t* wpack, const RowEpilogue& r);
#endif  // QUANTA_VNNI

#if QUANTA_VNNI || QUANTA_AVX2
// (AVX2 without VNNI: exact only for weights within +-64, which ConvPlan checks)
// out: channels-last output (pixel rows of g.O values of esize bytes); x: channels-last uint8
// codes; pad: a pixel of zero-point codes (at least C rounded up to 64, plus 64 bytes).
// pointwise_loop: 1x1 convolutions without padding run pointwise_conv where this build has it
// (false: the general loop, for comparisons).
void dense_conv(const uint8_t* x, const Geometry& g, const int8_t* wpack, const uint8_t* pad, const Epilogue& e,
                char* out, int64_t esize, bool pointwise_loop = true);
void depthwise_conv(const uint8_t* x, const Geometry& g, const int8_t* wpack, const uint8_t* pad,
                    const Epilogue& e, char* out, int64_t esize);
#endif

// The AVX2 (non-VNNI) build's pointwise GEMM loop (conv_pointwise.cpp) for a 1x1 convolution without
// padding, any stride, weights packed as the dense loop's [O/16][1][C/4][16][4]: runs it and returns
// true, or returns false (other shapes, other builds) without touching out.
bool pointwise_conv(const uint8_t* x, const Geometry& g, const int8_t* wpack, const Epilogue& e, char* out,
                    int64_t esize);
// The AVX2 (non-VNNI) build's loop for dense convolutions of C % 4 != 0 input channels (any kernel,
// stride, dilation; padding PH, PW before and whatever OH, OW leave after): each output pixel's taps
// gathered into a row of K4 = round_up(KH * KW * C, 4) codes ((ky, kx, c) order, zp outside the
// image), then the pointwise GEMM with weights packed [O/16][1][K4/4][16][4]; false in other builds.
bool gathered_conv(const uint8_t* x, const Geometry& g, const int8_t* wpack, uint8_t zp, const Epilogue& e, char* out,
                   int64_t esize);

}  // namespace quanta_native
