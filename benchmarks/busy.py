"""A busy machine for `run.py --busy`: one competing CPU-bound process during timing.

The competitor is a pure-Python spin (one core's worth of work, no threads, no I/O), started by
the benchmark and stopped by it in ``finally``. It also watches its parent: when the benchmark
dies without cleaning up (SIGKILL), the spin sees its parent pid change and exits, so it is never
left behind.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator

#: the report header's line for a run with --busy
NOTE = ("BUSY rows: each batch is timed idle, then again while one competing CPU-bound process runs (a pure-Python "
        "spin, one core's worth, started and stopped by the benchmark); `× idle` = busy median / idle median "
        "(> 1 is slower); a quanta row ending in `, fit_threads` runs the row's model with its thread count fitted to the "
        "cores free at each call (`quanta.fit_threads`), in the idle table too")

#: spins until the parent given as argv[1] is gone (checked every ~50k iterations)
SPIN = """
import os, sys
parent = int(sys.argv[1])
n = 0
while True:
    n += 1
    if n % 50000 == 0 and os.getppid() != parent:
        break
"""


@contextlib.contextmanager
def competitor(enabled: bool = True) -> Iterator[int | None]:
    """Run one spinning process for the duration of the block; yields its pid (None when disabled)."""
    if not enabled:
        yield None
        return
    proc = subprocess.Popen([sys.executable, "-c", SPIN, str(os.getpid())],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
