"""A/B of the 7-bit Linear kernel inside whole models, in one process: the same converted model
(``static_int8 weight_bits=7``, speed check off) with its Int8Linears on quanta's ``avx2_gemm``
(this branch's default on AVX2 without VNNI) and on settled oneDNN (what ``impl="auto"`` ran
before), beside torch fp32, timed in interleaved rounds (median ms per call; ratio = oneDNN / avx2).

    python benchmarks/linear_ab.py --threads 2 --rounds 15
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch


def _timed(fn, x) -> float:
    t = time.perf_counter()
    fn(x)
    return (time.perf_counter() - t) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--workload", action="append", default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    import workloads as W

    import quanta
    import quanta.integer.linear as IL
    from quanta.integer.linear import Int8Linear
    for name in a.workload or ["sentence_encoder", "speech_encoder"]:
        wl = W.workloads()[name]
        model = wl.model()
        q = quanta.quantize(copy.deepcopy(model), quanta.preset("static_int8", weight_bits=7),
                            calib_data=wl.calib_data(), speed_check=False, progress=False).eval()
        onednn = copy.deepcopy(q)
        real = IL.avx2_auto_pack
        IL.avx2_auto_pack = lambda w: None  # (the module packs for oneDNN, as before avx2_gemm)
        try:
            for m in onednn.modules():
                if isinstance(m, Int8Linear):  # (built now, while the patch holds; settled by its first call)
                    m.forget_settled()
                    m._stale = True
                    m.ensure_packed()
        finally:
            IL.avx2_auto_pack = real
        for batch in wl.batches:
            x = wl.input(batch)
            runs = {"torch fp32": model, "quanta w7 oneDNN (before)": onednn, "quanta w7 avx2_gemm (after)": q}
            with torch.inference_mode():
                for fn in runs.values():
                    fn(x), fn(x)
                same = torch.equal(q(x), q(x))
                times: dict[str, list[float]] = {k: [] for k in runs}
                for _ in range(a.rounds):
                    for k, fn in runs.items():
                        times[k].append(_timed(fn, x))
            kernels = sorted({i for m in q.modules() if isinstance(m, Int8Linear) for i in m.kernel_counts})
            old = sorted({i for m in onednn.modules() if isinstance(m, Int8Linear) for i in m.kernel_counts})
            med = {k: statistics.median(v) for k, v in times.items()}
            print(f"\n### {name}, batch {batch}, {a.threads} threads, {a.rounds} interleaved rounds "
                  f"(after: {kernels}, before: {old}, repeatable: {same})")
            print("| method | median ms |\n| --- | ---: |")
            for k, v in med.items():
                print(f"| {k} | {v:.2f} |")
            print(f"| before / after | {med['quanta w7 oneDNN (before)'] / med['quanta w7 avx2_gemm (after)']:.3f}x |")


if __name__ == "__main__":
    main()
