"""`quanta quantize` and `quanta config dump`: a model from a spec or a transformers directory,
a config from a preset with options or from a file, written with `quanta.save`."""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

from ..io import save
from ..transforms import QuantConfig, conversion_report, kept_float, preset, quantize
from ..transforms.float_dtype import FLOAT_DTYPES
from .errors import CommandError
from .images import ImageOptions
from .sources import example_input, load_calibration, load_hf, load_spec

#: the preset used when neither --preset nor --config is given
DEFAULT_PRESET = "dynamic_int8"


@dataclasses.dataclass(frozen=True)
class ConfigChoice:
    """How the quantization config is chosen: a preset (with its options) or a config file."""

    preset: str | None = None
    config_file: str | None = None
    group_size: int | None = None
    #: static_int8 / dynamic_int8: 7 for weights oneDNN sums exactly on CPUs without VNNI
    weight_bits: int | None = None
    exclude: tuple[str, ...] = ()
    algorithms: tuple[str, ...] = ()
    #: static_int8 / dynamic_int8: "on" (default) quantizes MultiheadAttention's matmul inputs, "off" keeps them float
    attention_matmuls: str | None = None

    def __post_init__(self) -> None:
        if self.attention_matmuls not in (None, "on", "off"):
            raise CommandError(f"--attention-matmuls must be on or off, got {self.attention_matmuls!r}")
        if self.config_file is not None and self.attention_matmuls is not None:
            raise CommandError("--attention-matmuls applies to the static_int8 / dynamic_int8 presets; in a config "
                               "file map the type QuantMatMul to null in module_types instead")
        if self.preset is not None and self.config_file is not None:
            raise CommandError("give --preset or --config, not both")
        if self.config_file is not None and self.group_size is not None:
            raise CommandError("--group-size applies to the weight_only_int4 preset; set it in the config file instead")
        if self.config_file is not None and self.weight_bits is not None:
            raise CommandError("--weight-bits applies to the static_int8 / dynamic_int8 presets; set the weight "
                               "num_bits in the config file instead")

    def resolve(self) -> QuantConfig:
        """The `QuantConfig` this choice means (the same for a preset with flags and for its
        `dump_preset` JSON edited the same way)."""
        if self.config_file is None:
            name = self.preset or DEFAULT_PRESET
            options: dict[str, Any] = {"group_size": self.group_size} if self.group_size is not None else {}
            if self.weight_bits is not None:
                options["weight_bits"] = self.weight_bits
            if self.attention_matmuls is not None:
                options["attention_matmuls"] = self.attention_matmuls == "on"
            if self.exclude:
                options["exclude"] = list(self.exclude)
            if self.algorithms:
                options["algorithms"] = list(self.algorithms)
            try:
                return preset(name, **options)
            except ValueError as e:
                raise CommandError(str(e)) from e
        config = read_config_file(self.config_file)
        try:
            return config.extended(exclude=list(self.exclude), algorithms=list(self.algorithms))
        except ValueError as e:
            raise CommandError(str(e)) from e


def read_config_file(path: str) -> QuantConfig:
    """A `QuantConfig` from a JSON file (or YAML, ``.yaml`` / ``.yml``, when PyYAML is installed)
    holding what `QuantConfig.to_dict` writes."""
    file = pathlib.Path(path)
    if not file.is_file():
        raise CommandError(f"--config {path}: no such file")
    text = file.read_text(encoding="utf-8")
    yaml_file = file.suffix.lower() in (".yaml", ".yml")
    if yaml_file:
        try:
            import yaml
        except ImportError as e:
            raise CommandError(f"--config {path}: YAML needs PyYAML (pip install pyyaml), or write JSON") from e
    try:
        data = yaml.safe_load(text) if yaml_file else json.loads(text)
    except Exception as e:  # json.JSONDecodeError, yaml.YAMLError
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CommandError(f"--config {path}: not valid {'YAML' if yaml_file else 'JSON'}: {first}") from e
    if not isinstance(data, dict):
        raise CommandError(f"--config {path}: expected a mapping of QuantConfig fields, got {type(data).__name__}")
    try:
        return QuantConfig.from_dict(data)
    except (ValueError, TypeError, KeyError) as e:
        raise CommandError(f"--config {path}: {e}") from e


