"""quanta.save / quanta.load: round trips on trained models (atol=0), rebuilding, sizes, bad input."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import quanta
from quanta import demo
from quanta.integer.base import IntegerModule
from quanta.io import ArchitectureError, UnsupportedModuleError
from quanta.nn.modules.weighted import QuantLinear


def _simulated(model: nn.Module, calib: list[torch.Tensor]) -> nn.Module:
    sim = quanta.prepare(model, quanta.preset("static_int8"))
    quanta.calibrate(sim, calib, progress=False)
    return sim


def _make(kind: str, model: nn.Module, calib: list[torch.Tensor]) -> nn.Module:
    if kind == "simulated":
        return _simulated(model, calib)
    options = {"group_size": 32} if kind == "weight_only_int4" else {}
    return quanta.quantize(model, kind, calib, progress=False, speed_check=False, **options)


CASES = [(model, kind) for model in ("cnn", "lstm", "transformer")
         for kind in ("simulated", "static_int8", "dynamic_int8", "weight_only_int4")]


@pytest.fixture
def trained(request, trained_cnn, digits_data, trained_lstm, sequence_data, trained_transformer, token_data):
    return {"cnn": (trained_cnn, digits_data, demo.DigitsCNN),
            "lstm": (trained_lstm, sequence_data, demo.SequenceLSTM),
            "transformer": (trained_transformer, token_data, demo.TinyTransformer)}


@pytest.mark.parametrize("name,kind", CASES, ids=[f"{m}-{k}" for m, k in CASES])
def test_round_trip_is_exact(name, kind, trained, tmp_path):
    model, data, cls = trained[name]
    q = _make(kind, model, data.calib_batches(2))
    path = quanta.save(q, tmp_path / "m.safetensors")
    x = data.x_test[:64]
    with torch.no_grad():
        expected = q(x)
        rebuilt = quanta.load(path)  # from the file alone (quanta.demo classes are allow-listed)
        onto_float = quanta.load(path, model=cls)  # onto a freshly built float model (a factory)
        got, got_float = rebuilt(x), onto_float(x)
    assert torch.equal(got, expected)
    assert torch.equal(got_float, expected)
    assert [type(m) for m in rebuilt.modules()] == [type(m) for m in q.modules()]
    assert not rebuilt.training
    if kind != "simulated":  # packed again for this machine: the same kernels run
        def ran(m):
            return [sorted(x.kernel_counts) for x in m.modules() if isinstance(x, IntegerModule)]
        assert ran(rebuilt) == ran(q) and any(ran(q))


def test_loaded_model_keeps_config_and_report(trained_cnn, digits_data, tmp_path):
    q = quanta.quantize(trained_cnn, "static_int8", digits_data.calib_batches(2), progress=False, speed_check=False)
    quanta.save(q, tmp_path / "m.safetensors")
    back = quanta.load(tmp_path / "m.safetensors")
    assert quanta.conversion_report(back) == quanta.conversion_report(q)
    assert back._quanta_config == q._quanta_config


def test_load_does_not_touch_the_given_float_model(trained_cnn, digits_data, tmp_path):
    q = quanta.quantize(trained_cnn, "static_int8", digits_data.calib_batches(2), progress=False, speed_check=False)
    quanta.save(q, tmp_path / "m.safetensors")
    fresh = demo.DigitsCNN().eval()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    quanta.load(tmp_path / "m.safetensors", model=fresh)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
    assert isinstance(fresh.features[0], nn.Conv2d)


def test_bias_created_by_batchnorm_folding_round_trips(tmp_path):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, bias=False), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    model.train()
    for _ in range(3):
        model(torch.randn(16, 3, 8, 8))
    model.eval()
    x = torch.randn(4, 3, 8, 8)
    for q in (quanta.quantize(model, "static_int8", [x], progress=False, speed_check=False), _simulated(model, [x])):
        assert q[0].bias is not None  # created by folding
        quanta.save(q, tmp_path / "m.safetensors")
        with torch.no_grad():
            assert torch.equal(quanta.load(tmp_path / "m.safetensors")(x), q(x))
            assert torch.equal(quanta.load(tmp_path / "m.safetensors", model=model)(x), q(x))


def test_tied_weights_are_stored_once_and_stay_tied(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(50, 64)
            self.head = nn.Linear(64, 50, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, t):
            return self.head(self.embed(t))

    model = Tied()
    quanta.save(model, tmp_path / "t.safetensors")
    report = quanta.inspect(tmp_path / "t.safetensors", show=False)
    assert report.manifest["aliases"] == {"head.weight": "embed.weight"}
    assert report.tensor_bytes == 50 * 64 * 4
    back = quanta.load(tmp_path / "t.safetensors", trusted=[Tied])
    assert back.head.weight is back.embed.weight
    t = torch.randint(0, 50, (2, 7))
    assert torch.equal(back(t), model(t))


def test_save_keeps_the_global_random_stream(trained_cnn, tmp_path):
    before = torch.random.get_rng_state()
    quanta.save(trained_cnn, tmp_path / "f.safetensors")
    quanta.load(tmp_path / "f.safetensors")
    assert torch.equal(torch.random.get_rng_state(), before)


# ----------------------------------------------------------------------------- sizes
def _decoder_stack() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(512, 1024), nn.GELU(), nn.Linear(1024, 1024), nn.GELU(),
                         nn.Linear(1024, 512)).eval()


@pytest.mark.parametrize("kind,limit", [("dynamic_int8", 0.27), ("weight_only_int8", 0.27),
                                        ("weight_only_int4", 0.15)])
def test_file_sizes_against_the_fp32_file(kind, limit, tmp_path):
    model = _decoder_stack()
    fp32 = os.path.getsize(quanta.save(model, tmp_path / "fp32.safetensors"))
    from safetensors.torch import save_file

    save_file(model.state_dict(), tmp_path / "plain.safetensors")
    assert abs(fp32 - os.path.getsize(tmp_path / "plain.safetensors")) < 16 * 1024  # the manifest is small
    q = quanta.quantize(model, kind, progress=False)
    size = os.path.getsize(quanta.save(q, tmp_path / "q.safetensors"))
    assert size <= limit * fp32, f"{kind}: {size} bytes = {size / fp32:.3f}x fp32"


def test_int8_cnn_file_size(tmp_path):
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(3, 64, 3), nn.ReLU(), nn.Conv2d(64, 128, 3), nn.ReLU(), nn.Conv2d(128, 128, 3),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10)).eval()
    x = torch.randn(2, 3, 16, 16)
    fp32 = os.path.getsize(quanta.save(cnn, tmp_path / "fp32.safetensors"))
    q = quanta.quantize(cnn, "static_int8", [x], progress=False, speed_check=False)
    assert os.path.getsize(quanta.save(q, tmp_path / "q.safetensors")) <= 0.27 * fp32


# ----------------------------------------------------------------------------- fresh interpreter
def test_loads_in_a_fresh_interpreter(trained_cnn, digits_data, tmp_path):
    q = quanta.quantize(trained_cnn, "static_int8", digits_data.calib_batches(2), progress=False, speed_check=False)
    quanta.save(q, tmp_path / "m.safetensors")
    x = digits_data.x_test[:32]
    from safetensors.torch import save_file

    with torch.no_grad():
        save_file({"x": x, "y": q(x)}, tmp_path / "io.safetensors")
    script = f"""
