"""Statistics over seeds (``tailq.harness.stats``, ``compare.aggregate``): coverage, pairing, crossings."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tailq.harness.compare import aggregate, summarize
from tailq.harness.stats import crossing, median_interval, order_statistic_coverage, paired_ratios


def test_order_statistic_coverage_is_the_binomial_formula() -> None:
    assert order_statistic_coverage(3, 1) == pytest.approx(0.75)  # 1 - 2 / 2^3
    assert order_statistic_coverage(4, 1) == pytest.approx(0.875)
    assert order_statistic_coverage(5, 1) == pytest.approx(0.9375)
    assert order_statistic_coverage(10, 2) == pytest.approx(1 - 2 * (1 + 10) / 1024)
    with pytest.raises(ValueError, match="l must be in"):
        order_statistic_coverage(5, 4)


@pytest.mark.parametrize("k", [3, 4, 5, 9, 15])
def test_interval_covers_the_true_median_as_often_as_it_claims(k: int) -> None:
    """Synthetic step timings: lognormal (right-skewed like real step times), some runs censored (never reached =
    inf). The claimed coverage is exact for continuous data, so the observed frequency over T trials must be
    within 4 binomial standard errors of it, and at least 90% whenever k >= 5."""
    rng = np.random.default_rng(k)
    trials, mu, sigma, cap = 4000, math.log(20.0), 0.3, 32.0
    true_median = math.exp(mu)
    hits, claimed = 0, None
    for _ in range(trials):
        x = rng.lognormal(mu, sigma, size=k)
        x[x > cap] = math.inf  # a run past the budget: not reached
        iv = median_interval(x.tolist(), 0.9)
        claimed = iv["coverage"]
        hits += iv["lo"] <= true_median <= iv["hi"]
    assert claimed is not None
    se = math.sqrt(claimed * (1 - claimed) / trials)
    assert abs(hits / trials - claimed) < 4 * se, (hits / trials, claimed)
    if k >= 5:
        assert claimed >= 0.9
    else:
        assert claimed == pytest.approx(1 - 2 * 0.5 ** k)  # [min, max], and the report says it is below 90%


def test_median_interval_values_and_errors() -> None:
    iv = median_interval([5.0, 1.0, 3.0, 2.0, 4.0], 0.9)
    assert (iv["median"], iv["lo"], iv["hi"]) == (3.0, 1.0, 5.0)
    assert median_interval([1.0, 2.0, math.inf])["median"] == 2.0
    assert median_interval([7.0])["coverage"] == 0.0
    with pytest.raises(ValueError, match="NaN"):
        median_interval([1.0, float("nan")])
    with pytest.raises(ValueError, match="level"):
        median_interval([1.0], 1.5)


def test_pairing_by_seed_cancels_the_shared_machine_factor() -> None:
    """Seed s's machine runs everything f_s times slower (f from 1 to 3): the method is exactly 2x faster in every
    seed, so its paired speedup is exactly 2 with a zero-width interval; unpaired, the medians' ratio would not be."""
    f = {0: 1.0, 1: 3.0, 2: 1.7}
    base = {s: 10.0 * v for s, v in f.items()}
    fast = {s: 5.0 * v for s, v in f.items()}
    assert paired_ratios(base, fast) == [2.0, 2.0, 2.0]
    assert paired_ratios(base, {0: None, 1: 15.0, 2: None}) == [0.0, 2.0, 0.0]
    assert paired_ratios({0: None}, {0: None}) == []
    with pytest.raises(ValueError, match="seeds"):
        paired_ratios(base, {0: 1.0})


def test_crossing_interpolates_between_evaluations() -> None:
    hist = [{"step": 25, "clock": 2.0, "accuracy": 0.5}, {"step": 50, "clock": 4.0, "accuracy": 0.9},
            {"step": 75, "clock": 6.0, "accuracy": 1.0}]
    c = crossing(hist, 0.95)
    assert c == {"step": pytest.approx(62.5), "clock": pytest.approx(5.0), "interpolated": True}
    assert crossing(hist, 0.4) == {"step": 25.0, "clock": 2.0, "interpolated": False}  # at the first evaluation
    assert crossing(hist, 1.0)["step"] == pytest.approx(75.0)
    assert crossing(hist, 1.01) is None


def _result(hook: str, accs: list[float], t_eval: float, seed: int) -> dict[str, Any]:
    hist = [{"step": 10 * (i + 1), "clock": t_eval * (i + 1), "accuracy": a, "test_loss": 1.0 - a}
            for i, a in enumerate(accs)]
    steps = [{"step": i, "clock": t_eval * (i + 1) / 10, "step_s": t_eval / 10, "codec_s": 0.0, "comm_s": 0.0}
             for i in range(10 * len(accs))]
    return {"name": hook, "config": {"hook": hook, "hook_options": {}, "seed": seed}, "history": hist,
            "steps": steps, "parameters": 1000, "wire": {"bits_per_coord_handed": 16.0 if hook == "bf16" else 3.0,
                                                         "bits_per_coord_ring_traffic": 24.0},
            "network": {"spec": "model:100mbit,1ms"}, "vnmse": [{"step": 0, "vnmse": 0.1}]}


