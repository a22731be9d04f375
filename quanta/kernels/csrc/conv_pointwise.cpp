// The AVX2 build's pointwise loop (no VNNI): a 1x1 convolution without padding (any stride) of
// channels-last uint8 codes is a GEMM [pixels, C] x [C, O] with the convolution's fused epilogue.
// Register tiles of kMR output pixels x 16 output channels (12 of the 16 ymm registers hold int32
// sums), 4 input channels per step: the tile's pixels' 4 codes broadcast, vpmaddubsw + vpmaddwd
// against the 16 channels' packed weights (exact for weights within +-64, which ConvPlan checks).
// The weights are the dense loop's packing, [O/16][1][C/4][16][4]: each 16-channel block is one
// contiguous panel that the tiles stream. Tasks: a chunk of pixels (whose codes stay in L1 / L2)
// x a range of 16-channel blocks, tiles outer where the weights fit L2 (whole output rows written
// in order), else blocks outer (a panel stays in L1 while the chunk's tiles read it); threads split
// the pixels, and the blocks too where there are few pixels. The epilogue is
// conv_kernels.h's store16 (the dense loop's), so the outputs are the dense loop's bit for bit.
// Compared with the general dense loop: no tap lists or segment walking per tile, 6-pixel tiles in
// place of 4, and the pixels' addresses found once per chunk.
// The same GEMM runs the dense convolutions of few input channels (C % 4 != 0, which the dense loop
// cannot take: a network's 3-channel stem), over rows of each output pixel's gathered taps
// (gathered_conv, GatheredRows below): K = 27 codes padded to 28 in place of 3x3 taps of 4-channel
// groups of which 1 of 4 codes is real.
#include "conv_kernels.h"
#include "tile_u8s8.h"

namespace quanta_native {
#if QUANTA_AVX2 && !QUANTA_VNNI
namespace {

constexpr int kMR = 6;               // output pixels per register tile
constexpr int64_t kMaxChunkTiles = 16;  // register tiles per task, at most
constexpr int64_t kChunkBytes = 24 << 10;  // a chunk's input codes, at most (where C allows)
constexpr int64_t kRowsFirstWeightBytes = 256 << 10;  // packed weights up to this: tiles outer

// MR pixels (codes at px[m], output rows at rows[m]) x the 16 channels from o0 (w: their panel,
// 64 bytes per 4 input channels); NV = 1: only the first 8 (a last block of at most 8 channels, as
// in O = 24 or 40: half the work of a full block)
template <int MR, int NV>
void pointwise_tile(const uint8_t* const* px, char* const* rows, int64_t C4, const int8_t* w, int64_t o0, int64_t O,
                    const Epilogue& epilogue) {
  const Epilogue e = epilogue;  // (a local copy: the output stores cannot alias its fields)
  const __m256i start0 = _mm256_sub_epi32(_mm256_setzero_si256(),
                                          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(e.corr + o0)));
  const __m256i start1 = NV == 1 ? _mm256_setzero_si256()
                                 : _mm256_sub_epi32(_mm256_setzero_si256(),
                                                    _mm256_loadu_si256(reinterpret_cast<const __m256i*>(e.corr + o0 + 8)));
  __m256i acc[MR][2];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) acc[m][0] = start0, acc[m][1] = start1;
  const uint8_t* p[MR];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) p[m] = px[m];
  accumulate_tile_u8s8<MR, NV>(p, C4, w, acc);  // (tile_u8s8.h: exact for weights within +-64)
  // (NV = 1: channels o0 + 8 .. are past O)
#pragma GCC unroll 4
  for (int m = 0; m + 1 < MR; m += 2) store16x2(acc[m], acc[m + 1], o0, O, e, rows[m], rows[m + 1]);
  if (MR % 2) store16(acc[MR - 1], o0, O, e, rows[MR - 1]);
}

using PointwiseTile = void (*)(const uint8_t* const*, char* const*, int64_t, const int8_t*, int64_t, int64_t,
                               const Epilogue&);

template <int NV>
PointwiseTile pointwise_tile_for(int64_t mr) {
  switch (mr) {
    case 1: return pointwise_tile<1, NV>;
    case 2: return pointwise_tile<2, NV>;
    case 3: return pointwise_tile<3, NV>;
    case 4: return pointwise_tile<4, NV>;
    case 5: return pointwise_tile<5, NV>;
    default: return pointwise_tile<6, NV>;
  }
}

