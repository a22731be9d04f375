"""Models from the ecosystem load back from a quanta file without hand-written ``trusted=``
lists: ``quanta.load(path, model=AutoModel.from_config(cfg))`` (the documented way).

timm is not tested here: the only torchvision builds this environment's package indexes offer
for torch 2.13 are CUDA builds, which fail to import beside the CPU torch ("operator
torchvision::nms does not exist"), and timm imports torchvision."""

from __future__ import annotations

import pytest
import torch

import quanta
from quanta.cli import main
from quanta.io import ArchitectureError

transformers = pytest.importorskip("transformers")


def _bert_config():
    return transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=64, max_position_embeddings=32)


def _gpt2_config():
    return transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=32,
                                   bos_token_id=0, eos_token_id=0)


def _batches(n: int = 3) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 100, (2, 12), generator=g)} for _ in range(n)]


def test_bert_static_int8_loads_back_from_a_fresh_auto_model(tmp_path):
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(_bert_config()).eval()
    data = _batches()
    q = quanta.quantize(model, "static_int8", data, progress=False, speed_check=False)
    assert sum(r.result == "Int8Linear" for r in quanta.conversion_report(q)) == 13  # 12 + the pooler
    quanta.save(q, tmp_path / "bert.safetensors")
    fresh = transformers.AutoModel.from_config(_bert_config()).eval()  # other random weights: the file's win
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    loaded = quanta.load(tmp_path / "bert.safetensors", model=fresh)
    ids = data[0]["input_ids"]
    assert torch.equal(loaded(ids).last_hidden_state, q(ids).last_hidden_state)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())  # the caller's model untouched
    assert type(loaded.encoder.layer[0].attention.self.query).__name__ == "Int8Linear"


def test_gpt2_with_tied_head_loads_back_tied(tmp_path):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_gpt2_config()).eval()
    q = quanta.quantize(model, "dynamic_int8", progress=False, speed_check=False)
    quanta.save(q, tmp_path / "gpt2.safetensors")
    loaded = quanta.load(tmp_path / "gpt2.safetensors",
                         model=lambda: transformers.AutoModelForCausalLM.from_config(_gpt2_config()))
    ids = _batches(1)[0]["input_ids"]
    assert torch.equal(loaded(ids).logits, q(ids).logits)
    head, embedding = loaded.lm_head, loaded.transformer.wte
    shared = {id(t) for t in embedding.buffers()} & {id(t) for t in head.buffers()}
    assert shared, "the tied lm_head and token embedding hold their codes once after loading"


def test_without_a_model_the_error_says_to_pass_one(tmp_path):
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(_bert_config()).eval()
    quanta.save(quanta.quantize(model, "dynamic_int8", progress=False, speed_check=False), tmp_path / "b.safetensors")
    for trusted in (None, ["transformers"]):  # trusting the package does not help: the config is not in the file
        with pytest.raises(ArchitectureError, match="pass model="):
            quanta.load(tmp_path / "b.safetensors", trusted=trusted)
    other = transformers.BertConfig(**{**_bert_config().to_dict(), "intermediate_size": 48})
    with pytest.raises(ArchitectureError, match="intermediate.dense.*out_features=48.*same architecture"):
        quanta.load(tmp_path / "b.safetensors", model=transformers.AutoModel.from_config(other))


def test_cli_hf_file_loads_back_with_from_pretrained(tmp_path, capsys):
    torch.manual_seed(0)
    transformers.BertModel(_bert_config()).save_pretrained(tmp_path / "bert")
    torch.save(torch.cat([b["input_ids"] for b in _batches()]), tmp_path / "ids.pt")
    out = tmp_path / "bert.safetensors"
    assert main(["quantize", "--hf", str(tmp_path / "bert"), "--preset", "static_int8", "--calib",
                 str(tmp_path / "ids.pt"), "--calib-batch-size", "2", "--no-speed-check", "-q", "-o", str(out)]) == 0
    capsys.readouterr()
    float_model = transformers.AutoModel.from_pretrained(tmp_path / "bert", local_files_only=True).eval()
    loaded = quanta.load(out, model=lambda: transformers.AutoModel.from_pretrained(tmp_path / "bert",
                                                                                   local_files_only=True))
    ids = _batches(1)[0]["input_ids"]
    ref, got = float_model(ids).last_hidden_state, loaded(ids).last_hidden_state
    assert torch.nn.functional.cosine_similarity(ref.flatten(), got.flatten(), dim=0) > 0.99
