"""`quanta export`: a file written by `quanta.save` to ONNX (QuantizeLinear / DequantizeLinear)."""

from __future__ import annotations

import dataclasses
import pathlib

from ..io import ArchitectureError, export_onnx, load
from .errors import CommandError
from .sources import example_input, load_spec, parse_shape, spec_factory


@dataclasses.dataclass(frozen=True)
class ExportJob:
    """``model``: the spec of the file's float model (without it, the model is rebuilt from the
    classes the file records, as `quanta.load(path)` does)."""

    file: str
    output: str
    model: str | None = None
    input_shape: str | None = None
    opset: int | None = None
    dynamic_batch: bool = False

    def __post_init__(self) -> None:
        if not self.output.endswith(".onnx"):
            raise CommandError(f"-o {self.output}: the output file must end in .onnx")


def export_file(job: ExportJob) -> str:
    """Export the job's file; returns the export report's text."""
    if not pathlib.Path(job.file).is_file():
        raise CommandError(f"{job.file}: no such file")
    if job.input_shape is not None:
        parse_shape(job.input_shape)  # a typo fails before the model is built
    float_model, calib = load_spec(job.model) if job.model is not None else (None, None)
    try:
        model = load(job.file, model=spec_factory(job.model) if job.model is not None else None)
    except ArchitectureError as e:
        if job.model is not None or "pass model=" not in str(e):
            raise
        raise CommandError(f"{job.file}: the file does not record how to build its model: give --model SPEC "
                           "(the float model's spec or .pt2 program)") from e
    example = example_input(job.input_shape, calib, "quanta export", float_model)
    return str(export_onnx(model, example, job.output, opset=job.opset, dynamic_batch=job.dynamic_batch))
