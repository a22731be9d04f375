"""OpenVINO (+ NNCF post-training quantization) as a peer row, optional (``pip install
'quanta[peers]'`` or ``pip install openvino nncf``; neither pulls torch).

- fp32: ``openvino.convert_model(model, example_input=x)`` (batch 2, so the batch dimension stays
  dynamic), compiled for the CPU plugin with the run's ``INFERENCE_NUM_THREADS``,
  ``PERFORMANCE_HINT=LATENCY`` and one stream. OpenVINO picks its own inference precision
  (``INFERENCE_PRECISION_HINT``: f32 on AVX2/AVX-512 CPUs, bf16 where the CPU has AMX / AVX-512
  BF16); the row names the precision it ran in.
- int8: ``nncf.quantize`` on that OpenVINO model with the same calibration batches every other
  row uses (``ModelType.TRANSFORMER`` for the transformer and speech workloads; NNCF's defaults otherwise,
  which include its fast bias correction), compiled the same way.
Size: the saved IR (``.xml`` + ``.bin``, fp32 weights kept as fp32).
"""

from __future__ import annotations

import logging
import os
import tempfile

import torch
import workloads as W
from methods import PEER, Method, guarded, short_error
from torch import nn


def _versions() -> tuple[str, str]:
    import nncf
    import openvino as ov

    return ov.__version__.split("-")[0], nncf.__version__


def openvino_version() -> str:
    """For the report header: ``openvino X, nncf Y`` or what is missing."""
    try:
        ov_v, nncf_v = _versions()
        return f"openvino {ov_v}, nncf {nncf_v}"
    except Exception:
        return "openvino/nncf not installed"


def _ir_bytes(ov, ov_model, path: str) -> int:
    ov.save_model(ov_model, path, compress_to_fp16=False)
    return os.path.getsize(path) + os.path.getsize(path[:-4] + ".bin")


def cpu_config(threads: int) -> dict:
    """The CPU plugin settings every OpenVINO row (and the per-layer profile) compiles with."""
    return {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}


def convert(wl: W.Workload, model: nn.Module):
    """``openvino.convert_model`` with a batch-2 example (the batch dimension stays dynamic)."""
    import openvino as ov

    example = wl.input(max(2, wl.batches[0]))
    with torch.no_grad():
        return ov.convert_model(model, example_input=example)


def nncf_int8(wl: W.Workload, ov_model, calib: list[torch.Tensor]):
    """``nncf.quantize`` with the run's calibration batches (TRANSFORMER for attention workloads)."""
    try:
        import nncf
    except Exception as e:
        raise RuntimeError(f"nncf not installed: {short_error(e)}") from e
    nncf.set_log_level(logging.ERROR)
    kind = {"model_type": nncf.ModelType.TRANSFORMER} if wl.attention else {}
    data = nncf.Dataset([c.numpy() for c in calib])
    return nncf.quantize(ov_model, data, subset_size=len(calib), **kind)


def openvino_rows(wl: W.Workload, model: nn.Module, calib: list[torch.Tensor], threads: int,
                  workdir: str) -> list[Method]:
    try:
        import openvino as ov
    except Exception as e:
        return [Method("OpenVINO", PEER, error=f"not installed: {short_error(e)}")]
    core = ov.Core()
    config = cpu_config(threads)
    d = tempfile.mkdtemp(prefix=f"{wl.name}_ov_", dir=workdir)
    converted: list = []

    def method(ov_model, name: str, path: str) -> Method:
        compiled = core.compile_model(ov_model, "CPU", config)
        request, output = compiled.create_infer_request(), compiled.output(0)
        hint = compiled.get_property("INFERENCE_PRECISION_HINT")  # an ov.Type: f32 / bf16 / f16
        precision = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
        return Method(name.format(precision=precision), PEER,
                      fn=lambda a: request.infer({0: a}, share_outputs=False)[output],
                      size_bytes=_ir_bytes(ov, ov_model, path), prep=lambda x: x.numpy(), post=torch.from_numpy)

    def build_fp32() -> Method:
        converted.append(convert(wl, model))
        return method(converted[0], "OpenVINO fp32 model (runs in {precision})", os.path.join(d, "fp32.xml"))

    rows = [guarded("OpenVINO fp32 model", PEER, build_fp32)]
    if rows[0].fn is None:
        return rows + [Method("OpenVINO int8 (NNCF)", PEER, error=rows[0].error)]

    def build_int8() -> Method:
        q = nncf_int8(wl, converted[0], calib)
        label = "OpenVINO int8 (nncf.quantize" + (", TRANSFORMER" if wl.attention else "") + ", runs in {precision})"
        return method(q, label, os.path.join(d, "int8.xml"))

    rows.append(guarded("OpenVINO int8 (NNCF)", PEER, build_int8))
    return rows
