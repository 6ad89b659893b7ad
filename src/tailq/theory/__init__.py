"""tailq.theory — tail models, fitting, mergeable histograms and truncated-quantizer designs (SPEC §1–3, §8).

Only numpy and scipy are used here; the codec layer builds on these functions.
"""

from .design import LAPLACE_C, SCHEMES, Design, HeavyTailError, design, etq_bound, exact_mse, tnq_levels
from .fit import PowerLawFit, fit_laplace, fit_powerlaw, fit_powerlaw_hist, laplace_from_hist
from .histogram import (
    HIST_BINS_PER_OCTAVE,
    HIST_FIT_LO,
    HIST_HI,
    HIST_K,
    HIST_LO,
    HIST_NBINS,
    HIST_STATS_LEN,
    LogHistogram,
    hist_bin_index,
    hist_edges,
    hist_in_range,
    hist_shift,
)
from .tails import EmpiricalTail, LaplaceTail, PowerLawTail, Tail

__all__ = [
    "LaplaceTail",
    "PowerLawTail",
    "EmpiricalTail",
    "Tail",
    "PowerLawFit",
    "fit_laplace",
    "fit_powerlaw",
    "laplace_from_hist",
    "fit_powerlaw_hist",
    "LogHistogram",
    "HIST_LO",
    "HIST_HI",
    "HIST_BINS_PER_OCTAVE",
    "HIST_K",
    "HIST_NBINS",
    "HIST_STATS_LEN",
    "hist_edges",
    "hist_bin_index",
    "HIST_FIT_LO",
    "hist_in_range",
    "hist_shift",
    "Design",
    "HeavyTailError",
    "SCHEMES",
    "LAPLACE_C",
    "design",
    "exact_mse",
    "etq_bound",
    "tnq_levels",
]
