"""Codebooks: a sorted level set, truncation, and unbiased stochastic rounding (SPEC §2, §6.1).

Stochastic rounding of x ∈ [l_j, l_{j+1}] outputs l_{j+1} with probability (x − l_j)/(l_{j+1} − l_j),
computed from the *real* distances between levels, so E[Q(x)] = x for every x in [l_0, l_s]. Values
outside are first clipped (truncation): the only source of bias.

Randomness: a ``torch.Generator`` (``torch.rand``, the original reference) or a
:class:`~tailq.kernels.RandKey` (counter-based: the uniform number of element i is a hash of (key, i)). With a
``RandKey`` the plain-torch functions here are the reference that the fused kernels (:mod:`tailq.kernels`) match
bit for bit; the packed entry points (``encode_packed``, ``decode_packed``, ``encode_lanes``, ...) use a fused
kernel when one is available for the tensor's device and fall back to this reference otherwise.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import numpy as np
import torch

from tailq.kernels import RandKey, RoundSpec, counter_uniform, dispatch
from tailq.options import FLOAT32_MAX

from .packing import LanePlan, pack_bits, pack_lanes, unpack_bits, unpack_lanes

__all__ = ["Codebook", "Generator", "SnappedCodebook", "fit_float32", "mean_headroom", "stochastic_round_uniform",
           "stochastic_round_levels"]

Generator = torch.Generator | RandKey  # what the rounding functions accept as their source of randomness


def fit_float32(levels: np.ndarray | torch.Tensor) -> np.ndarray:
    """float64 ``levels`` scaled down (if need be) so the outer one is at most float32's largest value.

    For designs and rescalings computed in float64 (α* of a tail model, a kept design times Σ|g_t|/Σ|g_design|)
    that land beyond float32: every input is within ±FLOAT32_MAX, so bringing the outer level down to it clips
    nothing more, and scaling the whole set (not clipping it) keeps the levels distinct and the design's shape.
    """
    lv = np.asarray(levels.detach().cpu().double() if isinstance(levels, torch.Tensor) else levels, dtype=np.float64)
    top = float(np.abs(lv).max()) if lv.size else 0.0
    return lv * (FLOAT32_MAX / top) if top > FLOAT32_MAX else lv


def mean_headroom(top: float, count: int) -> int:
    """The octaves k a mean of ``count`` float32 values of magnitude at most ``top`` is summed at (values
    scaled by 2^-k, the mean scaled back by 2^k), so that its float32 sum cannot overflow: 0 — the plain sum —
    while count·top ≤ FLOAT32_MAX/2, which leaves room for the sum's rounding; else the fewest octaves that do."""
    need = 2.0 * count * top / FLOAT32_MAX  # float64: no overflow for any count
    return 0 if need <= 1.0 else max(1, math.ceil(math.log2(need)))


def _f32(v: float) -> float:
    """``v`` rounded to float32 (as a Python float)."""
    return float(np.float32(v))


def _round_affine_counter(x: torch.Tensor, low: float, inv: float, s: int, key: RandKey) -> torch.Tensor:
    """Counter-key rounding onto low + k/inv (RoundSpec "affine"), float32 arithmetic, int64 codes."""
    if x.dtype == torch.float32 and 1 <= s <= 255 and dispatch.path_for(x.device, x.numel()) != "reference":
        # a fused kernel where available (same codes)
        levels = torch.tensor([low + k / inv for k in range(s + 1)], dtype=torch.float32)
        fast = dispatch.round_codes(x.reshape(-1), RoundSpec.for_rounding(levels, True, low, inv), key)
        if fast is not None:
            return fast.to(torch.int64).reshape(x.shape)
    xf = x.reshape(-1).to(torch.float32)
    low_t = torch.tensor(low, dtype=torch.float32, device=xf.device)
    inv_t = torch.tensor(inv, dtype=torch.float32, device=xf.device)
    t = ((xf - low_t) * inv_t).clamp_(0.0, float(s))
    j = t.floor().clamp_(max=s - 1)
    u = counter_uniform(xf.numel(), key, device=xf.device)
    return (j + (u < (t - j)).to(torch.float32)).to(torch.int64).reshape(x.shape)


