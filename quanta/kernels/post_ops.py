"""The fused post-op codes: one table, the numbers of ``csrc/post_op.h``'s ``PostOp`` enum
(tests/kernels/test_post_op_codes.py parses the header and compares). Every native call that
takes a post-op passes ``POST_OP_CODES[name]``; each kernel implements a subset:
`LINEAR_POST_OPS` (the int8 linear's float epilogue) and `CLAMP_POST_OPS` (the int8 convolution
and the uint8 residual add, which clamp before requantizing)."""

from __future__ import annotations

#: name -> code in the native kernels (csrc/post_op.h)
POST_OP_CODES: dict[str, int] = {"none": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "relu6": 4}
LINEAR_POST_OPS = ("none", "relu", "gelu", "gelu_tanh")
CLAMP_POST_OPS = ("none", "relu", "relu6")


def codes_for(names: tuple[str, ...]) -> dict[str, int]:
    """``{name: code}`` for the post-ops one kernel implements."""
    return {name: POST_OP_CODES[name] for name in names}


__all__ = ["CLAMP_POST_OPS", "LINEAR_POST_OPS", "POST_OP_CODES", "codes_for"]
