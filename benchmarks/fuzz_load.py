"""Fuzz `quanta.load`: mutated files must be refused cleanly or load with identical outputs.

    python benchmarks/fuzz_load.py --cases 1000 --seed 0

Saves small integer, simulated and float models (quanta's demo classes, untrained, and a CNN
with strided / depthwise convs, a residual addition and a max-pool), then mutates their files:
manifest field edits (numbers to 0, -1, huge, floats, strings, nulls, lists, deep nesting, keys
deleted), safetensors header edits (dtypes such as ``F8_E8M0``, shapes, offsets), truncations
and bit flips. Each case is loaded in a worker subprocess (a crash or a hang is counted, never
taken down with it) and classified:

- ``refused``: `QuantaFileError` (the one error a damaged file may raise);
- ``identical``: loaded, outputs equal to the original's (``torch.equal``);
- ``valid``: a *deliberate* edit (the manifest's checksum recomputed) that loaded a model with
  valid values whose outputs differ: what the format cannot prevent;
- failures: ``changed`` (an accidental edit that loaded and computes something else), ``error``
  (any other exception), ``crash`` (the worker died), ``hang`` (no answer in time), ``memory``
  (a case raised the worker's peak RSS by more than ``--memory-mb``).

Prints one summary line; exit status 1 on any failure.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import select
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

FAILURES = ("changed", "error", "crash", "hang", "memory")
_DEEP = "__quanta_fuzz_deep__"


class ResidualCNN(nn.Module):
    """Strided stem, depthwise + pointwise convs, a residual addition, a max-pool, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        from quanta.nn import Add

        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU())
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 8, 1)
        self.add = Add()
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = self.pool(torch.relu(self.add(self.pw(self.dw(h)), h)))
        return self.head(torch.flatten(h, 1))


def _canonical() -> Any:
    """This file as the module ``fuzz_load`` (run as a script it is ``__main__``): the class path
    a saved `ResidualCNN` records must be the same in the driver and in its workers."""
    import importlib.util

    module = sys.modules.get("fuzz_load")
    if module is None:
        spec = importlib.util.spec_from_file_location("fuzz_load", os.path.abspath(__file__))
        module = importlib.util.module_from_spec(spec)
        sys.modules["fuzz_load"] = module
        spec.loader.exec_module(module)
    return module


def _models() -> dict[str, tuple[Any, str, torch.Tensor, bool]]:
    """name -> (float model factory, how to quantize it, input, load from the file alone)."""
    from quanta import demo

    ResidualCNN = _canonical().ResidualCNN

    g = torch.Generator().manual_seed(0)
    img, seq = torch.randn(4, 1, 8, 8, generator=g), torch.randn(2, 12, 1, generator=g)
    tok = torch.randint(0, 12, (3, 16), generator=g)
    return {
        "cnn-static_int8": (demo.DigitsCNN, "static_int8", img, True),
        "residual-cnn-static_int8": (ResidualCNN, "static_int8", torch.randn(4, 1, 16, 16, generator=g), False),
        "lstm-dynamic_int8": (demo.SequenceLSTM, "dynamic_int8", seq, True),
        "transformer-weight_only_int4": (demo.TinyTransformer, "weight_only_int4", tok, True),
        "transformer-embedding_int8": (demo.TinyTransformer, "embedding", tok, True),
        "transformer-simulated": (demo.TinyTransformer, "simulated", tok, True),
        "lstm-float": (demo.SequenceLSTM, "float", seq, True),
    }


def _quantized(factory: Any, how: str, x: torch.Tensor) -> nn.Module:
    import quanta
    from quanta import LayerQuantConfig, QuantConfig, QuantDescriptor

    torch.manual_seed(0)
    model = factory().eval()
    calib = [x]
    if how == "float":
        return model
    if how == "simulated":
        sim = quanta.prepare(model, quanta.preset("static_int8"))
        quanta.calibrate(sim, calib, progress=False)
        return sim
    if how == "embedding":
        how = QuantConfig(default=LayerQuantConfig(weight=QuantDescriptor(per_channel=True)))
    options = {"group_size": 32} if how == "weight_only_int4" else {}
    return quanta.quantize(model, how, calib, progress=False, speed_check=False, **options)


