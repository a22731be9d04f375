"""Peer quantization flows run side by side with quanta. All of them are optional extras.

Each builder returns `Method` rows; a flow that is not installed or fails to build becomes a
row saying why (``guarded``). The exact APIs are the ones that work on torch 2.13 / torchao
0.18 / onnxruntime 1.31 on an x86 CPU; see benchmarks/README.md for what failed and why.
"""

from __future__ import annotations

import copy
import os
import tempfile
import warnings

import torch
import workloads as W
from methods import PEER, Method, Skipped, compile_model, guarded, short_error, state_dict_bytes
from torch import nn


# ---------------------------------------------------------------- torch.ao eager mode
def torch_ao(wl: W.Workload, model: nn.Module, calib: list[torch.Tensor]) -> list[Method]:
    import torch.ao.quantization as tq

    if wl.kind == "cnn" and W.has_conv_subclass(model):
        return [guarded("torch.ao FX static int8 (x86)", PEER, lambda: _torch_ao_fx(model, calib))]
    if wl.kind == "cnn":
        def build() -> Method:
            torch.backends.quantized.engine = "x86"
            q = W.qready_cnn(model)
            tq.fuse_modules(q, W.fuse_patterns(q), inplace=True)
            q = tq.QuantWrapper(q)
            q.qconfig = tq.get_default_qconfig("x86")
            tq.prepare(q, inplace=True)
            with torch.no_grad():
                for c in calib:
                    q(c)
            tq.convert(q, inplace=True)
            return Method("torch.ao eager static int8 (x86)", PEER, fn=q, size_bytes=state_dict_bytes(q))
        return [guarded("torch.ao eager static int8 (x86)", PEER, build)]

    def build_dyn() -> Method:
        torch.backends.quantized.engine = "x86"
        q = tq.quantize_dynamic(copy.deepcopy(model), {nn.Linear, nn.LSTM}, dtype=torch.qint8)
        if any(isinstance(m, nn.TransformerEncoderLayer) for m in q.modules()):
            # The layer's fused fast path reads ``linear1.weight.device``; a dynamic quantized Linear's
            # ``weight`` is a method, so it fails. Users switch the fast path off around the call.
            return Method("torch.ao quantize_dynamic int8", PEER, fn=_without_mha_fastpath(q),
                          size_bytes=state_dict_bytes(q),
                          notes=["torch.ao: nn.TransformerEncoderLayer's fast path switched off around each call "
                                 "(it fails on dynamic quantized Linears)"])
        return Method("torch.ao quantize_dynamic int8", PEER, fn=q, size_bytes=state_dict_bytes(q))
    return [guarded("torch.ao quantize_dynamic int8", PEER, build_dyn)]


def _without_mha_fastpath(model: nn.Module):
    def run(x: torch.Tensor) -> torch.Tensor:
        was = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            return model(x)
        finally:
            torch.backends.mha.set_fastpath_enabled(was)
    return run