// The pixels' rows of the GEMM: the codes of output pixel p start at px[p - p0] (K bytes each).
// Pointwise: the input pixel itself (no copy).
struct PixelRows {
  const uint8_t* x;
  const Geometry& g;
  static constexpr bool kGathers = false;
  int64_t row_bytes() const { return g.C; }
  void fill(int64_t p0, int64_t p1, const uint8_t** px, uint8_t*) const {
    if (g.SH == 1 && g.SW == 1) {
      for (int64_t p = p0; p < p1; ++p) px[p - p0] = x + p * g.C;
      return;
    }  // output pixel (n, oy, ox) reads input pixel (n, oy * SH, ox * SW)
    int64_t n = p0 / (g.OH * g.OW), oy = p0 / g.OW % g.OH, ox = p0 % g.OW;
    for (int64_t p = p0; p < p1; ++p) {
      px[p - p0] = x + ((n * g.H + oy * g.SH) * g.W + ox * g.SW) * g.C;
      if (++ox == g.OW) {
        ox = 0;
        if (++oy == g.OH) oy = 0, ++n;
      }
    }
  }
};

// n bytes from src to dst, n small (a few input channels of a kernel row): fixed-size moves
inline void copy_small(uint8_t* dst, const uint8_t* src, int64_t n) {
  if (n >= 8 && n <= 16) {  // two overlapping 8-byte moves
    std::memcpy(dst, src, 8);
    std::memcpy(dst + n - 8, src + n - 8, 8);
  } else if (n >= 4 && n < 8) {
    std::memcpy(dst, src, 4);
    std::memcpy(dst + n - 4, src + n - 4, 4);
  } else {
    std::memcpy(dst, src, static_cast<size_t>(n));
  }
}

// Few input channels (C % 4 != 0: a network's stem, 3 channels x 3x3 taps = 27 codes per pixel): each
// output pixel's taps gathered once into a row of K4 = round_up(KH * KW * C, 4) codes, in (ky, kx, c)
// order, taps outside the image (before or after it: TF "same" pads asymmetrically) as zero-point
// codes; the rows then run the pointwise GEMM, whose
// weights are packed [O/16][1][K4/4][16][4] in the same order (conv_native.pack_weight "gathered").
// (the row's tail past K is never zeroed: its weights are 0, so any code there adds 0)
struct GatheredRows {
  const uint8_t* x;
  const Geometry& g;
  uint8_t zp;
  int64_t K4;
  static constexpr bool kGathers = true;
  static constexpr int64_t kSlack = 16;  // bytes past the last row that a 16-byte move may write
  int64_t row_bytes() const { return K4; }
  void fill(int64_t p0, int64_t p1, const uint8_t** px, uint8_t* buf) const {
    const int64_t C = g.C, span = g.KW * C;
    // a kernel row of at most 16 codes moves as one 16-byte load and store (the bytes past it are
    // overwritten by the next kernel row, the next pixel's row, or fall in the tail / slack) where
    // the load stays inside x
    const int64_t last16 = g.N * g.H * g.W * C - 16;  // the last offset of x a 16-byte load may start at
    const bool wide_moves = span <= 16;
    int64_t n = p0 / (g.OH * g.OW), oy = p0 / g.OW % g.OH, ox = p0 % g.OW;
    for (int64_t p = p0; p < p1; ++p) {
      uint8_t* row = buf + (p - p0) * K4;
      px[p - p0] = row;
      const int64_t iy0 = oy * g.SH - g.PH, ix0 = ox * g.SW - g.PW;
      const bool cols_inside = g.DW == 1 && ix0 >= 0 && ix0 + g.KW <= g.W;
      for (int64_t ky = 0; ky < g.KH; ++ky) {
        const int64_t iy = iy0 + ky * g.DH;
        uint8_t* dst = row + ky * span;
        if (iy < 0 || iy >= g.H) {
          std::memset(dst, zp, static_cast<size_t>(span));
          continue;
        }
        const uint8_t* line = x + (n * g.H + iy) * g.W * C;
        if (cols_inside) {
          const uint8_t* src = line + ix0 * C;
          if (wide_moves && src - x <= last16)
            _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
          else
            copy_small(dst, src, span);
          continue;
        }
        for (int64_t kx = 0; kx < g.KW; ++kx) {
          const int64_t ix = ix0 + kx * g.DW;
          if (ix < 0 || ix >= g.W)
            std::memset(dst + kx * C, zp, static_cast<size_t>(C));
          else
            std::memcpy(dst + kx * C, line + ix * C, static_cast<size_t>(C));
        }
      }
      if (++ox == g.OW) {
        ox = 0;
        if (++oy == g.OH) oy = 0, ++n;
      }
    }
  }
};

