"""Validated options: one description of a keyword option and one integer check, used by every layer.

:class:`Option` describes a compressor's or a hook's keyword option (type, default, accepted range, help) as
``tailq list`` shows it, and validates a value against it. :func:`check_int` is the integer-with-a-range check that
hooks, the harness and the network layer share (a bool is not an integer here).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

__all__ = ["Option", "check_int"]


def check_int(
    name: str, value: Any, low: int, high: int | None = None, *, error: type[Exception] = ValueError
) -> int:
    """``value`` as an int when it is an integer (not a bool) in [low, high]; else ``error`` naming ``name``.

    The message reads ``"{name} must be an integer >= {low}; got {value!r}"`` (or ``in [low, high]``).
    """
    ok = not isinstance(value, bool) and isinstance(value, int) and value >= low and (high is None or value <= high)
    if not ok:
        need = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise error(f"{name} must be an integer {need}; got {value!r}")
    return int(value)


@dataclasses.dataclass(frozen=True)
class Option:
    """A validated keyword option (of a compressor or a hook), as shown by ``tailq list``."""

    type: type
    default: Any
    help: str
    low: float | None = None
    high: float | None = None  # math.inf admits inf itself (e.g. "no clipping")
    choices: tuple[Any, ...] | None = None
    low_open: bool = False  # the range is (low, high] instead of [low, high]

    def range_text(self) -> str:
        if self.choices is not None:
            return " | ".join(map(str, self.choices))
        if self.low is None and self.high is None:
            return self.type.__name__
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        return f"{'(' if self.low_open else '['}{lo}, {hi}]"

    def describe(self) -> str:
        default = "auto" if self.default is None else repr(self.default)
        return f"{self.range_text()} (default {default}): {self.help}"

    def validate(self, owner: str, name: str, value: Any) -> Any:
        where = f"{owner}: option {name!r}"
        if value is None and self.default is None:
            return None  # "auto": the owner fills it in
        if self.type is bool:
            if not isinstance(value, bool):
                raise TypeError(f"{where} must be a bool, got {value!r}")
            return value
        if self.type is int:
            if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
                raise TypeError(f"{where} must be an integer, got {value!r}")
            value = int(value)
        elif self.type is float:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"{where} must be a number, got {value!r}")
            value = float(value)
            if math.isnan(value) or (math.isinf(value) and not (value > 0 and self.high == math.inf)):
                raise ValueError(f"{where} must be in {self.range_text()}; got {value!r}")
        elif self.type is str and not isinstance(value, str):
            raise TypeError(f"{where} must be a string, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"{where} must be one of {', '.join(map(str, self.choices))}; got {value!r}")
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        if below or (self.high is not None and value > self.high):
            raise ValueError(f"{where} must be in {self.range_text()}; got {value!r}")
        return value
