"""`restore_float`: an encoder layer in which nothing stays integer is the user's
``nn.TransformerEncoderLayer`` again, on torch's fused fast path, computing the float model's output
exactly (issue 25: the wrapper's unfused float path made a speech encoder 0.85x fp32)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import quanta
from quanta.integer.base import IntegerModule
from quanta.nn import LayerQuantConfig
from quanta.nn.modules.attention import QuantTransformerEncoderLayer
from quanta.transforms import restore_float, speed_check
from quanta.transforms.presets import A8_STATIC
from quanta.transforms.restore_float import KEPT_FLOAT_DETAIL

D, FF = 32, 64


class SpeechEncoder(nn.Module):
    """A Conv1d stem then encoder layers, built the way `benchmarks/workloads_real.py`'s is."""

    def __init__(self, layers: int = 2) -> None:
        super().__init__()
        self.conv = nn.Conv1d(16, D, 3, stride=2, padding=1)
        self.act = nn.GELU()
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(D, 4, FF, dropout=0.0, batch_first=True)
                                    for _ in range(layers))
        self.norm = nn.LayerNorm(D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv(x)).transpose(1, 2)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


def build() -> nn.Module:
    torch.manual_seed(0)
    return SpeechEncoder().eval()


X = torch.randn(3, 16, 24, generator=torch.Generator().manual_seed(1))


def _clock(integer_wins: Callable[[nn.Module], bool] | None = None) -> Callable[[str, Any], float]:
    """The speed check's clock: integer layers for which ``integer_wins`` holds take half float's
    time, every other one twice float's."""
    def measure(kind: str, fn) -> float:
        fn()
        module = fn.func[0] if isinstance(fn.func, nn.Sequential) else fn.func
        fast = integer_wins is not None and integer_wins(module)
        if kind == "integer":
            return 1e-3 if fast else 2e-3
        return 2e-3 if fast else 1e-3
    return measure


@pytest.fixture
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv("QUANTA_SPEED_CACHE", str(tmp_path / "decisions.json"))


@pytest.fixture
def all_slower(monkeypatch, cache):
    """Every integer kernel clearly slower than float (what the speed check measures on AVX2)."""
    monkeypatch.setattr(speed_check, "_perf_counter", _clock())


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the calls of torch's fused encoder-layer kernel (its inference fast path)."""
    calls = []
    fused = torch._transformer_encoder_layer_fwd

    def counting(*args, **kwargs):
        calls.append(1)
        return fused(*args, **kwargs)
    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", counting)
    return calls


