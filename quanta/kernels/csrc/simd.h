// What every file of quanta's native kernels needs, without torch/extension.h (the loops-only
// files, conv_dense.cpp and conv_depthwise.cpp, compile in a fraction of the time without it):
// at::parallel_for, and whether AVX-512 VNNI is there.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

// AVX-512 VNNI (vpdpbusd: four uint8 x int8 products added into each int32 lane, exact): the int8
// kernels' fast loops; without it they are plain loops (gemv) or not offered (conv, see conv.cpp).
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#include <immintrin.h>
#define QUANTA_VNNI 1
#else
#define QUANTA_VNNI 0
#endif
// AVX2 (vpmaddubsw + vpmaddwd): the direct int8 convolution's loops where VNNI is missing. A
// vpmaddubsw pair sum of uint8 x int8 saturates to int16 unless every weight |code| <= 64
// (2 * 255 * 64 = 32640): those loops take only such weights (conv.cpp checks).
#if defined(__AVX2__)
#include <immintrin.h>
#define QUANTA_AVX2 1
#else
#define QUANTA_AVX2 0
#endif

#if QUANTA_AVX2 || QUANTA_VNNI
// The AVX2 epilogues convert with cvtps_epi32, which rounds as MXCSR says: the loops hold it at round
// half to even, the default, for the duration of each parallel task (and give the caller's mode
// back), which makes the conversion itself the rounding, one instruction in place of a round and a
// conversion, and keeps their float32 multiplies and adds the reference's whatever mode a caller set.
struct NearestRounding {
  static constexpr unsigned kModeBits = 0x6000u;  // MXCSR's rounding control (00: to nearest even)
  unsigned saved;
  NearestRounding() : saved(_mm_getcsr()) {
    if (saved & kModeBits) _mm_setcsr(saved & ~kModeBits);
  }
  ~NearestRounding() {
    if (saved & kModeBits) _mm_setcsr(saved);
  }
  NearestRounding(const NearestRounding&) = delete;
  NearestRounding& operator=(const NearestRounding&) = delete;
};
#endif
