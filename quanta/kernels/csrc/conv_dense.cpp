// The dense VNNI loop: register tiles of 6 output pixels (rows) x 64 channels, vpdpbusd on 4 input
// channels, weights packed [O/16][taps][C/4][16][4]. It runs the direct int8 convolution
// (groups = 1, C % 4 == 0; uint8 codes, per-channel epilogue) and, as a 1x1 convolution of one
// pixel per row, the int8 linear (int8 codes read as uint8 + 128, per-row epilogue: dense_gemm).
// Without VNNI (AVX2) the convolution's tiles are 4 pixels x 16 channels in 256-bit vectors (8 of
// AVX2's 16 registers hold the sums), vpmaddubsw + vpmaddwd in place of vpdpbusd: exact only for
// weights within +-64 (ConvPlan checks); the segments, tasks and weight layout are the same.
#include "conv_kernels.h"

#include <cstring>

namespace quanta_native {
#if QUANTA_VNNI || QUANTA_AVX2
namespace {

#if QUANTA_VNNI
constexpr int kMR = 6;         // output pixels per register tile
constexpr int kNB = 4;         // 16-channel blocks per register tile (64 output channels)
#else
constexpr int kMR = 4;
constexpr int kNB = 1;
#endif
constexpr int64_t kChunk = 8;  // register tiles per parallel task, at most

#if QUANTA_VNNI
// Where a tile's sums go. Store::kFlip: XORed into every 4 input bytes (0x80808080 reads int8
// codes as uint8 + 128); init<NB>(acc, o0): the sums' starting values for channels o0 ..;
// store<NB>(acc, p, o0): the NB blocks of 16 sums of pixel p from channel o0.
struct ConvStore {  // conv: the per-channel Epilogue, uint8 codes or float32 out
  static constexpr uint32_t kFlip = 0;
  const Epilogue& e;
  char* out;
  int64_t O, esize;
  template <int NB>  // -corr (zp * sum w): the sums come out corrected (int32 wraps exactly)
  void init(__m512i* acc, int64_t o0) const {
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j)
      acc[j] = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_loadu_si512(e.corr + o0 + j * 16));
  }
  template <int NB>
  void store(const __m512i* acc, int64_t p, int64_t o0) const { store_blocks<NB>(acc, o0, O, e, out + p * O * esize); }
};

struct RowStore {  // linear: the per-row epilogue of rescale_rows, float32 out
  static constexpr uint32_t kFlip = 0x80808080u;
  const RowEpilogue& r;
  template <int NB>  // (the correction depends on the row: applied in store)
  void init(__m512i* acc, int64_t) const {
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) acc[j] = _mm512_setzero_si512();
  }
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

// MR pixels x NB*16 channels. ptr[i * kMR + m]: the input pixel of the i-th of the nt taps read
// (weight tap taps[i]) for pixel m; w: the tile's first 16-channel block of the packed weight
// [OB][T][C4][16][4], the next ones `wstride` bytes on. pix[m]: pixel m's output index.
template <int MR, int NB, class Store>
void dense_tile(const uint8_t* const* ptr, const int64_t* taps, int64_t nt, int64_t C4, const int8_t* w,
                int64_t wstride, int64_t o0, const int64_t* pix, const Store& st) {
  __m512i acc[MR][NB], start[NB];
  st.template init<NB>(start, o0);
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) acc[m][j] = start[j];
  for (int64_t i = 0; i < nt; ++i) {
    const uint8_t* p[MR];
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) p[m] = ptr[i * kMR + m];
    const int8_t* wt = w + taps[i] * C4 * 64;
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
  for (int m = 0; m < MR; ++m) st.template store<NB>(acc[m], pix[m], o0);
}

template <class Store>
using DenseTile = void (*)(const uint8_t* const*, const int64_t*, int64_t, int64_t, const int8_t*, int64_t, int64_t,
                           const int64_t*, const Store&);

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
#else  // AVX2

