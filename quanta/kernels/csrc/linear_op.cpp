// The int8 linear on weights packed for the dense VNNI loop (int8_gemm), and a settled int8 linear
// as one operator for compiled graphs (quanta_native::linear_packed).
//
// Eagerly, an integer Linear whose guarded calls chose the native kernels runs them as two or
// three library calls (quantize_rows / quantize_static, then int8_gemv, int8_gemm, or
// torch._int_mm + rescale_rows; kernels/linear_native.py's native_linear_call). Traced by
// torch.compile, the same layer would be re-expressed in tensor operations that inductor fuses;
// linear_packed instead puts the eager kernels themselves in the graph, with the same functions and
// so the same bits, and leaves the float work around the layer (attention, norms, residual
// additions) to inductor. Registered as an operator in fused.cpp; its fake kernel is registered
// from Python (kernels/graph_ops.py).
#include "common.h"
#include "conv_kernels.h"

#include <vector>

namespace quanta_native {

namespace {

// int8_gemm into `out` (float32 [M, N]); checks done by the callers
void gemm_into(const torch::Tensor& codes, const torch::Tensor& x_zp, const torch::Tensor& x_scale,
               const torch::Tensor& wpack, const torch::Tensor& w_sum, const torch::Tensor& w_scale, const float* bias,
               int64_t post_op, torch::Tensor& out) {
#if QUANTA_VNNI
  const int64_t M = codes.size(0), K = codes.size(1), N = out.size(1);
  const RowEpilogue r{x_zp.data_ptr<int32_t>(), x_zp.numel() > 1, x_scale.data_ptr<float>(), x_scale.numel() > 1,
                      w_sum.data_ptr<int32_t>(), w_scale.data_ptr<float>(), bias, post_op, out.data_ptr<float>(), N};
  if (M > 0 && N > 0) dense_gemm(codes.data_ptr<int8_t>(), M, K, wpack.data_ptr<int8_t>(), r);
#else
  TORCH_CHECK(false, "int8_gemm: this build has no AVX-512 VNNI");
#endif
}

void check_gemm_weight(const torch::Tensor& wpack, int64_t K, int64_t N) {
  TORCH_CHECK(wpack.scalar_type() == torch::kInt8 && wpack.is_contiguous() && wpack.dim() == 5 &&
                  wpack.size(0) == (N + 15) / 16 && wpack.size(1) == 1 && wpack.size(2) * 4 == K &&
                  wpack.size(3) == 16 && wpack.size(4) == 4,
              "int8_gemm: wpack must be contiguous int8 [", (N + 15) / 16, ", 1, ", K / 4, ", 16, 4] (a [", N, ", ",
              K, "] weight packed as a dense 1x1 conv), got ", wpack.sizes());
}

}  // namespace

// y = float32(Σ_k (x - x_zp[m]) w[n, k]) * x_scale[m] * w_scale[n] (+ bias[n]), then post_op: what
// torch._int_mm + rescale_rows give, bit for bit, in one pass over the dense VNNI loop.
// x: row-major int8 codes [M, K] (K % 4 == 0); wpack: the [N, K] weight packed as a dense 1x1
// conv's (conv_native.pack_weight); w_sum int32 / w_scale, bias float32 [N].
torch::Tensor int8_gemm(const torch::Tensor& x, const torch::Tensor& x_zp, const torch::Tensor& x_scale,
                        const torch::Tensor& wpack, const torch::Tensor& w_sum, const torch::Tensor& w_scale,
                        const c10::optional<torch::Tensor>& bias, int64_t post_op) {
  check_post_op("int8_gemm", post_op);
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kInt8 && x.dim() == 2 && x.stride(1) == 1 &&
                  x.stride(0) == x.size(1) && x.size(1) % 4 == 0,
              "int8_gemm: x must be row-major int8 codes [M, K] with K % 4 == 0, got ", x.scalar_type(), " ",
              x.sizes());
  const int64_t M = x.size(0), K = x.size(1), N = w_scale.numel();
  check_gemm_weight(wpack, K, N);
  const float* b = check_epilogue("int8_gemm", M, N, x_zp, w_sum, x_scale, w_scale, bias);
  auto out = torch::empty({M, N}, x.options().dtype(torch::kFloat32));
  gemm_into(x, x_zp, x_scale, wpack, w_sum, w_scale, b, post_op, out);
  return out;
}

