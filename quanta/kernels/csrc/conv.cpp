// Direct int8 convolutions of channels-last uint8 codes with AVX-512 VNNI (or AVX2, for weights
// within +-64: conv_isa), for the shapes where
// oneDNN's per-call cost (about 30 us, measured on a 16-channel 1x1 conv) is most of the work:
// MobileNet-style pointwise and depthwise layers at batch 1. A 2d convolution (a 1d one is a 2d one
// of unit height, done by the caller), with
//   dense:     groups = 1 and C % 4 == 0 (any kernel, stride, padding, dilation);
//   gathered:  groups = 1 and C % 4 != 0 (the AVX2 build: each pixel's taps gathered, then a GEMM);
//   depthwise: groups = C = O (one filter per channel).
//
// Arithmetic (bit for bit the reference of quanta/kernels/conv.py):
//   acc[p, o] = sum (x - zp) * w  = sum x * w - zp * sum w   (exact int32; a padded tap reads a
//               pixel of zp codes, i.e. the real value 0, as the reference pads x - zp with 0)
//   y = float32(acc) * float32(x_scale * w_scale[o]) + bias[o]   (float32)
//   y = relu(y) / clamp(y, 0, 6);  codes = clamp(round_half_even(y * (1 / out_scale)) + out_zp, 0, 255)
//
// A ConvPlan holds everything but the input (packed weights, per-channel constants, geometry), so
// that a call costs the kernel and one output allocation.
//
// Files: conv_kernels.h (shared definitions), conv_dense.cpp and conv_depthwise.cpp (the loops),
// this file (ConvPlan, the channels-last input quantization, the Python bindings).
#include "common.h"
#include "conv_kernels.h"

#include <cstdlib>

