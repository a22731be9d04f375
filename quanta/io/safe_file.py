"""The file itself: safetensors tensors plus a JSON manifest in its metadata, checked on read.

Layout (the safetensors format, readable by any safetensors reader)::

    u64 little-endian N | N bytes of JSON header | raw tensor bytes
    header["__metadata__"] = {"format": "pt", "quanta": "<manifest JSON>", "quanta_sha256": "<its SHA-256>"}

The manifest records, for every tensor, its dtype, shape and SHA-256, and the manifest itself
has a SHA-256 (format version 2; version 1 files had none and still load), so that flipped
bytes, edited fields or a truncated file are refused before anything is built from it. Nothing
is ever unpickled: the header is parsed and range-checked here (dtypes, shapes, offsets that
tile the data exactly, JSON nesting depth) and tensors are copied out of the raw bytes.

Writing is deterministic: sorted keys, tensors ordered by (alignment, name), no timestamps.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from typing import Any

import torch

FORMAT_NAME = "quanta"
FORMAT_VERSION = 2
#: the first version whose manifest carries its own SHA-256
DIGEST_SINCE = 2
METADATA_KEY = "quanta"
DIGEST_KEY = "quanta_sha256"
_MAX_HEADER = 100 * 1024 * 1024
#: deepest JSON nesting a file may hold (quanta writes at most ~8)
MAX_DEPTH = 32
_MAX_RANK = 8

#: safetensors dtype codes quanta reads, and their torch dtypes
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_CODES = {v: k for k, v in DTYPES.items()}


class QuantaFileError(ValueError):
    """The file is not a quanta file, is damaged, or was altered."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the safetensors header, validated: where its bytes are in the data."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.dtype)

    @property
    def code(self) -> str:
        return _CODES[self.dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _raw(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(_raw(t)).hexdigest()


def manifest_text(manifest: dict[str, Any]) -> str:
    """The manifest as stored: one canonical JSON text (sorted keys)."""
    return json.dumps(manifest, sort_keys=True)


def unique_tensors(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors to store (one per distinct tensor view) and aliases ``name -> stored name`` for
    tied weights, which safetensors cannot hold twice."""
    from ..integer.base import tensor_identity

    stored: dict[str, torch.Tensor] = {}
    seen: dict[tuple[Any, ...], str] = {}
    storages: set[tuple[Any, int]] = set()
    aliases: dict[str, str] = {}
    for name, t in state.items():
        key = tensor_identity(t)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        out = t.detach().cpu().contiguous()
        ptr = key[:2]
        if ptr in storages or out.untyped_storage().nbytes() != out.numel() * out.element_size():
            out = out.clone()  # a view into a shared or larger storage: safetensors stores it alone
        storages.add(ptr)
        stored[name] = out
    return stored, aliases


def write(path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> int:
    """Write the file (atomically: a temporary file renamed into place); returns its size. The
    same tensors and manifest always give the same bytes."""
    manifest = dict(manifest)
    for name, t in tensors.items():
        if t.dtype not in _CODES:
            raise TypeError(f"quanta.save: tensor {name!r} has dtype {t.dtype}, which the file format does not hold")
    manifest["tensors"] = {n: {"dtype": dtype_name(t.dtype), "shape": list(t.shape), "sha256": tensor_digest(t)}
                           for n, t in tensors.items()}
    text = manifest_text(manifest)
    header: dict[str, Any] = {"__metadata__": {"format": "pt", METADATA_KEY: text,
                                               DIGEST_KEY: hashlib.sha256(text.encode()).hexdigest()}}
    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))  # aligned, no padding needed
    offset = 0
    for name in order:
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name in order:
            f.write(_raw(tensors[name]))
    os.replace(tmp, path)
    return 8 + len(raw) + offset


# ------------------------------------------------------------------------------ reading
def json_depth_problem(value: Any, limit: int = MAX_DEPTH) -> str | None:
    """Why ``value`` nests deeper than ``limit`` (checked without recursion), else None."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if depth > limit:
            return f"JSON nested deeper than {limit} levels"
        if isinstance(v, dict):
            stack.extend((x, depth + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, depth + 1) for x in v)
    return None


def _json(text: str | bytes, what: str, source: str) -> Any:
    try:
        value = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as e:
        raise QuantaFileError(f"{source}: {what} is not valid JSON ({str(e)[:120]}); the file is damaged") from e
    problem = json_depth_problem(value)
    if problem:
        raise QuantaFileError(f"{source}: {what} has {problem}; the file is damaged or was altered")
    return value


def _entry(name: str, info: Any, source: str) -> TensorEntry:
    where = f"{source}: tensor {name!r} in the safetensors header"
    if not isinstance(info, dict):
        raise QuantaFileError(f"{where} is not an object")
    code, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(code, str) or code not in DTYPES:
        raise QuantaFileError(f"{where} has dtype {code!r}; quanta files hold {sorted(DTYPES)}")
    if not isinstance(shape, list) or len(shape) > _MAX_RANK or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**48 for d in shape):
        raise QuantaFileError(f"{where} has an invalid shape {shape!r}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(
            isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets):
        raise QuantaFileError(f"{where} has invalid data_offsets {offsets!r}")
    dtype = DTYPES[code]
    size = math.prod(shape) * dtype.itemsize
    if offsets[1] - offsets[0] != size:
        raise QuantaFileError(f"{where}: data_offsets {offsets} span {offsets[1] - offsets[0]} bytes but "
                              f"{code}{shape} needs {size}; the file was altered")
    return TensorEntry(name, dtype, tuple(shape), offsets[0], offsets[1])


def read_header(head: bytes, file_size: int, source: str) -> tuple[dict[str, TensorEntry], dict[str, Any]]:
    """``(tensor table, manifest)`` from the file's first bytes (at least its header), every field
    validated against the manifest and the file's size; no tensor data is read."""
    if len(head) < 8:
        raise QuantaFileError(f"{source}: not a quanta file ({file_size} bytes; truncated?)")
    (n,) = struct.unpack("<Q", head[:8])
    if n > min(file_size - 8, _MAX_HEADER) or len(head) < 8 + n:
        raise QuantaFileError(f"{source}: not a safetensors file (header length {n} does not fit in "
                              f"{file_size} bytes): truncated, or another format such as a torch.save pickle")
    header = _json(head[8:8 + n], "the safetensors header", source)
    if not isinstance(header, dict):
        raise QuantaFileError(f"{source}: the safetensors header is not a JSON object")
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or not isinstance(meta.get(METADATA_KEY), str):
        raise QuantaFileError(f"{source}: a safetensors file without a quanta manifest (not written by "
                              "quanta.save); load it with safetensors and load_state_dict instead")
    text, digest = meta[METADATA_KEY], meta.get(DIGEST_KEY)
    if digest is not None and digest != hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest():
        raise QuantaFileError(f"{source}: the manifest does not match its checksum ({DIGEST_KEY}): the file is "
                              "damaged or was altered")
    manifest = _json(text, "the quanta manifest", source)
    check_manifest(manifest, source)
    if digest is None and manifest["format_version"] >= DIGEST_SINCE:
        raise QuantaFileError(f"{source}: the manifest of a format version {manifest['format_version']} file has no "
                              f"checksum ({DIGEST_KEY}): the file is damaged or was altered")
    entries = {name: _entry(name, info, source) for name, info in header.items() if name != "__metadata__"}
    _check_layout(entries, file_size - 8 - n, source)
    _check_against_manifest(entries, manifest, source)
    return entries, manifest


def _check_layout(entries: dict[str, TensorEntry], body: int, source: str) -> None:
    """The tensors' byte ranges tile the data exactly: no overlap, no hole, nothing past the end."""
    at = 0
    for e in sorted(entries.values(), key=lambda e: (e.start, e.end)):
        if e.start != at:
            raise QuantaFileError(f"{source}: tensor {e.name!r} starts at byte {e.start} of the data, expected "
                                  f"{at} (overlapping or missing bytes): the file is damaged or was altered")
        at = e.end
    if at != body:
        raise QuantaFileError(f"{source}: the tensors span {at} bytes but the file holds {body} after its header: "
                              "truncated, or altered")


def _check_against_manifest(entries: dict[str, TensorEntry], manifest: dict[str, Any], source: str) -> None:
    expected = manifest["tensors"]
    if set(expected) != set(entries):
        extra, missing = sorted(set(entries) - set(expected)), sorted(set(expected) - set(entries))
        raise QuantaFileError(f"{source}: the tensors do not match the manifest (unexpected {extra[:3]}, "
                              f"missing {missing[:3]})")
    for name, e in entries.items():
        info = expected[name]
        if not isinstance(info, dict) or not isinstance(info.get("sha256"), str):
            raise QuantaFileError(f"{source}: malformed manifest entry for tensor {name!r}")
        if info.get("dtype") != e.dtype_name or info.get("shape") != list(e.shape):
            raise QuantaFileError(f"{source}: tensor {name!r} is {e.dtype_name}{list(e.shape)} in the file but the "
                                  f"manifest says {info.get('dtype')}{info.get('shape')}: the file was altered")
    for alias, target in manifest["aliases"].items():
        if not isinstance(target, str) or target not in entries or alias in entries:
            raise QuantaFileError(f"{source}: alias {alias!r} names {target!r}, which is not a stored tensor "
                                  "(or the alias is one itself)")


def check_manifest(manifest: Any, source: str) -> None:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise QuantaFileError(f"{source}: the manifest does not identify a quanta file")
    version = manifest.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise QuantaFileError(f"{source}: the manifest has no valid format_version ({version!r})")
    if version > FORMAT_VERSION:
        raise QuantaFileError(f"{source}: written in quanta file format version {version} (by quanta "
                              f"{manifest.get('quanta_version', '?')!s:.20}); this quanta reads versions up to "
                              f"{FORMAT_VERSION}: upgrade quanta to load it")
    for key, kind in (("modules", list), ("tensors", dict), ("aliases", dict)):
        if not isinstance(manifest.get(key), kind):
            raise QuantaFileError(f"{source}: the manifest's {key!r} is missing or not a {kind.__name__}")


def read_head(source: str) -> tuple[bytes, int]:
    """The file's first 8 bytes and its header (only), and the file's size."""
    size = os.path.getsize(source)
    with open(source, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        return head + f.read(min(n, max(size - 8, 0), _MAX_HEADER)), size


def read(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and manifest of a quanta file; every tensor's dtype, shape and digest checked.
    Memory: the file's bytes plus one copy of its tensors."""
    source = os.fspath(path)
    with open(source, "rb") as f:
        data = f.read()
    entries, manifest = read_header(data, len(data), source)
    base = 8 + struct.unpack("<Q", data[:8])[0]
    view = memoryview(data)
    tensors: dict[str, torch.Tensor] = {}
    for name, e in entries.items():
        chunk = view[base + e.start:base + e.end]
        if hashlib.sha256(chunk).hexdigest() != manifest["tensors"][name]["sha256"]:
            raise QuantaFileError(f"{source}: tensor {name!r} does not match its checksum: the file is damaged "
                                  "or was altered")
        flat = torch.frombuffer(bytearray(chunk), dtype=torch.uint8) if len(chunk) else torch.empty(0, dtype=torch.uint8)
        tensors[name] = flat.view(e.dtype).reshape(e.shape)
    for alias, target in manifest["aliases"].items():
        tensors[alias] = tensors[target]
    return tensors, manifest
