"""What every integer-execution module shares: canonical storage, packing, kernel accounting."""

from __future__ import annotations

from collections import Counter
from typing import Any, ClassVar

import torch
from torch import nn

from ..kernels import native
from ..kernels.binding import Binding


def _repack_after_load(module: IntegerModule, incompatible: Any) -> None:
    """``load_state_dict`` post-hook: rebuild the runtime form from the loaded canonical buffers
    (at once: a loaded model is ready, e.g. for torch.compile, before its first call)."""
    module.pack()
    module.ensure_packed()


_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


class IntegerModule(nn.Module):
    """Base of modules that hold integer weights and call integer kernels.

    *Save canonical, run packed*: persistent buffers hold kernel-independent tensors (int8
    codes, int4 codes bit-packed two per byte, float scales, zero points, bias); the runtime
    (packed) form is whatever the chosen kernel needs (prepacked weights, layouts), held as
    non-persistent state, built by ``build_packed()``. ``pack()`` runs after every change it
    depends on (``load_state_dict``, ``.to()``, a new implementation preference, a copy) and
    forgets the module's `Binding` (``binding``: the settled kernel choices and calls). A module
    never built yet (from construction until `convert` or ``load_state_dict`` ends, or its
    first call) stays so: ``ensure_packed()`` builds it once, however many times ``pack()`` ran
    before; a built module is rebuilt at once. ``kernel_counts`` counts which implementation
    ran per call, so tests and reports can say which kernel actually ran.
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
    #: at most this many input signatures settled per module (`Binding.limit`; None: no bound)
    _SETTLED_LIMIT: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())
        for key in ("binding", *self._RUNTIME):  # (settled calls hold this module's tensors)
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_stale", True)  # (a module pickled before packing was deferred)
        self.binding = Binding(self.kernel_counts, self._SETTLED_LIMIT)
        if self._RUNTIME:
            self.pack()

    def __init__(self) -> None:
        super().__init__()
        native.ensure()  # the fused CPU kernels: built once per machine, loaded once per process
        self.kernel_counts: Counter[str] = Counter()
        #: the settled kernel choices and calls (`quanta.kernels.binding`), replaced by pack()
        self.binding = Binding(self.kernel_counts, self._SETTLED_LIMIT)
        #: the runtime form must be (re)built from the canonical buffers before the next call
        self._stale = True
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
        """The canonical buffers (or the device, ``impl``, a fused activation) changed: forget
        what the binding settled and rebuild the runtime (packed) form before the next call.

        In quanta, *pack* means this: lay the canonical buffers out for the kernels of this
        machine (prepacked weights, column sums, layouts), at convert and load time. Storing
        several low-bit codes per byte is *bit packing* (`quanta.core.pack_bits`), which the
        canonical buffers already hold. The layout work is ``build_packed``: at once where it
        was built before (so that nothing stale is ever served), else left to ``ensure_packed``
        (convert's end, a load, the first call), so that building a module packs it once. A
        subclass overriding ``pack()`` calls ``super().pack()`` (its binding is forgotten there)."""
        self.forget_settled()
        if getattr(self, "_stale", True):  # never built (or pending): built once, when first needed
            return
        self._stale = True
        self.ensure_packed()

    def forget_settled(self) -> None:
        """Forget what the binding settled (a new `Binding`), keeping the packed form: for changes
        that settled calls carry but the packed form does not (a fused activation)."""
        self.binding = Binding(self.kernel_counts, self._SETTLED_LIMIT)

    def build_packed(self) -> None:
        """Build the runtime (packed) form from the canonical buffers (subclasses with one)."""

    @torch.compiler.disable  # (a first call under torch.compile builds eagerly, then traces)
    def ensure_packed(self) -> None:
        """Run ``build_packed()`` if ``pack()`` ran since the last build. Callers test ``_stale``
        first (``if self._stale: self.ensure_packed()``): under torch.compile that is a guard, not
        a graph break."""
        if self._stale:
            self.build_packed()
            self._stale = False  # (last: a concurrent caller never sees a half-built form as fresh)

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

    def record(self, impl: str) -> str:
        """Count one call of ``impl`` (`Binding.record`: not while torch.compile traces)."""
        return self.binding.record(impl)

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