namespace quanta_native {

// Which loops this build holds (dense and depthwise): "avx512_vnni" (any int8 weight), "avx2"
// (vpmaddubsw + vpmaddwd: exact for weights within +-64 only, which ConvPlan checks) or "none".
const char* conv_isa() { return QUANTA_VNNI ? "avx512_vnni" : QUANTA_AVX2 ? "avx2" : "none"; }
bool conv_has_depthwise() { return QUANTA_VNNI || QUANTA_AVX2; }
bool conv_has_dense() { return QUANTA_VNNI || QUANTA_AVX2; }
// dense convs of C % 4 != 0 input channels (gathered_conv, conv_pointwise.cpp): the AVX2 build only
bool conv_has_gathered() { return QUANTA_AVX2 && !QUANTA_VNNI; }
// the largest |weight code| whose vpmaddubsw pair sums (2 * 255 * |w|) fit int16 (AVX2 without VNNI)
constexpr int kPairExactMax = 64;

// The convolution of channels-last uint8 codes x [N, C, H, W] with everything else given: the
// packed weight, the per-position constants (corr int32, mult / bias float32, in the loops'
// channel order), the pad pixel (uint8), params = [C, O, KH, KW, SH, SW, PH, PW, DH, DW,
// depthwise, post, codes] (+ [PH_after, PW_after]: a depthwise conv's asymmetric zero padding, as
// TF "same" at stride 2 pads (0, 1); default PH, PW), inv / z of the uint8 output. ConvPlan.run (eager) and the
// quanta_native::conv_packed op (compiled graphs) both call it. pointwise_loop false: a 1x1
// convolution runs the general dense loop in place of pointwise_conv (ConvPlan.run_dense_loop,
// for comparisons; the outputs are the same).
static torch::Tensor conv_packed_with(const torch::Tensor& x, const torch::Tensor& wpack, const torch::Tensor& corr,
                                      const torch::Tensor& mult, const torch::Tensor& bias, const torch::Tensor& pad,
                                      c10::IntArrayRef params, double inv, double z, bool pointwise_loop) {
  TORCH_CHECK(params.size() == 13 || params.size() == 15, "conv_packed: params must hold 13 or 15 values");
  const int64_t C = params[0], O = params[1];
  const bool depthwise = params[10] != 0, codes = params[12] != 0, gathered = !depthwise && C % 4 != 0;
  TORCH_CHECK(clamp_post_op_ok(params[11]), "conv_packed: post must be 0 (none), 1 (relu) or 4 (relu6), got ",
              params[11]);
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kUInt8 && x.dim() == 4 && x.size(1) == C &&
              x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "ConvPlan.run: x must be channels-last uint8 codes [N, ", C, ", H, W], got ", x.scalar_type(), " ",
              x.sizes());
  const int64_t O64 = (O + 63) / 64 * 64;
  TORCH_CHECK(corr.scalar_type() == torch::kInt32 && mult.scalar_type() == torch::kFloat32 &&
              bias.scalar_type() == torch::kFloat32 && pad.scalar_type() == torch::kUInt8 && corr.numel() == O64 &&
              mult.numel() == O64 && bias.numel() == O64 && pad.numel() >= (C + 63) / 64 * 64 + 64 &&
              corr.is_contiguous() && mult.is_contiguous() && bias.is_contiguous() && wpack.is_contiguous(),
              "conv_packed: constants must be contiguous corr int32 / mult, bias float32 [", O64, "] and a pad pixel");
  Geometry g{x.size(0), C, x.size(2), x.size(3), O, 0, 0, params[2], params[3], params[4], params[5], params[6],
             params[7], params[8], params[9]};
  // padding after the input (the depthwise loop reads the pad pixel / row past H, W; others: PH, PW)
  const int64_t ph_after = params.size() == 15 ? params[13] : g.PH, pw_after = params.size() == 15 ? params[14] : g.PW;
  TORCH_CHECK(ph_after >= 0 && pw_after >= 0 && (depthwise || gathered || (ph_after == g.PH && pw_after == g.PW)),
              "conv_packed: asymmetric padding needs a depthwise conv (or C % 4 != 0) and non-negative values");
  g.OH = (g.H + g.PH + ph_after - g.DH * (g.KH - 1) - 1) / g.SH + 1;
  g.OW = (g.W + g.PW + pw_after - g.DW * (g.KW - 1) - 1) / g.SW + 1;
  TORCH_CHECK(g.OH > 0 && g.OW > 0, "ConvPlan.run: input ", x.sizes(), " is smaller than the kernel");
  auto out = torch::empty({g.N, O, g.OH, g.OW},
                          x.options().dtype(codes ? torch::kUInt8 : torch::kFloat32).memory_format(at::MemoryFormat::ChannelsLast));
  TORCH_CHECK(depthwise ? conv_has_depthwise() : gathered ? conv_has_gathered() : conv_has_dense(),
              "conv_packed: this build has no ", depthwise ? "depthwise" : gathered ? "gathered (C % 4 != 0)" : "dense",
              " loop (", conv_isa(), ")");
#if QUANTA_VNNI || QUANTA_AVX2
  const Epilogue e{corr.data_ptr<int32_t>(), mult.data_ptr<float>(), bias.data_ptr<float>(),
                   static_cast<int>(params[11]), codes, static_cast<float>(inv), static_cast<float>(z)};
  char* dst = static_cast<char*>(out.data_ptr());
  const int64_t esize = codes ? 1 : 4;
  if (g.pixels() > 0) {
    if (depthwise)
      depthwise_conv(x.data_ptr<uint8_t>(), g, wpack.data_ptr<int8_t>(), pad.data_ptr<uint8_t>(), e, dst, esize);
    else if (gathered)
      gathered_conv(x.data_ptr<uint8_t>(), g, wpack.data_ptr<int8_t>(), pad.data_ptr<uint8_t>()[0], e, dst, esize);
    else
      dense_conv(x.data_ptr<uint8_t>(), g, wpack.data_ptr<int8_t>(), pad.data_ptr<uint8_t>(), e, dst, esize,
                 pointwise_loop);
  }
#endif
  return out;
}

torch::Tensor conv_packed(const torch::Tensor& x, const torch::Tensor& wpack, const torch::Tensor& corr,
                          const torch::Tensor& mult, const torch::Tensor& bias, const torch::Tensor& pad,
                          c10::IntArrayRef params, double inv, double z) {
  return conv_packed_with(x, wpack, corr, mult, bias, pad, params, inv, z, true);
}

