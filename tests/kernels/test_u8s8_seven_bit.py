"""Tier 1 / 3: 7-bit weight codes (|code| <= 64) make oneDNN's u8 × s8 kernels exact on any x86 CPU.

Without VNNI a pair of u8 × s8 products is summed in a saturating int16 (``vpmaddubsw``); with
every |weight code| <= 64 a pair is at most 2 · 255 · 64 = 32640 <= 32767, so nothing saturates.
`SaturationProbe` probes each kernel per weight bound, the oneDNN guards read the weight's bound
(`weight_code_max`), and ``static_int8(weight_bits=7)`` models run oneDNN where the full range
saturates (here: an AVX2 EPYC). On VNNI machines the same tests check the sums are exact too and
that nothing changed in the choice order.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import quanta
from quanta.demo import accuracy
from quanta.integer.conv import Int8Conv2d
from quanta.integer.linear import Int8Linear
from quanta.kernels import conv as C
from quanta.kernels import linear as L
from quanta.kernels.gemv_rows import gemv_max_rows
from quanta.kernels.linear_onednn import onednn_auto_pack
from quanta.kernels.u8s8_saturation import (
    FULL_RANGE_MAX,
    PROBE_K_ODD,
    SEVEN_BIT_MAX,
    SaturationProbe,
    adversarial_operands,
    weight_code_max,
)

HAS_LINEAR = L.int8_linear.why_not_available("onednn") is None
HAS_CONV = C.int8_conv.why_not_available("onednn") is None
#: oneDNN saturates full-range weights here (no VNNI) but sums 7-bit ones exactly
SEVEN_BIT_ONLY = not L.ONEDNN_SATURATION.exact() and L.ONEDNN_SATURATION.exact(SEVEN_BIT_MAX)
needs_linear = pytest.mark.skipif(not HAS_LINEAR, reason=f"oneDNN linear: {L.int8_linear.why_not_available('onednn')}")
needs_conv = pytest.mark.skipif(not HAS_CONV, reason=f"oneDNN conv: {C.int8_conv.why_not_available('onednn')}")
needs_saturating_cpu = pytest.mark.skipif(L.ONEDNN_SATURATION.exact(),
                                          reason="this CPU sums full-range u8×s8 products exactly (VNNI)")


def _pairwise_saturating_sums(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``vpmaddubsw`` + ``vpmaddwd``: each pair of u8 × s8 products saturated to int16 (odd tail padded)."""
    prods = x.long()[:, None, :] * w.long()[None, :, :]
    if prods.shape[-1] % 2:
        prods = torch.nn.functional.pad(prods, (0, 1))
    return prods.reshape(*prods.shape[:2], -1, 2).sum(-1).clamp(-(2**15), 2**15 - 1).sum(-1).float()


def _codes(shape: tuple[int, ...], bound: int, g: torch.Generator) -> torch.Tensor:
    """int8 codes within ±bound, both ends present."""
    w = torch.randint(-bound, bound + 1, shape, dtype=torch.int8, generator=g)
    w.view(-1)[0], w.view(-1)[-1] = bound, -bound
    return w


# ---------------------------------------------------------------------------- the probe per bound
def test_probe_per_bound_tells_seven_bit_weights_from_full_range():
    calls = []

    def kernel(x, w):
        calls.append(x.shape[1])
        return _pairwise_saturating_sums(x, w)

    probe = SaturationProbe("simulated", kernel)
    assert probe.exact(SEVEN_BIT_MAX) and probe.exact(63) and probe.exact(1)
    assert not probe.exact() and not probe.exact(65) and not probe.exact(FULL_RANGE_MAX)
    assert probe.exact_bound() == SEVEN_BIT_MAX
    assert "7-bit weights" in probe.limits() and probe.reason() in probe.limits()
    # once per bound, each at K = 64 and at an odd K (tails past a pair / quad block)
    assert sorted(calls) == [64, 64, PROBE_K_ODD, PROBE_K_ODD]
    exact = SaturationProbe("exact", lambda x, w: x.double() @ w.double().t())
    assert exact.exact_bound() == FULL_RANGE_MAX and exact.limits() is None
    # a kernel that saturates even 7-bit pairs (a single int16 accumulator, say) is refused at every bound
    one_int16 = SaturationProbe("int16", lambda x, w: (x.long() @ w.long().t()).clamp(-(2**15), 2**15 - 1).float())
    assert one_int16.exact_bound() is None and one_int16.limits() == one_int16.reason(SEVEN_BIT_MAX)


