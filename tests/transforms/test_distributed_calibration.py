"""Calibration under torch.distributed (gloo, CPU): ranges are bit-identical on every rank and
equal to one process calibrated on the union of the data, at 2 and 3 processes.

The test spawns this file as a script, one process per rank (``file://`` rendezvous, each
process bounded by a timeout); each rank calibrates the same DigitsCNN on its round-robin
share of six batches with every method and saves the ranges it got.
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from rank_workers import run_ranks

import quanta
from quanta import demo
from quanta.calib import MovingAverageCalibrator
from quanta.nn import TensorQuantizer

METHODS = ("max", "percentile", "mse", "entropy", "moving_average", "ema")
NUM_BATCHES = 6
WORKER_TIMEOUT_S = 120


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return demo.DigitsCNN(width=8).eval()


def _batches() -> list[torch.Tensor]:
    x = demo.digits(seed=0)[0]
    return [x[i * 24:(i + 1) * 24] for i in range(NUM_BATCHES)]


def _calibrated_ranges(method: str, batches: list[torch.Tensor], **kwargs) -> dict[str, tuple]:
    model = quanta.prepare(_model(), quanta.preset("static_int8"))
    real_make = TensorQuantizer._make_calibrator
    if method == "ema":  # descriptors have no momentum: build EMA calibrators for this run
        def make_ema(self, method=None):
            return MovingAverageCalibrator(momentum=0.3, num_bits=self.spec.bits, axis=self.spec.axis,
                                           unsigned=not self.spec.signed, name=self.name)
        TensorQuantizer._make_calibrator = make_ema
    try:
        quanta.calibrate(model, batches, "moving_average" if method == "ema" else method, progress=False, **kwargs)
    finally:
        TensorQuantizer._make_calibrator = real_make
    return {n: (m.amax.clone(), None if m.amin is None else m.amin.clone())
            for n, m in model.named_modules() if isinstance(m, TensorQuantizer) and m.amax is not None}


def _worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    mine = _batches()[rank::world]
    results: dict = {"ranges": {m: _calibrated_ranges(m, mine) for m in METHODS}, "errors": {}}
    if world == 3:  # group=: ranks 0 and 1 calibrate together, rank 2 stays out
        sub = dist.new_group([0, 1])
        if rank < 2:
            results["ranges"]["group"] = _calibrated_ranges("percentile", mine, group=sub)
    if world == 2:
        model = quanta.prepare(_model(), quanta.preset("static_int8", exclude=["head"] if rank == 1 else []))
        try:
            quanta.calibrate(model, mine, progress=False)
        except ValueError as err:
            results["errors"]["mismatch"] = str(err)
        model = quanta.prepare(_model(), quanta.preset("static_int8"))
        start = time.perf_counter()
        if rank == 0:  # rank 1 never calls calibrate: rank 0 must not hang
            try:
                quanta.calibrate(model, mine, progress=False, dist_timeout=3)
            except RuntimeError as err:
                results["errors"]["timeout"] = (str(err), time.perf_counter() - start)
        else:
            time.sleep(5)
    torch.save(results, out)
    dist.destroy_process_group()


def _run_world(world: int, tmp_path: Path) -> list[dict]:
    return run_ranks(__file__, world, tmp_path, WORKER_TIMEOUT_S)


@pytest.fixture(scope="module")
def single_process() -> dict[str, dict]:
    return {m: _calibrated_ranges(m, _batches()) for m in METHODS}


def _same(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys()
    return [n for n in a if not torch.equal(a[n][0], b[n][0])
            or (a[n][1] is None) != (b[n][1] is None) or (a[n][1] is not None and not torch.equal(a[n][1], b[n][1]))]


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_get_the_ranges_of_one_process_on_all_the_data(world, tmp_path, single_process):
    ranks = _run_world(world, tmp_path)
    for method in METHODS:
        reference = single_process[method]
        assert reference, method
        for rank, result in enumerate(ranks):
            differ = _same(result["ranges"][method], reference)
            assert not differ, f"{method}: rank {rank} of {world} differs from one process on {differ}"
    # a shard alone gives other ranges: the merge is what makes them equal
    alone = _calibrated_ranges("max", _batches()[0::world])
    assert _same(alone, single_process["max"])
    if world == 3:
        in_group = [b for r in (0, 1) for b in _batches()[r::3]]
        reference = _calibrated_ranges("percentile", in_group)
        assert not _same(ranks[0]["ranges"]["group"], reference)
        assert not _same(ranks[1]["ranges"]["group"], reference)
        assert "group" not in ranks[2]["ranges"]
    if world == 2:
        errors = [r["errors"] for r in ranks]
        for e in errors:
            assert "different calibrated quantizers" in e["mismatch"] and "head" in e["mismatch"]
        message, seconds = errors[0]["timeout"]
        assert "not every rank reached distributed calibration" in message and seconds < 30


def test_without_a_process_group_calibration_is_single_process_and_silent(single_process):
    assert not torch.distributed.is_initialized()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ranges = _calibrated_ranges("entropy", _batches())
    assert not _same(ranges, single_process["entropy"])


def test_dist_timeout_is_validated():
    model = quanta.prepare(_model(), quanta.preset("static_int8"))
    with pytest.raises(ValueError, match="dist_timeout"):
        quanta.calibrate(model, _batches(), progress=False, dist_timeout=0)


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