def build_files(workdir: str, names: list[str] | None = None) -> list[str]:
    """Save each model to ``workdir/<name>.safetensors`` with its input; returns the names."""
    from safetensors.torch import save_file

    import quanta

    models = _models()
    names = names or list(models)
    for name in names:
        factory, how, x, _ = models[name]
        q = _quantized(factory, how, x)
        quanta.save(q, os.path.join(workdir, f"{name}.safetensors"))
        with torch.no_grad():
            save_file({"x": x, "y": q(x)}, os.path.join(workdir, f"{name}.io.safetensors"))
    return names


# ------------------------------------------------------------------------------ mutations
def _split(data: bytes) -> tuple[dict[str, Any], bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header: dict[str, Any], body: bytes, deep: int = 0) -> bytes:
    raw = json.dumps(header, sort_keys=True)
    if deep:
        raw = raw.replace(json.dumps(_DEEP), "[" * deep + "]" * deep, 1)
    enc = raw.encode()
    enc += b" " * (-len(enc) % 8)
    return struct.pack("<Q", len(enc)) + enc + body


def _slots(value: Any) -> list[tuple[Any, Any]]:
    """(container, key) of every value inside ``value`` (iterative)."""
    out, stack = [], [value]
    while stack:
        v = stack.pop()
        items = v.items() if isinstance(v, dict) else enumerate(v) if isinstance(v, list) else ()
        for k, child in items:
            out.append((v, k))
            stack.append(child)
    return out


def _new_value(rng: random.Random, old: Any) -> tuple[Any, int]:
    """A replacement for ``old`` and the nesting depth to splice in (0: none)."""
    choices: list[Any] = [0, -1, 1, 2, 3, 2**31, 10**6, 10**18, 1.5, -0.0, "", "x", None, True, False, [], {},
                          [0, 0], [1, 0], {"a": 1}, "F8_E8M0", "relu", "onednn", "uint8", "per_channel",
                          "torch.nn:modules.module.torch.jit.ScriptModule", "os:system", "torch.nn.modules.conv:Conv2d"]
    if isinstance(old, bool):
        choices += [not old] * 6
    elif isinstance(old, int):
        choices += [old + 1, old - 1, old * 2, old * 1000, -old] * 2
    elif isinstance(old, float):
        choices += [old * 2, old + 1e-3, 0.0, float("inf"), float("nan")]
    elif isinstance(old, list) and old:
        choices += [old[:-1], old + old[-1:], list(reversed(old))]
    if rng.random() < 0.04:
        return _DEEP, rng.choice([40, 200, 5000, 100000])
    return rng.choice(choices), 0


