"""``float_dtype=torch.bfloat16``: the float work between integer layers runs in bfloat16 (issue 25,
item 2): accurate against fp32, the dtypes of what runs, coverage says it, save/load keeps it."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import quanta
from quanta.integer.base import IntegerModule
from quanta.transforms import float_dtype
from quanta.transforms.float_dtype import float_dtype_of, run_float_work_in

BF16 = torch.bfloat16


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0))


@pytest.fixture(scope="module")
def bf16_models(trained_transformer, token_data):
    calib = token_data.calib_batches(2)
    return {p: quanta.quantize(trained_transformer, p, calib, progress=False, speed_check=False, float_dtype=BF16)
            for p in ("dynamic_int8", "static_int8")}


@pytest.mark.parametrize("name", ["dynamic_int8", "static_int8"])
def test_accuracy_against_fp32(bf16_models, trained_transformer, token_data, name):
    x, y = token_data.x_test, token_data.y_test
    with torch.no_grad():
        ref, out = trained_transformer(x), bf16_models[name](x)
    assert out.dtype == BF16
    assert _cosine(ref, out) >= 0.99
    assert float((out.argmax(1) == y).float().mean()) >= float((ref.argmax(1) == y).float().mean()) - 0.02


def test_what_runs_in_bfloat16(bf16_models, trained_transformer, token_data):
    q = bf16_models["dynamic_int8"]
    seen: dict[str, tuple[torch.dtype, torch.dtype]] = {}

    def record(name):
        def hook(_m, args, out):
            out = out[0] if isinstance(out, tuple) else out
            seen[name] = (args[0].dtype, out.dtype)
        return hook

    for n, m in q.named_modules():
        if isinstance(m, (nn.LayerNorm, IntegerModule, nn.Embedding)) or n == "head":
            m.register_forward_hook(record(n))
    with torch.no_grad():
        q(token_data.x_test[:8])
    assert seen["embed"] == (torch.int64, BF16)
    assert seen["encoder.norm1"] == (BF16, BF16) and seen["encoder.norm2"] == (BF16, BF16)
    assert seen["encoder.linear1"] == (BF16, BF16) and seen["encoder.self_attn"] == (BF16, BF16)
    lin = q.get_submodule("encoder.linear1")
    assert lin.weight.dtype == torch.int8 and all(b.dtype in (torch.float32, torch.int8, torch.int32, torch.uint8)
                                                  for b in lin.buffers())  # integer modules keep their numbers
    assert q.get_submodule("encoder.norm1").weight.dtype == BF16 and float_dtype_of(q) == BF16
    cov = {e.name: e for e in quanta.coverage(q).entries}
    assert cov["encoder.norm1"].detail.endswith("; computes in bfloat16")
    assert cov["encoder.linear1"].detail.endswith("; bfloat16 in and out")



def test_float_inputs_are_cast_at_the_root():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.LayerNorm(32), nn.Linear(32, 4)).eval()
    x = torch.randn(8, 16)
    q = quanta.quantize(mlp, "dynamic_int8", progress=False, float_dtype=BF16)
    with torch.no_grad():
        out = q(x)
        assert out.dtype == BF16 and torch.equal(out, q(x.to(BF16)))  # fp32 in: cast to bfloat16 first
        assert _cosine(mlp(x), out) >= 0.99


def test_save_load_keeps_it(bf16_models, token_data, tmp_path):
    q = bf16_models["static_int8"]
    path = quanta.save(q, tmp_path / "bf16.safetensors")
    assert quanta.inspect(path, show=False).to_dict()["manifest"]["float_dtype"] == "bfloat16"
    back = quanta.load(path)
    assert float_dtype_of(back) == BF16 and back.get_submodule("encoder.norm1").weight.dtype == BF16
    x = token_data.x_test[:32]
    with torch.no_grad():
        assert torch.equal(back(x), q(x))


def test_the_default_writes_what_it_wrote_and_float32_undoes_it(trained_transformer, token_data, tmp_path):
    calib = token_data.calib_batches(1)
    q = quanta.quantize(trained_transformer, "dynamic_int8", calib, progress=False, speed_check=False)
    path = quanta.save(q, tmp_path / "fp32.safetensors")
    assert "float_dtype" not in quanta.inspect(path, show=False).to_dict()["manifest"]
    run_float_work_in(q, BF16)
    with torch.no_grad():
        assert q(token_data.x_test[:4]).dtype == BF16
        run_float_work_in(q, torch.float32)
        assert q(token_data.x_test[:4]).dtype == torch.float32 and float_dtype_of(q) == torch.float32


def test_bad_input_is_one_clear_error(trained_transformer, token_data):
    with pytest.raises(ValueError, match=r"float_dtype must be torch.float32 or torch.bfloat16, got torch.float16"):
        quanta.quantize(trained_transformer, "dynamic_int8", float_dtype=torch.float16, progress=False)
    with pytest.raises(ValueError, match="has no integer modules: convert it first"):
        run_float_work_in(nn.Linear(4, 4), BF16)
    assert next(trained_transformer.parameters()).dtype == torch.float32  # the user's model untouched


@pytest.mark.parametrize("native", [False, True])
def test_a_cpu_without_native_bfloat16_is_said_once(native, trained_transformer, token_data, monkeypatch, caplog):
    monkeypatch.setattr(float_dtype, "native_bf16", lambda: native)
    monkeypatch.setattr(float_dtype, "_WARNED", [])
    q = quanta.quantize(trained_transformer, "dynamic_int8", progress=False)
    with caplog.at_level(logging.WARNING, logger="quanta.transforms.float_dtype"):
        run_float_work_in(q, BF16)
        run_float_work_in(q, BF16)
    said = [r.message for r in caplog.records if "without native bfloat16" in r.message]
    assert len(said) == (0 if native else 1)
    with torch.no_grad():
        assert q(token_data.x_test[:4]).dtype == BF16  # it runs either way


def test_a_transformers_encoder():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (4, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[1:, 12:] = 0
    calib = [{"input_ids": torch.randint(0, 100, (4, 16), generator=g)} for _ in range(2)]
    q = quanta.quantize(model, "dynamic_int8", calib, progress=False, speed_check=False, float_dtype=BF16)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
        out = q(input_ids=ids, attention_mask=mask).last_hidden_state
    assert out.dtype == BF16 and _cosine(ref, out) >= 0.99


def test_the_cli_writes_a_bfloat16_model(tmp_path, capsys):
    from quanta.cli import main

    spec = tmp_path / "mlp_model.py"
    spec.write_text("import torch\nfrom torch import nn\n\n\ndef build():\n    torch.manual_seed(0)\n"
                    "    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.LayerNorm(32), nn.Linear(32, 4)).eval()\n")
    out = tmp_path / "m.safetensors"
    assert main(["quantize", f"{spec}:build", "--float-dtype", "bfloat16", "--no-speed-check", "-q", "-o", str(out)]) == 0
    assert quanta.inspect(out, show=False).to_dict()["manifest"]["float_dtype"] == "bfloat16"
    capsys.readouterr()
    with pytest.raises(SystemExit):  # argparse refuses it, naming the choices
        main(["quantize", f"{spec}:build", "--float-dtype", "float16", "-o", str(out)])
    assert "invalid choice: 'float16'" in capsys.readouterr().err


def test_a_file_naming_an_unknown_float_dtype_is_refused(bf16_models, tmp_path, monkeypatch):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "io"))
    from file_edits import edit_manifest

    path = quanta.save(bf16_models["dynamic_int8"], tmp_path / "m.safetensors")
    edit_manifest(path, lambda m: m.__setitem__("float_dtype", "float8"))
    with pytest.raises(quanta.io.safe_file.QuantaFileError, match="unknown float_dtype 'float8'"):
        quanta.load(path)
