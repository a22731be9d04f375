"""Thread counts fitted to the free cores (`quanta.kernels.threads`): the estimator on a fake
/proc/stat, the count restored after every forward (also a raising one), validation, save/load."""

from __future__ import annotations

import copy
import random
import warnings
from collections.abc import Iterator

import pytest
import torch
from torch import nn

import quanta
from quanta.kernels.threads import ThreadFit, parse_proc_stat


class FakeMachine:
    """A fake /proc/stat, process clock and wall clock: ``advance`` moves time on, with the
    other processes (on the CPUs ``on``, default all) and this one using the given cores."""

    def __init__(self, cpus: int = 2, running: int = 1, ticks: float = 100.0,
                 allowed: frozenset[int] | None = None) -> None:
        self.cpus, self.running, self.ticks = cpus, running, ticks
        self.allowed = frozenset(range(cpus)) if allowed is None else allowed
        self.busy = [250] * cpus  # ticks per CPU
        self.own_s, self.wall_s = 0.0, 100.0
        self.readable = True

    def advance(self, seconds: float, others: float, own: float, on: list[int] | None = None) -> None:
        self.wall_s += seconds
        self.own_s += own * seconds
        on = list(range(self.cpus)) if on is None else on
        for cpu in on:
            self.busy[cpu] += round(others * seconds * self.ticks / len(on))
        for cpu in sorted(self.allowed):
            self.busy[cpu] += round(own * seconds * self.ticks / len(self.allowed))

    def stat(self) -> str:
        if not self.readable:
            raise OSError("no /proc here")

        def line(name: str, busy: int, cpus: int) -> str:  # 3/4 user, 1/4 system, idle = the rest
            idle = round(cpus * self.wall_s * self.ticks) - busy
            return f"{name} {busy - busy // 4} 0 {busy // 4} {idle} 0 0 0 0 0 0"

        lines = [line("cpu ", sum(self.busy), self.cpus)] + [line(f"cpu{i}", b, 1) for i, b in enumerate(self.busy)]
        lines += ["intr 12345 1 2 3", "ctxt 999", f"procs_running {self.running}", "procs_blocked 0"]
        return "\n".join(lines) + "\n"

    def fit(self, **kwargs) -> ThreadFit:
        fit = ThreadFit(read_stat=self.stat, process_time=lambda: self.own_s, clock=lambda: self.wall_s,
                        allowed_cpus=lambda: self.allowed, **kwargs)
        fit.ticks_per_s = self.ticks
        return fit


@pytest.fixture
def two_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def test_parse_proc_stat_counts_busy_columns_cpus_and_running():
    text = ("cpu  100 20 30 1000 50 5 5 10 7 0\ncpu0 1 0 0 9\ncpu1 2 0 0 9\ncpu2 4 0 0 9 0 0 0 0 3\n"
            "intr 1 2\nprocs_running 3\n")
    s = parse_proc_stat(text, own_s=1.5, wall_s=9.0, ticks_per_s=100.0)
    assert s.busy_s == pytest.approx((100 + 20 + 30 + 5 + 5 + 10) / 100)  # not idle, iowait or guest
    assert (s.cores, s.running, s.own_s, s.wall_s) == (3, 3, 1.5, 9.0)
    mine = parse_proc_stat(text, 0.0, 0.0, 100.0, frozenset({1, 2}))
    assert (mine.busy_s, mine.cores) == (pytest.approx(0.06), 2)  # the allowed CPUs' lines only
    with pytest.raises(ValueError, match="no 'cpu' line"):
        parse_proc_stat("intr 1\n", 0.0, 0.0, 100.0)


def test_first_call_uses_the_tasks_running_now():
    idle, busy = FakeMachine(running=1), FakeMachine(running=2)
    assert idle.fit().threads(2) == 2
    assert busy.fit().threads(2) == 1  # one other runnable task: one core left