@pytest.mark.parametrize("preset", ["dynamic_int8", "static_int8"])
def test_layer_with_nothing_integer_is_torchs_again_on_the_fast_path(all_slower, fused_calls, preset):
    model = build()
    q = quanta.quantize(model, preset, [X], example=X, progress=False)
    for layer in q.layers:
        assert type(layer) is nn.TransformerEncoderLayer
        assert type(layer.self_attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert not any(isinstance(m, (IntegerModule, quanta.nn.TensorQuantizer)) for m in q.modules())
    with torch.no_grad():
        expected = model(X)
        assert len(fused_calls) == 2  # (torch's own layers take it)
        fused_calls.clear()
        assert torch.equal(q(X), expected)
    assert len(fused_calls) == 2


def test_report_kept_float_and_coverage_say_why(all_slower):
    q = quanta.quantize(build(), "dynamic_int8", example=X, progress=False)
    lines = [k.describe() for k in quanta.kept_float(q)]
    assert f"layers.0 (TransformerEncoderLayer): {KEPT_FLOAT_DETAIL}" in lines
    rows = {r.name: r for r in quanta.conversion_report(q)}
    assert rows["layers.1"].result == "float" and rows["layers.1"].simulated == "QuantTransformerEncoderLayer"
    assert "layers.0.sa_add" not in rows and "layers.1.ff_add" not in rows  # (gone with the wrapper)
    assert rows["layers.0.linear1"].detail.startswith("integer kernel slower")
    entry = next(e for e in quanta.coverage(q).entries if e.name == "layers.1")
    assert (entry.type, entry.status, entry.detail) == ("TransformerEncoderLayer", "float", KEPT_FLOAT_DETAIL)


def test_shares_the_weights_and_keeps_user_hooks(all_slower):
    model = build()
    seen = []
    model.layers[0].register_forward_hook(lambda mod, args, out: seen.append(type(mod)))
    sim = quanta.prepare(model, quanta.preset("dynamic_int8"))
    wrapper = sim.layers[0]
    assert isinstance(wrapper, QuantTransformerEncoderLayer)
    params = {n: p for n, p in wrapper.named_parameters()}
    restored = quanta.convert(sim, inplace=True, example=X)  # (convert ends with restore_float)
    assert type(restored.layers[0]) is nn.TransformerEncoderLayer
    assert restore_float(restored) is restored  # (nothing left to restore)
    for n, p in restored.layers[0].named_parameters():
        assert p is params[n], n
    seen.clear()  # (the speed check's example run called the wrapper)
    with torch.no_grad():
        restored(X)
    assert seen == [nn.TransformerEncoderLayer]


def test_save_load_round_trip(all_slower, tmp_path):
    q = quanta.quantize(build(), "dynamic_int8", example=X, progress=False)
    quanta.save(q, tmp_path / "m.safetensors")
    loaded = quanta.load(tmp_path / "m.safetensors", model=build)
    assert all(type(layer) is nn.TransformerEncoderLayer for layer in loaded.layers)
    with torch.no_grad():
        assert torch.equal(loaded(X), q(X))
    assert f"layers.0 (TransformerEncoderLayer): {KEPT_FLOAT_DETAIL}" in [k.describe() for k in quanta.kept_float(loaded)]


def test_one_integer_linear_inside_keeps_the_wrapper(monkeypatch, cache, fused_calls):
    monkeypatch.setattr(speed_check, "_perf_counter",
                        _clock(lambda m: isinstance(m, IntegerModule) and getattr(m, "out_features", 0) == FF))
    q = quanta.quantize(build(), "dynamic_int8", example=X, progress=False)
    for layer in q.layers:
        assert type(layer) is QuantTransformerEncoderLayer and isinstance(layer.linear1, IntegerModule)
        assert type(layer.linear2) is nn.Linear
    assert not any(r.detail.startswith(KEPT_FLOAT_DETAIL) for r in quanta.conversion_report(q))
    with torch.no_grad():
        q(X)
    assert not fused_calls  # the fast path would read linear1's float weight, which it no longer has


def test_excluded_linears_without_a_speed_check(fused_calls):
    excl = ["layers.*.linear1", "layers.*.linear2", "layers.*.self_attn"]
    model = build()
    q = quanta.quantize(model, "dynamic_int8", exclude=excl, speed_check=False, progress=False)
    assert all(type(layer) is nn.TransformerEncoderLayer for layer in q.layers)
    assert isinstance(q.conv, IntegerModule)  # (the rest of the model is quantized as asked)


def test_a_simulated_output_quantizer_of_the_layer_is_dropped_and_said(cache, fused_calls):
    """A config that quantizes the layer's output: with nothing integer inside it only simulates in
    float; the float layer computes the float model's output exactly, and the report says so."""
    model = build()
    rules = {"layers.*": LayerQuantConfig(input=None, weight=None, output=A8_STATIC)}
    excl = ["layers.*.linear1", "layers.*.linear2", "layers.*.self_attn"]
    q = quanta.quantize(model, "static_int8", [X], rules=rules, exclude=excl, speed_check=False, progress=False)
    row = next(r for r in quanta.conversion_report(q) if r.name == "layers.0")
    assert row.detail == (f"{KEPT_FLOAT_DETAIL} (its simulated output quantizer dropped: the float layer "
                          "computes the float model's output exactly)")
    assert type(q.layers[0]) is nn.TransformerEncoderLayer
    h = torch.randn(2, 7, D)
    with torch.no_grad():
        assert torch.equal(q.layers[0](h), model.layers[0](h))
    assert len(fused_calls) == 2


def test_an_integer_residual_add_keeps_the_wrapper(cache):
    """Residual additions on calibrated grids lower to integer additions: the layer keeps them."""
    rules = {"layers.*": LayerQuantConfig(input=A8_STATIC, weight=None)}
    excl = ["layers.*.linear1", "layers.*.linear2", "layers.*.self_attn"]
    q = quanta.quantize(build(), "static_int8", [X], rules=rules, exclude=excl, speed_check=False, progress=False)
    assert type(q.layers[0]) is QuantTransformerEncoderLayer and isinstance(q.layers[0].sa_add, IntegerModule)


def test_a_bare_layer_as_the_root(all_slower, fused_calls):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D, 4, FF, dropout=0.0, batch_first=True).eval()
    x = torch.randn(2, 5, D)
    q = quanta.quantize(layer, "dynamic_int8", example=x, progress=False)
    assert type(q) is nn.TransformerEncoderLayer
    assert [r.detail for r in quanta.conversion_report(q) if r.name == "(root)"] == [KEPT_FLOAT_DETAIL]
    with torch.no_grad():
        assert torch.equal(q(x), layer(x))


def test_models_without_wrappers_are_unchanged_and_bad_input_is_refused():
    plain = nn.Sequential(nn.Linear(4, 4))
    assert restore_float(plain) is plain and type(plain[0]) is nn.Linear
    with pytest.raises(TypeError, match="nn.Module"):
        restore_float("model")  # type: ignore[arg-type]


def test_inside_a_transformer_encoder_with_a_padding_mask(all_slower, fused_calls):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D, 4, FF, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = torch.randn(2, 6, D)
    mask = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    q = quanta.quantize(model, "dynamic_int8", example=(x,), progress=False)
    assert all(type(m) is nn.TransformerEncoderLayer for m in q.layers)
    with torch.no_grad():
        expected = model(x, src_key_padding_mask=mask)
        fused_calls.clear()
        assert torch.equal(q(x, src_key_padding_mask=mask), expected)
    assert len(fused_calls) == 2


def test_onnx_export_of_a_model_kept_all_float_says_so(all_slower, tmp_path):
    q = quanta.quantize(build(), "dynamic_int8", example=X, progress=False)
    with pytest.raises(ValueError, match=r"every layer of this converted SpeechEncoder was kept float \(quanta.kept_float"):
        quanta.export_onnx(q, X, tmp_path / "m.onnx")
