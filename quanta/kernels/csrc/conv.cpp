// Direct int8 convolutions of channels-last uint8 codes with AVX-512 VNNI, for the shapes where
// oneDNN's per-call cost (about 30 us, measured on a 16-channel 1x1 conv) is most of the work:
// MobileNet-style pointwise and depthwise layers at batch 1. A 2d convolution (a 1d one is a 2d one
// of unit height, done by the caller), with
//   dense:     groups = 1 and C % 4 == 0 (any kernel, stride, padding, dilation);
//   depthwise: groups = C = O (one filter per channel).
//
// Arithmetic (bit for bit the reference of quanta/kernels/conv.py):
//   acc[p, o] = sum (x - zp) * w  = sum x * w - zp * sum w   (exact int32; a padded tap reads a
//               pixel of zp codes, i.e. the real value 0, as the reference pads x - zp with 0)
//   y = float32(acc) * float32(x_scale * w_scale[o]) + bias[o]   (float32)
//   y = relu(y) / clamp(y, 0, 6);  codes = clamp(round_half_even(y * (1 / out_scale)) + out_zp, 0, 255)
//
// A ConvPlan holds everything but the input (packed weights, per-channel constants, geometry), so
// that a call costs the kernel and one output allocation.
#include "common.h"

#include <cstring>

namespace quanta_native {
namespace {

struct Epilogue {
  const int32_t* corr;  // x_zp * sum of the channel's weights
  const float* mult;    // float32(x_scale * w_scale[o])
  const float* bias;    // bias[o], 0 without bias (adding +0.0 changes no value here: y is never -0.0)
  int post;             // 0 none, 1 relu, 2 relu6
  bool codes;           // uint8 output, else float32
  float inv, z;         // 1 / out_scale (float32), out_zp
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

#if QUANTA_VNNI
inline __mmask16 lanes(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }
inline __mmask64 bytes(int64_t n) { return n >= 64 ? ~__mmask64(0) : ((__mmask64(1) << n) - 1); }

// y of channels o .. o+15 from their int32 sums (before the correction), post-op applied
inline __m512 values16(__m512i acc, int64_t o, const Epilogue& e) {
  const __m512 a = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc, _mm512_loadu_si512(e.corr + o)));
  __m512 y = _mm512_add_ps(_mm512_mul_ps(a, _mm512_loadu_ps(e.mult + o)), _mm512_loadu_ps(e.bias + o));
  if (e.post) y = _mm512_max_ps(y, _mm512_setzero_ps());
  if (e.post == 2) y = _mm512_min_ps(y, _mm512_set1_ps(6.f));
  return y;
}

// the uint8 codes of y as int32 lanes in [0, 255]
inline __m512i codes16(__m512 y, const Epilogue& e) {
  __m512 q = _mm512_roundscale_ps(_mm512_mul_ps(y, _mm512_set1_ps(e.inv)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  q = _mm512_add_ps(q, _mm512_set1_ps(e.z));
  q = _mm512_min_ps(_mm512_max_ps(q, _mm512_setzero_ps()), _mm512_set1_ps(255.f));
  return _mm512_cvttps_epi32(q);
}

// NB (<= 4) blocks of 16 consecutive channels of one pixel, from channel o of `out` (a pixel's
// row of O values), stored up to channel O: uint8 codes packed into one 64-byte store, or floats.
template <int NB>
inline void store_blocks(const __m512i* acc, int64_t o, int64_t O, const Epilogue& e, char* out) {
  if (!e.codes) {
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j)
      if (o + j * 16 < O)
        _mm512_mask_storeu_ps(reinterpret_cast<float*>(out) + o + j * 16, lanes(O - o - j * 16),
                              values16(acc[j], o + j * 16, e));
    return;
  }
  __m512i c[4];
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) c[j] = j < NB ? codes16(values16(acc[j], o + j * 16, e), e) : _mm512_setzero_si512();
  // in-lane packs give, per 128-bit lane l, the l-th quarter of c0, c1, c2, c3: permute dwords back
  const __m512i packed = _mm512_packus_epi16(_mm512_packus_epi32(c[0], c[1]), _mm512_packus_epi32(c[2], c[3]));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  _mm512_mask_storeu_epi8(out + o, bytes(std::min<int64_t>(NB * 16, O - o)), _mm512_permutexvar_epi32(order, packed));
}

// ------------------------------------------------------------------------------------------ dense
constexpr int kMR = 6;         // output pixels per register tile
constexpr int kNB = 4;         // 16-channel blocks per register tile (64 output channels)
constexpr int64_t kChunk = 8;  // register tiles per parallel task, at most

// MR pixels x NB*16 channels. ptr[t * kMR + m]: the input pixel of tap t for pixel m; w: the tile's
// first 16-channel block of the packed weight [OB][T][C4][16][4], the next ones `wstride` bytes on.
// out: the tile's first pixel (rows of O values of esize bytes).
template <int MR, int NB>
void dense_tile(const uint8_t* const* ptr, int64_t T, int64_t C4, const int8_t* w, int64_t wstride, int64_t o0,
                int64_t O, const Epilogue& e, char* out, int64_t esize) {
  __m512i acc[MR][NB];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) acc[m][j] = _mm512_setzero_si512();
  for (int64_t t = 0; t < T; ++t) {
    const uint8_t* p[MR];
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) p[m] = ptr[t * kMR + m];
    const int8_t* wt = w + t * C4 * 64;
    for (int64_t c = 0; c < C4; ++c) {
      __m512i wv[NB];
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) wv[j] = _mm512_loadu_si512(wt + j * wstride + c * 64);
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) {
        int32_t v;
        std::memcpy(&v, p[m] + c * 4, 4);
        const __m512i xv = _mm512_set1_epi32(v);
#pragma GCC unroll 4
        for (int j = 0; j < NB; ++j) acc[m][j] = _mm512_dpbusd_epi32(acc[m][j], xv, wv[j]);
      }
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) store_blocks<NB>(acc[m], o0, O, e, out + m * O * esize);
}

