"""`quanta demo` end to end (quick mode): every method runs, the numbers are computed, trained
weights come from the cache on a second run, and a corrupt cache file is trained again."""

from __future__ import annotations

import math

import pytest
import torch

from quanta.cli import build_parser
from quanta.demo.cache import load_or_train
from quanta.demo.data import DOCSTRING_MODULES, stdlib_docstrings
from quanta.demo.models import DigitsCNN
from quanta.demo.run import METHODS, interleaved_ms, run_demo, sqnr_db


def test_cli_parses_demo():
    args = build_parser().parse_args(["demo", "--quick"])
    assert args.command == "demo" and args.quick


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory):
    cache = tmp_path_factory.mktemp("demo-cache")
    first = run_demo(quick=True, log=lambda _: None, progress=False, cache_dir=cache, rounds=2)
    second = run_demo(quick=True, log=lambda _: None, progress=False, cache_dir=cache, rounds=2)
    return first, second


def test_quick_demo_computes_every_number(quick_runs):
    report = quick_runs[0]
    models = {r.model for r in report.rows}
    assert any("digits" in m for m in models) and any("docstrings" in m for m in models)
    for r in report.rows:
        assert r.method == "fp32" or r.method in METHODS
        assert 0 <= r.accuracy <= 100 and r.file_bytes > 0 and r.latency_ms > 0 and r.speedup > 0
        assert r.spread_ms[0] <= r.latency_ms <= r.spread_ms[1]
        if r.method == "fp32":
            assert r.sqnr_db == math.inf and r.delta == 0
        else:
            done, total = map(int, r.integer_layers.split("/"))
            assert done == total > 0, r  # every quantizable layer integer (no speed check)
            assert r.sqnr_db > 10, r  # logits close to fp32's
    cnn = {r.method: r for r in report.rows if "digits" in r.model}
    assert cnn["static_int8"].file_bytes < 0.6 * cnn["fp32"].file_bytes
    assert cnn["static_int8"].delta >= -3.0 and cnn["fp32"].accuracy > 85
    table = report.markdown()
    assert table.count("\n| ") == len(report.rows) + 1 and "torch" in table and "native kernels" in table


def test_second_run_uses_the_cached_weights(quick_runs):
    first, second = quick_runs
    assert {r.weights for r in first.rows} == {"trained"}
    assert {r.weights for r in second.rows} == {"cached"}
    assert [r.accuracy for r in first.rows if r.method == "fp32"] == \
           [r.accuracy for r in second.rows if r.method == "fp32"]


def test_corrupt_cache_file_is_trained_again(tmp_path):
    x, y = torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,))
    calls = []

    def train(model):
        calls.append(1)
        return model

    logs: list[str] = []
    args = ({"width": 4}, (x, y), {"epochs": 1})
    _, cached = load_or_train(DigitsCNN(4), *args, train, logs.append, tmp_path)
    assert not cached and len(calls) == 1
    (path,) = tmp_path.glob("*.pt")
    path.write_bytes(path.read_bytes()[:100])  # truncated
    _, cached = load_or_train(DigitsCNN(4), *args, train, logs.append, tmp_path)
    assert not cached and len(calls) == 2 and "unreadable" in logs[-1]
    _, cached = load_or_train(DigitsCNN(4), *args, train, logs.append, tmp_path)  # rewritten, readable
    assert cached and len(calls) == 2
    _, cached = load_or_train(DigitsCNN(4), args[0], args[1], {"epochs": 2}, train, logs.append, tmp_path)
    assert not cached  # another recipe is another key


def test_docstring_data_is_real_labelled_text():
    x, y, names = stdlib_docstrings(per_class=20)
    assert names == DOCSTRING_MODULES and x.shape == (len(y), 32) and x.dtype == torch.long
    assert set(y.tolist()) == set(range(len(names)))
    assert (x[:, 0] > 1).float().mean() > 0.9  # lines start with a known word
    again, _, _ = stdlib_docstrings(per_class=20)
    assert torch.equal(x, again)


def test_sqnr_and_interleaved_timing():
    ref = torch.randn(100)
    assert sqnr_db(ref, ref) == math.inf
    assert 19 < sqnr_db(ref, ref + 0.1 * ref) < 21
    lin = torch.nn.Linear(4, 4)
    times = interleaved_ms({"a": lin, "b": lin}, torch.randn(2, 4), rounds=3)
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    with pytest.raises(ValueError, match="rounds"):
        run_demo(quick=True, log=lambda _: None, progress=False, rounds=0)


def test_seven_bit_rows_run_fast_kernels_where_only_seven_bit_weights_are_exact(quick_runs):
    """On a CPU without VNNI, u8 x s8 pair sums (oneDNN's, quanta's AVX2 loops) are exact only for
    weights within ±64: the demo's 7-bit rows run those kernels (every layer integer, none on the
    reference), the 8-bit rows do not run oneDNN; elsewhere the rows just exist."""
    from quanta.kernels.conv import ONEDNN_SATURATION

    rows = {(r.model, r.method): r for r in quick_runs[0].rows}
    seven = [r for (_, m), r in rows.items() if m == "static_int8, 7-bit weights"]
    assert len(seven) == 2 and all(r.kernels for r in seven)
    if ONEDNN_SATURATION.exact(64) and not ONEDNN_SATURATION.exact():
        cnn = next(r for r in seven if "digits" in r.model)
        kinds = {part.partition("×")[0] for part in cnn.kernels.split(", ")}
        assert kinds and kinds <= {"onednn", "native", "avx2_gemm"} and "reference" not in cnn.kernels, cnn
        eight = rows[(cnn.model, "static_int8")]
        assert "onednn" not in eight.kernels, eight
    assert "| kernels |" in quick_runs[0].markdown()


def test_fashion_mnist_reader_parses_the_debian_files(tmp_path):
    """The idx files as the Debian package ships them (gzip, big-endian headers): images in [0, 1] as
    [n, 1, 28, 28], labels as int64; a folder without them gives None."""
    import gzip
    import struct

    from quanta.demo.data import FASHION_MNIST_DIR, fashion_mnist

    assert FASHION_MNIST_DIR == "/usr/share/datasets/fashion-mnist"  # (dpkg -L dataset-fashion-mnist)
    assert fashion_mnist(root=str(tmp_path)) is None
    pixels = {"train": bytes(range(256)) * 3 + bytes(2 * 28 * 28 * 3 - 768), "t10k": bytes([255]) * 28 * 28}
    for split, n in (("train", 3), ("t10k", 1)):
        with gzip.open(tmp_path / f"{split}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">IIII", 2051, n, 28, 28) + pixels[split][:n * 28 * 28])
        with gzip.open(tmp_path / f"{split}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">II", 2049, n) + bytes(range(n)))
    xtr, ytr, xte, yte = fashion_mnist(root=str(tmp_path), train_images=2)
    assert xtr.shape == (2, 1, 28, 28) and xte.shape == (1, 1, 28, 28)
    assert float(xtr[0, 0, 0, 1]) == float(torch.tensor(1.0) / 255) and float(xte.min()) == 1.0
    assert ytr.tolist() == [0, 1] and yte.tolist() == [0] and ytr.dtype == torch.int64
