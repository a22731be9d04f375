"""The speed check's per-machine cache of measured decisions.

A decision (integer or float for one layer) depends on the layer (class, constructor arguments,
fused activation), the input it gets (shapes, dtypes), the kernel that ran, and the machine (CPU
model and flags, thread count, torch and quanta versions, and a fingerprint of the code that was
timed: `code_fingerprint`, the sources of quanta's kernels and integer modules, so a decision
measured before a kernel changed is measured again after it, also within one version). Measured once, it is reused by every
later conversion on this machine, so repeated runs decide the same even under load. A uint8
chain's decision (`speed_check`, taken for its members together) is one entry, keyed by
``{"uint8_chain": [each member's parts]}``, which no single layer's parts can equal; it holds each
member's fastest timings. The file
holds the measurements too (they stay out of the model and of `quanta.save`'s file).

Each entry records the load it was measured under (`MachineLoad`: the share of this process's
cores that other processes occupied while it was timed). Timings taken on a busy machine (a load
above `BUSY_LOAD`) are not reused on an idle one (below `IDLE_LOAD`): the decision is measured
again there and replaces the busy one; an entry without a recorded load counts as busy. A
decision measured idle is reused under any load (it is what the model gets when it runs alone),
and one measured busy is reused while the machine stays busy (repeated runs decide the same); the
report says when a decision was measured on a busy machine (`SpeedChoice.busy`).

Location: ``$QUANTA_SPEED_CACHE`` (a file path) if set, else ``speed_decisions.json`` in quanta's
cache folder (``$QUANTA_CACHE_DIR``, else ``$XDG_CACHE_HOME/quanta`` or ``~/.cache/quanta``, as
for the native build). Delete the file to measure again. A cache that cannot be read or
written is skipped with one warning: conversion never fails because of it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..kernels.build import cache_root
from ..kernels.threads import ThreadFit

ENV = "QUANTA_SPEED_CACHE"
FILE_NAME = "speed_decisions.json"
FORMAT_VERSION = 1

#: the share of this process's cores other processes occupy above which timings are taken on a
#: busy machine (one CPU-bound process beside quanta on 2 cores: 0.5; on 16 cores: 0.06)
BUSY_LOAD = 0.25
#: ... and below which the machine is idle (a busy decision is measured again)
IDLE_LOAD = 0.1
#: where the load comes from (`MachineLoad`'s share, or None where the OS cannot say)
LoadSource = Callable[[], "float | None"]

_log = logging.getLogger(__name__)


class MachineLoad:
    """The load timings are taken under: the share of the cores this process may run on that other
    processes occupy (0: idle; 0.5: one CPU-bound process beside quanta on 2 cores), over the
    window since the previous call, as `quanta.kernels.threads.ThreadFit` (`fit_threads`) measures
    it (``ThreadFit.last_others`` after ``threads()``: ``/proc/stat``'s busy time minus this
    process's own); ``None`` where ``/proc/stat`` cannot be read. The first call starts the
    window; the second waits for the fit's ``min_window_s`` to pass since (a measured window, not
    the instantaneous runnable count, which this process's spinning threads can inflate).
    ``fit``: any object with that ``threads()`` / ``last_others`` pair (tests pass a fake)."""

    def __init__(self, fit: Any = None) -> None:
        self.fit = fit if fit is not None else ThreadFit()
        self._primed = False
        self._first_at: float | None = None  # the first call's time, until the second call

    def __call__(self) -> float | None:
        if self._first_at is not None:  # the second call: after a full window
            time.sleep(max(0.0, self._first_at + float(getattr(self.fit, "min_window_s", 0.0)) - time.monotonic()))
            self._first_at = None
        elif not self._primed:
            self._primed, self._first_at = True, time.monotonic()
        self.fit.threads()
        others = self.fit.last_others
        if others is None:
            return None
        try:
            allowed = max(1, len(os.sched_getaffinity(0)))
        except (AttributeError, OSError):
            allowed = max(1, os.cpu_count() or 1)
        return min(max(0.0, float(others)), float(allowed)) / allowed


def stored_load(load: float | None) -> float | None:
    """``load`` as a cache entry holds it."""
    return None if load is None else round(load, 3)


def recorded_load(entry: dict[str, Any]) -> float | None:
    """The load a cached decision was measured under (None: not recorded)."""
    load = entry.get("load")
    return float(load) if isinstance(load, (int, float)) and not isinstance(load, bool) else None


def is_busy(load: float | None) -> bool:
    """Whether timings taken under ``load`` (per core) were taken on a busy machine."""
    return load is not None and load > BUSY_LOAD


def reusable(entry: dict[str, Any], load_now: float | None) -> bool:
    """Whether a cached decision may be used under ``load_now``: not one measured busy (or under an
    unknown load) when the machine is idle now (module docstring)."""
    if load_now is None or load_now >= IDLE_LOAD:
        return True
    measured = recorded_load(entry)
    return measured is not None and not is_busy(measured)


def cache_path() -> Path:
    """The decisions file (see the module docstring)."""
    override = os.environ.get(ENV)
    return Path(override).expanduser() if override else cache_root() / FILE_NAME


@functools.lru_cache(maxsize=1)
def _cpu() -> dict[str, str]:
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    flags = info.get("flags") or info.get("Features", "")
    return {"cpu": info.get("model name") or platform.processor() or platform.machine(),
            "cpu_flags": hashlib.sha256(flags.encode()).hexdigest()[:16], "arch": platform.machine()}


#: the packages whose code a speed decision times (Python and C++ sources under them)
_TIMED_CODE = ("kernels", "integer")


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """16 hex digits naming the sources of quanta's kernels and integer modules (``*.py``,
    ``*.cpp``, ``*.h``), read once per process: a decision is reused only by the code it timed."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for package in _TIMED_CODE:
        for path in sorted((root / package).rglob("*")):
            if path.suffix in (".py", ".cpp", ".h") and path.is_file():
                h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def machine() -> dict[str, Any]:
    """What a timing depends on besides the layer: CPU, thread count, versions, timed code."""
    from .._version import __version__

    return {**_cpu(), "threads": torch.get_num_threads(), "torch": torch.__version__, "quanta": __version__,
            "code": code_fingerprint()}


