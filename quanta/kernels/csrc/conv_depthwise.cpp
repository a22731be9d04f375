// The direct int8 convolution's depthwise loop (groups = C = O).
#include "conv_kernels.h"

#include <type_traits>

namespace quanta_native {
#if QUANTA_VNNI || QUANTA_AVX2
namespace {

// One step adds 4 taps of a block of channels: the taps' inputs A, B, C, D (one vector each) are
// interleaved in-lane into V_k, whose int32 lane (l, i) holds [a, b, c, d] of channel 16 l + 4 k + i,
// so that one vpdpbusd adds 4 taps' products of 16 channels. Weights are packed to match
// ([G][T/4][k][l][i][tap] for 64-channel groups G), and the epilogue constants are stored in the
// same channel order (see ConvPlan); the in-lane packing of the codes restores the natural order.
// A step whose only tap is the kernel's last (T % 4 == 1: 3x3, 5x5, 7x7) spreads that tap's bytes
// with one in-lane byte shuffle per V_k instead of interleaving it with three pad pixels.
//
// Vec<BYTES>: the step's vector width. 64-channel groups run on 512-bit vectors; the last group's
// remainder of at most 32 (16) channels on 256-bit (128-bit) ones, which read the first lanes of the
// group's packed weights and constants: on a CPU that splits 512-bit operations in two 256-bit
// halves, a narrower vector costs in proportion to its channels, where padding a 512-bit one would
// not (MobileNetV2's 144 channels: 64 + 64 + 16).
//
// Without VNNI (AVX2): no 512-bit vectors, so a 64-channel group runs as two 256-bit halves (the
// second reads the upper lanes of the packed weights: channels 32 .. 63, see `position`); the dot
// product is vpmaddubsw + vpmaddwd, exact only for weights within +-64 (conv.cpp checks); and with
// no byte masks, a vector past the last channel is read and written through a bounce buffer.
// (AVX2's M: how many bytes of the vector lie before the last channel, at most the vector's)
template <int BYTES>
struct Vec;

#if QUANTA_VNNI
template <>
struct Vec<64> {
  using I = __m512i;
  using F = __m512;
  using M = __mmask64;
  static M mask(int64_t n) { return bytes(n); }
  static I zero() { return _mm512_setzero_si512(); }
  static I load(const void* p) { return _mm512_loadu_si512(p); }
  static I loadz(M m, const void* p) { return _mm512_maskz_loadu_epi8(m, p); }
  static I lo8(I a, I b) { return _mm512_unpacklo_epi8(a, b); }
  static I hi8(I a, I b) { return _mm512_unpackhi_epi8(a, b); }
  static I lo16(I a, I b) { return _mm512_unpacklo_epi16(a, b); }
  static I hi16(I a, I b) { return _mm512_unpackhi_epi16(a, b); }
  static I lanes4(__m128i v) { return _mm512_broadcast_i32x4(v); }
  static I shuffle(I a, I control) { return _mm512_shuffle_epi8(a, control); }
  static I dp(I acc, I a, I b) { return _mm512_dpbusd_epi32(acc, a, b); }
  static I pack(I a, I b, I c, I d) { return _mm512_packus_epi16(_mm512_packus_epi32(a, b), _mm512_packus_epi32(c, d)); }
  static void store(char* p, M m, I v) { _mm512_mask_storeu_epi8(p, m, v); }
  static F values(I acc, int64_t o, const Epilogue& e) { return values16(acc, o, e); }
  static I codes(F y, const Epilogue& e) { return codes16(y, e); }
  static void store_values(float* y, F v) { _mm512_store_ps(y, v); }
};
#endif

template <>
struct Vec<32> {
  using I = __m256i;
  using F = __m256;
  static I zero() { return _mm256_setzero_si256(); }
  static I load(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
#if QUANTA_VNNI
  using M = __mmask32;
  static M mask(int64_t n) { return n >= 32 ? ~M(0) : M((1u << n) - 1); }
  static I loadz(M m, const void* p) { return _mm256_maskz_loadu_epi8(m, p); }
  static I dp(I acc, I a, I b) { return _mm256_dpbusd_epi32(acc, a, b); }
  static void store(char* p, M m, I v) { _mm256_mask_storeu_epi8(p, m, v); }
#else
  using M = int64_t;
  static M mask(int64_t n) { return std::min<int64_t>(n, 32); }
  static I loadz(M m, const void* p) { return m >= 32 ? load(p) : bounce_load<I>(m, p); }
  // vpdpbusd's sums of 4 products, exact for weights within +-64 (no int16 pair sum saturates)
  static I dp(I acc, I a, I b) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1)));
  }
  static void store(char* p, M m, I v) {
    if (m >= 32)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v);
    else
      bounce_store(p, m, v);
  }
