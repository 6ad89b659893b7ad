"""Summable statistics that define a codebook, computed with torch (SPEC §3.3, §3.4, §6).

Every statistic here is a float64 vector that workers can add with an all-reduce SUM; the codebook is then
a pure, deterministic function of the summed vector, so every rank builds the same one.

* Laplace: ``[n, Σ|g|]`` (γ̂ = Σ|g| / n, the zero-location MLE).
* Histogram (power law and empirical): the layout of :mod:`tailq.theory.histogram`:
  ``[counts(B), Σ|g| per bin(B), Σ ln|g| per bin(B)]`` on fixed log-spaced bins of |g|.
"""

from __future__ import annotations

import math

import torch

from tailq.theory.histogram import HIST_BINS_PER_OCTAVE, HIST_HI, HIST_K, HIST_LO, HIST_NBINS

__all__ = ["laplace_stats", "histogram_stats"]

_LOG2_LO = math.log2(HIST_LO)
_LOG2_HI = math.log2(HIST_HI)


def laplace_stats(x: torch.Tensor) -> torch.Tensor:
    """``[n, Σ|x|]`` in float64."""
    n = float(x.numel())
    s = x.abs().sum(dtype=torch.float64) if x.numel() else torch.zeros((), dtype=torch.float64)
    return torch.stack([torch.tensor(n, dtype=torch.float64, device=x.device), s.to(x.device)])


def histogram_stats(x: torch.Tensor, with_logs: bool = True, shift: int = 0) -> torch.Tensor:
    """The mergeable |x| histogram (counts, Σ|x|, Σ ln|x| per bin) as one float64 vector.

    ``with_logs=False`` returns ``[counts, Σ|x|]`` in float32 (a third of the bytes): all the empirical design
    needs. The per-bin log-sums serve the power-law fit only. Counts are exact in float32 up to 2^24 per bin;
    beyond that they round by a few parts in 10^8, which no design can notice.

    ``shift``: bin (and sum) the magnitudes in units of 2^shift, i.e. the histogram of |x|·2^-shift (the octave
    shift of :mod:`tailq.theory.histogram`). The product is exact in float64 for every float32 input, so the
    statistics are those of the shifted values bit for bit; ``shift = 0`` is the plain histogram.
    """
    a = x.reshape(-1).abs().to(torch.float64)
    if shift:
        a = a * 2.0 ** -int(shift)
    nonzero = a >= HIST_LO
    la = torch.where(nonzero, torch.log2(a.clamp_min(HIST_LO)), torch.zeros_like(a))
    idx = torch.floor((la - _LOG2_LO) * HIST_BINS_PER_OCTAVE).to(torch.int64) + 1
    idx = torch.where(nonzero, idx.clamp_(1, HIST_K + 1), torch.zeros_like(idx))
    counts = torch.bincount(idx, minlength=HIST_NBINS).to(torch.float64)
    sum_abs = torch.bincount(idx, weights=a, minlength=HIST_NBINS)
    if not with_logs:
        return torch.cat([counts, sum_abs]).to(torch.float32)
    sum_log = torch.bincount(idx, weights=la * math.log(2.0), minlength=HIST_NBINS)
    return torch.cat([counts, sum_abs, sum_log])
