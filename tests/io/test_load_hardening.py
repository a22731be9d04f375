"""Loading validates everything before building anything: manifest checksum, field ranges, shapes
against the tensor table (bounded memory), the import allow-list; files are deterministic; tied
weights stay tied."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from file_edits import edit_manifest, split, write
from torch import nn

import quanta
from quanta import demo
from quanta.io import QuantaFileError
from quanta.io.architecture import import_class


def _record(manifest: dict, path: str) -> dict:
    return next(r for r in manifest["modules"] if r["path"] == path)


@pytest.fixture(scope="module")
def int8_cnn():
    torch.manual_seed(0)
    model = demo.DigitsCNN().eval()
    return quanta.quantize(model, "static_int8", [torch.randn(8, 1, 8, 8)], progress=False, speed_check=False)


@pytest.fixture
def cnn_file(int8_cnn, tmp_path):
    return str(quanta.save(int8_cnn, tmp_path / "cnn.safetensors"))


def test_an_accidental_manifest_edit_is_refused_by_its_checksum(cnn_file):
    # (before the manifest digest, this padding edit loaded silently and computed something else)
    edit_manifest(cnn_file, lambda m: _record(m, "features.0").__setitem__(
        "config", {**_record(m, "features.0")["config"], "padding": [0, 0]}), recompute_digest=False)
    with pytest.raises(QuantaFileError, match="manifest does not match its checksum"):
        quanta.load(cnn_file)


def test_a_version_2_file_without_its_checksum_is_refused(cnn_file):
    header, body = split(cnn_file)
    del header["__metadata__"]["quanta_sha256"]
    write(cnn_file, header, body)
    with pytest.raises(QuantaFileError, match="format version 2 file has no checksum"):
        quanta.load(cnn_file)


def test_a_version_1_file_still_loads(cnn_file, int8_cnn):
    edit_manifest(cnn_file, lambda m: m.__setitem__("format_version", 1))
    header, body = split(cnn_file)
    del header["__metadata__"]["quanta_sha256"]  # version 1 files had no manifest checksum
    write(cnn_file, header, body)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(quanta.load(cnn_file)(x), int8_cnn(x))


@pytest.mark.parametrize("field,value,match", [
    ("stride", [0, 0], "stride must be in 1"),
    ("padding", [-1, 1], "padding must be in 0"),
    ("groups", 3, "groups=3"),
    ("post_op", "swish", "post_op must be one of"),
    ("bias", "yes", "bias must be True or False"),
])
def test_a_deliberate_out_of_range_integer_config_is_refused(cnn_file, field, value, match):
    # (stride [0, 0] killed the process with SIGFPE inside quanta.load)
    def edit(m):
        rec = next(r for r in m["modules"] if r["kind"] == "integer" and r["cls"] == "Int8Conv2d")
        rec["config"][field] = value
    edit_manifest(cnn_file, edit)
    with pytest.raises(QuantaFileError, match=match):
        quanta.load(cnn_file)


@pytest.mark.parametrize("edit,match", [
    (lambda m: _record(m, "features.0").__setitem__("impl", "teleport"), "'impl' 'teleport' is not a kernel"),
    (lambda m: _record(m, "features").__setitem__("attrs", {"forward": "os:system"}), "attrs may only restore"),
    (lambda m: _record(m, "").__setitem__("training", "no"), "'training' must be true or false"),
    (lambda m: m.__setitem__("conversion", [{"name": 1}]), "manifest 'conversion'"),
    (lambda m: m.__setitem__("config", {"default": 5}), "manifest 'config'"),
    (lambda m: m["modules"].append(dict(m["modules"][1])), "recorded twice"),
])
def test_malformed_record_fields_are_refused_naming_the_field(cnn_file, edit, match):
    edit_manifest(cnn_file, edit)
    with pytest.raises(QuantaFileError, match=match):
        quanta.load(cnn_file)


def test_reaching_a_class_through_attributes_is_refused():
    # torch.nn imports torch; walking attributes from an allowed module reached 151 other classes
    with pytest.raises(QuantaFileError, match="not defined at that path"):
        import_class("torch.nn:modules.module.torch.jit.ScriptModule")
    assert import_class("torch.nn.modules.conv:Conv2d") is nn.Conv2d


def test_the_attribute_walk_is_refused_in_a_file(cnn_file):
    edit_manifest(cnn_file, lambda m: _record(m, "pool").__setitem__("cls", "torch.nn:modules.module.torch.jit.ScriptModule"))
    with pytest.raises(QuantaFileError, match="refusing to import"):
        quanta.load(cnn_file)


def _peak_rss_mb_of_load(path: str) -> tuple[str, float]:
    code = textwrap.dedent(f"""
        import resource, quanta
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            quanta.load({path!r})
            print("loaded")
        except quanta.io.QuantaFileError as e:
            print("refused:", e)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         check=True).stdout.split("\n")
    return out[0], float(out[1])


def test_a_huge_layer_claimed_by_the_manifest_is_refused_before_allocating(cnn_file):
    def huge(m):
        rec = _record(m, "head")
        rec["config"].update(in_features=10**6, out_features=10**5)  # 100 GB of int8 codes
        _record(m, "")["kwargs"]["width"] = 10**5  # and a float skeleton of 10**11 conv weights
    edit_manifest(cnn_file, huge)
    outcome, grew_mb = _peak_rss_mb_of_load(cnn_file)
    assert outcome.startswith("refused:") and ("implies" in outcome or "bytes of tensors" in outcome), outcome
    assert grew_mb < 100