def _round_levels_counter(x: torch.Tensor, levels: torch.Tensor, key: RandKey) -> torch.Tensor:
    """Counter-key rounding onto increasing float32 levels (RoundSpec "levels"), int64 codes."""
    fast_ok = x.dtype == torch.float32 and 1 <= levels.numel() - 1 <= 255
    if fast_ok and dispatch.path_for(x.device, x.numel()) != "reference":  # a fused kernel (same codes)
        fast = dispatch.round_codes(x.reshape(-1), RoundSpec.for_rounding(levels, False), key)
        if fast is not None:
            return fast.to(torch.int64).reshape(x.shape)
    lv = levels.to(device=x.device, dtype=torch.float32)
    s = lv.numel() - 1
    widths = lv[1:] - lv[:-1]
    xt = x.reshape(-1).to(torch.float32).clamp(float(lv[0]), float(lv[-1]))
    j = (torch.searchsorted(lv, xt, right=True) - 1).clamp_(0, s - 1)
    u = counter_uniform(xt.numel(), key, device=xt.device)
    return (j + (u * widths[j] < (xt - lv[j])).to(torch.int64)).reshape(x.shape)


def stochastic_round_uniform(
    x: torch.Tensor, low: float, step: float, s: int, generator: Generator
) -> torch.Tensor:
    """Codes k ∈ {0..s} for the uniform grid low + k·step; x is clipped to [low, low + s·step] first.

    With a ``RandKey`` the arithmetic is float32 ``t = (x − low)·(1/step)`` (RoundSpec "affine").
    """
    if isinstance(generator, RandKey):
        return _round_affine_counter(x, _f32(low), _f32(1.0 / step), s, generator)
    t = ((x - low) / step).clamp_(0.0, float(s))
    j = t.floor().clamp_(max=s - 1)
    u = torch.rand(x.shape, generator=generator, dtype=t.dtype, device=x.device)
    # P(code = j + 1) = t - j, the fractional distance to the lower level.
    return (j + (u < (t - j)).to(t.dtype)).to(torch.int64)


def stochastic_round_levels(x: torch.Tensor, levels: torch.Tensor, generator: Generator) -> torch.Tensor:
    """Codes k ∈ {0..s} for arbitrary increasing levels; x is clipped to [levels[0], levels[-1]] first."""
    if isinstance(generator, RandKey):
        return _round_levels_counter(x, levels, generator)
    s = levels.numel() - 1
    xt = x.clamp(float(levels[0]), float(levels[-1]))
    j = (torch.searchsorted(levels, xt, right=True) - 1).clamp_(0, s - 1)
    lo = levels[j]
    hi = levels[j + 1]
    p = (xt - lo) / (hi - lo)
    u = torch.rand(x.shape, generator=generator, dtype=p.dtype, device=x.device)
    return j + (u < p).to(torch.int64)


