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

#include <cstring>
#include <string>

using namespace quanta_native;

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


// Everything one layer's time loop reads and writes (raw pointers into the tensors of rnn_layer).
struct Loop {
  Mode mode;
  int64_t B, H, N, T;
  bool reverse, is_signed, symmetric, s8s8;  // s8s8: W_hh in [-127, 127], gemv_s8s8_rows' exact loop
  float qmin, qmax;
  const float* gi;
  const int8_t* w;
  const int32_t* w_sum;
  const float* s_w;
  const float* b;
  float* h2;  // two [B, H] buffers: step i reads h2[i % 2] and writes h2[(i + 1) % 2]
  float* c;
  int32_t* acc;
  float* gh;
  float* out;
  int64_t slice = 16;
};

// Thread `tid` of `threads` owns hidden units [j0, j1). Per step, after one barrier (the previous h is
// complete), every thread takes the range of the whole previous h (min / max: the same values in every
// thread, so the same scale, zero point and verdict) and quantizes all of it into its own codes, then
// multiplies them by the W_hh rows of its units (rows g*H + j of every gate g), rescales them, runs the
// gates and writes its part of the next h (the other buffer: a thread still reading the previous one is
// never overwritten), of c and of the output. No allocation in the loop.
void run_loop(const Loop& L, int64_t tid, int64_t threads, int* failed) {
  const int64_t j0 = std::min(L.H, tid * L.slice), j1 = std::min(L.H, j0 + L.slice), G = L.N / L.H;
  const int64_t ld = L.s8s8 ? gemv_s8s8_ld(L.H) : L.H;
  std::vector<uint8_t> codes(static_cast<size_t>(L.B * ld), 0), mags(L.s8s8 ? codes.size() : 0, 0);
  // s8s8: codes as int8 (uint8 codes read as code - 128: their zero point moves by -128); else as uint8
  // (int8 codes read as code + 128: their zero point moves by 128), the same exact sums either way
  const uint8_t flip = (L.s8s8 != L.is_signed) ? 0x80 : 0;
  const int32_t z_shift = L.s8s8 ? (L.is_signed ? 0 : -128) : (L.is_signed ? 128 : 0);
  for (int64_t i = 0; i < L.T; ++i) {
    const int64_t t = L.reverse ? L.T - 1 - i : i;
    const float* h = L.h2 + (i % 2) * L.B * L.H;
    float* h_next = L.h2 + ((i + 1) % 2) * L.B * L.H;
    if (threads > 1 && i > 0) {
#pragma omp barrier
    }
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
      uint8_t* q = codes.data() + r * ld;
      if (L.is_signed)
        quantize_span<int8_t>(h + r * L.H, reinterpret_cast<int8_t*>(q), L.H, inv, z, L.qmin, L.qmax);
      else
        quantize_span<uint8_t>(h + r * L.H, q, L.H, inv, z, L.qmin, L.qmax);
      if (flip)
        for (int64_t k = 0; k < L.H; ++k) q[k] ^= flip;
      if (L.s8s8)
        for (int64_t k = 0; k < L.H; ++k) mags[r * ld + k] = static_cast<uint8_t>(std::abs(static_cast<int8_t>(q[k])));
    }
    const int32_t zu = static_cast<int32_t>(z) + z_shift;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t n0 = g * L.H + j0, n1 = g * L.H + j1;
      if (L.s8s8)
        gemv_s8s8_rows(reinterpret_cast<const int8_t*>(codes.data()), mags.data(), ld, L.B, L.H, L.w, L.N, L.acc, n0, n1);
      else
        gemv_u8s8_rows(codes.data(), L.B, L.H, L.w, L.N, L.acc, 0, n0, n1);
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
// [h0] or [h0, c0], each [B, H]; w_hh: contiguous int8 [G*H, H]; s_hh, b_hh: float32 [G*H]; w_sum:
// int32 [G*H], the row sums of w_hh (int8_row_sums); narrow: every value of w_hh lies in [-127, 127] (its
// steps then run gemv_s8s8_rows where the build has it; the caller caches both); the activation grid qmin..qmax (signed: int8 codes, else uint8).
// Returns [output [T, B, H], h_T] (LSTM: [output, h_T, c_T]).
std::vector<torch::Tensor> rnn_layer(const std::string& mode_name, const torch::Tensor& gi, std::vector<torch::Tensor> state,
                                     const torch::Tensor& w_hh, const torch::Tensor& s_hh,
                                     const torch::Tensor& b_hh, const torch::Tensor& w_sum, bool narrow, int64_t qmin,
                                     int64_t qmax, bool symmetric, bool is_signed, bool reverse) {
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
  // own copies of the state: the loop updates them in place (the caller's tensors stay as they are)
  // two buffers for h (the loop alternates between them), the first one h0
  torch::Tensor h2 = torch::empty({2, B, H}, gi.options());
  h2[0].copy_(state[0]);
  torch::Tensor c = mode == Mode::LSTM ? state[1].clone(at::MemoryFormat::Contiguous) : torch::Tensor();
  const bool s8s8 = narrow && gemv_s8s8_available();
  Loop L{mode, B, H, N, T, reverse, is_signed, symmetric, s8s8, static_cast<float>(qmin), static_cast<float>(qmax),
         gi.data_ptr<float>(), w_hh.data_ptr<int8_t>(), w_sum.data_ptr<int32_t>(), s_hh.data_ptr<float>(),
         b_hh.data_ptr<float>(), h2.data_ptr<float>(), mode == Mode::LSTM ? c.data_ptr<float>() : nullptr,
         acc.data_ptr<int32_t>(), gh.data_ptr<float>(), out.data_ptr<float>()};
  // the hidden units are split between threads in slices of 16; one parallel region for all steps
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (H + 15) / 16));
  L.slice = ((H + threads - 1) / threads + 15) / 16 * 16;  // ceil(H / threads), rounded up to 16
  int failed = 0;
  if (threads == 1) {
    run_loop(L, 0, 1, &failed);
  } else {
#pragma omp parallel num_threads(threads)
    run_loop(L, omp_get_thread_num(), threads, &failed);
  }
  TORCH_CHECK(!failed, "dynamic int8 recurrent layer: the hidden state holds NaN or inf");
  torch::Tensor h = h2[T % 2].clone();
  if (mode == Mode::LSTM) return {out, h, c};
  return {out, h};
}