namespace {

// Everything of one convolution but its input (see the file comment), checked once.
class ConvPlan {
 public:
  // wpack: dense int8 [O / 16, T, C / 4, 16, 4] (C % 4 != 0, gathered: [O / 16, 1, ceil(T * C / 4), 16, 4]) /
  // depthwise int8 [C / 64, T / 4, 4, 64] (see
  // conv_native.pack_weight; channels and taps padded with zero weights); w_sum: int32 [O] (sum
  // of each output channel's weights); w_scale: float32 [O]; bias: float32 [O] or None; post:
  // post_op.h's kPostNone / kPostRelu / kPostRelu6; out_scale None: float32 output, else uint8 codes on (out_scale, out_zp).
  ConvPlan(torch::Tensor wpack, const torch::Tensor& w_sum, double x_scale, int64_t x_zp,
           const torch::Tensor& w_scale, const c10::optional<torch::Tensor>& bias, int64_t C, int64_t O,
           std::vector<int64_t> kernel, std::vector<int64_t> stride, std::vector<int64_t> padding,
           std::vector<int64_t> dilation, bool depthwise, int64_t post, c10::optional<double> out_scale,
           int64_t out_zp)
      : wpack_(std::move(wpack)) {
    const bool gathered = !depthwise && C % 4 != 0;  // few input channels: gathered_conv (AVX2 build)
    TORCH_CHECK(depthwise ? conv_has_depthwise() : gathered ? conv_has_gathered() : conv_has_dense(),
                "ConvPlan: this build (", conv_isa(), ") has no ",
                depthwise ? "depthwise" : gathered ? "loop for dense convs of C % 4 != 0 channels" : "dense", " loop");
    TORCH_CHECK(kernel.size() == 2 && stride.size() == 2 && (padding.size() == 2 || padding.size() == 4) &&
                    dilation.size() == 2,
                "ConvPlan: kernel, stride, padding and dilation need 2 values each (padding: or 4, before H, W "
                "then after H, W)");
    TORCH_CHECK(padding.size() == 2 || ((depthwise || gathered) && padding[2] >= 0 && padding[3] >= 0) ||
                    (padding[2] == padding[0] && padding[3] == padding[1]),
                "ConvPlan: asymmetric padding needs a depthwise conv (or C % 4 != 0) and non-negative values");
    const int64_t T = kernel[0] * kernel[1], O16 = (O + 15) / 16 * 16, O64 = (O + 63) / 64 * 64;
    TORCH_CHECK(T > 0 && stride[0] > 0 && stride[1] > 0 && padding[0] >= 0 && padding[1] >= 0 && dilation[0] > 0 &&
                    dilation[1] > 0,
                "ConvPlan: invalid kernel / stride / padding / dilation");
    TORCH_CHECK(0 <= x_zp && x_zp <= 255 && clamp_post_op_ok(post) && 0 <= out_zp && out_zp <= 255,
                "ConvPlan: zero points must be uint8 codes and post 0 (none), 1 (relu) or 4 (relu6)");
    TORCH_CHECK(!depthwise || C == O, "ConvPlan: a depthwise conv has as many outputs as inputs");
    const std::vector<int64_t> shape = depthwise  ? std::vector<int64_t>{O64 / 64, (T + 3) / 4, 4, 64}
                                       : gathered ? std::vector<int64_t>{O16 / 16, 1, (T * C + 3) / 4, 16, 4}
                                                  : std::vector<int64_t>{O16 / 16, T, C / 4, 16, 4};
    TORCH_CHECK(wpack_.scalar_type() == torch::kInt8 && wpack_.is_contiguous() && wpack_.sizes().vec() == shape,
                "ConvPlan: wpack must be contiguous int8 ", c10::IntArrayRef(shape), ", got ", wpack_.sizes());
    if (!QUANTA_VNNI) {
      const int8_t* wp = wpack_.data_ptr<int8_t>();
      int peak = 0;
      for (int64_t i = 0; i < wpack_.numel(); ++i) peak = std::max(peak, std::abs(static_cast<int>(wp[i])));
      TORCH_CHECK(peak <= kPairExactMax, "ConvPlan: weight codes up to +-", peak, " are wider than +-", kPairExactMax,
                  ": without VNNI (", conv_isa(), ") vpmaddubsw pair sums would saturate; 7-bit weights run exactly");
    }
    const float* b = check_epilogue("ConvPlan", 1, O, torch::zeros({1}, torch::kInt32), w_sum,
                                    torch::ones({1}, torch::kFloat32), w_scale, bias);
    corr_ = torch::zeros({O64}, torch::kInt32);
    mult_ = torch::zeros({O64}, torch::kFloat32);
    bias_ = torch::zeros({O64}, torch::kFloat32);
    int32_t* corr = corr_.data_ptr<int32_t>();
    float* mult = mult_.data_ptr<float>();
    float* bs = bias_.data_ptr<float>();
    for (int64_t p = 0; p < O64; ++p) {  // position p holds channel o (depthwise: the interleaved order)
      const int64_t o = !depthwise ? p : p / 64 * 64 + dw_channel(p % 64);
      if (o >= O) continue;
      corr[p] = static_cast<int32_t>(x_zp * w_sum.data_ptr<int32_t>()[o]);
      mult[p] = static_cast<float>(x_scale * static_cast<double>(w_scale.data_ptr<float>()[o]));
      bs[p] = b ? b[o] : 0.f;
    }
    pad_ = torch::full({(C + 63) / 64 * 64 + 64}, x_zp, torch::kUInt8);
    params_ = {C, O, kernel[0], kernel[1], stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
               depthwise ? 1 : 0, post, out_scale.has_value() ? 1 : 0};
    if (padding.size() == 4 && (padding[2] != padding[0] || padding[3] != padding[1]))
      params_.insert(params_.end(), {padding[2], padding[3]});
    inv_ = out_scale.has_value() ? 1.f / static_cast<float>(*out_scale) : 1.f;
    z_ = static_cast<float>(out_zp);
  }

