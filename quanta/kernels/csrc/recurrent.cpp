// The time loop of a dynamic int8 LSTM / GRU / RNN layer (one direction), the recurrent half of
// quanta.kernels.recurrent_math's `_sequence`: per step the hidden state is quantized per tensor
// (quanta.core's arithmetic, as in quantize_rows), multiplied by the int8 W_hh with exact int32
// sums (gemv_u8s8), rescaled as `float32(acc) * (s_h * s_hh[n]) + b_hh[n]`, and the gate
// equations of `_step` are evaluated in the same order with float32 operations, 16 lanes at a time
// (AVX-512; 8 with AVX2) and with no ATen call in the loop. sigmoid is 1 / (1 + exp(0 - x)) and
// tanh is tanh, with torch's own SLEEF routines (u10: within 1 ulp); ATen's sigmoid / tanh can
// round an ulp differently, so the outputs agree with the Python reference to float rounding (and a
// rare one-code flip of a requantized h). The input projection (one GEMM per layer) is the caller's.
#include "common.h"

#include <omp.h>
#include <sched.h>

#include <atomic>
#include <cstring>
#include <string>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

using namespace quanta_native;

namespace quanta_native {  // gemv.cpp: the gemv on W_hh re-laid out by int8_pack_rows4
int64_t pack4_cols(int64_t K);
int64_t pack4_bytes(int64_t N, int64_t K);
void widen_codes(const uint8_t* x, int64_t M, int64_t K, uint8_t flip, int16_t* x16);
void gemv_packed4_rows(const int16_t* x16, int64_t M, int64_t K, const int8_t* wp, int64_t N, int32_t* acc, int64_t n0,
                       int64_t n1);
}  // namespace quanta_native

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
// SLEEF's vector functions, exported by libtorch_cpu (weak: a torch without them leaves these null
// and rnn_layer unavailable instead of the whole library failing to load)
#if defined(__AVX512F__)
extern "C" __m512 Sleef_expf16_u10(__m512) __attribute__((weak));
extern "C" __m512 Sleef_tanhf16_u10(__m512) __attribute__((weak));
#else
extern "C" __m256 Sleef_expf8_u10(__m256) __attribute__((weak));
extern "C" __m256 Sleef_tanhf8_u10(__m256) __attribute__((weak));
#endif
#define QUANTA_GATES 1
#else
#define QUANTA_GATES 0
#endif

namespace {

enum class Mode { LSTM, GRU, RNN_TANH, RNN_RELU };

Mode parse_mode(const std::string& mode) {
  if (mode == "LSTM") return Mode::LSTM;
  if (mode == "GRU") return Mode::GRU;
  if (mode == "RNN_TANH") return Mode::RNN_TANH;
  TORCH_CHECK(mode == "RNN_RELU", "rnn_layer: unknown mode ", mode);
  return Mode::RNN_RELU;
}

int64_t gate_count(Mode m) { return m == Mode::LSTM ? 4 : (m == Mode::GRU ? 3 : 1); }

#if QUANTA_GATES
// The vector operations of the gate math: 16 lanes with AVX-512, 8 with AVX2 (masked loads read
// zeros in the lanes past the end, masked stores leave them alone).
#if defined(__AVX512F__)
struct Lanes {
  using V = __m512;
  using Mask = __mmask16;
  static constexpr int64_t n = 16;
  static Mask mask(int64_t left) {
    return left >= 16 ? static_cast<Mask>(0xFFFF) : static_cast<Mask>((1u << left) - 1);
  }
  static V load(Mask m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
  static void store(float* p, Mask m, V v) { _mm512_mask_storeu_ps(p, m, v); }
  static V set1(float v) { return _mm512_set1_ps(v); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V div(V a, V b) { return _mm512_div_ps(a, b); }
  static V exp(V x) { return Sleef_expf16_u10(x); }
  static V tanh(V x) { return Sleef_tanhf16_u10(x); }
  static V relu(V x) {  // as ATen's clamp_min(x, 0): NaN stays NaN
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ), x, _mm512_setzero_ps());
  }
  static bool available() { return Sleef_expf16_u10 != nullptr && Sleef_tanhf16_u10 != nullptr; }
};
#else
struct Lanes {
  using V = __m256;
  using Mask = __m256i;
  static constexpr int64_t n = 8;
  static Mask mask(int64_t left) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(left < 8 ? left : 8)), lane);
  }
  static V load(Mask m, const float* p) { return _mm256_maskload_ps(p, m); }
  static void store(float* p, Mask m, V v) { _mm256_maskstore_ps(p, m, v); }
  static V set1(float v) { return _mm256_set1_ps(v); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V div(V a, V b) { return _mm256_div_ps(a, b); }
  static V exp(V x) { return Sleef_expf8_u10(x); }
  static V tanh(V x) { return Sleef_tanhf8_u10(x); }
  static V relu(V x) {  // as ATen's clamp_min(x, 0): NaN stays NaN
    return _mm256_blendv_ps(x, _mm256_setzero_ps(), _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ));
  }
  static bool available() { return Sleef_expf8_u10 != nullptr && Sleef_tanhf8_u10 != nullptr; }
};
#endif
using V = Lanes::V;