def test_adversarial_operands_at_the_seven_bit_bound_fill_int16_pairs():
    _, w, exact = adversarial_operands(k=PROBE_K_ODD, weight_max=SEVEN_BIT_MAX)
    assert int(w.abs().max()) == SEVEN_BIT_MAX and exact[0, 0] == PROBE_K_ODD * 255 * 64
    assert 2 * 255 * 64 <= 2**15 - 1 < 2 * 255 * 65  # 64 is the largest bound that cannot saturate
    with pytest.raises(ValueError, match="weight_max"):
        adversarial_operands(weight_max=0)


def test_weight_code_max_is_remembered_and_follows_in_place_changes():
    w = torch.zeros(4, 8, dtype=torch.int8)
    w[1, 2] = -128  # (abs() of int8 -128 wraps to -128: not what is measured)
    assert weight_code_max(w) == 128
    w.clamp_(-64, 64)  # in place: the remembered bound is stale and recomputed
    assert weight_code_max(w) == 64
    assert weight_code_max(torch.zeros(0, 3, dtype=torch.int8)) == 0


# ---------------------------------------------------------------------------- the kernels, exact
def _linear_sums_equal(x, zp, w):
    """oneDNN's int8_linear with unit scales, no bias: the float output IS the integer sum."""
    n = w.shape[0]
    got = L.int8_linear(x, torch.tensor(1.0), torch.tensor(zp, dtype=torch.int32), w, torch.ones(n), None, None,
                        L.onednn_prepack(w), impl="onednn")
    exact = (x.long() - zp) @ w.long().t()
    assert exact.abs().max() < 2**24  # (float32 holds these sums exactly)
    return torch.equal(got.double(), exact.double())


@needs_linear
@pytest.mark.parametrize("bound", [63, 64])
@pytest.mark.parametrize("k", [1, 2, 63, 64, 67, 768])
def test_onednn_linear_adversarial_seven_bit_sums_exact(bound, k):
    x = torch.full((5, k), 255, dtype=torch.uint8)
    w = torch.full((4, k), bound, dtype=torch.int8)
    w[1], w[2, 1::2] = -bound, -bound
    assert _linear_sums_equal(x, 0, w)
    if SEVEN_BIT_ONLY:  # no VNNI: oneDNN is the first choice for 7-bit weights (after the AVX2 gemv's few rows)
        args = (x, torch.tensor(0.1), torch.tensor(0, dtype=torch.int32), w, torch.ones(4), None, None)
        few = gemv_max_rows(4, k, onednn_packed=True) >= 5
        assert L.int8_linear.choose(*args, L.onednn_prepack(w)) == ("gemv_native" if few else "onednn")
        wide = (x.repeat(4, 1), *args[1:])  # 20 rows: past the gemv's rows against oneDNN
        assert L.int8_linear.choose(*wide, L.onednn_prepack(w)) == "onednn"


@needs_linear
@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 40), k=st.integers(1, 300), n=st.integers(1, 40), signed=st.booleans(),
       zp=st.integers(0, 255), seed=st.integers(0, 2**31 - 1))
def test_onednn_linear_random_seven_bit_equals_reference(m, k, n, signed, zp, seed):
    g = torch.Generator().manual_seed(seed)
    w = _codes((n, k), SEVEN_BIT_MAX, g)
    if signed:
        x, zp = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g), zp - 128
    else:
        x = torch.randint(0, 256, (m, k), dtype=torch.uint8, generator=g)
    assert _linear_sums_equal(x, zp, w)
    # with scales and bias: the reference within oneDNN's in-kernel rescale (a few float32 ulps)
    xs, ws, b = torch.tensor(0.037), torch.rand(n, generator=g) * 0.01 + 1e-4, torch.randn(n, generator=g)
    args = (x, xs, torch.tensor(zp, dtype=torch.int32), w, ws, b, None, L.onednn_prepack(w))
    ref, out = L.int8_linear(*args, impl="reference"), L.int8_linear(*args, impl="onednn")
    bound = L.ONEDNN_ULP_BOUND * torch.finfo(torch.float32).eps * (ref.abs() + b.abs())
    assert bool(((out - ref).abs() <= bound).all())