#endif
  static I lo8(I a, I b) { return _mm256_unpacklo_epi8(a, b); }
  static I hi8(I a, I b) { return _mm256_unpackhi_epi8(a, b); }
  static I lo16(I a, I b) { return _mm256_unpacklo_epi16(a, b); }
  static I hi16(I a, I b) { return _mm256_unpackhi_epi16(a, b); }
  static I lanes4(__m128i v) { return _mm256_broadcastsi128_si256(v); }
  static I shuffle(I a, I control) { return _mm256_shuffle_epi8(a, control); }
  static I pack(I a, I b, I c, I d) { return _mm256_packus_epi16(_mm256_packus_epi32(a, b), _mm256_packus_epi32(c, d)); }
  static F values(I acc, int64_t o, const Epilogue& e) {
    return values8_corrected(_mm256_sub_epi32(acc, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(e.corr + o))), o, e);
  }
  static I codes(F y, const Epilogue& e) { return codes8(y, e); }
  static void store_values(float* y, F v) { _mm256_store_ps(y, v); }
};

template <>
struct Vec<16> {
  using I = __m128i;
  using F = __m256;  // (the epilogue's: Vec<32>'s)
  static I zero() { return _mm_setzero_si128(); }
  static I load(const void* p) { return _mm_loadu_si128(static_cast<const __m128i*>(p)); }
#if QUANTA_VNNI
  using M = __mmask16;
  static M mask(int64_t n) { return lanes(n); }
  static I loadz(M m, const void* p) { return _mm_maskz_loadu_epi8(m, p); }
  static I dp(I acc, I a, I b) { return _mm_dpbusd_epi32(acc, a, b); }
  static void store(char* p, M m, I v) { _mm_mask_storeu_epi8(p, m, v); }
#else
  using M = int64_t;
  static M mask(int64_t n) { return std::min<int64_t>(n, 16); }
  static I loadz(M m, const void* p) { return m >= 16 ? load(p) : bounce_load<I>(m, p); }
  static I dp(I acc, I a, I b) { return _mm_add_epi32(acc, _mm_madd_epi16(_mm_maddubs_epi16(a, b), _mm_set1_epi16(1))); }
  static void store(char* p, M m, I v) {
    if (m >= 16)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p), v);
    else
      bounce_store(p, m, v);
  }
#endif
  static I lo8(I a, I b) { return _mm_unpacklo_epi8(a, b); }
  static I hi8(I a, I b) { return _mm_unpackhi_epi8(a, b); }
  static I lo16(I a, I b) { return _mm_unpacklo_epi16(a, b); }
  static I hi16(I a, I b) { return _mm_unpackhi_epi16(a, b); }
  static I lanes4(__m128i v) { return v; }
  static I shuffle(I a, I control) { return _mm_shuffle_epi8(a, control); }
  static I pack(I a, I b, I c, I d) { return _mm_packus_epi16(_mm_packus_epi32(a, b), _mm_packus_epi32(c, d)); }
  // the 256-bit epilogue on the zero-extended sums (the constants' extra lanes are the group's other
  // positions, in bounds; the lanes kept are unaffected): a 128-bit operation costs a 256-bit one here
  static F values(I acc, int64_t o, const Epilogue& e) { return Vec<32>::values(_mm256_zextsi128_si256(acc), o, e); }
  static I codes(F y, const Epilogue& e) { return _mm256_castsi256_si128(Vec<32>::codes(y, e)); }
  static void store_values(float* y, F v) { _mm256_store_ps(y, v); }
};