def _seed_summary(seed: int, factor: float, tnq_accs: list[float]) -> dict[str, Any]:
    s = summarize([_result("bf16", [0.5, 0.8, 0.9, 1.0], 2.0 * factor, seed),
                   _result("tnq", tnq_accs, 1.0 * factor, seed),
                   _result("qsgd", [0.5, 0.8, 0.9, 1.0], 2.0 * factor, seed)], 0.99)
    s.update({"seed": seed, "workload": "fake", "workers": 2, "steps": 40})
    return s


def test_aggregate_pairs_by_seed_and_marks_noise(tmp_path: Path) -> None:
    sums = [_seed_summary(0, 1.0, [0.6, 0.95, 1.0, 1.0]), _seed_summary(1, 2.5, [0.6, 0.95, 1.0, 1.0]),
            _seed_summary(2, 1.3, [0.3, 0.4, 0.5, 0.6])]  # tnq misses the target in seed 2
    agg = aggregate(sums)
    rows = {r["name"]: r for r in agg["runs"]}
    assert agg["seeds"] == [0, 1, 2] and agg["per_seed"] == sums
    # bf16 crosses 0.99 between 0.9 (clock 6f) and 1.0 (8f): 7.8f; tnq between 0.95 (2f) and 1.0 (3f): 2.8f;
    # speedup 7.8 / 2.8 in seeds 0 and 1 whatever f, 0 in seed 2 (not reached)
    assert sorted(rows["tnq"]["speedup_per_seed"]) == pytest.approx([0.0, 7.8 / 2.8, 7.8 / 2.8])
    assert rows["tnq"]["reached"] == 2 and rows["tnq"]["speedup_vs_bf16"]["median"] == pytest.approx(7.8 / 2.8)
    assert rows["tnq"]["tta_s_interp"]["hi"] is None  # inf in results.json: strict JSON
    assert rows["tnq"]["inside_noise"] is True  # [0, 2.79] contains 1
    assert rows["qsgd"]["speedup_per_seed"] == pytest.approx([1.0, 1.0, 1.0]) and rows["qsgd"]["inside_noise"]
    assert rows["bf16"]["inside_noise"] is None
    assert agg["best"] == "tnq"
    json.dumps(agg, allow_nan=False)
    with pytest.raises(ValueError, match="seeds repeat"):
        aggregate([sums[0], sums[0]])
    # and the report renders from results.json alone
    from tailq.harness.report import STEPS_PLOT, render, seed_rows

    (tmp_path / "results.json").write_text(json.dumps({**agg, "id": "x", "failed": []}))
    md = render(tmp_path).read_text()
    assert "over 3 seeds" in md and "covers 75.0%" in md and (tmp_path / STEPS_PLOT).stat().st_size > 1000
    tnq = next(r for r in seed_rows(agg) if r[0] == "tnq")
    assert tnq[1] == "2/3" and tnq[4].startswith("inside noise") and "∞" in tnq[2]


@pytest.mark.slow
def test_compare_over_two_seeds_keeps_every_seed_and_resumes(tmp_path: Path) -> None:
    from tailq.cli import main

    args = ["compare", "--workload", "synthetic", "--workers", "2", "--steps", "30", "--eval-every", "10", "--net",
            "none", "--methods", "bf16", "tnq:3", "--seeds", "2", "--seed", "5", "--out", str(tmp_path), "--id", "s"]
    assert main(args) == 0
    root = tmp_path / "s"
    agg = json.loads((root / "results.json").read_text())
    assert agg["seeds"] == [5, 6] and [sm["seed"] for sm in agg["per_seed"]] == [5, 6]
    for s in (5, 6):  # each seed a complete comparison of its own
        assert (root / f"seed{s}" / "report.md").is_file() and (root / f"seed{s}" / "tnq-3b" / "result.json").is_file()
    tnq = next(r for r in agg["runs"] if r["name"] == "tnq-3b")
    per_seed = [next(r for r in sm["runs"] if r["name"] == "tnq-3b") for sm in agg["per_seed"]]
    assert tnq["speedup_per_seed"] == pytest.approx(
        [next(r for r in sm["runs"] if r["name"] == "bf16")["tta_s_interp"] / p["tta_s_interp"]
         for sm, p in zip(agg["per_seed"], per_seed, strict=True)])
    assert "over 2 seeds" in (root / "report.md").read_text()
    mtime = (root / "seed6" / "tnq-3b" / "result.json").stat().st_mtime
    assert main(["compare", "--resume", str(root)]) == 0  # nothing reruns
    assert (root / "seed6" / "tnq-3b" / "result.json").stat().st_mtime == mtime
