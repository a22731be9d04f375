"""QuantSpec (frozen, validated, serialisable) and the errors bad input raises; no in-place writes."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from quanta.core import (
    Format,
    Granularity,
    QuantSpec,
    Rounding,
    choose_qparams,
    compute_range,
    dequantize,
    fake_quantize,
    quantize,
    quantize_tensor,
)

SPECS = [
    QuantSpec(),
    QuantSpec(bits=4, signed=False, symmetric=False, narrow_range=True, rounding="half_away"),
    QuantSpec(bits=4, granularity="per_channel", axis=-1, dynamic=True),
    QuantSpec(bits=3, granularity="per_group", group_size=32, group_axis=0, rounding="stochastic"),
    QuantSpec(granularity="per_token"),
    QuantSpec(format="fp8_e5m2", bits=8, granularity="per_channel", axis=1),
    QuantSpec(format="bf16", bits=16),
    QuantSpec(format="pow2", bits=5, signed=False),
]


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_to_dict_from_dict_round_trip(spec):
    d = spec.to_dict()
    assert json.loads(json.dumps(d)) == d  # plain JSON values
    again = QuantSpec.from_dict(json.loads(json.dumps(d)))
    assert again == spec and hash(again) == hash(spec) and again.to_dict() == d
    assert d["version"] == QuantSpec.VERSION


def test_spec_is_frozen_and_normalised():
    spec = QuantSpec(format="INT", granularity="Per_Channel", axis=0, rounding=Rounding.FLOOR)
    assert spec.format is Format.INT and spec.granularity is Granularity.PER_CHANNEL
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.bits = 4  # type: ignore[misc]
    assert QuantSpec(granularity="per_token").dynamic is True
    assert spec.replace(bits=4).bits == 4 and spec.bits == 8
    with pytest.raises(ValueError, match="bits"):
        spec.replace(bits=0)
    assert str(QuantSpec(bits=4, granularity="per_group", group_size=8)) == "int4 s sym per_group(g=8, axis=-1)"
    assert (QuantSpec(bits=8).qmin, QuantSpec(bits=8, narrow_range=True).qmin) == (-128, -127)
    assert (QuantSpec(bits=8, signed=False).qmax, QuantSpec(bits=8, signed=False, narrow_range=True).qmax) == (255, 254)


def test_from_dict_rejects_unknown_fields_newer_versions_and_non_dicts():
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['colour'\]"):
        QuantSpec.from_dict({"bits": 8, "colour": "red"})
    with pytest.raises(ValueError, match="version 2 is newer"):
        QuantSpec.from_dict({**QuantSpec().to_dict(), "version": 2})
    with pytest.raises(TypeError, match="dict"):
        QuantSpec.from_dict([("bits", 8)])  # type: ignore[arg-type]


@pytest.mark.parametrize("kwargs,match", [
    ({"bits": 0}, "bits"), ({"bits": 17}, "bits"), ({"bits": -3}, "bits"),
    ({"format": "fp8_e4m3", "bits": 4}, "bits"), ({"format": "fp16"}, "bits"),
    ({"format": "pow2", "bits": 1}, "bits"), ({"format": "pow2", "bits": 4, "symmetric": False}, "symmetric"),
    ({"bits": 1, "symmetric": False}, "symmetric"), ({"format": "bf16", "bits": 16, "signed": False}, "signed"),
    ({"granularity": "per_channel"}, "axis"), ({"axis": 0}, "axis"),
    ({"granularity": "per_group"}, "group_size"), ({"granularity": "per_group", "group_size": 0}, "group_size"),
    ({"group_size": 4}, "group_size"),
    ({"format": "fp16", "bits": 16, "granularity": "per_token"}, "granularity"),
    ({"format": "fp8_e4m3", "bits": 8, "rounding": "floor"}, "rounding"),
], ids=lambda v: str(v) if isinstance(v, str) else "-".join(f"{k}={x}" for k, x in v.items()))
def test_invalid_specs_raise_value_error_naming_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantSpec(**kwargs)


@pytest.mark.parametrize("field,value,choice", [
    ("format", "int3", "'fp8_e4m3'"), ("rounding", "nearest", "'half_even'"), ("granularity", "per_row", "'per_token'"),
])
def test_unknown_names_list_the_choices(field, value, choice):
    with pytest.raises(ValueError, match=f"{field}.*{value}.*choose one of.*{choice}"):
        QuantSpec(**{field: value})


@pytest.mark.parametrize("field,value", [
    ("bits", "8"), ("bits", 8.0), ("bits", True), ("signed", 1), ("symmetric", "yes"), ("narrow_range", None),
    ("axis", 0.0), ("group_size", "4"), ("group_axis", None), ("dynamic", 0), ("version", "1"), ("format", 3),
    ("rounding", None),
])
def test_wrong_types_raise_type_error_naming_the_field(field, value):
    kw = {"granularity": "per_channel", "axis": 0} if field == "axis" else {}
    kw = {"granularity": "per_group", "group_size": 4} if field == "group_size" else kw
    with pytest.raises(TypeError, match=f"QuantSpec.{field}"):
        QuantSpec(**{**kw, field: value})


# ----------------------------------------------------------------- call-site errors
X = torch.randn(4, 6)


@pytest.mark.parametrize("spec,match", [
    (QuantSpec(granularity="per_channel", axis=2), "axis 2"),
    (QuantSpec(granularity="per_channel", axis=-3), "axis -3"),
    (QuantSpec(granularity="per_group", group_size=2, group_axis=2), "group_axis"),
    (QuantSpec(granularity="per_group", group_size=4), "group_size 4"),
    (QuantSpec(granularity="per_group", group_size=3, group_axis=0), "group_size 3"),
], ids=["axis", "negative-axis", "group_axis", "group_size-last", "group_size-axis0"])
def test_layout_errors_at_every_entry_point(spec, match):
    for call in (lambda: compute_range(X, spec), lambda: quantize(X, torch.ones(4), 0, spec),
                 lambda: fake_quantize(X, torch.ones(4), 0, spec), lambda: quantize_tensor(X, spec)):
        with pytest.raises(ValueError, match=match):
            call()


def test_non_floating_inputs_raise_type_error():
    spec = QuantSpec()
    for bad in (torch.arange(6), torch.ones(3, dtype=torch.bool), torch.ones(3, dtype=torch.uint8)):
        for call in (lambda bad=bad: quantize(bad, 1.0, 0, spec), lambda bad=bad: fake_quantize(bad, 1.0, 0, spec),
                     lambda bad=bad: compute_range(bad, spec), lambda bad=bad: quantize_tensor(bad, spec)):
            with pytest.raises(TypeError, match="floating"):
                call()
    with pytest.raises(TypeError, match="torch.Tensor"):
        quantize([1.0, 2.0], 1.0, 0, spec)  # type: ignore[arg-type]


@pytest.mark.parametrize("spec,scale,zp,match", [
    (QuantSpec(granularity="per_channel", axis=0), torch.ones(6), 0, "do not fit"),
    (QuantSpec(granularity="per_channel", axis=1), torch.ones(4), 0, "do not fit"),
    (QuantSpec(), torch.ones(2), 0, "do not fit"),
    (QuantSpec(granularity="per_group", group_size=2), torch.ones(3, 4), 0, "do not fit"),  # transposed [4, 3]
    (QuantSpec(granularity="per_token"), torch.ones(6, 1), 0, "do not fit"),
    (QuantSpec(granularity="per_channel", axis=0), torch.ones(4), torch.zeros(3, dtype=torch.int32),
     "zero_point shape"),
    (QuantSpec(), 1.0, 0.5, "integers"),
    (QuantSpec(), 0.0, 0, "positive"), (QuantSpec(), -1.0, 0, "positive"), (QuantSpec(), float("nan"), 0, "finite"),
    (QuantSpec(), float("inf"), 0, "finite"),
    (QuantSpec(format="fp8_e4m3", bits=8), 1.0, 3, "no zero point"),
], ids=["ch0", "ch1", "tensor", "group-transposed", "token", "zp-shape", "zp-frac", "scale0", "scale-neg",
        "scale-nan", "scale-inf", "fp8-zp"])
def test_parameters_that_do_not_fit_raise(spec, scale, zp, match):
    for call in (quantize, fake_quantize):
        with pytest.raises(ValueError, match=match):
            call(X, scale, zp, spec)
    with pytest.raises(ValueError, match=match):
        dequantize(torch.zeros(4, 6, dtype=torch.int8), scale, zp, spec)


def test_harmless_shape_variants_are_accepted():
    x = torch.randn(2, 3, 5)
    tok = QuantSpec(granularity="per_token")
    qt = quantize_tensor(x, tok)
    assert torch.equal(quantize(x, qt.scale.reshape(2, 3), qt.zero_point.reshape(2, 3), tok), qt.q)
    ch = QuantSpec(granularity="per_channel", axis=1)
    qt = quantize_tensor(x, ch)
    assert torch.equal(quantize(x, qt.scale.reshape(3, 1, 1), 0, ch), qt.q)
    assert torch.equal(quantize(x, qt.scale, 0, ch), quantize(x, qt.scale, torch.zeros(3, dtype=torch.int32), ch))


def test_learnable_parameter_errors():
    spec = QuantSpec()
    with pytest.raises(TypeError, match="float32"):
        fake_quantize(X, torch.tensor(1.0, dtype=torch.float64, requires_grad=True), 0, spec)
    with pytest.raises(ValueError, match="positive"):
        fake_quantize(X, torch.tensor(-1.0, requires_grad=True), 0, spec)
    ch = QuantSpec(granularity="per_channel", axis=0)
    with pytest.raises(ValueError, match="zero_point shape"):
        fake_quantize(X, torch.ones(4, requires_grad=True), torch.zeros(3), ch)


@pytest.mark.parametrize("spec", [QuantSpec(bits=4, symmetric=False), QuantSpec(granularity="per_channel", axis=1),
                                  QuantSpec(granularity="per_group", group_size=3, rounding="stochastic"),
                                  QuantSpec(format="fp8_e4m3", bits=8), QuantSpec(format="pow2", bits=4)], ids=str)
def test_inputs_are_never_modified_in_place(spec):
    x = torch.randn(4, 6)
    x0 = x.clone()
    lo, hi = compute_range(x, spec)
    lo0, hi0 = lo.clone(), hi.clone()
    scale, zp = choose_qparams(lo, hi, spec)
    scale0, zp0 = scale.clone(), zp.clone()
    q = quantize(x, scale, zp, spec, generator=torch.Generator().manual_seed(0))
    q0 = q.clone()
    dequantize(q, scale, zp, spec)
    xr = x.clone().requires_grad_()
    s = scale.clone().requires_grad_()
    fake_quantize(xr, s, zp, spec).sum().backward()
    quantize_tensor(x, spec)
    pairs = ((x, x0), (lo, lo0), (hi, hi0), (scale, scale0), (zp, zp0), (q, q0), (xr.detach(), x0), (s.detach(), scale0))
    for a, b in pairs:
        assert torch.equal(a, b) and a.dtype == b.dtype
