"""Run a test file as ``world`` gloo ranks in subprocesses, each bounded in time, and collect
what each rank saved (the multi-process tests of distributed calibration and QAT).

A worker script is the test file itself, run as ``python FILE RANK WORLD INIT_METHOD OUT``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import torch


def run_ranks(script: str, world: int, tmp_path: Path, timeout_s: float, tag: str = "") -> list[Any]:
    """Start ``world`` ranks of ``script`` with a file rendezvous in ``tmp_path``; kill any rank
    still running after ``timeout_s``; fail with a rank's log tail if it failed; return each
    rank's saved object."""
    init = f"file://{tmp_path / f'rendezvous{tag}{world}'}"
    outs = [tmp_path / f"{tag}w{world}_rank{r}.pt" for r in range(world)]
    procs = [subprocess.Popen([sys.executable, script, str(r), str(world), init, str(outs[r])],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(world)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout_s)[0].decode(errors="replace"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    return [torch.load(o, weights_only=False) for o in outs]