def _conv_sums_equal(x, zp, w, padding, groups=1):
    """oneDNN's int8_conv with unit scales, no bias: the float output IS the integer sum."""
    o = w.shape[0]
    d = x.dim() - 2
    args = (x, 1.0, zp, w, torch.ones(o), None, [1] * d, padding, [1] * d, groups, "none", None, 0, None)
    got = C.int8_conv(*args, impl="onednn")
    exact = C.accumulate(x, zp, w, [1] * d, padding, [1] * d, groups)
    # (a fast kernel, not the reference: the native depthwise loop also sums 7-bit weights exactly on AVX2)
    return torch.equal(got.double(), exact) and (not SEVEN_BIT_ONLY or C.int8_conv.choose(*args) in ("onednn", "native"))


@needs_conv
@pytest.mark.parametrize("channels", [1, 3, 16, 33])
def test_onednn_conv_adversarial_seven_bit_sums_exact(channels):
    x = torch.full((2, channels, 6, 6), 255, dtype=torch.uint8)
    w = torch.full((4, channels, 3, 3), SEVEN_BIT_MAX, dtype=torch.int8)
    w[1], w[2, ::2] = -SEVEN_BIT_MAX, -SEVEN_BIT_MAX
    assert _conv_sums_equal(x, 0, w, [1, 1])


@needs_conv
@settings(max_examples=20, deadline=None)
@given(c=st.integers(1, 24), o=st.integers(1, 9), size=st.integers(3, 9), kernel=st.sampled_from([1, 3, 5]),
       dims=st.sampled_from([1, 2, 3]), depthwise=st.booleans(), zp=st.integers(0, 255), seed=st.integers(0, 2**31 - 1))