  // x: uint8 [N, C, H, W] in channels-last memory order -> [N, O, OH, OW] channels-last.
  torch::Tensor run(const torch::Tensor& x) const {
    return conv_packed_with(x, wpack_, corr_, mult_, bias_, pad_, params_, inv_, z_, true);
  }
  // run, with a 1x1 convolution on the general dense loop (not pointwise_conv): for comparisons
  torch::Tensor run_dense_loop(const torch::Tensor& x) const {
    return conv_packed_with(x, wpack_, corr_, mult_, bias_, pad_, params_, inv_, z_, false);
  }

  // conv_packed's arguments but x: (wpack, corr, mult, bias, pad, params, inv, z)
  pybind11::tuple arguments() const {
    return pybind11::make_tuple(wpack_, corr_, mult_, bias_, pad_, params_, static_cast<double>(inv_),
                                static_cast<double>(z_));
  }

 private:
  torch::Tensor wpack_, corr_, mult_, bias_, pad_;
  std::vector<int64_t> params_;
  float inv_ = 1.f, z_ = 0.f;
};

// out[w * C + c] = row[c * W + w]: channel-major rows to pixel-major
template <int C>
void interleave(const uint8_t* __restrict__ row, uint8_t* __restrict__ out, int64_t W) {
  for (int64_t w = 0; w < W; ++w)
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) out[w * C + c] = row[c * W + w];
}

}  // namespace

// uint8 codes clamp(round(x * inv) + zp, qmin, qmax) of a contiguous NCHW float32 x, written in
// channels-last memory order (what the convolutions read): one pass, where quantizing and then
// torch's channels-last copy cost two (the copy alone ~95 us for a 3 x 224 x 224 image).
torch::Tensor quantize_to_channels_last(const torch::Tensor& x, double inv, int64_t zero_point, int64_t qmin,
                                        int64_t qmax) {
  check_float_input(x, "quantize_to_channels_last");
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(), "quantize_to_channels_last: needs a contiguous [N, C, H, W] tensor");
  TORCH_CHECK(0 <= qmin && qmin <= qmax && qmax <= 255, "quantize_to_channels_last: [qmin, qmax] must lie in [0, 255]");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  auto out = torch::empty({N, C, H, W}, x.options().dtype(torch::kUInt8).memory_format(at::MemoryFormat::ChannelsLast));
  const float* src = x.data_ptr<float>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  const float finv = static_cast<float>(inv), z = static_cast<float>(zero_point);
  const float lo = static_cast<float>(qmin), hi = static_cast<float>(qmax);
  at::parallel_for(0, N * H, 8, [&](int64_t r0, int64_t r1) {
    std::vector<uint8_t> row(C * W);  // one image row, channel-major
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / H, h = r % H;
      for (int64_t c = 0; c < C; ++c)
        quantize_span<uint8_t>(src + ((n * C + c) * H + h) * W, row.data() + c * W, W, finv, z, lo, hi);
      uint8_t* o = dst + r * W * C;
      if (C == 3)  // (RGB images: a compile-time channel count lets the compiler vectorize the interleave)
        interleave<3>(row.data(), o, W);
      else if (C == 4)
        interleave<4>(row.data(), o, W);
      else
        for (int64_t w = 0; w < W; ++w)
          for (int64_t c = 0; c < C; ++c) o[w * C + c] = row[c * W + w];
    }
  });
  return out;
}

void bind_conv(pybind11::module& m) {
  m.def("conv_isa", &conv_isa, "the direct int8 convolution's loops: avx512_vnni, avx2 (weights within +-64) or none");
  m.def("quantize_to_channels_last", &quantize_to_channels_last,
        "static per-tensor uint8 quantization of NCHW float32 into channels-last codes");
  pybind11::class_<ConvPlan>(m, "ConvPlan", "a direct int8 convolution with everything but its input settled")
      .def(pybind11::init<torch::Tensor, const torch::Tensor&, double, int64_t, const torch::Tensor&,
                          const c10::optional<torch::Tensor>&, int64_t, int64_t, std::vector<int64_t>,
                          std::vector<int64_t>, std::vector<int64_t>, std::vector<int64_t>, bool, int64_t,
                          c10::optional<double>, int64_t>())
      .def("run", &ConvPlan::run, "the convolution of channels-last uint8 codes x")
      .def("run_dense_loop", &ConvPlan::run_dense_loop,
           "run, with a 1x1 convolution on the general dense loop in place of the pointwise one (comparisons)")
      .def("arguments", &ConvPlan::arguments, "quanta_native::conv_packed's arguments after x");
}

}  // namespace quanta_native
