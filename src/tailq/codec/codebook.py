"""Codebooks: a sorted level set, truncation, and unbiased stochastic rounding (SPEC §2, §6.1).

Stochastic rounding of x ∈ [l_j, l_{j+1}] outputs l_{j+1} with probability (x − l_j)/(l_{j+1} − l_j),
computed from the *real* distances between levels, so E[Q(x)] = x for every x in [l_0, l_s]. Values
outside are first clipped (truncation): the only source of bias.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["Codebook", "SnappedCodebook", "stochastic_round_uniform", "stochastic_round_levels"]


def stochastic_round_uniform(
    x: torch.Tensor, low: float, step: float, s: int, generator: torch.Generator
) -> torch.Tensor:
    """Codes k ∈ {0..s} for the uniform grid low + k·step; x is clipped to [low, low + s·step] first."""
    t = ((x - low) / step).clamp_(0.0, float(s))
    j = t.floor().clamp_(max=s - 1)
    u = torch.rand(x.shape, generator=generator, dtype=t.dtype, device=x.device)
    # P(code = j + 1) = t - j, the fractional distance to the lower level.
    return (j + (u < (t - j)).to(t.dtype)).to(torch.int64)


def stochastic_round_levels(
    x: torch.Tensor, levels: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Codes k ∈ {0..s} for arbitrary increasing levels; x is clipped to [levels[0], levels[-1]] first."""
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

    ``uniform`` codebooks (equal spacing) use an affine fast path; both paths are unbiased.
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

    def encode(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Truncate and stochastically round; returns int64 codes in {0..s}."""
        if self.uniform:
            return stochastic_round_uniform(x, self.low, self.step, self.s, generator)
        return stochastic_round_levels(x, self.levels.to(x.device), generator)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        if self.uniform:
            return codes.to(torch.float32) * self.step + self.low
        return self.levels.to(codes.device)[codes.long()]

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
        return SnappedCodebook(Codebook(values.to(torch.float32), uniform=self.uniform), idx, grid)

    def __repr__(self) -> str:
        kind = "uniform" if self.uniform else "non-uniform"
        return f"Codebook({kind}, s={self.s}, range=[{self.low:.4g}, {self.high:.4g}])"


@dataclasses.dataclass(frozen=True, eq=False)
class SnappedCodebook:
    """A codebook whose levels sit on a fine uniform grid {0..grid}: codes can be summed across workers."""

    codebook: Codebook
    fine_index: torch.Tensor  # int64, increasing, fine_index[k] is level k's point on the fine grid
    grid: int

    def encode_fine(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Stochastically round to the snapped levels and return the *fine* grid index of each choice."""
        return self.fine_index.to(x.device)[self.codebook.encode(x, generator)]

    def decode_sum(self, total: torch.Tensor, n_workers: int) -> torch.Tensor:
        """Exact mean from the sum of fine indices over ``n_workers``: l_0 + (K/N)·(l_s − l_0)/grid."""
        lo, hi = self.codebook.low, self.codebook.high
        return (total.to(torch.float64) * ((hi - lo) / (self.grid * n_workers)) + lo).to(torch.float32)
