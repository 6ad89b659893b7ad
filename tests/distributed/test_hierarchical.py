"""The hierarchical routes (issue 21) on real Gloo ranks: 2 nodes x 2 workers on localhost.

* every stage exact (fp32 across nodes) gives the exact mean, within float32 rounding of the two sums;
* ``hier-allreduce`` (TUQ) is unbiased up to truncation: averaged over steps of fresh rounding, each rank's output
  on its shard approaches the mean over nodes of the node means clipped to the agreed levels — self-normalised
  bound |Σ e_i| ≤ 6·√(Σ e_i²) over coordinates, and the squared error of the average shrinks as 1/T;
* one node (L = N) and one worker per node (L = 1): ``hier-<inner>`` is ``<inner>``, bit for bit (error feedback
  on, three steps);
* bad layouts: ``node_size`` that does not divide N is a clear error on every rank; an environment whose ranks
  disagree falls back to the flat routes with the reason recorded;
* torchrun's environment gives the layout; NaN on one rank reaches every rank identically;
* the wire: bits leaving each node's NIC per coordinate match the cost model's (K − 1)/K · (b + b₂) within the
  statistics and headers, and the in-node stages never count on the NIC.
"""

from __future__ import annotations

import math

import pytest
import torch
from hier_workers import w_bad_topology, w_ddp, w_exact_stages, w_hook_steps, w_nonfinite
from workers import launch

TORCHRUN_ENV = {"LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": "{local}", "GROUP_RANK": "{node}"}


def test_every_stage_exact_gives_the_exact_mean() -> None:
    d = 10_001  # not a multiple of L or 8: padding in both stages
    res = launch(w_exact_stages, 4, 2, d)
    ex = res[0]["exact"]
    for r in res:
        # two float32 sums of 2 terms each, plus the divisions: a few ulps of the largest magnitude involved
        tol = 8 * 2**-23 * float(ex.abs().max())
        assert float((r["out"].double() - ex).abs().max()) <= tol
        assert torch.equal(r["out"], res[0]["out"])  # bit-identical on every rank
        assert torch.equal(r["into"], r["out"])
        assert r["nic"] > 0 and r["node_bytes"] > 0


def test_hier_allreduce_is_unbiased_up_to_truncation() -> None:
    d, steps = 20_000, 24
    opts = {"bits": 3, "route": "hier-allreduce", "node_size": 2, "warmup_steps": 0, "min_bucket": 0}
    res = launch(w_hook_steps, 4, "tuq", opts, d, steps, None, True)
    from hier_workers import grads

    g = grads(4, d, 0)
    node_means = [(g[0].double() + g[1].double()) / 2, (g[2].double() + g[3].double()) / 2]
    m = math.ceil(math.ceil(d / 2) / 8) * 8  # node shard: ceil(d / 2) rounded up to 8
    for rank, r in enumerate(res):
        assert torch.equal(r["outs"], res[0]["outs"])
        local = rank % 2
        lo, hi = local * m, min(d, (local + 1) * m)
        levels = r["infos"][-1]["levels"]
        assert all(torch.equal(i["levels"], levels) for i in r["infos"])  # the same data: the same design
        ref = sum(torch.clamp(nm[lo:hi], float(levels.min()), float(levels.max())) for nm in node_means) / 2
        avg = r["outs"][:, lo:hi].double().mean(0)
        e = avg - ref
        assert abs(float(e.sum())) <= 6 * math.sqrt(float((e**2).sum()))
        # rounding noise only: the error of a T-step average is 1/T of one step's (chi-square over many coords)
        one = float(((r["outs"][0, lo:hi].double() - ref) ** 2).sum())
        assert float((e**2).sum()) <= 2.0 * one / steps
        # and truncation is real here: the clipped reference differs from the exact mean
        exact = (node_means[0] + node_means[1])[lo:hi] / 2
        assert float(((exact - ref) ** 2).sum()) > float((e**2).sum())


@pytest.mark.parametrize("node_size", [1, 4])
def test_no_hierarchy_is_the_flat_route_bit_for_bit(node_size: int) -> None:
    d, steps = 12_000, 3
    base = {"bits": 3, "warmup_steps": 1, "min_bucket": 0, "error_feedback": True, "node_size": node_size}
    hier = launch(w_hook_steps, 4, "tnq", {**base, "route": "hier-twophase"}, d, steps)
    flat = launch(w_hook_steps, 4, "tnq", {**base, "route": "twophase"}, d, steps)
    for h, f in zip(hier, flat, strict=True):
        assert torch.equal(h["outs"], f["outs"])
        assert h["topology"]["node_size"] == node_size


def test_bad_layouts() -> None:
    errs = launch(w_bad_topology, 4, {"node_size": 3}, None)
    for e in errs:
        assert e.startswith("error:") and "node_size" in e and "does not divide the 4 ranks" in e
    # torchrun-like environment where ranks disagree: flat routes, reason recorded, no hang
    env = {"LOCAL_WORLD_SIZE": "{node}", "LOCAL_RANK": "0"}  # ranks 0-1 say 0 (invalid), 2-3 say 1
    outs = launch(w_bad_topology, 4, {}, env)
    for o in outs:
        assert o.startswith("ok:") and "'node_size': 1" in o and "flat routes" in o


