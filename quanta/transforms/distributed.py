"""Calibration across processes: every rank ends with the ranges of all ranks' data.

`quanta.calibrate` uses this when ``torch.distributed`` is initialised (else it runs as one
process and says nothing). Each calibrator's state is gathered from every rank and merged in
rank order, so every rank holds bit-identical statistics, equal to one process that saw the
union of the batches, whatever the number of processes:

- max / min ranges: elementwise min / max (exact);
- histograms (percentile, MSE, entropy): power-of-two bin grids coarsened to the widest and
  summed (exact, order-independent);
- moving average, plain mean (``momentum=None``): float64 sums of the batch extremes and the
  batch count (exact, see `MovingAverageCalibrator`);
- moving average, exponential (``momentum=m``): an EMA depends on the order of the batches,
  so each rank records its batches' extremes and every rank replays them in *step-major*
  order (step 0 of rank 0, 1, ..., then step 1 of rank 0, 1, ...). When the batches are dealt
  round-robin to the ranks (``DistributedSampler`` on the batch index), that is exactly the
  order one process would see: the result does not depend on the number of processes.

Before any data flows, the ranks meet at a barrier bounded by ``timeout`` seconds (gloo:
``monitored_barrier``, which names the ranks that did not arrive) and compare their lists of
calibrated quantizers; a mismatch raises on every rank, naming the quantizers that differ.
"""

from __future__ import annotations

import copy
import datetime
from typing import Any

import torch
import torch.distributed as dist

from ..calib import Calibrator, MovingAverageCalibrator
from ..core import normalize_axis
from ..nn.tensor_quantizer import TensorQuantizer


def _active(group: Any) -> bool:
    return dist.is_available() and dist.is_initialized() and (group is None or group != dist.GroupMember.NON_GROUP_MEMBER)


def _is_ema(cal: Calibrator) -> bool:
    return isinstance(cal, MovingAverageCalibrator) and cal.momentum is not None


def _signature(name: str, cal: Calibrator) -> str:
    config = {k: v for k, v in cal.state_dict().items() if not isinstance(v, torch.Tensor)}
    return f"{name} {sorted(config.items())}"


