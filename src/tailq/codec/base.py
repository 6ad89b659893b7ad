"""The one compressor interface, its registry, and input validation.

Every compressor (ours and the baselines) is a small class with three jobs (GRACE-style):

* ``encode(x) -> Encoded``: the tensors that would be handed to a collective, nothing else;
* ``decode(enc) -> Tensor``: the receiver's reconstruction, shaped like ``x``;
* ``target(x) -> Tensor``: what the decode estimates *without bias* (``x`` itself for unbiased
  compressors, the truncated input for truncating ones, ``None``-like for biased ones).

Bits on the wire are always counted from the bytes of the tensors in :class:`Encoded`
(codes, scales, statistics, indices: all metadata included), never from a formula.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch

__all__ = [
    "Compressor",
    "Encoded",
    "Option",
    "check_input",
    "compressor",
    "get_compressor_class",
    "list_compressors",
    "register",
]


@dataclasses.dataclass
class Encoded:
    """One encoded tensor: the named tensors that go on the wire, plus local bookkeeping.

    ``tensors`` holds *only* what a receiver needs to decode (payload and metadata); its byte size is the
    wire cost. ``info`` holds diagnostics that never leave the sender (the design used, alpha, ...).
    """

    tensors: dict[str, torch.Tensor]
    shape: torch.Size
    dtype: torch.dtype
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def wire_bytes(self) -> int:
        """Bytes handed to the collective: every tensor's ``numel * element_size``."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def wire_bits(self) -> int:
        return 8 * self.wire_bytes()

    def bits_per_coord(self) -> float:
        """Wire bits per input coordinate, metadata included (``nan`` for an empty tensor)."""
        n = self.numel
        return self.wire_bits() / n if n else float("nan")


@dataclasses.dataclass(frozen=True)
class Option:
    """A validated keyword option of a compressor, as shown by ``tailq list``."""

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
            return None  # "auto": the compressor fills it in
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


def check_input(x: torch.Tensor, name: str = "x") -> torch.Tensor:
    """Validate a gradient tensor and return it flattened as float32 (a view when possible).

    Raises a ValueError naming ``name`` for non-floating or non-finite input. Empty tensors are allowed
    (every compressor maps empty in to empty out).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    flat = x.reshape(-1)
    if flat.numel() and not bool(torch.isfinite(flat).all()):
        n_nan = int(torch.isnan(flat).sum())
        n_inf = int(torch.isinf(flat).sum())
        raise ValueError(
            f"{name} contains non-finite values ({n_nan} NaN, {n_inf} Inf of {flat.numel()}); "
            "compressors need finite input (the DDP hooks route such buckets uncompressed)"
        )
    return flat.to(torch.float32)


class Compressor(abc.ABC):
    """Base class. Subclasses declare ``name``, ``unbiased`` and ``options`` and implement encode/decode.

    ``unbiased``: E[decode(encode(x))] == target(x) exactly (stochastic rounding).
    ``truncating``: target(x) differs from x (clipping); the bias is x - target(x).
    ``memory``: designed to be used with error feedback (EF-signSGD, top-k); see :class:`ErrorFeedback`.
    """

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    unbiased: ClassVar[bool] = True
    truncating: ClassVar[bool] = False
    memory: ClassVar[bool] = False
    options: ClassVar[dict[str, Option]] = {}

    def __init__(self, **kwargs: Any) -> None:
        unknown = sorted(set(kwargs) - set(self.options) - {"seed"})
        if unknown:
            accepted = ", ".join(sorted(set(self.options) | {"seed"}))
            raise TypeError(f"{self.name}: unknown option(s) {', '.join(unknown)}; accepted: {accepted}")
        seed = kwargs.pop("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"{self.name}: option 'seed' must be a non-negative integer; got {seed!r}")
        self.seed: int = seed
        self.generator = torch.Generator().manual_seed(seed)
        for key, opt in self.options.items():
            setattr(self, key, opt.validate(self.name, key, kwargs.get(key, opt.default)))

    # -- the interface -------------------------------------------------------------------------------
    @abc.abstractmethod
    def encode(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> Encoded:
        """Compress ``x``. Stochastic choices use ``generator`` (default: the compressor's own)."""

    @abc.abstractmethod
    def decode(self, enc: Encoded) -> torch.Tensor:
        """Reconstruct a float32 tensor shaped like the encoded input."""

    def target(self, x: torch.Tensor) -> torch.Tensor:
        """What ``decode(encode(x))`` estimates without bias (x itself unless the compressor truncates)."""
        return x

    # -- conveniences --------------------------------------------------------------------------------
    def roundtrip(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.decode(self.encode(x, generator=generator))

    def _gen(self, generator: torch.Generator | None) -> torch.Generator:
        return self.generator if generator is None else generator

    def config(self) -> dict[str, Any]:
        """The options that define this compressor (what every rank must agree on)."""
        return {"name": self.name, "seed": self.seed, **{k: getattr(self, k) for k in self.options}}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.options)
        return f"{type(self).__name__}({opts})"

    @staticmethod
    def _empty(x: torch.Tensor, **tensors: torch.Tensor) -> Encoded:
        return Encoded(tensors=dict(tensors), shape=x.shape, dtype=x.dtype, info={"empty": True})


_REGISTRY: dict[str, type[Compressor]] = {}


def register(cls: type[Compressor]) -> type[Compressor]:
    """Class decorator: add a compressor to the registry under ``cls.name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"compressor name {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    # Importing the package registers every built-in compressor.
    from tailq import codec  # noqa: F401


def list_compressors() -> dict[str, type[Compressor]]:
    _load_all()
    return dict(sorted(_REGISTRY.items()))


def get_compressor_class(name: str) -> type[Compressor]:
    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown compressor {name!r}; available: {', '.join(sorted(_REGISTRY))}") from None


def compressor(name: str, **options: Any) -> Compressor:
    """Build a registered compressor by name, e.g. ``tailq.compressor("tnq", bits=3, tail="laplace")``."""
    return get_compressor_class(name)(**options)


Factory = Callable[..., Compressor]
