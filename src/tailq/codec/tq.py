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

Scale: the histogram tails bin |g|·2^-shift for an integer octave shift (:mod:`tailq.theory.histogram`) and
scale the design back by 2^shift, so the design is the same at every scale a float32 can carry. ``encode``
bins at shift 0 (today's binning) and, only when the bucket fell outside the bins' range, bins again at the
shift its statistics give (``info["shift"]``, ``info["rebinned"]``); the distributed layer keeps the shift per
bucket (:mod:`tailq.comm.agree`). The Laplace statistics ``[n, Σ|g|]`` are scale-free as they are.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import numpy as np
import torch

from tailq import theory
from tailq.kernels import RandKey, dispatch

from .base import FLOAT32_MAX, Aggregation, Compressor, Encoded, Option, check_input, register
from .codebook import Codebook, fit_float32
from .stats import histogram_stats, laplace_stats

__all__ = ["TUQ", "TNQ", "TBQ", "TruncatedQuantizer", "DesignResult", "checked_input"]

TAILS = ("laplace", "powerlaw", "empirical")
MAX_REBINS = 3
"""At most this many re-binnings of one bucket (one suffices unless it has more than 2^28 elements)."""


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


def _histogram(stats: np.ndarray) -> Any:
    """The :class:`~tailq.theory.LogHistogram` of histogram statistics (with or without the log-sums)."""
    if stats.size == 2 * theory.HIST_NBINS:  # empirical statistics carry no log-sums (not needed)
        stats = np.concatenate([stats, np.zeros(theory.HIST_NBINS)])
    return theory.LogHistogram.from_stats(stats)


def _f32_levels(levels: Any, shift: int = 0) -> np.ndarray:
    """float64 ``levels``·2^shift, scaled down (if need be) so the outer level is at most float32's largest value
    (:func:`~tailq.codec.codebook.fit_float32`)."""
    return fit_float32(np.ldexp(np.asarray(levels, dtype=np.float64), int(shift)))


@functools.lru_cache(maxsize=256)
def _design_cached(
    scheme: str, tail_kind: str, bits: int, refine: bool, shift: int, stats_bytes: bytes
) -> DesignResult:
    stats = np.frombuffer(stats_bytes, dtype=np.float64)
    uniform = scheme == "tuq"
    if tail_kind == "laplace":
        n, total = float(stats[0]), float(stats[1])
        if total == 0.0:
            return DesignResult(None, None, None, zero=True)
        tail: Any = theory.LaplaceTail(scale=total / n)
        des = theory.design(scheme, tail, bits)
        return DesignResult(Codebook.from_levels(_f32_levels(des.levels), uniform=uniform), des, tail)

    # the histogram is of |g|·2^-shift: design on those units, then scale the levels back by 2^shift (exact)
    hist = _histogram(stats)
    if hist.n == 0 or float(hist.sum_abs.sum()) == 0.0:
        return DesignResult(None, None, None, zero=True)
    fallback = None
    if tail_kind == "powerlaw":
        try:
            fit = theory.fit_powerlaw_hist(hist)
            tail = fit.tail
            des = theory.design(scheme, tail, bits)
            levels, note = _cap_to_data(des, tail, hist)
            cb = Codebook.from_levels(_f32_levels(levels, shift), uniform=uniform)
            return DesignResult(cb, des, tail, fallback=note)
        except (theory.HeavyTailError, ValueError) as err:
            fallback = f"power-law design not applicable ({err}); used the empirical design"
    try:
        tail = theory.EmpiricalTail(hist)
        des = theory.design(scheme, tail, bits, refine=refine)
        levels, note = _cap_to_data(des, tail, hist)
        notes = "; ".join(n for n in (fallback, note) if n) or None
        cb = Codebook.from_levels(_f32_levels(levels, shift), uniform=uniform)
        return DesignResult(cb, des, tail, fallback=notes)
    except ValueError as err:
        # Every |g| is below the histogram's zero bin (< 2^-40 in the binned units; encode re-bins such a bucket,
        # so this is reached only when told to design at that shift): a uniform grid on the bound is exact enough
        # (error < 2^-80 per coordinate in those units) and keeps zero in -> zero out for true zeros.
        # the bound is a bin edge: at float32's top octave that is 2^128, beyond float32 (nothing lies above its max)
        bound = min(float(np.ldexp(hist.max_abs_bound, int(shift))), FLOAT32_MAX)
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


_SHIFT_LIMIT = 300  # octave shifts beyond float32's exponents (2^-149 .. 2^128) with margin; float64-exact
_TOP_SHIFT = 127 - 12  # max|g| near float32's top (2^127..2^128): binned into [2^12, 2^16)


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
    format_options: ClassVar[tuple[str, ...]] = ("bits",)  # the design (tail, refine) travels in the encoding
    bits: int
    tail: str

    # -- codebook agreement (the distributed layer all-reduces local_stats with SUM) -------------------
    def local_stats(self, x: torch.Tensor, shift: int = 0) -> torch.Tensor:
        """Summable float64 statistics of ``x`` that define the codebook.

        ``shift``: the octave shift of the histogram tails (bin |x|·2^-shift; every rank must use the same one);
        the Laplace statistics take none (they are scale-free).
        """
        shift = self._check_shift(shift)
        if self.tail == "empirical":  # fused fast path: finite check + histogram in one pass (same bits)
            res = dispatch.histogram_stats(_flat32(x), shift)
            if res is not None:
                if res[1]:
                    check_input(x)  # raises the usual error naming the non-finite values
                return res[0]
        flat = check_input(x)
        if self.tail == "laplace":
            return laplace_stats(flat)
        return histogram_stats(flat, with_logs=self.tail == "powerlaw", shift=shift)

    def _check_shift(self, shift: Any) -> int:
        if isinstance(shift, bool) or not isinstance(shift, int):
            raise TypeError(f"{self.name}: shift must be an integer (an octave shift), got {shift!r}")
        if shift and self.tail == "laplace":
            raise ValueError(f"{self.name}: shift applies to the histogram tails (powerlaw, empirical); tail="
                             f"'laplace' statistics are scale-free, so shift must be 0; got {shift}")
        if not -_SHIFT_LIMIT <= shift <= _SHIFT_LIMIT:
            raise ValueError(f"{self.name}: shift must be in [-{_SHIFT_LIMIT}, {_SHIFT_LIMIT}] (float32 magnitudes "
                             f"span 2^-149 .. 2^128); got {shift}")
        return int(shift)

    def design_from_stats(self, stats: torch.Tensor, shift: int = 0) -> DesignResult:
        """Fit + design from (agreed) statistics binned at ``shift``; a pure, cached function of both."""
        shift = self._check_shift(shift)
        key = stats.detach().to("cpu", torch.float64).contiguous().numpy().tobytes()
        refine = bool(getattr(self, "refine", False))
        return _design_cached(self.scheme, self.tail, self.bits, refine, shift, key)

    def codebook(self, stats: torch.Tensor, shift: int = 0) -> Codebook | None:
        """The codebook for these statistics, binned at ``shift`` (``None`` when every input was zero)."""
        return self.design_from_stats(stats, shift).codebook

    def rebin_shift(self, stats: torch.Tensor, shift: int = 0) -> int | None:
        """``None`` when these statistics (binned at ``shift``) represent their bucket; else the shift to bin it
        again with (its max|g| fell outside the histogram's range, :func:`tailq.theory.hist_in_range`).

        A pure function of the (agreed) statistics, so every rank decides alike. Always ``None`` for the Laplace
        tail. Statistics whose overflow-bin sum overflowed float32 say max|g| is near float32's top.
        """
        if self.tail == "laplace":
            return None
        st = stats.detach().to("cpu", torch.float64).reshape(-1).numpy()
        if not np.isfinite(st).all():  # an overflow-bin Σ beyond float32: max|g| >= 2^128 / n, bin it near the top
            return _TOP_SHIFT
        hist = _histogram(st)
        if theory.hist_in_range(hist):
            return None
        return theory.hist_shift(hist, shift)

    def next_shift(self, stats: torch.Tensor, shift: int = 0) -> int:
        """The shift to bin this bucket's next statistics with, from the ones agreed at ``shift``
        (:func:`tailq.theory.hist_shift`: unchanged while max|g| stays in [2^-12, 2^12) of the binned units)."""
        if self.tail == "laplace":
            return 0
        st = stats.detach().to("cpu", torch.float64).reshape(-1).numpy()
        if not np.isfinite(st).all():
            return _TOP_SHIFT
        return theory.hist_shift(_histogram(st), shift)

    def local_design(self, x: torch.Tensor) -> tuple[DesignResult, int, int]:
        """The design from ``x``'s own statistics: ``(design, shift, re-binnings)``. Binned at shift 0 first and,
        only while the statistics fall outside the histogram's range, again at :meth:`rebin_shift`'s shift."""
        stats = self.local_stats(x)  # validates x (finite) on the way
        shift, rebins = 0, 0
        while rebins < MAX_REBINS:
            new = self.rebin_shift(stats, shift)
            if new is None or new == shift:
                break
            shift, rebins = new, rebins + 1
            stats = self.local_stats(x, shift)
        return self.design_from_stats(stats, shift), shift, rebins

    def local_codebook(self, x: torch.Tensor) -> Codebook | None:
        """The codebook :meth:`encode` would use for ``x`` alone (any scale; ``None`` when ``x`` is zero)."""
        return self.local_design(x)[0].codebook

    # -- encode / decode ---------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, *, generator: torch.Generator | RandKey | None = None) -> Encoded:
        """Design from ``x``'s own statistics, then truncate, round and pack (see :meth:`encode_with`)."""
        res, shift, rebins = self.local_design(x)
        flat = _flat32(x)
        if flat.numel() == 0:
            return self._empty(x)
        info = res.info()
        if self.tail != "laplace":
            info.update(shift=shift, rebinned=rebins)
        return self._encode(x, flat, res.codebook, generator, info)

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
        cb = self.local_codebook(flat)
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