struct ConvStore {  // the per-channel Epilogue, uint8 codes or float32 out; sums in 8-lane halves
  static constexpr uint32_t kFlip = 0;
  const Epilogue& e;
  char* out;
  int64_t O, esize;
  template <int NB>  // -corr (zp * sum w): the sums come out corrected (int32 wraps exactly)
  void init(__m256i* acc, int64_t o0) const {
    for (int j = 0; j < 2 * NB; ++j)
      acc[j] = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(e.corr + o0 + 8 * j)));
  }
  template <int NB>
  void store(const __m256i* acc, int64_t p, int64_t o0) const {
    for (int j = 0; j < NB; ++j) quanta_native::store16(acc + 2 * j, o0 + 16 * j, O, e, out + p * O * esize);
  }
  // pixels p and q's 16 channels from o0 (one block each): store16x2 shares the codes' packing
  void store_pair(const __m256i* a, const __m256i* b, int64_t p, int64_t q, int64_t o0) const {
    store16x2(a, b, o0, O, e, out + p * O * esize, out + q * O * esize);
  }
};

// dense_tile (above) on AVX2: MR pixels x NB blocks of 16 channels, each block's 64 packed bytes
// (16 channels x 4 inputs) in two 256-bit halves of 8 channels
template <int MR, int NB, class Store>
void dense_tile(const uint8_t* const* ptr, const int64_t* taps, int64_t nt, int64_t C4, const int8_t* w,
                int64_t wstride, int64_t o0, const int64_t* pix, const Store& st) {
  __m256i acc[MR][2 * NB], start[2 * NB];
  st.template init<NB>(start, o0);
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < 2 * NB; ++j) acc[m][j] = start[j];
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t i = 0; i < nt; ++i) {
    const uint8_t* p[MR];
    for (int m = 0; m < MR; ++m) p[m] = ptr[i * kMR + m];
    const int8_t* wt = w + taps[i] * C4 * 64;
    for (int64_t c = 0; c < C4; ++c) {
      __m256i wv[2 * NB];
      for (int j = 0; j < 2 * NB; ++j)
        wv[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wt + j / 2 * wstride + c * 64 + j % 2 * 32));
      for (int m = 0; m < MR; ++m) {
        int32_t v;
        std::memcpy(&v, p[m] + c * 4, 4);
        const __m256i xv = _mm256_set1_epi32(v);
        for (int j = 0; j < 2 * NB; ++j)  // vpdpbusd's 4-product sums: exact for weights within +-64
          acc[m][j] = _mm256_add_epi32(acc[m][j], _mm256_madd_epi16(_mm256_maddubs_epi16(xv, wv[j]), ones));
      }
    }
  }
  int m = 0;
  if constexpr (NB == 1)  // pixels in pairs: half the codes' packing work
    for (; m + 1 < MR; m += 2) st.store_pair(acc[m], acc[m + 1], pix[m], pix[m + 1], o0);
  for (; m < MR; ++m) st.template store<NB>(acc[m], pix[m], o0);
}

template <class Store>
using DenseTile = void (*)(const uint8_t* const*, const int64_t*, int64_t, int64_t, const int8_t*, int64_t, int64_t,
                           const int64_t*, const Store&);

template <class Store>
DenseTile<Store> dense_tile_for(int mr, int) {
  switch (mr) {
    case 1: return dense_tile<1, 1, Store>;
    case 2: return dense_tile<2, 1, Store>;
    case 3: return dense_tile<3, 1, Store>;
    default: return dense_tile<4, 1, Store>;
  }
}
#endif  // QUANTA_VNNI

// Output positions along one dimension that see the same taps inside the image, [k0, k1): the
// run of output rows (or columns) [a, b).
struct Run {
  int64_t a, b, k0, k1;
};

