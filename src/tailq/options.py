"""Validated options: one description of a keyword option and one integer check, used by every layer.

:class:`Option` describes a compressor's or a hook's keyword option (type, default, accepted range, help) as
``tailq list`` shows it, and validates a value against it. :func:`check_int` is the integer-with-a-range check that
hooks, the harness and the network layer share (a bool is not an integer here); :func:`check_float` is its
counterpart for real numbers (finite: NaN and infinities are refused), and :func:`check_name` the check of a value
that becomes one path component (a run id, a method label).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

__all__ = ["FLOAT32_MAX", "FLOAT32_TINY", "INT64_MAX", "MAX_BUCKET_CAP_MB", "MAX_WORKERS", "SEED_MAX", "Option",
           "check_float", "check_int", "check_name"]

INT64_MAX = 2**63 - 1  # the largest count torch (and JSON readers with 64-bit integers) can hold
FLOAT32_MAX = 3.4028234663852886e38  # float32's largest finite value (the codec computes in float32)
FLOAT32_TINY = 1.1754943508222875e-38  # float32's smallest normal value
SEED_MAX = 2**32 - 1  # seeds: what every generator here accepts (numpy's legacy ones stop at 2^32 - 1)
MAX_WORKERS = 250  # workers of one run: the hosts of an emulated network's /24 subnet
MAX_BUCKET_CAP_MB = 1e6  # DDP's bucket cap (MB) becomes a byte count in C++: a terabyte is beyond any model here


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


def _g(x: float) -> str:
    return f"{x:g}"


def check_float(
    name: str, value: Any, low: float | None = None, high: float | None = None, *, low_open: bool = False,
    high_open: bool = False, error: type[Exception] = ValueError, note: str = ""
) -> float:
    """``value`` as a float when it is a finite real number (not a bool) in the range; else ``error`` naming ``name``.

    The range is ``[low, high]`` (``low_open``/``high_open`` exclude an end; ``None`` leaves a side unbounded). The
    message reads ``"{name} must be a finite number {range}{note}; got {value!r}"``, e.g. ``"--lr must be a finite
    number > 0; got inf"`` or ``"--target must be a finite number in (0, 1]; got nan"``.
    """
    ok = not isinstance(value, bool) and isinstance(value, int | float)
    if ok:
        x = float(value) if not isinstance(value, int) or abs(value) < 2**1023 else math.inf
        ok = math.isfinite(x) and (low is None or (x > low if low_open else x >= low)) \
            and (high is None or (x < high if high_open else x <= high))
    if not ok:
        if low is not None and high is not None:
            need = f" in {'(' if low_open else '['}{_g(low)}, {_g(high)}{')' if high_open else ']'}"
        elif low is not None:
            need = f" {'>' if low_open else '>='} {_g(low)}"
        elif high is not None:
            need = f" {'<' if high_open else '<='} {_g(high)}"
        else:
            need = ""
        raise error(f"{name} must be a finite number{need}{note}; got {value!r}")
    return float(value)


_NAME = re.compile(r"[A-Za-z0-9._-]+")


def check_name(name: str, value: Any, *, error: type[Exception] = ValueError) -> str:
    """``value`` when it is a plain name that is safe as one path component: letters, digits, ``-``, ``_`` and
    ``.``, not ``.`` or ``..`` (no path separators, nothing that leaves the parent directory); else ``error``."""
    if not isinstance(value, str) or not _NAME.fullmatch(value) or value in (".", ".."):
        raise error(f"{name} must be a plain name (letters, digits, '-', '_', '.'; not '.' or '..', no path "
                    f"separators); got {value!r}")
    return value


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
