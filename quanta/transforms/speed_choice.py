"""What the speed check decided, per layer (`SpeedChoice`), and the layers a converted model keeps
float with why (`KeptFloat`, `kept_float`): the one place these are described and written."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .decisions import REPORT_ATTR
from .speed_cache import is_busy

#: an int8 compute layer becomes float only when it takes more than this times its float twin's time
DEFAULT_TOLERANCE = 1.10
#: attribute of a float twin the speed check put back: its `SpeedChoice` (read by `kept_float`)
SPEED_CHOICE_ATTR = "_quanta_speed_choice"


@dataclass(frozen=True)
class SpeedChoice:
    """One layer's decision: integer or float, with both timings (see `quanta.transforms.speed_check`)."""

    name: str
    integer: str  # the integer class
    input_shape: tuple[int, ...]
    integer_ms: float  # fastest round (or the cached measurement)
    float_ms: float
    picked: str  # "integer" or "float"
    kernel: str = ""  # the implementation(s) the integer module ran
    ratio: float = 0.0  # the decisive integer / float time ratio (the smaller of the two estimates)
    tolerance: float = DEFAULT_TOLERANCE
    cached: bool = False  # reused from this machine's cache, not measured now
    #: for a member of a uint8 chain (decided as a whole): its number of integer layers and the sums
    #: of their fastest rounds; 0 otherwise
    chain_layers: int = 0
    chain_integer_ms: float = 0.0
    chain_float_ms: float = 0.0
    #: what would make this layer fast here, when it went float (e.g. 7-bit weights on a CPU without VNNI)
    hint: str = ""
    #: the load the timings were taken under (`speed_cache.MachineLoad`: the share of this process's
    #: cores other processes occupied; None: unknown)
    load: float | None = None

    @property
    def busy(self) -> bool:
        """Whether the timings were taken on a busy machine (`speed_cache.BUSY_LOAD`)."""
        return is_busy(self.load)

    def timings(self) -> str:
        """``"(0.123 ms vs float 0.045 ms)"``: the one way timings are written (`quanta.save` strips
        exactly this from a report's detail, so a saved file stays a function of the model)."""
        return _timings(self.integer_ms, self.float_ms)

    def describe(self) -> str:
        """For the log: the decision with its timings (and the load they were taken under)."""
        load = f" (other processes on {self.load:.0%} of its cores)" if self.busy else ""
        return f"{self.report_detail()}{load}{' (cached)' if self.cached else ''}"

    def report_detail(self) -> str:
        """The reason, with both timings and the input (the conversion report's detail)."""
        kernel = f" ({self.kernel})" if self.kernel else ""
        chain = f"; its uint8 chain of {self.chain_layers} integer layers " \
                f"{_timings(self.chain_integer_ms, self.chain_float_ms)}" if self.chain_layers else ""
        busy = "; measured on a busy machine" if self.busy else ""
        if self.picked == "float":
            return (f"{self.integer}{kernel} on input {list(self.input_shape)} {self.timings()}{chain}: more than "
                    f"{self.tolerance:.2f}x float's time on this machine{busy}; float kept{self.hint}")
        return f"speed-checked {self.timings()}{chain}: at most {self.tolerance:.2f}x float's time{busy}"


def _timings(integer_ms: float, float_ms: float) -> str:
    return f"({integer_ms:.3f} ms vs float {float_ms:.3f} ms)"


@dataclass(frozen=True)
class KeptFloat:
    """A layer quanta was asked to quantize and keeps float, and why: the speed check measured its
    integer kernel slower (``integer_ms`` / ``float_ms`` on ``input_shape``, fastest rounds), or it
    could not be lowered (its shape does not fit the config, calibration never reached it, a
    subclass ``forward`` quanta cannot follow: no timings). A model loaded from a file has the
    reasons without the timings (files hold no timings)."""

    name: str
    type: str  # the float module's class
    reason: str  # the conversion report's detail
    integer: str = ""  # the integer class the speed check timed ("" when none was)
    integer_ms: float | None = None
    float_ms: float | None = None
    input_shape: tuple[int, ...] | None = None

    def describe(self) -> str:
        """``"head (Linear): integer kernel slower: Int8Linear on input [64, 10] (0.031 ms vs float 0.012 ms):
        ..."``: the one line every consumer (CLI, demo, benchmark notes) prints."""
        return f"{self.name} ({self.type}): {self.reason}"


def kept_float(model: nn.Module) -> list[KeptFloat]:
    """The layers of a converted ``model`` that stay float, in conversion order, with the speed
    check's timings where it decided (see `KeptFloat`); ``[]`` for a model not converted by quanta."""
    out = []
    for row in getattr(model, REPORT_ATTR, []):
        if row.result != "float":
            continue
        try:
            mod: nn.Module | None = model.get_submodule(row.name) if row.name else model
        except AttributeError:
            mod = None
        choice = getattr(mod, SPEED_CHOICE_ATTR, None) if mod is not None else None
        layer = mod[0] if isinstance(mod, nn.Sequential) and choice is not None else mod  # (twin, its activation)
        kind = type(layer).__name__ if layer is not None else row.simulated
        if isinstance(choice, SpeedChoice):
            out.append(KeptFloat(row.name, kind, row.detail, choice.integer, choice.integer_ms, choice.float_ms,
                                 choice.input_shape))
        else:
            out.append(KeptFloat(row.name, kind, row.detail))
    return out
