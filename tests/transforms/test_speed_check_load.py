"""The speed check's cached decisions carry the load they were measured under: a decision timed on
a busy machine is measured again on an idle one (and replaced), reused while the machine stays
busy, and the report and `kept_float` say "measured on a busy machine". Loads are injected."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import quanta
from quanta.integer import lowering_classes
from quanta.transforms import speed_cache, speed_check
from quanta.transforms.convert import _walk
from quanta.transforms.speed_cache import BUSY_LOAD, IDLE_LOAD, DecisionCache, MachineLoad, reusable
from quanta.transforms.speed_check import keep_faster

BUSY, IDLE = BUSY_LOAD + 0.25, IDLE_LOAD / 3


@pytest.fixture(scope="module")
def sim() -> nn.Module:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)).eval()
    return quanta.prepare(mlp, quanta.preset("dynamic_int8"))


def _lowered(sim: nn.Module) -> tuple[nn.Module, dict[str, nn.Module]]:
    target, report, twins = copy.deepcopy(sim), [], {}
    _walk(target, "", lowering_classes(), report, twins)
    return target, twins


def _timer(integer_s: float, float_s: float, log: list[str] | None = None):
    def measure(kind, fn):
        if log is not None:
            log.append(kind)
        return integer_s if kind == "integer" else float_s
    return measure


def _run(sim, cache_file, load, integer_s, float_s, log=None):
    model, twins = _lowered(sim)
    return keep_faster(model, twins, torch.randn(4, 64), measure=_timer(integer_s, float_s, log),
                       cache=DecisionCache(cache_file), load=lambda: load, repeats=2)


def test_a_busy_decision_is_measured_again_on_an_idle_machine_and_replaced(sim, tmp_path):
    cache_file = tmp_path / "decisions.json"
    busy = _run(sim, cache_file, BUSY, 2e-3, 1e-3)  # contention made integer look slow
    assert [c.picked for c in busy] == ["float", "float"] and all(c.busy and not c.cached for c in busy)
    assert all("measured on a busy machine; float kept" in c.report_detail() for c in busy)
    assert {e["load"] for e in json.loads(cache_file.read_text())["decisions"].values()} == {round(BUSY, 3)}

    timed: list[str] = []
    idle = _run(sim, cache_file, IDLE, 1e-3, 2e-3, timed)
    assert timed and [c.picked for c in idle] == ["integer", "integer"]
    assert not any(c.cached or c.busy for c in idle) and "busy" not in idle[0].report_detail()
    stored = json.loads(cache_file.read_text())["decisions"].values()
    assert {e["load"] for e in stored} == {round(IDLE, 3)} and {e["picked"] for e in stored} == {"integer"}


@pytest.mark.parametrize("first, then", [(BUSY, BUSY_LOAD + 0.1), (IDLE, BUSY), (BUSY, (IDLE_LOAD + BUSY_LOAD) / 2)],
                         ids=["busy-then-busy", "idle-then-busy", "busy-then-moderate"])
def test_a_decision_is_reused_unless_busy_then_idle(sim, tmp_path, first, then):
    cache_file = tmp_path / "decisions.json"
    _run(sim, cache_file, first, 2e-3, 1e-3)
    timed: list[str] = []
    again = _run(sim, cache_file, then, 1e-3, 2e-3, timed)
    assert timed == [] and all(c.cached and c.picked == "float" for c in again)
    assert all(c.busy == (first > BUSY_LOAD) for c in again)  # the load it was measured under


def test_an_entry_without_a_recorded_load_counts_as_busy():
    assert not reusable({"picked": "float"}, IDLE) and reusable({"picked": "float"}, BUSY)
    assert reusable({"picked": "float", "load": IDLE}, IDLE) and not reusable({"picked": "float", "load": BUSY}, IDLE)
    assert reusable({"picked": "float"}, None)  # the load now unknown: as before


class _Fit:
    """`ThreadFit`'s reading side: ``threads()`` measures, ``last_others`` holds the cores taken."""

    min_window_s = 10.0

    def __init__(self, readings):
        self.readings, self.last_others = iter(readings), None

    def threads(self):
        self.last_others = next(self.readings)
        return 1