// y = int8_linear(quantize(x)) with the activation post_op, float32 [M, N].
// x: row-major float32 [M, K]; w: contiguous int8 [N, K] (kernel 0 / 1) or its dense-packed form
// (kernel 2), w_sum: int32 row sums; w_scale / bias: float32 [N]. Activations are quantized to
// signed codes in [qmin, qmax]: per row when inv_scale == 0 (symmetric or not), else per tensor
// with 1 / scale = inv_scale and zero_point. kernel: 0 torch._int_mm + rescale_rows (as
// `int_mm_native`), 1 the VNNI gemv (as `gemv_native`), 2 int8_gemm (as `gemm_native`).
torch::Tensor linear_packed(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& w_sum,
                            const torch::Tensor& w_scale, const c10::optional<torch::Tensor>& bias, int64_t qmin,
                            int64_t qmax, bool symmetric, double inv_scale, int64_t zero_point, double scale,
                            int64_t kernel, int64_t post_op) {
  check_float_input(x, "linear_packed");
  check_post_op("linear_packed", post_op);
  TORCH_CHECK(kernel >= 0 && kernel <= 2, "linear_packed: kernel must be 0 (int_mm), 1 (gemv) or 2 (gemm)");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.stride(0) == x.size(1), "linear_packed: x must be row-major [M, K]");
  const int64_t M = x.size(0), K = x.size(1), N = w_scale.numel();
  if (kernel == 2)
    check_gemm_weight(w, K, N);
  else
    TORCH_CHECK(w.scalar_type() == torch::kInt8 && w.dim() == 2 && w.is_contiguous() && w.size(0) == N && w.size(1) == K,
                "linear_packed: w must be contiguous int8 [N, K] with x's K");
  TORCH_CHECK(qmin >= -128 && qmax <= 127 && qmin < qmax, "linear_packed: codes must be signed 8-bit");
  auto codes = torch::empty({M, K}, x.options().dtype(torch::kInt8));
  const bool dynamic = inv_scale == 0.0;
  auto x_scale = torch::empty({dynamic ? M : 1}, x.options());
  auto x_zp = torch::empty({dynamic ? M : 1}, x.options().dtype(torch::kInt32));
  const float lo = static_cast<float>(qmin), hi = static_cast<float>(qmax);
  if (dynamic) {
    const bool ok = quantize_rows_impl<int8_t>(x.data_ptr<float>(), codes.data_ptr<int8_t>(), x_scale.data_ptr<float>(),
                                               x_zp.data_ptr<int32_t>(), M, K, lo, hi, symmetric);
    TORCH_CHECK_VALUE(ok, "linear_packed: input contains NaN or Inf values (dynamic activation quantization)");
  } else {
    const float inv = static_cast<float>(inv_scale), z = static_cast<float>(zero_point);
    const float* src = x.data_ptr<float>();
    int8_t* dst = codes.data_ptr<int8_t>();
    at::parallel_for(0, M * K, 16384, [&](int64_t b, int64_t e) { quantize_span<int8_t>(src + b, dst + b, e - b, inv, z, lo, hi); });
    x_scale.fill_(scale);
    x_zp.fill_(zero_point);
  }
  const float* b = check_epilogue("linear_packed", M, N, x_zp, w_sum, x_scale, w_scale, bias);
  if (kernel == 2) {
    auto out = torch::empty({M, N}, x.options());
    gemm_into(codes, x_zp, x_scale, w, w_sum, w_scale, b, post_op, out);
    return out;
  }
  torch::Tensor acc;
  if (kernel == 1) {  // signed codes read as code + 128 (flip): their zero points move by 128 too
    acc = torch::empty({M, N}, x.options().dtype(torch::kInt32));
    gemv_u8s8(reinterpret_cast<const uint8_t*>(codes.data_ptr<int8_t>()), M, K, w.data_ptr<int8_t>(), N,
              acc.data_ptr<int32_t>(), 0x80);
    x_zp.add_(128);
  } else {
    TORCH_CHECK(K >= 2, "linear_packed: torch._int_mm needs K >= 2 (use the gemv)");
    acc = at::_int_mm(codes, w.t());
  }
  rescale_rows_raw(acc.data_ptr<int32_t>(), M, N, x_zp.data_ptr<int32_t>(), x_zp.numel() > 1, w_sum.data_ptr<int32_t>(),
                   x_scale.data_ptr<float>(), x_scale.numel() > 1, w_scale.data_ptr<float>(), b, post_op);
  return acc.view(torch::kFloat32);
}

}  // namespace quanta_native