@dataclasses.dataclass(frozen=True, eq=False)
class Codebook:
    """A strictly increasing level set l_0 < … < l_s (float32) and how to round onto it.

    ``uniform`` codebooks (equal spacing) use an affine fast path; both paths are unbiased. The affine path
    computes ``x − l_0`` and ``k·step`` in float32, so a uniform codebook whose span ``l_s − l_0`` exceeds
    float32's largest value (|levels| beyond ≈ 1.7e38) rounds and decodes through its levels instead
    (``uniform`` is then False: the same grid and values, no overflow). An interval wider than float32's largest
    value cannot be rounded in float32 at all: ValueError.
    """

    levels: torch.Tensor
    uniform: bool = False

    def __post_init__(self) -> None:
        lv = self.levels
        if lv.ndim != 1 or lv.numel() < 2:
            raise ValueError(
                f"levels must be a 1-D tensor with at least 2 entries; got shape {tuple(lv.shape)}"
            )
        if not bool(torch.isfinite(lv).all()) or not bool((lv[1:] > lv[:-1]).all()):
            raise ValueError(f"levels must be finite and strictly increasing; got {lv.tolist()}")
        widths = lv[1:].to(torch.float32) - lv[:-1].to(torch.float32)
        if not bool(torch.isfinite(widths).all()):
            raise ValueError(
                f"levels [{float(lv[0]):.4g} .. {float(lv[-1]):.4g}] have an interval wider than float32's largest "
                f"value {torch.finfo(torch.float32).max:.4g}: the rounding arithmetic overflows float32; scale the "
                "input so that |x| stays below about 1.7e38 (or use more bits)"
            )
        span = lv[-1:].to(torch.float32) - lv[:1].to(torch.float32)
        if self.uniform and not bool(torch.isfinite(span).all()):
            object.__setattr__(self, "uniform", False)  # the affine arithmetic would overflow (see the class doc)

    @classmethod
    def from_levels(
        cls, levels: Sequence[float] | np.ndarray | torch.Tensor, uniform: bool = False
    ) -> Codebook:
        t = torch.tensor(np.array(levels, dtype=np.float64), dtype=torch.float32)
        return cls(t, uniform=uniform)

    @classmethod
    def uniform_grid(cls, alpha: float, s: int) -> Codebook:
        """s + 1 equally spaced levels on [−alpha, alpha]."""
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0 for a uniform grid; got {alpha!r}")
        if s < 1:
            raise ValueError(f"s (number of intervals) must be >= 1; got {s!r}")
        return cls.from_levels(np.linspace(-alpha, alpha, s + 1), uniform=True)

    @property
    def s(self) -> int:
        return self.levels.numel() - 1

    @property
    def low(self) -> float:
        return float(self.levels[0])

    @property
    def high(self) -> float:
        return float(self.levels[-1])

    @property
    def step(self) -> float:
        """Spacing of a uniform codebook (meaningless otherwise)."""
        return (self.high - self.low) / self.s

    def truncate(self, x: torch.Tensor) -> torch.Tensor:
        """T_α(x): clip to [l_0, l_s]."""
        return x.clamp(self.low, self.high)

    def encode(self, x: torch.Tensor, generator: Generator) -> torch.Tensor:
        """Truncate and stochastically round; returns int64 codes in {0..s}.

        ``generator``: a ``torch.Generator`` or a :class:`~tailq.kernels.RandKey` (counter-based, see module doc).
        """
        if self.uniform:
            return stochastic_round_uniform(x, self.low, self.step, self.s, generator)
        return stochastic_round_levels(x, self.levels.to(x.device), generator)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        if self.uniform:
            return codes.to(torch.float32) * self.step + self.low
        return self.levels.to(codes.device)[codes.long()]

    # -- fused hot paths (a kernel when available, else the reference above) --------------------------------
    @functools.cached_property
    def round_spec(self) -> RoundSpec:
        """The float32 constants every implementation rounds and decodes with (:class:`~tailq.kernels.RoundSpec`)."""
        lv = self.levels.detach().to("cpu", torch.float32).contiguous()
        values = self.decode(torch.arange(self.s + 1)).to(torch.float32).contiguous()
        dec_step, dec_low = _f32(self.step), _f32(self.low)
        arith = torch.arange(self.s + 1, dtype=torch.float32) * torch.tensor(dec_step) + torch.tensor(dec_low)
        return RoundSpec(
            s=self.s,
            affine=self.uniform,
            low=_f32(self.low),
            inv=_f32(1.0 / self.step) if self.uniform else 0.0,
            levels=lv,
            widths=lv[1:] - lv[:-1],
            values=values,
            grid=self.s,
            dec_affine=self.uniform and torch.equal(arith, values),
            dec_step=dec_step,
            dec_low=dec_low,
        )

    def encode_packed(self, x: torch.Tensor, generator: Generator, bits: int) -> torch.Tensor:
        """``pack_bits(self.encode(x, generator), bits)`` — fused into one pass for a ``RandKey``."""
        if isinstance(generator, RandKey):
            out = dispatch.encode_dense(x.reshape(-1), self.round_spec, generator, bits)
            if out is not None:
                return out
        return pack_bits(self.encode(x.reshape(-1), generator), bits, check=False)

    def decode_packed(
        self, packed: torch.Tensor, bits: int, n: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``self.decode(unpack_bits(packed, bits, n))`` as float32 (fused when a kernel is available).

        ``out``: a float32 tensor of ``n`` elements to write into (no fresh allocation on the fast path).
        """
        res = dispatch.decode_dense(packed, self.round_spec, bits, n, out)
        if res is not None:
            return res
        dec = self.decode(unpack_bits(packed, bits, n).to(torch.int64)).to(torch.float32)
        return dec if out is None else out.copy_(dec)

    def decode_mean_packed(
        self, payloads: Sequence[torch.Tensor], bits: int, n: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mean of the decodes of ``payloads`` (each ``bits``-bit packed codes of ``n`` elements).

        Summed in payload order starting from 0.0, then divided by the count (the reference order). ``out``: a
        float32 tensor of ``n`` elements to write the mean into (the fast path then allocates nothing).

        Headroom: where the count times the largest |level| could overflow float32 while summing (levels within
        a factor 2·count of float32's largest value, :func:`mean_headroom`), the same arithmetic runs on the
        levels scaled by 2^-k — exact, so the float32 sum rounds as it would with an unbounded exponent — and
        the mean is scaled back by 2^k: the same bits as the plain path gives 2^k lower, and finite (rounding to
        nearest is monotonic, so the sum of N values of magnitude ≤ float32's largest value, all-ones mantissa,
        never exceeds N times it). One more pass over the mean for these codebooks only; every other codebook
        takes the plain path.
        """
        k = mean_headroom(max(-self.low, self.high), len(payloads))
        if k:
            scaled = Codebook(self.levels * 2.0**-k, uniform=self.uniform)  # exact: powers of two
            return scaled._decode_mean_packed(payloads, bits, n, out).mul_(2.0**k)
        return self._decode_mean_packed(payloads, bits, n, out)

    def _decode_mean_packed(
        self, payloads: Sequence[torch.Tensor], bits: int, n: int, out: torch.Tensor | None
    ) -> torch.Tensor:
        res = dispatch.decode_dense_mean(payloads, self.round_spec, bits, n, out)
        if res is not None:
            return res
        device = payloads[0].device
        mean = torch.zeros(n, dtype=torch.float32, device=device)
        for p in payloads:
            mean += self.decode(unpack_bits(p, bits, n).to(torch.int64))
        mean = mean / len(payloads)
        return mean if out is None else out.copy_(mean)

    def snap(self, grid: int) -> SnappedCodebook:
        """Snap the levels onto a uniform fine grid of ``grid + 1`` points spanning [l_0, l_s] (SPEC §6.1).

        Levels that land on the same fine point merge (the result may have fewer levels); rounding between
        the snapped levels stays unbiased. Fine index f ↦ value l_0 + f·(l_s − l_0)/grid.
        """
        if grid < self.s:
            raise ValueError(f"grid must be >= s = {self.s} so no level is lost by design; got {grid}")
        lo, hi = float(self.levels[0]), float(self.levels[-1])
        frac = (self.levels.double() - lo) / (hi - lo)
        idx = torch.unique(torch.round(frac * grid).to(torch.int64))  # sorted, endpoints 0 and grid kept
        values = lo + idx.double() * ((hi - lo) / grid)
        # a uniform codebook stays uniform only if its levels land equally spaced on the fine grid (grid = k·s);
        # otherwise its rounding must use the snapped levels' real distances
        gaps = idx[1:] - idx[:-1]
        uniform = self.uniform and bool((gaps == gaps[0]).all())
        return SnappedCodebook(Codebook(values.to(torch.float32), uniform=uniform), idx, grid)

    def __repr__(self) -> str:
        kind = "uniform" if self.uniform else "non-uniform"
        return f"Codebook({kind}, s={self.s}, range=[{self.low:.4g}, {self.high:.4g}])"


@dataclasses.dataclass(frozen=True, eq=False)
class SnappedCodebook:
    """A codebook whose levels sit on a fine uniform grid {0..grid}: codes can be summed across workers."""

    codebook: Codebook
    fine_index: torch.Tensor  # int64, increasing, fine_index[k] is level k's point on the fine grid
    grid: int

    def encode_fine(self, x: torch.Tensor, generator: Generator) -> torch.Tensor:
        """Stochastically round to the snapped levels and return the *fine* grid index of each choice."""
        return self.fine_index.to(x.device)[self.codebook.encode(x, generator)]

    @functools.cached_property
    def round_spec(self) -> RoundSpec:
        """The codebook's :class:`~tailq.kernels.RoundSpec` with the fine index of each code attached."""
        return dataclasses.replace(
            self.codebook.round_spec, fine=self.fine_index.detach().to("cpu", torch.int64), grid=self.grid
        )

    def encode_lanes(self, x: torch.Tensor, generator: Generator, plan: LanePlan) -> torch.Tensor:
        """``pack_lanes(self.encode_fine(x, generator), plan)`` — fused into one pass for a ``RandKey``."""
        if plan.grid != self.grid:
            raise ValueError(f"lane plan is for grid {plan.grid}, this codebook's fine grid is {self.grid}")
        if isinstance(generator, RandKey):
            out = dispatch.encode_lanes(x.reshape(-1), self.round_spec, generator, plan)
            if out is not None:
                return out
        return pack_lanes(self.encode_fine(x.reshape(-1), generator), plan, check=False)

    def decode_lanes(
        self, words: torch.Tensor, plan: LanePlan, n: int, n_workers: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``self.decode_sum(unpack_lanes(words, plan, n), n_workers)`` (fused when a kernel is available), written
        into ``out`` (float32, ``n`` elements) when given."""
        lo, hi = self.codebook.low, self.codebook.high
        res = dispatch.decode_lanes(words, plan, n, lo, (hi - lo) / (self.grid * n_workers), out)
        if res is not None:
            return res
        dec = self.decode_sum(unpack_lanes(words, plan, n, check=False), n_workers)
        return dec if out is None else out.copy_(dec)

    def decode_sum(self, total: torch.Tensor, n_workers: int) -> torch.Tensor:
        """Exact mean from the sum of fine indices over ``n_workers``: l_0 + (K/N)·(l_s − l_0)/grid."""
        lo, hi = self.codebook.low, self.codebook.high
        return (total.to(torch.float64) * ((hi - lo) / (self.grid * n_workers)) + lo).to(torch.float32)
