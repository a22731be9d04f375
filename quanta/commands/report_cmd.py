"""`quanta compare` and `quanta report`: where a quantized file loses accuracy against its float
model, layer by layer (`quanta.compare`), and the HTML report with plots (`quanta.report`)."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

from torch import nn

from ..io import load
from .errors import CommandError
from .images import ImageOptions
from .sources import example_input, load_calibration, load_spec, spec_factory


@dataclasses.dataclass(frozen=True)
class AnalysisJob:
    """``file``: written by `quanta.save`; ``model``: the spec of its float model (whose
    calibration data, or ``calib``, or a random ``input_shape`` input, is run through both)."""

    file: str
    model: str
    calib: str | None = None
    batch_size: int = 32
    batches: int = 2
    input_shape: str | None = None
    images: ImageOptions = dataclasses.field(default_factory=ImageOptions)


def _models_and_data(job: AnalysisJob, command: str) -> tuple[nn.Module, nn.Module, Any]:
    if not pathlib.Path(job.file).is_file():
        raise CommandError(f"{job.file}: no such file")
    if job.batches < 1:
        raise CommandError(f"--batches must be at least 1, got {job.batches}")
    float_model, calib = load_spec(job.model)
    if job.calib is not None:
        calib = load_calibration(job.calib, job.batch_size, job.images, float_model, job.batches)
    if job.input_shape is not None or calib is None:
        data: Any = [example_input(job.input_shape, calib, command, float_model)]
    else:
        data = [b for _, b in zip(range(job.batches), calib)]
    return float_model, load(job.file, model=spec_factory(job.model)), data


def compare_file(job: AnalysisJob) -> str:
    """The per-layer comparison of the job's file with its float model, as text."""
    from ..analysis import compare

    float_model, quant_model, data = _models_and_data(job, "quanta compare")
    return str(compare(float_model, quant_model, data))


def report_file(job: AnalysisJob, output: str, *, latency: bool = False) -> str:
    """Write the HTML report (and its Markdown twin and PNGs) to ``output``; returns its path."""
    from ..analysis import report

    if not output.endswith(".html"):
        raise CommandError(f"-o {output}: the report file must end in .html")
    float_model, quant_model, data = _models_and_data(job, "quanta report")
    return str(report(float_model, quant_model, data, output, latency=latency).html)
