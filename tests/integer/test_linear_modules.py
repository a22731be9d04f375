"""Integer Linear modules lowered from a calibrated simulated QuantLinear."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import quanta
from quanta import LayerQuantConfig as LC
from quanta import QuantConfig
from quanta import QuantDescriptor as QD
from quanta.integer.linear import Int8Linear
from quanta.integer.weight_only import HalfLinear, Int4WeightOnlyLinear, Int8WeightOnlyLinear
from quanta.kernels import native
from quanta.kernels.gemv_rows import gemv_isa
from quanta.kernels.linear import int8_linear

K, H, N = 64, 96, 48

CONFIGS = {
    "static_s8": (LC(), Int8Linear),
    "dyn_token_sym": (LC(input=QD(per_token=True)), Int8Linear),
    "dyn_token_asym": (LC(input=QD(per_token=True, symmetric=False)), Int8Linear),
    "dyn_tensor_u8_asym": (LC(input=QD(unsigned=True, symmetric=False, dynamic=True)), Int8Linear),
    "static_u8_asym": (LC(input=QD(unsigned=True, symmetric=False)), Int8Linear),
    "w4a8": (LC(input=QD(per_token=True), weight=QD(num_bits=4, per_channel=True, narrow_range=True)), Int8Linear),
    "static_out_q": (LC(output=QD()), Int8Linear),
    "wo_int8": (LC(input=None), Int8WeightOnlyLinear),
    "wo_int4_sym_g32": (LC(input=None, weight=QD(num_bits=4, group_size=32)), Int4WeightOnlyLinear),
    "wo_int4_asym_g64": (LC(input=None, weight=QD(num_bits=4, group_size=32, symmetric=False)), Int4WeightOnlyLinear),
    "wo_int4_u_g32": (LC(input=None, weight=QD(num_bits=4, group_size=32, symmetric=False, unsigned=True)),
                      Int4WeightOnlyLinear),
    "bf16": (LC(input=QD(format="bf16", num_bits=16), weight=QD(format="bf16", num_bits=16)), HalfLinear),
    "fp16": (LC(input=QD(format="fp16", num_bits=16), weight=QD(format="fp16", num_bits=16)), HalfLinear),
}
#: for the 6-row inputs below: the native gemv (<= 8 rows; AVX-512 VNNI or AVX2), else exact float32
#: GEMMs on the codes (no VNNI), else torch._int_mm (+ the native rescale)
_INT8_FAST = "int_mm_native" if native.ready() else "int_mm"
if "float_sums" in int8_linear.available_impls():  # no VNNI: exact float32 GEMMs on the codes
    _INT8_FAST = "float_sums"
if gemv_isa() != "none":
    _INT8_FAST = "gemv_native"
FAST = {Int8Linear: _INT8_FAST, Int8WeightOnlyLinear: "int8pack_mm", Int4WeightOnlyLinear: "int4pack_mm",
        HalfLinear: "float32_upcast"}


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(K, H), nn.ReLU(), nn.Linear(H, N))
    x, y = torch.randn(256, K), torch.randn(256, N)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(20):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return model.eval()


def _sim(mlp, lc):
    sim = quanta.prepare(mlp, QuantConfig(default=lc))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quanta.calibrate(sim, [torch.randn(32, K) for _ in range(4)], progress=False)
    return sim


def _bound(sim_layer, x2, y_sim):
    """|Δ| allowed between the float simulation and the integer module: the simulation's float32
    matmul may differ from exact arithmetic by K·eps·Σ|x̂||ŵ| (any summation order), the integer
    path by a few ulps of |y| (its rescale); one output step where an output quantizer rounds."""
    with torch.no_grad():
        xq = sim_layer.input_quantizer(x2) if sim_layer.input_quantizer is not None else x2
        wq = sim_layer.weight_quantizer(sim_layer.weight)
        mag = xq.abs() @ wq.abs().t() + (0 if sim_layer.bias is None else sim_layer.bias.abs())
    eps = torch.finfo(torch.float32).eps
    b = sim_layer.in_features * eps * mag + 4 * eps * y_sim.abs()
    oq = sim_layer.output_quantizer
    if oq is not None and oq.is_enabled:
        b = b + oq.qparams(y_sim)[0]
    return b


@pytest.mark.parametrize("name", list(CONFIGS))
def test_lowered_matches_simulation(mlp, name):
    lc, cls = CONFIGS[name]
    sim = _sim(mlp, lc)
    layer = sim[0]
    assert cls.accepts(layer) is None
    mod = cls.from_simulated(layer)
    x = torch.randn(2, 3, K)  # 6 rows: torch's float32 weight-only kernels are fast only for M <= 8
    with torch.no_grad():
        y_sim = layer(x)
        y = mod(x)
    assert y.shape == y_sim.shape and y.dtype == y_sim.dtype
    d = (y - y_sim).abs()
    if cls is Int4WeightOnlyLinear:
        assert float(d.max()) <= 1e-4 * float(y_sim.abs().max())
    else:
        assert bool((d <= _bound(layer, x.reshape(-1, K), y_sim.reshape(-1, layer.out_features)).reshape(d.shape)).all())
    assert set(mod.kernel_counts) == {FAST[cls]}, mod.kernel_counts
    assert "kernel=" in repr(mod)
    # a fresh module built from the constructor + load_state_dict reproduces the outputs exactly
    fresh = _fresh(mod)
    fresh.load_state_dict(mod.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x), y)


def _fresh(mod):
    common = dict(bias=mod.bias is not None, output_spec=mod.output_spec)
    if isinstance(mod, Int8Linear):
        return Int8Linear(mod.in_features, mod.out_features, act_spec=mod.act_spec, weight_bits=mod.weight_bits,
                          **common)
    if isinstance(mod, Int4WeightOnlyLinear):
        return Int4WeightOnlyLinear(mod.in_features, mod.out_features, group_size=mod.group_size,
                                    symmetric=mod.symmetric, signed=mod.signed, **common)
    if isinstance(mod, HalfLinear):
        return HalfLinear(mod.in_features, mod.out_features, dtype=mod.half_dtype, cast_input=mod.cast_input, **common)
    return type(mod)(mod.in_features, mod.out_features, **common)


def test_accepts_reasons(mlp):
    sim = _sim(mlp, LC(input=None))
    assert "weight-only" in Int8Linear.accepts(sim[0])
    assert Int4WeightOnlyLinear.accepts(sim[0]) is not None
    assert "QuantLinear" in Int8Linear.accepts(nn.Linear(2, 2))
    raw = quanta.prepare(mlp, QuantConfig(default=LC()))  # not calibrated
    assert "calibrate" in Int8Linear.accepts(raw[0])
    with pytest.raises(ValueError, match="cannot lower"):
        Int8Linear.from_simulated(raw[0])


def test_storage_ratios():
    fp32 = 1024 * 1024 * 4
    m8 = Int8Linear(1024, 1024, bias=False, act_spec=quanta.QuantSpec())
    assert m8.storage_bytes() <= 0.27 * fp32
    m4 = Int4WeightOnlyLinear(1024, 1024, bias=False, group_size=128, symmetric=False)
    assert m4.storage_bytes() <= 0.15 * fp32
    w4a8 = Int8Linear(1024, 1024, bias=False, weight_bits=4)
    assert w4a8.storage_bytes() <= 0.15 * fp32


def test_bad_inputs_raise():
    mod = Int8Linear(16, 8)
    with pytest.raises(TypeError, match="dtype"):
        mod(torch.zeros(2, 16, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"\[\.\.\., 16\]"):
        mod(torch.zeros(2, 15))
    with pytest.raises(ValueError, match="weights on cpu"):
        mod(torch.zeros(2, 16, device="meta"))
    with pytest.raises(TypeError, match="tensor"):
        mod([1.0] * 16)


def test_bf16_input_weight_only_uses_fast_kernel():
    mod = Int4WeightOnlyLinear(128, 32, group_size=64)
    mod.weight.random_(0, 256)
    mod.pack()
    x = torch.randn(4, 128)
    y = mod(x.bfloat16())
    assert y.dtype == torch.bfloat16 and mod.kernel_counts["int4pack_mm"] == 1
    ref = mod.__class__(128, 32, group_size=64)
    ref.load_state_dict(mod.state_dict())
    ref.set_impl("reference")
    torch.testing.assert_close(y.float(), ref(x.bfloat16()).float(), rtol=2e-2, atol=2e-2)


def test_settled_fast_path_still_validates_inputs(mlp):
    """After a first call settles the kernels, a call with the wrong width, dtype or a 0-d input
    still gets the named error (never a silent reshape)."""
    sim = _sim(mlp, CONFIGS["dyn_token_asym"][0])
    mod = Int8Linear.from_simulated(sim[0])
    x = torch.randn(2, K)
    y = mod(x)
    if not mod.binding.calls:
        pytest.skip("no settled native call on this machine")
    assert torch.equal(mod(x), y)
    with pytest.raises(ValueError, match=f"expects inputs \\[..., {K}\\]"):
        mod(torch.randn(K, 2))  # same numel, wrong width
    with pytest.raises(TypeError, match="dtype"):
        mod(x.double())
    with pytest.raises(ValueError):
        mod(torch.tensor(1.0))


def test_large_weights_live_in_one_streaming_copy():
    """A >= 2 MiB int8 weight is re-homed for streaming (same values; the buffer and the kernel
    operand are one tensor, not two copies) and survives state_dict round trips."""
    torch.manual_seed(0)
    lin = nn.Linear(2048, 1024, bias=False)
    q = quanta.quantize(nn.Sequential(lin).eval(), "dynamic_int8", speed_check=False)[0]
    x = torch.randn(1, 2048)
    y = q(x)  # (the first call builds the kernel operands: IntegerModule.pack)
    assert q._w8.data_ptr() == q.weight.data_ptr()
    fresh = Int8Linear(2048, 1024, bias=False, act_spec=q.act_spec)
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh.weight, q.weight) and torch.equal(fresh(x), y)
    assert torch.equal(copy.deepcopy(q)(x), y)


def test_large_weight_only_weights_are_rehomed_and_bf16_outputs_kept_as_they_are():
    """Weight-only int8: the >= 2 MiB buffer is re-homed (one copy, homed again after
    load_state_dict and deepcopy), and a bfloat16 kernel output under a bfloat16 output quantizer
    is returned as it is (already on that grid): equal to applying the quantizer."""
    from quanta.kernels.weight_only import int8_weight_only_linear

    torch.manual_seed(0)
    q = quanta.quantize(nn.Sequential(nn.Linear(2048, 1024)).eval(), "weight_only_int8", speed_check=False)[0]
    assert isinstance(q, Int8WeightOnlyLinear) and q._homed == q.weight.data_ptr()
    x = torch.randn(2, 2048)
    y = q(x)
    fresh = Int8WeightOnlyLinear(2048, 1024, output_spec=q.output_spec, activation=q.activation)
    fresh.load_state_dict(q.state_dict())
    assert fresh._homed == fresh.weight.data_ptr() and torch.equal(fresh(x), y)
    assert torch.equal(copy.deepcopy(q)(x), y)
    impl = next(iter(q.kernel_counts))  # what the module ran, run again by name
    with torch.no_grad():
        raw = int8_weight_only_linear(x.bfloat16(), q.weight, q.weight_scale, q.bias, impl=impl)
    assert raw.dtype == torch.bfloat16 and torch.equal(y, q._apply_output(raw.float()))
