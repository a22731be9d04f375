// The fused post-op codes: the one numbering every kernel and the Python side share
// (quanta/kernels/post_ops.py: POST_OP_CODES, checked against this enum by
// tests/kernels/test_post_op_codes.py). Each kernel takes the subset it implements:
// the int8 linear's epilogues (activation.h: apply_post_op; rescale_rows, int8_gemv, int8_gemm,
// linear_packed) none / relu / gelu / gelu tanh; the int8 convolution (conv_kernels.h) and the
// uint8 residual add (fused.cpp: add_codes) none / relu / relu6.
#pragma once
#include <cstdint>

namespace quanta_native {

enum PostOp : int64_t { kPostNone = 0, kPostRelu = 1, kPostGelu = 2, kPostGeluTanh = 3, kPostRelu6 = 4 };

// The int8 linear's activations (activation.h).
constexpr bool linear_post_op_ok(int64_t op) {
  return op == kPostNone || op == kPostRelu || op == kPostGelu || op == kPostGeluTanh;
}

// The clamps of the int8 convolution and the uint8 residual add.
constexpr bool clamp_post_op_ok(int64_t op) { return op == kPostNone || op == kPostRelu || op == kPostRelu6; }

}  // namespace quanta_native
