"""Model and data sources of the command line: `torch.export` program files (``.pt2``) and
folders of images as calibration data."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
import torch
from torch import nn

import quanta
from quanta.cli import main
from quanta.commands import CommandError
from quanta.commands.exported import load_exported, recover_layers
from quanta.commands.images import ImageOptions
from quanta.commands.sources import load_calibration

PIL = pytest.importorskip("PIL.Image")


class Net(nn.Module):
    """Convs (one depthwise, strided), a bias-free Linear inside a Sequential, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, stride=2, groups=16)
        self.body = nn.Sequential(nn.Linear(16, 32, bias=False), nn.ReLU())
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.dw(torch.relu(self.conv(x))).mean((2, 3))))


def _program(path: pathlib.Path, dynamic_batch: bool = True, model: nn.Module | None = None) -> nn.Module:
    torch.manual_seed(0)
    model = (model or Net()).eval()
    shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    torch.export.save(torch.export.export(model, (torch.randn(4, 3, 12, 12),), dynamic_shapes=shapes), path)
    return model


def _fails(capsys, argv: list[str]) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err.strip()


# -- torch.export programs ------------------------------------------------------------------

def test_exported_program_gets_its_layers_back(tmp_path):
    float_model = _program(tmp_path / "net.pt2")
    module = load_exported(tmp_path / "net.pt2")
    kinds = {n: type(m) for n, m in module.named_modules() if n in ("conv", "dw", "body.0", "head")}
    assert kinds == {"conv": nn.Conv2d, "dw": nn.Conv2d, "body.0": nn.Linear, "head": nn.Linear}
    assert module.dw.stride == (2, 2) and module.dw.groups == 16 and module.get_submodule("body.0").bias is None
    assert list(module.state_dict()) == list(float_model.state_dict())
    x = torch.randn(7, 3, 12, 12)  # another batch size: the program was exported with a dynamic batch
    assert torch.equal(module(x), float_model(x))
    assert module.quanta_example_inputs[0].shape == (4, 3, 12, 12)


