"""ONNX export (QDQ layout) and its parity with quanta, in ONNX Runtime.

Parity is measured on the model output, which the tests quantize with an int8 per-tensor output
quantizer on the head (a rule added to the preset): "identical" is bit-equal float32, and a
difference is counted in steps of that output grid. One step of it is small against the logits'
range (asserted), so a wrong weight scale or a misassigned scale axis shows up as many steps
(`test_parity_check_catches_a_wrong_scale` corrupts one scale vector to show it).
"""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import quanta
from quanta import LayerQuantConfig, QuantConfig, QuantDescriptor
from quanta.analysis.onnx_parity import compare_onnx
from quanta.io.onnx_export import export_onnx
from quanta.transforms.presets import A8_DYNAMIC_TOKEN, A8_STATIC, W8

HEAD_OUT = QuantDescriptor()  # int8, symmetric, per tensor, calibrated by max
ONE_STEP = 1 + 1e-5  # a one-code difference measured in float32 reads up to 1.0000004 steps


@pytest.fixture(scope="module")
def ort():
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    return pytest.importorskip("onnxruntime")


def _config(preset: str, head_input: QuantDescriptor) -> QuantConfig:
    base = quanta.preset(preset)
    head = LayerQuantConfig(input=head_input, weight=W8, output=HEAD_OUT)
    return QuantConfig(default=base.default, module_types=base.module_types, rules={"head": head},
                       fold_bn=base.fold_bn)


def _run(ort, path, *inputs):
    session = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)})[0]


def _parity(model, got, *inputs, step):
    """(fraction identical, max difference in output steps) of ONNX Runtime's ``got`` vs ``model``."""
    with torch.no_grad():
        ours = model(*inputs).numpy()
    assert ours.shape == got.shape
    return float((ours == got).mean()), float(np.abs(ours - got).max() / step), ours


@pytest.fixture(scope="module")
def cnn(ort, trained_cnn, digits_data, tmp_path_factory):
    sim = quanta.calibrate(quanta.prepare(trained_cnn, _config("static_int8", A8_STATIC)),
                           digits_data.calib_batches(8), progress=False)
    integer = quanta.convert(sim)
    folder = tmp_path_factory.mktemp("onnx_cnn")
    files = {kind: export_onnx(m, digits_data.x_test[:4], folder / f"{kind}.onnx", dynamic_batch=True)
             for kind, m in (("integer", integer), ("simulated", sim))}
    return SimpleNamespace(models={"integer": integer, "simulated": sim}, files=files,
                           step=float(sim.head.output_quantizer.qparams()[0]))


@pytest.fixture(scope="module")
def transformer(ort, trained_transformer, token_data, tmp_path_factory):
    """dynamic_int8 (per-token activations, opset 21) and static_int8 (opset 18) TinyTransformers."""
    calib = token_data.calib_batches(4)
    folder = tmp_path_factory.mktemp("onnx_transformer")
    models, files, steps = {}, {}, {}
    for preset, head_input in (("dynamic_int8", A8_DYNAMIC_TOKEN), ("static_int8", A8_STATIC)):
        sim = quanta.calibrate(quanta.prepare(trained_transformer, _config(preset, head_input)), calib,
                               progress=False)
        pairs = [("integer", quanta.convert(sim))] + ([("simulated", sim)] if preset == "dynamic_int8" else [])
        for kind, model in pairs:
            key = f"{preset}/{kind}"
            models[key], steps[key] = model, float(sim.head.output_quantizer.qparams()[0])
            files[key] = export_onnx(model, token_data.x_test[:4], folder / f"{preset}_{kind}.onnx",
                                     dynamic_batch=True)
    return SimpleNamespace(models=models, files=files, steps=steps)


# ----------------------------------------------------------------------------- parity
@pytest.mark.parametrize("kind", ["integer", "simulated"])
def test_cnn_onnx_runtime_matches_quanta(cnn, ort, digits_data, kind):
    x = digits_data.x_test
    identical, steps, ours = _parity(cnn.models[kind], _run(ort, cnn.files[kind], x), x, step=cnn.step)
    assert cnn.step <= float(ours.max() - ours.min()) / 50  # one step is a fine unit of the output
    assert identical >= 0.99 and steps <= ONE_STEP, (identical, steps)


@pytest.mark.parametrize("key", ["dynamic_int8/integer", "dynamic_int8/simulated", "static_int8/integer"])
def test_transformer_onnx_runtime_matches_quanta(transformer, ort, token_data, key):
    x = token_data.x_test
    got = _run(ort, transformer.files[key], x)
    identical, steps, ours = _parity(transformer.models[key], got, x, step=transformer.steps[key])
    assert transformer.steps[key] <= float(ours.max() - ours.min()) / 50
    assert identical >= 0.99 and steps <= ONE_STEP, (identical, steps)