using DenseTile = void (*)(const uint8_t* const*, int64_t, int64_t, const int8_t*, int64_t, int64_t, int64_t,
                           const Epilogue&, char*, int64_t);

template <int MR>
DenseTile dense_tile_for(int nb) {
  switch (nb) {
    case 1: return dense_tile<MR, 1>;
    case 2: return dense_tile<MR, 2>;
    case 3: return dense_tile<MR, 3>;
    default: return dense_tile<MR, 4>;
  }
}

DenseTile dense_tile_for(int mr, int nb) {
  switch (mr) {
    case 1: return dense_tile_for<1>(nb);
    case 2: return dense_tile_for<2>(nb);
    case 3: return dense_tile_for<3>(nb);
    case 4: return dense_tile_for<4>(nb);
    case 5: return dense_tile_for<5>(nb);
    default: return dense_tile_for<6>(nb);
  }
}

void dense_conv(const uint8_t* x, const Geometry& g, const int8_t* wpack, const uint8_t* pad, const Epilogue& e,
                char* out, int64_t esize) {
  const int64_t T = g.taps(), C4 = g.C / 4, OB = (g.O + 15) / 16, P = g.pixels(), plane = g.OH * g.OW;
  const int64_t wstride = T * C4 * 64;
  const int64_t tiles = (P + kMR - 1) / kMR, groups = (OB + kNB - 1) / kNB, threads = at::get_num_threads();
  // pixel chunks of at most kChunk tiles, at least 4 per thread where there are enough tiles, and
  // of equal sizes (at::parallel_for hands each thread a contiguous run of tasks: 5 chunks of
  // 8, 8, 8, 8, 1 tiles would give one thread 24 tiles and the other 9)
  int64_t chunks = std::min(tiles, std::max((tiles + kChunk - 1) / kChunk, 4 * threads));
  const int64_t chunk_tiles = (tiles + chunks - 1) / chunks;
  chunks = (tiles + chunk_tiles - 1) / chunk_tiles;
  // Tasks: kChunk tiles of pixels x a range of 64-channel groups. Weights that stay in L2: a task
  // takes all (or, with few pixel chunks, a share of) the groups, so a pixel's output row is
  // written by one thread (no false sharing) and its taps are found once. Larger weights: one
  // group per task, group-major, so that a thread keeps its weights while the pixels stream.
  const bool small = wstride * OB <= (256 << 10);
  const int64_t splits = small ? std::min(groups, std::max<int64_t>(1, (4 * threads + chunks - 1) / chunks)) : groups;
  const int64_t per = (groups + splits - 1) / splits;
  // a 1x1 convolution with unit stride and no padding reads pixel p for output pixel p
  const bool pointwise = T == 1 && g.SH == 1 && g.SW == 1 && g.PH == 0 && g.PW == 0;
  const std::vector<int64_t> off = g.tap_offsets();
  at::parallel_for(0, splits * chunks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<const uint8_t*> ptr(T * kMR);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t chunk = small ? task / splits : task % chunks, split = small ? task % splits : task / chunks;
      const int64_t gb = split * per, ge = std::min(groups, gb + per);
      const int64_t first = chunk * chunk_tiles * kMR, last = std::min(P, first + chunk_tiles * kMR);
      int64_t n = first / plane, oy = first % plane / g.OW, ox = first % g.OW;  // walks with the pixel
      for (int64_t p0 = first; p0 < last; p0 += kMR) {
        const int64_t mr = std::min<int64_t>(kMR, last - p0);
        for (int64_t m = 0; m < mr; ++m) {
          if (pointwise) {
            ptr[m] = x + (p0 + m) * g.C;
            continue;
          }
          g.taps_of(x, pad, off.data(), n, oy, ox, ptr.data() + m, kMR);
          if (++ox == g.OW) {
            ox = 0;
            if (++oy == g.OH) oy = 0, ++n;
          }
        }
        for (int64_t gi = gb; gi < ge; ++gi) {
          const int64_t ob = gi * kNB, nb = std::min<int64_t>(kNB, OB - ob);
          dense_tile_for(static_cast<int>(mr), static_cast<int>(nb))(
              ptr.data(), T, C4, wpack + ob * wstride, wstride, ob * 16, g.O, e, out + p0 * g.O * esize, esize);
        }
      }
    }
  });
}

