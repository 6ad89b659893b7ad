"""The one compressor interface, its registry, and input validation.

Every compressor (ours and the baselines) is a small class with three jobs (GRACE-style):

* ``encode(x) -> Encoded``: the tensors that would be handed to a collective, nothing else;
* ``decode(enc) -> Tensor``: the receiver's reconstruction, shaped like ``x``;
* ``target(x) -> Tensor``: what the decode estimates *without bias* (``x`` itself for unbiased
  compressors, the truncated input for truncating ones, ``None``-like for biased ones).

Bits on the wire are always counted from the bytes of the tensors in :class:`Encoded`
(codes, scales, statistics, indices: all metadata included), never from a formula.

Every encoding records its maker (:attr:`Encoded.maker`, local metadata that never goes on the wire): the
compressor's name and the options that define the format (:attr:`Compressor.format_options`), not its seed.
``decode`` refuses an encoding made by another compressor, or by the same one with another format, with a
ValueError. The base class stamps and checks this for every subclass (:meth:`Compressor.__init_subclass__`).

How a distributed run aggregates a compressor is declared by its ``aggregation`` class attribute
(:class:`Aggregation`); the two families that agree something across ranks before rounding implement a protocol
on top of the interface above: :class:`SharesCodebook` (statistics → one codebook) and :class:`AgreesScales`
(a scale, then per element/block scale indices). A new compressor is one class in one file under ``codec/``;
the comm layer routes it from its ``aggregation`` alone.
"""

from __future__ import annotations

import abc
import dataclasses
import enum
import functools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import torch

from tailq.kernels import dispatch
from tailq.options import FLOAT32_MAX as _FLOAT32_MAX
from tailq.options import Option, check_int

if TYPE_CHECKING:
    from .codebook import Codebook