def test_dynamic_batch(cnn, ort, digits_data):
    import onnx

    graph = onnx.load(cnn.files["integer"].path).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    for x in (digits_data.x_test[:1], digits_data.x_test[1:8]):
        _, steps, _ = _parity(cnn.models["integer"], _run(ort, cnn.files["integer"], x), x, step=cnn.step)
        assert steps <= ONE_STEP


def test_compare_onnx_report(cnn, digits_data):
    report = compare_onnx(cnn.models["integer"], cnn.files["integer"], digits_data.x_test)
    out = report.outputs[0]
    assert out.shape == (len(digits_data.x_test), 10) and out.frac_identical >= 0.99
    assert out.max_steps is not None and out.max_steps <= ONE_STEP and report.within(1.0, 0.99)
    assert "output quantizer of 'head'" in out.step
    layers = {r.name: r for r in report.layers}
    assert {"features.0", "features.3", "features.7", "head"} <= set(layers)
    assert layers["features.0"].step.startswith("uint8 codes")  # the fused uint8 hand-off, compared as codes
    assert layers["features.0"].max_steps <= ONE_STEP and layers["head"].max_steps <= ONE_STEP
    # float outputs are measured in accumulator units (input step x weight scale): an input code
    # rounded the other way at a tie moves an output by its weight code, at most 127 units
    for name in ("features.3", "features.7"):
        assert layers[name].step == "accumulator unit" and layers[name].max_steps <= 127
    text = str(report)
    assert "identical" in text and "features.3" in text
    assert report.to_dict()["outputs"][0]["frac_identical"] == out.frac_identical


def test_parity_check_catches_a_wrong_scale(cnn, digits_data, tmp_path):
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(cnn.files["integer"].path)
    for init in proto.graph.initializer:
        if init.name == "features.3.weight_quantizer.scale":  # scales assigned to the wrong channels
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init)[::-1].copy(), init.name))
    onnx.save(proto, tmp_path / "wrong.onnx")
    report = compare_onnx(cnn.models["integer"], tmp_path / "wrong.onnx", digits_data.x_test[:64], layers=False)
    assert not report.within(1.0, 0.99) and report.outputs[0].max_steps > 3


# ----------------------------------------------------------------------------- structure
def _graph(path):
    import onnx

    proto = onnx.load(os.fspath(path))
    producer = {o: n for n in proto.graph.node for o in n.output}
    inits = {i.name: i for i in proto.graph.initializer}
    return proto, producer, inits


def _attr(node, name, default=None):
    return next((a.i for a in node.attribute if a.name == name), default)


def test_qdq_layout_of_the_integer_cnn(cnn):
    from onnx import TensorProto, numpy_helper

    proto, producer, inits = _graph(cnn.files["integer"].path)
    assert proto.opset_import[0].version == 18 == cnn.files["integer"].opset
    quantized = {}
    for node in proto.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        act, weight = (producer.get(v) for v in node.input[:2])
        assert act is not None and act.op_type == "DequantizeLinear", node.name  # Q/DQ on the input
        assert producer[act.input[0]].op_type == "QuantizeLinear"
        assert weight is not None and weight.op_type == "DequantizeLinear"
        codes, scale = inits[weight.input[0]], numpy_helper.to_array(inits[weight.input[1]])
        assert codes.data_type == TensorProto.INT8 and _attr(weight, "axis") == 0
        assert scale.shape == (codes.dims[0],)  # one scale per output channel
        values = numpy_helper.to_array(codes)
        assert values.min() >= -127 and values.max() <= 127  # narrow range
        quantized[weight.input[0].rsplit(".weight_quantizer", 1)[0]] = (values, scale)
    assert set(quantized) == {"features.0", "features.3", "features.7", "head"}
    integer = cnn.models["integer"]
    for name, (values, scale) in quantized.items():
        mod = integer.get_submodule(name)
        assert np.array_equal(values, mod.weight.numpy()) and np.array_equal(scale, mod.weight_scale.numpy())