// -------------------------------------------------------------------------------------- depthwise
// 64 channels x 4 taps per step: the taps' 64-byte loads A, B, C, D are interleaved in-lane into
// V_k, whose int32 lane (l, i) holds [a, b, c, d] of channel 16 l + 4 k + i, so that one vpdpbusd
// adds 4 taps' products of 16 channels. Weights are packed to match ([G][T/4][k][l][i][tap]),
// and the epilogue constants are stored in the same channel order (see ConvPlan); the in-lane
// packing of the codes (store_dw) restores the natural order.
inline void interleave4(__m512i a, __m512i b, __m512i c, __m512i d, __m512i* v) {
  const __m512i ab_lo = _mm512_unpacklo_epi8(a, b), ab_hi = _mm512_unpackhi_epi8(a, b);
  const __m512i cd_lo = _mm512_unpacklo_epi8(c, d), cd_hi = _mm512_unpackhi_epi8(c, d);
  v[0] = _mm512_unpacklo_epi16(ab_lo, cd_lo);
  v[1] = _mm512_unpackhi_epi16(ab_lo, cd_lo);
  v[2] = _mm512_unpacklo_epi16(ab_hi, cd_hi);
  v[3] = _mm512_unpackhi_epi16(ab_hi, cd_hi);
}

// channel of position p (0..63) of the interleaved order: p = 16 k + 4 l + i -> 16 l + 4 k + i
inline int64_t dw_channel(int64_t p) { return (p % 16) / 4 * 16 + p / 16 * 4 + p % 4; }

// The 64 channels from c0 of one pixel (row `out` of C values) from the sums acc[k] (position c0 + 16 k).
inline void store_dw(const __m512i* acc, int64_t c0, int64_t C, const Epilogue& e, char* out) {
  if (!e.codes) {
    alignas(64) float y[64];
    for (int k = 0; k < 4; ++k) _mm512_store_ps(y + 16 * k, values16(acc[k], c0 + 16 * k, e));
    float* o = reinterpret_cast<float*>(out) + c0;
    for (int64_t p = 0; p < 64; ++p)
      if (c0 + dw_channel(p) < C) o[dw_channel(p)] = y[p];
    return;
  }
  __m512i c[4];
#pragma GCC unroll 4
  for (int k = 0; k < 4; ++k) c[k] = codes16(values16(acc[k], c0 + 16 * k, e), e);
  // per 128-bit lane l: channels 16 l + 0..3 (c0), 4..7 (c1), 8..11 (c2), 12..15 (c3): in order
  const __m512i packed = _mm512_packus_epi16(_mm512_packus_epi32(c[0], c[1]), _mm512_packus_epi32(c[2], c[3]));
  _mm512_mask_storeu_epi8(out + c0, bytes(C - c0), packed);
}