def test_onednn_conv_random_seven_bit_equals_reference(c, o, size, kernel, dims, depthwise, zp, seed):
    g = torch.Generator().manual_seed(seed)
    groups, o = (c, c) if depthwise else (1, o)
    k = min(kernel, size) if dims < 3 else min(kernel, 3)
    x = torch.randint(0, 256, (2, c) + (size,) * dims, dtype=torch.uint8, generator=g)
    w = _codes((o, c // groups) + (k,) * dims, SEVEN_BIT_MAX, g)
    assert _conv_sums_equal(x, zp, w, [k // 2] * dims, groups)


# ---------------------------------------------------------------------------- full range: refused here
@needs_saturating_cpu
@pytest.mark.skipif(not (HAS_LINEAR and HAS_CONV), reason="no oneDNN for 7-bit weights either")
def test_full_range_weights_are_refused_where_they_saturate():
    g = torch.Generator().manual_seed(0)
    w = _codes((4, 64), 127, g)
    x = torch.full((3, 64), 255, dtype=torch.uint8)
    args = (x, torch.tensor(0.1), torch.tensor(0, dtype=torch.int32), w, torch.ones(4), None, None, L.onednn_prepack(w))
    assert L.int8_linear.choose(*args) != "onednn" and onednn_auto_pack(w) is None
    why = re.escape(L.ONEDNN_SATURATION.reason())
    with pytest.raises(ValueError, match=f"weight codes up to ±127: {why}"):
        L.int8_linear(*args, impl="onednn")
    wc = _codes((4, 16, 3, 3), 127, g)
    cargs = (torch.full((1, 16, 5, 5), 255, dtype=torch.uint8), 0.1, 0, wc, torch.ones(4), None, [1, 1], [1, 1],
             [1, 1], 1, "none", None, 0, None)
    assert C.int8_conv.choose(*cargs) == "reference"
    with pytest.raises(ValueError, match=re.escape(C.ONEDNN_SATURATION.reason())):
        C.int8_conv(*cargs, impl="onednn")
    # and the limits say what runs: 7-bit weights
    assert "7-bit weights" in L.int8_linear._by_name["onednn"].limits()


# ---------------------------------------------------------------------------- models
def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                         nn.Linear(128, 96), nn.ReLU(), nn.Linear(96, 10)).eval()


def _kernels(model: nn.Module) -> dict[str, set[str]]:
    return {n: set(m.kernel_counts) for n, m in model.named_modules() if isinstance(m, (Int8Linear, Int8Conv2d))}


@pytest.mark.parametrize("which", ["cnn", "mlp"])
def test_static_int8_seven_bit_models_run_onednn_and_match_simulation(which, trained_cnn, digits_data):
    model = trained_cnn if which == "cnn" else _mlp()
    sim = quanta.calibrate(quanta.prepare(model, quanta.preset("static_int8", weight_bits=7)),
                           digits_data.calib_batches(4), progress=False)
    integer = quanta.convert(sim)
    x = digits_data.x_test[:128]
    with torch.no_grad():
        ys, yi = sim(x), integer(x)
    ran = _kernels(integer)
    assert len(ran) == 4  # (cnn: 3 convs and the head; mlp: 4 Linears)
    for m in integer.modules():
        if isinstance(m, (Int8Linear, Int8Conv2d)):  # narrow 7-bit codes: [-63, 63]
            bits = m.weight_spec.bits if isinstance(m, Int8Conv2d) else m.weight_bits
            assert bits == 7 and 0 < m.weight_code_max <= 63
    if SEVEN_BIT_ONLY:  # no VNNI: every int8 layer on a fast kernel, oneDNN or quanta's AVX2 conv loops
        fast = {"onednn", "native", "avx2_gemm"}  # (avx2_gemm: quanta's AVX2 GEMM for 7-bit Linears)
        assert all(impls and impls <= fast for impls in ran.values()), ran  # (was: the reference)
    head = sim.head if which == "cnn" else sim[7]
    bound = float(head.input_quantizer.qparams()[0]) * float(head.weight.detach().abs().sum(1).max())
    assert (yi - ys).abs().max() <= bound
    assert (yi.argmax(1) == ys.argmax(1)).float().mean() >= 0.99


def test_seven_bit_accuracy_within_half_a_point_of_eight_bit(trained_cnn, digits_data):
    calib = digits_data.calib_batches(8)
    acc = {}
    for bits in (8, 7):
        q = quanta.quantize(trained_cnn, quanta.preset("static_int8", weight_bits=bits), calib, progress=False,
                            speed_check=False)
        acc[bits] = accuracy(q, digits_data.x_test, digits_data.y_test)
    assert acc[7] >= acc[8] - 0.5, acc
    assert acc[7] >= accuracy(trained_cnn, digits_data.x_test, digits_data.y_test) - 1.5, acc


def test_weight_bits_option_is_validated_and_reaches_the_cli(capsys):
    with pytest.raises(ValueError, match="weight_bits must be 8 or 7"):
        quanta.preset("static_int8", weight_bits=6)
    with pytest.raises(ValueError, match="weight_bits"):
        quanta.preset("dynamic_int8", weight_bits=True)
    assert quanta.preset("dynamic_int8", weight_bits=7).module_types["Conv2d"].weight.num_bits == 7
    from quanta.cli import main

    assert main(["config", "dump", "static_int8", "--weight-bits", "7"]) == 0
    dumped = json.loads(capsys.readouterr().out)
    assert dumped == quanta.preset("static_int8", weight_bits=7).to_dict()
    assert main(["config", "dump", "w4a8", "--weight-bits", "7"]) != 0
    assert "takes no option 'weight_bits'" in capsys.readouterr().err


def _mlp_w7(digits_data) -> tuple[nn.Module, nn.Module]:
    model = _mlp()
    return model, quanta.quantize(model, quanta.preset("static_int8", weight_bits=7), digits_data.calib_batches(2),
                                  progress=False, speed_check=False)


def test_seven_bit_model_round_trips_and_repacks_for_onednn(tmp_path, digits_data):
    model, q = _mlp_w7(digits_data)
    x = digits_data.x_test[:32]
    with torch.no_grad():
        y = q(x)
    path = quanta.save(q, tmp_path / "mlp_w7.safetensors")
    loaded = quanta.load(path, model=_mlp())
    with torch.no_grad():
        assert torch.equal(loaded(x), y)
    assert _kernels(loaded) == _kernels(q)
    assert all(m.weight_code_max <= 63 for m in loaded.modules() if isinstance(m, Int8Linear))


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor needs a C++ compiler")
def test_compiled_seven_bit_model_keeps_the_eager_numbers(digits_data):
    """Inductor lowers oneDNN's qlinear only with a frozen packed weight: compiled graphs run the
    traceable exact kernels instead (the same sums; the rescale within a few float32 ulps)."""
    import torch._dynamo

    torch._dynamo.reset()
    _, q = _mlp_w7(digits_data)
    x = digits_data.x_test[:32]
    with torch.no_grad():
        eager = q(x)
        compiled = torch.compile(q)
        got = compiled(x)
    torch.testing.assert_close(got, eager, atol=1e-5, rtol=1e-5)