// in-lane byte shuffle control of V_k for a single tap: int32 lane i gets byte 4 k + i, zeros above
inline __m128i spread_control(int k) {
  const char z = static_cast<char>(0x80);
  const char b = static_cast<char>(4 * k);
  return _mm_setr_epi8(b, z, z, z, b + 1, z, z, z, b + 2, z, z, z, b + 3, z, z, z);
}

// The position of the constants of a vector whose first channel is c0, c0 % 64 being 0 or 32 (the
// second 256-bit half of a group on AVX2): vector k's int32 lane 4 l + i holds channel 16 l + 4 k + i,
// at position 16 k + 4 l + i, so the half from channel 32 (l = 2, 3) starts at position 8. Its
// weights are the upper 32 bytes of each 64-byte vector: w + c0 % 64.
inline int64_t position(int64_t c0) { return c0 / 64 * 64 + c0 % 64 / 4; }

// The epilogue of one pixel's sums acc[0..3] of the BYTES channels from c0 (see the step's order),
// stored into `out`, the pixel's output row of C values.
template <int BYTES>
inline void store_pixel(const typename Vec<BYTES>::I* acc, int64_t c0, int64_t C, typename Vec<BYTES>::M mask,
                        const Epilogue& e, char* out) {
  using V = Vec<BYTES>;
  if (e.codes) {
    typename V::I c[4];
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) c[k] = V::codes(V::values(acc[k], position(c0) + 16 * k, e), e);
    V::store(out + c0, mask, V::pack(c[0], c[1], c[2], c[3]));
    return;
  }
  alignas(64) float y[64];
#pragma GCC unroll 4
  for (int k = 0; k < 4; ++k) V::store_values(y + 16 * k, V::values(acc[k], position(c0) + 16 * k, e));
  float* o = reinterpret_cast<float*>(out) + c0;
  for (int64_t p = 0; p < 64; ++p)  // y[p], p = 16 k + 4 l + i: channel c0 + 16 l + 4 k + i
    if (p % 16 < BYTES / 4 && c0 + dw_channel(p) < C) o[dw_channel(p)] = y[p];
}