// PX output pixels x the 64 channels from c0. ptr[px * T4 * 4 + t]: tap t's input pixel (taps
// past the kernel's read the pad pixel, with zero weights); w: the group's [T4][4][64] weights.
template <int PX>
void depthwise_tile(const uint8_t* const* ptr, int64_t T4, int64_t c0, int64_t C, const int8_t* w,
                    const Epilogue& e, char* const* out) {
  const __mmask64 mask = bytes(C - c0);
  __m512i acc[PX][4];
#pragma GCC unroll 4
  for (int px = 0; px < PX; ++px)
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) acc[px][k] = _mm512_setzero_si512();
  for (int64_t q = 0; q < T4; ++q) {
    __m512i wv[4];
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) wv[k] = _mm512_loadu_si512(w + (q * 4 + k) * 64);
#pragma GCC unroll 4
    for (int px = 0; px < PX; ++px) {
      const uint8_t* const* p = ptr + (px * T4 + q) * 4;
      __m512i v[4];
      interleave4(_mm512_maskz_loadu_epi8(mask, p[0] + c0), _mm512_maskz_loadu_epi8(mask, p[1] + c0),
                  _mm512_maskz_loadu_epi8(mask, p[2] + c0), _mm512_maskz_loadu_epi8(mask, p[3] + c0), v);
#pragma GCC unroll 4
      for (int k = 0; k < 4; ++k) acc[px][k] = _mm512_dpbusd_epi32(acc[px][k], v[k], wv[k]);
    }
  }
#pragma GCC unroll 4
  for (int px = 0; px < PX; ++px) store_dw(acc[px], c0, C, e, out[px]);
}

// At most 32 channels: two pixels per register, pixel a in 128-bit lanes 0-1 and pixel b in lanes
// 2-3 (the weights and constants repeat the 32 channels in lanes 2-3), so no lane is padding.
// NP pairs; ptr[(2 np + half) * T4 * 4 + t]; out[2 np + half] (null: no such pixel).
template <int NP>
void depthwise_pair_tile(const uint8_t* const* ptr, int64_t T4, int64_t C, const int8_t* w, const Epilogue& e,
                         char* const* out) {
  const __mmask32 mask = C >= 32 ? ~__mmask32(0) : __mmask32((1u << C) - 1);
  __m512i acc[NP][4];
#pragma GCC unroll 4
  for (int np = 0; np < NP; ++np)
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) acc[np][k] = _mm512_setzero_si512();
  for (int64_t q = 0; q < T4; ++q) {
    __m512i wv[4];
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) wv[k] = _mm512_loadu_si512(w + (q * 4 + k) * 64);
#pragma GCC unroll 4
    for (int np = 0; np < NP; ++np) {
      const uint8_t* const* pa = ptr + (2 * np * T4 + q) * 4;
      const uint8_t* const* pb = pa + T4 * 4;
      __m512i in[4], v[4];
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j)  // (32 channels and b's tap pixel right after a's: one load for both)
        in[j] = C == 32 && pb[j] == pa[j] + 32
                    ? _mm512_loadu_si512(pa[j])
                    : _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_maskz_loadu_epi8(mask, pa[j])),
                                         _mm256_maskz_loadu_epi8(mask, pb[j]), 1);
      interleave4(in[0], in[1], in[2], in[3], v);
#pragma GCC unroll 4
      for (int k = 0; k < 4; ++k) acc[np][k] = _mm512_dpbusd_epi32(acc[np][k], v[k], wv[k]);
    }
  }
  for (int np = 0; np < NP; ++np) {
    char* oa = out[2 * np];
    char* ob = out[2 * np + 1];
    if (!e.codes) {
      alignas(64) float y[64];
      for (int k = 0; k < 4; ++k) _mm512_store_ps(y + 16 * k, values16(acc[np][k], 16 * k, e));
      for (int64_t p = 0; p < 64; ++p) {
        const int64_t c = dw_channel(p);
        char* o = c < 32 ? oa : ob;
        if ((c & 31) < C && o) reinterpret_cast<float*>(o)[c & 31] = y[p];
      }
      continue;
    }
    __m512i c[4];
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) c[k] = codes16(values16(acc[np][k], 16 * k, e), e);
    const __m512i packed = _mm512_packus_epi16(_mm512_packus_epi32(c[0], c[1]), _mm512_packus_epi32(c[2], c[3]));
    _mm256_mask_storeu_epi8(oa, mask, _mm512_castsi512_si256(packed));
    if (ob) _mm256_mask_storeu_epi8(ob, mask, _mm512_extracti64x4_epi64(packed, 1));
  }
}