__all__ = [
    "Aggregation",
    "AgreesScales",
    "Compressor",
    "Encoded",
    "FLOAT32_MAX",
    "Option",
    "SharesCodebook",
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
    ``maker`` is the :attr:`Compressor.format_id` of the compressor that made it (set by its ``encode``); a
    decoder with another format id refuses it. ``None`` (an encoding assembled by hand, e.g. from received
    tensors) is not checked.
    """

    tensors: dict[str, torch.Tensor]
    shape: torch.Size
    dtype: torch.dtype
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    maker: str | None = None

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


FLOAT32_MAX: float = _FLOAT32_MAX
"""The largest finite float32 (≈ 3.4028e38): compressors compute in float32, so inputs must lie within ±this."""


def check_input(x: torch.Tensor, name: str = "x") -> torch.Tensor:
    """Validate a gradient tensor and return it flattened as float32 (a view when possible).

    Raises a ValueError naming ``name`` for non-finite input, or for finite values of a wider dtype (float64)
    beyond float32's range (they would become ±inf in the cast); a TypeError for non-floating input. Empty
    tensors are allowed (every compressor maps empty in to empty out).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    flat = x.reshape(-1)
    fast = dispatch.nonfinite_count(flat) if flat.dtype == torch.float32 and flat.is_contiguous() else None
    if flat.numel() and (fast > 0 if fast is not None else not bool(torch.isfinite(flat).all())):
        n_nan = int(torch.isnan(flat).sum())
        n_inf = int(torch.isinf(flat).sum())
        raise ValueError(
            f"{name} contains non-finite values ({n_nan} NaN, {n_inf} Inf of {flat.numel()}); "
            "compressors need finite input (the DDP hooks route such buckets uncompressed)"
        )
    out = flat.to(torch.float32)
    if flat.dtype != torch.float32 and out.numel() and not bool(torch.isfinite(out).all()):
        n_big = int(torch.isinf(out).sum())
        largest = float(flat.abs().max())
        raise ValueError(
            f"{name} has {n_big} value(s) beyond float32's range ±{FLOAT32_MAX:.4g} (largest |{name}| = "
            f"{largest:.4g}, dtype {flat.dtype}); compressors compute in float32: scale the input into that range"
        )
    return out


class Aggregation(enum.Enum):
    """How a compressor's outputs are combined across workers; the comm layer picks its routes from this alone.

    * ``SHARED_CODEBOOK``: every rank builds the same codebook from statistics agreed by one small all-reduce
      (:class:`SharesCodebook`); codes on it can be summed (headroom lanes) or gathered.
    * ``AGREED_SCALES``: a shared scale, then per element or block a scale index agreed (MIN) before rounding
      (:class:`AgreesScales`); codes on the agreed grids can be summed or gathered.
    * ``PER_RANK``: each rank encodes with its own scales or side information (the plain :class:`Compressor`
      interface); encodings are gathered and each is decoded.
    """

    SHARED_CODEBOOK = "shared-codebook"
    AGREED_SCALES = "agreed-scales"
    PER_RANK = "per-rank"


class Compressor(abc.ABC):
    """Base class. Subclasses declare ``name``, ``unbiased`` and ``options`` and implement encode/decode.

    ``unbiased``: E[decode(encode(x))] == target(x) exactly (stochastic rounding).
    ``truncating``: target(x) differs from x (clipping); the bias is x - target(x).
    ``memory``: designed to be used with error feedback (EF-signSGD, top-k); see :class:`ErrorFeedback`.
    ``aggregation``: how a distributed run combines the ranks' outputs (:class:`Aggregation`); a compressor that
    declares ``SHARED_CODEBOOK`` or ``AGREED_SCALES`` implements the matching protocol.
    ``counter_randomness``: ``encode`` accepts a :class:`~tailq.kernels.RandKey` as its generator (counter-based
    rounding, bit-identical across kernel paths); others take a ``torch.Generator`` (the hook seeds one per key).
    ``fast_paths``: ``encode``/``decode`` run through :mod:`tailq.kernels` fast paths (compiled CPU, Triton) when
    one applies, with the reference's bytes (benchmarks time every path of such a compressor).
    ``fixed_bits``: code bits per coordinate of a compressor without a ``bits`` option (ternary: 2, sign: 1).
    ``requantizable``: a per-rank compressor whose encoding of a slice depends on that slice alone and which an
    owner may apply again to a mean (the two-phase route: shards all-to-all, owners average and re-encode, then an
    all-gather — torchft's collective for its FP8 outer gradients). Shared-codebook families decide this from
    their ``bits`` option instead.
    ``format_options``: the options that change the encoded format or its decoding (``None``: all of them);
    with the name they make :attr:`format_id`, which every encoding carries and ``decode`` checks. The seed
    never belongs to it: ranks encode with different seeds and decode each other's encodings.
    """

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    unbiased: ClassVar[bool] = True
    truncating: ClassVar[bool] = False
    memory: ClassVar[bool] = False
    aggregation: ClassVar[Aggregation] = Aggregation.PER_RANK
    counter_randomness: ClassVar[bool] = False
    fast_paths: ClassVar[bool] = False
    fixed_bits: ClassVar[int | None] = None
    requantizable: ClassVar[bool] = False
    options: ClassVar[dict[str, Option]] = {}
    format_options: ClassVar[tuple[str, ...] | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Wrap the subclass's own ``encode`` / ``encode_with`` (stamp the maker) and ``decode`` (check it)."""
        super().__init_subclass__(**kwargs)
        for name in ("encode", "encode_with"):
            fn = cls.__dict__.get(name)
            if callable(fn) and not hasattr(fn, "__tailq_maker__"):
                setattr(cls, name, _stamping(fn))
        fn = cls.__dict__.get("decode")
        if callable(fn) and not hasattr(fn, "__tailq_maker__"):
            cls.decode = _checking(fn)  # type: ignore[method-assign]

    def __init__(self, **kwargs: Any) -> None:
        unknown = sorted(set(kwargs) - set(self.options) - {"seed"})
        if unknown:
            accepted = ", ".join(sorted(set(self.options) | {"seed"}))
            raise TypeError(f"{self.name}: unknown option(s) {', '.join(unknown)}; accepted: {accepted}")
        self.seed: int = check_int(f"{self.name}: option 'seed'", kwargs.pop("seed", 0), 0)
        seed = self.seed
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

    @property
    def format_id(self) -> str:
        """The name and the format options, e.g. ``"qsgd(bits=4, bucket_size=512)"``: what an encoding's
        :attr:`Encoded.maker` must equal for ``decode`` to accept it (the seed is not part of it)."""
        keys = self.options if self.format_options is None else self.format_options
        return f"{self.name}({', '.join(f'{k}={getattr(self, k)!r}' for k in keys)})"

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.options)
        return f"{type(self).__name__}({opts})"

    @staticmethod
    def _empty(x: torch.Tensor, **tensors: torch.Tensor) -> Encoded:
        return Encoded(tensors=dict(tensors), shape=x.shape, dtype=x.dtype, info={"empty": True})


def _stamping(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` (an encode) that records the compressor's :attr:`~Compressor.format_id` in the returned Encoded."""

    @functools.wraps(fn)
    def encode(self: Compressor, *args: Any, **kwargs: Any) -> Any:
        enc = fn(self, *args, **kwargs)
        if isinstance(enc, Encoded):
            enc.maker = self.format_id
        return enc

    encode.__tailq_maker__ = True  # type: ignore[attr-defined]
    return encode


def _checking(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` (a decode) that first refuses an Encoded made by a compressor of another format id."""

    @functools.wraps(fn)
    def decode(self: Compressor, enc: Encoded, *args: Any, **kwargs: Any) -> Any:
        maker = getattr(enc, "maker", None)
        if maker is not None and maker != self.format_id:
            raise ValueError(
                f"decode: this encoding was made by {maker}; this decoder is {self.format_id}. Decode with a "
                "compressor of the same name and format options (seeds may differ)"
            )
        return fn(self, enc, *args, **kwargs)

    decode.__tailq_maker__ = True  # type: ignore[attr-defined]
    return decode


@runtime_checkable
class SharesCodebook(Protocol):
    """A compressor whose ranks share one codebook built from agreed statistics (``Aggregation.SHARED_CODEBOOK``).

    The distributed layer calls ``local_stats`` on every rank, all-reduces the results with ``stats_op``, and calls
    ``codebook`` on the agreed vector: a pure, deterministic function, so every rank holds the bit-identical
    codebook. Codes on it are then summed (non-uniform levels snapped onto a fine uniform grid) or gathered.
    """

    name: str
    bits: int
    """Bits per coordinate of a dense code (``s = codebook.s <= 2**bits - 1`` intervals)."""
    stats_op: ClassVar[str]
    """How ranks combine ``local_stats``: ``"sum"`` or ``"max"``."""
    uniform_codebook: ClassVar[bool]
    """Codebooks are uniform grids: summed codes use the grid itself (no fine grid to snap to)."""
    rescalable: ClassVar[bool]
    """``codebook`` is scale-equivariant in Σ|g|: a kept codebook may be rescaled by Σ|g_t| / Σ|g_design|
    between redesigns (the hook's ``redesign_every``)."""

    def local_stats(self, x: torch.Tensor) -> torch.Tensor:
        """Statistics of this rank's (finite) bucket that define the codebook, reducible with ``stats_op``."""
        ...

    def codebook(self, stats: torch.Tensor) -> Codebook | None:
        """The shared codebook for agreed statistics; ``None`` when every rank's input was zero."""
        ...

    def encode_with(self, x: torch.Tensor, codebook: Codebook | None, *, generator: Any = None) -> Encoded:
        """Encode ``x`` on an agreed codebook (``generator``: a ``torch.Generator`` or a ``RandKey``)."""
        ...

    def decode(self, enc: Encoded) -> torch.Tensor:
        ...


@runtime_checkable
class AgreesScales(Protocol):
    """A compressor whose ranks agree a scale and per element/block scale indices (``Aggregation.AGREED_SCALES``).

    The layer all-reduces ``local_stats`` with ``stats_op`` (MAX), builds ``codebook(stats)`` (the coarsest grid),
    then all-reduces ``local_scale_index`` with MIN — decided from the values, *before* rounding — and encodes
    with ``encode_with(x, agreed(codebook, index))``. Every rank then rounds each element onto the same grid, so
    the integer codes sum; ``decode_sum`` turns their sum into the mean.
    """

    name: str
    bits: int
    stats_op: ClassVar[str]

    def local_stats(self, x: torch.Tensor) -> torch.Tensor:
        ...

    def codebook(self, stats: torch.Tensor) -> Codebook | None:
        ...

    def local_scale_index(self, x: torch.Tensor, m: torch.Tensor | float) -> torch.Tensor:
        """This rank's finest usable scale index per element or block (agree with MIN)."""
        ...

    def agreed(self, codebook: Codebook, index: torch.Tensor | None) -> Any:
        """The agreed scales (this family's ``codebook`` plus the agreed indices) that ``encode_with`` takes."""
        ...

    def encode_with(self, x: torch.Tensor, agreed: Any, *, generator: Any = None) -> Encoded:
        ...

    def decode(self, enc: Encoded) -> torch.Tensor:
        ...

    def decode_sum(self, total: torch.Tensor, agreed: Any, n_workers: int) -> torch.Tensor:
        """The mean over ``n_workers`` from the sum of their integer codes (all on the agreed grids)."""
        ...


_REGISTRY: dict[str, type[Compressor]] = {}


def register(cls: type[Compressor]) -> type[Compressor]:
    """Class decorator: add a compressor to the registry under ``cls.name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"compressor name {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def list_compressors() -> dict[str, type[Compressor]]:
    """Every registered compressor by name (importing :mod:`tailq.codec` registers the built-in ones)."""
    return dict(sorted(_REGISTRY.items()))


def registered_in_order() -> list[type[Compressor]]:
    """The registered compressors in registration order (built-ins first, in the order their modules load)."""
    return list(_REGISTRY.values())


def get_compressor_class(name: str) -> type[Compressor]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown compressor {name!r}; available: {', '.join(sorted(_REGISTRY))}") from None


def compressor(name: str, **options: Any) -> Compressor:
    """Build a registered compressor by name, e.g. ``tailq.compressor("tnq", bits=3, tail="laplace")``."""
    return get_compressor_class(name)(**options)


Factory = Callable[..., Compressor]
