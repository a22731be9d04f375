// The direct int8 convolution's dense loop (groups = 1, C % 4 == 0): register tiles of 6 output
// pixels x 64 channels, vpdpbusd on 4 input channels, weights packed [O/16][taps][C/4][16][4].
#include "conv_kernels.h"

#include <cstring>

namespace quanta_native {
#if QUANTA_VNNI
namespace {

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

}  // namespace

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
#endif  // QUANTA_VNNI
}  // namespace quanta_native