std::vector<Run> runs_of(int64_t out, int64_t in, int64_t K, int64_t S, int64_t P, int64_t D) {
  std::vector<Run> runs;
  for (int64_t o = 0; o < out; ++o) {
    const int64_t i0 = o * S - P;
    int64_t k0 = 0, k1 = K;
    while (k0 < K && i0 + k0 * D < 0) ++k0;
    while (k1 > k0 && i0 + (k1 - 1) * D >= in) --k1;
    if (!runs.empty() && runs.back().b == o && runs.back().k0 == k0 && runs.back().k1 == k1)
      runs.back().b = o + 1;
    else
      runs.push_back({o, o + 1, k0, k1});
  }
  return runs;
}

// Output pixels (every image, rows [ya, yb), columns [xa, xb); flattened image-major) that read
// the same taps: `taps` (weight tap indices), at `off` bytes from the pixel's first tap position.
// The segment's tiles are global tiles first_tile, first_tile + 1, ...
struct Segment {
  int64_t ya, yb, xa, xb, count, first_tile;
  std::vector<int64_t> taps, off;
};

// The segments of a convolution. Padding reads a pixel of zero-point codes; with a zero point of
// 0 such a tap adds nothing to the sums, so pixels are grouped by the taps that fall inside the
// image and only those are read (ResNet's 3x3 convs on 7x7 inputs: 18% of the taps are padding).
// Otherwise (or without padding) one segment holds every pixel, with the pad pixel read
// (`padded` true: taps_of finds each pixel's pointers).
std::vector<Segment> segments_of(const Geometry& g, bool skip_padding, bool& padded) {
  const int64_t S = g.C;
  std::vector<Segment> segs;
  padded = false;
  if (!skip_padding && (g.PH > 0 || g.PW > 0)) {
    padded = true;
    Segment all{0, g.OH, 0, g.OW, g.pixels(), 0, {}, g.tap_offsets()};
    for (int64_t t = 0; t < g.taps(); ++t) all.taps.push_back(t);
    segs.push_back(std::move(all));
    return segs;
  }
  const std::vector<Run> rows = runs_of(g.OH, g.H, g.KH, g.SH, g.PH, g.DH);
  const std::vector<Run> cols = runs_of(g.OW, g.W, g.KW, g.SW, g.PW, g.DW);
  int64_t tiles = 0;
  for (const Run& r : rows)
    for (const Run& c : cols) {
      Segment sg{r.a, r.b, c.a, c.b, g.N * (r.b - r.a) * (c.b - c.a), tiles, {}, {}};
      for (int64_t ky = r.k0; ky < r.k1; ++ky)
        for (int64_t kx = c.k0; kx < c.k1; ++kx) {
          sg.taps.push_back(ky * g.KW + kx);
          sg.off.push_back((ky * g.DH * g.W + kx * g.DW) * S);
        }
      tiles += (sg.count + kMR - 1) / kMR;
      segs.push_back(std::move(sg));
    }
  return segs;
}