// PX output pixels x the BYTES channels from c0. ptr[(px * T4 + q) * 4 + j]: tap 4 q + j's input
// pixel (taps past the kernel's read the pad pixel, with zero weights); w: the 64-channel group's
// [T4][4][64] weights (a narrower vector reads the first lanes of each); out[px]: the pixel's output
// row of C values.
template <int BYTES, int PX>
void depthwise_tile(const uint8_t* const* ptr, int64_t T, int64_t c0, int64_t C, const int8_t* w,
                    const Epilogue& e, char* const* out) {
  using V = Vec<BYTES>;
  using I = typename V::I;
  const auto mask = V::mask(C - c0);
  w += c0 % 64;  // (the second half of a group: see position)
  const int64_t T4 = (T + 3) / 4, steps = T % 4 == 1 ? T4 - 1 : T4;  // 4-tap steps, then maybe one tap
  I acc[PX][4];
#pragma GCC unroll 4
  for (int n = 0; n < PX; ++n)
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) acc[n][k] = V::zero();
  for (int64_t q = 0; q < steps; ++q) {
    I wv[4];
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) wv[k] = V::load(w + (q * 4 + k) * 64);
#pragma GCC unroll 4
    for (int n = 0; n < PX; ++n) {
      const uint8_t* const* p = ptr + (n * T4 + q) * 4;
      const I a = V::loadz(mask, p[0] + c0), b = V::loadz(mask, p[1] + c0);
      const I c = V::loadz(mask, p[2] + c0), d = V::loadz(mask, p[3] + c0);
      const I ab_lo = V::lo8(a, b), ab_hi = V::hi8(a, b), cd_lo = V::lo8(c, d), cd_hi = V::hi8(c, d);
      acc[n][0] = V::dp(acc[n][0], V::lo16(ab_lo, cd_lo), wv[0]);
      acc[n][1] = V::dp(acc[n][1], V::hi16(ab_lo, cd_lo), wv[1]);
      acc[n][2] = V::dp(acc[n][2], V::lo16(ab_hi, cd_hi), wv[2]);
      acc[n][3] = V::dp(acc[n][3], V::hi16(ab_hi, cd_hi), wv[3]);
    }
  }
  if (steps < T4) {  // the last tap alone
    I wv[4];
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) wv[k] = V::load(w + (steps * 4 + k) * 64);
#pragma GCC unroll 4
    for (int n = 0; n < PX; ++n) {
      const I a = V::loadz(mask, ptr[(n * T4 + steps) * 4] + c0);
#pragma GCC unroll 4
      for (int k = 0; k < 4; ++k) acc[n][k] = V::dp(acc[n][k], V::shuffle(a, V::lanes4(spread_control(k))), wv[k]);
    }
  }
  for (int n = 0; n < PX; ++n) store_pixel<BYTES>(acc[n], c0, C, mask, e, out[n]);
}

// `count` consecutive output pixels of one output row whose taps all lie inside the image's
// columns, with the kernel's KH x KW taps known at compile time and the weights held in registers:
// pixel i's tap (ky, kx) reads rows[ky] + (ix + i SW + kx DW) C (rows: the input rows of the kernel's
// rows, the pad row outside the image); out: pixel 0's output row, the next ones `step` bytes on.
template <int BYTES, int KH, int KW>
void depthwise_run(const uint8_t* const* rows, int64_t ix, int64_t count, int64_t SW, int64_t DW, int64_t C,
                   int64_t c0, const int8_t* w, const Epilogue& e, char* out, int64_t step) {
  using V = Vec<BYTES>;
  using I = typename V::I;
  constexpr int T = KH * KW, T4 = (T + 3) / 4, steps = T % 4 == 1 ? T4 - 1 : T4;
  const auto mask = V::mask(C - c0);
  w += c0 % 64;  // (the second half of a group: see position)
  I wv[T4][4], control[4];
#pragma GCC unroll 16
  for (int q = 0; q < T4; ++q)
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) wv[q][k] = V::load(w + (q * 4 + k) * 64);
#pragma GCC unroll 4
  for (int k = 0; k < 4; ++k) control[k] = V::lanes4(spread_control(k));
  const uint8_t* r[KH];
