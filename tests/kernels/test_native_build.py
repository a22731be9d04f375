"""The native library's build: per-environment folders, locks that die with their owner, a
bounded wait, the build key that refuses a stale library (quanta/kernels/build.py, build_config.py).

The real builds here compile only ``csrc/build_info.cpp`` (no torch headers: seconds), through
the same child process as the full library; the session's library is built once by conftest."""

from __future__ import annotations

import os
import platform
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from quanta.kernels import build, build_config, native

needs_compiler = pytest.mark.skipif(platform.system() != "Linux" or shutil.which(os.environ.get("CXX", "c++")) is None,
                                    reason="builds need Linux and a C++ compiler")
KEY = "0123456789abcdef"


def _tiny_spec(name: str = "quanta_build_probe") -> build.BuildSpec:
    """A library of build_info.cpp alone: a real compile of a few seconds that holds ``KEY``."""
    return build.BuildSpec(name=name, sources=(str(build_config.CSRC / "build_info.cpp"),),
                           cflags=(build_config.key_flag(KEY),), python_module=False, what="a probe library",
                           expected="a few seconds")


def _spec_kwargs(spec: build.BuildSpec) -> dict:
    return {k: getattr(spec, k) for k in ("name", "sources", "cflags", "python_module", "what", "expected")}


