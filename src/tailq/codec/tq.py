"""Truncated quantizers for heavy-tailed gradients: TUQ, TNQ, TBQ ([Y1], [Y2]; SPEC §2–§3).

Pipeline for one tensor: summable statistics → tail fit → optimal design (α*, levels) → codebook →
truncate at α* and round each coordinate stochastically (unbiased) to the levels → pack ``bits`` bits each.

The three are the :class:`~tailq.codec.base.SharesCodebook` protocol, split out so the distributed layer can
all-reduce the statistics and every rank builds the identical codebook: ``local_stats(x)`` (sum-reducible,
``stats_op = "sum"``), ``codebook(stats)`` (pure and cached), ``encode_with(x, codebook, generator=key)``.

Tails: ``laplace`` (stats ``[n, Σ|g|]``, closed forms of [Y2]), ``powerlaw`` (flat body + Pareto tail
fitted by Clauset–Shalizi–Newman on the mergeable histogram; γ̂ ≤ 3 or too few tail samples falls back to
the empirical design and says so in ``info["fallback"]``), ``empirical`` (the histogram itself, §3.4).

Wire format: the codes packed densely at ``bits`` bits, plus the codebook the receiver needs — TUQ sends α
(one float32, the grid is implied by ``bits``); TNQ/TBQ send their s + 1 levels (float32). An all-zero
input sends one float32 zero and no codes (zero in → zero out, exactly).
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import numpy as np
import torch

from tailq import theory
from tailq.kernels import RandKey, dispatch

from .base import Aggregation, Compressor, Encoded, Option, check_input, register
from .codebook import Codebook
from .stats import histogram_stats, laplace_stats

__all__ = ["TUQ", "TNQ", "TBQ", "TruncatedQuantizer", "DesignResult", "checked_input"]

TAILS = ("laplace", "powerlaw", "empirical")


class DesignResult:
    """The codebook built from agreed statistics, with the design it came from (for reports)."""

    __slots__ = ("codebook", "design", "tail", "fallback", "zero")

    def __init__(
        self,
        codebook: Codebook | None,
        design: Any,
        tail: Any,
        fallback: str | None = None,
        zero: bool = False,
    ) -> None:
        self.codebook = codebook
        self.design = design
        self.tail = tail
        self.fallback = fallback
        self.zero = zero

    @property
    def alpha(self) -> float:
        return 0.0 if self.codebook is None else self.codebook.high

    def info(self) -> dict[str, Any]:
        d: dict[str, Any] = {"alpha": self.alpha, "tail": repr(self.tail), "zero": self.zero}
        if self.design is not None:
            d["predicted_mse"] = float(self.design.predicted_mse)
            d["method"] = self.design.method
        if self.fallback:
            d["fallback"] = self.fallback
        return d


@functools.lru_cache(maxsize=256)
def _design_cached(scheme: str, tail_kind: str, bits: int, refine: bool, stats_bytes: bytes) -> DesignResult:
    stats = np.frombuffer(stats_bytes, dtype=np.float64)
    uniform = scheme == "tuq"
    if tail_kind == "laplace":
        n, total = float(stats[0]), float(stats[1])
        if total == 0.0:
            return DesignResult(None, None, None, zero=True)
        tail: Any = theory.LaplaceTail(scale=total / n)
        des = theory.design(scheme, tail, bits)
        return DesignResult(Codebook.from_levels(des.levels, uniform=uniform), des, tail)

    if stats.size == 2 * theory.HIST_NBINS:  # empirical statistics carry no log-sums (not needed)
        stats = np.concatenate([stats, np.zeros(theory.HIST_NBINS)])
    hist = theory.LogHistogram.from_stats(stats)
    if hist.n == 0 or float(hist.sum_abs.sum()) == 0.0:
        return DesignResult(None, None, None, zero=True)
    fallback = None
    if tail_kind == "powerlaw":
        try:
            fit = theory.fit_powerlaw_hist(hist)
            tail = fit.tail
            des = theory.design(scheme, tail, bits)
            levels, note = _cap_to_data(des, tail, hist)
            return DesignResult(Codebook.from_levels(levels, uniform=uniform), des, tail, fallback=note)
        except (theory.HeavyTailError, ValueError) as err:
            fallback = f"power-law design not applicable ({err}); used the empirical design"
    try:
        tail = theory.EmpiricalTail(hist)
        des = theory.design(scheme, tail, bits, refine=refine)
        levels, note = _cap_to_data(des, tail, hist)
        notes = "; ".join(n for n in (fallback, note) if n) or None
        return DesignResult(Codebook.from_levels(levels, uniform=uniform), des, tail, fallback=notes)
    except ValueError as err:
        # Every |g| is below the histogram's zero bin (< 2^-40): a uniform grid on the bound is exact enough
        # (error < 2^-80 per coordinate) and keeps zero in -> zero out for true zeros.
        bound = float(hist.max_abs_bound)
        note = f"empirical design degenerate ({err}); used a uniform grid on [-{bound:.3g}, {bound:.3g}]"
        return DesignResult(Codebook.uniform_grid(bound, 2**bits - 1), None, None, fallback=note)


def _cap_to_data(des: Any, tail: Any, hist: Any) -> tuple[np.ndarray, str | None]:
    """Levels of ``des``, with α capped at the data's max|g| bound when the model puts α* beyond it.

    A fitted power law with γ̂ just above 3 has an astronomically large α* (the model's tail never ends);
    levels past the largest gradient are never used and, in float32, may overflow. TNQ levels are re-placed
    at the capped α (same density); uniform and bi-scaled grids are scaled down.
    """
    bound = float(hist.max_abs_bound)
    if not des.alpha > bound:
        return np.asarray(des.levels), None
    if des.scheme == "tnq":
        levels = theory.tnq_levels(tail, des.bits, bound)
    else:
        levels = np.asarray(des.levels) * (bound / des.alpha)
    return levels, f"alpha*={des.alpha:.4g} exceeds the data's max|g| bound {bound:.4g}; capped there"


class TruncatedQuantizer(Compressor):
    """Shared implementation of TUQ / TNQ / TBQ. Subclasses set ``name`` and ``scheme``."""

    scheme: ClassVar[str]
    truncating = True
    unbiased = True  # unbiased for the truncated input (see target())
    aggregation = Aggregation.SHARED_CODEBOOK
    counter_randomness = True
    stats_op: ClassVar[str] = "sum"
    uniform_codebook: ClassVar[bool] = False
    rescalable: ClassVar[bool] = True  # the designs are scale-equivariant (log-binned histogram, closed forms)
    options: ClassVar[dict[str, Option]] = {
        "bits": Option(int, 3, "bits per coordinate of the code (s = 2^bits - 1 intervals)", 1, 8),
        "tail": Option(str, "empirical", "tail model the design is fitted to", choices=TAILS),
    }
    bits: int
    tail: str

    # -- codebook agreement (the distributed layer all-reduces local_stats with SUM) -------------------
    def local_stats(self, x: torch.Tensor) -> torch.Tensor:
        """Summable float64 statistics of ``x`` that define the codebook."""
        if self.tail == "empirical":  # fused fast path: finite check + histogram in one pass (same bits)
            res = dispatch.histogram_stats(_flat32(x))
            if res is not None:
                if res[1]:
                    check_input(x)  # raises the usual error naming the non-finite values
                return res[0]
        flat = check_input(x)
        if self.tail == "laplace":
            return laplace_stats(flat)
        return histogram_stats(flat, with_logs=self.tail == "powerlaw")

    def design_from_stats(self, stats: torch.Tensor) -> DesignResult:
        """Fit + design from (agreed) statistics; a pure, cached function of the statistics."""
        key = stats.detach().to("cpu", torch.float64).contiguous().numpy().tobytes()
        return _design_cached(self.scheme, self.tail, self.bits, bool(getattr(self, "refine", False)), key)

    def codebook(self, stats: torch.Tensor) -> Codebook | None:
        """The codebook for these statistics (``None`` when every input was zero)."""
        return self.design_from_stats(stats).codebook

    # -- encode / decode ---------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, *, generator: torch.Generator | RandKey | None = None) -> Encoded:
        """Design from ``x``'s own statistics, then truncate, round and pack (see :meth:`encode_with`)."""
        stats = self.local_stats(x)  # validates x (finite) on the way
        flat = _flat32(x)
        if flat.numel() == 0:
            return self._empty(x)
        res = self.design_from_stats(stats)
        return self._encode(x, flat, res.codebook, generator, res.info())

    def encode_with(
        self, x: torch.Tensor, codebook: Codebook | None, *, generator: torch.Generator | RandKey | None = None
    ) -> Encoded:
        """Truncate, round and pack on an agreed ``codebook`` (``None``: every rank's input is zero).

        ``generator`` is a ``torch.Generator`` or a ``RandKey`` (counter-based, fused into one pass by
        :mod:`tailq.kernels` where available).
        """
        flat = checked_input(x)
        if flat.numel() == 0:
            return self._empty(x)
        info = {"alpha": 0.0 if codebook is None else codebook.high, "zero": codebook is None}
        return self._encode(x, flat, codebook, generator, info)

    def _encode(
        self,
        x: torch.Tensor,
        flat: torch.Tensor,
        cb: Codebook | None,
        generator: torch.Generator | RandKey | None,
        info: dict[str, Any],
    ) -> Encoded:
        if cb is None:
            return Encoded({"alpha": torch.zeros(1, dtype=torch.float32)}, x.shape, x.dtype, info)
        gen = self.generator if generator is None else generator
        tensors = {"codes": cb.encode_packed(flat, gen, self.bits)}
        if cb.uniform:
            tensors["alpha"] = torch.tensor([cb.high], dtype=torch.float32)
        else:
            tensors["levels"] = cb.levels.clone()
        return Encoded(tensors, x.shape, x.dtype, info)

    def decode(self, enc: Encoded) -> torch.Tensor:
        n = enc.numel
        if "codes" not in enc.tensors:
            return torch.zeros(enc.shape, dtype=torch.float32)
        if "levels" in enc.tensors:
            cb = Codebook(enc.tensors["levels"], uniform=False)
        else:
            alpha = float(enc.tensors["alpha"][0])
            cb = Codebook.uniform_grid(alpha, 2**self.bits - 1)
        return cb.decode_packed(enc.tensors["codes"], self.bits, n).reshape(enc.shape)

    def target(self, x: torch.Tensor) -> torch.Tensor:
        """T_α*(x): the truncated input, which the decode estimates without bias."""
        flat = check_input(x)
        if flat.numel() == 0:
            return flat.reshape(x.shape)
        cb = self.codebook(self.local_stats(flat))
        return (torch.zeros_like(flat) if cb is None else cb.truncate(flat)).reshape(x.shape)


def _flat32(x: torch.Tensor) -> torch.Tensor:
    """``x`` flattened as float32 after the type checks of ``check_input`` but without its finite check."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        return check_input(x)  # raises the usual TypeError
    return x.reshape(-1).to(torch.float32)


def checked_input(x: torch.Tensor) -> torch.Tensor:
    """``check_input(x)`` with the finite check done by one fused reduction when a fast path exists."""
    flat = _flat32(x)
    bad = dispatch.nonfinite_count(flat)
    if bad is None or bad:
        return check_input(x)  # the reference check (raises with the usual message when bad)
    return flat


@register
class TUQ(TruncatedQuantizer):
    name = "tuq"
    scheme = "tuq"
    uniform_codebook = True
    summary = "truncated uniform quantizer: clip at the optimal alpha*, uniform levels on [-alpha*, alpha*]"
    paper = "Yan et al. 2024, arXiv 2402.01798 (TUQSGD)"


@register
class TNQ(TruncatedQuantizer):
    name = "tnq"
    scheme = "tnq"
    summary = "truncated non-uniform quantizer: clip at alpha*, levels with density ∝ p^(1/3)"
    paper = "Yan et al. 2024, arXiv 2402.01160 (Laplace) and 2402.01798 (power law)"
    options: ClassVar[dict[str, Option]] = {
        **TruncatedQuantizer.options,
        "refine": Option(
            bool, False, "empirical tail only: refine levels to minimise the exact rounding variance"
        ),
    }
    refine: bool

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if self.refine and self.tail != "empirical":
            raise ValueError(f"tnq: option 'refine' applies to tail='empirical' only; got tail={self.tail!r}")


@register
class TBQ(TruncatedQuantizer):
    name = "tbq"
    scheme = "tbq"
    summary = "truncated bi-scaled quantizer: a fine uniform grid on the body, a coarse one on the tail"
    paper = "Yan et al. 2024, arXiv 2402.01798 (TBQSGD; grid definition is our choice, SPEC §3.2)"
