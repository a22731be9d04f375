"""The file itself: safetensors tensors plus a JSON manifest in its metadata, checked on read.

Layout (the safetensors format, readable by any safetensors reader)::

    u64 little-endian N | N bytes of JSON header | raw tensor bytes
    header["__metadata__"] = {"format": "pt", "quanta": "<manifest JSON>"}

The manifest records, for every tensor, its dtype, shape and SHA-256, so that flipped bytes,
edited shapes or a truncated file are refused before anything is built from it. Nothing is
ever unpickled: safetensors holds raw bytes and the manifest is JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from typing import Any

import torch

FORMAT_NAME = "quanta"
FORMAT_VERSION = 1
METADATA_KEY = "quanta"
_MAX_HEADER = 100 * 1024 * 1024


class QuantaFileError(ValueError):
    """The file is not a quanta file, is damaged, or was altered."""


def tensor_digest(t: torch.Tensor) -> str:
    data = t.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def unique_tensors(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors to store (one per distinct storage view) and aliases ``name -> stored name`` for
    tied weights, which safetensors cannot hold twice."""
    stored: dict[str, torch.Tensor] = {}
    seen: dict[tuple[Any, ...], str] = {}
    storages: set[tuple[Any, int]] = set()
    aliases: dict[str, str] = {}
    for name, t in state.items():
        ptr = (t.device, t.untyped_storage().data_ptr())
        key = (*ptr, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        out = t.detach().cpu().contiguous()
        if ptr in storages or out.untyped_storage().nbytes() != out.numel() * out.element_size():
            out = out.clone()  # a view into a shared or larger storage: safetensors stores it alone
        storages.add(ptr)
        stored[name] = out
    return stored, aliases


def write(path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> int:
    """Write the file (atomically: a temporary file renamed into place); returns its size."""
    from safetensors.torch import save

    manifest = dict(manifest)
    manifest["tensors"] = {n: {"dtype": _dtype_name(t.dtype), "shape": list(t.shape), "sha256": tensor_digest(t)}
                           for n, t in tensors.items()}
    blob = save(tensors, metadata={"format": "pt", METADATA_KEY: json.dumps(manifest, sort_keys=True)})
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(blob)
    os.replace(tmp, path)
    return len(blob)


def read_header(data: bytes, source: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(safetensors header, manifest)`` from the file's bytes, validated."""
    if len(data) < 8:
        raise QuantaFileError(f"{source}: not a quanta file ({len(data)} bytes; truncated?)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > min(len(data) - 8, _MAX_HEADER):
        raise QuantaFileError(f"{source}: not a safetensors file (header length {n} does not fit in "
                              f"{len(data)} bytes): truncated, or another format such as a torch.save pickle")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise QuantaFileError(f"{source}: the safetensors header is not valid JSON ({e}); the file is damaged") from e
    if not isinstance(header, dict):
        raise QuantaFileError(f"{source}: the safetensors header is not a JSON object")
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or METADATA_KEY not in meta:
        raise QuantaFileError(f"{source}: a safetensors file without a quanta manifest (not written by "
                              "quanta.save); load it with safetensors and load_state_dict instead")
    try:
        manifest = json.loads(meta[METADATA_KEY])
    except (TypeError, json.JSONDecodeError) as e:
        raise QuantaFileError(f"{source}: the quanta manifest is not valid JSON ({e}); the file is damaged") from e
    check_manifest(manifest, source)
    return header, manifest


def check_manifest(manifest: Any, source: str) -> None:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise QuantaFileError(f"{source}: the manifest does not identify a quanta file")
    version = manifest.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise QuantaFileError(f"{source}: the manifest has no valid format_version ({version!r})")
    if version > FORMAT_VERSION:
        raise QuantaFileError(f"{source}: written in quanta file format version {version} (by quanta "
                              f"{manifest.get('quanta_version', '?')}); this quanta reads versions up to "
                              f"{FORMAT_VERSION}: upgrade quanta to load it")
    for key, kind in (("modules", list), ("tensors", dict), ("aliases", dict)):
        if not isinstance(manifest.get(key), kind):
            raise QuantaFileError(f"{source}: the manifest's {key!r} is missing or not a {kind.__name__}")


def read(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and manifest of a quanta file; every tensor's dtype, shape and digest checked."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    source = os.fspath(path)
    with open(source, "rb") as f:
        data = f.read()
    header, manifest = read_header(data, source)
    try:
        tensors = load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise QuantaFileError(f"{source}: the tensor data is damaged or truncated ({e})") from e
    expected = manifest["tensors"]
    if set(expected) != set(tensors):
        extra, missing = sorted(set(tensors) - set(expected)), sorted(set(expected) - set(tensors))
        raise QuantaFileError(f"{source}: the tensors do not match the manifest (unexpected {extra[:3]}, "
                              f"missing {missing[:3]})")
    for name, t in tensors.items():
        info = expected[name]
        if not isinstance(info, dict):
            raise QuantaFileError(f"{source}: malformed manifest entry for tensor {name!r}")
        if info.get("dtype") != _dtype_name(t.dtype) or info.get("shape") != list(t.shape):
            raise QuantaFileError(f"{source}: tensor {name!r} is {_dtype_name(t.dtype)}{list(t.shape)} in the file "
                                  f"but the manifest says {info.get('dtype')}{info.get('shape')}: the file was altered")
        if info.get("sha256") != tensor_digest(t):
            raise QuantaFileError(f"{source}: tensor {name!r} does not match its checksum: the file is damaged "
                                  "or was altered")
    for alias, target in manifest["aliases"].items():
        if target not in tensors:
            raise QuantaFileError(f"{source}: alias {alias!r} names a missing tensor {target!r}")
        tensors[alias] = tensors[target]
    return tensors, manifest
