"""`inspect`: what a quanta file holds (manifest, bytes per layer, totals), without building it."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from .record_checks import checked_manifest
from .safe_file import read_head, read_header


@dataclass
class LayerSize:
    path: str
    kind: str  # "integer", "simulated", "float"
    cls: str
    bytes: int
    dtypes: dict[str, int] = field(default_factory=dict)  # dtype -> bytes


@dataclass
class FileReport:
    path: str
    file_bytes: int
    manifest: dict[str, Any]
    layers: list[LayerSize]

    @property
    def tensor_bytes(self) -> int:
        return sum(layer.bytes for layer in self.layers)

    def bytes_by_dtype(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for layer in self.layers:
            for dt, n in layer.dtypes.items():
                out[dt] += n
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "file_bytes": self.file_bytes, "tensor_bytes": self.tensor_bytes,
                "bytes_by_dtype": self.bytes_by_dtype(), "manifest": self.manifest,
                "layers": [vars(layer) for layer in self.layers]}

    def __str__(self) -> str:
        m = self.manifest
        arch = m.get("architecture") or {}
        kinds: dict[str, int] = defaultdict(int)
        for rec in m["modules"]:
            if rec.get("kind") in ("integer", "quant"):
                kinds[rec.get("cls", "?")] += 1
        lines = [
            f"{self.path}: quanta file format {m['format_version']} (quanta {m.get('quanta_version', '?')}, "
            f"torch {m.get('torch_version', '?')})",
            f"model: {m.get('kind', '?')}; architecture {arch.get('class', '?')} "
            + ("(rebuildable from the file)" if arch.get("rebuildable") else
               f"(load needs model=: {arch.get('reason', '')})"),
            "quantized modules: " + (", ".join(f"{n}× {c}" for c, n in sorted(kinds.items())) or "none"),
        ]
        if m.get("config") is not None:
            lines.append(f"config: {json.dumps(_config_summary(m['config']))}")
        width = max([len(layer.path) for layer in self.layers] + [5])
        lines.append("")
        lines.append(f"{'layer':<{width}}  {'class':<24} {'bytes':>12}  dtypes")
        for layer in self.layers:
            dts = ", ".join(f"{d} {_human(n)}" for d, n in layer.dtypes.items())
            lines.append(f"{layer.path or '(root)':<{width}}  {layer.cls:<24} {layer.bytes:>12,}  {dts}")
        lines.append("")
        by_dtype = ", ".join(f"{d} {_human(n)}" for d, n in self.bytes_by_dtype().items())
        lines.append(f"total: {len(m['tensors'])} tensors, {self.tensor_bytes:,} bytes ({by_dtype}); "
                     f"file {self.file_bytes:,} bytes")
        return "\n".join(lines)


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _config_summary(config: dict[str, Any]) -> dict[str, Any]:
    """The applied config without per-field noise: which layers get which bits."""
    def short(layer: Any) -> Any:
        if layer is None:
            return None
        # (the manifest stores descriptors without default fields: format "int", 8 bits)
        return {k: (None if v is None else f"{v.get('format', 'int')}{v.get('num_bits', 8)}")
                for k, v in layer.items()}
    return {"default": short(config.get("default")),
            "module_types": {k: short(v) for k, v in config.get("module_types", {}).items()},
            "rules": {k: short(v) for k, v in config.get("rules", {}).items()},
            "exclude": config.get("exclude", []), "fold_bn": config.get("fold_bn")}


def inspect(path: str | os.PathLike[str], *, show: bool = True) -> FileReport:
    """Read a quanta file's manifest and tensor table (no tensor data is loaded or checked; every
    field is validated: a damaged file raises `QuantaFileError`), print the report unless
    ``show=False``, and return it."""
    source = os.fspath(path)
    head, size = read_head(source)
    entries, manifest = read_header(head, size, source)
    checked_manifest(manifest, source)
    owners: dict[str, dict[str, Any]] = {}
    for rec in manifest["modules"]:
        owners[rec.get("path", "")] = rec
    layers: dict[str, LayerSize] = {}
    for name, entry in entries.items():
        path = name.rpartition(".")[0]
        while path and path in owners and owners[path].get("kind") == "quantizer":
            path = path.rpartition(".")[0]  # quantizer ranges count with their layer
        rec = owners.get(path, {})
        kind = {"integer": "integer", "quant": "simulated"}.get(rec.get("kind", ""), "float")
        cls = rec.get("cls", "?").split(":")[-1]
        layer = layers.setdefault(path, LayerSize(path, kind, cls, 0))
        nbytes = entry.end - entry.start
        layer.bytes += nbytes
        layer.dtypes[entry.code] = layer.dtypes.get(entry.code, 0) + nbytes
    report = FileReport(source, size, manifest, sorted(layers.values(), key=lambda s: s.path))
    if show:
        print(report)
    return report
