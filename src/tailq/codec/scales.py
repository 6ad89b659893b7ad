"""Single-scale and multi-scale unbiased quantizers with a scale shared by all workers ([V]; SPEC §4).

[V] S. Vineeth, *Unbiased Single-scale and Multi-scale Quantizers for Distributed Optimization*,
arXiv 2109.12497. The point of both schemes is that every worker rounds onto the **same** grid, so the
integer codes can be added by a plain all-reduce SUM and the sum decodes exactly to the mean of the
workers' unbiased estimates (SPEC §6.1, route 1).

Splitting for the distributed layer: single-scale is a :class:`~tailq.codec.base.SharesCodebook` (the same
three-method shape as the truncated quantizers in ``tq``), multi-scale an :class:`~tailq.codec.base.AgreesScales`:

* ``stats_op = "max"``: ``local_stats(x)`` is ``[max|x|]`` (float64); the layer all-reduces it with MAX;
* ``codebook(stats)`` is the shared uniform grid on [−M, M] (``None`` when every worker's input is zero);
* single-scale ``encode_with(x, codebook)`` rounds onto the grid of the *agreed* scale instead of the local one;
  multi-scale ``encode_with(x, agreed(codebook, index))`` also takes the agreed per-element/block indices.

A supplied scale smaller than the local ``max|x|`` (e.g. a stale, one-step-old agreed value) clips the
values above it before rounding: the result is then unbiased for the clipped input only. ``info`` records
``local_max`` and ``scale`` so a caller can see it happen.

Scales travel as float32. A float64 statistic is rounded *up* to the next float32 so the sent scale never
falls below the values it must cover (rounding down would clip the largest value by one ulp).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch

from tailq.kernels import RandKey

from .base import Aggregation, Compressor, Encoded, Option, check_input, register
from .codebook import Codebook, stochastic_round_uniform
from .packing import pack_bits, unpack_bits
from .tq import checked_input

__all__ = ["AgreedScales", "MultiScale", "SingleScale", "index_dtype", "round_up_f32"]


def round_up_f32(t: torch.Tensor, what: str) -> torch.Tensor:
    """The smallest float32 value >= ``t`` (element-wise); ValueError naming ``what`` if it overflows."""
    t64 = t.to(torch.float64)
    t32 = t64.to(torch.float32)
    below = t32.to(torch.float64) < t64
    t32 = torch.where(below, torch.nextafter(t32, torch.full_like(t32, math.inf)), t32)
    if t32.numel() and not bool(torch.isfinite(t32).all()):
        raise ValueError(f"{what} overflows float32 (largest {float(t64.max()):.6g}); rescale the input")
    return t32


def index_dtype(n: int) -> torch.dtype:
    """int32 indices while every position fits (n < 2^31), else int64."""
    return torch.int32 if n < 2**31 else torch.int64


def _scale_from_stats(stats: torch.Tensor | float, owner: str) -> float:
    """The float32 scale M (as a Python float) from agreed ``[max|x|]`` statistics."""
    t = torch.as_tensor(stats, dtype=torch.float64).reshape(-1)
    if t.numel() != 1:
        raise ValueError(f"{owner}: stats must hold exactly one value [max|x|]; got {t.numel()} values")
    m = float(t[0])
    if not (math.isfinite(m) and m >= 0.0):
        raise ValueError(f"{owner}: stats (the scale max|x|) must be finite and >= 0; got {m!r}")
    return float(round_up_f32(t, f"{owner}: scale")[0])


def _local_max(flat: torch.Tensor) -> torch.Tensor:
    """``[max|x|]`` (float64) from one min/max reduction (no |x| temporary; the same value)."""
    if not flat.numel():
        return torch.zeros(1, dtype=torch.float64, device=flat.device)
    lo, hi = torch.aminmax(flat)
    return torch.maximum(-lo, hi).to(torch.float64).reshape(1)


@register
class SingleScale(Compressor):
    """Single-scale unbiased quantizer of [V] (arXiv 2109.12497).

    Levels: s + 1 = 2^bits equally spaced points on [−M, M], M = max|x| (or the agreed max over workers,
    ``stats``). Code k ∈ {0..s} by unbiased stochastic rounding (SPEC §2); decode −M + k·2M/s.

    Wire format: the codes packed at ``bits`` bits (ceil(n·bits/8) bytes) + M as one float32:
    bits per coordinate = 8·ceil(n·bits/8)/n + 32/n. An all-zero input (M = 0) sends M = 0 and no codes.

    Variance per coordinate: (l_{j+1} − x)(x − l_j) ≤ Δ²/4 with Δ = 2M/s, so E‖Q(x) − x‖² ≤ d·M²/s².
    """

    name = "single-scale"
    summary = "uniform b-bit grid on [-M, M] with M the max |x| agreed across workers; codes summable"
    paper = "Vineeth 2021, arXiv 2109.12497 (single-scale quantizer)"
    unbiased = True
    aggregation = Aggregation.SHARED_CODEBOOK
    counter_randomness = True
    stats_op: ClassVar[str] = "max"
    uniform_codebook: ClassVar[bool] = True
    rescalable: ClassVar[bool] = False  # M is a max, not a mean: rescaling by Σ|g| could clip
    options: ClassVar[dict[str, Option]] = {
        "bits": Option(int, 4, "bits per coordinate (s = 2^bits - 1 intervals on [-M, M])", 1, 8),
    }
    format_options: ClassVar[tuple[str, ...]] = ("bits",)
    bits: int

    @property
    def s(self) -> int:
        return 2**self.bits - 1

    def local_stats(self, x: torch.Tensor) -> torch.Tensor:
        """``[max|x|]`` as a float64 tensor (all-reduce with MAX)."""
        return _local_max(checked_input(x))

    def codebook(self, stats: torch.Tensor) -> Codebook | None:
        """The shared grid ``Codebook.uniform_grid(M, s)``; ``None`` when M = 0 (every input is zero)."""
        m = _scale_from_stats(stats, self.name)
        return None if m == 0.0 else Codebook.uniform_grid(m, self.s)

    def encode(self, x: torch.Tensor, *, generator: torch.Generator | RandKey | None = None) -> Encoded:
        """Round onto the grid of the local max|x| (see :meth:`encode_with`)."""
        flat = checked_input(x)
        if flat.numel() == 0:
            return self._empty(x)
        local = _local_max(flat)
        return self._encode(x, flat, local, _scale_from_stats(local, self.name), False, generator)

    def encode_with(
        self, x: torch.Tensor, codebook: Codebook | None, *, generator: torch.Generator | RandKey | None = None
    ) -> Encoded:
        """Round onto the agreed grid [−M, M] (``codebook``, ``None``: every input is zero).

        With a ``RandKey`` the rounding is the uniform codebook's on [−M, M] (the fused path of
        :meth:`Codebook.encode_packed`; the same grid, its own float32 affine map).
        """
        flat = checked_input(x)
        if flat.numel() == 0:
            return self._empty(x)
        m = 0.0 if codebook is None else codebook.high
        return self._encode(x, flat, _local_max(flat), m, True, generator)

    def _encode(
        self,
        x: torch.Tensor,
        flat: torch.Tensor,
        local: torch.Tensor,
        m: float,
        agreed: bool,
        generator: torch.Generator | RandKey | None,
    ) -> Encoded:
        info: dict[str, Any] = {"scale": m, "local_max": float(local[0]), "agreed": agreed}
        scale = torch.tensor([m], dtype=torch.float32, device=flat.device)
        if m == 0.0:
            return Encoded({"scale": scale}, x.shape, x.dtype, info)
        if isinstance(generator, RandKey):
            packed = Codebook.uniform_grid(m, self.s).encode_packed(flat, generator, self.bits)
            return Encoded({"codes": packed, "scale": scale}, x.shape, x.dtype, info)
        # t = (x + M) / (2M) * s in [0, s]; computed as x/M so tiny (subnormal) scales stay exact enough.
        t = (flat / scale + 1.0) * (self.s / 2.0)
        codes = stochastic_round_uniform(t, 0.0, 1.0, self.s, self._gen(generator))
        return Encoded(
            {"codes": pack_bits(codes, self.bits, check=False), "scale": scale}, x.shape, x.dtype, info
        )

    def decode(self, enc: Encoded) -> torch.Tensor:
        """−M + k·2M/s, written (2k/s − 1)·M (zero when M = 0)."""
        if enc.numel == 0 or "codes" not in enc.tensors:
            device = enc.tensors["scale"].device if "scale" in enc.tensors else None
            return torch.zeros(enc.shape, dtype=torch.float32, device=device)
        scale = enc.tensors["scale"].to(torch.float32)
        k = unpack_bits(enc.tensors["codes"], self.bits, enc.numel).to(torch.float32)
        return ((k * (2.0 / self.s) - 1.0) * scale).reshape(enc.shape)


@register
class MultiScale(Compressor):
    """Multi-scale unbiased quantizer of [V] (arXiv 2109.12497), per element or per block.

    Scales M_j = M / ratio^j, j = 0..n_scales−1, M = max|x| (or the agreed max over workers). Each element
    (``granularity="element"``) or each block of ``block_size`` elements (``"block"``, using the block's
    max|x|) gets the *finest* scale j whose range [−M_j, M_j] still contains it (j = n_scales − 1 for zeros
    and for values below the finest scale). The value is then rounded without bias onto the uniform
    b-bit grid of s + 1 = 2^bits points on [−M_j, M_j]; decode (2k/s − 1)·M_j.

    **Agreement across workers (SPEC §4).** Indices are decided *before* rounding, from the values only:
    the layer all-reduces ``local_stats`` with MAX (``stats_op``), then the per-element/per-block
    ``local_scale_index(x, M)`` with **MIN** (``scale_index_op``): a smaller index is a *coarser* scale,
    and the coarsest needed by any worker is the only one every worker can represent without clipping.
    ``encode_with(x, agreed(codebook(M), index))`` then uses the agreed values, so all workers share each
    element's grid and the integer codes are summable (``decode_sum``); the agreement never looks at rounded codes.
    A supplied index finer than this worker's own need raises ValueError (it would clip silently).

    **Default ratio (our choice).** ``scale_ratio`` defaults to 2^bits (= s + 1): the range of scale j + 1
    is then slightly less than one step 2M_j/s of scale j, so each finer scale refines the innermost cells
    of the coarser one, like a floating-point exponent over a b-bit mantissa. The n scales cover a dynamic
    range ratio^(n−1) (2^12 for bits=4, n_scales=4), and a value on its own scale j (|x| > M_j/ratio) has
    rounding std below (M_j/s) < (ratio/s)·|x| ≈ |x|. Smaller ratios give finer relative precision but cover
    less range for the same ``n_scales``.

    Wire format: codes at ``bits`` bits + M as one float32 + the scale indices packed at
    ib = ceil(log2 n_scales) bits each (one per element, or one per block):
    element: 8·ceil(n·b/8)/n + 32/n + 8·ceil(n·ib/8)/n  (≈ b + ib bits per coordinate);
    block:   8·ceil(n·b/8)/n + 32/n + 8·ceil(ceil(n/B)·ib/8)/n  (≈ b + ib/B).
    An all-zero input (M = 0) sends M = 0 only.

    Variance per coordinate ≤ (M_j/s)² on its scale j (Δ²/4 with Δ = 2M_j/s).
    """

    name = "multi-scale"
    summary = "several uniform b-bit grids M/ratio^j; per element/block the finest scale agreed by MIN"
    paper = "Vineeth 2021, arXiv 2109.12497 (multi-scale quantizer)"
    unbiased = True
    aggregation = Aggregation.AGREED_SCALES
    counter_randomness = True
    stats_op: ClassVar[str] = "max"
    scale_index_op: ClassVar[str] = "min"
    options: ClassVar[dict[str, Option]] = {
        "bits": Option(int, 4, "bits per coordinate of the code (s = 2^bits - 1 intervals per scale)", 1, 8),
        "n_scales": Option(int, 4, "number of scales M_j = M / scale_ratio^j, j = 0..n_scales-1", 2, 16),
        "scale_ratio": Option(
            float, None, "ratio between consecutive scales; auto = 2**bits", 1.5, 1024
        ),
        "granularity": Option(
            str, "block", "one scale index per element or per block", choices=("element", "block")
        ),
        "block_size": Option(int, 256, "elements per block (granularity='block')", 1, 2**20),
    }
    bits: int
    n_scales: int
    scale_ratio: float
    granularity: str
    block_size: int

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if self.scale_ratio is None:
            self.scale_ratio = float(2**self.bits)

    @property
    def s(self) -> int:
        return 2**self.bits - 1

    @property
    def index_bits(self) -> int:
        """ceil(log2 n_scales): bits of one packed scale index."""
        return (self.n_scales - 1).bit_length()

    def n_indices(self, n: int) -> int:
        """How many scale indices an n-element tensor has (n, or ceil(n / block_size))."""
        return n if self.granularity == "element" else -(-n // self.block_size)

    def scales(self, m: float) -> torch.Tensor:
        """The float32 scales M_j = M / ratio^j (decreasing), computed in float64 then rounded."""
        j = torch.arange(self.n_scales, dtype=torch.float64)
        return (m / self.scale_ratio**j).to(torch.float32)

    def local_stats(self, x: torch.Tensor) -> torch.Tensor:
        """``[max|x|]`` as a float64 tensor (all-reduce with MAX)."""
        return _local_max(checked_input(x))

    def codebook(self, stats: torch.Tensor) -> Codebook | None:
        """The grid of the coarsest scale M_0 = M (the finer grids are it divided by ratio^j)."""
        m = _scale_from_stats(stats, self.name)
        return None if m == 0.0 else Codebook.uniform_grid(m, self.s)

    def expand(self, idx: torch.Tensor, n: int) -> torch.Tensor:
        """Per-element indices from per-element or per-block ones."""
        if self.granularity == "element":
            return idx
        return idx.repeat_interleave(min(self.block_size, n))[:n]

    def _magnitudes(self, flat: torch.Tensor) -> torch.Tensor:
        a = flat.abs()
        if self.granularity == "element":
            return a
        b = min(self.block_size, a.numel())
        nb = -(-a.numel() // b)
        pad = nb * b - a.numel()
        if pad:
            a = torch.nn.functional.pad(a, (0, pad))
        return a.view(nb, b).amax(dim=1)

    def _index(self, flat: torch.Tensor, m: float) -> torch.Tensor:
        """Finest j with magnitude <= M_j: #{j' in 1..n-1 : a <= M_j'} (0 when a > M_0)."""
        sc = self.scales(m).to(flat.device)
        asc = sc[1:].flip(0).contiguous()  # ascending
        a = self._magnitudes(flat)
        below = torch.searchsorted(asc, a.contiguous(), right=False)  # #{asc < a}
        return (self.n_scales - 1) - below

    def local_scale_index(self, x: torch.Tensor, m: torch.Tensor | float) -> torch.Tensor:
        """This worker's finest usable scale index per element or block (int64) for the agreed scale M.

        Agree across workers with MIN (the coarsest index needed anywhere), then pass to ``encode``.
        """
        flat = check_input(x)
        mm = _scale_from_stats(m, self.name)
        if flat.numel() == 0:
            return torch.zeros(0, dtype=torch.int64, device=flat.device)
        return self._index(flat, mm)

    def agreed(self, codebook: Codebook | None, index: torch.Tensor | None = None) -> AgreedScales:
        """The agreed scales for ``encode_with``: M from ``codebook`` (``None``: M = 0) and the agreed indices."""
        return AgreedScales(0.0 if codebook is None else codebook.high, index)

    def encode(self, x: torch.Tensor, *, generator: torch.Generator | RandKey | None = None) -> Encoded:
        """Round each element on its own scale, from this worker's M and indices (see :meth:`encode_with`)."""
        flat = checked_input(x)
        if flat.numel() == 0:
            return self._empty(x)
        local = _local_max(flat)
        return self._encode(x, flat, local, AgreedScales(_scale_from_stats(local, self.name), None), False, generator)

    def encode_with(
        self, x: torch.Tensor, agreed: AgreedScales, *, generator: torch.Generator | RandKey | None = None
    ) -> Encoded:
        """Round each element on its agreed scale: ``agreed`` = (M agreed by MAX, indices agreed by MIN)."""
        flat = checked_input(x)
        if flat.numel() == 0:
            return self._empty(x)
        return self._encode(x, flat, _local_max(flat), agreed, True, generator)

    def _encode(
        self,
        x: torch.Tensor,
        flat: torch.Tensor,
        local: torch.Tensor,
        agreed: AgreedScales,
        is_agreed: bool,
        generator: torch.Generator | RandKey | None,
    ) -> Encoded:
        m = agreed.scale
        info: dict[str, Any] = {"scale": m, "local_max": float(local[0]), "agreed": is_agreed}
        scale = torch.tensor([m], dtype=torch.float32, device=flat.device)
        if m == 0.0:
            return Encoded({"scale": scale}, x.shape, x.dtype, info)
        own = self._index(flat, m)
        idx = own if agreed.index is None else self._check_index(agreed.index, own)
        sc = self.scales(m).to(flat.device)
        se = sc[self.expand(idx, flat.numel())]
        ratio = flat / torch.where(se > 0, se, torch.ones_like(se))  # |x| <= M_j: in [-1, 1]
        t = (ratio + 1.0) * (self.s / 2.0)
        codes = stochastic_round_uniform(t, 0.0, 1.0, self.s, self.generator if generator is None else generator)
        tensors = {
            "codes": pack_bits(codes, self.bits, check=False),
            "scale": scale,
            "index": pack_bits(idx, self.index_bits, check=False),
        }
        return Encoded(tensors, x.shape, x.dtype, info)

    def element_scales(self, agreed: AgreedScales, n: int) -> torch.Tensor:
        """The float32 scale M_j of each of ``n`` elements under the agreed scales (indices required)."""
        if agreed.index is None:
            raise ValueError(f"{self.name}: element_scales needs the agreed indices")
        return self.scales(agreed.scale).to(agreed.index.device)[self.expand(agreed.index.to(torch.int64), n)]

    def decode_sum(self, total: torch.Tensor, agreed: AgreedScales, n_workers: int) -> torch.Tensor:
        """The mean over ``n_workers`` from the element-wise sum of their codes: (2K/(sN) − 1)·M_j.

        An integer sum (from an all-reduce of lanes) is decoded in float64, exactly; a float32 sum (accumulated
        from gathered codes, exact for any realistic N) is decoded in float32.
        """
        scale = self.element_scales(agreed, total.numel())
        if total.is_floating_point():
            return (total * (2.0 / (self.s * n_workers)) - 1.0) * scale
        t = total.to(torch.float64)
        return ((t * (2.0 / (self.s * n_workers)) - 1.0) * scale.double()).to(torch.float32)

    def _check_index(self, scale_index: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        if not isinstance(scale_index, torch.Tensor) or scale_index.is_floating_point():
            raise TypeError(f"{self.name}: scale_index must be an integer tensor")
        idx = scale_index.reshape(-1).to(device=own.device, dtype=torch.int64)
        if idx.numel() != own.numel():
            raise ValueError(
                f"{self.name}: scale_index must have {own.numel()} entries (granularity="
                f"{self.granularity!r}); got {idx.numel()}"
            )
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi > self.n_scales - 1:
            raise ValueError(
                f"{self.name}: scale_index must be in [0, {self.n_scales - 1}]; got values in [{lo}, {hi}]"
            )
        if bool((idx > own).any()):
            raise ValueError(
                f"{self.name}: scale_index is finer than this worker's values allow at "
                f"{int((idx > own).sum())} positions; agree indices with MIN over workers"
            )
        return idx

    def decode(self, enc: Encoded) -> torch.Tensor:
        """(2k/s − 1)·M_j per element, j from the sent indices."""
        n = enc.numel
        if n == 0 or "codes" not in enc.tensors:
            device = enc.tensors["scale"].device if "scale" in enc.tensors else None
            return torch.zeros(enc.shape, dtype=torch.float32, device=device)
        m = float(enc.tensors["scale"][0])
        device = enc.tensors["codes"].device
        sc = self.scales(m).to(device)
        idx = unpack_bits(enc.tensors["index"], self.index_bits, self.n_indices(n)).to(torch.int64)
        per_elem = self.expand(idx, n)
        k = unpack_bits(enc.tensors["codes"], self.bits, n).to(torch.float32)
        return ((k * (2.0 / self.s) - 1.0) * sc[per_elem]).reshape(enc.shape)


@dataclasses.dataclass(frozen=True)
class AgreedScales:
    """What every rank of a multi-scale aggregation agreed before rounding."""

    scale: float
    """M: the float32 max |x| over ranks (agreed with MAX), as a Python float."""
    index: torch.Tensor | None
    """Per element or block, the finest scale every rank can represent (agreed with MIN); ``None``: this rank's
    own (standalone use)."""
