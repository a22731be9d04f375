"""The decoding benchmark (benchmarks/decoding.py) end to end on a tiny Llama, in this process.

Timing is never asserted (benchmarks/ measures it). This proves that the decode loop is HF's
greedy generation with its KV cache (same tokens as ``generate()``), that it leaves the cache as
it found it so every timed round does the same work, that the KV-cache size is what the config
implies, and that the CLI writes a table whose accuracy columns are sane and whose failing peers
are rows, not crashes.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
if not (BENCH / "decoding.py").exists():
    pytest.skip("benchmarks/ not present", allow_module_level=True)
sys.path.insert(0, str(BENCH))

import decoding
from decoding_rows import DecoderShape, DecodeRunner, build_decoder

TINY = DecoderShape(hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2, vocab=512, prompt=16, new_tokens=6)


@pytest.fixture(scope="module")
def tiny_decoder():
    with torch.random.fork_rng():  # build_decoder seeds torch: leave the session's generator as it was
        return build_decoder(TINY)


def _prompt(shape: DecoderShape) -> torch.Tensor:
    return torch.randint(0, shape.vocab, (1, shape.prompt), generator=torch.Generator().manual_seed(1))


def test_decode_loop_is_hf_greedy_generation_and_rewinds_its_cache(tiny_decoder):
    prompt = _prompt(TINY)
    runner = DecodeRunner(tiny_decoder, prompt, TINY.new_tokens)
    with torch.inference_mode():
        tokens = runner.decode()
        again = runner.decode()
        ref = tiny_decoder.generate(prompt, do_sample=False, max_new_tokens=TINY.new_tokens,
                                    min_new_tokens=TINY.new_tokens, pad_token_id=0)
    assert len(tokens) == TINY.new_tokens
    assert tokens == ref[0, TINY.prompt:].tolist()
    assert again == tokens  # the cache was cut back to the prompt: every round does the same work
    assert runner.cache.get_seq_length() == TINY.prompt


def test_kv_cache_bytes_per_token_follow_the_config(tiny_decoder):
    runner = DecodeRunner(tiny_decoder, _prompt(TINY), TINY.new_tokens)
    head_dim = TINY.hidden // TINY.heads
    assert runner.kv_bytes_per_token == 2 * TINY.layers * TINY.kv_heads * head_dim * 4  # k and v, fp32


def test_bad_shapes_and_row_filters_say_what_is_wrong(capsys):
    with pytest.raises(ValueError, match="layers must be >= 1"):
        DecoderShape(layers=0)
    with pytest.raises(ValueError, match="new_tokens must be >= 2"):
        DecoderShape(new_tokens=1)
    with pytest.raises(ValueError, match="--rows 'nope' matches no row"):
        decoding.select_rows(["nope"])
    assert decoding.select_rows(["int4"]) >= {"torch fp32", "quanta weight_only_int4 group_size=128"}
    assert "quanta dynamic_int8" not in decoding.select_rows(["int4"])
    with pytest.raises(SystemExit) as exc:
        decoding.main(["--quick", "--layers", "0"])
    assert exc.value.code == 2 and "layers must be >= 1" in capsys.readouterr().err


def _row(text: str, start: str) -> list[str]:
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0].strip("*").startswith(start):
            return cells
    raise AssertionError(f"no row {start!r} in:\n{text}")


def _mib(cell: str) -> float:
    return float(cell.removesuffix(" MiB"))


def test_cli_quick_writes_the_table(tmp_path):
    out = tmp_path / "decoding.md"
    threads = torch.get_num_threads()
    rows = ["torch bf16", "quanta"] + (["torchao Int4"] if _installed("torchao") else [])
    args = ["--quick", "--layers", "1", "--prompt", "16", "--new-tokens", "4", "--repeats", "1", "--threads", "1",
            "--out", str(out), *[a for r in rows for a in ("--rows", r)]]
    try:
        with torch.random.fork_rng():  # the benchmark seeds torch and sets its threads: restore both
            assert decoding.main(args) == 0
    finally:
        torch.set_num_threads(threads)
    text = out.read_text()
    assert re.search(r"date: \d{4}-\d\d-\d\d \d\d:\d\d UTC", text) and "CPU:" in text
    assert "torch.set_num_threads(1)" in text and "transformers " in text and "quanta " in text
    assert "num_hidden_layers=1" in text and "--layers 1" in text

    fp32 = _row(text, "torch fp32")
    assert float(fp32[1]) > 0 and float(fp32[2]) > 0 and fp32[3] == "1.00×"
    assert fp32[7] == "1.00000" and fp32[8] == "100.0%" and fp32[9] == "4/4"
    assert fp32[6] == "2 KiB"  # k and v x 1 layer x 4 kv heads x 64 head dim x 4 bytes per token
    bf16 = _row(text, "torch bf16")
    assert bf16[6] == "1 KiB" and _mib(bf16[4]) < _mib(fp32[4])

    for name, min_cos in (("quanta weight_only_int8", 0.999), ("quanta dynamic_int8", 0.999),
                          ("quanta weight_only_int4", 0.9)):
        r = _row(text, name)
        assert float(r[1]) > 0 and float(r[2]) > 0, r  # measured, not a failure row
        assert float(r[7]) >= min_cos, r
        assert _mib(r[4]) < _mib(fp32[4]), r
        assert name in text.split("## What it says")[1]
    assert _mib(_row(text, "quanta weight_only_int4")[4]) < _mib(_row(text, "quanta weight_only_int8")[4])
    if _installed("torchao"):  # no CPU path in torchao 0.18: a row saying why, the run went on
        r = _row(text, "torchao Int4WeightOnlyConfig")
        assert r[1].startswith("failed: ") or float(r[1]) > 0, r


def _installed(mod: str) -> bool:
    return importlib.util.find_spec(mod) is not None