// sigmoid and tanh of a vector of floats (SLEEF u10 inside)
inline V sigmoid_v(V x) {
  const V one = Lanes::set1(1.f);
  V a = Lanes::sub(Lanes::set1(0.f), x);
  a = Lanes::exp(a);
  a = Lanes::add(a, one);
  return Lanes::div(one, a);
}
inline V tanh_v(V x) { return Lanes::tanh(x); }

// One row of gate math for hidden units [j0, j1), a vector at a time (the last chunk masked). gh: the
// hidden projection [G*H], gi: the input projection [G*H], h: the state [H], h_next: where the new one goes,
// c: the cell state [H], updated in place.
void gates_row(Mode mode, const float* gh, const float* gi, const float* h, float* h_next, float* c, int64_t H,
               int64_t j0, int64_t j1) {
  for (int64_t j = j0; j < j1; j += Lanes::n) {
    const Lanes::Mask m = Lanes::mask(j1 - j);
    auto ld = [&](const float* p, int64_t gate) { return Lanes::load(m, p + gate * H + j); };
    auto pre = [&](int64_t gate) { return Lanes::add(ld(gh, gate), ld(gi, gate)); };  // gh + gi
    V hv;
    if (mode == Mode::LSTM) {  // i, f, g, o = (gh + gi).chunk(4); c = σ(f)·c + σ(i)·tanh(g); h = σ(o)·tanh(c)
      const V t1 = Lanes::mul(sigmoid_v(pre(1)), Lanes::load(m, c + j));
      const V t2 = Lanes::mul(sigmoid_v(pre(0)), tanh_v(pre(2)));
      const V cv = Lanes::add(t1, t2);
      Lanes::store(c + j, m, cv);
      hv = Lanes::mul(sigmoid_v(pre(3)), tanh_v(cv));
    } else if (mode == Mode::GRU) {  // r = σ(i_r + h_r); z = σ(i_z + h_z); n = tanh(i_n + r·h_n); h = (h - n)·z + n
      const V r = sigmoid_v(Lanes::add(ld(gi, 0), ld(gh, 0)));
      const V z = sigmoid_v(Lanes::add(ld(gi, 1), ld(gh, 1)));
      const V n = tanh_v(Lanes::add(ld(gi, 2), Lanes::mul(r, ld(gh, 2))));
      hv = Lanes::add(Lanes::mul(Lanes::sub(Lanes::load(m, h + j), n), z), n);
    } else if (mode == Mode::RNN_TANH) {
      hv = tanh_v(pre(0));
    } else {
      hv = Lanes::relu(pre(0));
    }
    Lanes::store(h_next + j, m, hv);
  }
}
#endif