// The input projection of a layer for the whole sequence: y [M, N] = float32(sum_k (q[m, k] - z) w[n, k]) *
// 1 * scale[n] + b[n] (rescale_rows' epilogue with an x_scale of 1: the reference's float32(acc) *
// (s_x * s_ih) + b_ih). q: int8 / uint8 codes [M, K] on one grid (zero point z); w: contiguous int8 [N, K]
// with row sums w_sum; narrow: every value of w lies in [-127, 127] (then gemv_s8s8_rows, where the build
// has it, with the weight read once per block of 16 rows for all M rows; else int8_gemv's loop).
torch::Tensor rnn_input_projection(const torch::Tensor& q, int64_t z, const torch::Tensor& w, const torch::Tensor& w_sum,
                                   bool narrow, const torch::Tensor& scale, const torch::Tensor& b) {
  TORCH_CHECK(q.device().is_cpu() && q.dim() == 2 && q.is_contiguous() &&
              (q.scalar_type() == torch::kInt8 || q.scalar_type() == torch::kUInt8),
              "rnn_input_projection: q must be contiguous int8 / uint8 [M, K]");
  TORCH_CHECK(w.scalar_type() == torch::kInt8 && w.dim() == 2 && w.is_contiguous() && w.size(1) == q.size(1),
              "rnn_input_projection: w must be contiguous int8 [N, K] with q's K");
  const int64_t M = q.size(0), K = q.size(1), N = w.size(0);
  auto one = torch::ones({1}, scale.options());
  auto zp = torch::full({1}, z, w_sum.options());
  check_epilogue("rnn_input_projection", M, N, zp, w_sum, one, scale, b);
  const bool is_signed = q.scalar_type() == torch::kInt8;
  auto acc = torch::empty({M, N}, q.options().dtype(torch::kInt32));
  const uint8_t* qp = static_cast<const uint8_t*>(q.data_ptr());
  int32_t zu = static_cast<int32_t>(z);
  if (narrow && gemv_s8s8_available()) {
    // int8 codes and their magnitudes, rows padded with zeros to ld (uint8 codes read as code - 128)
    const int64_t ld = gemv_s8s8_ld(K);
    std::vector<int8_t> x(static_cast<size_t>(M * ld), 0);
    std::vector<uint8_t> xa(x.size(), 0);
    const uint8_t flip = is_signed ? 0 : 0x80;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) {
        const int8_t v = static_cast<int8_t>(qp[m * K + k] ^ flip);
        x[m * ld + k] = v;
        xa[m * ld + k] = static_cast<uint8_t>(std::abs(static_cast<int>(v)));
      }
    if (!is_signed) zu -= 128;
    const int64_t blocks = (N + 15) / 16;
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      gemv_s8s8_rows(x.data(), xa.data(), ld, M, K, w.data_ptr<int8_t>(), N, acc.data_ptr<int32_t>(), b0 * 16,
                     std::min(N, b1 * 16));
    });
  } else {
    gemv_u8s8(qp, M, K, w.data_ptr<int8_t>(), N, acc.data_ptr<int32_t>(), is_signed ? 0x80 : 0);
    if (is_signed) zu += 128;  // int8 codes were read as code + 128
  }
  rescale_rows_raw(acc.data_ptr<int32_t>(), M, N, &zu, false, w_sum.data_ptr<int32_t>(), one.data_ptr<float>(), false,
                   scale.data_ptr<float>(), b.data_ptr<float>());
  return acc.view(torch::kFloat32);
}