def test_exported_program_quantizes_and_round_trips(tmp_path):
    float_model = _program(tmp_path / "net.pt2")
    data = [torch.randn(8, 3, 12, 12, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    q = quanta.quantize(load_exported(tmp_path / "net.pt2"), "static_int8", data, progress=False, speed_check=False)
    assert {r.name: r.result for r in quanta.conversion_report(q)} == {
        "conv": "Int8Conv2d", "dw": "Int8Conv2d", "body.0": "Int8Linear", "head": "Int8Linear"}
    x = data[0]
    ref = float_model(x)
    assert ((q(x) - ref).norm() / ref.norm()).item() < 0.05
    quanta.save(q, tmp_path / "q.safetensors")
    back = quanta.load(tmp_path / "q.safetensors", model=lambda: load_exported(tmp_path / "net.pt2"))
    assert torch.equal(back(x), q(x))


def test_graph_without_layers_and_bad_files_are_one_line_errors(tmp_path, capsys):
    class NoLayers(nn.Module):
        def forward(self, x):
            return torch.relu(x) * 2

    _program(tmp_path / "plain.pt2", model=NoLayers())
    with pytest.raises(CommandError, match="no linear or convolution.*spec"):
        load_exported(tmp_path / "plain.pt2")
    (tmp_path / "junk.pt2").write_bytes(b"not a zip")
    err = _fails(capsys, ["quantize", str(tmp_path / "junk.pt2"), "-o", str(tmp_path / "q.safetensors")])
    assert "not a torch.export program file" in err and "junk.pt2" in err


def test_fixed_batch_program_says_how_to_export_it(tmp_path, capsys):
    _program(tmp_path / "fixed.pt2", dynamic_batch=False)
    torch.save(torch.randn(10, 3, 12, 12), tmp_path / "calib.pt")
    err = _fails(capsys, ["quantize", str(tmp_path / "fixed.pt2"), "--preset", "static_int8", "--calib",
                          str(tmp_path / "calib.pt"), "-q", "-o", str(tmp_path / "q.safetensors")])
    assert "dynamic_shapes" in err and "--calib-batch-size" in err
    assert main(["quantize", str(tmp_path / "fixed.pt2"), "--preset", "static_int8", "--calib",
                 str(tmp_path / "calib.pt"), "--calib-batch-size", "4", "--calib-batches", "2", "-q",
                 "-o", str(tmp_path / "q.safetensors")]) == 0


def test_cli_round_trip_of_a_program_file(tmp_path, capsys):
    """quantize a .pt2 in a subprocess, as a user runs it → compare and bench against the program."""
    _program(tmp_path / "net.pt2")
    torch.save(torch.randn(16, 3, 12, 12), tmp_path / "calib.pt")
    out = tmp_path / "net.safetensors"
    done = subprocess.run([sys.executable, "-m", "quanta", "quantize", "net.pt2", "--preset", "static_int8",
                           "--calib", "calib.pt", "--calib-batch-size", "8", "--no-speed-check", "-q", "-o", out.name],
                          cwd=tmp_path, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr
    assert "4 of 4 quantized layers" in done.stdout
    assert main(["compare", str(out), "--model", str(tmp_path / "net.pt2")]) == 0
    assert "head" in capsys.readouterr().out
    # bench without --input-shape or data: the program's own example input [4, 3, 12, 12]
    assert main(["bench", str(out), "--model", str(tmp_path / "net.pt2"), "--rounds", "3"]) == 0
    assert "input (4, 3, 12, 12)" in capsys.readouterr().out


# -- folders of images -----------------------------------------------------------------------

def _images(folder: pathlib.Path) -> list[pathlib.Path]:
    """Five PNGs of different sizes and modes (one in a subfolder) and a text file."""
    g = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sub").mkdir(exist_ok=True)
    paths = [folder / "b.png", folder / "a.png", folder / "sub" / "c.png", folder / "d.PNG", folder / "e.png"]
    sizes = [(20, 30), (16, 16), (40, 24), (16, 16), (17, 19)]
    modes = ["RGB", "RGB", "L", "RGBA", "RGB"]
    for path, (h, w), mode in zip(paths, sizes, modes):
        channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
        pixels = torch.randint(0, 256, (h, w, channels), generator=g, dtype=torch.uint8).squeeze(-1).numpy()
        PIL.fromarray(pixels, mode).save(path)
    (folder / "notes.txt").write_text("not an image")
    return paths


def test_image_folder_batches_sorted_resized_scaled(tmp_path):
    _images(tmp_path / "imgs")
    batches = load_calibration(str(tmp_path / "imgs"), 2, ImageOptions(size=(16, 16)))
    assert [tuple(b.shape) for b in batches] == [(2, 3, 16, 16), (2, 3, 16, 16), (1, 3, 16, 16)]
    images = torch.cat(list(batches))
    assert images.dtype == torch.float32 and images.min() >= 0 and images.max() <= 1
    expected = torch.from_numpy(__import__("numpy").array(PIL.open(tmp_path / "imgs" / "a.png"))).permute(2, 0, 1)
    assert torch.equal(images[0], expected.float() / 255)  # a.png first (sorted), 16x16: unchanged
    again = torch.cat(list(load_calibration(str(tmp_path / "imgs"), 3, ImageOptions(size=(16, 16)))))
    assert torch.equal(images, again)
    norm = torch.cat(list(load_calibration(str(tmp_path / "imgs"), 5, ImageOptions(size=(16, 16), mean=(0.5, 0.4, 0.3),
                                                                                  std=(0.2,)))))
    assert torch.allclose(norm, (images - torch.tensor([0.5, 0.4, 0.3]).view(3, 1, 1)) / 0.2)
    gray = load_calibration(str(tmp_path / "imgs"), 8, ImageOptions(size=(8, 12), channels=1), max_batches=1)
    assert gray[0].shape == (5, 1, 8, 12)


def test_image_folder_is_read_batch_by_batch(tmp_path):
    paths = _images(tmp_path / "imgs")
    batches = load_calibration(str(tmp_path / "imgs"), 2, ImageOptions(size=(8, 8)))
    assert len(batches) == 3 and batches[-1].shape == (1, 3, 8, 8) and len(batches[1:]) == 2
    paths[2].unlink()  # sub/c.png (sorted last): in the last batch, read only when that batch is asked for
    assert batches[0].shape == (2, 3, 8, 8)
    with pytest.raises(CommandError, match=r"sub/c\.png: cannot read this image"):
        batches[2]
    with pytest.raises(IndexError):
        batches[3]


def test_image_folder_errors_name_the_problem(tmp_path, monkeypatch):
    paths = _images(tmp_path / "imgs")
    with pytest.raises(CommandError, match="--image-size"):
        load_calibration(str(tmp_path / "imgs"), 4, ImageOptions(), model=nn.Linear(3, 3))
    paths[2].write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(CommandError, match=r"sub/c\.png: cannot read this image"):
        load_calibration(str(tmp_path / "imgs"), 4, ImageOptions(size=(8, 8)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CommandError, match="no .png"):
        load_calibration(str(tmp_path / "empty"), 4, ImageOptions(size=(8, 8)))
    with pytest.raises(CommandError, match="--mean takes one value or 1"):
        load_calibration(str(tmp_path / "imgs"), 4, ImageOptions(size=(8, 8), channels=1, mean=(0.1, 0.2, 0.3)))
    with pytest.raises(CommandError, match="--std values must be positive"):
        ImageOptions(std=(0.0,))
    monkeypatch.setitem(sys.modules, "PIL", None)  # Pillow not installed
    with pytest.raises(CommandError, match="needs Pillow"):
        load_calibration(str(tmp_path / "imgs"), 4, ImageOptions(size=(8, 8)))


def test_image_size_from_the_program_and_quantize_from_a_folder(tmp_path, capsys):
    _images(tmp_path / "imgs")
    _program(tmp_path / "net.pt2")
    batches = load_calibration(str(tmp_path / "imgs"), 4, model=load_exported(tmp_path / "net.pt2"))
    assert batches[0].shape == (4, 3, 12, 12)  # the program's example input is [4, 3, 12, 12]
    out = tmp_path / "q.safetensors"
    assert main(["quantize", str(tmp_path / "net.pt2"), "--preset", "static_int8", "--calib", str(tmp_path / "imgs"),
                 "--mean", "0.5", "--std", "0.25", "--no-speed-check", "-q", "-o", str(out)]) == 0
    assert "4 of 4 quantized layers" in capsys.readouterr().out
    err = _fails(capsys, ["quantize", str(tmp_path / "net.pt2"), "--calib", str(tmp_path / "nowhere"),
                          "-o", str(out)])
    assert "nowhere: no such file or folder" in err


def test_recover_layers_leaves_shared_weights_in_the_graph(tmp_path):
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.b = nn.Linear(8, 8)
            self.b.weight = self.a.weight  # one weight used by two calls

        def forward(self, x):
            return self.b(self.a(x))

    torch.manual_seed(0)
    model = Tied().eval()
    program = torch.export.export(model, (torch.randn(2, 8),))
    module = program.module()
    recover_layers(module)
    assert not any(isinstance(m, nn.Linear) for m in module.modules())  # not recovered: left as it was
    x = torch.randn(2, 8)
    assert torch.equal(module(x), model(x))


def test_export_of_a_program_file_needs_the_program(tmp_path, capsys):
    _program(tmp_path / "net.pt2")
    torch.save(torch.randn(8, 3, 12, 12), tmp_path / "calib.pt")
    out = tmp_path / "q.safetensors"
    assert main(["quantize", str(tmp_path / "net.pt2"), "--preset", "static_int8", "--calib", str(tmp_path / "calib.pt"),
                 "--no-speed-check", "-q", "-o", str(out)]) == 0
    err = _fails(capsys, ["export", str(out), "-o", str(tmp_path / "q.onnx")])
    assert "give --model SPEC" in err
    pytest.importorskip("onnx")
    assert main(["export", str(out), "--model", str(tmp_path / "net.pt2"), "-o", str(tmp_path / "q.onnx")]) == 0
    assert "QuantizeLinear" in capsys.readouterr().out and (tmp_path / "q.onnx").is_file()


def test_image_size_and_channels_from_a_transformers_style_config(tmp_path):
    import types

    _images(tmp_path / "imgs")
    vision = nn.Linear(3, 3)
    vision.config = types.SimpleNamespace(image_size=20, num_channels=1)  # what e.g. ViTConfig records
    assert load_calibration(str(tmp_path / "imgs"), 8, model=vision)[0].shape == (5, 1, 20, 20)
    vision.config = types.SimpleNamespace(image_size=(10, 14), num_channels=3)
    assert load_calibration(str(tmp_path / "imgs"), 8, ImageOptions(channels=1), model=vision)[0].shape == (5, 1, 10, 14)