// The time loop's barrier (one a step): the threads spin a little, then yield their core instead of
// sleeping in the kernel as OpenMP's barrier does after its spin count. On a machine whose cores other
// processes share, a thread put to sleep at every step waits for a wake-up each time (measured on 2
// shared cores: the layer many times slower with 2 threads than with 1); a yielding one runs again as
// soon as its core is offered.
struct StepBarrier {
  std::atomic<int> arrived{0};
  std::atomic<int> phase{0};
  int threads = 1;
  void wait() {
    const int p = phase.load(std::memory_order_acquire);
    if (arrived.fetch_add(1, std::memory_order_acq_rel) == threads - 1) {  // the last one opens it
      arrived.store(0, std::memory_order_relaxed);
      phase.store(p + 1, std::memory_order_release);
      return;
    }
    for (int spins = 0; phase.load(std::memory_order_acquire) == p; ++spins) {
      if (spins < 4096) {
#if defined(__x86_64__) || defined(__i386__)
        _mm_pause();
#endif
      } else {
        sched_yield();
      }
    }
  }
};

// Everything one layer's time loop reads and writes (raw pointers into the tensors of rnn_layer).
struct Loop {
  Mode mode;
  int64_t B, H, N, T;
  bool reverse, is_signed, symmetric;
  float qmin, qmax;
  const float* gi;
  const int8_t* w;
  const int8_t* w_packed;  // W_hh re-laid out by int8_pack_rows4 (null: the plain gemv on w)
  const int32_t* w_sum;
  const float* s_w;
  const float* b;
  float* h2;  // two [B, H] buffers: step i reads h2[i % 2] and writes h2[(i + 1) % 2]
  float* c;
  int32_t* acc;
  float* gh;
  float* out;
  int64_t slice = 16;
  StepBarrier* barrier = nullptr;
};

// Thread `tid` of `threads` owns hidden units [j0, j1). Per step, after one barrier (the previous h is
// complete), every thread takes the range of the whole previous h (min / max: the same values in every
// thread, so the same scale, zero point and verdict) and quantizes all of it into its own codes, then
// multiplies them by the W_hh rows of its units (rows g*H + j of every gate g), rescales them, runs the
// gates and writes its part of the next h (the other buffer: a thread still reading the previous one is
// never overwritten), of c and of the output. No allocation in the loop.
void run_loop(const Loop& L, int64_t tid, int64_t threads, int* failed) {
  const int64_t j0 = std::min(L.H, tid * L.slice), j1 = std::min(L.H, j0 + L.slice), G = L.N / L.H;
  std::vector<uint8_t> codes(static_cast<size_t>(L.B * L.H));
  std::vector<int16_t> wide(L.w_packed ? static_cast<size_t>(L.B * pack4_cols(L.H)) : 0);
  // int8 codes are read as code + 128: their zero point moves by 128 (the same exact sums)
  const uint8_t flip = L.is_signed ? 0x80 : 0;
  for (int64_t i = 0; i < L.T; ++i) {
    const int64_t t = L.reverse ? L.T - 1 - i : i;
    const float* h = L.h2 + (i % 2) * L.B * L.H;
    float* h_next = L.h2 + ((i + 1) % 2) * L.B * L.H;
    if (threads > 1 && i > 0) L.barrier->wait();
    Range all;
    for (int64_t r = 0; r < L.B; ++r) all.merge(value_range(h + r * L.H, L.H, L.symmetric));
    float s = 1.f, z = 0.f;
    if (!range_qparams(all, L.qmin, L.qmax, L.symmetric, &s, &z)) {  // the same verdict in every thread
      if (tid == 0) *failed = 1;
      return;
    }
    if (j1 <= j0) continue;  // (a thread without units still keeps the barriers' count)
    const float inv = 1.f / s;
    for (int64_t r = 0; r < L.B; ++r) {
      if (L.is_signed)
        quantize_span<int8_t>(h + r * L.H, reinterpret_cast<int8_t*>(codes.data()) + r * L.H, L.H, inv, z, L.qmin, L.qmax);
      else
        quantize_span<uint8_t>(h + r * L.H, codes.data() + r * L.H, L.H, inv, z, L.qmin, L.qmax);
    }
    const int32_t zu = static_cast<int32_t>(z) + (L.is_signed ? 128 : 0);
    if (L.w_packed) widen_codes(codes.data(), L.B, L.H, flip, wide.data());
    for (int64_t g = 0; g < G; ++g) {
      const int64_t n0 = g * L.H + j0, n1 = g * L.H + j1;
      if (L.w_packed)
        gemv_packed4_rows(wide.data(), L.B, L.H, L.w_packed, L.N, L.acc, n0, n1);
      else
        gemv_u8s8_rows(codes.data(), L.B, L.H, L.w, L.N, L.acc, flip, n0, n1);
      for (int64_t r = 0; r < L.B; ++r) {  // gh = float32(acc) * (s_h * s_hh) + b_hh
        const int32_t* a = L.acc + r * L.N;
        float* o = L.gh + r * L.N;
#pragma omp simd
        for (int64_t n = n0; n < n1; ++n) {
          const float sw = s * L.s_w[n];
          const float v = static_cast<float>(a[n] - zu * L.w_sum[n]) * sw;
          o[n] = v + L.b[n];
        }
      }
    }
    for (int64_t r = 0; r < L.B; ++r) {
#if QUANTA_GATES
      gates_row(L.mode, L.gh + r * L.N, L.gi + (t * L.B + r) * L.N, h + r * L.H, h_next + r * L.H,
                L.c ? L.c + r * L.H : nullptr, L.H, j0, j1);
#endif
      std::memcpy(L.out + (t * L.B + r) * L.H + j0, h_next + r * L.H + j0, sizeof(float) * (j1 - j0));
    }
  }
}

}  // namespace