def decision_key(parts: dict[str, Any]) -> str:
    """A stable key for ``parts`` (JSON values) plus this machine."""
    text = json.dumps({"layer": parts, "machine": machine()}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class DecisionCache:
    """``get(key) -> entry | None`` and ``put(key, entry)`` over one JSON file."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else cache_path()
        self._entries: dict[str, dict[str, Any]] | None = None
        self._broken = False

    def _load(self) -> dict[str, dict[str, Any]]:
        if self._entries is None:
            self._entries = {}
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                if isinstance(data, dict) and data.get("version") == FORMAT_VERSION \
                        and isinstance(data.get("decisions"), dict):
                    self._entries = {k: v for k, v in data["decisions"].items()
                                     if isinstance(v, dict) and v.get("picked") in ("integer", "float")}
            except FileNotFoundError:
                pass
            except (OSError, ValueError) as e:
                self._warn(f"cannot read {self.path} ({e}); measuring again")
        return self._entries

    def get(self, key: str, load_now: float | None = None) -> dict[str, Any] | None:
        """The decision stored under ``key``, if any and `reusable` under ``load_now``."""
        entry = self._load().get(key)
        return entry if entry is not None and reusable(entry, load_now) else None

    def put(self, key: str, entry: dict[str, Any]) -> None:
        entries = self._load()
        entries[key] = entry
        if self._broken:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".speed_decisions.", suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"version": FORMAT_VERSION, "decisions": entries}, f, indent=0, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError as e:
            self._warn(f"cannot write {self.path} ({e}); decisions are not cached")

    def _warn(self, message: str) -> None:
        if not self._broken:
            _log.warning("quanta speed check: %s", message)
        self._broken = True
