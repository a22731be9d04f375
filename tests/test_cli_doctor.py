"""`quanta doctor`: the native library's file and key, the CPU's features, every kernel op's
implementations and which of them fall back."""

from __future__ import annotations

import json

from quanta.cli import main
from quanta.kernels import build_config, native
from quanta.kernels.doctor import diagnose, kernel_ops


def test_doctor_names_the_library_the_cpu_and_every_op(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    info = native.info()
    assert f"native library: {info.status}" in out
    assert f"build key: {info.key}" in out and info.cache_dir in out
    if native.ready():
        assert f"file: {info.path} ({info.origin})" in out
    features = build_config.cpu_features()
    cpu_line = next(line for line in out.splitlines() if line.startswith("CPU: "))
    assert all(f in cpu_line for f in features)
    if "avx512_vnni" not in features and build_config.march():
        assert "lacks: " in cpu_line and "avx512_vnni" in cpu_line.partition("lacks: ")[2]
    ops = kernel_ops()
    assert {op.name for op in ops} >= {"int8_linear", "int8_conv", "quantize_activation", "dynamic_int8_rnn",
                                       "int4_weight_only_linear"}
    for op in ops:
        line = next(line for line in out.splitlines() if line.strip().startswith(op.name + " "))
        assert line.rstrip().endswith("reference")
        assert all(impl.name in line for impl in op.impls)


def test_doctor_says_which_implementations_fall_back():
    report = diagnose()
    by_name = {op.name: {i.name: i for i in op.impls} for op in report.ops}
    linear = by_name["int8_linear"]
    assert linear["reference"].available
    cuda = linear["cuda_int_mm"]
    assert not cuda.available and "cuda only" in cuda.why_not
    native_impl = by_name["quantize_activation"]["native"]
    assert native_impl.available == native.ready()
    if not native.ready():
        assert native_impl.why_not == "native library not loaded"
    if report.native_vnni is False:  # the VNNI kernels are named as falling back, with the reason
        assert not linear["gemm_native"].available and "AVX-512 VNNI" in linear["gemm_native"].why_not
    if report.native_gemv_isa == "none":  # the gemv needs VNNI or AVX2
        assert not linear["gemv_native"].available and "AVX2" in linear["gemv_native"].why_not
    elif report.native_gemv_isa:
        assert linear["gemv_native"].available


def test_doctor_json(capsys):
    assert main(["doctor", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["native"]["key"] == build_config.build_key(__import__("torch").__version__)
    assert any(op["name"] == "int8_linear" for op in data["ops"])


def test_doctor_build_flag_parses():
    from quanta.cli import build_parser
    args = build_parser().parse_args(["doctor", "--build", "--json"])
    assert args.command == "doctor" and args.build and args.json


def test_doctor_states_the_thread_count_and_openmp_wait_policy(monkeypatch, capsys):
    import torch

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert main(["doctor"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("threads: "))
    assert line.startswith(f"threads: {torch.get_num_threads()} (torch.get_num_threads)")
    assert "OMP_WAIT_POLICY unset" in line and "OMP_WAIT_POLICY=PASSIVE" in line
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    report = diagnose()
    assert report.threads["omp_wait_policy"] == "PASSIVE" and str(report).count("OMP_WAIT_POLICY=PASSIVE") == 1