void depthwise_conv(const uint8_t* x, const Geometry& g, const int8_t* wpack, const uint8_t* pad,
                    const Epilogue& e, char* out, int64_t esize) {
  if (g.C <= 32) {  // pixel pairs, 4 pixels per register tile
    const int64_t T4 = (g.taps() + 3) / 4, rows = g.N * g.OH;
    const std::vector<int64_t> off = g.tap_offsets();
    at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
      std::vector<const uint8_t*> ptr(4 * T4 * 4, pad);
      for (int64_t row = r0; row < r1; ++row) {
        const int64_t n = row / g.OH, oy = row % g.OH;
        for (int64_t ox = 0; ox < g.OW; ox += 4) {
          const int64_t px = std::min<int64_t>(4, g.OW - ox);
          char* dst[4] = {nullptr, nullptr, nullptr, nullptr};
          for (int64_t i = 0; i < 4; ++i) {
            if (i < px) {
              dst[i] = out + ((row * g.OW) + ox + i) * g.O * esize;
              g.taps_of(x, pad, off.data(), n, oy, ox + i, ptr.data() + i * T4 * 4, 1);
            } else {
              std::fill(ptr.begin() + i * T4 * 4, ptr.begin() + (i + 1) * T4 * 4, pad);
            }
          }
          (px > 2 ? depthwise_pair_tile<2> : depthwise_pair_tile<1>)(ptr.data(), T4, g.C, wpack, e, dst);
        }
      }
    });
    return;
  }
  constexpr int64_t kPX = 2;  // pixels per register tile
  const int64_t T = g.taps(), T4 = (T + 3) / 4, groups = (g.C + 63) / 64, rows = g.N * g.OH;
  // tasks: an output row, split by 64 channels only where there are few rows (the taps' pointers
  // are found once per pixel for all the channels of a task)
  const int64_t splits = rows >= 4 * at::get_num_threads() ? 1 : groups, per = (groups + splits - 1) / splits;
  const std::vector<int64_t> off = g.tap_offsets();
  at::parallel_for(0, rows * splits, 1, [&](int64_t t0, int64_t t1) {
    std::vector<const uint8_t*> ptr(kPX * T4 * 4, pad);  // taps T .. 4 T4 - 1 stay on the pad pixel
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t row = task / splits, n = row / g.OH, oy = row % g.OH;
      const int64_t gb = task % splits * per, ge = std::min(groups, gb + per);
      for (int64_t ox = 0; ox < g.OW; ox += kPX) {
        const int64_t px = std::min(kPX, g.OW - ox);
        char* dst[kPX];
        for (int64_t i = 0; i < px; ++i) {
          dst[i] = out + ((row * g.OW) + ox + i) * g.O * esize;
          g.taps_of(x, pad, off.data(), n, oy, ox + i, ptr.data() + i * T4 * 4, 1);
        }
        for (int64_t gi = gb; gi < ge; ++gi)
          (px == 2 ? depthwise_tile<2> : depthwise_tile<1>)(ptr.data(), T4, gi * 64, g.C, wpack + gi * T4 * 256, e,
                                                             dst);
      }
    }
  });
}
#endif  // QUANTA_VNNI

