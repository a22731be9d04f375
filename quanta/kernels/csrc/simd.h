// What every file of quanta's native kernels needs, without torch/extension.h (the loops-only
// files, conv_dense.cpp and conv_depthwise.cpp, compile in a fraction of the time without it):
// at::parallel_for, and whether AVX-512 VNNI is there.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
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

// Tasks [0, n) on at::parallel_for's threads, each calling worker(claim) once; claim() gives the
// next task, or -1. Each thread starts on its own contiguous share, front to back, as a static split
// does (the same memory locality); a thread that runs out takes tasks from the back of another's
// share, so that a thread slowed down by another process or a busy core does not hold up the end.
// Which thread computes a task changes nothing in its result.
struct alignas(64) ClaimRange {
  std::atomic<uint64_t> span;  // front << 32 | back: tasks [front, back) not taken yet
};

template <class Worker>
void parallel_claimed(int64_t n, const Worker& worker) {
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  std::vector<ClaimRange> shares(static_cast<size_t>(threads));
  for (int64_t i = 0; i < threads; ++i)
    shares[i].span.store(static_cast<uint64_t>(n * i / threads) << 32 | static_cast<uint64_t>(n * (i + 1) / threads));
  at::parallel_for(0, threads, 1, [&](int64_t me, int64_t) {
    const auto claim = [&]() -> int64_t {
      for (int64_t k = 0; k < threads; ++k) {  // own share from the front, then the others' from the back
        std::atomic<uint64_t>& span = shares[(me + k) % threads].span;
        uint64_t v = span.load(std::memory_order_relaxed);
        for (;;) {
          const uint64_t front = v >> 32, back = v & 0xffffffffu;
          if (front >= back) break;
          const uint64_t next = k == 0 ? (front + 1) << 32 | back : front << 32 | (back - 1);
          if (span.compare_exchange_weak(v, next, std::memory_order_relaxed))
            return static_cast<int64_t>(k == 0 ? front : back - 1);
        }
      }
      return -1;
    };
    worker(claim);
  });
}