bool rnn_layer_available() {
#if QUANTA_GATES
  return Lanes::available();
#else
  return false;
#endif
}

// One layer and direction. gi: float32 [T, B, G*H] (x W_ih^T + b_ih for the whole sequence); state:
// [h0] or [h0, c0], each [B, H]; w_hh: contiguous int8 [G*H, H]; s_hh, b_hh: float32 [G*H]; w_sum: int32
// [G*H], the row sums of w_hh (int8_row_sums, cached by the caller); the activation grid qmin..qmax
// (signed: int8 codes, else uint8); w_packed: optionally w_hh re-laid out by int8_pack_rows4 (the
// AVX2 loop's faster gemv, the same sums), cached by the caller.
// Returns [output [T, B, H], h_T] (LSTM: [output, h_T, c_T]).
std::vector<torch::Tensor> rnn_layer(const std::string& mode_name, const torch::Tensor& gi, std::vector<torch::Tensor> state,
                                     const torch::Tensor& w_hh, const torch::Tensor& s_hh,
                                     const torch::Tensor& b_hh, const torch::Tensor& w_sum, int64_t qmin, int64_t qmax,
                                     bool symmetric, bool is_signed, bool reverse,
                                     const c10::optional<torch::Tensor>& w_packed) {
  TORCH_CHECK(rnn_layer_available(), "rnn_layer: not available (needs AVX2 or AVX-512 and torch's SLEEF functions)");
  const Mode mode = parse_mode(mode_name);
  const int64_t G = gate_count(mode);
  TORCH_CHECK(state.size() == (mode == Mode::LSTM ? 2u : 1u), "rnn_layer: wrong number of state tensors");
  TORCH_CHECK(w_hh.scalar_type() == torch::kInt8 && w_hh.dim() == 2 && w_hh.is_contiguous(), "rnn_layer: w_hh must be contiguous int8 [G*H, H]");
  const int64_t N = w_hh.size(0), H = w_hh.size(1);
  TORCH_CHECK(N == G * H, "rnn_layer: w_hh has ", N, " rows, expected ", G * H);
  check_float_input(gi, "rnn_layer gi");
  TORCH_CHECK(gi.dim() == 3 && gi.is_contiguous() && gi.size(2) == N, "rnn_layer: gi must be contiguous [T, B, G*H]");
  const int64_t T = gi.size(0), B = gi.size(1);
  TORCH_CHECK(s_hh.scalar_type() == torch::kFloat32 && s_hh.is_contiguous() && s_hh.numel() == N, "rnn_layer: s_hh");
  TORCH_CHECK(b_hh.scalar_type() == torch::kFloat32 && b_hh.is_contiguous() && b_hh.numel() == N, "rnn_layer: b_hh");
  for (auto& s : state) {
    check_float_input(s, "rnn_layer state");
    TORCH_CHECK(s.dim() == 2 && s.size(0) == B && s.size(1) == H, "rnn_layer: state tensors must be [B, H]");
  }
  auto out = torch::empty({T, B, H}, gi.options());
  auto acc = torch::empty({B, N}, gi.options().dtype(torch::kInt32));
  auto gh = torch::empty({B, N}, gi.options());
  TORCH_CHECK(w_sum.scalar_type() == torch::kInt32 && w_sum.is_contiguous() && w_sum.numel() == N, "rnn_layer: w_sum");
  const bool packed = w_packed.has_value() && w_packed->defined();
  TORCH_CHECK(!packed || (w_packed->scalar_type() == torch::kInt8 && w_packed->is_contiguous() &&
                          w_packed->numel() == pack4_bytes(N, H)),
              "rnn_layer: w_packed must be int8_pack_rows4(w_hh)");
  // own copies of the state: the loop updates them in place (the caller's tensors stay as they are)
  // two buffers for h (the loop alternates between them), the first one h0
  torch::Tensor h2 = torch::empty({2, B, H}, gi.options());
  h2[0].copy_(state[0]);
  torch::Tensor c = mode == Mode::LSTM ? state[1].clone(at::MemoryFormat::Contiguous) : torch::Tensor();
  Loop L{mode, B, H, N, T, reverse, is_signed, symmetric, static_cast<float>(qmin), static_cast<float>(qmax),
         gi.data_ptr<float>(), w_hh.data_ptr<int8_t>(), packed ? w_packed->data_ptr<int8_t>() : nullptr,
         w_sum.data_ptr<int32_t>(), s_hh.data_ptr<float>(),
         b_hh.data_ptr<float>(), h2.data_ptr<float>(), mode == Mode::LSTM ? c.data_ptr<float>() : nullptr,
         acc.data_ptr<int32_t>(), gh.data_ptr<float>(), out.data_ptr<float>()};
  // the hidden units are split between threads in slices of 16; one parallel region for all steps
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (H + 15) / 16));
  L.slice = ((H + threads - 1) / threads + 15) / 16 * 16;  // ceil(H / threads), rounded up to 16
  StepBarrier barrier;
  barrier.threads = static_cast<int>(threads);
  L.barrier = &barrier;
  int failed = 0;
  if (threads == 1) {
    run_loop(L, 0, 1, &failed);
  } else {
#pragma omp parallel num_threads(threads)
    {
      // (OpenMP may give fewer threads than asked, e.g. inside another parallel region: the units are
      // then split between the threads it gave)
      const int64_t got = omp_get_num_threads();
      Loop mine = L;
      mine.slice = ((H + got - 1) / got + 15) / 16 * 16;
#pragma omp single
      barrier.threads = static_cast<int>(got);  // (the end of `single` is a barrier: every thread sees it)
      run_loop(mine, omp_get_thread_num(), got, &failed);
    }
  }
  TORCH_CHECK(!failed, "dynamic int8 recurrent layer: the hidden state holds NaN or inf");
  torch::Tensor h = h2[T % 2].clone();
  if (mode == Mode::LSTM) return {out, h, c};
  return {out, h};
}
