"""The just-in-time build of the native CPU library: per environment, locked, bounded, visible.

Used when no matching library was built at install time (`quanta.kernels.native`). Each Python
environment gets its own folder, ``$QUANTA_CACHE_DIR`` (default ``$XDG_CACHE_HOME/quanta`` or
``~/.cache/quanta``) ``/native/py311-<hash of sys.prefix>/``: two environments never share a
build, so they never rebuild each other's or load each other's library.

One process builds at a time per folder, under an OS lock (``fcntl.flock`` on
``<name>.lock``) that dies with its holder: a build killed midway (Ctrl-C, ``kill -9``, a CI
timeout, OOM) blocks nobody; the next process takes the lock, deletes torch's own ``lock`` baton
left in the build folder (stale: only the lock holder builds there) and builds again. The build
runs in a child process (``torch.utils.cpp_extension.load``, ninja, its output in
``<name>.log``) that holds the same lock and moves the finished library into place atomically;
the parent prints what it is doing and, every 15 s, how long it has taken; the wait for the
lock and the build together are bounded by ``QUANTA_NATIVE_BUILD_TIMEOUT`` seconds (default
1200), after which the build is stopped and `BuildTimeout` raised (the caller then runs the
PyTorch kernels).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..progress import format_seconds, notice

TIMEOUT_ENV = "QUANTA_NATIVE_BUILD_TIMEOUT"
DEFAULT_TIMEOUT_S = 1200.0
CACHE_ENV = "QUANTA_CACHE_DIR"
#: seconds between "still building" / "still waiting" lines
REPORT_EVERY_S = 15.0
#: what a full build takes on 2 cores (3.7 min of CPU: 310-325 s on 2 busy cores; see the README)
EXPECTED = "2-5 min on 2 cores"


class BuildTimeout(RuntimeError):
    """The lock or the build took longer than the configured bound."""


@dataclass(frozen=True)
class BuildSpec:
    """One library to build: ``name`` is its module name (``TORCH_EXTENSION_NAME``)."""

    name: str
    sources: tuple[str, ...]
    cflags: tuple[str, ...] = ()
    ldflags: tuple[str, ...] = ()
    python_module: bool = True
    what: str = "quanta's native CPU kernels"
    expected: str = EXPECTED
    extra_env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.name):
            raise ValueError(f"BuildSpec.name must be a Python identifier, got {self.name!r}")
        if not self.sources:
            raise ValueError("BuildSpec.sources is empty")


def build_timeout() -> float:
    """``$QUANTA_NATIVE_BUILD_TIMEOUT`` in seconds (default 1200)."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {raw!r}")
    return value


def cache_root() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "quanta"


def env_cache_dir(prefix: str | None = None) -> Path:
    """This environment's build folder: one per ``sys.prefix`` (and Python version)."""
    prefix = os.path.realpath(prefix if prefix is not None else sys.prefix)
    tag = f"py{sys.version_info[0]}{sys.version_info[1]}-{hashlib.sha256(prefix.encode()).hexdigest()[:12]}"
    return cache_root() / "native" / tag


def library_path(spec: BuildSpec, folder: Path | None = None) -> Path:
    return (folder or env_cache_dir()) / f"{spec.name}.so"


def _ninja_env(extra: dict[str, str]) -> dict[str, str]:
    """torch's extension builder runs ``ninja`` from PATH: add the ``ninja`` package's binary
    (a dependency of quanta) and this interpreter's scripts folder (an unactivated venv)."""
    dirs = [os.path.dirname(sys.executable)]
    try:
        import ninja
        dirs.insert(0, ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    env = dict(os.environ, PYTHONUNBUFFERED="1", **extra)  # (the log follows the build as it goes)
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 1))  # one compile per core (ninja's default: cores + 2)
    path = env.get("PATH", "").split(os.pathsep)
    env["PATH"] = os.pathsep.join([d for d in dirs if d and d not in path] + path)
    return env


#: the child: build with torch's extension builder, then move the library into place atomically
_CHILD = """
import json, os, sys
a = json.loads(sys.argv[1])
from torch.utils import cpp_extension
cpp_extension.load(name=a["name"], sources=a["sources"], extra_cflags=a["cflags"], extra_ldflags=a["ldflags"],
                   build_directory=a["build_dir"], verbose=True, is_python_module=a["python_module"])
os.replace(os.path.join(a["build_dir"], a["name"] + ".so"), a["target"])
print("quanta: library in place:", a["target"], flush=True)
"""