#pragma GCC unroll 8
  for (int ky = 0; ky < KH; ++ky) r[ky] = rows[ky] + ix * C + c0;
  const int64_t dx = DW * C, sx = SW * C;
  // two pixels per iteration (independent sums to overlap), then the odd one
  auto pixels = [&](auto np) {
    constexpr int NP = decltype(np)::value;
    I acc[NP][4];
#pragma GCC unroll 4
    for (int p = 0; p < NP; ++p)
#pragma GCC unroll 4
      for (int k = 0; k < 4; ++k) acc[p][k] = V::zero();
#pragma GCC unroll 16
    for (int q = 0; q < steps; ++q) {
#pragma GCC unroll 2
      for (int p = 0; p < NP; ++p) {
        I in[4];
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) {
          const int t = 4 * q + j;  // taps past the kernel's have zero weights: any input will do
          in[j] = t < T ? V::loadz(mask, r[t / KW] + p * sx + (t % KW) * dx) : V::zero();
        }
        const I ab_lo = V::lo8(in[0], in[1]), ab_hi = V::hi8(in[0], in[1]);
        const I cd_lo = V::lo8(in[2], in[3]), cd_hi = V::hi8(in[2], in[3]);
        acc[p][0] = V::dp(acc[p][0], V::lo16(ab_lo, cd_lo), wv[q][0]);
        acc[p][1] = V::dp(acc[p][1], V::hi16(ab_lo, cd_lo), wv[q][1]);
        acc[p][2] = V::dp(acc[p][2], V::lo16(ab_hi, cd_hi), wv[q][2]);
        acc[p][3] = V::dp(acc[p][3], V::hi16(ab_hi, cd_hi), wv[q][3]);
      }
    }
    if constexpr (steps < T4) {  // the last tap alone
#pragma GCC unroll 2
      for (int p = 0; p < NP; ++p) {
        const I a = V::loadz(mask, r[(T - 1) / KW] + p * sx + ((T - 1) % KW) * dx);
#pragma GCC unroll 4
        for (int k = 0; k < 4; ++k) acc[p][k] = V::dp(acc[p][k], V::shuffle(a, control[k]), wv[T4 - 1][k]);
      }
    }
#pragma GCC unroll 2
    for (int p = 0; p < NP; ++p) store_pixel<BYTES>(acc[p], c0, C, mask, e, out + p * step);
#pragma GCC unroll 8
    for (int ky = 0; ky < KH; ++ky) r[ky] += NP * sx;
    out += NP * step;
  };
  int64_t i = 0;
  for (; i + 2 <= count; i += 2) pixels(std::integral_constant<int, 2>());
  if (i < count) pixels(std::integral_constant<int, 1>());
}

template <int BYTES>
void tile_of(int64_t px, const uint8_t* const* ptr, int64_t T, int64_t c0, int64_t C, const int8_t* w,
             const Epilogue& e, char* const* out) {
  switch (px) {
    case 4: return depthwise_tile<BYTES, 4>(ptr, T, c0, C, w, e, out);
    case 3: return depthwise_tile<BYTES, 3>(ptr, T, c0, C, w, e, out);
    case 2: return depthwise_tile<BYTES, 2>(ptr, T, c0, C, w, e, out);
    default: return depthwise_tile<BYTES, 1>(ptr, T, c0, C, w, e, out);
  }
}

// the interior runs' loop for a kernel of KH x KW taps (3x3, 5x5), or null: every pixel by tiles
template <int BYTES>
using RunLoop = void (*)(const uint8_t* const*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                         const int8_t*, const Epilogue&, char*, int64_t);
template <int BYTES>
RunLoop<BYTES> run_loop(int64_t KH, int64_t KW) {
  if (KH == 3 && KW == 3) return depthwise_run<BYTES, 3, 3>;
  if (KH == 5 && KW == 5) return depthwise_run<BYTES, 5, 5>;
  return nullptr;
}

// fn(std::integral_constant<int, BYTES>(), c0) for each vector of the channels of groups [gb, ge):
// 64-channel groups on 512-bit vectors (VNNI) or two 256-bit halves (AVX2); the last group's
// remainder on the narrowest vector that holds it
template <class Fn>
void for_each_vector(int64_t gb, int64_t ge, int64_t C, Fn&& fn) {
  constexpr int64_t widest = QUANTA_VNNI ? 64 : 32;
  for (int64_t c0 = gb * 64; c0 < std::min(ge * 64, C); c0 += widest) {
    const int64_t left = C - c0;
#if QUANTA_VNNI
    if (left > 32) {
      fn(std::integral_constant<int, 64>(), c0);
      continue;
    }
#endif
    if (left > 16)
      fn(std::integral_constant<int, 32>(), c0);
    else
      fn(std::integral_constant<int, 16>(), c0);
  }
}

}  // namespace

