"""One int8 Linear at transformer shapes, broken down: quanta's pieces (input quantization, the
GEMM, the epilogue, Python overhead) beside torch fp32 ``F.linear`` and ONNX Runtime's
``DynamicQuantizeLinear`` + ``MatMulInteger`` (+ the float rescale) as a tiny graph.

    python benchmarks/linear_breakdown.py --threads 2
    python benchmarks/linear_breakdown.py --threads 1 --shapes 128x384x384

Every row is timed in interleaved rounds (each configuration once per round, median of rounds),
7-bit weights (|code| <= 64), static per-tensor uint8 activations as quanta's static_int8 preset
makes them. Milliseconds per call.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _time(fn, reps: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps * 1e3


def _ort_session(k: int, n: int, w: torch.Tensor, threads: int):
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    wt = numpy_helper.from_array(w.t().contiguous().numpy().astype(np.int8), "w")
    wz = numpy_helper.from_array(np.zeros((), np.int8), "wz")
    ws = numpy_helper.from_array(np.full((n,), 0.01, np.float32), "ws")
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
             helper.make_node("MatMulInteger", ["xq", "w", "xz", "wz"], ["acc"]),
             helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["xs", "ws"], ["s"]),
             helper.make_node("Mul", ["accf", "s"], ["y"])]
    graph = helper.make_graph(nodes, "lin", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])], [wt, wz, ws])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _configurations(m, k, n, threads, lib, qlinear, onednn_prepack, linear_avx2) -> dict:
    """The timed callables for one [m, k] x [k, n] shape."""
    torch.manual_seed(0)
    x = torch.randn(m, k)
    w = torch.randint(-64, 65, (n, k), dtype=torch.int8)
    wf, bias, w_scale = torch.randn(n, k), torch.randn(n), torch.rand(n) * 0.01
    scale, zp = 0.05, 128
    packed = onednn_prepack(w)
    w_sum = w.sum(1, dtype=torch.int32)
    zeros = torch.zeros(n, dtype=torch.int32)
    codes = lib.quantize_static(x, 1 / scale, zp, 0, 255, False)
    ap = linear_avx2.avx2_pack(w) if linear_avx2.avx2_gemm_available() else None
    s_t = torch.tensor([scale])
    run = {
        "torch fp32 F.linear": lambda: torch.nn.functional.linear(x, wf, bias),
        "quantize_static (input pass)": lambda: lib.quantize_static(x, 1 / scale, zp, 0, 255, False),
        "oneDNN qlinear on codes (GEMM+epilogue)": lambda: qlinear(codes, scale, zp, packed, w_scale, zeros, bias,
                                                                  1.0, 0, torch.float32, "none", [], ""),
        "quanta settled oneDNN (quantize+qlinear)": lambda: qlinear(
            lib.quantize_static(x, 1 / scale, zp, 0, 255, False), scale, zp, packed, w_scale, zeros, bias,
            1.0, 0, torch.float32, "none", [], ""),
        "output alloc torch.empty [M,N]": lambda: torch.empty(m, n),
        "epilogue-only (rescale_rows)": lambda: lib.rescale_rows(
            torch.zeros(m, n, dtype=torch.int32), torch.tensor([zp], dtype=torch.int32), w_sum, s_t, w_scale, bias),
    }
    if ap is not None:
        from quanta.core import QuantSpec
        from quanta.integer.linear import Int8Linear
        mod = Int8Linear(k, n, act_spec=QuantSpec(bits=8, signed=False, symmetric=False), weight_bits=7)
        mod.weight.copy_(w)
        mod.weight_scale.copy_(w_scale)
        mod.bias.copy_(bias)
        mod.input_scale.fill_(scale)
        mod.input_zero_point.fill_(zp)
        mod.pack()
        mod(x)  # (settles)
        run["Int8Linear module call (settled avx2_gemm)"] = lambda: mod(x)
        run["avx2_gemm on codes"] = lambda: lib.int8_linear_avx2(codes, torch.tensor([zp], dtype=torch.int32), s_t,
                                                                ap, w_sum, w_scale, bias)
        run["avx2_gemm fused quantize"] = lambda: lib.quantized_linear_avx2(x, 1 / scale, zp, 0, 255, s_t, ap, w_sum,
                                                                           w_scale, bias)
    try:
        sess = _ort_session(k, n, w, threads)
        xn = x.numpy()
        run["ORT DynQuant+MatMulInteger+rescale"] = lambda: sess.run(None, {"x": xn})
    except ImportError:
        pass
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--shapes", nargs="*", default=["128x384x384", "128x384x1536", "128x1536x384"])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--reps", type=int, default=20)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from quanta.kernels import linear_avx2, native
    from quanta.kernels.linear_onednn import onednn_prepack
    native.ensure()
    lib = native.module()
    qlinear = torch.ops.onednn.qlinear_pointwise
    for shape in a.shapes:
        m, k, n = map(int, shape.split("x"))
        run = _configurations(m, k, n, a.threads, lib, qlinear, onednn_prepack, linear_avx2)
        times: dict[str, list[float]] = {name: [] for name in run}
        for _ in range(a.rounds):
            for name, fn in run.items():
                times[name].append(_time(fn, a.reps))
        print(f"\n### [{m},{k}] x [{k},{n}], {a.threads} thread(s): ms per call (median of {a.rounds} rounds)")
        print("| piece | ms |\n| --- | ---: |")
        for name, ts in times.items():
            print(f"| {name} | {statistics.median(ts):.4f} |")


if __name__ == "__main__":
    main()
