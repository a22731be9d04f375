"""Thread counts fitted to the cores really free: a quantized model that degrades gracefully
on a busy machine.

PyTorch's intra-op pool (OpenMP) splits each kernel statically over ``torch.get_num_threads()``
threads. When another process keeps one of those cores busy, the thread sharing it finishes
late and every other thread waits for it at the end of each kernel (spinning, by default, on
the CPU the competitor needs); one thread fewer has no such wait. `ThreadFit`
estimates how many cores are free for this process and runs a block (or a model's forward) on
that many threads, restoring the caller's count in ``finally``.

The estimate costs one read of ``/proc/stat`` per ``min_window_s`` (tens of microseconds, no
sleep; calls in between read only the clock):

* over the window since the previous sample (at least ``min_window_s``): the busy CPU time of
  the CPUs this process may run on (``os.sched_getaffinity``; their ``cpuN`` lines of
  ``/proc/stat``) minus this process's own (``time.process_time``, all its threads, spinning ones
  included) is what the *other* processes used there; divided by the wall time it is how many of
  those cores they occupy;
* before such a window exists (the first call of a fresh `ThreadFit`, or after the affinity
  changed): ``procs_running - 1`` from the same read, the other runnable tasks at this instant.

``free`` = the cores measured (the allowed ones; all when their lines are missing) ``- others``,
at most the allowed count; the fitted count is ``floor(free + SLACK)`` (a core at least
``1 - SLACK`` free counts), clamped to ``[1, min(cap, allowed)]`` with ``cap`` = ``max_threads``,
else the caller's ``torch.get_num_threads()``: an idle machine runs all the caller's threads.
Where ``/proc/stat`` cannot be read, the count is the cap (nothing changes).

Nothing here is global: the estimator's last sample lives in the `ThreadFit` object (or on the
model that `fit_threads` hooks), and the only process-wide setting touched is the thread count,
restored on exit (also on exceptions). A runtime setting only: `quanta.save` stores no trace of
it; call `fit_threads` again on a loaded model.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

#: CPU time columns of /proc/stat's ``cpu`` line counted as busy (user nice system ... steal);
#: idle (3) and iowait (4) are not, guest / guest_nice are already inside user / nice
_BUSY_COLUMNS = (0, 1, 2, 5, 6, 7)
#: a core counts as free when at least 1 - SLACK of it is
SLACK = 0.3
#: the attribute `fit_threads` keeps its `ThreadFit` and hook handles in
FIT_ATTR = "_quanta_thread_fit"


def read_proc_stat() -> str:
    with open("/proc/stat", "rb") as f:
        return f.read().decode("ascii", "replace")


@dataclass(frozen=True)
class CpuSample:
    """One reading: the busy CPU seconds of ``cores`` CPUs (this process's allowed ones where
    ``/proc/stat`` lists each, else all), this process's CPU seconds, the wall clock, and the
    tasks runnable now (``procs_running``)."""

    busy_s: float
    own_s: float
    wall_s: float
    running: int
    cores: int


def _busy_ticks(line: str) -> int:
    cols = line.split()[1:]
    return sum(int(cols[i]) for i in _BUSY_COLUMNS if i < len(cols))


def parse_proc_stat(text: str, own_s: float, wall_s: float, ticks_per_s: float,
                    cpus: frozenset[int] | None = None) -> CpuSample:
    """A `CpuSample` from ``/proc/stat`` text: the busy time of the CPUs in ``cpus`` (their
    ``cpuN`` lines), or of all CPUs (the ``cpu`` line) when ``cpus`` is ``None`` or one of them is
    not listed; ``ValueError`` when the text has no ``cpu`` line."""
    total, mine, seen, online, running = None, 0, 0, 0, 1
    for line in text.splitlines():
        if line.startswith("cpu "):
            total = _busy_ticks(line)
        elif line.startswith("cpu"):
            online += 1
            index = line.split(None, 1)[0][3:]
            if cpus is not None and index.isdigit() and int(index) in cpus:
                mine += _busy_ticks(line)
                seen += 1
        elif line.startswith("procs_running "):
            running = int(line.split()[1])
    if total is None:
        raise ValueError("/proc/stat has no 'cpu' line")
    if cpus is not None and seen == len(cpus):
        return CpuSample(mine / ticks_per_s, own_s, wall_s, running, seen)
    return CpuSample(total / ticks_per_s, own_s, wall_s, running, max(online, 1))


def _allowed_cpus() -> frozenset[int] | None:
    try:
        return frozenset(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def check_max_threads(max_threads: Any) -> int | None:
    """``None`` or a positive int, else a one-line ``ValueError`` / ``TypeError``."""
    if max_threads is None:
        return None
    if isinstance(max_threads, bool) or not isinstance(max_threads, int):
        raise TypeError(f"max_threads must be a positive int or None, got {type(max_threads).__name__}")
    if max_threads < 1:
        raise ValueError(f"max_threads must be at least 1, got {max_threads}")
    return max_threads


class ThreadFit:
    """A reusable context manager running its block on the threads free for this process.

    ``with fit: y = model(x)`` sets ``torch.set_num_threads(fit.threads())`` for the block and
    restores the caller's count on exit, also when the block raises. Reuse one object across
    calls: each call then measures the window since the previous one (see the module doc).

    ``max_threads``: the most threads a block gets (default: the caller's
    ``torch.get_num_threads()`` at entry). ``read_stat``, ``process_time``, ``clock``,
    ``allowed_cpus``: the readers (attributes of the same names; tests feed a fake ``/proc/stat``).
    """

    def __init__(self, max_threads: int | None = None, *, min_window_s: float = 0.05,
                 read_stat: Callable[[], str] = read_proc_stat, process_time: Callable[[], float] = time.process_time,
                 clock: Callable[[], float] = time.monotonic,
                 allowed_cpus: Callable[[], frozenset[int] | None] = _allowed_cpus) -> None:
        self.max_threads = check_max_threads(max_threads)
        if isinstance(min_window_s, bool) or not isinstance(min_window_s, (int, float)) or not min_window_s >= 0:
            raise ValueError(f"min_window_s must be a number >= 0, got {min_window_s!r}")
        self.min_window_s = float(min_window_s)
        self.read_stat, self.process_time, self.clock, self.allowed_cpus = read_stat, process_time, clock, allowed_cpus
        try:
            self.ticks_per_s = float(os.sysconf("SC_CLK_TCK"))  # /proc/stat's unit (USER_HZ)
        except (AttributeError, ValueError, OSError):
            self.ticks_per_s = 100.0
        self._last: CpuSample | None = None
        self._cpus: frozenset[int] | None = None  # the allowed CPUs, as last read
        self._others: float | None = None  # cores the other processes used in the last full window
        self._local = threading.local()  # the callers' counts to restore, per Python thread
        #: the count the last `threads()` call chose, and the cores it saw the other processes
        #: occupy (``None``: /proc/stat unreadable) (for reports and benchmarks)
        self.last_threads: int | None = None
        self.last_others: float | None = None

    def __getstate__(self) -> dict[str, Any]:  # a copy starts a fresh window, with no caller to restore
        state = dict(self.__dict__)
        state.update(_local=None, _last=None, _others=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def _sample(self) -> CpuSample | None:
        try:
            return parse_proc_stat(self.read_stat(), self.process_time(), self.clock(), self.ticks_per_s,
                                   self._cpus)
        except (OSError, ValueError, IndexError):
            return None

    def others(self) -> float | None:
        """Cores the other processes occupy (the last full window; the instantaneous runnable
        count before one), or ``None`` where ``/proc/stat`` cannot be read."""
        last = self._last
        if last is not None and self.clock() - last.wall_s < self.min_window_s:  # no read: keep the estimate
            return self._others if self._others is not None else float(max(0, last.running - 1))
        now = self._sample()
        if now is None:
            return None
        if last is None:
            self._last = now
            return float(max(0, now.running - 1))
        wall = now.wall_s - last.wall_s
        if wall > 0:
            self._others = max(0.0, (now.busy_s - last.busy_s) - (now.own_s - last.own_s)) / wall
            self._last = now
        return self._others if self._others is not None else float(max(0, last.running - 1))

    def threads(self, cap: int | None = None) -> int:
        """The thread count for the next block: in ``[1, min(cap, allowed CPUs)]``."""
        cap = self.max_threads or cap or torch.get_num_threads()
        cpus = self.allowed_cpus()
        if cpus != self._cpus:  # other CPUs: the busy times are not comparable, start a new window
            self._cpus, self._last, self._others = cpus, None, None
        allowed = len(self._cpus) if self._cpus else max(1, os.cpu_count() or 1)
        limit = max(1, min(cap, allowed))
        others = self.last_others = self.others()
        if others is None:
            n = limit
        else:
            cores = self._last.cores if self._last is not None else allowed
            free = min(float(allowed), cores - others)
            n = max(1, min(limit, math.floor(free + SLACK)))
        self.last_threads = n
        return n

    def __enter__(self) -> ThreadFit:
        saved = self._local.__dict__.setdefault("saved", [])
        before = torch.get_num_threads()
        saved.append(before)
        try:
            n = self.threads(before)
            if n != before:
                torch.set_num_threads(n)
        except BaseException:
            saved.pop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        saved = self._local.__dict__.get("saved")
        if not saved:  # (an entry that raised has restored already)
            return
        before = saved.pop()
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def fitted_threads(max_threads: int | None = None) -> ThreadFit:
    """``with quanta.fitted_threads(): y = model(x)``: run the block on the cores free now,
    restoring the thread count after. Keep the returned object to reuse it across calls (its
    estimate then covers the time since the previous call)."""
    return ThreadFit(max_threads)


def _enter(module: nn.Module, args: Any) -> None:
    if not torch.compiler.is_compiling():
        getattr(module, FIT_ATTR).__enter__()


def _exit(module: nn.Module, args: Any, output: Any) -> None:
    if not torch.compiler.is_compiling():
        getattr(module, FIT_ATTR).__exit__(None, None, None)


def _remove_hooks(model: nn.Module) -> None:
    """Drop `fit_threads`' hooks by identity (handles would not follow a deep copy)."""
    for hook_id, hook in list(model._forward_pre_hooks.items()):
        if hook is _enter:
            del model._forward_pre_hooks[hook_id]
    for hook_id, hook in list(model._forward_hooks.items()):
        if hook is _exit:
            del model._forward_hooks[hook_id]
            model._forward_hooks_always_called.pop(hook_id, None)