void depthwise_conv(const uint8_t* x, const Geometry& g, const int8_t* wpack, const uint8_t* pad,
                    const Epilogue& e, char* out, int64_t esize) {
  const int64_t T = g.taps(), T4 = (T + 3) / 4, groups = (g.C + 63) / 64, rows = g.N * g.OH;
  // pixels per tile: 2 on 512-bit vectors (registers), 4 where every vector is narrower (VNNI's 32
  // registers; AVX2 has 16)
  const int64_t kPX = QUANTA_VNNI && g.C <= 32 ? 4 : 2;
  // the columns [lo, hi) of output pixels whose taps all lie inside the image's columns: interior
  // runs (with compile-time taps); the others by tiles, with each pixel's tap pointers
  const bool runs = run_loop<32>(g.KH, g.KW) != nullptr;
  const int64_t reach = g.W - 1 + g.PW - (g.KW - 1) * g.DW;
  const int64_t lo = runs ? std::min(g.OW, (g.PW + g.SW - 1) / g.SW) : g.OW;
  const int64_t hi = runs && reach >= 0 ? std::max(lo, std::min(g.OW, reach / g.SW + 1)) : lo;
  const std::vector<uint8_t> pad_row(runs ? g.W * g.C + 64 : 0, pad[0]);  // an input row of zero-point codes
  // tasks: an output row, split by 64 channels only where there are few rows (the taps' pointers
  // are found once per pixel for all the channels of a task)
  const int64_t splits = rows >= 4 * at::get_num_threads() ? 1 : groups, per = (groups + splits - 1) / splits;
  const std::vector<int64_t> off = g.tap_offsets();
  parallel_claimed(rows * splits, [&](const auto& claim) {
    const NearestRounding rounding;  // (the epilogue's conversions round half to even)
    std::vector<const uint8_t*> ptr(kPX * T4 * 4, pad);  // taps T .. 4 T4 - 1 stay on the pad pixel
    std::vector<const uint8_t*> in_rows(g.KH);
    for (int64_t task; (task = claim()) >= 0;) {
      const int64_t row = task / splits, n = row / g.OH, oy = row % g.OH;
      const int64_t gb = task % splits * per, ge = std::min(groups, gb + per);
      auto tiles = [&](int64_t from, int64_t to) {
        for (int64_t ox = from; ox < to; ox += kPX) {
          const int64_t px = std::min(kPX, to - ox);
          char* dst[4];
          for (int64_t i = 0; i < px; ++i) {
            dst[i] = out + ((row * g.OW) + ox + i) * g.O * esize;
            g.taps_of(x, pad, off.data(), n, oy, ox + i, ptr.data() + i * T4 * 4, 1);
          }
          for_each_vector(gb, ge, g.C, [&](auto bytes, int64_t c0) {
            tile_of<decltype(bytes)::value>(px, ptr.data(), T, c0, g.C, wpack + c0 / 64 * T4 * 256, e, dst);
          });
        }
      };
      tiles(0, lo);
      if (hi > lo) {
        for (int64_t ky = 0; ky < g.KH; ++ky) {
          const int64_t iy = oy * g.SH - g.PH + ky * g.DH;
          in_rows[ky] = iy >= 0 && iy < g.H ? x + (n * g.H + iy) * g.W * g.C : pad_row.data();
        }
        const int64_t ix = lo * g.SW - g.PW, step = g.O * esize;
        char* first = out + (row * g.OW + lo) * step;
        for_each_vector(gb, ge, g.C, [&](auto bytes, int64_t c0) {
          run_loop<decltype(bytes)::value>(g.KH, g.KW)(in_rows.data(), ix, hi - lo, g.SW, g.DW, g.C, c0,
                                                       wpack + c0 / 64 * T4 * 256, e, first, step);
        });
      }
      tiles(hi, g.OW);
    }
  });
}
#endif  // QUANTA_VNNI || QUANTA_AVX2
}  // namespace quanta_native