def mutate(data: bytes, rng: random.Random, deliberate: bool) -> tuple[bytes, str]:
    """One mutation of a file's bytes and a description of it. ``deliberate``: a manifest edit
    whose checksum is recomputed (as someone editing the file on purpose would)."""
    header, body = _split(data)
    kind = "manifest" if deliberate else rng.choice(["manifest", "manifest", "header", "truncate", "flip", "meta"])
    if kind in ("truncate", "flip"):
        if kind == "truncate":
            cut = rng.randrange(len(data))
            return data[:cut], f"truncate at {cut}"
        out = bytearray(data)
        spots = [rng.randrange(len(out)) for _ in range(rng.randint(1, 3))]
        for i in spots:
            out[i] ^= 1 << rng.randrange(8)
        return bytes(out), f"flip bits at {spots}"
    meta = header["__metadata__"]
    if kind == "meta":
        key = rng.choice(["quanta_sha256", "quanta", "format"])
        if rng.random() < 0.5:
            del meta[key]
            return _join(header, body), f"delete metadata {key}"
        meta[key] = rng.choice(["", "{}", "0" * 64, "[]"])
        return _join(header, body), f"metadata {key} = {meta[key]!r}"
    if kind == "header":
        name = rng.choice(sorted(k for k in header if k != "__metadata__"))
        field = rng.choice(["dtype", "shape", "data_offsets"])
        old = header[name][field]
        new, deep = _new_value(rng, old)
        if field == "dtype" and rng.random() < 0.6:
            new = rng.choice(["F8_E8M0", "U16", "U32", "I4", "F4", "C64", "F32", "I8", "U8", "BOOL"])
        header[name][field] = new
        return _join(header, body, deep), f"header {name}.{field}: {old!r} -> {str(new)[:40]!r}"
    manifest = json.loads(meta["quanta"])
    container, key = rng.choice(_slots(manifest))
    old = container[key]
    if isinstance(container, dict) and rng.random() < 0.1:
        del container[key]
        new, deep, what = None, 0, "deleted"
    else:
        new, deep = _new_value(rng, old)
        container[key] = new
        what = f"{str(old)[:30]!r} -> {str(new)[:30]!r}" + (f" (depth {deep})" if deep else "")
    text = json.dumps(manifest, sort_keys=True)
    if deep:
        text = text.replace(json.dumps(_DEEP), "[" * deep + "]" * deep, 1)
    meta["quanta"] = text
    if deliberate:
        meta["quanta_sha256"] = hashlib.sha256(text.encode()).hexdigest()
    return _join(header, body), f"manifest {key!r} {what}"


def case(seed: int, i: int, names: list[str], deliberate_share: float) -> tuple[str, bool, random.Random]:
    rng = random.Random(seed * 1_000_003 + i)
    return names[i % len(names)], rng.random() < deliberate_share, rng


# ------------------------------------------------------------------------------ worker
def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(workdir: str, seed: int, start: int, stop: int, names: list[str], share: float) -> None:
    """Run cases ``start..stop``; one JSON line per event on stdout."""
    from safetensors.torch import load_file

    import quanta
    from quanta.io import QuantaFileError

    models = _models()
    originals = {n: Path(workdir, f"{n}.safetensors").read_bytes() for n in names}
    io = {n: load_file(os.path.join(workdir, f"{n}.io.safetensors")) for n in names}
    for n in names:  # warm up: every code path loaded once before the baseline is taken
        with torch.no_grad():
            assert torch.equal(quanta.load(os.path.join(workdir, f"{n}.safetensors"), model=models[n][0]
                                           if not models[n][3] else None)(io[n]["x"]), io[n]["y"]), n
    baseline = _peak_mb()
    path = os.path.join(workdir, f"case-{os.getpid()}.safetensors")
    for i in range(start, stop):
        name, deliberate, rng = case(seed, i, names, share)
        data, desc = mutate(originals[name], rng, deliberate)
        with open(path, "wb") as f:
            f.write(data)
        print(json.dumps({"i": i, "start": f"{name}: {desc}"}), flush=True)
        try:
            factory = None if models[name][3] else models[name][0]
            with torch.no_grad():
                y = quanta.load(path, model=factory)(io[name]["x"])
            outcome = "identical" if torch.equal(y, io[name]["y"]) else ("valid" if deliberate else "changed")
            msg = ""
        except QuantaFileError as e:
            outcome, msg = "refused", str(e)[:200]
        except Exception as e:
            outcome, msg = "error", f"{type(e).__name__}: {str(e)[:200]}"
        grew = _peak_mb() - baseline
        print(json.dumps({"i": i, "outcome": outcome, "msg": msg, "rss_mb": _peak_mb(), "grew_mb": grew}),
              flush=True)
    os.unlink(path) if os.path.exists(path) else None