def test_machine_load_is_the_share_of_our_cores_other_processes_occupy(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    slept: list[float] = []
    monkeypatch.setattr(speed_cache.time, "sleep", slept.append)
    load = MachineLoad(_Fit([1.0, 0.0, 5.0, None]))
    assert [load(), load(), load(), load()] == [0.5, 0.0, 1.0, None]  # (None: /proc/stat unreadable)
    assert len(slept) == 1 and 9.0 < slept[0] <= 10.0  # the second reading waited for a full window
    monkeypatch.undo()
    real = MachineLoad()()  # this machine, through quanta.kernels.threads
    assert real is None or 0.0 <= real <= 1.0


def test_convert_reports_decisions_measured_on_a_busy_machine(sim, tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTA_SPEED_CACHE", str(tmp_path / "cache.json"))
    monkeypatch.setattr(speed_check, "MachineLoad", lambda: (lambda: BUSY))
    q = quanta.convert(sim, example=torch.randn(8, 64))  # (dynamic int8: nothing to calibrate)
    report = quanta.conversion_report(q)
    assert len(report) == 2 and all("measured on a busy machine" in r.detail for r in report)
    assert all("measured on a busy machine" in k.reason for k in quanta.kept_float(q))
    monkeypatch.setattr(speed_check, "MachineLoad", lambda: (lambda: IDLE))
    again = quanta.convert(sim, example=torch.randn(8, 64))  # measured again: idle now
    assert not any("busy" in r.detail for r in quanta.conversion_report(again))


def test_a_decision_records_the_load_over_its_own_timings(sim, tmp_path):
    """The source is read before the example run, after it (the load now: reuse) and after each
    decision's timings (what the decision records): busy during the timings is what counts."""
    readings = iter([0.0, IDLE, BUSY, IDLE])
    model, twins = _lowered(sim)
    choices = keep_faster(model, twins, torch.randn(4, 64), measure=_timer(2e-3, 1e-3),
                          cache=DecisionCache(tmp_path / "d.json"), load=lambda: next(readings), repeats=2)
    assert [c.busy for c in choices] == [True, False]
    assert [c.load for c in choices] == [BUSY, IDLE]


def test_a_decision_is_keyed_by_the_code_it_timed(monkeypatch, tmp_path):
    """A kernel change within one quanta version measures again (the key names the timed code)."""
    parts = {"class": "Int8Linear", "input": [[1, 8]]}
    before = speed_cache.decision_key(parts)
    fingerprint = speed_cache.code_fingerprint()
    assert len(fingerprint) == 16 and fingerprint == speed_cache.code_fingerprint()
    monkeypatch.setattr(speed_cache, "code_fingerprint", lambda: "0" * 16)
    assert speed_cache.decision_key(parts) != before
    assert speed_cache.machine()["code"] == "0" * 16


def test_the_code_fingerprint_reads_the_kernel_and_integer_sources(monkeypatch, tmp_path):
    root = tmp_path / "quanta"
    for package in ("kernels", "integer", "transforms"):
        (root / package).mkdir(parents=True)
    (root / "kernels" / "a.cpp").write_text("int a;")
    (root / "transforms" / "speed_cache.py").write_text("")
    monkeypatch.setattr(speed_cache, "__file__", str(root / "transforms" / "speed_cache.py"))
    speed_cache.code_fingerprint.cache_clear()
    try:
        first = speed_cache.code_fingerprint()
        speed_cache.code_fingerprint.cache_clear()
        (root / "kernels" / "a.cpp").write_text("int b;")
        assert speed_cache.code_fingerprint() != first
        speed_cache.code_fingerprint.cache_clear()
        (root / "transforms" / "other.py").write_text("x = 1")  # not timed code: same fingerprint
        (root / "kernels" / "a.cpp").write_text("int a;")
        assert speed_cache.code_fingerprint() == first
    finally:
        speed_cache.code_fingerprint.cache_clear()