import sys, torch, quanta
from safetensors.torch import load_file
io = load_file({str(tmp_path / 'io.safetensors')!r})
m = quanta.load({str(tmp_path / 'm.safetensors')!r})
with torch.no_grad():
    assert torch.equal(m(io["x"]), io["y"]), "outputs differ"
loaded = [n for n in sys.modules if n.startswith(("quanta.demo.train", "quanta.demo.data", "sklearn", "tests"))]
assert not loaded, loaded
print("ok", type(m).__name__)
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok DigitsCNN"


# ----------------------------------------------------------------------------- bad input
def test_loading_into_a_different_architecture_names_the_module(trained_cnn, digits_data, tmp_path):
    q = quanta.quantize(trained_cnn, "static_int8", digits_data.calib_batches(2), progress=False, speed_check=False)
    quanta.save(q, tmp_path / "m.safetensors")
    with pytest.raises(ArchitectureError, match=r"'features.0' has out_channels=8 in the model.*out_channels=16"):
        quanta.load(tmp_path / "m.safetensors", model=demo.DigitsCNN(width=8))
    sim = _simulated(trained_cnn, digits_data.calib_batches(1))
    quanta.save(sim, tmp_path / "s.safetensors")
    with pytest.raises(ArchitectureError, match=r"module 'features.0'.*\[16, 1, 3, 3\] in the file but \[8, 1, 3, 3\]"):
        quanta.load(tmp_path / "s.safetensors", model=demo.DigitsCNN(width=8))
    with pytest.raises(ArchitectureError, match=r"'\(root\)' is a SequenceLSTM in the model, but the file holds a DigitsCNN"):
        quanta.load(tmp_path / "s.safetensors", model=demo.SequenceLSTM())


def test_missing_constructor_arguments_are_named(tmp_path):
    class Net(nn.Module):  # `hidden` is not kept on the module and has no default
        def __init__(self, hidden):
            super().__init__()
            self.fc = nn.Linear(4, hidden)

        def forward(self, x):
            return self.fc(x)

    net = Net(6)
    quanta.save(net, tmp_path / "n.safetensors")
    with pytest.raises(ArchitectureError, match="'hidden' is not stored on the module.*pass model="):
        quanta.load(tmp_path / "n.safetensors", trusted=[Net])
    assert torch.equal(quanta.load(tmp_path / "n.safetensors", model=lambda: Net(6)).fc.weight, net.fc.weight)
    quanta.save(net, tmp_path / "k.safetensors", init_kwargs={"hidden": 6})
    assert torch.equal(quanta.load(tmp_path / "k.safetensors", trusted=[Net]).fc.bias, net.fc.bias)