def test_window_subtracts_own_cpu_time_and_follows_the_competitor():
    m = FakeMachine(running=1)
    fit = m.fit()
    assert fit.threads(2) == 2
    m.advance(0.2, others=0.0, own=2.0)  # our own two busy threads do not count as others
    assert fit.threads(2) == 2
    m.advance(0.2, others=1.0, own=1.0)  # a competitor takes a whole core
    assert fit.threads(2) == 1 and fit.last_threads == 1
    assert fit.last_others == pytest.approx(1.0) and fit.others() == pytest.approx(1.0)
    m.advance(0.2, others=0.5, own=1.0)  # half a core taken: the core is not free enough
    assert fit.threads(2) == 1
    m.advance(0.2, others=0.1, own=1.0)  # the competitor left
    assert fit.threads(2) == 2


def test_only_the_allowed_cpus_count():
    m = FakeMachine(cpus=4, running=1, allowed=frozenset({2, 3}))
    fit = m.fit()
    assert fit.threads(4) == 2  # at most the two allowed CPUs
    m.advance(0.2, others=2.0, own=2.0, on=[0, 1])  # the others keep to CPUs this process may not use
    assert fit.threads(4) == 2
    m.advance(0.2, others=1.0, own=1.0, on=[3])  # one of ours is taken
    assert fit.threads(4) == 1 and fit.last_others == pytest.approx(1.0)
    text = "".join(ln for ln in m.stat().splitlines(True) if not ln.startswith("cpu3 "))
    # an allowed CPU missing from /proc/stat: the machine-wide line, over the CPUs listed
    assert parse_proc_stat(text, 0.0, 0.0, 100.0, frozenset({2, 3})).cores == 3


def test_window_shorter_than_min_window_keeps_the_last_estimate():
    m = FakeMachine(running=1)
    fit = m.fit(min_window_s=0.05)
    fit.threads(2)
    m.advance(0.1, others=1.0, own=1.0)
    assert fit.threads(2) == 1
    m.advance(0.01, others=0.0, own=2.0)  # too short a window to tell: keep 1
    assert fit.threads(2) == 1
    m.advance(0.2, others=0.0, own=2.0)  # the full window since the last sample is idle
    assert fit.threads(2) == 2


def test_unreadable_or_garbled_proc_stat_changes_nothing():
    m = FakeMachine(running=2)
    m.readable = False
    assert m.fit().threads(2) == 2
    garbled = ThreadFit(read_stat=lambda: "no cpu lines here\n", allowed_cpus=lambda: frozenset({0, 1}))
    assert garbled.threads(2) == 2
    assert garbled.others() is None


def test_fitted_count_stays_within_one_and_the_allowed_cores():
    rng = random.Random(0)
    for _ in range(300):
        cpus = rng.randint(1, 8)
        m = FakeMachine(cpus, running=rng.randint(0, 12), allowed=frozenset(rng.sample(range(cpus), rng.randint(1, cpus))))
        cap = rng.randint(1, 16)
        fit = m.fit(max_threads=rng.choice([None, rng.randint(1, 16)]))
        for _ in range(4):
            n = fit.threads(cap)
            assert 1 <= n <= min(fit.max_threads or cap, len(m.allowed))
            m.advance(rng.uniform(0.0, 0.3), others=rng.uniform(0, m.cpus), own=rng.uniform(0, 1))
    assert FakeMachine(cpus=8, running=1).fit().threads(3) == 3  # idle: all the caller's threads
    assert FakeMachine(cpus=8, running=1).fit(max_threads=5).threads(8) == 5


def test_context_manager_restores_the_count_also_on_exceptions(two_threads):
    fit = FakeMachine(running=2).fit()
    with fit:
        assert torch.get_num_threads() == 1
        with fit:  # nested: each exit restores what its entry saw
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError, match="boom"), fit:
        raise RuntimeError("boom")
    assert torch.get_num_threads() == 2
    with quanta.fitted_threads():
        assert 1 <= torch.get_num_threads() <= 2
    assert torch.get_num_threads() == 2