template <class Store>
void dense_loop(const uint8_t* x, const Geometry& g, const int8_t* wpack, const uint8_t* pad, bool skip_padding,
                const Store& st) {
  const int64_t T = g.taps(), C4 = g.C / 4, OB = (g.O + 15) / 16, S = g.C;
  const int64_t wstride = T * C4 * 64;
  // a 1x1 convolution with unit stride and no padding reads pixel p for output pixel p
  const bool pointwise = T == 1 && g.SH == 1 && g.SW == 1 && g.PH == 0 && g.PW == 0;
  bool padded = false;
  std::vector<Segment> segs;
  if (pointwise)
    segs.push_back({0, g.OH, 0, g.OW, g.pixels(), 0, {0}, {0}});
  else
    segs = segments_of(g, skip_padding, padded);
  const Segment& last_seg = segs.back();
  const int64_t tiles = last_seg.first_tile + (last_seg.count + kMR - 1) / kMR;
  const int64_t groups = (OB + kNB - 1) / kNB, threads = at::get_num_threads();
  // tile chunks of at most kChunk tiles, at least 4 per thread where there are enough tiles, and
  // of equal sizes (5 chunks of 8, 8, 8, 8, 1 tiles would end with one thread's lone chunk of 8);
  // the threads claim them one by one (parallel_claimed: a slowed thread takes fewer)
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
  parallel_claimed(splits * chunks, [&](const auto& claim) {
    const NearestRounding rounding;  // (the epilogue's conversions round half to even)
    std::vector<const uint8_t*> ptr(T * kMR);
    int64_t pix[kMR];
    for (int64_t task; (task = claim()) >= 0;) {
      const int64_t chunk = small ? task / splits : task % chunks, split = small ? task % splits : task / chunks;
      const int64_t gb = split * per, ge = std::min(groups, gb + per);
      const int64_t tb = chunk * chunk_tiles, te = std::min(tiles, tb + chunk_tiles);
      size_t si = 0;
      while (si + 1 < segs.size() && segs[si + 1].first_tile <= tb) ++si;
      for (int64_t tile = tb; tile < te; ++tile) {
        while (si + 1 < segs.size() && segs[si + 1].first_tile <= tile) ++si;
        const Segment& sg = segs[si];
        const int64_t k0 = (tile - sg.first_tile) * kMR, mr = std::min<int64_t>(kMR, sg.count - k0);
        const int64_t cw = sg.xb - sg.xa, plane = (sg.yb - sg.ya) * cw, nt = static_cast<int64_t>(sg.taps.size());
        int64_t n = k0 / plane, oy = sg.ya + k0 % plane / cw, ox = sg.xa + k0 % cw;  // walks with the pixel
        for (int64_t m = 0; m < mr; ++m) {
          const int64_t p = (n * g.OH + oy) * g.OW + ox;
          pix[m] = p;
          if (pointwise) {
            ptr[m] = x + p * S;
          } else if (padded) {
            g.taps_of(x, pad, sg.off.data(), n, oy, ox, ptr.data() + m, kMR);
          } else {
            const int64_t base = ((n * g.H + oy * g.SH - g.PH) * g.W + ox * g.SW - g.PW) * S;
            for (int64_t i = 0; i < nt; ++i) ptr[i * kMR + m] = x + (base + sg.off[i]);
          }
          if (++ox == sg.xb) {
            ox = sg.xa;
            if (++oy == sg.yb) oy = sg.ya, ++n;
          }
        }
        for (int64_t gi = gb; gi < ge; ++gi) {
          const int64_t ob = gi * kNB, nb = std::min<int64_t>(kNB, OB - ob);
          dense_tile_for<Store>(static_cast<int>(mr), static_cast<int>(nb))(
              ptr.data(), sg.taps.data(), nt, C4, wpack + ob * wstride, wstride, ob * 16, pix, st);
        }
      }
    }
  });
}

}  // namespace

void dense_conv(const uint8_t* x, const Geometry& g, const int8_t* wpack, const uint8_t* pad, const Epilogue& e,
                char* out, int64_t esize, bool pointwise_loop) {
  if (pointwise_loop && pointwise_conv(x, g, wpack, e, out, esize)) return;
  dense_loop(x, g, wpack, pad, pad[0] == 0, ConvStore{e, out, g.O, esize});
}

#if QUANTA_VNNI
void dense_gemm(const int8_t* x, int64_t M, int64_t K, const int8_t* wpack, const RowEpilogue& r) {
  // a 1x1 convolution with unit stride of M pixels of K channels: every tap inside the image
  const Geometry g{1, K, 1, M, r.N, 1, M, 1, 1, 1, 1, 0, 0, 1, 1};
  dense_loop(reinterpret_cast<const uint8_t*>(x), g, wpack, nullptr, false, RowStore{r});
}
#endif
#endif  // QUANTA_VNNI || QUANTA_AVX2
}  // namespace quanta_native