class DistributedCalibration:
    """One distributed calibration: `start` checks the ranks agree and records what an EMA
    needs; `reduce` leaves every rank with the merged statistics; `close` removes the
    recorders (call it in ``finally``)."""

    def __init__(self, targets: list[tuple[str, TensorQuantizer]], group: Any, timeout: float):
        self.targets = targets
        self.group = group
        self.timeout = timeout
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self._extremes: dict[str, list[tuple[torch.Tensor, torch.Tensor, int]]] = {}
        self._patched: list[Calibrator] = []

    @classmethod
    def start(cls, targets: list[tuple[str, TensorQuantizer]], group: Any = None,
              timeout: float = 120.0) -> DistributedCalibration | None:
        """``None`` when ``torch.distributed`` is not initialised (single process)."""
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"dist_timeout must be a positive number of seconds, got {timeout!r}")
        if not _active(group):
            return None
        sync = cls(targets, group, float(timeout))
        sync._check_same_quantizers()
        for name, q in targets:
            if _is_ema(q.calibrator):
                sync._record(name, q.calibrator)
        return sync

    # ------------------------------------------------------------------ collectives
    def _barrier(self) -> None:
        timeout = datetime.timedelta(seconds=self.timeout)
        if dist.get_backend(self.group) == dist.Backend.GLOO:
            try:
                dist.monitored_barrier(group=self.group, timeout=timeout, wait_all_ranks=True)
            except RuntimeError as err:
                raise RuntimeError(f"quanta.calibrate: not every rank reached distributed calibration within "
                                   f"{self.timeout:g} s (does every rank call quanta.calibrate on the same "
                                   f"model?): {str(err).splitlines()[0]}") from err
        else:
            dist.barrier(group=self.group)

    def _gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def _check_same_quantizers(self) -> None:
        self._barrier()
        mine = [_signature(n, q.calibrator) for n, q in self.targets]
        every = self._gather(mine)
        if all(s == every[0] for s in every):
            return
        reference = set(every[0])
        problems = []
        for rank, sigs in enumerate(every[1:], start=1):
            extra, missing = sorted(set(sigs) - reference), sorted(reference - set(sigs))
            if extra or missing:
                problems.append(f"rank {rank} has {extra[:4] or 'nothing'} that rank 0 lacks and lacks "
                                f"{missing[:4] or 'nothing'}")
            elif sigs != every[0]:
                problems.append(f"rank {rank} lists the same quantizers in a different order")
        raise ValueError("quanta.calibrate: the ranks hold different calibrated quantizers (name and calibrator "
                         "settings must match on every rank): " + "; ".join(problems))

    # ------------------------------------------------------------------ EMA: record, replay
    def _record(self, name: str, cal: Calibrator) -> None:
        found: list[tuple[torch.Tensor, torch.Tensor, int]] = []
        self._extremes[name] = found
        collect = cal.collect

        def recording_collect(x: torch.Tensor) -> None:
            collect(x)  # validates x first; then the same extremes the calibrator used
            xf = x.detach().float()
            axis = None if cal.axis is None else normalize_axis(cal.axis, x.dim(), cal.label)
            lo, hi = cal._aminmax(xf, axis)
            found.append((lo.cpu(), hi.cpu(), x.numel()))

        cal.collect = recording_collect  # type: ignore[method-assign]
        self._patched.append(cal)

    def close(self) -> None:
        for cal in self._patched:
            cal.__dict__.pop("collect", None)
        self._patched = []

    def _replayed_ema(self, cal: MovingAverageCalibrator, per_rank: list[list[Any]]) -> dict[str, Any]:
        state = {k: v for k, v in cal.state_dict().items() if not isinstance(v, torch.Tensor)}
        steps = max((len(r) for r in per_rank), default=0)
        order = [r[t] for t in range(steps) for r in per_rank if t < len(r)]
        m = cal.momentum
        lo_avg = hi_avg = None
        for lo, hi, _ in order:  # same operations as MovingAverageCalibrator._update
            if lo_avg is None:
                lo_avg, hi_avg = lo, hi
            else:
                lo_avg, hi_avg = lo_avg + m * (lo - lo_avg), hi_avg + m * (hi - hi_avg)
        state["num_batches"] = torch.tensor(len(order), dtype=torch.int64)
        state["num_samples"] = torch.tensor(sum(n for _, _, n in order), dtype=torch.int64)
        if order:
            state["min_avg"], state["max_avg"] = lo_avg, hi_avg
        return state

    # ------------------------------------------------------------------ reduce
    def reduce(self, seen: int) -> int:
        """Replace every calibrator's state by the merge of all ranks' states (same on every rank);
        ``seen``: this rank's batch count. Returns the batch count of all ranks together."""
        self._barrier()
        local: dict[str, Any] = {"": seen}
        for name, q in self.targets:
            cal = q.calibrator
            if name in self._extremes:
                local[name] = self._extremes[name]
            else:
                local[name] = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in cal.state_dict().items()}
        every = self._gather(local)
        self.close()
        for name, q in self.targets:
            cal = q.calibrator
            device = next((v.device for v in cal._state.values()), torch.device("cpu"))
            if name in self._extremes:
                merged_state = self._replayed_ema(cal, [e[name] for e in every])
            else:
                merged = copy.deepcopy(cal)
                merged.load_state_dict(every[0][name])
                for rank_states in every[1:]:
                    other = copy.deepcopy(cal)
                    other.load_state_dict(rank_states[name])
                    merged.merge(other)
                merged_state = merged.state_dict()
            cal.load_state_dict({k: (v.to(device) if isinstance(v, torch.Tensor) else v)
                                 for k, v in merged_state.items()})
        return sum(e[""] for e in every)