def _hold_lock(folder: Path, spec: build.BuildSpec, then: str = "time.sleep(120)") -> subprocess.Popen:
    """A process that takes the folder's lock for ``spec`` (as a building process does), plants
    torch's baton in its build folder, prints ``locked``, then runs ``then``."""
    code = textwrap.dedent(f"""
        import fcntl, os, sys, time
        folder = {str(folder)!r}
        os.makedirs(os.path.join(folder, {spec.name!r} + ".build"), exist_ok=True)
        f = open(os.path.join(folder, {spec.name!r} + ".lock"), "a+")
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        f.write(str(os.getpid())); f.flush()
        open(os.path.join(folder, {spec.name!r} + ".build", "lock"), "w").close()
        print("locked", flush=True)
        {then}
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _no_build(*args):
    raise AssertionError("must not build: another process did")


def _write_target(spec, lock_fd, build_dir, target, *args):
    Path(target).write_bytes(b"built")


def test_each_environment_gets_its_own_build_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(build.CACHE_ENV, str(tmp_path))
    a, b = build.env_cache_dir("/opt/envs/a"), build.env_cache_dir("/opt/envs/b")
    assert a != b and a.parent == b.parent == tmp_path / "native"
    assert build.env_cache_dir("/opt/envs/a") == a
    assert build.env_cache_dir() == build.env_cache_dir(sys.prefix)
    spec = native.jit_spec(KEY)
    assert build.library_path(spec, a) != build.library_path(spec, b)


@pytest.mark.parametrize("raw", ["abc", "0", "-5", "nan", "inf"])
def test_build_timeout_must_be_a_positive_number(monkeypatch, raw):
    monkeypatch.setenv(build.TIMEOUT_ENV, raw)
    with pytest.raises(ValueError, match=f"{build.TIMEOUT_ENV} must be a positive number of seconds, got '{raw}'"):
        build.build_timeout()
    monkeypatch.setenv(build.TIMEOUT_ENV, "30")
    assert build.build_timeout() == 30.0


def test_build_spec_is_validated():
    with pytest.raises(ValueError, match="name must be a Python identifier"):
        build.BuildSpec(name="a-b", sources=("x.cpp",))
    with pytest.raises(ValueError, match="sources is empty"):
        build.BuildSpec(name="ok", sources=())


@needs_compiler
def test_a_build_killed_midway_does_not_block_a_fresh_interpreter(tmp_path):
    """A builder killed with SIGKILL leaves its lock file and torch's baton behind; the next
    process (a fresh interpreter, bounded by a timeout) builds, says so, and removes the baton.
    (torch's own build waits forever on that baton.)"""
    spec = _tiny_spec()
    holder = _hold_lock(tmp_path, spec)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (tmp_path / f"{spec.name}.build" / "lock").exists()
    code = textwrap.dedent(f"""
        from pathlib import Path
        from quanta.kernels import build
        spec = build.BuildSpec(**{_spec_kwargs(spec)!r})
        print(build.build_library(spec, Path({str(tmp_path)!r}), timeout=100))
    """)
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=150)
    assert out.returncode == 0, out.stderr
    path = Path(out.stdout.strip().splitlines()[-1])
    assert path == tmp_path / f"{spec.name}.so" and path.exists()
    assert build_config.embedded_key(path) == KEY  # the -D key made it into the library's bytes
    assert not (tmp_path / f"{spec.name}.build" / "lock").exists()
    assert "removed a stale lock left by an interrupted build" in out.stderr
    assert "quanta: building a probe library (first use in this environment, a few seconds; log:" in out.stderr
    assert "quanta: built a probe library in" in out.stderr


def test_waiting_for_a_live_builder_is_bounded(tmp_path, capsys):
    spec = _tiny_spec()
    holder = _hold_lock(tmp_path, spec)
    try:
        start = time.monotonic()
        with pytest.raises(build.BuildTimeout, match="for another process building a probe library"):
            build.build_library(spec, tmp_path, timeout=1.0, runner=_no_build)
        assert time.monotonic() - start < 10
        assert f"quanta: waiting for another process (pid {holder.pid}) building a probe library" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()


def test_a_waiting_process_uses_the_library_the_other_built(tmp_path):
    spec = _tiny_spec()
    target = build.library_path(spec, tmp_path)
    holder = _hold_lock(tmp_path, spec, then=f"time.sleep(1); open({str(target)!r}, 'wb').close()")
    try:
        assert build.build_library(spec, tmp_path, timeout=60, runner=_no_build) == target
    finally:
        holder.wait(timeout=30)


@needs_compiler
def test_a_build_past_its_bound_is_stopped(tmp_path):
    spec = _tiny_spec("quanta_build_slow")
    start = time.monotonic()
    with pytest.raises(build.BuildTimeout, match="took longer than the 0.50 s allowed"):
        build.build_library(spec, tmp_path, timeout=0.5)  # (the child needs seconds just to import torch)
    assert time.monotonic() - start < 20
    assert not build.library_path(spec, tmp_path).exists()
    # the lock went with the stopped build: the next try builds at once
    done = build.build_library(spec, tmp_path, timeout=5, runner=_write_target)
    assert done.read_bytes() == b"built"


def _fake_library(path: Path, key: str | None) -> Path:
    marker = build_config.KEY_MARKER + f"k{key}".encode() + b"\0" if key else b""
    path.write_bytes(b"\x7fELF" + os.urandom(64) + marker + os.urandom(64))
    return path


def test_a_library_with_another_key_is_refused(tmp_path):
    key = build_config.build_key(torch.__version__)
    assert native.check_library(_fake_library(tmp_path / "same.so", key), key) is None
    reason = native.check_library(_fake_library(tmp_path / "old.so", KEY), key)
    assert reason is not None and "built from other sources" in reason and KEY in reason and key in reason
    assert "holds no build key" in native.check_library(_fake_library(tmp_path / "none.so", None), key)


def test_the_key_follows_sources_torch_and_python():
    key = build_config.build_key("2.13.0")
    assert len(key) == 16 and build_config.build_key("2.13.0") == key
    assert build_config.build_key("2.14.0") != key


def test_a_stale_installed_library_is_not_loaded(tmp_path):
    """An installed library built from other sources is refused before loading (a fresh
    interpreter; the refused file is not even a loadable library) and the JIT folder is asked."""
    fake = _fake_library(tmp_path / "_native.so", KEY)
    code = textwrap.dedent(f"""
        from pathlib import Path
        from quanta.kernels import native
        native.installed_library = lambda: Path({str(fake)!r})
        assert native.ensure(build=False) is None
        print(native.status())
    """)
    env = dict(os.environ, QUANTA_CACHE_DIR=str(tmp_path / "cache"))
    env.pop(native.ENV_SWITCH, None)
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"not built in this environment ({fake} was built from other sources"), out.stdout


@pytest.mark.skipif(not native.ready(), reason=f"native kernels not loaded: {native.status()}")
def test_the_loaded_library_carries_this_environments_key():
    info = native.info()
    assert info.status == "loaded" and info.path is not None
    assert info.origin in ("installed", "built for this environment")
    assert native.check_library(info.path, info.key) is None


@pytest.mark.skipif(not native.ready(), reason=f"native kernels not loaded: {native.status()}")
def test_loading_a_built_library_says_nothing():
    code = ("import torch; from quanta.kernels import native; native.ensure(build=False); "
            "print(native.status(), native.info().path)")
    env = {k: v for k, v in os.environ.items() if k != native.ENV_SWITCH}
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["loaded", native.info().path] and out.stderr == ""
