"""Buckets the hook sends as bf16 straight from DDP's thread (no worker hop), on real Gloo ranks.

The fast path must change nothing but time: the same collectives in the same order on every rank (buckets on the
worker and on DDP's thread mixed in one backward), bit-identical results, the closed loop still measuring what it
runs, and the hook's timeout still applying.
"""

from __future__ import annotations

import pytest
import torch
from direct_workers import w_bf16_reference, w_loop, w_mixed, w_timeout
from workers import launch

STEPS = 12


def test_mixed_buckets_match_the_worker_only_path_bit_for_bit() -> None:
    """min_bucket 2000 splits the model's three buckets (~1.2k values first, then 16k, then ~4.2k): the first goes as
    bf16 from DDP's thread, the others are compressed on the worker (all-gather). Trained 12 steps, every parameter
    equals the run with the fast path off, on both ranks, and the wire log is the same."""
    opts = {"bits": 3, "warmup_steps": 1, "min_bucket": 2000, "route": "allgather"}
    fast = launch(w_mixed, 2, opts, True, STEPS)
    slow = launch(w_mixed, 2, opts, False, STEPS)
    for f, s in zip(fast, slow, strict=True):
        assert f["direct"] == STEPS - 1, f["direct"]  # the first bucket of every step after the warm-up
        assert s["direct"] == 0
        assert sorted(f["routes"].values()) == ["allgather", "allgather"], f["routes"]  # below min_bucket: unreported
        assert f["routes"] == s["routes"]
        assert all(torch.equal(a, b) for a, b in zip(f["params"], s["params"], strict=True))
        assert f["wire"] == s["wire"]
        assert f["seconds"]["communicate"] > 0 and f["seconds"]["total"] >= f["seconds"]["communicate"]
    assert all(torch.equal(a, b) for a, b in zip(fast[0]["params"], fast[1]["params"], strict=True))


def test_all_bf16_equals_pytorchs_bf16_hook() -> None:
    """Every bucket below min_bucket: after the warm-up every bucket takes the fast path, and the parameters equal
    those trained with PyTorch's bf16_compress_hook code (tailq's "bf16" hook) bit for bit."""
    fast = launch(w_mixed, 2, {"bits": 3, "warmup_steps": 1, "min_bucket": 10**9}, True, STEPS)
    ref = launch(w_bf16_reference, 2, STEPS)
    for f, r in zip(fast, ref, strict=True):
        assert f["direct"] == 3 * (STEPS - 1)
        assert all(torch.equal(a, b) for a, b in zip(f["params"], r, strict=True))


@pytest.mark.slow
def test_the_closed_loop_measures_and_probes_buckets_sent_from_ddps_thread() -> None:
    """route="auto" against a network it does not have, rank 1 slow on compressed buckets: every bucket moves to
    passthrough, which then goes from DDP's thread on both ranks at the same steps; passthrough's cost in the loop's
    report is measured (from those buckets), probes of the compressing arm still run (on the worker) within the
    budget, and the ranks end with the same parameters."""
    steps = 40
    res = launch(w_loop, 2, steps)
    r0, r1 = res
    assert r0["loop"] == r1["loop"] and r0["routes"] == r1["routes"]  # the same decisions, the same routes
    assert all(torch.equal(a, b) for a, b in zip(r0["params"], r1["params"], strict=True))
    for rep in r0["loop"].values():
        assert rep["route"] == "passthrough" and rep["measured"]["passthrough"], rep
        assert rep["switches"] and rep["switches"][0]["to"] == "passthrough", rep
        assert 0 < rep["costs_ms"]["passthrough"] < 30.0, rep  # measured on loopback, not the modeled 50 Mbit/s
        assert rep["probes"] <= 1 + 0.02 * (steps - rep["start"]), rep
    # which buckets go from DDP's thread is each rank's own affair (only while its worker is idle: the step after a
    # decision may find it still deciding); never a probe, and most of the passthrough buckets
    for r in res:
        bf16 = [sum(v == "passthrough" for v in row.values()) for row in r["routes"]]
        assert all(d <= b for d, b in zip(r["direct"], bf16, strict=True)), (r["direct"], bf16)
        assert sum(r["direct"][8:]) >= 0.7 * sum(bf16[8:]), (r["direct"], bf16)


def test_the_fast_path_waits_under_the_hooks_timeout() -> None:
    """Rank 1 joins step 2's all-reduce 4 s late; rank 0's hook has timeout_s=1: its backward raises tailq's error,
    naming the timeout, after about a second, not the group's 60 s."""
    r0, r1 = launch(w_timeout, 2)
    assert r0["direct"] >= 3  # step 1's buckets, and step 2's went from DDP's thread
    assert "timed out after 1 s" in r0["error"] and "all_reduce(passthrough)" in r0["error"], r0["error"]
    assert 0.9 <= r0["elapsed"] < 3.5, r0["elapsed"]
    assert r1["error"] == ""