def test_unregistered_simulated_module_raises_or_is_stored_as_float(tmp_path):
    class MyQuantLinear(QuantLinear):  # a user's quantized class nobody registered
        pass

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
    model[0] = MyQuantLinear.from_float(model[0])
    model[0].__class__ = type("Unregistered", (MyQuantLinear,), {})
    with pytest.raises(UnsupportedModuleError, match=r"'0' \(Unregistered"):
        quanta.save(model, tmp_path / "u.safetensors")
    with pytest.warns(UserWarning, match="storing it as float"):
        quanta.save(model, tmp_path / "u.safetensors", unsupported="float")
    back = quanta.load(tmp_path / "u.safetensors")
    assert type(back[0]) is nn.Linear
    assert torch.equal(back[0].weight, model[0].weight)


def test_bad_arguments(trained_cnn, tmp_path):
    with pytest.raises(TypeError, match="expects an nn.Module"):
        quanta.save({"w": torch.ones(2)}, tmp_path / "x.safetensors")
    quanta.save(trained_cnn, tmp_path / "f.safetensors")
    with pytest.raises(TypeError, match="factory returned dict"):
        quanta.load(tmp_path / "f.safetensors", model=lambda: {})
    with pytest.raises(TypeError, match="trusted= takes classes"):
        quanta.load(tmp_path / "f.safetensors", trusted=[3])
    with pytest.raises(ValueError, match="unsupported must be"):
        quanta.save(trained_cnn, tmp_path / "f.safetensors", unsupported="skip")
    with pytest.raises(TypeError, match="init_kwargs"):
        quanta.save(trained_cnn, tmp_path / "f.safetensors", init_kwargs={"width": torch.ones(1)})


def test_still_calibrating_quantizers_warn(trained_cnn, digits_data, tmp_path):
    sim = quanta.prepare(trained_cnn, quanta.preset("static_int8"))
    for m in sim.modules():
        if isinstance(m, quanta.TensorQuantizer) and m.needs_calibration:
            m.enable_calib()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quanta.save(sim, tmp_path / "c.safetensors")
    assert any("still calibrating" in str(w.message) for w in caught)


def test_manifest_records_the_modules(trained_transformer, token_data, tmp_path):
    q = quanta.quantize(trained_transformer, "dynamic_int8", progress=False)
    quanta.save(q, tmp_path / "t.safetensors")
    manifest = quanta.inspect(tmp_path / "t.safetensors", show=False).manifest
    by_path = {r["path"]: r for r in manifest["modules"]}
    assert by_path["encoder.linear1"]["kind"] == "integer" and by_path["encoder.linear1"]["cls"] == "Int8Linear"
    assert by_path["encoder"]["kind"] == "quant" and by_path["encoder"]["cls"] == "QuantTransformerEncoderLayer"
    assert by_path[""]["cls"] == "quanta.demo.models:TinyTransformer"
    assert by_path[""]["kwargs"] == {"vocab": 12, "dim": 32, "heads": 4, "classes": 4, "length": 16}
    assert manifest["architecture"]["rebuildable"] is True
    assert by_path["encoder.linear1"]["config"]["act_spec"]["granularity"] == "per_token"
    assert "encoder.linear1.input_quantizer" not in by_path  # the integer module holds its qparams itself


def test_trained_learnable_ranges_round_trip(tmp_path):
    """QAT state: learned ranges (nn.Parameter amax) come back as parameters with their values."""
    from quanta import LayerQuantConfig, QuantConfig, QuantDescriptor

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    cfg = QuantConfig(default=LayerQuantConfig(input=QuantDescriptor(learn_amax=True, amax=3.0),
                                               weight=QuantDescriptor(per_channel=True, learn_amax=True)))
    sim = quanta.prepare(model, cfg)
    x = torch.randn(8, 16)
    opt = torch.optim.SGD(sim.parameters(), lr=0.1)
    sim.train()
    sim(x).pow(2).mean().backward()
    opt.step()
    sim.eval()
    assert sim[0].input_quantizer.amax.item() != 3.0  # the range was trained
    quanta.save(sim, tmp_path / "qat.safetensors")
    back = quanta.load(tmp_path / "qat.safetensors")
    assert isinstance(back[0].input_quantizer.amax, nn.Parameter)
    assert torch.equal(back[0].input_quantizer.amax, sim[0].input_quantizer.amax)
    with torch.no_grad():
        assert torch.equal(back(x), sim(x))
