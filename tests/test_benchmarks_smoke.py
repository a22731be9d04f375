"""The benchmark harness runs end to end on a tiny workload (one timed round, no compile).

Timing is never asserted here (benchmarks/ measures it); this only proves that the harness
builds every row, writes the Markdown table with its header, and measures accuracy sanely.
The peers are optional extras: without them the tests that need them skip. Also: the accuracy
table's quick mode, the OpenVINO peer rows, and the --busy competitor (started, stopped, never
left behind).
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "benchmarks" / "run.py"
ACCURACY = ROOT / "benchmarks" / "accuracy.py"
if str(ROOT / "benchmarks") not in sys.path:
    sys.path.insert(0, str(ROOT / "benchmarks"))


def _need_peers() -> None:
    pytest.importorskip("torchao", reason="optional peer torchao not installed")
    pytest.importorskip("onnxruntime", reason="optional peer onnxruntime not installed")
    pytest.importorskip("onnx", reason="optional peer onnx not installed")


def _row(text: str, method: str) -> list[str]:
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0].strip("*") == method:
            return cells
    raise AssertionError(f"no row {method!r} in:\n{text}")


@pytest.mark.skipif(not RUN.exists(), reason="benchmarks/ not present")
def test_harness_runs_linear_stack_quick(tmp_path):
    _need_peers()
    out = tmp_path / "results.md"
    env = dict(os.environ, PYTHONWARNINGS="ignore", TQDM_DISABLE="1")
    proc = subprocess.run(
        [sys.executable, str(RUN), "--quick", "--workload", "linear_stack", "--repeats", "1",
         "--threads", "1", "--onnx-exporter", "torchscript", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()

    # header: date, machine, versions
    assert re.search(r"date: \d{4}-\d\d-\d\d \d\d:\d\d UTC", text)
    assert "CPU:" in text and "torch.set_num_threads(1)" in text
    assert "torchao 0." in text and "onnxruntime 1." in text and "quanta " in text
    assert "### linear_stack, batch 1" in text

    # fp32 baseline: a measured time, ratio 1, exact against itself, 4 x 1024 x 1024 fp32 weights
    fp32 = _row(text, "torch fp32 eager")
    assert float(fp32[1]) > 0 and fp32[2] == "1.00×" and fp32[5] == "exact"
    assert fp32[4] == "16.0 MiB"

    # a peer that always works on CPU: int8 ORT is measured, 4x smaller, and accurate where the CPU sums
    # u8 x s8 products in int32 (VNNI); without VNNI its MLAS kernels saturate int16 pair sums (measured
    # here on an AVX2 EPYC: 9.5 dB), which the table shows as it is
    from quanta.kernels.u8s8_saturation import cpu_vnni_features

    ort = _row(text, "onnxruntime quantize_dynamic int8")
    assert float(ort[1]) > 0 and ort[4] == "4.0 MiB" and float(ort[5]) > (25 if cpu_vnni_features() else 0)

    # every quanta row is present: measured, or saying why not (API still in flux)
    for preset in ("quanta dynamic_int8", "quanta weight_only_int8"):
        row = _row(text, preset)
        assert re.match(r"[\d.]+$", row[1]) or row[1].startswith(("not available", "failed")), row
    # compile rows are skipped in --quick, as rows
    assert _row(text, "quanta dynamic_int8 + compile")[1].startswith(("skipped", "not available"))

    # OpenVINO rows: measured where installed, else one row saying so
    try:
        import nncf  # noqa: F401
        import openvino  # noqa: F401
    except ImportError:
        assert _row(text, "OpenVINO")[1].startswith("not installed")
    else:
        assert "openvino 20" in text and "INFERENCE_NUM_THREADS=1" in text
        ov_int8 = _row(text, "OpenVINO int8 (nncf.quantize, runs in f32)" if "runs in f32" in text
                       else next(ln.split("|")[1].strip() for ln in text.splitlines() if "OpenVINO int8" in ln))
        assert float(ov_int8[1]) > 0 and float(ov_int8[5]) > (20 if cpu_vnni_features() else 0)  # (12.7 dB on AVX2)


@pytest.mark.skipif(not ACCURACY.exists(), reason="benchmarks/ not present")
def test_accuracy_table_quick(tmp_path):
    pytest.importorskip("sklearn", reason="the digits data needs scikit-learn")
    out = tmp_path / "accuracy.md"
    env = dict(os.environ, PYTHONWARNINGS="ignore", TQDM_DISABLE="1")
    proc = subprocess.run([sys.executable, str(ACCURACY), "--quick", "--cache-dir", str(tmp_path / "cache"),
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    assert re.search(r"date: \d{4}-\d\d-\d\d \d\d:\d\d UTC", text) and "CPU:" in text
    assert "command: `python benchmarks/accuracy.py --quick" in text and "### mobilenet_v2 on digits 16×16" in text
    fp32 = _row(text, "fp32")
    assert float(fp32[1]) > 50 and fp32[3] == "100.00" and fp32[4] == "exact"  # it learned; agrees with itself
    int8 = _row(text, "static_int8 (W8 per-channel, A8)")
    # the integer model: every layer lowered, close to fp32 (a wrong scale or axis would not be)
    # (17 convs/linears and the 3 plain `x + y` residual additions, integer since prepare rewrites them)
    assert float(int8[3]) >= 90 and float(int8[4]) > 25 and int8[7] == "20/20", int8
    assert float(int8[5]) >= 0 and float(int8[6]) >= 0
    dfq = _row(text, "&nbsp;&nbsp;+ cle + high_bias_absorption + bias_correction")
    assert re.match(r"[+-]\d+\.\d\d \(±\d+\.\d\d, (within noise|clear)\)$", dfq[2]), dfq
    ada = _row(text, "&nbsp;&nbsp;+ adaround")
    assert re.match(r"[\d.]+$", ada[1]), ada


def test_busy_competitor_spins_and_is_stopped():
    import busy

    with busy.competitor() as pid:
        assert pid is not None and os.path.exists(f"/proc/{pid}")
        assert _cpu_ticks(pid, after=0.3) > 0  # it really competes for a core
    assert not os.path.exists(f"/proc/{pid}")
    with busy.competitor(enabled=False) as none:
        assert none is None


def test_busy_competitor_exits_when_the_benchmark_is_killed():
    """A benchmark killed without cleanup (os._exit, SIGKILL) leaves no spinning process behind."""
    code = ("import os, sys; sys.path.insert(0, sys.argv[1]); import busy; "
            "cm = busy.competitor(); print(cm.__enter__(), flush=True); os._exit(0)")
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT / "benchmarks")], capture_output=True, text=True,
                          timeout=60)
    pid = int(proc.stdout.strip())
    import time
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # an exited child not yet reaped is gone
    except OSError:
        return False


def _cpu_ticks(pid: int, after: float) -> int:
    import time
    time.sleep(after)
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().split(")")[-1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def test_openvino_rows_on_a_small_cnn(tmp_path):
    pytest.importorskip("openvino", reason="optional peer openvino not installed")
    pytest.importorskip("nncf", reason="optional peer nncf not installed")
    import peers_openvino
    import torch
    import workloads as W
    from torch import nn

    wl = W.Workload("tiny_cnn", "cnn", lambda: nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 256)), lambda b: (b, 3, 16, 16), [1, 3])
    model = wl.model()
    fp32, int8 = peers_openvino.openvino_rows(wl, model, wl.calib_data(), threads=1, workdir=str(tmp_path))
    assert fp32.fn is not None and int8.fn is not None, (fp32.error, int8.error)
    assert re.match(r"OpenVINO fp32 model \(runs in (f32|bf16|f16)\)$", fp32.name)
    assert int8.name.startswith("OpenVINO int8 (nncf.quantize, runs in")
    assert int8.size_bytes < 0.5 * fp32.size_bytes  # int8 weights (IR .xml + .bin)
    for batch in wl.batches:  # the batch dimension stays dynamic
        x = wl.input(batch)
        with torch.no_grad():
            ref = model(x)
        for m, min_db in ((fp32, 40 if "bf16" in fp32.name else 80), (int8, 20)):
            y = m.post(m.fn(m.prep(x.clone())))
            assert y.shape == ref.shape
            snr = 10 * torch.log10(ref.pow(2).sum() / (ref - y).pow(2).sum()).item()
            assert snr > min_db, (m.name, batch, snr)


@pytest.mark.skipif(not RUN.exists(), reason="benchmarks/ not present")
def test_real_model_workloads_with_a_methods_filter(tmp_path):
    """The real-model-shaped workloads run end to end; ``--methods fp32,quanta`` builds only those rows."""
    out = tmp_path / "real.md"
    env = dict(os.environ, PYTHONWARNINGS="ignore", TQDM_DISABLE="1")
    proc = subprocess.run(
        [sys.executable, str(RUN), "--quick", "--workload", "tf_mobile", "--workload", "sentence_encoder",
         "--workload", "speech_encoder", "--methods", "fp32,quanta", "--repeats", "1", "--threads", "1",
         "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    for title in ("tf_mobile, batch 1", "sentence_encoder, batch 2", "speech_encoder, batch 1"):
        assert f"### {title}" in text
    fp32 = _row(text, "torch fp32 eager")
    assert float(fp32[1]) > 0 and fp32[5] == "exact"
    from quanta.kernels.u8s8_saturation import cpu_vnni_features

    seven_bit = [] if cpu_vnni_features() else ["quanta static_int8 weight_bits=7"]  # oneDNN-exact codes
    for method in ["quanta static_int8", "quanta dynamic_int8", *seven_bit]:
        row = _row(text, method)
        assert re.match(r"[\d.]+$", row[1]) and (row[5] == "exact" or float(row[5]) > 25), row
    for peer in ("torch.ao", "torchao", "pt2e", "onnxruntime", "OpenVINO"):  # filtered out: not built at all
        assert peer not in text.split("- total wall time")[1], peer
    assert "built torch.ao" not in proc.stdout and "built openvino" not in proc.stdout


def test_methods_filter_rejects_an_unknown_family_on_one_line(capsys):
    import run

    assert run.parse_methods("fp32, quanta,openvino,quanta") == ("fp32", "quanta", "openvino")
    with pytest.raises(Exception, match=r"unknown method family 'ort'; choose from fp32,quanta,torch.ao"):
        run.parse_methods("fp32,ort")
    with pytest.raises(SystemExit) as exit_info:
        run.main(["--quick", "--methods", "fp32,bogus"])
    assert exit_info.value.code == 2
    assert "unknown method family 'bogus'" in capsys.readouterr().err.splitlines()[-1]


def test_tf_mobile_convs_pad_like_tensorflow_and_all_become_integer():
    """Each TF-style conv subclass computes "same" padding (asymmetric at stride 2) and quanta lowers
    all 52 of them to integer convs, BatchNorm folded (the conversion report says so)."""
    import torch
    import workloads as W
    import workloads_real as R
    from torch import nn

    conv = R.Conv2dSameFunctional(4, 4, 3, stride=2, groups=4)
    x = torch.randn(1, 4, 8, 8)
    plain = nn.functional.conv2d(nn.functional.pad(x, (0, 1, 0, 1)), conv.weight, None, 2, 0, 1, 4)
    assert torch.equal(conv(x), plain) and conv(x).shape[-1] == 4  # TF: ceil(8 / 2)
    assert R.Conv2dSamePad(4, 4, 3)(x).shape == x.shape

    quanta = pytest.importorskip("quanta")
    wl = W.workloads(quick=True)["tf_mobile"]
    model = wl.model()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 52 and all(type(m) is not nn.Conv2d for m in convs) and W.has_conv_subclass(model)
    # (lowering, not speed: on a CPU without VNNI the speed check would put the 8-bit chain back to float)
    q = quanta.quantize(copy.deepcopy(model), "static_int8", calib_data=wl.calib_data()[:1], speed_check=False)
    results = {r.name: r.result for r in quanta.conversion_report(q)}
    conv_results = [v for k, v in results.items() if k.startswith("features.") and not k.endswith(".residual_add")]
    assert len(conv_results) == 52 and all(v in ("Int8Conv2d", "Int8PaddedConv2d") for v in conv_results), results
    # its plain `x + self.block(x)` additions: integer additions (quanta.transforms.residual_adds)
    assert [v for k, v in results.items() if k.endswith(".residual_add")] == ["Int8Add"] * 10, results
    assert not any(isinstance(m, nn.BatchNorm2d) for m in q.modules())