def dump_preset(choice: ConfigChoice) -> str:
    """The JSON of the config a preset (with its options) means, for editing and ``--config``."""
    return json.dumps(choice.resolve().to_dict(), indent=2)


@dataclasses.dataclass(frozen=True)
class QuantizeJob:
    """Everything `quanta quantize` needs."""

    output: str
    spec: str | None = None
    hf: str | None = None
    config: ConfigChoice = dataclasses.field(default_factory=ConfigChoice)
    calib: str | None = None
    images: ImageOptions = dataclasses.field(default_factory=ImageOptions)
    calib_batch_size: int = 32
    calib_method: str | None = None
    calib_batches: int | None = None
    speed_check: bool = True
    input_shape: str | None = None
    progress: bool = True
    #: "bfloat16": the float work between integer layers in bfloat16 (`quanta.transforms.float_dtype`)
    float_dtype: str | None = None

    def __post_init__(self) -> None:
        if (self.spec is None) == (self.hf is None):
            raise CommandError("give a model spec (package.module:factory or file.py:factory) or --hf DIR, one of them")
        if not self.output.endswith(".safetensors"):
            raise CommandError(f"-o {self.output}: the output file must end in .safetensors")
        if self.calib_batch_size <= 0:
            raise CommandError(f"--calib-batch-size must be positive, got {self.calib_batch_size}")
        if self.calib_batches is not None and self.calib_batches <= 0:
            raise CommandError(f"--calib-batches must be positive, got {self.calib_batches}")
        if self.float_dtype not in (None, *FLOAT_DTYPES):
            raise CommandError(f"--float-dtype must be one of {', '.join(FLOAT_DTYPES)}, got {self.float_dtype!r}")


def quantize_file(job: QuantizeJob) -> str:
    """Quantize the job's model and write it; returns a summary: one line, then one line per layer
    kept float (`quanta.kept_float`: the speed check's timings, or why it could not be lowered)."""
    config = job.config.resolve()  # config errors before the (possibly slow) model load
    if job.calib is not None and not pathlib.Path(job.calib).exists():
        raise CommandError(f"--calib {job.calib}: no such file or folder")
    if job.spec is not None:
        model, calib = load_spec(job.spec)
    else:
        model, calib = load_hf(job.hf), None  # type: ignore[arg-type]
    if job.calib is not None:  # after the model: a folder of images takes its size from the model
        calib = load_calibration(job.calib, job.calib_batch_size, job.images, model, job.calib_batches)
    example = example_input(job.input_shape, calib, "quanta quantize") if job.input_shape else None
    qmodel = quantize_model(model, config, calib, method=job.calib_method, num_batches=job.calib_batches,
                            speed_check=job.speed_check, progress=job.progress, example=example,
                            float_dtype=None if job.float_dtype is None else FLOAT_DTYPES[job.float_dtype])
    path = save(qmodel, job.output)
    integer, quantized = integer_layers(qmodel)
    kept = kept_float(qmodel)
    return (f"wrote {path} ({path.stat().st_size:,} bytes): {integer} of {quantized} quantized layers "
            f"run on integer kernels" + "".join(f"\n  kept float: {k.describe()}" for k in kept))


def quantize_model(model: Any, config: QuantConfig, calib: Any, **options: Any) -> Any:
    """`quanta.quantize`, with the command line's way of giving calibration data in its error."""
    try:
        return quantize(model, config, calib, **options)
    except AssertionError as e:  # a torch.export program's shape guard (it was exported for other shapes)
        if "Guard failed" not in str(e):
            raise
        raise CommandError(f"the exported program refuses the calibration data ({str(e).splitlines()[0][:120]}): "
                           "export it with dynamic_shapes (torch.export.Dim) or give batches of the exported "
                           "shape (--calib-batch-size)") from e
    except ValueError as e:
        if calib is None and "calib_data" in str(e):
            raise CommandError("this configuration quantizes activations statically: give calibration data "
                               "(--calib FILE, or a spec whose factory returns (model, data))") from e
        raise


def integer_layers(model: Any) -> tuple[int, int]:
    """``(layers on integer kernels, quantized layers)`` by the model's conversion report."""
    report = conversion_report(model)
    return sum(r.result not in ("simulated", "float") for r in report), len(report)
