"""`QuantConfig`: what `prepare` quantizes and how (defaults, per-type, per-name rules, exclusions)."""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..core.dicts import check_keys, field_names
from ..nn.modules.base import LayerQuantConfig


def _type_key(key: Any, where: str) -> str:
    if isinstance(key, type):
        return key.__name__
    if isinstance(key, str):
        return key
    raise TypeError(f"QuantConfig.{where} keys must be class names or classes, got {type(key).__name__}")


def _check_layer(value: Any, where: str) -> None:
    if value is not None and not isinstance(value, LayerQuantConfig):
        raise TypeError(f"QuantConfig.{where} must be a LayerQuantConfig or None, got {type(value).__name__}")


@dataclass(frozen=True)
class Decision:
    """What `prepare` does with one module, and why."""

    config: LayerQuantConfig | None
    reason: str  # "default", "type:Conv2d", "rule:'encoder.*'", "exclude:'head'"


@dataclass(frozen=True)
class QuantConfig:
    """How `quanta.prepare` treats a model.

    Precedence for a module named ``n``: ``exclude`` patterns and ``rules``, then
    ``module_types`` (closest class in the module's MRO), then ``default``. A pattern (exact
    name or glob like ``encoder.layer.*.attention.*``) covers the shallowest module (or
    container) of ``n``'s path that it matches and everything inside it; of the patterns
    covering ``n``, the one whose covered module lies deepest wins (so
    ``rules={"features.3": cfg, "*": None}`` quantizes only ``features.3``, and
    ``exclude=["layers.*.self_attn"]`` keeps all of ``layers.0.self_attn`` float next to a
    rule on ``"layers.*"``, although that glob's ``*`` also matches
    ``layers.0.self_attn.out_proj``); at equal depth an exclusion beats a rule, and the first
    rule beats later ones. A rule or type mapped to ``None`` leaves those modules in float; a
    type mapped to ``None`` also everything inside them.
    """

    default: LayerQuantConfig = field(default_factory=LayerQuantConfig)
    module_types: Mapping[Any, LayerQuantConfig | None] = field(default_factory=dict)
    rules: Mapping[str, LayerQuantConfig | None] = field(default_factory=dict)
    exclude: tuple[str, ...] = ()
    fold_bn: bool = False
    #: PTQ algorithms the pipeline runs (`quanta.algorithms.ALGORITHMS`): "cle" and
    #: "high_bias_absorption" on the float model after BatchNorm folding, "bias_correction" after
    #: the quantizers are in place; after calibration, in this order, "best_calibration",
    #: "adaround", "empirical_bias_correction"
    algorithms: tuple[str, ...] = ()
    #: options per algorithm that takes some (``{"adaround": {"iterations": 500}}``): the fields of its
    #: options dataclass (`quanta.algorithms.pipeline.REGISTRY`), validated here
    algorithm_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    version: int = 1

    def __post_init__(self) -> None:
        _check_layer(self.default, "default")
        if self.default is None:
            raise TypeError("QuantConfig.default must be a LayerQuantConfig")
        if not isinstance(self.module_types, Mapping):
            raise TypeError(f"QuantConfig.module_types must be a mapping, got {type(self.module_types).__name__}")
        if not isinstance(self.rules, Mapping):
            raise TypeError(f"QuantConfig.rules must be a mapping, got {type(self.rules).__name__}")
        types = {}
        for k, v in self.module_types.items():
            name = _type_key(k, "module_types")
            _check_layer(v, f"module_types[{name!r}]")
            types[name] = v
        object.__setattr__(self, "module_types", types)
        for k, v in self.rules.items():
            if not isinstance(k, str):
                raise TypeError(f"QuantConfig.rules keys must be module names or globs, got {type(k).__name__}")
            _check_layer(v, f"rules[{k!r}]")
        object.__setattr__(self, "rules", dict(self.rules))
        if isinstance(self.exclude, str):
            object.__setattr__(self, "exclude", (self.exclude,))
        if not isinstance(self.exclude, (tuple, list)) or not all(isinstance(p, str) for p in self.exclude):
            raise TypeError("QuantConfig.exclude must be a tuple of module names or globs")
        object.__setattr__(self, "exclude", tuple(self.exclude))
        if not isinstance(self.fold_bn, bool):
            raise TypeError(f"QuantConfig.fold_bn must be a bool, got {type(self.fold_bn).__name__}")
        from ..algorithms.pipeline import check_algorithms, check_options

        object.__setattr__(self, "algorithms", check_algorithms(self.algorithms))
        object.__setattr__(self, "algorithm_options", check_options(self.algorithm_options, self.algorithms))
        if isinstance(self.version, bool) or not isinstance(self.version, int):
            raise TypeError("QuantConfig.version must be an int")
        if self.version > 1:
            raise ValueError(f"QuantConfig.version {self.version} is newer than supported (1)")

    def extended(self, exclude: Any = (), rules: Mapping[str, LayerQuantConfig | None] | None = None,
                 algorithms: Any = (), algorithm_options: Mapping[str, Mapping[str, Any]] | None = None
                 ) -> QuantConfig:
        """This config with more ``exclude`` patterns and ``rules`` (the new ones come first, so
        they win over rules already there: a rule's first match wins) and more ``algorithms``
        (after its own; validated) and ``algorithm_options`` (per algorithm, over its own)."""
        algorithms = (algorithms,) if isinstance(algorithms, str) else algorithms
        if not isinstance(algorithms, (tuple, list)):
            raise TypeError(f"algorithms must be a list of algorithm names, got {type(algorithms).__name__}")
        exclude = (exclude,) if isinstance(exclude, str) else exclude
        if not isinstance(exclude, (tuple, list)):
            raise TypeError(f"exclude must be a list of module names or globs, got {type(exclude).__name__}")
        if rules is not None and not isinstance(rules, Mapping):
            raise TypeError(f"rules must be a mapping of module names or globs to LayerQuantConfig / None, "
                            f"got {type(rules).__name__}")
        return dataclasses.replace(self, exclude=tuple(exclude) + tuple(self.exclude),
                                   algorithms=tuple(self.algorithms) + tuple(algorithms),
                                   algorithm_options={**self.algorithm_options, **(algorithm_options or {})},
                                   rules={**(rules or {}), **{k: v for k, v in self.rules.items()
                                                               if k not in (rules or {})}})

    # ------------------------------------------------------------------ resolution
    def patterns(self) -> tuple[str, ...]:
        return tuple(self.exclude) + tuple(self.rules)

    def decide(self, name: str, module: nn.Module) -> Decision:
        scopes = _scopes(name)[::-1]  # the outermost container first, the module itself last
        best: tuple[int, Decision] | None = None
        for pat in self.exclude:
            depth = _covered_depth(pat, scopes)
            if depth and (best is None or depth > best[0]):
                best = (depth, Decision(None, f"exclude:{pat!r}"))
        for pat, cfg in self.rules.items():
            depth = _covered_depth(pat, scopes)
            if depth and (best is None or depth > best[0]):
                best = (depth, Decision(cfg, f"rule:{pat!r}"))
        if best is not None:
            return best[1]
        for base in type(module).__mro__:
            if base.__name__ in self.module_types:
                return Decision(self.module_types[base.__name__], f"type:{base.__name__}")
        return Decision(self.default, "default")

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        layer = lambda c: None if c is None else c.to_dict()
        return {
            "default": self.default.to_dict(),
            "module_types": {k: layer(v) for k, v in self.module_types.items()},
            "rules": {k: layer(v) for k, v in self.rules.items()},
            "exclude": list(self.exclude),
            "fold_bn": self.fold_bn,
            "algorithms": list(self.algorithms),
            **({"algorithm_options": {k: dict(v) for k, v in self.algorithm_options.items()}}
               if self.algorithm_options else {}),
            "version": self.version,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantConfig:
        data = check_keys("QuantConfig", data, field_names(cls))
        layer = lambda d: None if d is None else LayerQuantConfig.from_dict(d)
        return cls(
            default=LayerQuantConfig.from_dict(data.get("default", {})) if "default" in data else LayerQuantConfig(),
            module_types={k: layer(v) for k, v in data.get("module_types", {}).items()},
            rules={k: layer(v) for k, v in data.get("rules", {}).items()},
            exclude=tuple(data.get("exclude", ())),
            fold_bn=data.get("fold_bn", False),
            algorithms=tuple(data.get("algorithms", ())),
            algorithm_options=data.get("algorithm_options", {}),
            version=data.get("version", 1),
        )


def _scopes(name: str) -> list[str]:
    """``a.b.c`` → ``["a.b.c", "a.b", "a"]``."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


def _covered_depth(pattern: str, outermost_first: list[str]) -> int:
    """How deep (1 = a top-level module) the shallowest scope that ``pattern`` matches lies: the
    module it covers with everything inside; 0 where it matches none."""
    return next((i for i, scope in enumerate(outermost_first, 1) if _matches(pattern, scope)), 0)


def _matches(pattern: str, name: str) -> bool:
    return pattern == name or fnmatch.fnmatchcase(name, pattern)
