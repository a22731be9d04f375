// A settled int8 linear as one operator, for compiled graphs: quanta_native::linear_packed.
//
// Eagerly, an integer Linear whose guarded calls chose the native kernels runs them as three
// library calls (quantize_rows / quantize_static, then int8_gemv or torch._int_mm + rescale_rows;
// kernels/linear.py's native_linear_call). Traced by torch.compile, the same layer would be
// re-expressed in tensor operations that inductor fuses; this operator instead puts the eager
// kernels themselves in the graph, with the same functions and so the same bits, and leaves the
// float work around the layer (attention, norms, residual additions) to inductor. Registered as
// an operator in fused.cpp; its fake kernel is registered from Python (kernels/linear_native.py).
#include "common.h"

#include <vector>

namespace quanta_native {

// y = int8_linear(quantize(x)) with the activation post_op, float32 [M, N].
// x: row-major float32 [M, K]; w: contiguous int8 [N, K] (w_sum: its int32 row sums); w_scale /
// bias: float32 [N]. Activations are quantized to signed codes in [qmin, qmax]: per row when
// inv_scale == 0 (symmetric or not), else per tensor with 1 / scale = inv_scale and zero_point.
// gemv: the VNNI gemv (as `gemv_native`), else torch._int_mm (as `int_mm_native`).
torch::Tensor linear_packed(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& w_sum,
                            const torch::Tensor& w_scale, const c10::optional<torch::Tensor>& bias, int64_t qmin,
                            int64_t qmax, bool symmetric, double inv_scale, int64_t zero_point, double scale,
                            bool gemv, int64_t post_op) {
  check_float_input(x, "linear_packed");
  check_post_op("linear_packed", post_op);
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.stride(0) == x.size(1), "linear_packed: x must be row-major [M, K]");
  TORCH_CHECK(w.scalar_type() == torch::kInt8 && w.dim() == 2 && w.is_contiguous() && w.size(1) == x.size(1),
              "linear_packed: w must be contiguous int8 [N, K] with x's K");
  TORCH_CHECK(qmin >= -128 && qmax <= 127 && qmin < qmax, "linear_packed: codes must be signed 8-bit");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
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
  torch::Tensor acc;
  if (gemv) {  // signed codes read as code + 128 (flip): their zero points move by 128 too
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