def _torch_ao_fx(model: nn.Module, calib: list[torch.Tensor]) -> Method:
    """torch.ao FX graph mode (x86 qconfig mapping): eager mode swaps modules by exact type and
    cannot quantize ``nn.Conv2d`` subclasses; FX traces through their ``forward`` (pad, then
    ``F.conv2d``) and quantizes the functional convs and ``x + y`` adds."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"), (calib[0],))
        with torch.no_grad():
            for c in calib:
                p(c)
        q = convert_fx(p)
    return Method("torch.ao FX static int8 (x86)", PEER, fn=q, size_bytes=state_dict_bytes(q),
                  notes=["torch.ao eager mode cannot swap Conv2d subclasses; FX graph mode used"])


# ---------------------------------------------------------------- torchao quantize_
def _torchao_configs(kind: str) -> list[tuple[str, object]]:
    from torchao.quantization import (
        Int4WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        IntxWeightOnlyConfig,
    )
    from torchao.quantization.granularity import PerGroup

    cfgs = [("Int8DynamicActivationInt8WeightConfig()", Int8DynamicActivationInt8WeightConfig(set_inductor_config=False))]
    if kind == "linear":
        cfgs += [
            ("Int8WeightOnlyConfig()", Int8WeightOnlyConfig(set_inductor_config=False)),
            # Every Int4WeightOnlyConfig packing format needs CUDA/XPU/mslk in 0.18; kept so the
            # table says so. IntxWeightOnlyConfig(int4, group 128) is the CPU int4 path.
            ("Int4WeightOnlyConfig(group_size=128)", Int4WeightOnlyConfig(group_size=128, set_inductor_config=False)),
            ("IntxWeightOnlyConfig(int4, PerGroup(128))",
             IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(128))),
        ]
    return cfgs


def torchao_rows(wl: W.Workload, model: nn.Module) -> list[Method]:
    if not (wl.attention or wl.kind == "linear"):
        return []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.quantization import quantize_
            cfgs = _torchao_configs(wl.kind)
    except Exception as e:
        return [Method("torchao quantize_", PEER, error=f"not installed: {short_error(e)}")]
    rows = []
    for label, cfg in cfgs:
        name = f"torchao {label}"

        def build(cfg=cfg, name=name) -> Method:
            q = copy.deepcopy(model)
            quantize_(q, cfg)
            x = wl.input(1)
            with torch.inference_mode():
                q(x)  # surface unsupported-device errors at build time
            return Method(name, PEER, fn=q, size_bytes=state_dict_bytes(q))

        eager = guarded(name, PEER, build)
        rows.append(eager)
        if eager.fn is None:
            rows.append(Method(name + " + compile", PEER, error=eager.error))
        else:
            rows.append(guarded(name + " + compile", PEER, lambda e=eager: Method(
                e.name + " + compile", PEER, fn=compile_model(e.fn), size_bytes=e.size_bytes)))
    return rows


# ---------------------------------------------------------------- PT2E x86 inductor flow
def pt2e_x86(wl: W.Workload, model: nn.Module, calib: list[torch.Tensor]) -> list[Method]:
    """torch.export -> X86InductorQuantizer -> prepare_pt2e -> calibrate -> convert_pt2e ->
    torch.compile (inductor freezing on). torch.export specializes the batch size, so this
    exports, calibrates and converts once per benchmarked batch size, at build time."""
    if wl.kind != "cnn" and not wl.attention:
        return []
    dynamic = wl.attention
    name = f"pt2e X86InductorQuantizer {'dynamic' if dynamic else 'static'} int8 + compile"

    def build() -> Method:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        cache: dict[tuple, nn.Module] = {}
        sizes: list[int] = []

        def make(x: torch.Tensor) -> nn.Module:
            compile_model(lambda: None)  # skip early when compile rows are off
            ep = torch.export.export(copy.deepcopy(model), (x,)).module()
            qz = xiq.X86InductorQuantizer()
            qz.set_global(xiq.get_default_x86_inductor_quantization_config(is_dynamic=dynamic))
            p = prepare_pt2e(ep, qz)
            with torch.no_grad():
                for c in calib:  # the exported graph is specialized to x's batch size
                    reps = -(-x.shape[0] // c.shape[0])
                    p(c.repeat(reps, *([1] * (c.dim() - 1)))[: x.shape[0]])
            conv = convert_pt2e(p)
            sizes.append(state_dict_bytes(conv))
            return compile_model(conv)

        def run(x: torch.Tensor) -> torch.Tensor:
            key = tuple(x.shape)
            if key not in cache:
                cache[key] = make(x)
            return cache[key](x)

        for b in wl.batches:  # export per batch size now, outside the timed/inference-mode region
            cache[tuple(wl.input_shape(b))] = make(wl.input(b))
        return Method(name, PEER, fn=run, size_bytes=sizes[0])

    return [guarded(name, PEER, build)]


# ---------------------------------------------------------------- ONNX Runtime
EXPORTER = {"prefer": "auto"}  # "auto" | "dynamo" | "torchscript" (run.py --onnx-exporter)


def _onnx_export(model: nn.Module, x: torch.Tensor, path: str, legacy: bool = False) -> str:
    """torch.onnx.export with the dynamo exporter, falling back to the TorchScript one.

    ``legacy`` goes straight to the TorchScript exporter: for nn.LSTM the dynamo exporter
    slices/concats the weights inside the graph, so ORT's quantize_dynamic cannot find them
    as initializers and leaves the LSTM in fp32; the TorchScript export gives a plain ONNX
    LSTM op that becomes DynamicQuantizeLSTM."""
    try:
        if EXPORTER["prefer"] == "torchscript" or (legacy and EXPORTER["prefer"] == "auto"):
            raise Skipped("TorchScript exporter requested")
        torch.onnx.export(model, (x,), path, dynamo=True, input_names=["x"], output_names=["y"],
                          dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=1024)}},
                          external_data=False, verbose=False)
        return "dynamo"
    except Exception:
        if EXPORTER["prefer"] == "dynamo":
            raise
        torch.onnx.export(model, (x,), path, dynamo=False, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=17)
        return "torchscript"


def _file_bytes(path: str) -> int:
    d, base = os.path.split(path)
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.startswith(base))


def ort_rows(wl: W.Workload, model: nn.Module, calib: list[torch.Tensor], threads: int, workdir: str) -> list[Method]:
    try:
        import onnxruntime as ort
        from onnxruntime.quantization import (
            CalibrationDataReader,
            QuantFormat,
            QuantType,
            quantize_dynamic,
            quantize_static,
        )
    except Exception as e:
        return [Method("onnxruntime", PEER, error=f"not installed: {short_error(e)}")]
    d = tempfile.mkdtemp(prefix=f"{wl.name}_", dir=workdir)
    fp32_path, int8_path = os.path.join(d, "fp32.onnx"), os.path.join(d, "int8.onnx")
    exporter: list[str] = []

    def session(path: str, name: str) -> Method:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        # ORT's pool spins after each run by default, stealing the cores from whichever method the
        # interleaved round-robin times next (measured: quanta's linear-stack row 5 ms alone,
        # 17 ms right after an ORT row). Every method gets the cores to itself this way.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        return Method(name, PEER, fn=lambda a: s.run(None, {"x": a})[0], size_bytes=_file_bytes(path),
                      prep=lambda x: x.numpy(), post=torch.from_numpy)

    def build_fp32() -> Method:
        ex = wl.input(max(2, wl.batches[0]))  # batch 2 keeps the batch dim symbolic
        exporter.append(_onnx_export(model, ex, fp32_path, legacy=wl.kind == "rnn"))
        m = session(fp32_path, f"onnxruntime fp32 ({exporter[0]} export)")
        return m

    rows = [guarded("onnxruntime fp32", PEER, build_fp32)]
    if rows[0].fn is None:
        return rows + [Method("onnxruntime int8", PEER, error=rows[0].error)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"x": c.numpy()} for c in calib])

        def get_next(self):
            return next(self.it, None)

    if wl.kind == "cnn":
        name = "onnxruntime quantize_static int8 (QDQ, per-channel)"

        def build_int8() -> Method:
            src = fp32_path
            try:  # ORT's recommended pre-processing (shape inference, graph optimization)
                from onnxruntime.quantization.shape_inference import quant_pre_process
                src = os.path.join(d, "fp32_pre.onnx")
                quant_pre_process(fp32_path, src)
            except Exception:
                src = fp32_path
            quantize_static(src, int8_path, Reader(), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
            return session(int8_path, name)
    else:
        name = "onnxruntime quantize_dynamic int8"

        def build_int8() -> Method:
            quantize_dynamic(fp32_path, int8_path, weight_type=QuantType.QInt8)
            return session(int8_path, name)
    rows.append(guarded(name, PEER, build_int8))
    return rows