// The GEMM of the pixels' rows (Rows::fill) of C4 * 4 codes by the packed weights, epilogue stored in
// channels-last output rows (see the file comment for the tasks)
template <class Rows>
void gemm_rows(const Rows& src, const Geometry& g, int64_t C4, const int8_t* wpack, const Epilogue& e, char* out,
               int64_t esize) {
  const int64_t P = g.pixels(), OB = (g.O + 15) / 16, threads = at::get_num_threads();
  const int64_t tiles = (P + kMR - 1) / kMR;
  const int64_t fit = std::max<int64_t>(1, std::min(kMaxChunkTiles, kChunkBytes / (src.row_bytes() * kMR)));
  // equal chunks of at most `fit` tiles, at least 4 per thread where there are enough tiles
  int64_t chunks = std::min(tiles, std::max((tiles + fit - 1) / fit, 4 * threads));
  // a multiple of the threads (11 chunks on 2 threads, as MobileNetV2's 320 -> 1280 conv at batch 16,
  // end with one thread's last chunk alone); the threads claim them one by one (parallel_claimed)
  chunks = std::min(tiles, (chunks + threads - 1) / threads * threads);
  const int64_t chunk_tiles = (tiles + chunks - 1) / chunks;
  chunks = (tiles + chunk_tiles - 1) / chunk_tiles;
  // few pixel chunks (small images): the 16-channel blocks split too, so that every thread works
  const int64_t splits = std::min(OB, std::max<int64_t>(1, (4 * threads + chunks - 1) / chunks));
  const int64_t per = (OB + splits - 1) / splits;
  // weights that stay in L2 (all the blocks' panels): tiles outer, so that the output is written
  // in whole rows, as a stream (the next layer reads it); larger ones: blocks outer
  const bool rows_first = C4 * 64 * OB <= kRowsFirstWeightBytes;
  parallel_claimed(chunks * splits, [&](const auto& claim) {
    const NearestRounding rounding;  // (the epilogue's conversions round half to even)
    std::vector<const uint8_t*> px(chunk_tiles * kMR);
    std::vector<char*> rows(chunk_tiles * kMR);
    std::vector<uint8_t> gathered(Rows::kGathers ? chunk_tiles * kMR * src.row_bytes() + GatheredRows::kSlack : 0);
    int64_t filled = -1;  // the chunk whose rows px holds
    for (int64_t task; (task = claim()) >= 0;) {
      const int64_t chunk = task / splits, split = task % splits;
      const int64_t p0 = chunk * chunk_tiles * kMR, p1 = std::min(P, p0 + chunk_tiles * kMR);
      const int64_t b0 = split * per, b1 = std::min(OB, b0 + per);
      if (chunk != filled) src.fill(p0, p1, px.data(), gathered.data()), filled = chunk;
      for (int64_t p = p0; p < p1; ++p) rows[p - p0] = out + p * g.O * esize;
      auto tile = [&](int64_t q, int64_t b) {
        const int64_t mr = std::min<int64_t>(kMR, p1 - p0 - q);
        const bool half = g.O - b * 16 <= 8;
        (mr == kMR ? (half ? pointwise_tile<kMR, 1> : pointwise_tile<kMR, 2>)
                   : half ? pointwise_tile_for<1>(mr) : pointwise_tile_for<2>(mr))(
            px.data() + q, rows.data() + q, C4, wpack + b * C4 * 64, b * 16, g.O, e);
      };
      if (rows_first) {  // each tile's output rows written whole, one after the other
        for (int64_t q = 0; q < p1 - p0; q += kMR)
          for (int64_t b = b0; b < b1; ++b) tile(q, b);
      } else {  // a block's panel stays in L1 while the chunk's tiles read it
        for (int64_t b = b0; b < b1; ++b)
          for (int64_t q = 0; q < p1 - p0; q += kMR) tile(q, b);
      }
    }
  });
}

}  // namespace

bool pointwise_conv(const uint8_t* x, const Geometry& g, const int8_t* wpack, const Epilogue& e, char* out,
                    int64_t esize) {
  if (g.KH != 1 || g.KW != 1 || g.PH != 0 || g.PW != 0 || g.C % 4 != 0) return false;
  gemm_rows(PixelRows{x, g}, g, g.C / 4, wpack, e, out, esize);
  return true;
}

bool gathered_conv(const uint8_t* x, const Geometry& g, const int8_t* wpack, uint8_t zp, const Epilogue& e, char* out,
                   int64_t esize) {
  const int64_t K4 = (g.KH * g.KW * g.C + 3) / 4 * 4;
  gemm_rows(GatheredRows{x, g, zp, K4}, g, K4 / 4, wpack, e, out, esize);
  return true;
}
#else
bool pointwise_conv(const uint8_t*, const Geometry&, const int8_t*, const Epilogue&, char*, int64_t) { return false; }
bool gathered_conv(const uint8_t*, const Geometry&, const int8_t*, uint8_t, const Epilogue&, char*, int64_t) {
  return false;
}
#endif  // QUANTA_AVX2 && !QUANTA_VNNI
}  // namespace quanta_native