def test_saving_is_byte_identical_in_one_process_and_across_processes(int8_cnn, tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    quanta.save(int8_cnn, a)
    quanta.save(int8_cnn, b)
    assert a.read_bytes() == b.read_bytes()
    code = textwrap.dedent(f"""
        import torch, quanta
        from quanta import demo
        torch.manual_seed(0)
        model = demo.DigitsCNN().eval()
        q = quanta.quantize(model, "static_int8", [torch.randn(8, 1, 8, 8)], progress=False, speed_check=False)
        quanta.save(q, {str(tmp_path / 'c.safetensors')!r})
    """)
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300, env=env)
    assert (tmp_path / "c.safetensors").read_bytes() == a.read_bytes()


def test_speed_check_timings_are_not_written():
    from quanta.io.save_load import _without_timings

    row = {"name": "fc", "simulated": "QuantLinear", "result": "Int8Linear", "detail": "int8 (0.123 ms vs float 0.456 ms)"}
    assert _without_timings(row)["detail"] == "int8"
    slow = {**row, "result": "float", "detail": "integer kernel slower: Int8Linear 1.000 ms vs float 0.500 ms on "
                                                 "input [1, 4]: float kept"}
    assert _without_timings(slow)["detail"] == "integer kernel slower: Int8Linear on input [1, 4]: float kept"


def test_the_file_is_a_standard_safetensors_file(cnn_file, int8_cnn):
    from safetensors.torch import load_file

    tensors = load_file(cnn_file)
    state = int8_cnn.state_dict()
    assert set(tensors) <= set(state) and all(torch.equal(tensors[k], state[k]) for k in tensors)


@pytest.mark.parametrize("dtype", ["F8_E8M0", "U16", "I4"])
def test_an_unknown_header_dtype_is_refused(cnn_file, dtype):
    # (safetensors' reader raised a raw KeyError for F8_E8M0)
    header, body = split(cnn_file)
    name = next(k for k in header if k.endswith("head.weight"))
    header[name]["dtype"] = dtype
    write(cnn_file, header, body)
    with pytest.raises(QuantaFileError, match=f"dtype '{dtype}'"):
        quanta.load(cnn_file)
    with pytest.raises(QuantaFileError):
        quanta.inspect(cnn_file, show=False)


def test_deeply_nested_json_is_refused(cnn_file):
    # (a RecursionError before)
    header, body = split(cnn_file)
    text = header["__metadata__"]["quanta"].replace('"conversion": [', '"conversion": [' + "[" * 100000 + "]" * 100000
                                                    + ",", 1)
    header["__metadata__"]["quanta"] = text
    header["__metadata__"]["quanta_sha256"] = hashlib.sha256(text.encode()).hexdigest()
    write(cnn_file, header, body)
    with pytest.raises(QuantaFileError, match="nested deeper|not valid JSON"):
        quanta.load(cnn_file)


def test_overlapping_tensor_offsets_are_refused(cnn_file):
    header, body = split(cnn_file)
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    header[names[1]]["data_offsets"] = list(header[names[0]]["data_offsets"])
    write(cnn_file, header, body)
    with pytest.raises(QuantaFileError):
        quanta.load(cnn_file)


class TiedLM(nn.Module):
    """A GPT-2-style head: the output layer shares the embedding's weight."""

    def __init__(self, vocab: int = 16, dim: int = 8):
        super().__init__()
        self.vocab, self.dim = vocab, dim
        self.wte = nn.Embedding(vocab, dim)
        self.mid = nn.Linear(dim, dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, tokens):
        return self.lm_head(torch.relu(self.mid(self.wte(tokens))))


@pytest.mark.parametrize("kind", ["float", "dynamic_int8"])
def test_tied_weights_are_stored_and_counted_once_and_stay_tied(kind, tmp_path):
    torch.manual_seed(0)
    model = TiedLM().eval()
    tok = torch.randint(0, 16, (2, 5))
    q = model if kind == "float" else quanta.quantize(model, kind, [tok], progress=False, speed_check=False)
    path = quanta.save(q, tmp_path / "lm.safetensors")
    header, _ = split(path)
    stored = [k for k in header if k != "__metadata__"]
    tied_in_q = q.lm_head.weight is q.wte.weight if kind == "float" else False
    if tied_in_q:
        assert sum(k.endswith("weight") and ("wte" in k or "lm_head" in k) for k in stored) == 1
    file_tensor_bytes = sum(header[k]["data_offsets"][1] - header[k]["data_offsets"][0] for k in stored)
    assert quanta.storage_bytes(q) == file_tensor_bytes
    back = quanta.load(path, trusted=[TiedLM])
    if tied_in_q:
        assert back.lm_head.weight is back.wte.weight
    with torch.no_grad():
        assert torch.equal(back(tok), q(tok))


def test_two_integer_layers_sharing_one_weight_are_counted_once():
    from quanta.integer.linear import Int8Linear

    a, b = Int8Linear(8, 4), Int8Linear(8, 4)
    b.weight = a.weight  # one buffer, two modules
    pair = nn.Sequential(a, b)
    assert quanta.storage_bytes(pair) == sum(t.numel() * t.element_size() for k, t in pair.state_dict().items()
                                             if k != "1.weight")
