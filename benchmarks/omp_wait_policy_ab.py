"""quanta with OpenMP's default wait policy vs ``OMP_WAIT_POLICY=PASSIVE`` vs OpenVINO int8, interleaved.

PyTorch's CPU threads are OpenMP's: a thread done with its share of a parallel loop spins at the
barrier before it sleeps, and OpenMP reads the policy once, when the library loads, so it can only
be set in the environment of a new process. On a machine shared with other busy processes a spinning
thread takes a core the lagging thread of the same loop needs; OpenVINO's TBB threads are not
affected. Each variant runs in its own long-lived process (the quanta model is built and calibrated
once, saved, and loaded by the other quanta process: the same codes; the script checks the outputs
are equal), and the processes take turns call by call, in rotating order, so that they see the
same load. Prints the median ms per call of each and the ratios.

    python benchmarks/omp_wait_policy_ab.py --batch 16 --threads 2 --rounds 21
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = {"quanta": {}, "quanta OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"}, "openvino": {}}


def serve(kind: str, workload: str, batch: int, threads: int, saved: str, build: bool) -> None:
    """A child: build (or load) the model, print ``ready``, then one timed call per stdin line."""
    sys.path.insert(0, HERE)
    warnings.filterwarnings("ignore")
    import torch
    import workloads as W

    torch.set_num_threads(threads)
    wl = W.workloads()[workload]
    model, x = wl.model(), wl.input(batch)
    if kind == "openvino":
        import openvino as ov
        import peers_openvino as P

        compiled = ov.Core().compile_model(P.nncf_int8(wl, P.convert(wl, model), wl.calib_data()), "CPU",
                                           P.cpu_config(threads))
        request, a = compiled.create_infer_request(), x.numpy()

        def call() -> object:
            return request.infer({0: a})
    else:
        from profile_layers import quanta_model

        import quanta

        if build:
            q = quanta_model(wl, model, x, 7, "static_int8")[1]
            quanta.save(q, saved)
        else:
            q = quanta.load(saved, model=wl.model).eval()

        def call() -> object:
            with torch.inference_mode():
                return q(x)
        torch.save(call(), f"{saved}.{int(build)}.pt")
    call()
    print("ready", flush=True)
    for _ in sys.stdin:
        t0 = time.perf_counter()
        call()
        print(f"{(time.perf_counter() - t0) * 1e3:.3f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default="resnet18")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--serve", help=argparse.SUPPRESS)  # (child mode: quanta-build, quanta-load, openvino)
    ap.add_argument("--saved", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.batch < 1 or a.threads < 1 or a.rounds < 1:
        ap.error("--batch, --threads and --rounds must be positive")
    if a.serve:
        serve(a.serve.split("-")[0], a.workload, a.batch, a.threads, a.saved, a.serve == "quanta-build")
        return 0
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        saved = os.path.join(tmp, "model.safetensors")
        procs = {}
        for i, (name, extra) in enumerate(VARIANTS.items()):
            mode = "openvino" if name == "openvino" else ("quanta-build" if i == 0 else "quanta-load")
            procs[name] = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--serve", mode, "--saved", saved, "--workload",
                 a.workload, "--batch", str(a.batch), "--threads", str(a.threads)],
                env={**os.environ, **extra}, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                text=True)
            while (line := procs[name].stdout.readline()) and line.strip() != "ready":  # (NNCF's progress bars)
                pass
            if line.strip() != "ready":
                raise SystemExit(f"{name}: the child process failed before its first call")
        same = torch.equal(torch.load(f"{saved}.1.pt"), torch.load(f"{saved}.0.pt"))
        names, ms = list(VARIANTS), {n: [] for n in VARIANTS}
        for r in range(a.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                procs[name].stdin.write("go\n")
                procs[name].stdin.flush()
                ms[name].append(float(procs[name].stdout.readline()))
        for p in procs.values():
            p.stdin.close()
            p.wait()
    med = {n: statistics.median(v) for n, v in ms.items()}
    print(f"{a.workload}, batch {a.batch}, {a.threads} threads, {a.rounds} interleaved rounds (quanta outputs equal: "
          f"{same}); load average {os.getloadavg()[0]:.1f}")
    for n, v in med.items():
        print(f"- {n}: median {v:.2f} ms per call (OpenVINO / this: {med['openvino'] / v:.3f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