def test_torchrun_environment_and_the_nic_bits() -> None:
    d = 40_000
    opts = {"bits": 3, "route": "hier-twophase", "warmup_steps": 0, "min_bucket": 0}
    res = launch(w_hook_steps, 4, "tnq", opts, d, 2, TORCHRUN_ENV)
    for r in res:
        assert r["topology"] == {"nodes": 2, "node_size": 2, "source": "torchrun environment", "flat_because": None}
        assert torch.equal(r["outs"], res[0]["outs"])
        # (K-1)/K (b + b2) = 1/2 (3 + 5) = 4 bits; + statistics all-reduces and per-shard headers, per node
        measured, model = r["wire"]["node_nic_bits_per_coord"], r["model_nic_bits"]
        assert 4.0 <= model <= 4.0 + 0.1  # + the owners' codebook headers (32 floats per shard of 10,000)
        # the aim, <= (K-1)/K (b + b2) + 1; above the model: the statistics all-reduce across nodes (a few
        # hundred values per bucket and node, ~0.7 bits per coordinate of this 40,000-value bucket)
        assert model <= measured <= 4.0 + 1.0
    flat = launch(w_hook_steps, 4, "tnq", {**opts, "route": "twophase"}, d, 2, TORCHRUN_ENV)
    # the flat two-phase puts L (K-1)/K b + (N-1)/N b2 = 3 + 3.75 bits on each node's NIC
    assert flat[0]["wire"]["node_nic_bits_per_coord"] >= 6.75


def test_nan_on_one_rank_reaches_every_rank_alike() -> None:
    res = launch(w_nonfinite, 4, 10_000)
    for r in res:
        assert math.isnan(float(r["out"][5]))
        assert torch.equal(r["out"].isnan(), res[0]["out"].isnan())
        finite = ~r["out"].isnan()
        assert torch.equal(r["out"][finite], res[0]["out"][finite])
    # the NaN's node shard is local shard 0: its cross group (ranks 0 and 2) went in fp32, the other compressed
    assert [bool(r["fallbacks"]) for r in res] == [True, False, True, False]


def test_ddp_training_with_the_hierarchical_route() -> None:
    res = launch(w_ddp, 4, "hier-twophase", 12)
    for r in res:
        assert torch.equal(r["params"], res[0]["params"])  # replicas identical
        assert r["after"] < r["before"]
        assert r["routes"] == ["hier-twophase"]
        # the per-phase errors cover the whole bucket at the right offsets: ‖e1 + e2‖² = p1 + p2 + 2<e1, e2>, and
        # Cauchy-Schwarz bounds the cross term, so (√p1 − √p2)² ≤ vNMSE ≤ (√p1 + √p2)² (float64 rounding aside)
        assert len(r["vnmse"]) > 10
        for rec in r["vnmse"]:
            p1, p2, v = rec["vnmse_phase1"], rec["vnmse_phase2"], rec["vnmse"]
            lo, hi = (math.sqrt(p1) - math.sqrt(p2)) ** 2, (math.sqrt(p1) + math.sqrt(p2)) ** 2
            assert lo * (1 - 1e-9) <= v <= hi * (1 + 1e-9)


def test_auto_fits_the_node_link_and_plans_among_flat_and_hierarchical_routes() -> None:
    """A given network describes the NIC; the link inside a node is timed in the warm-up (loopback here) and
    planned with: at 50 Mbit/s between nodes the plan is hierarchical (two nodes: gathering the other node's
    3-bit codes, 3 bits a coordinate, is the fewest)."""
    d = 200_000
    opts = {"bits": 3, "node_size": 2, "warmup_steps": 1, "min_bucket": 0, "network": "model:50mbit"}
    res = launch(w_hook_steps, 4, "tnq", opts, d, 3)
    for r in res:
        net = r["plan_network"]
        assert net["rate_bps"] == 50e6 and net["node_rate_bps"] is not None and net["node_rate_bps"] > 50e6
        assert r["plan_route"] == "hier-allgather"
        assert torch.equal(r["outs"], res[0]["outs"])


def test_a_requantizable_per_rank_format_takes_the_hierarchical_two_phase_route() -> None:
    """torchft's FP8 across 2 nodes x 2 workers: the node mean exact, then two-phase across nodes (each rank's
    shards FP8-encoded, the owner's mean re-encoded). Two e4m3 roundings of normal values err by at most 2^-4
    relative each, so the mean's relative error is below 2·2^-4 (values flushed under a row's 2^-10 add little)."""
    d = 12_000
    opts = {"route": "hier-twophase", "node_size": 2, "warmup_steps": 0, "min_bucket": 0}
    res = launch(w_hook_steps, 4, "fp8", opts, d, 2)
    from hier_workers import grads

    exact = torch.stack([g.double() for g in grads(4, d, 0)]).mean(0)
    for r in res:
        assert torch.equal(r["outs"], res[0]["outs"])
        assert [i["route"] for i in r["infos"]] == ["hier-twophase"] * 2
    err = float((res[0]["outs"][0].double() - exact).norm() / exact.norm())
    assert 0 < err < 2 * 2**-4, err