# ------------------------------------------------------------------------------ driver
def run(cases: int, seed: int = 0, deliberate_share: float = 0.25, timeout: float = 30.0, memory_mb: float = 200.0,
        names: list[str] | None = None, workdir: str | None = None, log: Any = None) -> dict[str, Any]:
    """Fuzz ``cases`` cases; returns counts per outcome, failures with their description, peak RSS."""
    own = workdir is None
    tmp = tempfile.TemporaryDirectory() if own else None
    workdir = tmp.name if tmp else workdir
    names = build_files(workdir, names)
    counts: Counter[str] = Counter()
    failures: list[str] = []
    peak = 0.0
    i = 0
    while i < cases:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", workdir, "--seed", str(seed), "--start", str(i),
               "--cases", str(cases), "--names", ",".join(names), "--deliberate-share", str(deliberate_share)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, bufsize=1)
        current, started = None, time.monotonic() + 120  # the worker's start: imports, warm-up loads
        assert proc.stdout is not None
        while True:
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            line = proc.stdout.readline() if ready else ""
            if line:
                ev = json.loads(line)
                if "start" in ev:
                    current, started = ev, time.monotonic() + timeout
                    continue
                outcome = ev["outcome"]
                if ev["grew_mb"] > memory_mb and outcome != "crash":
                    outcome = "memory"
                counts[outcome] += 1
                peak = max(peak, ev["rss_mb"])
                if outcome in FAILURES:
                    failures.append(f"case {ev['i']} [{current['start'] if current else '?'}]: {outcome} {ev['msg']}")
                i, current = ev["i"] + 1, None
                continue
            if proc.poll() is not None and not ready:
                break
            if ready and not line:  # EOF
                proc.wait()
                break
            if time.monotonic() > started:
                proc.kill()
                proc.wait()
                counts["hang"] += 1
                failures.append(f"case {current['i'] if current else i} [{current['start'] if current else 'worker start'}]"
                                ": hang")
                i = (current["i"] if current else i) + 1
                current = None
                break
        if current is not None:  # died inside a case
            counts["crash"] += 1
            failures.append(f"case {current['i']} [{current['start']}]: crash (exit {proc.returncode})")
            i = current["i"] + 1
        elif proc.returncode not in (0, None) and i < cases:
            raise RuntimeError(f"fuzz worker failed outside any case (exit {proc.returncode})")
        if log:
            print(f"  {i}/{cases} cases", file=log, flush=True)
    if tmp:
        tmp.cleanup()
    return {"cases": cases, "counts": dict(counts), "failures": failures, "peak_rss_mb": peak}


def summary(result: dict[str, Any]) -> str:
    c = result["counts"]
    refused, same, valid = c.get("refused", 0), c.get("identical", 0), c.get("valid", 0)
    bad = ", ".join(f"{c.get(k, 0)} {k}" for k in FAILURES)
    return (f"{result['cases']} cases: {refused} refused cleanly, {same} loaded identical, {valid} deliberate edits "
            f"loaded with valid values, {c.get('crash', 0)} crashes, {c.get('hang', 0)} hangs ({bad}), "
            f"peak RSS {result['peak_rss_mb']:.0f} MB")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deliberate-share", type=float, default=0.25,
                   help="share of cases that edit the manifest and recompute its checksum")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds one case may take")
    p.add_argument("--memory-mb", type=float, default=200.0, help="peak-RSS growth counted as unbounded memory")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--names", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        torch.set_num_threads(1)
        worker(args.worker, args.seed, args.start, args.cases, args.names.split(","), args.deliberate_share)
        return 0
    result = run(args.cases, args.seed, args.deliberate_share, args.timeout, args.memory_mb, log=sys.stderr)
    for line in result["failures"][:50]:
        print(line)
    print(summary(result))
    return 1 if any(result["counts"].get(k) for k in FAILURES) else 0


if __name__ == "__main__":
    sys.exit(main())
