"""The ``attention_matmuls`` option of the static_int8 / dynamic_int8 presets: MultiheadAttention's
``Q·Kᵀ`` and ``softmax·V`` inputs quantized (on, the default, unchanged) or computed in float (off),
in `nn.TransformerEncoderLayer` and a plain `nn.MultiheadAttention` (issue 25, item 2)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import quanta
from quanta.integer.attention import Int8MultiheadAttention
from quanta.nn.modules.functional import QuantMatMul

PRESETS = ("static_int8", "dynamic_int8")


class Encoder(nn.Module):
    """A user-style model: embedding-free encoder layer (batch first) and a classifier head."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(x).mean(1))


class SelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


def _build(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return (Encoder() if kind == "encoder" else SelfAttention()).eval()


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 9, 32, generator=g) for _ in range(3)]


def _matmuls(model: nn.Module) -> list[QuantMatMul]:
    return [m for n, m in model.named_modules() if n.endswith(("qk_matmul", "av_matmul"))]


def _sim(kind: str, name: str, on: bool) -> nn.Module:
    sim = quanta.prepare(_build(kind), quanta.preset(name, attention_matmuls=on))
    return quanta.calibrate(sim, _batches(), progress=False) if name == "static_int8" else sim


@pytest.mark.parametrize("kind", ["encoder", "mha"])
@pytest.mark.parametrize("name", PRESETS)
def test_on_quantizes_the_attention_matmuls_and_off_computes_them_in_float(kind, name, tmp_path):
    x = torch.randn(3, 9, 32, generator=torch.Generator().manual_seed(5))
    outs = {}
    for on in (True, False):
        sim = _sim(kind, name, on)
        matmuls = _matmuls(sim)
        assert len(matmuls) == 2
        if on:
            assert all(q.active for m in matmuls for _, q in m.quantizers())
            assert len([q for m in matmuls for q in m.quantizers()]) == 4
        else:
            assert all(not list(m.quantizers()) for m in matmuls)
            cov = [e for e in quanta.coverage(sim).entries if e.name.endswith(("qk_matmul", "av_matmul"))]
            assert [(e.status, e.detail) for e in cov] == [("excluded", "type:QuantMatMul mapped to None: "
                                                           "computes in float")] * 2
        q = quanta.convert(sim)
        attn = next(m for m in q.modules() if isinstance(m, Int8MultiheadAttention))  # projections integer either way
        assert len([p for m in _matmuls(q) for p in m.quantizers()]) == (4 if on else 0)
        path = quanta.save(q, tmp_path / f"{on}.safetensors")
        back = quanta.load(path, model=_build(kind))
        with torch.no_grad():
            simulated, out, loaded = sim(x), q(x), back(x)
        torch.testing.assert_close(out, simulated, atol=2e-2, rtol=0)  # the integer model matches its simulation
        assert torch.equal(loaded, out)
        assert len([p for m in _matmuls(back) for p in m.quantizers()]) == (4 if on else 0)
        assert attn.in_proj.kernel_counts.total() > 0
        outs[on] = simulated
    assert not torch.equal(outs[True], outs[False])  # quantizing the matmuls changes the numbers


def test_off_matches_the_float_attention_between_the_quantized_projections():
    """Off: exactly the on-model's simulation with its matmul quantizers switched off (the same
    calibrated projections), i.e. the attention between computes in float."""
    on, off = _sim("mha", "static_int8", True), _sim("mha", "static_int8", False)
    for m in _matmuls(on):
        for _, q in m.quantizers():
            q.disable()
    x = _batches()[0]
    with torch.no_grad():
        assert torch.equal(on(x), off(x))


@pytest.mark.parametrize("name", PRESETS)
def test_the_default_is_unchanged(name):
    default = quanta.preset(name)
    assert default == quanta.preset(name, attention_matmuls=True)
    assert "QuantMatMul" not in json.dumps(default.to_dict())
    off = quanta.preset(name, attention_matmuls=False)
    assert off.module_types["QuantMatMul"] is None
    assert quanta.QuantConfig.from_dict(off.to_dict()) == off  # a config file says it too
    x = _batches()[0]
    with torch.no_grad():  # the default quantizes the matmuls (as before this option existed)
        a = quanta.quantize(_build("encoder"), name, _batches(), progress=False, speed_check=False)(x)
        b = quanta.quantize(_build("encoder"), quanta.preset(name, attention_matmuls=True), _batches(),
                            progress=False, speed_check=False)(x)
    assert torch.equal(a, b)


def test_a_bad_value_is_one_clear_error_and_other_presets_refuse_the_option():
    with pytest.raises(ValueError, match="attention_matmuls must be True or False, got 'no'"):
        quanta.preset("static_int8", attention_matmuls="no")
    with pytest.raises(ValueError, match="takes no option 'attention_matmuls'.*applies to 'dynamic_int8', 'static_int8'"):
        quanta.preset("weight_only_int8", attention_matmuls=False)


def test_off_keeps_an_encoder_close_to_fp32():
    model = _build("encoder")
    q = quanta.quantize(model, quanta.preset("static_int8", attention_matmuls=False), _batches(), progress=False,
                        speed_check=False)
    x = _batches()[1]
    with torch.no_grad():
        assert F.cosine_similarity(q(x).flatten(), model(x).flatten(), dim=0) > 0.99


def test_the_cli_flag_sets_it_and_the_file_says_so(tmp_path, capsys):
    from quanta.cli import main
    from quanta.commands.sources import load_spec

    spec = tmp_path / "attn_model.py"
    spec.write_text("import torch\nfrom torch import nn\n\n\nclass SelfAttention(nn.Module):\n"
                    "    def __init__(self):\n        super().__init__()\n"
                    "        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)\n\n"
                    "    def forward(self, x):\n        return self.attn(x, x, x, need_weights=False)[0]\n\n\n"
                    "def build():\n    torch.manual_seed(0)\n    return SelfAttention().eval()\n")
    for flag, quantized in (("on", 4), ("off", 0)):
        out = tmp_path / f"{flag}.safetensors"
        assert main(["quantize", f"{spec}:build", "--preset", "dynamic_int8", "--attention-matmuls", flag,
                     "--no-speed-check", "-q", "-o", str(out)]) == 0
        manifest = quanta.inspect(out, show=False).to_dict()["manifest"]
        assert ("QuantMatMul" in manifest["config"]["module_types"]) == (flag == "off")
        back = quanta.load(out, model=load_spec(f"{spec}:build")[0])
        assert len([p for m in _matmuls(back) for p in m.quantizers()]) == quantized
    capsys.readouterr()
    assert main(["quantize", f"{spec}:build", "--config", str(spec), "--attention-matmuls", "off",
                 "-o", str(tmp_path / "x.safetensors")]) == 1
    assert "--attention-matmuls applies to the static_int8 / dynamic_int8 presets" in capsys.readouterr().err
