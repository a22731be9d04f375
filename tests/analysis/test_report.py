"""`quanta.report`: HTML + Markdown with PNG charts beside it, each a valid image of the expected size."""

from __future__ import annotations

import re
import sys

import pytest
import torch
from fragile import FRAGILE

import quanta
from quanta.analysis import plots
from quanta.analysis.report import clip_ranges

mpimg = pytest.importorskip("matplotlib.image")

CLIP_RGB = torch.tensor([0xC4, 0x4E, 0x52]) / 255.0  # plots.py's clipping-range colour


def _pixels(path):
    img = torch.from_numpy(mpimg.imread(path))
    return img[..., :3]


def _has_colour(img, rgb):
    return bool(((img - rgb).abs().max(-1).values < 0.02).any())


def test_report_html_references_pngs_of_the_expected_panels(fragile_cnn, fragile_int, digits_data, tmp_path):
    batches = digits_data.calib_batches(2)
    sens = quanta.sensitivity(fragile_cnn, "static_int8", batches, what="weights")
    files = quanta.report(fragile_cnn, fragile_int, batches, tmp_path / "out" / "digits.html", sensitivity=sens,
                          latency=True)
    text = files.html.read_text()
    srcs = re.findall(r"<img src='([^']+)'", text)
    assert set(srcs) == {p.name for p in files.images.values()} == {
        "digits_histograms.png", "digits_sqnr.png", "digits_sensitivity.png", "digits_latency.png"}
    for src in srcs:
        assert (files.html.parent / src).is_file()
    layers = [n for n, m in fragile_int.named_modules() if isinstance(m, quanta.integer.base.IntegerModule)]
    hist = _pixels(files.images["histograms"])
    dpi = plots.FIG_DPI
    assert hist.shape[:2] == (round(len(layers) * plots.HIST_CELL[1] * dpi), round(2 * plots.HIST_CELL[0] * dpi))
    assert _has_colour(hist, CLIP_RGB)  # the clipping ranges are drawn
    for name in ("sqnr", "sensitivity", "latency"):
        img = _pixels(files.images[name])
        assert img.shape[1] == round(6.0 * dpi) and img.shape[0] > 50
    assert FRAGILE in text and "Coverage" in text and "kernels:" in text and "keep float" in text
    md = files.markdown.read_text()
    assert "![histograms](digits_histograms.png)" in md and "| layer |" in md
    assert "latency not measured" not in text


def test_clip_ranges_of_integer_and_simulated_layers_agree(fragile_sim, fragile_int):
    for name in (FRAGILE, "head"):
        sim_w, sim_a = clip_ranges(fragile_sim.get_submodule(name))
        int_w, int_a = clip_ranges(fragile_int.get_submodule(name))
        assert sim_w == pytest.approx(int_w, rel=1e-5) and sim_a == pytest.approx(int_a, rel=1e-5), name
        assert sim_a[0] <= 0 <= sim_a[1] and sim_w[0] == pytest.approx(-sim_w[1])


def test_without_latency_a_note_and_no_chart(trained_cnn, digits_data, tmp_path):
    q = quanta.quantize(trained_cnn, "static_int8", digits_data.calib_batches(1), speed_check=False, progress=False)
    files = quanta.report(trained_cnn, q, digits_data.calib_batches(1), tmp_path / "r.html")
    assert "latency" not in files.images and "latency not measured" in files.html.read_text()
    assert set(files.images) == {"histograms", "sqnr"}


def test_bad_input(trained_cnn, digits_data, tmp_path, monkeypatch):
    batch = digits_data.calib_batches(1)
    with pytest.raises(ValueError, match="must name an .html file"):
        quanta.report(trained_cnn, trained_cnn, batch, tmp_path / "r.png")
    with pytest.raises(TypeError, match="must be a SensitivityReport"):
        quanta.report(trained_cnn, trained_cnn, batch, tmp_path / "r.html", sensitivity={"a": 1})
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        quanta.report(trained_cnn, trained_cnn, batch, tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()
    assert torch.is_tensor(batch[0])
