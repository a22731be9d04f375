"""How a quanta int8 model's thread count and OpenMP wait policy fare beside a competing process.

    python benchmarks/busy_threads.py                  # ResNet-18 224 + sentence encoder, 3 env variants
    python benchmarks/busy_threads.py --quick --rounds 3
    python benchmarks/busy_threads.py --env default --workload resnet18

For each OpenMP environment variant (set before torch is imported: a subprocess each), a quanta
``static_int8 weight_bits=7`` model is timed idle and beside `busy.competitor()` (one pure-Python
spin) at 2 threads, at 1 thread, and with `quanta.fit_threads` (the count fitted to the free
cores per call). Rounds interleave everything: each round runs one subprocess per environment
in turn, and in it each mode's idle block, then (the competitor started) each mode's busy block,
in a shuffled order. Medians over all calls; the machine may be shared, so read the numbers as
indicative and rerun (the table says how many cores other processes used meanwhile).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

#: OpenMP environment variants (libgomp reads them once, when torch loads it)
ENVS = {
    "default": {},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "spin10k": {"GOMP_SPINCOUNT": "10000"},
}
MODES = ("2 threads", "1 thread", "fit_threads")


def build(name: str, quick: bool):
    """The workload's float model and quanta's ``static_int8 weight_bits=7`` copy of it."""
    import workloads as W

    import quanta

    wl = W.workloads(quick=quick)[name]
    model = wl.model()
    src = model  # (plain residual additions: quanta's prepare makes them integer additions)
    q = quanta.quantize(src, quanta.preset("static_int8", weight_bits=7), calib_data=wl.calib_data(),
                        example=wl.input(wl.batches[0]), progress=False).eval()
    return wl, src, q


def child(args: argparse.Namespace) -> None:
    import busy
    import torch
    import workloads as W

    import quanta

    torch.set_num_threads(2)
    out = {}
    for name in args.workload:
        wl = W.workloads(quick=args.quick)[name]
        path = os.path.join(args.cache, f"{name}.safetensors")
        src = wl.model()
        q = quanta.load(path, model=src).eval()
        x = wl.input(wl.batches[0])
        fitted = quanta.fit_threads(q)
        fit = quanta.thread_fit(fitted)

        def run(mode: str, q=q, x=x, fitted=fitted) -> None:
            if mode == "fit_threads":
                fitted(x)  # (the hooks set and restore the count)
            else:
                torch.set_num_threads(2 if mode == "2 threads" else 1)
                try:
                    q(x)
                finally:
                    torch.set_num_threads(2)

        samples = {(m, c): [] for m in MODES for c in ("idle", "busy")}
        chosen = {c: [] for c in ("idle", "busy")}
        others = {c: [] for c in ("idle", "busy")}
        order = random.Random(0)
        with torch.inference_mode():
            for m in MODES:
                run(m)
            for _ in range(args.rounds):
                for cond in ("idle", "busy"):
                    with busy.competitor(cond == "busy"):
                        time.sleep(0.05)  # let the spin start
                        for m in order.sample(MODES, len(MODES)):
                            run(m), run(m)  # warm-up: the fitted estimate sees this condition
                            for _ in range(args.calls):
                                t0 = time.perf_counter()
                                run(m)
                                samples[(m, cond)].append(time.perf_counter() - t0)
                                if m == "fit_threads":
                                    chosen[cond].append(fit.last_threads)
                                    others[cond].append(fit.last_others)
        out[name] = {f"{m}|{c}": [t * 1e3 for t in v] for (m, c), v in samples.items()}
        out[name].update({f"chosen|{c}": v for c, v in chosen.items()}, **{f"others|{c}": v for c, v in others.items()})
    print("RESULT " + json.dumps(out), flush=True)


def merged(parts: list[dict]) -> dict:
    """The children's raw samples of one env, concatenated per workload and key."""
    out: dict = {}
    for part in parts:
        for name, r in part.items():
            for key, values in r.items():
                out.setdefault(name, {}).setdefault(key, []).extend(values)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", action="append", choices=["resnet18", "sentence_encoder"])
    ap.add_argument("--env", action="append", choices=list(ENVS))
    ap.add_argument("--quick", action="store_true", help="the shrunk quick-run models")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--calls", type=int, default=8, help="timed calls per mode per block")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.workload = args.workload or ["resnet18", "sentence_encoder"]
    if args.child:
        child(args)
        return 0
    import torch

    import quanta

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory(prefix="quanta_busy_threads_") as cache:
        for name in args.workload:
            t0 = time.perf_counter()
            _, _, q = build(name, args.quick)
            quanta.save(q, os.path.join(cache, f"{name}.safetensors"))
            print(f"built {name} in {time.perf_counter() - t0:.1f} s", flush=True)
        envs = args.env or list(ENVS)
        parts: dict[str, list[dict]] = {e: [] for e in envs}
        for r in range(args.rounds):  # one child per env per round, alternating: drift hits every env
            for env_name in envs:
                env = dict(os.environ, TQDM_DISABLE="1", **ENVS[env_name])
                cmd = [sys.executable, os.path.abspath(__file__), "--child", "--cache", cache, "--rounds", "1",
                       "--calls", str(args.calls)] + (["--quick"] if args.quick else [])
                for w in args.workload:
                    cmd += ["--workload", w]
                t0 = time.perf_counter()
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                if proc.returncode or not lines:
                    print(f"{env_name}: failed (rc {proc.returncode}): {proc.stderr[-2000:]}", flush=True)
                    continue
                parts[env_name].append(json.loads(lines[-1][7:]))
                print(f"round {r + 1}, {env_name}: {time.perf_counter() - t0:.0f} s", flush=True)
    print("\n| workload | OpenMP env | mode | idle ms | busy ms | × idle |")
    print("| --- | --- | --- | ---: | ---: | ---: |")
    for env_name, env_parts in parts.items():
        for name, r in merged(env_parts).items():
            for m in MODES:
                idle, busy_ms = statistics.median(r[f"{m}|idle"]), statistics.median(r[f"{m}|busy"])
                print(f"| {name} | {env_name} {ENVS[env_name] or ''} | {m} | {idle:.2f} | {busy_ms:.2f} | "
                      f"{busy_ms / idle:.2f}× |")
            chose = {c: {k: r[f"chosen|{c}"].count(k) for k in sorted(set(r[f"chosen|{c}"]))} for c in ("idle", "busy")}
            seen = {c: round(statistics.median(r[f"others|{c}"]), 2) if None not in r[f"others|{c}"] else None
                    for c in ("idle", "busy")}
            print(f"| {name} | {env_name} | fit_threads chose (threads: calls) | {chose['idle']} | {chose['busy']} | |")
            print(f"| {name} | {env_name} | cores other processes used (median) | {seen['idle']} | {seen['busy']} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