def _compiled_count(log: Path) -> str:
    """``3/8 steps`` from ninja's last ``[3/8]`` line in the build log, or ``""``."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, log.stat().st_size - 65536))
            found = re.findall(rb"\[(\d+)/(\d+)\]", f.read())
    except OSError:
        return ""
    return f", {found[-1][0].decode()}/{found[-1][1].decode()} steps" if found else ""


def _run_child(spec: BuildSpec, lock_fd: int, build_dir: Path, target: Path, log: Path, deadline: float,
               start: float) -> None:
    args = {"name": spec.name, "sources": list(spec.sources), "cflags": list(spec.cflags),
            "ldflags": list(spec.ldflags), "build_dir": str(build_dir), "target": str(target),
            "python_module": spec.python_module}
    with open(log, "wb") as out:
        # the child holds the lock too (pass_fds): a parent killed midway leaves the child to
        # finish, and nobody builds in the same folder meanwhile
        child = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(args)], stdout=out,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=_ninja_env(spec.extra_env),
                                 pass_fds=(lock_fd,), start_new_session=True)
    next_report = time.monotonic() + REPORT_EVERY_S
    try:
        while child.poll() is None:
            now = time.monotonic()
            if now > deadline:
                raise BuildTimeout(f"building {spec.what} took longer than the {format_seconds(deadline - start)} "
                                   f"allowed ({TIMEOUT_ENV}); stopped it (log: {log})")
            if now >= next_report:
                notice(f"still building {spec.what}: {format_seconds(now - start)} so far{_compiled_count(log)}")
                next_report += REPORT_EVERY_S
            time.sleep(0.2)
    except BaseException:  # a timeout, Ctrl-C: stop the compilers too (their own process group)
        if child.poll() is None:
            os.killpg(child.pid, 9)
            child.wait()
        raise
    if child.returncode != 0 or not target.exists():
        tail = log.read_text(errors="replace").strip().splitlines()[-15:]
        raise RuntimeError(f"building {spec.what} failed (exit {child.returncode}; log: {log}): "
                           + " | ".join(tail))


def build_library(spec: BuildSpec, folder: Path | None = None, *, timeout: float | None = None,
                  runner: Callable[..., None] | None = None) -> Path:
    """Build ``spec`` into ``folder`` (default `env_cache_dir`) unless it is there already, and
    return the library's path. Waits for another process building the same library (then
    uses its result); raises `BuildTimeout` when the wait and the build exceed ``timeout``
    seconds (default `build_timeout`). ``runner`` replaces the child-process build (tests)."""
    folder = folder or env_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "prefix.txt").write_text(sys.prefix + "\n")  # (whose folder this is, for people)
    target = library_path(spec, folder)
    start = time.monotonic()
    deadline = start + (timeout if timeout is not None else build_timeout())
    with open(folder / f"{spec.name}.lock", "a+") as lock:
        _acquire(lock, spec, start, deadline)
        if target.exists():  # built by the process we waited for
            return target
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        build_dir = folder / f"{spec.name}.build"
        build_dir.mkdir(exist_ok=True)
        baton = build_dir / "lock"  # torch's FileBaton: stale, since we hold the lock
        if baton.exists():
            baton.unlink()
            notice(f"removed a stale lock left by an interrupted build ({baton})")
        log = folder / f"{spec.name}.log"
        notice(f"building {spec.what} (first use in this environment, {spec.expected}; log: {log}) ...")
        (runner or _run_child)(spec, lock.fileno(), build_dir, target, log, deadline, start)
        notice(f"built {spec.what} in {format_seconds(time.monotonic() - start)}: {target}")
    return target


def _acquire(lock: Any, spec: BuildSpec, start: float, deadline: float) -> None:
    """Take the folder's lock for ``spec``, reporting every `REPORT_EVERY_S` while another
    process holds it; returns early (lock held) once it is free."""
    import fcntl  # (POSIX: native builds are Linux only; imported here so that the module loads anywhere)

    next_report = 0.0
    while True:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        now = time.monotonic()
        if now > deadline:
            raise BuildTimeout(f"waited the {format_seconds(deadline - start)} allowed ({TIMEOUT_ENV}) for another "
                               f"process building {spec.what} ({lock.name}); gave up")
        if now >= next_report:
            lock.seek(0)
            holder = lock.read().strip()
            if next_report == 0.0:
                notice(f"waiting for another process (pid {holder or '?'}) building {spec.what} "
                       f"(at most {format_seconds(deadline - start)}, {TIMEOUT_ENV}) ...")
            else:
                notice(f"still waiting for the build of {spec.what}: {format_seconds(now - start)} so far")
            next_report = now + REPORT_EVERY_S
        time.sleep(0.2)


__all__ = ["BuildSpec", "BuildTimeout", "build_library", "build_timeout", "cache_root", "env_cache_dir",
           "library_path"]
