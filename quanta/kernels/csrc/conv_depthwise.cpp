// The direct int8 convolution's depthwise loop (groups = C = O).
#include "conv_kernels.h"

namespace quanta_native {
#if QUANTA_VNNI
namespace {

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

// The float values (post-op applied) of the sums acc[k] (constants at position c0 + 16 k), stored
// in the interleaved order: y[p] is channel c0 + dw_channel(p).
inline void dw_values(const __m512i* acc, int64_t c0, const Epilogue& e, float* y) {
  for (int k = 0; k < 4; ++k) _mm512_store_ps(y + 16 * k, values16(acc[k], c0 + 16 * k, e));
}

// The uint8 codes of the sums acc[k] in natural channel order: per 128-bit lane l, channels
// 16 l + 0..3 (acc[0]), 4..7 (acc[1]), 8..11 (acc[2]), 12..15 (acc[3]), as the in-lane packs give them.
inline __m512i dw_codes(const __m512i* acc, int64_t c0, const Epilogue& e) {
  __m512i c[4];
#pragma GCC unroll 4
  for (int k = 0; k < 4; ++k) c[k] = codes16(values16(acc[k], c0 + 16 * k, e), e);
  return _mm512_packus_epi16(_mm512_packus_epi32(c[0], c[1]), _mm512_packus_epi32(c[2], c[3]));
}

// acc[n][k] += the T4 steps of 4 taps for N registers of inputs: load(n, q, in) fills in[0..3]
// with the 64-byte inputs of taps 4 q .. 4 q + 3 for register n; w: [T4][4][64] weights.
template <int N, typename Load>
inline void dw_accumulate(int64_t T4, const int8_t* w, __m512i (*acc)[4], Load load) {
#pragma GCC unroll 4
  for (int n = 0; n < N; ++n)
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) acc[n][k] = _mm512_setzero_si512();
  for (int64_t q = 0; q < T4; ++q) {
    __m512i wv[4];
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) wv[k] = _mm512_loadu_si512(w + (q * 4 + k) * 64);
#pragma GCC unroll 4
    for (int n = 0; n < N; ++n) {
      __m512i in[4], v[4];
      load(n, q, in);
      interleave4(in[0], in[1], in[2], in[3], v);
#pragma GCC unroll 4
      for (int k = 0; k < 4; ++k) acc[n][k] = _mm512_dpbusd_epi32(acc[n][k], v[k], wv[k]);
    }
  }
}

// PX output pixels x the 64 channels from c0. ptr[px * T4 * 4 + t]: tap t's input pixel (taps
// past the kernel's read the pad pixel, with zero weights); w: the group's [T4][4][64] weights;
// out[px]: the pixel's output row of C values.
template <int PX>
void depthwise_tile(const uint8_t* const* ptr, int64_t T4, int64_t c0, int64_t C, const int8_t* w,
                    const Epilogue& e, char* const* out) {
  const __mmask64 mask = bytes(C - c0);
  __m512i acc[PX][4];
  dw_accumulate<PX>(T4, w, acc, [&](int px, int64_t q, __m512i* in) {
    const uint8_t* const* p = ptr + (px * T4 + q) * 4;
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) in[j] = _mm512_maskz_loadu_epi8(mask, p[j] + c0);
  });
  for (int px = 0; px < PX; ++px) {
    if (e.codes) {
      _mm512_mask_storeu_epi8(out[px] + c0, mask, dw_codes(acc[px], c0, e));
      continue;
    }
    alignas(64) float y[64];
    dw_values(acc[px], c0, e, y);
    float* o = reinterpret_cast<float*>(out[px]) + c0;
    for (int64_t p = 0; p < 64; ++p)
      if (c0 + dw_channel(p) < C) o[dw_channel(p)] = y[p];
  }
}

// At most 32 channels: two pixels per register, pixel a in 128-bit lanes 0-1 and pixel b in lanes
// 2-3 (the weights and constants repeat the 32 channels in lanes 2-3), so no lane is padding.
// NP pairs; ptr[(2 np + half) * T4 * 4 + t]; out[2 np + half] (null: no such pixel).
template <int NP>
void depthwise_pair_tile(const uint8_t* const* ptr, int64_t T4, int64_t C, const int8_t* w, const Epilogue& e,
                         char* const* out) {
  const __mmask32 mask = C >= 32 ? ~__mmask32(0) : __mmask32((1u << C) - 1);
  __m512i acc[NP][4];
  dw_accumulate<NP>(T4, w, acc, [&](int np, int64_t q, __m512i* in) {
    const uint8_t* const* pa = ptr + (2 * np * T4 + q) * 4;
    const uint8_t* const* pb = pa + T4 * 4;
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j)  // (32 channels and b's tap pixel right after a's: one load for both)
      in[j] = C == 32 && pb[j] == pa[j] + 32
                  ? _mm512_loadu_si512(pa[j])
                  : _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_maskz_loadu_epi8(mask, pa[j])),
                                       _mm256_maskz_loadu_epi8(mask, pb[j]), 1);
  });
  for (int np = 0; np < NP; ++np) {
    char* oa = out[2 * np];
    char* ob = out[2 * np + 1];
    if (e.codes) {
      const __m512i packed = dw_codes(acc[np], 0, e);
      _mm256_mask_storeu_epi8(oa, mask, _mm512_castsi512_si256(packed));
      if (ob) _mm256_mask_storeu_epi8(ob, mask, _mm512_extracti64x4_epi64(packed, 1));
      continue;
    }
    alignas(64) float y[64];
    dw_values(acc[np], 0, e, y);
    for (int64_t p = 0; p < 64; ++p) {
      const int64_t c = dw_channel(p);
      char* o = c < 32 ? oa : ob;
      if ((c & 31) < C && o) reinterpret_cast<float*>(o)[c & 31] = y[p];
    }
  }
}

}  // namespace

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
}  // namespace quanta_native
