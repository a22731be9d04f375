"""One numbering of the fused post-ops: ``csrc/post_op.h``'s ``PostOp`` enum is
`quanta.kernels.post_ops.POST_OP_CODES` (parsed here, so the two cannot drift), every kernel
table reads it, no kernel source spells a code as a number, and each native path applies the
activation its name says (a code meaning ReLU6 to one kernel and GELU to another is caught)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from quanta.kernels import codes, conv_native, linear_native, native
from quanta.kernels.conv import int8_conv
from quanta.kernels.post_ops import (
    CLAMP_POST_OPS,
    LINEAR_POST_OPS,
    POST_OP_CODES,
    codes_for,
)

CSRC = Path(native.__file__).with_name("csrc")
needs_native = pytest.mark.skipif(not native.ready(), reason="needs the native kernels")


def _header_codes() -> dict[str, int]:
    body = re.search(r"enum\s+PostOp\b[^{]*\{([^}]*)\}", (CSRC / "post_op.h").read_text()).group(1)
    pairs = re.findall(r"kPost(\w+)\s*=\s*(\d+)", body)
    # kPostGeluTanh -> gelu_tanh
    return {re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower(): int(code) for name, code in pairs}


def test_the_header_enum_is_the_python_table():
    assert _header_codes() == POST_OP_CODES


def test_every_kernel_table_reads_the_one_table():
    assert linear_native.POST_OPS == codes_for(LINEAR_POST_OPS)
    assert conv_native._POST == codes._POST == codes_for(CLAMP_POST_OPS)
    assert len(set(POST_OP_CODES.values())) == len(POST_OP_CODES)


def test_no_kernel_source_spells_a_post_op_code():
    literal = re.compile(r"\b(post|post_op|POST)\s*(==|!=|>=|<=|<|>)\s*\d|add_all<T,\s*\d|\benum\s+PostOp\b")
    found = {p.name: m.group(0) for p in sorted(CSRC.glob("*.[ch]*")) if p.name != "post_op.h"
             for m in [literal.search(p.read_text())] if m}
    assert not found, f"use post_op.h's names: {found}"


def _operands(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.randint(0, 256, (4, 16, 9, 9), dtype=torch.uint8, generator=gen)
    b = torch.randint(0, 256, (4, 16, 9, 9), dtype=torch.uint8, generator=gen)
    return a, b


@needs_native
@pytest.mark.parametrize("post", CLAMP_POST_OPS)
def test_native_add_applies_the_named_clamp(post):
    a, b = _operands(torch.Generator().manual_seed(1))
    sa, za, sb, zb = 0.05, 128, 0.04, 100  # sums in about [-10.4, 12.6]: below 0 and above 6
    y = (a.float() - za) * sa + (b.float() - zb) * sb
    want = {"none": y, "relu": y.clamp(min=0), "relu6": y.clamp(0, 6)}[post]
    got = native.module().add_codes(a, sa, za, b, sb, zb, POST_OP_CODES[post], 0.0, 0, 0, 255)
    assert torch.equal(got, want)
    codes = native.module().add_codes(a, sa, za, b, sb, zb, POST_OP_CODES[post], 1 / 0.1, 120, 0, 255)
    assert torch.equal(codes, torch.round(want * (1 / 0.1)).add(120).clamp(0, 255).to(torch.uint8))


@needs_native
@pytest.mark.parametrize("post", sorted(set(POST_OP_CODES) - set(CLAMP_POST_OPS)))
def test_native_add_refuses_the_linear_activations(post):
    a, b = _operands(torch.Generator().manual_seed(2))
    with pytest.raises(RuntimeError, match=r"add_codes: post_op must be 0 \(none\), 1 \(relu\) or 4 \(relu6\)"):
        native.module().add_codes(a, 0.05, 128, b, 0.04, 100, POST_OP_CODES[post], 0.0, 0, 0, 255)


@needs_native
@pytest.mark.parametrize("post", LINEAR_POST_OPS)
def test_native_linear_epilogue_applies_the_named_activation(post):
    gen = torch.Generator().manual_seed(3)
    acc = torch.randint(-3000, 3000, (5, 33), dtype=torch.int32, generator=gen)
    zp, w_sum = torch.zeros(1, dtype=torch.int32), torch.zeros(33, dtype=torch.int32)
    xs, ws = torch.full((1,), 0.01), torch.full((33,), 0.2)
    lib = native.module()
    plain = lib.rescale_rows(acc.clone(), zp, w_sum, xs, ws, None)
    got = lib.rescale_rows(acc.clone(), zp, w_sum, xs, ws, None, POST_OP_CODES[post])
    want = {"none": plain, "relu": torch.relu(plain), "gelu": F.gelu(plain),
            "gelu_tanh": F.gelu(plain, approximate="tanh")}[post]
    torch.testing.assert_close(got, want, atol=2e-6 * float(plain.abs().max()), rtol=0)
    assert float((plain - want).abs().max()) > 1e-3 or post == "none"  # the activation changes these values


@needs_native
def test_native_linear_epilogue_refuses_relu6():
    acc = torch.zeros(1, 2, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="rescale_rows: post_op must be"):
        native.module().rescale_rows(acc, torch.zeros(1, dtype=torch.int32), torch.zeros(2, dtype=torch.int32),
                                     torch.ones(1), torch.ones(2), None, POST_OP_CODES["relu6"])
    with pytest.raises(RuntimeError, match="apply_post_op_: post_op must be"):
        native.module().apply_post_op_(torch.zeros(3), POST_OP_CODES["relu6"])


@pytest.mark.skipif(not conv_native.conv_isa() == "avx512_vnni", reason="native int8 conv (AVX-512 VNNI) not here")
@pytest.mark.parametrize("groups", [1, 16], ids=["dense", "depthwise"])
@pytest.mark.parametrize("post", CLAMP_POST_OPS)
@pytest.mark.parametrize("out", [(None, 0), (0.05, 3)], ids=["float", "uint8"])
def test_native_conv_applies_the_named_clamp(groups, post, out):
    gen = torch.Generator().manual_seed(4)
    x = torch.randint(0, 256, (2, 16, 9, 9), dtype=torch.uint8, generator=gen)
    w = torch.randint(-128, 128, (16, 16 // groups, 3, 3), dtype=torch.int8, generator=gen)
    args = (x, 0.013, 120, w, torch.rand(16, generator=gen) * 0.01 + 1e-3, torch.randn(16, generator=gen),
            [1, 1], [1, 1], [1, 1], groups, post, *out, None)
    ref, got = int8_conv(*args, impl="reference"), int8_conv(*args, impl="native")
    assert torch.equal(got, ref)
