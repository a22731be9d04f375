// The AVX2 u8 x s8 register tile (builds without VNNI), shared by the pointwise conv loop
// (conv_pointwise.cpp) and the Linear GEMM (linear_avx2.cpp): MR rows of uint8 codes (p[m], 4 codes
// per step, broadcast) times a panel of 16 output channels packed [K/4][16][4] (64 bytes per 4
// inputs), vpmaddubsw + vpmaddwd added into acc[m][0..1] (int32, channels 0-7 and 8-15; NV = 1: only
// the first 8). Exact for weights within +-64: a pair sum of uint8 x int8 products stays within int16
// (2 * 255 * 64 = 32640).
#pragma once

#if defined(__AVX2__)
#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace quanta_native {

template <int MR, int NV>
__attribute__((always_inline)) inline void accumulate_tile_u8s8(const uint8_t* const (&p)[MR], int64_t C4,
                                                                const int8_t* w, __m256i (&acc)[MR][2]) {
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t c = 0; c < C4; ++c) {
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + c * 64));
    const __m256i w1 = NV == 1 ? w0 : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + c * 64 + 32));
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      int32_t v;
      std::memcpy(&v, p[m] + c * 4, 4);
      const __m256i xv = _mm256_set1_epi32(v);
      acc[m][0] = _mm256_add_epi32(acc[m][0], _mm256_madd_epi16(_mm256_maddubs_epi16(xv, w0), ones));
      if (NV == 2) acc[m][1] = _mm256_add_epi32(acc[m][1], _mm256_madd_epi16(_mm256_maddubs_epi16(xv, w1), ones));
    }
  }
}

}  // namespace quanta_native
#endif
