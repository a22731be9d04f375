"""Tier 1: no ``impl="auto"`` choice runs a u8 × s8 kernel whose int16 pair sums saturate here.

x86 CPUs without VNNI sum pairs of uint8 × int8 products in a saturating int16 (``vpmaddubsw``):
fbgemm's and oneDNN's int8 kernels then return wrong sums, silently (measured on an AVX2 EPYC:
255 · 127 pairs summed to 32767 each, about half the exact sum). `quanta.kernels.u8s8_saturation`
probes each such kernel once; these tests feed every op the adversarial codes (activations 255,
weights ±127, K >= 2) through ``impl="auto"`` and compare with the exact reference, on any CPU.
"""

from __future__ import annotations

import re

import pytest
import torch

from quanta.kernels import conv as C
from quanta.kernels import linear as L
from quanta.kernels import recurrent as R
from quanta.kernels.u8s8_saturation import (
    SATURATES,
    SaturationProbe,
    adversarial_operands,
)

#: relative bound of the fast kernels that rescale in float32 (oneDNN, fbgemm) vs the reference;
#: a saturated sum is off by ~50%
REL = 1e-5


def _pairwise_saturating_sums(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """What ``vpmaddubsw`` + ``vpmaddwd`` compute: each pair of u8 × s8 products saturated to int16
    (an odd K's last product paired with a zero, as the kernels pad their tails)."""
    prods = x.long()[:, None, :] * w.long()[None, :, :]
    if prods.shape[-1] % 2:
        prods = torch.nn.functional.pad(prods, (0, 1))
    pairs = prods.reshape(*prods.shape[:2], -1, 2).sum(-1).clamp(-(2**15), 2**15 - 1)
    return pairs.sum(-1).float()


def test_probe_tells_a_saturating_kernel_from_an_exact_one():
    exact = adversarial_operands()[2]
    assert exact[0, 0] == 64 * 255 * 127 and exact[0, 2] == 0
    assert SaturationProbe("exact", lambda x, w: x.double() @ w.double().t()).reason() is None
    saturating = SaturationProbe("simulated", _pairwise_saturating_sums)
    assert not saturating.exact()
    assert SATURATES in saturating.reason() or "not exact" in saturating.reason()
    broken = SaturationProbe("broken", lambda x, w: torch.ops.aten.nonexistent_op(x))
    assert "failed" in broken.reason() and not broken.exact()


def _linear_args():
    x, w, _ = adversarial_operands(rows=5)
    packed = L.onednn_prepack(w) if torch.backends.mkldnn.is_available() else None
    return (x, torch.tensor(0.01), torch.tensor(0, dtype=torch.int32), w, torch.full((4,), 0.002),
            torch.zeros(4), None, packed)


def _conv_args():
    x = torch.full((2, 16, 5, 5), 255, dtype=torch.uint8)
    w = torch.full((4, 16, 3, 3), 127, dtype=torch.int8)
    w[1], w[2, ::2] = -127, -127
    return (x, 0.01, 0, w, torch.full((4,), 0.002), torch.zeros(4), [1, 1], [1, 1], [1, 1], 1, "none", None, 0, None)


def _rnn_args(cell: bool):
    """A one-step LSTM on u8 asymmetric activations: the input (all 1.0) and h0 (all 0.5) quantize
    to codes 255; weight rows of ±127; scales put the exact gate pre-activations near ±2."""
    i, h = 64, 8
    rows = torch.tensor([127 if r % 2 == 0 else -127 for r in range(4 * h)], dtype=torch.int8)
    w = [rows[:, None].expand(4 * h, i).contiguous(), torch.full((4 * h,), 2 / (i * 127)), torch.zeros(4 * h),
         rows[:, None].expand(4 * h, h).contiguous(), torch.full((4 * h,), 1 / (h * 127)), torch.zeros(4 * h)]
    act = (8, False, False, False)
    if cell:
        return ("LSTM", torch.ones(3, i), [torch.full((3, h), 0.5)] * 2, w, *act)
    return ("LSTM", torch.ones(1, 3, i), [torch.full((1, 3, h), 0.5)] * 2, w, 1, False, False, *act)


OPS = {"int8_linear": (L.int8_linear, _linear_args), "int8_conv": (C.int8_conv, _conv_args),
       "dynamic_int8_rnn": (R.dynamic_int8_rnn, lambda: _rnn_args(False)),
       "dynamic_int8_rnn_cell": (R.dynamic_int8_rnn_cell, lambda: _rnn_args(True))}


def _outputs(y):
    return list(y) if isinstance(y, (list, tuple)) else [y]


@pytest.mark.parametrize("name", list(OPS))
def test_auto_gives_the_exact_sums_of_adversarial_codes(name):
    op, make = OPS[name]
    args = make()
    ref, auto = _outputs(op(*args, impl="reference")), _outputs(op(*args, impl="auto"))
    chosen = op.choose(*args)
    for r, a in zip(ref, auto):
        assert bool(((a - r).abs() <= REL * (1 + r.abs())).all()), (chosen, float((a - r).abs().max()))


@pytest.mark.parametrize("name, impl, probe", [("int8_linear", "onednn", L.ONEDNN_SATURATION),
                                               ("int8_conv", "onednn", C.ONEDNN_SATURATION),
                                               ("dynamic_int8_rnn", "fbgemm", R.FBGEMM_SATURATION),
                                               ("dynamic_int8_rnn_cell", "fbgemm", R.FBGEMM_SATURATION)])
def test_a_kernel_that_saturates_here_is_refused_and_would_be_wrong(name, impl, probe):
    """Where the probe finds saturation: the kernel really gives wrong sums for these codes (the
    probe is no false alarm), ``auto`` passes over it, and forcing it raises naming the reason."""
    if probe.exact():
        pytest.skip(f"{impl}'s u8×s8 sums are exact on this CPU")
    op, make = OPS[name]
    args = make()
    assert op.choose(*args) != impl
    kernel = next(i for i in op.impls if i.name == impl)
    wrong, ref = _outputs(kernel.fn(*args)), _outputs(op(*args, impl="reference"))
    assert max(float((a - r).abs().max()) for a, r in zip(wrong, ref)) > 0.05
    error = ValueError if op.why_not_available(impl) is None else RuntimeError  # fbgemm: 7-bit codes still run
    with pytest.raises(error, match=re.escape(probe.reason())):
        op(*args, impl=impl)


def test_fbgemm_keeps_running_7bit_activations():
    """reduce_range codes (0..127) cannot saturate: 2 · 127 · 127 < 2^15, so fbgemm stays usable."""
    if R.dynamic_int8_rnn.why_not_available("fbgemm") is not None:
        pytest.skip(f"fbgemm: {R.dynamic_int8_rnn.why_not_available('fbgemm')}")
    args = _rnn_args(False)[:-4] + (7, False, False, False)
    assert R._rnn_guard_fbgemm(*args) is None


def test_doctor_names_the_saturation():
    from quanta.kernels.doctor import diagnose

    report = diagnose(build=False)
    states = {(op.name, i.name): i for op in report.ops for i in op.impls}
    onednn = states[("int8_linear", "onednn")]
    # (available where some weight bound sums exactly: full range with VNNI, ±64 (7-bit) without)
    assert onednn.available == (L.ONEDNN_SATURATION.exact_bound() is not None) or not torch.backends.mkldnn.is_available()
    if not L.ONEDNN_SATURATION.exact() and onednn.available:
        assert "7-bit weights" in onednn.limits and L.ONEDNN_SATURATION.reason() in onednn.limits
        assert onednn.limits in str(report)
    elif not onednn.available:
        assert onednn.why_not == L.ONEDNN_SATURATION.reason(64) and onednn.why_not in str(report)
    fbgemm = states[("dynamic_int8_rnn", "fbgemm")]
    if fbgemm.available and not R.FBGEMM_SATURATION.exact():
        assert "7-bit" in fbgemm.limits and R.FBGEMM_SATURATION.reason() in str(report)
