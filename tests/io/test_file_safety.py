"""A quanta file that was damaged or altered is refused; loading never runs code from the file."""

from __future__ import annotations

import pickle

import pytest
import torch
from file_edits import edit_manifest, split, write
from torch import nn

import quanta
from quanta.io import ArchitectureError, QuantaFileError


def _file(tmp_path, digits_data, trained_cnn) -> str:
    q = quanta.quantize(trained_cnn, "static_int8", digits_data.calib_batches(1), progress=False, speed_check=False)
    return str(quanta.save(q, tmp_path / "m.safetensors"))


@pytest.fixture
def saved(tmp_path, digits_data, trained_cnn):
    return _file(tmp_path, digits_data, trained_cnn)








def _edit_record(path: str, select, **fields) -> None:
    """Set ``fields`` on the first module record for which ``select(record)`` holds."""
    def edit(m):
        next(r for r in m["modules"] if select(r)).update(fields)
    edit_manifest(path, edit)


def test_an_untouched_rewrite_still_loads(saved):
    edit_manifest(saved, lambda m: None)  # the helpers above keep a valid file valid
    quanta.load(saved)


def test_truncated_file_is_refused(saved):
    data = open(saved, "rb").read()
    for cut in (4, 100, len(data) - 10):
        with open(saved, "wb") as f:
            f.write(data[:cut])
        with pytest.raises(QuantaFileError, match="truncated|not a safetensors|damaged"):
            quanta.load(saved)


def test_flipped_tensor_byte_is_refused(saved):
    header, body = split(saved)
    name, info = next((k, v) for k, v in header.items() if k.endswith("features.3.weight"))
    start = info["data_offsets"][0] + 5
    body = body[:start] + bytes([body[start] ^ 0x01]) + body[start + 1:]
    write(saved, header, body)
    with pytest.raises(QuantaFileError, match="'features.3.weight' does not match its checksum"):
        quanta.load(saved)


def test_flipped_header_byte_is_refused(saved):
    data = bytearray(open(saved, "rb").read())
    data[12] ^= 0x40  # inside the JSON header
    open(saved, "wb").write(bytes(data))
    with pytest.raises(QuantaFileError):
        quanta.load(saved)


def test_edited_shape_is_refused(saved):
    header, body = split(saved)
    key = next(k for k in header if k.endswith("features.3.weight"))
    shape = header[key]["shape"]
    header[key]["shape"] = [shape[1], shape[0], *shape[2:]]  # same byte count, other layout
    write(saved, header, body)
    with pytest.raises(QuantaFileError, match="features.3.weight.*the file was altered"):
        quanta.load(saved)


def test_unknown_module_kind_is_refused(saved):
    _edit_record(saved, lambda r: r["path"] == "features.0", kind="hologram")
    with pytest.raises(QuantaFileError, match="unknown kind 'hologram'.*newer quanta"):
        quanta.load(saved)


def test_unknown_integer_class_is_refused(saved):
    _edit_record(saved, lambda r: r["kind"] == "integer", cls="Int3Teleporter")
    with pytest.raises(QuantaFileError, match="unknown integer module kind 'Int3Teleporter'"):
        quanta.load(saved)


def test_newer_format_version_is_refused(saved):
    def newer(m):
        m["format_version"] = 99

    edit_manifest(saved, newer)
    with pytest.raises(QuantaFileError, match="format version 99.*upgrade quanta"):
        quanta.load(saved)
    with pytest.raises(QuantaFileError, match="format version 99"):
        quanta.inspect(saved, show=False)


class _Payload:
    """Unpickling this runs ``open(marker, 'w')``: evidence that code from a file ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_file_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.safetensors"
    torch.save({"weight": torch.ones(2), "x": _Payload(str(marker))}, path)
    with pytest.raises(QuantaFileError, match="not a safetensors file"):
        quanta.load(path)
    with pytest.raises(QuantaFileError):
        quanta.inspect(path, show=False)
    assert not marker.exists()


def test_a_pickle_planted_in_the_manifest_is_not_executed(saved, tmp_path):
    marker = tmp_path / "pwned"
    blob = pickle.dumps(_Payload(str(marker)), protocol=0).decode("latin-1")

    def plant(m):
        m["modules"][0]["kwargs"] = {"width": blob}
        m["config"] = blob

    edit_manifest(saved, plant)
    with pytest.raises((QuantaFileError, ArchitectureError, TypeError, ValueError)):
        quanta.load(saved)
    assert not marker.exists()


@pytest.mark.parametrize("target", ["os:system", "subprocess:Popen", "builtins:eval", "quanta.cli:main",
                                    "torch:load"])
def test_a_manifest_naming_a_callable_as_architecture_is_refused(saved, tmp_path, target):
    marker = tmp_path / "pwned"

    def arch(m):
        m["modules"][0]["cls"] = target
        m["modules"][0]["kwargs"] = {"command": f"touch {marker}", "args": ["touch", str(marker)]}
        m["architecture"]["class"] = target

    edit_manifest(saved, arch)
    with pytest.raises(ArchitectureError, match="refusing"):
        quanta.load(saved)
    assert not marker.exists()


def test_a_manifest_naming_another_class_in_a_submodule_is_refused(saved):
    _edit_record(saved, lambda r: r["path"] == "features.1", cls="subprocess:Popen")
    with pytest.raises(ArchitectureError, match="refusing to import 'subprocess:Popen'"):
        quanta.load(saved)


class TrustedNet(nn.Module):
    def __init__(self, width: int = 4):
        super().__init__()
        self.width = width
        self.fc = nn.Linear(width, 2)

    def forward(self, x):
        return self.fc(x)


def test_user_classes_need_trust(tmp_path):
    net = TrustedNet(6)
    path = quanta.save(net, tmp_path / "t.safetensors")
    with pytest.raises(ArchitectureError, match=r"refusing to import .*TrustedNet.*trusted=\[TrustedNet\]"):
        quanta.load(path)
    for trusted in ([TrustedNet], [TrustedNet.__module__]):
        back = quanta.load(path, trusted=trusted)
        assert isinstance(back, TrustedNet) and back.width == 6
        assert torch.equal(back.fc.weight, net.fc.weight)
    assert isinstance(quanta.load(path, model=TrustedNet(6)), TrustedNet)  # model= needs no trust


def test_a_plain_safetensors_file_is_explained(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.ones(3)}, tmp_path / "plain.safetensors")
    with pytest.raises(QuantaFileError, match="without a quanta manifest"):
        quanta.load(tmp_path / "plain.safetensors")