// Everything of one convolution but its input (see the file comment).
class ConvPlan {
 public:
  // wpack: dense int8 [O / 16, T, C / 4, 16, 4] / depthwise int8 [C / 64, T / 4, 4, 64] (see
  // conv_native.pack_weight; channels and taps padded with zero weights); w_sum: int32 [O] (sum of each output channel's weights);
  // w_scale: float32 [O]; bias: float32 [O] or None; post: 0 none / 1 relu / 2 relu6;
  // out_scale None: float32 output, else uint8 codes on (out_scale, out_zp).
  ConvPlan(torch::Tensor wpack, const torch::Tensor& w_sum, double x_scale, int64_t x_zp,
           const torch::Tensor& w_scale, const c10::optional<torch::Tensor>& bias, int64_t C, int64_t O,
           std::vector<int64_t> kernel, std::vector<int64_t> stride, std::vector<int64_t> padding,
           std::vector<int64_t> dilation, bool depthwise, int64_t post, c10::optional<double> out_scale,
           int64_t out_zp)
      : wpack_(std::move(wpack)), depthwise_(depthwise), C_(C), O_(O), x_zp_(x_zp), post_(post),
        codes_(out_scale.has_value()) {
    TORCH_CHECK(QUANTA_VNNI, "ConvPlan: this build has no AVX-512 VNNI");
    TORCH_CHECK(kernel.size() == 2 && stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
                "ConvPlan: kernel, stride, padding and dilation need 2 values each");
    geo_ = {0, C, 0, 0, O, 0, 0, kernel[0], kernel[1], stride[0], stride[1], padding[0], padding[1], dilation[0],
            dilation[1]};
    const int64_t T = geo_.taps(), O16 = (O + 15) / 16 * 16;
    TORCH_CHECK(T > 0 && geo_.SH > 0 && geo_.SW > 0 && geo_.PH >= 0 && geo_.PW >= 0 && geo_.DH > 0 && geo_.DW > 0,
                "ConvPlan: invalid kernel / stride / padding / dilation");
    TORCH_CHECK(0 <= x_zp && x_zp <= 255 && post >= 0 && post <= 2 && 0 <= out_zp && out_zp <= 255,
                "ConvPlan: zero points must be uint8 codes and post 0, 1 or 2");
    TORCH_CHECK(!depthwise || C == O, "ConvPlan: a depthwise conv has as many outputs as inputs");
    TORCH_CHECK(depthwise || C % 4 == 0, "ConvPlan: a dense conv needs a multiple of 4 input channels");
    const int64_t O64 = (O + 63) / 64 * 64;
    const std::vector<int64_t> shape = depthwise ? std::vector<int64_t>{O64 / 64, (T + 3) / 4, 4, 64}
                                                 : std::vector<int64_t>{O16 / 16, T, C / 4, 16, 4};
    TORCH_CHECK(wpack_.scalar_type() == torch::kInt8 && wpack_.is_contiguous() && wpack_.sizes().vec() == shape,
                "ConvPlan: wpack must be contiguous int8 ", c10::IntArrayRef(shape), ", got ", wpack_.sizes());
    const float* b = check_epilogue("ConvPlan", 1, O, torch::zeros({1}, torch::kInt32), w_sum,
                                    torch::ones({1}, torch::kFloat32), w_scale, bias);
    corr_.assign(O64, 0);
    mult_.assign(O64, 0.f);
    bias_.assign(O64, 0.f);
    for (int64_t p = 0; p < O64; ++p) {  // position p holds channel o (depthwise: the interleaved order)
#if QUANTA_VNNI
      // (at most 32 channels: lanes 2-3 repeat channels 0-31 for a second pixel)
      const int64_t o = !depthwise ? p : C <= 32 ? dw_channel(p % 64) & 31 : p / 64 * 64 + dw_channel(p % 64);
#else
      const int64_t o = p;
#endif
      if (o >= O) continue;
      corr_[p] = static_cast<int32_t>(x_zp * w_sum.data_ptr<int32_t>()[o]);
      mult_[p] = static_cast<float>(x_scale * static_cast<double>(w_scale.data_ptr<float>()[o]));
      bias_[p] = b ? b[o] : 0.f;
    }
    pad_.assign((C + 63) / 64 * 64 + 64, static_cast<uint8_t>(x_zp));
    inv_ = codes_ ? 1.f / static_cast<float>(*out_scale) : 1.f;
    z_ = static_cast<float>(out_zp);
  }

