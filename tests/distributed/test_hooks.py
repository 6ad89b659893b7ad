"""Distributed acceptance tests on real Gloo process groups (2, 3 and 4 ranks).

Tolerances, from the math:
* stochastic unbiased compressors, R repeated steps on fixed gradients: per coordinate the mean over steps must
  be within 6 standard errors of the expected value (4 SE after a Bonferroni correction over d = 257
  coordinates), and the aggregate ratio S = Σ(mean − expected)² / Σ SE², whose expectation is 1 and whose
  standard deviation is ≈ √(2/d) ≈ 0.09, must be below 1.6. The standard error is the exact one,
  √(Σ_r (l_j+1 − t_r)(t_r − l_j) / N² / R), for compressors that round onto known levels (the sample std of a
  rarely-moving coordinate is itself skewed low and inflates z), and the sample one for the others;
* deterministic compressors: equal to the exact mean of the compressed vectors up to float32 rounding.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from workers import (
    launch,
    w_bad_options,
    w_bf16_parity,
    w_checkpoint,
    w_ddp_statistics,
    w_dead_peer,
    w_decode_into_bucket,
    w_lanes_exact,
    w_mismatch,
    w_modes,
    w_nonfinite,
    w_plan,
    w_powersgd_parity,
    w_redesign,
    w_stale,
    w_statistics,
    w_train,
    w_twophase_phases,
    w_twophase_wire,
)

pytestmark = pytest.mark.slow

STEPS, D = 300, 257
ALL_CASES: list[tuple[str, dict[str, Any]]] = [
    ("tuq", {"bits": 3}),
    ("tnq", {"bits": 3, "route": "allreduce"}),
    ("tnq", {"bits": 3, "route": "allgather"}),
    ("tnq", {"bits": 2, "tail": "laplace"}),
    ("tbq", {"bits": 3}),
    ("tbq", {"bits": 4, "tail": "powerlaw", "route": "allgather"}),
    ("single-scale", {"bits": 4}),
    ("single-scale", {"bits": 3, "route": "allgather"}),
    ("multi-scale", {"bits": 4}),
    ("multi-scale", {"bits": 3, "granularity": "element", "route": "allgather"}),
    ("qsgd", {"bits": 4, "bucket_size": 64}),
    ("nuqsgd", {"bits": 4, "bucket_size": 64}),
    ("terngrad", {}),
    ("efsign", {}),
    ("topk", {"ratio": 0.1}),
    ("tuq", {"bits": 3, "route": "twophase"}),
    ("tnq", {"bits": 3, "route": "twophase", "gather_bits": 4}),
    ("tbq", {"bits": 2, "route": "twophase", "owner_feedback": True}),
    ("single-scale", {"bits": 3, "route": "twophase"}),
]
SMALL_CASES = ([c for c in ALL_CASES if c[0] in ("tuq", "multi-scale", "qsgd", "efsign")][:4] + [ALL_CASES[1]]
               + [c for c in ALL_CASES if c[1].get("route") == "twophase"][:2])


def check_statistics(results: list[list[dict[str, Any]]]) -> None:
    for case in results[0]:
        name = f"{case['name']} {case['opts']}"
        mean, std, exp = case["mean"], case["std"], case["expected"]
        diff = (mean - exp).abs()
        if float(std.max()) == 0.0:  # deterministic
            assert float(diff.max()) <= 1e-6 * (1 + float(exp.abs().max())), name
        else:
            # the standard error from the exact rounding variance where it is known (codebook compressors): the
            # sample std of a rarely-moving coordinate is itself very noisy and skewed low, which inflates z
            var = case.get("exact_var")
            se = std / math.sqrt(STEPS) if var is None else (var / STEPS).sqrt()
            noisy = se > 0
            z = diff[noisy] / se[noisy]
            assert float(z.max()) <= 6.0, (name, float(z.max()))
            ratio = float((diff**2).sum() / (se**2).sum())
            assert ratio < 1.6, (name, ratio)
            # coordinates that never moved: their level was hit every time; any bias there is below one
            # level gap times the chance of never moving in R steps — bounded by the aggregate test above
        # every rank holds the same mean, bit for bit, and the same codebook
        for other in results[1:]:
            mine = next(c for c in other if c["name"] == case["name"] and c["opts"] == case["opts"])
            assert torch.equal(mine["last"], case["last"]), name
        if case["levels"] is not None:
            for other in results[1:]:
                mine = next(c for c in other if c["name"] == case["name"] and c["opts"] == case["opts"])
                assert torch.equal(mine["levels"], case["levels"]), name
        # wire bits per coordinate from counted bytes match the cost model within 2%
        assert case["bits_measured"] == pytest.approx(case["bits_model"], rel=0.02), name


@pytest.mark.parametrize("world", [2, 3, 4])
def test_hooked_mean_is_unbiased_for_the_target_on_every_compressor(world: int) -> None:
    cases = ALL_CASES if world == 3 else SMALL_CASES
    check_statistics(launch(w_statistics, world, cases, STEPS, D))


@pytest.mark.parametrize("name, opts", [("tnq", {"bits": 3}), ("tuq", {"bits": 2, "route": "allreduce"}),
                                        ("efsign", {})])
def test_real_ddp_gradient_equals_the_expected_mean(name: str, opts: dict[str, Any]) -> None:
    res = launch(w_ddp_statistics, 2, name, opts, STEPS)
    r = res[0]
    diff = (r["mean"] - r["expected"]).abs()
    if name == "efsign":  # deterministic: exact up to float32 rounding
        assert float(diff.max()) <= 1e-6 * (1 + float(r["expected"].abs().max()))
        return
    se = r["std"] / math.sqrt(STEPS)
    noisy = se > 0
    assert float((diff[noisy] / se[noisy]).max()) <= 6.5  # ~22k coordinates: 4 SE after Bonferroni ≈ 6.2
    assert float((diff**2).sum() / (se**2).sum()) < 1.3  # S ≈ 1 ± √(2/22k)
    assert torch.equal(res[0]["levels"], res[1]["levels"])


@pytest.mark.parametrize("stale", [False, True])
def test_stale_stats_use_the_previous_steps_codebook(stale: bool) -> None:
    for a0, a1, a2 in launch(w_stale, 2, stale):
        if stale:  # step 1 still uses step 0's statistics; step 2 uses step 1's (10x larger)
            assert a1 == a0 and a2 == pytest.approx(10 * a0, rel=1e-6)
        else:
            assert a1 == pytest.approx(10 * a0, rel=1e-6) and a2 == a1


@pytest.mark.parametrize("name", ["tnq", "tuq"])
def test_redesign_every_k_steps_rescales_the_kept_design_by_the_agreed_scale(name: str) -> None:
    """Design on steps 0, 3, 6; in between the levels are the last design's times Σ|g_t| / Σ|g_design| (powers of
    two here, so exactly), only [non-finite count, Σ|g|] is all-reduced (16 bytes), a zero step decodes to zero
    and a NaN step falls back to the exact fp32 mean like plain DDP."""
    res = launch(w_redesign, 2, name, 3)
    r = res[0]
    lv, fresh = r["levels"], r["fresh"]
    assert torch.equal(lv[0], fresh[0]) and torch.equal(lv[3], fresh[3])  # design steps: a fresh design
    assert torch.equal(lv[1], lv[0] * 2) and torch.equal(lv[2], lv[0] * 0.5)
    assert torch.equal(lv[5], lv[3] * 2) and torch.equal(lv[7], lv[3] * 0.5)  # step 6 fell back: 3's design kept
    # the empirical design is scale-equivariant (log-binned histogram): for a pure rescaling of the gradients the
    # kept design, rescaled, is what a fresh design would have given
    for i in (1, 2, 5, 7):
        assert torch.allclose(lv[i], fresh[i], rtol=1e-5, atol=0), i
    assert lv[4] is None and float(r["results"][4].abs().max()) == 0.0  # all-zero step: exactly zero
    assert [f["step"] for f in r["fallbacks"]] == [6]
    got, plain = r["results"][6], r["plain_nan_step"]
    assert torch.equal(torch.nan_to_num(got, nan=7.0), torch.nan_to_num(plain, nan=7.0))
    assert [b for i, b in enumerate(r["stats_bytes"]) if i in (1, 2, 4, 5, 7)] == [16] * 5
    assert all(r["stats_bytes"][i] > 16 * 100 for i in (0, 3, 6))
    for a, b in zip(res[0]["levels"], res[1]["levels"], strict=True):  # every rank used the same codebook
        assert (a is None and b is None) or torch.equal(a, b)
    assert len(r["saved_designs"]) == 1


def test_redesign_every_rejects_what_it_cannot_do() -> None:
    msgs = launch(w_bad_options, 1, [("tnq", {"redesign_every": 0}), ("qsgd", {"redesign_every": 2}),
                                     ("tnq", {"redesign_every": 2, "stale_stats": True})])[0]
    assert "redesign_every must be an integer >= 1" in msgs[0]
    assert "applies to the truncated quantizers (tuq, tnq, tbq), not 'qsgd'" in msgs[1]
    assert "choose one" in msgs[2]


def test_summable_and_allgather_routes_agree_in_expectation() -> None:
    res = launch(w_statistics, 2, [ALL_CASES[1], ALL_CASES[2]], STEPS, D)[0]
    a, b = res
    assert a["route"] == "allreduce" and b["route"] == "allgather"
    se = ((a["std"] ** 2 + b["std"] ** 2) / STEPS).sqrt()
    noisy = se > 0
    assert float(((a["mean"] - b["mean"]).abs()[noisy] / se[noisy]).max()) <= 6.0


def test_lane_packed_sums_decode_exactly_with_odd_world_size_for_bits_1_to_8() -> None:
    for rank_result in launch(w_lanes_exact, 3, ["tuq", "tnq", "tbq"], 1001):
        for name, bits, err in rank_result:
            assert err == 0.0, (name, bits, err)


@pytest.mark.parametrize("stale", [False, True])
def test_nonfinite_on_one_rank_reaches_every_rank_exactly_like_plain_ddp(stale: bool) -> None:
    for name in ("tnq", "multi-scale", "qsgd"):
        if stale and name == "qsgd":
            continue  # no statistics to be stale
        for r in launch(w_nonfinite, 3, name, stale):
            assert r["equal"] and r["inf"] and r["nan"], (name, stale, r)
            assert r["fallbacks"] and "non-finite" in r["fallbacks"][-1]["why"]


def test_mismatched_configurations_fail_fast_on_every_rank() -> None:
    for msg in launch(w_mismatch, 2, timeout=120):
        assert "configured differently" in msg and '"bits": 3' in msg and '"bits": 4' in msg
    # two-phase: ranks whose owners would requantize at different widths (or one without owner feedback)
    opts = [{"route": "twophase", "gather_bits": 5}, {"route": "twophase", "gather_bits": 6},
            {"route": "twophase", "gather_bits": 5, "owner_feedback": True}]
    for msg in launch(w_mismatch, 3, opts, timeout=120):
        assert "configured differently" in msg and '"gather_bits": 6' in msg and '"owner_feedback": true' in msg


def test_dead_peer_gives_an_error_not_an_endless_wait() -> None:
    res = launch(w_dead_peer, 3, expect=2, timeout=120)
    assert len(res) == 2
    for r in res:
        assert r["message"] != "no error"
        assert r["seconds"] < 60


def test_training_100_steps_reaches_fp32_loss_within_a_stated_factor() -> None:
    tq = {"min_bucket": 0}
    hooks: list[tuple[str, dict[str, Any]]] = [
        ("fp32", {}), ("fp16", {}), ("bf16", {}), ("powersgd", {}),
        ("tuq", {**tq, "bits": 3}), ("tnq", {**tq, "bits": 3}), ("tnq", {**tq, "bits": 2, "stale_stats": True}),
        ("tbq", {**tq, "bits": 3}), ("single-scale", {**tq, "bits": 4}), ("multi-scale", {**tq, "bits": 4}),
        ("qsgd", {**tq, "bits": 4}), ("nuqsgd", {**tq, "bits": 4}), ("terngrad", tq),
        ("efsign", {**tq, "error_feedback": True}), ("topk", {**tq, "ratio": 0.05, "error_feedback": True}),
    ]
    losses = launch(w_train, 2, hooks, 100, timeout=600)
    for r in losses[1:]:  # every rank ends with the same model
        assert r == pytest.approx(losses[0], rel=1e-6)
    loss = losses[0]
    base = loss["fp32"]
    initial = math.log(8)  # cross-entropy of an untrained 8-class model
    assert base < 0.5 * initial
    for key, value in loss.items():
        # Stated factor: within 2.5x of fp32's final full-data loss after 100 steps. Measured on this task
        # (2 ranks, 2026-11-22): fp16/bf16/4-bit single/multi-scale/QSGD/NUQSGD 1.00-1.03x, TNQ 3-bit 1.14x,
        # TBQ 1.20x, TUQ 1.36x, TernGrad 1.33x, top-k+EF 1.30x, EF-signSGD+EF 1.64x, TNQ 2-bit stale 2.0x,
        # PowerSGD rank 1 2.25x (rank 4: 1.09x). Without error feedback EF-signSGD is at 3.6x: not tested here.
        assert value <= 2.5 * base, (key, value, base)


@pytest.mark.parametrize(
    "hook, opts",
    # routes fixed: route="auto" plans from timings, which two separate runs need not share (a resumed run
    # restores its saved plan: test_auto_plans_from_the_warm_up_and_a_fast_network_means_passthrough)
    [("tnq", {"bits": 3, "min_bucket": 0, "error_feedback": True, "stale_stats": True, "route": "allreduce"}),
     # resumed mid-period (designs at steps 1, 5, 9; saved after step 5): the kept design must be restored
     ("tbq", {"bits": 3, "min_bucket": 0, "error_feedback": True, "redesign_every": 4, "route": "allgather"}),
     # two-phase: the owner's residuals and its kept phase-2 designs must be restored too
     ("tnq", {"bits": 3, "min_bucket": 0, "error_feedback": True, "route": "twophase", "owner_feedback": True,
              "redesign_every": 3}),
     ("powersgd", {"start_powerSGD_iter": 2, "matrix_approximation_rank": 2})],
)
def test_save_restore_continue_gives_identical_parameters(tmp_path: Any, hook: str, opts: dict[str, Any]) -> None:
    path = str(tmp_path / "ck")
    full = launch(w_checkpoint, 2, hook, opts, "full", path)
    launch(w_checkpoint, 2, hook, opts, "first", path)
    resumed = launch(w_checkpoint, 2, hook, opts, "resume", path)
    for a, b in zip(full[0], resumed[0], strict=True):
        assert torch.equal(a, b)
    for a, b in zip(full[0], full[1], strict=True):  # and every rank holds the same model
        assert torch.equal(a, b)


def test_powersgd_on_gloo_matches_pytorch_where_pytorch_works() -> None:
    for pytorch_params, tailq_params in launch(w_powersgd_parity, 2):
        for a, b in zip(pytorch_params, tailq_params, strict=True):
            assert torch.equal(a, b)


def test_bf16_on_gloo_is_pytorchs_own_hook() -> None:
    for r in launch(w_bf16_parity, 2):
        assert r["equal"]
        assert "NCCL" in r["refused"]
        assert r["rel_err"] < 2**-7  # bf16 keeps 8 significant bits


def test_passthrough_and_vnmse_measurement() -> None:
    for r in launch(w_modes, 2):
        # a bucket below min_bucket goes exactly as PyTorch's bf16 hook would send it
        assert r["passthrough_equal"] and r["kinds_small"] == ["config", "passthrough"]
        # measure_every=2: steps 0 and 2 are measured, and the recorded vNMSE is the definition's value
        assert [v["step"] for v in r["vnmse"]] == [0, 2]
        assert not any(v.get("warmup") for v in r["vnmse"])  # warmup_steps=0: no sample is of a warm-up step
        for v in r["vnmse"]:
            assert v["vnmse"] == pytest.approx(r["manual"][v["step"]], rel=1e-4)
        # measurement traffic is labelled apart and not charged to the method (fp32: 32 bits on 2 of 4 steps)
        assert r["measure_bits"] == pytest.approx(16.0)
        # 2-bit codes (all-gather at N = 2) + the empirical statistics: 453 float32 (non-finite count, 226
        # counts, 226 |g| sums) per step; at d = 3000 the statistics cost more than the codes
        assert r["method_bits"] == pytest.approx((8 * math.ceil(3000 * 2 / 8) + 32 * 453) / 3000)


def test_two_phase_on_a_bucket_shorter_than_the_world_and_on_odd_lengths() -> None:
    # 3 values on 4 ranks: one padded shard of 8 per rank, three of them all padding
    check_statistics(launch(w_statistics, 4, [("tnq", {"bits": 3, "route": "twophase"}),
                                              ("tuq", {"bits": 2, "route": "twophase"})], STEPS, 3))


@pytest.mark.parametrize("world, d", [(2, 5000), (3, 1001), (4, 777)])
def test_two_phase_hands_the_bytes_of_the_cost_model(world: int, d: int) -> None:
    for name, opts in (("tnq", {"bits": 3}), ("tuq", {"bits": 4, "gather_bits": 6})):
        for r in launch(w_twophase_wire, world, name, d, opts):
            assert [c for c, _ in r["handed"]] == ["all_to_all", "all_gather"]
            for (_, got), (_, model) in zip(r["handed"], r["model"], strict=True):
                assert got == pytest.approx(model, rel=0.02)


@pytest.mark.parametrize("world, d", [(2, 4099), (3, 1001)])
def test_every_route_decodes_the_mean_into_the_buckets_own_buffer(world: int, d: int) -> None:
    for rank_rows in launch(w_decode_into_bucket, world, d):
        for name, route, identical, in_place in rank_rows:
            assert identical, (name, route)  # the same bits as decoding into a fresh tensor and copying back
            assert in_place, (name, route)  # and written straight into the bucket (no fresh tensor, no copy)


def test_two_phase_records_the_error_of_each_phase() -> None:
    for gather_bits in (2, 8):
        res = launch(w_twophase_phases, 3, 6001, gather_bits)
        for r in res:
            rec = r["rec"]
            # phase 1 is reproduced exactly by hand; phase 2 to the float32 rounding of the decoded mean
            assert rec["vnmse_phase1"] == pytest.approx(r["phase1"], rel=1e-6)
            assert rec["vnmse_phase2"] == pytest.approx(r["phase2"], rel=1e-3)
            # the two phases' errors are independent given phase 1: the total is their sum up to a cross term
            assert rec["vnmse"] == pytest.approx(rec["vnmse_phase1"] + rec["vnmse_phase2"], rel=0.25)
            assert torch.equal(r["out"], res[0]["out"])
        if gather_bits == 8:  # 8-bit requantization adds little to 3-bit codes averaged over 3 ranks
            assert res[0]["rec"]["vnmse_phase2"] < 0.1 * res[0]["rec"]["vnmse_phase1"]
        else:  # 2 bits for the mean is coarser than the 3-bit inputs: phase 2 dominates
            assert res[0]["rec"]["vnmse_phase2"] > res[0]["rec"]["vnmse_phase1"]


def test_two_phase_nonfinite_goes_uncompressed_like_the_other_routes() -> None:
    for r in launch(w_nonfinite, 3, "tnq", False, {"route": "twophase", "owner_feedback": True}):
        assert r["equal"] and r["inf"] and r["nan"]
        assert [f["step"] for f in r["fallbacks"]] == [1]


def test_auto_plans_from_the_warm_up_and_a_fast_network_means_passthrough() -> None:
    # loopback, network fitted from the warm-up's timed bf16 all-reduces; every bucket takes the cost model's
    # cheapest route for the fitted network and the measured codec (which one depends on the machine's load: on
    # an idle 2-core machine loopback fits at several Gbit/s and both buckets pass through in bf16; tests/comm
    # has the fast-fit-means-passthrough case with fixed numbers)
    for r in launch(w_plan, 2, None, 1):
        plan = r["plan"]
        assert plan["network_source"] == "fitted" and plan["timed_warmup_allreduces"] == 2
        assert plan["network"]["kind"] == "model" and plan["codec_ns_per_elem_pass"] > 0
        for i, numel in ((0, 20_000), (1, 300_000)):
            why = plan["buckets"][numel]
            costs = {k: v["comm_s"] + v["codec_s"] for k, v in why["candidates"].items()}
            assert r["routes"][i] == why["route"] == min(costs, key=costs.__getitem__)
        assert r["restored"]
    # a given 50 Mbit/s network at N = 4: the fewest bytes win, the two-phase route
    for r in launch(w_plan, 4, "model:50mbit", 1):
        assert r["plan"]["network_source"] == "given"
        assert r["routes"] == {0: "twophase", 1: "twophase"}, r["plan"]
        for why in r["plan"]["buckets"].values():
            costs = {k: v["comm_s"] + v["codec_s"] for k, v in why["candidates"].items()}
            assert why["route"] == min(costs, key=costs.__getitem__)
        assert r["restored"]
