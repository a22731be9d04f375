"""Integer ops, each defined once with ``torch.library`` (namespace ``quanta``): a readable
reference implementation plus fast implementations behind explicit guards (see `library`)."""

from .library import LIB, Impl, KernelOp

__all__ = ["LIB", "Impl", "KernelOp"]
