"""Calibration data from a folder of images (``--calib DIR``).

The folder's ``.png`` / ``.jpg`` / ``.jpeg`` files (subfolders included, in sorted order of their
paths, so that two runs see the same batches) are read with Pillow, converted to RGB (or
grayscale for one channel), resized so that they cover the target size (aspect kept, bilinear)
and center-cropped to it, scaled to [0, 1], normalized by ``(x - mean) / std`` when given, and
stacked into batches ``[N, C, H, W]`` float32.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Sequence
from typing import overload

import torch
from torch import nn

from .errors import CommandError

#: file suffixes read as images (other files in the folder are not calibration data and are skipped)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclasses.dataclass(frozen=True)
class ImageOptions:
    """How images become input tensors. ``size``: ``(height, width)``, or None to take it from
    the model (a ``.pt2`` program's example input, a transformers config's ``image_size``);
    ``channels``: 3 (RGB) or 1 (grayscale), None to take it from the model (default 3);
    ``mean`` / ``std``: one value or one per channel."""

    size: tuple[int, int] | None = None
    channels: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.size is not None and (len(self.size) != 2 or any(int(d) != d or d <= 0 for d in self.size)):
            raise CommandError(f"--image-size takes two positive integers H W, got {self.size}")
        if self.channels not in (None, 1, 3):
            raise CommandError(f"--channels must be 1 or 3, got {self.channels}")
        for name, values in (("--mean", self.mean), ("--std", self.std)):
            if values is not None and len(values) not in (1, 3):
                raise CommandError(f"{name} takes one value or one per channel (3), got {len(values)}")
        if self.std is not None and any(not v > 0 for v in self.std):
            raise CommandError(f"--std values must be positive, got {list(self.std)}")


def _model_image_shape(model: nn.Module | None) -> tuple[int | None, tuple[int, int] | None]:
    """``(channels, (height, width))`` the model says it takes, each None where it does not say."""
    from .exported import exported_input_shape

    shape = exported_input_shape(model) if model is not None else None
    if shape is not None and len(shape) == 4:
        return shape[1], (shape[2], shape[3])
    config = getattr(model, "config", None)
    size = getattr(config, "image_size", None)
    channels = getattr(config, "num_channels", None)
    channels = channels if isinstance(channels, int) else None
    if isinstance(size, int) and size > 0:
        return channels, (size, size)
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(d, int) and d > 0 for d in size):
        return channels, (size[0], size[1])
    return channels, None


def image_files(folder: pathlib.Path) -> list[pathlib.Path]:
    """The folder's image files, in sorted order of their paths below it."""
    return sorted((p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
                  key=lambda p: p.relative_to(folder).as_posix())


def _read(path: pathlib.Path, size: tuple[int, int], channels: int) -> torch.Tensor:
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = img.convert("RGB" if channels == 3 else "L")
            height, width = size
            scale = max(height / img.height, width / img.width)
            resized = (max(width, round(img.width * scale)), max(height, round(img.height * scale)))
            img = img.resize(resized, Image.Resampling.BILINEAR)
            left, top = (resized[0] - width) // 2, (resized[1] - height) // 2
            img = img.crop((left, top, left + width, top + height))
            data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    except Exception as e:  # OSError, PIL.UnidentifiedImageError, a truncated file...
        first = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise CommandError(f"--calib {path}: cannot read this image ({type(e).__name__}: {first})") from e
    return data.reshape(height, width, channels).permute(2, 0, 1).float() / 255.0


class ImageBatches(Sequence[torch.Tensor]):
    """The batches of a folder's images, each read from disk when it is asked for (a folder of
    thousands of images never sits in memory at once); iterable as often as calibration needs."""

    def __init__(self, files: list[pathlib.Path], batch_size: int, size: tuple[int, int], channels: int,
                 mean: torch.Tensor | None, std: torch.Tensor | None) -> None:
        self.files, self.batch_size, self.size, self.channels = files, batch_size, size, channels
        self.mean, self.std = mean, std

    def __len__(self) -> int:
        return (len(self.files) + self.batch_size - 1) // self.batch_size

    @overload
    def __getitem__(self, index: int) -> torch.Tensor: ...

    @overload
    def __getitem__(self, index: slice) -> list[torch.Tensor]: ...

    def __getitem__(self, index: int | slice) -> torch.Tensor | list[torch.Tensor]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(f"batch {index} of {len(self)}")
        start = (index % len(self)) * self.batch_size
        images = torch.stack([_read(f, self.size, self.channels) for f in self.files[start:start + self.batch_size]])
        if self.mean is not None and self.std is not None:
            images = (images - self.mean) / self.std
        return images


def load_image_folder(folder: str, batch_size: int, options: ImageOptions, model: nn.Module | None = None,
                      limit: int | None = None) -> ImageBatches:
    """Batches ``[N, C, H, W]`` of the folder's images (the first ``limit`` images when given),
    read batch by batch; every file's header is checked here, so that a file that is no image
    fails before calibration starts."""
    try:
        import PIL  # noqa: F401
    except ImportError as e:
        raise CommandError(f"--calib {folder}: reading images needs Pillow (pip install pillow)") from e
    model_channels, model_size = _model_image_shape(model)
    size = options.size or model_size
    if size is None:
        raise CommandError(f"--calib {folder}: give --image-size H W (the model does not say what size of images "
                           "it takes)")
    channels = options.channels or model_channels or 3
    if channels not in (1, 3):
        raise CommandError(f"--calib {folder}: the model takes {channels} channels; images give 1 or 3")
    mean = _per_channel(options.mean, 0.0, "--mean", channels)
    std = _per_channel(options.std, 1.0, "--std", channels)
    files = image_files(pathlib.Path(folder))
    if not files:
        raise CommandError(f"--calib {folder}: no {' / '.join(IMAGE_SUFFIXES)} files in this folder")
    files = files[:limit] if limit is not None else files
    for f in files:
        _check_header(f)
    normalize = options.mean is not None or options.std is not None
    return ImageBatches(files, batch_size, size, channels, mean if normalize else None, std if normalize else None)


def _check_header(path: pathlib.Path) -> None:
    from PIL import Image

    try:
        with Image.open(path):
            pass
    except Exception as e:  # PIL.UnidentifiedImageError, OSError
        first = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise CommandError(f"--calib {path}: cannot read this image ({type(e).__name__}: {first})") from e


def _per_channel(values: tuple[float, ...] | None, default: float, flag: str, channels: int) -> torch.Tensor:
    """``values`` as a ``[channels, 1, 1]`` tensor (one value is used for every channel)."""
    if values is None:
        return torch.full((channels, 1, 1), default)
    if len(values) not in (1, channels):
        raise CommandError(f"{flag} takes one value or {channels} (one per channel), got {len(values)}")
    return torch.tensor(values, dtype=torch.float32).reshape(-1, 1, 1).expand(channels, 1, 1)
