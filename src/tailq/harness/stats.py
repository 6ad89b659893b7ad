"""Statistics of a comparison over seeds: crossings not quantized by the evaluation period, and intervals.

**Crossing.** A run's accuracy is known only at its evaluations. The first evaluation at or above the target
overstates the steps (and seconds) to target by up to one evaluation period, which on small workloads decides
rankings (digits at 25-step evaluations: 75 against 150 steps was one period). :func:`crossing` interpolates
linearly between the last evaluation below the target and the first one at or above it, on the step and on the
training clock; a run already at the target at its first evaluation keeps that evaluation's value (an upper
bound: nothing earlier was measured). The report says which is used.

**Intervals.** :func:`median_interval` gives the sample median and the distribution-free interval for the
population median from exact order statistics: ``[x(l), x(K+1-l)]`` covers the median with probability
``1 - 2 P(B <= l-1)``, ``B ~ Binomial(K, 1/2)``, for any continuous distribution. The narrowest such interval with
coverage at least ``level`` is taken; with fewer than 5 seeds no interval reaches 90% (K = 3: [min, max] covers
75%, K = 4: 87.5%), and the interval returned is [min, max] with its actual coverage, which the report prints.
Values may be ``inf`` (a run that never reached the target): order statistics stay valid under such censoring.

**Pairing.** :func:`paired_ratios` divides the baseline's value by the method's within each seed (same seed, same
data order, same initialization), so the run-to-run variation of the machine that both share cancels in part.
A difference is *inside the noise* when the interval of the paired ratio contains 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["METRICS", "crossing", "median_interval", "order_statistic_coverage", "paired_ratios", "reached",
           "target_from"]

METRICS = {"accuracy": ("accuracy", True), "loss": ("test_loss", False)}
"""Target metrics: the history key each reads and whether higher is better."""


def target_from(history: Sequence[dict[str, Any]], fraction: float, metric: str = "accuracy") -> float:
    """The target a comparison sets from its bf16 run's evaluations.

    ``accuracy``: ``fraction`` × bf16's best test accuracy. ``loss``: bf16's best test loss × (2 − ``fraction``),
    i.e. within ``1 − fraction`` of it (``--target 0.99``: within 1%).
    """
    key, higher = _metric(metric)
    vals = [float(h[key]) for h in history if h.get(key) is not None]
    if not vals:
        raise ValueError(f"target_from: no evaluation in the history has {key!r}")
    return fraction * max(vals) if higher else (2.0 - fraction) * min(vals)


def reached(history: Sequence[dict[str, Any]], target: float | None, metric: str = "accuracy") -> bool:
    """Whether any evaluation in ``history`` is at the target (None: no target, never reached)."""
    return target is not None and crossing(history, target, *_metric(metric)) is not None


def _metric(metric: str) -> tuple[str, bool]:
    if metric not in METRICS:
        raise ValueError(f"target metric must be one of {', '.join(METRICS)}; got {metric!r}")
    return METRICS[metric]


def crossing(history: Sequence[dict[str, Any]], target: float, key: str = "accuracy",
             higher: bool = True) -> dict[str, Any] | None:
    """Where ``history[*][key]`` first reaches ``target`` (at or above it; at or below when ``higher`` is False,
    as for a loss): ``{"step", "clock", "interpolated"}``, or None."""
    prev: dict[str, Any] | None = None
    for h in history:
        if h.get(key) is None:
            continue
        if (h[key] >= target) if higher else (h[key] <= target):
            if prev is None:
                return {"step": float(h["step"]), "clock": float(h["clock"]), "interpolated": False}
            f = (target - prev[key]) / (h[key] - prev[key])  # in (0, 1]: prev is below the target
            return {"step": prev["step"] + f * (h["step"] - prev["step"]),
                    "clock": prev["clock"] + f * (h["clock"] - prev["clock"]), "interpolated": True}
        prev = h
    return None


def order_statistic_coverage(k: int, l: int) -> float:
    """Coverage of ``[x(l), x(k+1-l)]`` (1-based order statistics of k samples) for the population median."""
    from scipy.stats import binom

    if not 1 <= l <= (k + 1) // 2:
        raise ValueError(f"l must be in [1, {(k + 1) // 2}] for k = {k}; got {l}")
    return float(1.0 - 2.0 * binom.cdf(l - 1, k, 0.5))


def median_interval(values: Sequence[float], level: float = 0.9) -> dict[str, Any]:
    """Median and exact order-statistic interval (see the module docstring); ``inf`` allowed, NaN not."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1); got {level}")
    xs = sorted(float(v) for v in values)
    if not xs:
        raise ValueError("median_interval needs at least one value")
    if any(math.isnan(v) for v in xs):
        raise ValueError("median_interval: NaN among the values")
    k = len(xs)
    mid = xs[k // 2] if k % 2 else 0.5 * (xs[k // 2 - 1] + xs[k // 2])
    if k == 1:
        return {"median": mid, "lo": xs[0], "hi": xs[0], "coverage": 0.0, "n": 1, "level": level,
                "method": "exact order statistics"}
    best = 1
    for l in range(1, (k + 1) // 2 + 1):
        if order_statistic_coverage(k, l) >= level:
            best = l
    return {"median": mid, "lo": xs[best - 1], "hi": xs[k - best], "coverage": order_statistic_coverage(k, best),
            "n": k, "level": level, "method": "exact order statistics"}


def paired_ratios(base: dict[int, float | None], other: dict[int, float | None]) -> list[float]:
    """``base[s] / other[s]`` for every seed in both (a speedup when the values are times).

    A None (not reached) time is infinite: a method that never reached the target has speedup 0, a baseline that
    never reached it gives an infinite speedup to a method that did, and both unreached give NaN (dropped).
    """
    missing = sorted(set(base) ^ set(other))
    if missing:
        raise ValueError(f"paired_ratios: seeds {missing} are in one of the two runs only")
    out = []
    for s in sorted(base):
        b = math.inf if base[s] is None else float(base[s])  # type: ignore[arg-type]
        o = math.inf if other[s] is None else float(other[s])  # type: ignore[arg-type]
        if math.isinf(b) and math.isinf(o):
            continue
        out.append(0.0 if math.isinf(o) else b / o)
    return out
