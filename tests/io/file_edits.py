"""Edit a file written by `quanta.save` as a person (or a corrupted disk) would: its safetensors
header and its JSON manifest, with or without recomputing the manifest's checksum."""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any


def split(path: str | Path) -> tuple[dict[str, Any], bytes]:
    """``(header, body)`` of a safetensors file."""
    data = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def write(path: str | Path, header: dict[str, Any], body: bytes) -> None:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def edit_manifest(path: str | Path, edit: Callable[[dict[str, Any]], Any], *, recompute_digest: bool = True) -> None:
    """Apply ``edit`` to the manifest; by default as a deliberate edit would (its checksum
    recomputed), so that what a test checks is the validation of the values themselves."""
    header, body = split(path)
    manifest = json.loads(header["__metadata__"]["quanta"])
    edit(manifest)
    text = json.dumps(manifest)
    header["__metadata__"]["quanta"] = text
    if recompute_digest:
        header["__metadata__"]["quanta_sha256"] = hashlib.sha256(text.encode()).hexdigest()
    write(path, header, body)