def thread_fit(model: nn.Module) -> ThreadFit | None:
    """The `ThreadFit` that `fit_threads` attached to ``model`` (``None`` without one);
    its ``last_threads`` is the count the latest forward ran on."""
    return model.__dict__.get(FIT_ATTR)


def fit_threads(model: nn.Module, enabled: bool = True, *, max_threads: int | None = None) -> nn.Module:
    """Run every forward of ``model`` on the threads free at the time (in place; returns it).

    A forward pre-hook sets the fitted count, a forward hook registered with ``always_call``
    restores the caller's count, also when the forward raises. The estimator's state lives on
    the model; ``enabled=False`` removes the hooks. A runtime setting: `quanta.save` does not
    store it (call this again after `quanta.load`); a deep copy keeps it. Under
    ``torch.compile`` the hooks do nothing: wrap the compiled call in `fitted_threads` (quanta's
    kernels inside follow it; inductor's generated loops keep the count they were compiled for).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fit_threads expects an nn.Module, got {type(model).__name__}")
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be True or False, got {type(enabled).__name__}")
    fit = ThreadFit(max_threads) if enabled else None  # validates before the model is touched
    model.__dict__.pop(FIT_ATTR, None)
    _remove_hooks(model)
    if fit is not None:
        model.__dict__[FIT_ATTR] = fit
        model.register_forward_pre_hook(_enter, prepend=True)  # first: a pre-hook raising after it is restored
        model.register_forward_hook(_exit, always_call=True)
    return model