def test_per_token_and_int4_layouts(transformer, ort, trained_transformer, token_data, tmp_path):
    from onnx import TensorProto

    # dynamic per-token activations: blocked QuantizeLinear over the whole last axis (opset 21)
    proto, producer, _ = _graph(transformer.files["dynamic_int8/integer"].path)
    assert proto.opset_import[0].version == 21
    blocked = [n for n in proto.graph.node if n.op_type == "QuantizeLinear" and _attr(n, "block_size")]
    # linear1, linear2, head and the attention's in/out projections (32 / 64 inputs), and the
    # attention matmuls' four inputs (q and v per head: 8; k^T and the probabilities: 16 tokens)
    assert {_attr(n, "block_size") for n in blocked} == {8, 16, 32, 64} and len(blocked) == 9
    # int4 weight-only: INT4 initializers, DequantizeLinear per group of 32 along the input axis
    integer = quanta.quantize(trained_transformer, "weight_only_int4", group_size=32, progress=False)
    with pytest.raises(ValueError, match=r"encoder\.linear1.*int4 weights.*opset 21"):
        export_onnx(integer, token_data.x_test[:4], tmp_path / "int4_18.onnx", opset=18)
    report = export_onnx(integer, token_data.x_test[:4], tmp_path / "int4.onnx", dynamic_batch=True)
    assert report.opset == 21
    proto, producer, inits = _graph(report.path)
    dqs = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert len(dqs) == 3
    for n in dqs:
        assert inits[n.input[0]].data_type == TensorProto.INT4
        assert _attr(n, "axis") == 1 and _attr(n, "block_size") == 32
    # ONNX Runtime computes what the simulation specifies (bf16 activations, float32 matmul);
    # the integer kernels differ from both by their bf16 rounding (see quanta.integer.weight_only)
    sim = quanta.prepare(trained_transformer, quanta.preset("weight_only_int4", group_size=32))
    x = token_data.x_test[:128]
    with torch.no_grad():
        ours = sim(x).numpy()
    assert (ours == _run(ort, report.path, x)).mean() >= 0.99


# ----------------------------------------------------------------------------- errors
class _Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(4, 8, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


@pytest.mark.parametrize("kind", ["integer", "simulated"])
def test_recurrent_layers_are_refused_by_name(ort, tmp_path, kind):
    torch.manual_seed(0)
    model = _Recurrent().eval()
    model = quanta.quantize(model, "dynamic_int8") if kind == "integer" else \
        quanta.prepare(model, quanta.preset("dynamic_int8"))
    with pytest.raises(ValueError, match=r"cannot export 'rnn' to ONNX: .*LSTM"):
        export_onnx(model, torch.randn(2, 5, 4), tmp_path / "rnn.onnx")
    assert not (tmp_path / "rnn.onnx").exists()


def test_unsupported_format_and_float_model(ort, tmp_path):
    model = nn.Sequential(nn.Linear(8, 4))
    pow2 = LayerQuantConfig(input=QuantDescriptor(format="pow2", num_bits=4, amax=2.0))
    sim = quanta.prepare(model, QuantConfig(default=pow2))
    with pytest.raises(ValueError, match=r"'0\.input_quantizer'.*pow2"):
        export_onnx(sim, torch.randn(2, 8), tmp_path / "pow2.onnx")
    with pytest.raises(ValueError, match="no quantized modules"):
        export_onnx(model, torch.randn(2, 8), tmp_path / "float.onnx")


def test_missing_dependency_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # `import onnxscript` now fails
    sim = quanta.prepare(nn.Sequential(nn.Linear(8, 4)), QuantConfig(
        default=LayerQuantConfig(input=QuantDescriptor(amax=1.0))))
    for call in (lambda: export_onnx(sim, torch.randn(2, 8), tmp_path / "m.onnx"),
                 lambda: compare_onnx(sim, tmp_path / "m.onnx", torch.randn(2, 8))):
        with pytest.raises(ImportError, match=r'onnxscript.*pip install "quanta\[onnx\]"'):
            call()


def test_activations_fused_into_linears_export(ort, tmp_path):
    """ReLU / GELU / tanh-GELU that `fuse_activations` moved into Int8Linear epilogues come out as
    ONNX activations after the Linear (the model's own modules are Identity now)."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(approximate="tanh"),
                        nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10)).eval()
    q = quanta.quantize(mlp, "dynamic_int8", speed_check=False)
    assert [q[i].post_op for i in (0, 2, 4)] == ["gelu", "gelu_tanh", "relu"]
    x = torch.randn(16, 32)
    path = export_onnx(q, x[:4], tmp_path / "mlp.onnx", dynamic_batch=True)
    got = torch.from_numpy(_run(ort, path, x))
    with torch.no_grad():
        ours, ref = q(x), mlp(x)
    # per-token dynamic codes can differ by one step where the two GELUs differ by an ulp
    torch.testing.assert_close(got, ours, rtol=0, atol=1e-3 * float(ours.abs().max()))
    torch.testing.assert_close(got, ref, rtol=0.05, atol=0.05)
