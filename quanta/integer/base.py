"""What every integer-execution module shares: canonical storage, packing, kernel accounting."""

from __future__ import annotations

from collections import Counter
from typing import Any, ClassVar

import torch
from torch import nn

from ..kernels import native


def _repack_after_load(module: IntegerModule, incompatible: Any) -> None:
    """``load_state_dict`` post-hook: rebuild the runtime form from the loaded canonical buffers."""
    module.pack()


_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


class IntegerModule(nn.Module):
    """Base of modules that hold integer weights and call integer kernels.

    *Save canonical, run packed*: persistent buffers hold kernel-independent tensors (int8
    codes, int4 codes bit-packed two per byte, float scales, zero points, bias); ``pack()`` builds
    whatever the chosen kernel needs (prepacked weights, layouts) as non-persistent state, and
    runs after construction and after ``load_state_dict``. ``kernel_counts`` counts which
    implementation ran per call, so tests and reports can say which kernel actually ran.
    """

    #: preferred implementation: "auto" (guards decide), "reference", or a kernel name
    impl: str = "auto"
    #: marker read by simulated containers (which must not take torch's fused float paths)
    is_integer_module = True
    #: the simulated class this integer class lowers (`convert` asks ``accepts`` only of the
    #: classes whose ``simulated_type`` the module is an instance of)
    simulated_type: ClassVar[type]

    #: attributes ``pack()`` builds that a copy (deepcopy, pickle) must not share or cannot
    #: hold (oneDNN's packed weights; settled calls holding this module's tensors): dropped
    #: from the state, and the copy packs its own
    _RUNTIME: tuple[str, ...] = ()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())
        for key in self._RUNTIME:
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if self._RUNTIME:
            self.pack()

    def __init__(self) -> None:
        super().__init__()
        native.ensure()  # the fused CPU kernels: built once per machine, loaded once per process
        self.kernel_counts: Counter[str] = Counter()
        # a module-level function, not a lambda: copies (pickle, torch.save) must be able to hold it
        self.register_load_state_dict_post_hook(_repack_after_load)

    @classmethod
    def check_lowerable(cls, sim: nn.Module) -> None:
        """Raise, saying why, unless the subclass's ``accepts(sim)`` (None, or why not) takes ``sim``:
        the start of every ``from_simulated``."""
        reason = cls.accepts(sim)  # type: ignore[attr-defined]
        if reason is not None:
            raise ValueError(f"{cls.__name__} cannot lower this {type(sim).__name__}: {reason}")

    def pack(self) -> None:
        """Rebuild the runtime (packed) form from the canonical buffers.

        In quanta, *pack* means this: lay the canonical buffers out for the kernels of this
        machine (prepacked weights, column sums, layouts), at convert and load time. Storing
        several low-bit codes per byte is *bit packing* (`quanta.core.pack_bits`), which the
        canonical buffers already hold."""

    def config(self) -> dict[str, Any]:
        """The constructor's arguments as JSON values (specs as dicts, dtypes by name): enough
        for `from_config` to rebuild an empty module that ``load_state_dict`` then fills."""
        raise TypeError(f"{type(self).__name__} does not describe its constructor: implement config() "
                        "to save it with quanta.save")

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> IntegerModule:
        """An empty module (zeros) from `config`'s output; ``load_state_dict`` fills it."""
        from ..core import QuantSpec

        kwargs: dict[str, Any] = {}
        for key, value in config.items():
            if key.endswith("_spec") and value is not None:
                value = QuantSpec.from_dict(value)
            elif key.endswith("dtype") and value is not None:
                if value not in _DTYPES:
                    raise ValueError(f"{cls.__name__}.from_config: unknown dtype {value!r} for {key}")
                value = _DTYPES[value]
            elif isinstance(value, list):
                value = tuple(value)
            kwargs[key] = value
        try:
            return cls(**kwargs)
        except TypeError as e:
            raise ValueError(f"{cls.__name__}.from_config: {e}") from e

    def choose_impl(self, op: Any, key: tuple[Any, ...], *args: Any) -> tuple[str, bool]:
        """``(implementation, chosen_by_guards)`` for a call of ``op`` with ``args``. With
        ``impl="auto"`` the guards' choice is remembered per ``key``, which must hold everything
        about ``args`` that can change between calls and that the guards read (dtype, rank,
        emptiness...); ``pack()`` forgets it."""
        if self.impl != "auto":
            return self.impl, False
        cache = self.__dict__.setdefault("_impl_cache", {})
        impl = cache.get(key)
        if impl is None:
            impl = op.choose(*args)
            if not torch.compiler.is_compiling():
                cache[key] = impl
        return impl, True

    def record(self, impl: str) -> str:
        # Not while torch.compile traces: mutating module state there would invalidate the
        # compiled graph's guards and recompile on every call.
        if not torch.compiler.is_compiling():
            self.kernel_counts[impl] += 1
        return impl

    def storage_bytes(self) -> int:
        """Bytes of the canonical state (what a saved file holds for this module; a tensor held
        under two names counts once)."""
        return distinct_bytes(self.state_dict())

    def check_input(self, x: Any, dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{type(self).__name__} expects a tensor, got {type(x).__name__}")
        if x.dtype not in dtypes:
            raise TypeError(f"{type(self).__name__} expects an input of dtype {' / '.join(map(str, dtypes))}, "
                            f"got {x.dtype}")
        dev = next((b.device for b in self.buffers()), x.device)
        if x.device != dev:
            raise ValueError(f"{type(self).__name__} holds its weights on {dev} but got an input on {x.device}")


def tensor_identity(t: torch.Tensor) -> tuple[Any, ...]:
    """What makes two state entries one tensor (tied weights): the same view of the same storage."""
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()),
            t.dtype)


def distinct_bytes(state: dict[str, torch.Tensor]) -> int:
    """Bytes of ``state``'s tensors, each distinct tensor once (`tensor_identity`)."""
    seen: set[tuple[Any, ...]] = set()
    total = 0
    for t in state.values():
        key = tensor_identity(t)
        if t.numel() and key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def storage_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and persistent buffer of ``model``: what a saved file holds
    (integer modules count their canonical codes, not their packed runtime copies; tied
    weights count once, as the file stores them once)."""
    return distinct_bytes(model.state_dict())
