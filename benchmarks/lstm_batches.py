"""The benchmark's LSTM (2 layers, input 512, hidden 512, seq 64) at several batch sizes: fp32
against ``quanta.quantize(..., "dynamic_int8")`` (the native time loop at every batch without
VNNI), timed side by side in shuffled rounds; optionally the kernel that ran above 8 sequences
before the native loop took any batch (``--fallback``: the Python ``int_mm`` loop for signed
symmetric activations, else the reference loop) and 1 vs 2 threads.

    python benchmarks/lstm_batches.py --batches 1,8,32 --threads 2
    python benchmarks/lstm_batches.py --batches 8 --threads 1,2 --fallback

Prints one line per (batch, threads): median ms per method, quanta's speedup over fp32, the
kernels that ran (``kernel_counts``) and the output SQNR against fp32.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import interleaved, median_ms
from workloads import LSTMModel

import quanta
from quanta.kernels import recurrent as R
from quanta.kernels.gemv_rows import gemv_isa


def sqnr_db(ref: torch.Tensor, got: torch.Tensor) -> float:
    noise = (ref - got).pow(2).mean()
    return float(10 * torch.log10(ref.pow(2).mean() / noise.clamp_min(1e-30)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes")
    ap.add_argument("--threads", default="2", help="comma-separated thread counts")
    ap.add_argument("--fallback", action="store_true", help="also time the old fallback above 8 sequences (slow)")
    ap.add_argument("--min-seconds", type=float, default=1.0, help="measured seconds per method")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = LSTMModel().eval()
    q = quanta.quantize(model, "dynamic_int8", progress=False)
    slow = copy.deepcopy(q)
    bits, signed, symmetric, _ = q.lstm._act_args()
    slow.lstm.impl = "int_mm" if R._int_mm_guard_act(bits, signed, symmetric) is None else "reference"
    slow.lstm.pack()
    print(f"gemv loop: {gemv_isa()}; torch {torch.__version__}")
    for batch in (int(b) for b in args.batches.split(",")):
        x = torch.randn(batch, 64, 512)
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            q.lstm.kernel_counts.clear()
            fns = {"fp32": lambda x=x: model(x), "quanta": lambda x=x: q(x)}
            if args.fallback:
                fns[slow.lstm.impl] = lambda x=x: slow(x)
            with torch.no_grad():
                samples, errors = interleaved(fns, min_seconds=args.min_seconds, min_rounds=5)
                quality = sqnr_db(model(x), q(x))
            ms = {k: median_ms(v) for k, v in samples.items()}
            cells = " ".join(f"{k} {v:.2f} ms" for k, v in ms.items())
            print(f"batch {batch:3d} threads {threads}: {cells} | fp32/quanta {ms['fp32'] / ms['quanta']:.2f}x | "
                  f"SQNR {quality:.1f} dB | kernels {dict(q.lstm.kernel_counts)} {errors or ''}", flush=True)


if __name__ == "__main__":
    main()
