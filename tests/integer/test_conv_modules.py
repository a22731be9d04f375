"""Int8Conv1d/2d/3d: lowered from calibrated simulated convs, against the simulation.

The integer conv sees the same activation codes as the simulation (its float-input quantizer
equals `quanta.core.quantize`) and the same weight codes, so its float output differs from the
simulated conv only by float summation order: asserted below ``REL`` of the layer's output
range, about 1/40000 of one 8-bit step of that range (measured: ~5e-7).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import quanta
from quanta.core import QuantSpec, quantize
from quanta.integer.conv import Int8Conv1d, Int8Conv2d, Int8Conv3d
from quanta.kernels import conv_native
from quanta.kernels.conv import ONEDNN_SATURATION, int8_conv
from quanta.nn import LayerQuantConfig, QuantDescriptor
from quanta.nn.modules.weighted import QuantConv2d

REL = 1e-5
# (full-range weights; without VNNI oneDNN runs only 7-bit ones: tests/kernels/test_u8s8_seven_bit.py)
HAS_ONEDNN = "onednn" in int8_conv.available_impls() and ONEDNN_SATURATION.exact()
#: the fast implementations this machine has (native where its guards accept, else oneDNN)
FAST = tuple(i for i in int8_conv.available_impls() if i != "reference" and (i != "onednn" or HAS_ONEDNN)
             and (i != "native" or conv_native.conv_isa() == "avx512_vnni")) or ("reference",)  # (AVX2: 7-bit only)


def fast_calls(m) -> int:
    """How many calls of ``m`` ran a fast implementation; asserts no other one ran."""
    assert set(m.kernel_counts) <= set(FAST) | {"reference"}, m.kernel_counts
    return sum(m.kernel_counts[i] for i in FAST)
U8 = LayerQuantConfig(input=QuantDescriptor(unsigned=True, symmetric=False))
S8 = LayerQuantConfig(input=QuantDescriptor())
SHIFT = 0.3  # calibration inputs x - 0.3: the first conv gets a non-zero input zero point


@pytest.fixture(scope="module")
def lowered(trained_cnn, digits_data):
    """(simulated DigitsCNN with folded BN, {name: Int8Conv2d}, test inputs)."""
    sim = quanta.prepare(trained_cnn, quanta.QuantConfig(default=U8, fold_bn=True))
    quanta.calibrate(sim, [b - SHIFT for b in digits_data.calib_batches()], progress=False)
    convs = {n: Int8Conv2d.from_simulated(m) for n, m in sim.named_modules() if isinstance(m, QuantConv2d)}
    return sim, convs, digits_data.x_test[:96] - SHIFT


def _io(sim, name, x):
    """Input and output of the simulated module ``name`` on the model input ``x``."""
    seen = {}
    hook = sim.get_submodule(name).register_forward_hook(lambda m, a, o: seen.update(x=a[0], y=o))
    try:
        with torch.no_grad():
            sim(x)
    finally:
        hook.remove()
    return seen["x"], seen["y"]


def test_lowered_convs_match_simulation(lowered):
    sim, convs, x = lowered
    assert set(convs) == {"features.0", "features.3", "features.7"}
    assert int(convs["features.0"].input_zero_point) > 0
    for name, conv in convs.items():
        xin, ysim = _io(sim, name, x)
        conv.kernel_counts.clear()
        with torch.no_grad():
            y = conv(xin)
        assert y.shape == ysim.shape and y.dtype == torch.float32
        bound = REL * float(ysim.abs().max())
        err = float((y - ysim).abs().max())
        assert err <= bound, f"{name}: {err:.3g} > {bound:.3g}"
        assert err <= float(sim.get_submodule(name).input_quantizer.qparams()[0])  # << one step anyway
        assert fast_calls(conv) == 1 and sum(conv.kernel_counts.values()) == 1


def test_float_input_quantization_is_quanta_quantize():
    gen = torch.Generator().manual_seed(0)
    for spec, lo, hi in ((QuantSpec(signed=False, symmetric=False), -0.7, 2.1), (QuantSpec(), -1.3, 1.3)):
        m = Int8Conv2d(3, 4, 1, input_spec=spec)
        scale, zp = quanta.core.choose_qparams(torch.tensor(lo), torch.tensor(hi), spec)
        m.input_scale.copy_(scale)
        m.input_zero_point.copy_(zp)
        m.pack()
        x = torch.randn(2, 3, 200, 200, generator=gen) * 1.5
        ties = (torch.randint(-140, 140, (2, 3, 200, 200), generator=gen) + 0.5) * scale  # near-ties
        for t in (x, ties, torch.nextafter(ties, torch.zeros(())), x.to(torch.bfloat16)):
            offset = 128 if spec.signed else 0
            expect = quantize(t.float(), scale, zp, spec).to(torch.int16) + offset
            assert torch.equal(m.quantize_input(t).to(torch.int16), expect)


def test_chain_with_uint8_activations_and_fused_relu(lowered):
    sim, convs, x = lowered
    c0 = Int8Conv2d.from_simulated(sim.features[0])
    c3 = convs["features.3"]
    xin, _ = _io(sim, "features.0", x)
    with torch.no_grad():
        float_mid = torch.relu(c0(xin))  # float interface: conv -> relu -> (c3 quantizes)
        codes_float = c3.quantize_input(float_mid)
        y_float = c3(float_mid)
        c0.set_output("uint8", *c3.input_code_qparams(), post_op="relu")
        codes = c0(xin)  # uint8 on c3's input grid, relu fused
        c3.kernel_counts.clear()
        y = c3(codes)
    assert codes.dtype == torch.uint8 and codes.shape == float_mid.shape
    assert fast_calls(c0) == 2 and fast_calls(c3) == 1 and sum(c3.kernel_counts.values()) == 1
    diff = (codes.int() - codes_float.int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) <= 1e-3
    assert torch.equal(c3(codes_float), y_float)  # uint8 input = float input quantized
    scale, zp = c3.input_code_qparams()
    # a one-code difference moves an output by at most scale · Σ|w_hat| over one output's window
    w_hat = c3.weight.float().abs().flatten(1).sum(1) * c3.weight_scale
    bound = float(scale * w_hat.max()) * float(diff.max()) + REL * float(y_float.abs().max())
    assert float((y - y_float).abs().max()) <= bound
    # relu fused: codes never go below the zero point; the simulated chain agrees within one step
    assert int(codes.min()) >= zp
    sim_mid = sim.features[3].input_quantizer(torch.relu(_io(sim, "features.0", x)[1]))
    assert float(((codes.float() - zp) * scale - sim_mid).abs().max()) <= scale * 1.0001


def test_output_quantizer_applied_in_float_mode(trained_cnn, digits_data):
    cfg = quanta.QuantConfig(default=U8, fold_bn=True, rules={
        "features.3": LayerQuantConfig(input=U8.input, output=QuantDescriptor(unsigned=True, symmetric=False))})
    sim = quanta.prepare(trained_cnn, cfg)
    quanta.calibrate(sim, digits_data.calib_batches(), progress=False)
    conv = Int8Conv2d.from_simulated(sim.features[3])
    assert conv.output_spec is not None
    xin, ysim = _io(sim, "features.3", digits_data.x_test[:64])
    with torch.no_grad():
        y = conv(xin)
    step = float(conv.output_scale)
    diff = (y - ysim).abs()
    assert float(diff.max()) <= step * 1.0001  # a tie may flip to the neighbouring level
    assert float((diff > step / 2).float().mean()) <= 1e-3
    assert "fake-quantized" in repr(conv)


def test_storage_is_a_quarter_of_fp32(lowered):
    _, convs, _ = lowered
    fp32 = {n: 4 * (c.weight.numel() + c.bias.numel()) for n, c in convs.items()}
    total = sum(c.storage_bytes() for c in convs.values())
    assert total <= 0.27 * sum(fp32.values())
    for n, c in convs.items():
        if c.in_channels >= 16:
            assert c.storage_bytes() <= 0.27 * fp32[n], n


@pytest.mark.parametrize("mode", ["float", "uint8-relu6"])
def test_state_dict_round_trip_through_the_constructor(lowered, mode):
    sim, _, x = lowered
    src = Int8Conv2d.from_simulated(sim.features[3])
    if mode != "float":
        src.set_output("uint8", 0.031, 7, post_op="relu6")
    xin, _ = _io(sim, "features.3", x)
    fresh = Int8Conv2d.from_config(src.config())
    by_hand = Int8Conv2d(16, 32, 3, padding=1, input_spec=src.input_spec, weight_spec=src.weight_spec,
                         output=src.output_kind, post_op=src.post_op)
    for dst in (fresh, by_hand):
        dst.load_state_dict(src.state_dict())
        with torch.no_grad():
            assert torch.equal(dst(xin), src(xin))
        assert fast_calls(dst) == 1 and sum(dst.kernel_counts.values()) == 1


def test_bad_inputs_raise_clearly(lowered):
    conv = lowered[1]["features.3"]
    with pytest.raises(TypeError, match="float tensor or uint8 activation codes.*int32"):
        conv(torch.zeros(1, 16, 8, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"C=16.*\(1, 15, 8, 8\)"):
        conv(torch.zeros(1, 15, 8, 8))
    with pytest.raises(ValueError, match="expects"):
        conv(torch.zeros(16, 8, 8))
    with pytest.raises(TypeError, match="unsigned input grid"):
        conv(torch.zeros(1, 16, 8, 8, dtype=torch.int8))
    with pytest.raises(TypeError, match="expects a tensor"):
        conv([1.0])
    with pytest.raises(ValueError, match="zero_point"):
        Int8Conv2d(3, 4, 3).set_output("uint8", 0.1, 256)
    with pytest.raises(ValueError, match="output kind"):
        Int8Conv2d(3, 4, 3).set_output("int4")
    with pytest.raises(ValueError, match="post_op"):
        Int8Conv2d(3, 4, 3).set_output("float", post_op="gelu")
    with pytest.raises(ValueError, match="input_spec.*per-tensor"):
        Int8Conv2d(3, 4, 3, input_spec=QuantSpec(granularity="per_channel", axis=1))
    with pytest.raises(ValueError, match="divisible by groups"):
        Int8Conv2d(3, 4, 3, groups=2)


def test_accepts_gives_reasons(trained_cnn, digits_data):
    sim = quanta.prepare(trained_cnn, quanta.QuantConfig(default=U8, fold_bn=True))
    conv = sim.features[3]
    assert "calibrate" in Int8Conv2d.accepts(conv)
    with pytest.raises(ValueError, match="calibrate"):
        Int8Conv2d.from_simulated(conv)
    quanta.calibrate(sim, digits_data.calib_batches(1), progress=False)
    assert Int8Conv2d.accepts(conv) is None
    assert "QuantConv1d" in Int8Conv1d.accepts(conv)
    conv.padding_mode = "reflect"
    assert "padding_mode" in Int8Conv2d.accepts(conv)
    conv.padding_mode = "zeros"
    conv.input_quantizer.disable()
    assert "input quantizer is off" in Int8Conv2d.accepts(conv)


def _small_sim(dims, config, gen):
    conv = {1: nn.Conv1d, 3: nn.Conv3d}[dims]
    size = {1: 33, 3: 7}[dims]
    model = nn.Sequential(conv(7, 6, 3, stride=2, padding=1), nn.ReLU(),
                          conv(6, 6, 3, padding=2, dilation=2, groups=6), nn.ReLU(), conv(6, 4, 1)).eval()
    sim = quanta.prepare(model, quanta.QuantConfig(default=config))
    data = [torch.randn((4, 7) + (size,) * dims, generator=gen) + 0.5 for _ in range(2)]
    quanta.calibrate(sim, data, progress=False)
    return sim, data[0]


@pytest.mark.parametrize("dims", [1, 3])
@pytest.mark.parametrize("act", ["u8", "s8"])
def test_conv1d_conv3d_chains(dims, act):
    cls = {1: Int8Conv1d, 3: Int8Conv3d}[dims]
    sim, x = _small_sim(dims, U8 if act == "u8" else S8, torch.Generator().manual_seed(dims))
    ints = [cls.from_simulated(sim[i]) for i in (0, 2, 4)]
    with torch.no_grad():
        h, ysim = x, sim(x)
        for i, m in enumerate(ints):  # float interface, relu in float
            h = m(h)
            expect = _io(sim, str(2 * i), x)[1]
            assert float((h - expect).abs().max()) <= REL * float(expect.abs().max()) + 1e-7
            h = torch.relu(h) if i < 2 else h
        assert torch.allclose(h, ysim, atol=REL * float(ysim.abs().max()))
        ints[0].set_output("uint8", *ints[1].input_code_qparams(), post_op="relu")
        ints[1].set_output("uint8", *ints[2].input_code_qparams(), post_op="relu")
        fused = ints[2](ints[1](ints[0](x)))
        if act == "s8":  # signed grids also take int8 codes (uint8 codes - 128)
            codes = ints[0](x)
            assert torch.equal(ints[1](codes), ints[1]((codes.int() - 128).to(torch.int8)))
    step = ints[2].input_code_qparams()[0] * float(ints[2].weight_scale.max()) * 127 * 6
    assert float((fused - ysim).abs().max()) <= step  # one input step of the last conv, at most
    assert all(fast_calls(m) >= 1 for m in ints)


def test_reference_impl_and_repr():
    m = Int8Conv2d(7, 6, 3, stride=2, padding=1, groups=1)
    m.weight.copy_(torch.randint(-127, 128, m.weight.shape, dtype=torch.int8))
    m.weight_scale.uniform_(1e-3, 1e-2)
    m.input_scale.fill_(0.02)
    m.input_zero_point.fill_(9)
    m.pack()
    x = torch.randn(1, 7, 33, 33)
    fast = m(x)
    assert fast_calls(m) == 1  # auto: the best implementation available here (the reference where none is)
    m.impl = "reference"
    ref = m(x)
    assert m.kernel_counts["reference"] == 1 + (FAST == ("reference",))
    assert float((fast - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    text = repr(m)
    assert "Int8Conv2d(7, 6, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1)" in text and "zp=9" in text


def test_settled_calls_give_the_first_calls_numbers(lowered):
    """After a first eager call, a conv keeps the settled oneDNN call per input signature; the
    later calls give the same bits, and what invalidates it (set_output, pack, a copy, another
    input signature, another preferred implementation) is honoured."""
    import copy
    conv = copy.deepcopy(lowered[1]["features.3"])
    if not HAS_ONEDNN:
        pytest.skip("no oneDNN for full-range weights on this machine")
    x = torch.randn(2, 16, 8, 8)
    conv.kernel_counts.clear()
    with torch.no_grad():
        first = conv(x)
        assert len(conv.binding.calls) == 1
        assert torch.equal(conv(x), first) and fast_calls(conv) == 2
        codes = conv.quantize_input(x)
        assert torch.equal(conv(codes), first) and len(conv.binding.calls) == 2  # uint8 codes: own signature
        other = torch.randn(3, 16, 6, 6)  # another spatial size: its own packed weight and call
        twin = copy.deepcopy(conv)
        assert twin.binding.calls == {}  # a copy settles its own calls (on its own tensors)
        assert torch.equal(conv(other), twin(other)) and len(conv.binding.calls) == 3
        assert torch.equal(twin(x), first)
        conv.set_output("uint8", 0.05, 3, post_op="relu")
        assert conv.binding.calls == {}
        out = conv(x)
        assert out.dtype == torch.uint8 and torch.equal(conv(x), out)
        conv.impl = "reference"  # a preferred implementation is part of the signature
        ref = conv(x)
        assert conv.kernel_counts["reference"] == 1
        assert (ref.int() - out.int()).abs().max() <= 1
        conv.impl = "auto"
        conv.pack()
        assert conv.binding.calls == {}


def test_uint8_codes_through_a_max_pool_past_255_positions(tmp_path):
    """torch's CPU max-pool fails on channels-last uint8 once H * W > 255; on a uint8 path the
    pool becomes a `CodesMaxPool2d` (same settings, pools int32-widened codes): same numbers,
    and a saved model reloads onto the float architecture."""
    from quanta.integer.pooling import CodesMaxPool2d
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
                          nn.Conv2d(8, 4, 3, padding=1)).eval()
    data = [torch.randn(2, 3, 24, 24) for _ in range(2)]  # 576 positions before the pool
    q = quanta.quantize(model, "static_int8", calib_data=data, speed_check=False)
    assert isinstance(q[2], CodesMaxPool2d) and q[0].output_kind == "uint8"
    sim = quanta.calibrate(quanta.prepare(model, quanta.preset("static_int8")), data, progress=False)
    x = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        y, y_sim = q(x), sim(x)
        assert float((y - y_sim).abs().max()) <= 0.05 * float(y_sim.abs().max())
        path = tmp_path / "pool.quanta"
        quanta.save(q, path)
        assert torch.equal(quanta.load(path, model=model)(x), y)


@pytest.mark.parametrize("channels", [19, 64, 150])  # the native loop's 64-channel steps: partial, full, both
@pytest.mark.parametrize("cfg", [(3, 2, 1, 1), (2, 2, 0, 1), (3, 1, 1, 2), ((3, 2), (2, 1), (1, 0), 1)])
def test_codes_max_pool_equals_torch_on_values(cfg, channels):
    """The native channels-last uint8 pool (and its int32 fallback) give torch's max-pool of the values."""
    from quanta.integer.pooling import codes_pool
    k, s, p, d = cfg
    pool = nn.MaxPool2d(k, s, p, d)
    gen = torch.Generator().manual_seed(11)
    x = torch.randint(0, 256, (2, channels, 23, 17), dtype=torch.uint8, generator=gen)
    expect = pool(x.float())
    twin = codes_pool(pool)
    for layout in (torch.channels_last, torch.contiguous_format):
        y = twin(x.contiguous(memory_format=layout))
        assert y.dtype == torch.uint8 and torch.equal(y.float(), expect)
