// The dense VNNI loop: register tiles of 6 output pixels (rows) x 64 channels, vpdpbusd on 4 input
// channels, weights packed [O/16][taps][C/4][16][4]. It runs the direct int8 convolution
// (groups = 1, C % 4 == 0; uint8 codes, per-channel epilogue) and, as a 1x1 convolution of one
// pixel per row, the int8 linear (int8 codes read as uint8 + 128, per-row epilogue: dense_gemm).
#include "conv_kernels.h"

#include <cstring>

namespace quanta_native {
#if QUANTA_VNNI
namespace {

constexpr int kMR = 6;         // output pixels per register tile
constexpr int kNB = 4;         // 16-channel blocks per register tile (64 output channels)
constexpr int64_t kChunk = 8;  // register tiles per parallel task, at most

// Where a tile's sums go. Store::kFlip: XORed into every 4 input bytes (0x80808080 reads int8
// codes as uint8 + 128); store<NB>(acc, p, o0): the NB blocks of 16 sums of pixel p from channel o0.
struct ConvStore {  // conv: the per-channel Epilogue, uint8 codes or float32 out
  static constexpr uint32_t kFlip = 0;
  const Epilogue& e;
  char* out;
  int64_t O, esize;
  template <int NB>
  void store(const __m512i* acc, int64_t p, int64_t o0) const { store_blocks<NB>(acc, o0, O, e, out + p * O * esize); }
};

struct RowStore {  // linear: the per-row epilogue of rescale_rows, float32 out
  static constexpr uint32_t kFlip = 0x80808080u;
  const RowEpilogue& r;
  template <int NB>
  void store(const __m512i* acc, int64_t m, int64_t o0) const {
    const __m512i z = _mm512_set1_epi32(r.zp[r.zrow ? m : 0] + 128);  // the codes were read + 128
    const __m512 s = _mm512_set1_ps(r.xs[r.srow ? m : 0]);
    float* row = r.out + m * r.N;
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) {
      const int64_t o = o0 + j * 16;
      if (o >= r.N) break;
      const __mmask16 k = lanes(r.N - o);
      const __m512i a = _mm512_sub_epi32(acc[j], _mm512_mullo_epi32(z, _mm512_maskz_loadu_epi32(k, r.ws + o)));
      __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(a), s), _mm512_maskz_loadu_ps(k, r.wsc + o));
      if (r.bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(k, r.bias + o));
      switch (r.post) {
        case kPostRelu: v = act::apply16<kPostRelu>(v); break;
        case kPostGelu: v = act::apply16<kPostGelu>(v); break;
        case kPostGeluTanh: v = act::apply16<kPostGeluTanh>(v); break;
        default: break;
      }
      _mm512_mask_storeu_ps(row + o, k, v);
    }
  }
};

// MR pixels x NB*16 channels. ptr[t * kMR + m]: the input pixel of tap t for pixel m; w: the tile's
// first 16-channel block of the packed weight [OB][T][C4][16][4], the next ones `wstride` bytes on.
// p0: the tile's first pixel.
template <int MR, int NB, class Store>
void dense_tile(const uint8_t* const* ptr, int64_t T, int64_t C4, const int8_t* w, int64_t wstride, int64_t o0,
                int64_t p0, const Store& st) {
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
        const __m512i xv = _mm512_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(v) ^ Store::kFlip));
#pragma GCC unroll 4
        for (int j = 0; j < NB; ++j) acc[m][j] = _mm512_dpbusd_epi32(acc[m][j], xv, wv[j]);
      }
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) st.template store<NB>(acc[m], p0 + m, o0);
}

template <class Store>
using DenseTile = void (*)(const uint8_t* const*, int64_t, int64_t, const int8_t*, int64_t, int64_t, int64_t,
                           const Store&);

template <int MR, class Store>
DenseTile<Store> dense_tile_for(int nb) {
  switch (nb) {
    case 1: return dense_tile<MR, 1, Store>;
    case 2: return dense_tile<MR, 2, Store>;
    case 3: return dense_tile<MR, 3, Store>;
    default: return dense_tile<MR, 4, Store>;
  }
}

template <class Store>
DenseTile<Store> dense_tile_for(int mr, int nb) {
  switch (mr) {
    case 1: return dense_tile_for<1, Store>(nb);
    case 2: return dense_tile_for<2, Store>(nb);
    case 3: return dense_tile_for<3, Store>(nb);
    case 4: return dense_tile_for<4, Store>(nb);
    case 5: return dense_tile_for<5, Store>(nb);
    default: return dense_tile_for<6, Store>(nb);
  }
}

template <class Store>
void dense_loop(const uint8_t* x, const Geometry& g, const int8_t* wpack, const uint8_t* pad, const Store& st) {
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
          dense_tile_for<Store>(static_cast<int>(mr), static_cast<int>(nb))(ptr.data(), T, C4, wpack + ob * wstride,
                                                                            wstride, ob * 16, p0, st);
        }
      }
    }
  });
}

}  // namespace

void dense_conv(const uint8_t* x, const Geometry& g, const int8_t* wpack, const uint8_t* pad, const Epilogue& e,
                char* out, int64_t esize) {
  dense_loop(x, g, wpack, pad, ConvStore{e, out, g.O, esize});
}

void dense_gemm(const int8_t* x, int64_t M, int64_t K, const int8_t* wpack, const RowEpilogue& r) {
  // a 1x1 convolution with unit stride of M pixels of K channels: every tap inside the image
  const Geometry g{1, K, 1, M, r.N, 1, M, 1, 1, 1, 1, 0, 0, 1, 1};
  dense_loop(reinterpret_cast<const uint8_t*>(x), g, wpack, nullptr, RowStore{r});
}
#endif  // QUANTA_VNNI
}  // namespace quanta_native