  // x: uint8 [N, C, H, W] in channels-last memory order -> [N, O, OH, OW] channels-last.
  torch::Tensor run(const torch::Tensor& x) const {
    TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kUInt8 && x.dim() == 4 && x.size(1) == C_ &&
                x.is_contiguous(at::MemoryFormat::ChannelsLast),
                "ConvPlan.run: x must be channels-last uint8 codes [N, ", C_, ", H, W], got ", x.scalar_type(), " ",
                x.sizes());
    Geometry g = geo_;
    g.N = x.size(0);
    g.H = x.size(2);
    g.W = x.size(3);
    g.OH = (g.H + 2 * g.PH - g.DH * (g.KH - 1) - 1) / g.SH + 1;
    g.OW = (g.W + 2 * g.PW - g.DW * (g.KW - 1) - 1) / g.SW + 1;
    TORCH_CHECK(g.OH > 0 && g.OW > 0, "ConvPlan.run: input ", x.sizes(), " is smaller than the kernel");
    auto out = torch::empty({g.N, O_, g.OH, g.OW},
                            x.options().dtype(codes_ ? torch::kUInt8 : torch::kFloat32).memory_format(at::MemoryFormat::ChannelsLast));
#if QUANTA_VNNI
    const Epilogue e{corr_.data(), mult_.data(), bias_.data(), static_cast<int>(post_), codes_, inv_, z_};
    char* dst = static_cast<char*>(out.data_ptr());
    const int64_t esize = codes_ ? 1 : 4;
    if (g.pixels() > 0) {
      if (depthwise_)
        depthwise_conv(x.data_ptr<uint8_t>(), g, wpack_.data_ptr<int8_t>(), pad_.data(), e, dst, esize);
      else
        dense_conv(x.data_ptr<uint8_t>(), g, wpack_.data_ptr<int8_t>(), pad_.data(), e, dst, esize);
    }
#endif
    return out;
  }

 private:
  torch::Tensor wpack_;
  bool depthwise_;
  int64_t C_, O_, x_zp_, post_;
  bool codes_;
  Geometry geo_{};
  std::vector<int32_t> corr_;
  std::vector<float> mult_, bias_;
  std::vector<uint8_t> pad_;
  float inv_ = 1.f, z_ = 0.f;
};

// out[w * C + c] = row[c * W + w]: channel-major rows to pixel-major
template <int C>
void interleave(const uint8_t* __restrict__ row, uint8_t* __restrict__ out, int64_t W) {
  for (int64_t w = 0; w < W; ++w)
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) out[w * C + c] = row[c * W + w];
}

// uint8 codes clamp(round(x * inv) + zp, qmin, qmax) of a contiguous NCHW float32 x, written in
// channels-last memory order (what the convolutions read): one pass, where quantizing and then
// torch's channels-last copy cost two (the copy alone ~95 us for a 3 x 224 x 224 image).
torch::Tensor quantize_to_channels_last(const torch::Tensor& x, double inv, int64_t zero_point, int64_t qmin,
                                        int64_t qmax) {
  check_float_input(x, "quantize_to_channels_last");
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(), "quantize_to_channels_last: needs a contiguous [N, C, H, W] tensor");
  TORCH_CHECK(0 <= qmin && qmin <= qmax && qmax <= 255, "quantize_to_channels_last: [qmin, qmax] must lie in [0, 255]");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  auto out = torch::empty({N, C, H, W}, x.options().dtype(torch::kUInt8).memory_format(at::MemoryFormat::ChannelsLast));
  const float* src = x.data_ptr<float>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  const float finv = static_cast<float>(inv), z = static_cast<float>(zero_point);
  const float lo = static_cast<float>(qmin), hi = static_cast<float>(qmax);
  at::parallel_for(0, N * H, 8, [&](int64_t r0, int64_t r1) {
    std::vector<uint8_t> row(C * W);  // one image row, channel-major
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / H, h = r % H;
      for (int64_t c = 0; c < C; ++c)
        quantize_span<uint8_t>(src + ((n * C + c) * H + h) * W, row.data() + c * W, W, finv, z, lo, hi);
      uint8_t* o = dst + r * W * C;
      if (C == 3)  // (RGB images: a compile-time channel count lets the compiler vectorize the interleave)
        interleave<3>(row.data(), o, W);
      else if (C == 4)
        interleave<4>(row.data(), o, W);
      else
        for (int64_t w = 0; w < W; ++w)
          for (int64_t c = 0; c < C; ++c) o[w * C + c] = row[c * W + w];
    }
  });
  return out;
}

}  // namespace

void bind_conv(pybind11::module& m) {
  m.def("quantize_to_channels_last", &quantize_to_channels_last,
        "static per-tensor uint8 quantization of NCHW float32 into channels-last codes");
  pybind11::class_<ConvPlan>(m, "ConvPlan", "a direct int8 convolution with everything but its input settled")
      .def(pybind11::init<torch::Tensor, const torch::Tensor&, double, int64_t, const torch::Tensor&,
                          const c10::optional<torch::Tensor>&, int64_t, int64_t, std::vector<int64_t>,
                          std::vector<int64_t>, std::vector<int64_t>, std::vector<int64_t>, bool, int64_t,
                          c10::optional<double>, int64_t>())
      .def("run", &ConvPlan::run, "the convolution of channels-last uint8 codes x");
}

}  // namespace quanta_native