class Probe(nn.Module):
    """Records the thread count its forward runs on; raises on a negative input."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(torch.get_num_threads())
        if (x < 0).any():
            raise ValueError("negative input")
        return x


@pytest.fixture
def converted(trained_transformer, token_data) -> nn.Module:
    return quanta.quantize(trained_transformer, "static_int8", token_data.calib_batches(2, 32),
                           progress=False, speed_check=False)


def _fake(model: nn.Module, machine: FakeMachine) -> None:
    fit = quanta.thread_fit(model)
    fit.read_stat, fit.allowed_cpus = machine.stat, (lambda: machine.allowed)
    fit.process_time, fit.clock = (lambda: machine.own_s), (lambda: machine.wall_s)


def test_fit_threads_runs_forward_on_the_fitted_count_and_restores_it(two_threads, converted, token_data):
    x = token_data.x_test[:8]
    expected = converted(x)
    probe = Probe()
    model = nn.Sequential(probe, converted)
    assert quanta.fit_threads(model) is model
    _fake(model, FakeMachine(running=2))
    assert torch.equal(model(x), expected)
    assert probe.seen == [1] and torch.get_num_threads() == 2
    assert quanta.thread_fit(model).last_threads == 1
    with pytest.raises(ValueError, match="negative input"):
        model(-torch.ones_like(x, dtype=torch.float32))
    assert probe.seen == [1, 1] and torch.get_num_threads() == 2

    def refuse(module, args):
        raise RuntimeError("a user's pre-hook refuses")

    handle = model.register_forward_pre_hook(refuse, prepend=True)  # runs before quanta's: nothing to restore
    with pytest.raises(RuntimeError, match="refuses"), warnings.catch_warnings():
        warnings.simplefilter("error")  # our restoring hook must not fail (torch would only warn)
        model(x)
    assert torch.get_num_threads() == 2
    handle.remove()
    quanta.fit_threads(model, False)  # off again: forward leaves the count alone
    model(x)
    assert probe.seen[-1] == 2 and quanta.thread_fit(model) is None
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_fit_threads_is_runtime_only_not_saved(tmp_path, two_threads, converted, token_data):
    x = token_data.x_test[:8]
    fitted = quanta.fit_threads(copy.deepcopy(converted))
    path = quanta.save(fitted, tmp_path / "fitted.safetensors")
    loaded = quanta.load(path)
    assert quanta.thread_fit(loaded) is None and not loaded._forward_pre_hooks
    assert torch.equal(loaded(x), converted(x))
    quanta.fit_threads(loaded)  # applied again after load
    assert torch.equal(loaded(x), converted(x)) and torch.get_num_threads() == 2


def test_deep_copy_keeps_the_fit_and_disabling_it_leaves_the_original(converted):
    fitted = quanta.fit_threads(copy.deepcopy(converted))
    twin = copy.deepcopy(fitted)
    assert quanta.thread_fit(twin) is not None and quanta.thread_fit(twin) is not quanta.thread_fit(fitted)
    quanta.fit_threads(twin, False)
    assert quanta.thread_fit(fitted) is not None and len(fitted._forward_pre_hooks) == 1
    quanta.fit_threads(fitted)  # twice: still one pair of hooks
    assert len(fitted._forward_pre_hooks) == 1 and len(fitted._forward_hooks) == 1


@pytest.mark.parametrize("kwargs, error, match", [
    ({"max_threads": 0}, ValueError, "max_threads must be at least 1, got 0"),
    ({"max_threads": "2"}, TypeError, "max_threads must be a positive int or None, got str"),
    ({"max_threads": True}, TypeError, "max_threads must be a positive int or None, got bool"),
    ({"enabled": "yes"}, TypeError, "enabled must be True or False, got str"),
])
def test_bad_options_raise_one_line_and_leave_the_model_untouched(kwargs, error, match):
    model = nn.Linear(3, 3)
    with pytest.raises(error, match=match) as info:
        quanta.fit_threads(model, **kwargs)
    assert "\n" not in str(info.value)
    assert quanta.thread_fit(model) is None and not model._forward_pre_hooks and not model._forward_hooks
    with pytest.raises(TypeError, match="fit_threads expects an nn.Module, got function"):
        quanta.fit_threads(lambda x: x)
    with pytest.raises(ValueError, match="min_window_s must be a number >= 0"):
        ThreadFit(min_window_s=-1)
