"""``tailq.fsdp``: the compressed FSDP2 reduce-scatter, on real Gloo process groups (2, 3 and 4 ranks).

The comm is phase 1 of the two-phase route, so its output is reproducible by hand: the codebook from the
statistics agreed on the unpadded input, each rank's codes of its (N, m)-padded input with the counter key
``RandKey(seed, rank, step, call)``, and the owner's mean of the N decodes of its row, summed in rank order. The
tests check that bit for bit, and then what follows from it, with tolerances from the math:

* each rank's decode of a coordinate is one of the two levels around its truncated value, so the output differs
  from the mean of the truncated inputs by at most the widest gap between adjacent levels;
* unbiasedness over R = 300 steps on a fixed input: per coordinate the mean over steps must lie within 6 standard
  errors of the mean of the truncated inputs (4 SE after a Bonferroni correction over the N·S coordinates), and the
  aggregate ratio Σ(mean − expected)² / Σ SE² (expectation 1, standard deviation √(2/d) ≈ 0.06 for d = 514 and
  0.04 for d = 1028) must be below 1.6, and the summed bias Σ(mean − expected) within 4 of its standard errors
  √(Σ SE²) (coordinates round independently). The standard error is the exact one,
  √(Σ_r (l_j+1 − t_r)(t_r − l_j) / N² / R), as in tests/distributed/test_hooks.py;
* SUM is N × the mean, exactly in fp32 for N = 2 and 4 (multiplying by a power of two is exact);
* wire bytes are counted, not modeled: they must equal N · dense_bytes(m) for the all-to-all plus the statistics
  record (1 + len(local_stats)) · 4 bytes, exactly.
"""

from __future__ import annotations

import io
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))  # the project's Gloo launcher
from workers import heavy, launch  # noqa: E402

SEED, STEPS = 7, 300


# ------------------------------------------------------------------------------------------------ helpers
def _hand_mean(comm: Any, x: torch.Tensor, step: int, call: int, seed: int = SEED) -> dict[str, torch.Tensor]:
    """What the comm must output for input ``x`` (N·S) at (step, call), computed from the codec's primitives."""
    from tailq.comm.routes import shard_numel
    from tailq.kernels import RandKey

    n, r = dist.get_world_size(), dist.get_rank()
    s = x.numel() // n
    fam = comm.family
    own = fam.local_stats(x)  # statistics of the unpadded input, agreed as the comm does: [non-finite, *stats]
    local = torch.cat([torch.zeros(1, dtype=own.dtype), own])
    dist.all_reduce(local, op=dist.ReduceOp.MAX if fam.stats_op == "max" else dist.ReduceOp.SUM)
    cb = comm.comp.codebook(local[1:])
    m = shard_numel(n * s, n)
    padded = torch.nn.functional.pad(x.view(n, s), (0, m - s)).reshape(-1)
    bits = comm.comp.bits
    dec = cb.decode_packed(cb.encode_packed(padded, RandKey(seed, r, step, call), bits), bits, n * m).view(n, m)
    every = [torch.empty_like(dec) for _ in range(n)]
    dist.all_gather(every, dec)  # every[j][r]: rank j's decode of my row
    mean = torch.zeros(m)
    for j in range(n):
        mean += every[j][r]
    trunc = cb.truncate(x).view(n, s)
    truncs = [torch.empty_like(trunc) for _ in range(n)]
    dist.all_gather(truncs, trunc)
    return {"mean": (mean / n)[:s], "truncs": torch.stack([t[r] for t in truncs]), "levels": cb.levels.clone(),
            "m": torch.tensor(m)}


def _exact_sum(x: torch.Tensor) -> torch.Tensor:
    """Plain reduce-scatter's sum of my shard, in fp32, summed in rank order."""
    n, r = dist.get_world_size(), dist.get_rank()
    rows = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(rows, x)
    total = rows[0].view(n, -1)[r].float().clone()
    for row in rows[1:]:
        total += row.view(n, -1)[r].float()
    return total


def _call(comm: Any, x: torch.Tensor, op: Any = dist.ReduceOp.AVG) -> torch.Tensor:
    out = torch.empty(x.numel() // dist.get_world_size(), dtype=x.dtype)
    assert comm(out, x, dist.group.WORLD, op) is None
    return out


# ------------------------------------------------------------------------------------------------ workers
def w_direct(rank: int, world: int, sizes: list[int], names: list[str], steps: int = STEPS) -> dict[str, Any]:
    """Direct calls on heavy-tailed inputs of N·S elements: exactness, level bound, SUM/AVG, bf16, wire bytes,
    unbiasedness over ``steps`` steps (the largest size, tnq), non-finite fallback, passthrough, state round trip."""
    import tailq.fsdp
    from tailq.integrations.fsdp import ROUTE

    out: dict[str, Any] = {"cases": []}
    for name in names:
        for s in sizes:
            x = heavy(world * s, seed=100 + rank + 10 * s)
            avg = tailq.fsdp.reduce_scatter(name, bits=3, min_bucket=0, seed=SEED)
            got = _call(avg, x)
            hand = _hand_mean(avg, x, 0, 0)
            summ = tailq.fsdp.reduce_scatter(name, bits=3, min_bucket=0, seed=SEED)
            got_sum = _call(summ, x, dist.ReduceOp.SUM)
            half = tailq.fsdp.reduce_scatter(name, bits=3, min_bucket=0, seed=SEED)
            got_bf16 = _call(half, x.to(torch.bfloat16))
            ref_bf16 = _hand_mean(half, x.to(torch.bfloat16).float(), 0, 0)["mean"].to(torch.bfloat16)
            recs = [(r.kind, r.collective, r.handed_bytes) for r in avg.metrics.wire.records if r.kind != "config"]
            m = int(hand["m"])
            lv = hand["levels"]
            out["cases"].append({
                "name": name, "s": s, "m": m, "got": got, "hand": hand["mean"], "sum": got_sum,
                "bf16_dtype": str(got_bf16.dtype), "bf16_equal": bool(torch.equal(got_bf16, ref_bf16)),
                "trunc_mean": hand["truncs"].double().mean(0), "max_gap": float((lv[1:] - lv[:-1]).max()),
                "records": recs, "dense": world * avg.family.dense_bytes(m),
                "stats_bytes": (1 + avg.family.local_stats(x).numel()) * avg.family.local_stats(x).element_size(),
                "bits": avg.metrics.wire.bits_per_coord(), "route": avg.metrics.last[0]["route"], "step": avg.step,
            })
    # unbiasedness: `steps` direct calls (each one a step) on one fixed input
    s = max(sizes)
    x = heavy(world * s, seed=500 + rank)
    comm = tailq.fsdp.reduce_scatter("tnq", bits=3, min_bucket=0, seed=SEED)
    acc = torch.zeros(s, dtype=torch.float64)
    for _ in range(steps):
        acc += _call(comm, x).double()
    hand = _hand_mean(comm, x, 0, 0)
    lv, t = hand["levels"].double(), hand["truncs"].double()
    tc = t.clamp(float(lv[0]), float(lv[-1]))
    j = (torch.searchsorted(lv, tc, right=True) - 1).clamp(0, lv.numel() - 2)
    var = ((lv[j + 1] - tc) * (tc - lv[j])).sum(0) / world**2  # of the mean over ranks, one step
    out["unbiased"] = {"mean": acc / steps, "expected": t.mean(0), "se": (var / steps).sqrt(), "step": comm.step}
    # non-finite on one rank: fp32 exact on every rank
    bad = heavy(world * 13, seed=900 + rank)
    if rank == 1:
        bad[3] = float("nan")  # rank 0's row
        bad[13 * (world - 1) + 2] = float("inf")  # the last rank's row
    comm = tailq.fsdp.reduce_scatter("tnq", bits=3, min_bucket=0, seed=SEED)
    got = _call(comm, bad)
    out["nonfinite"] = {"got": got, "plain": _exact_sum(bad) / world, "fallbacks": comm.metrics.fallbacks,
                        "kinds": sorted({r.kind for r in comm.metrics.wire.records})}
    # below min_bucket: the raw values in their dtype, one all-to-all
    comm = tailq.fsdp.reduce_scatter("tnq", bits=3, seed=SEED)  # min_bucket 8192 > N·13
    small = heavy(world * 13, seed=950 + rank).to(torch.bfloat16)
    got = _call(comm, small, dist.ReduceOp.SUM)
    out["passthrough"] = {"got": got, "plain": _exact_sum(small).to(torch.bfloat16),
                          "records": [(r.kind, r.collective, r.handed_bytes) for r in comm.metrics.wire.records
                                      if r.kind != "config"], "route": comm.metrics.last[0]["route"]}
    # named passthrough "bf16": fp32 input, the bf16 rows all-to-all'd, summed in fp32 — the fair uncompressed
    # reduce-scatter on Gloo (whose reduce_scatter_tensor is an all-reduce)
    comm = tailq.fsdp.reduce_scatter("bf16")
    x32 = heavy(world * 13, seed=970 + rank)
    got = _call(comm, x32)
    out["named_bf16"] = {"got": got, "plain": _exact_sum(x32.to(torch.bfloat16)) / world,
                         "records": [(r.kind, r.collective, r.handed_bytes) for r in comm.metrics.wire.records
                                     if r.kind != "config"], "state": comm.state_dict()}
    # state round trip: error feedback + stale statistics, saved after 3 steps, loaded into a fresh (unbound) comm
    opts = {"bits": 3, "min_bucket": 0, "seed": SEED, "error_feedback": True, "stale_stats": True}
    a = tailq.fsdp.reduce_scatter("tnq", **opts)
    for i in range(3):
        _call(a, heavy(world * 21, seed=1000 + 10 * i + rank))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    b = tailq.fsdp.reduce_scatter("tnq", **opts)
    b.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    nxt = heavy(world * 21, seed=2000 + rank)
    out["roundtrip"] = {"equal": bool(torch.equal(_call(a, nxt), _call(b, nxt))), "steps": (a.step, b.step),
                        "keys": sorted(a.state_dict()["error_feedback"]["rounding"]), "route": ROUTE}
    return out


def w_odd(rank: int, world: int) -> dict[str, Any]:
    """N = 3 (one launch for two checks): the direct checks on small sizes, then ranks configured differently."""
    return {"direct": w_direct(rank, world, [5, 13], ["tnq"], 100), "mismatch": w_mismatch(rank, world)}


def w_mismatch(rank: int, world: int) -> str:
    import tailq.fsdp

    comm = tailq.fsdp.reduce_scatter("tnq", bits=3 if rank == 0 else 4, min_bucket=0, timeout_s=20)
    try:
        _call(comm, heavy(world * 100, rank))
    except RuntimeError as err:
        return str(err)
    return "no error"


def _fsdp_model(mp: Any = None) -> torch.nn.Module:
    """Linear 64→256→256→10; the first two wrapped, the last one the root's own (reduced in FSDP's final
    callback, since the inputs do not require grad): three reduce-scatters per backward."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                torch.nn.ReLU(), torch.nn.Linear(256, 10))
    kw = {"mp_policy": mp or MixedPrecisionPolicy()}
    fully_shard(model[0], **kw)
    fully_shard(model[2], **kw)
    fully_shard(model, **kw)
    return model


def w_fsdp_train(rank: int, world: int, steps: int) -> dict[str, Any]:
    """compress(model, "tnq", bits=3) against plain FSDP on the same data; then a few bf16-reduce steps."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    import tailq.fsdp

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 10, generator=gen)
    data = torch.randn(4096, 64, generator=gen)
    labels = (data @ w).argmax(1)
    out: dict[str, Any] = {}
    for variant in ("none", "tnq", "tnq-bf16"):
        mp = MixedPrecisionPolicy(reduce_dtype=torch.bfloat16) if variant == "tnq-bf16" else None
        model = _fsdp_model(mp)
        comm = None
        if variant != "none":
            comm = tailq.fsdp.compress(model, "tnq", bits=3, min_bucket=0, measure_every=10)
        opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
        losses = []
        for step in range(steps if variant != "tnq-bf16" else 5):
            g = torch.Generator().manual_seed(10_000 * step + rank)
            idx = torch.randint(0, len(data), (128,), generator=g)
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(data[idx]), labels[idx])
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        params = [p.full_tensor().detach().clone() for p in model.parameters()]  # sharded DTensors: gather
        with torch.no_grad():
            full = float(torch.nn.functional.cross_entropy(model(data), labels))
        rec: dict[str, Any] = {"losses": losses, "full_loss": full, "params": params}
        if comm is not None:
            wire = comm.metrics.wire
            calls = [r for r in wire.records if r.kind == "payload"]
            stats = [r for r in wire.records if r.kind == "stats"]
            model_bits = 8 * (sum(r.handed_bytes for r in calls) + sum(r.handed_bytes for r in stats)) / wire.coords
            n = world
            shard_model = sum(n * comm.family.dense_bytes(-(-r.numel // n // 8) * 8) for r in calls)
            rec.update({"bits": wire.bits_per_coord(), "model_bits": model_bits, "step": comm.step,
                        "calls_per_step": comm.calls_per_step, "payload_model": shard_model,
                        "payload": sum(r.handed_bytes for r in calls), "fallbacks": len(comm.metrics.fallbacks),
                        "vnmse": [v["vnmse"] for v in comm.metrics.vnmse],
                        "steps_seen": sorted({r.step for r in calls}), "calls_seen": sorted({r.bucket for r in calls})})
        out[variant] = rec
    return out


# ------------------------------------------------------------------------------------------------ checks
def _check_direct(results: list[dict[str, Any]], world: int) -> None:
    for rank, res in enumerate(results):
        for c in res["cases"]:
            what = (world, rank, c["name"], c["s"])
            assert c["m"] % 8 == 0 and c["m"] >= max(8, c["s"]), what
            assert torch.equal(c["got"], c["hand"]), what  # bit-identical to the hand computation
            assert float((c["got"].double() - c["trunc_mean"]).abs().max()) <= c["max_gap"] * (1 + 1e-6), what
            assert torch.equal(c["sum"], c["got"] * world), what  # SUM = N × AVG, exactly (N a power of two)
            assert c["bf16_dtype"] == "torch.bfloat16" and c["bf16_equal"], what
            assert c["route"] == "reduce_scatter" and c["step"] == 1, what
            # wire: the statistics all-reduce, then the all-to-all of N shards of m codes, nothing else
            assert c["records"] == [("stats", "all_reduce", c["stats_bytes"]), ("payload", "all_to_all", c["dense"])]
            assert c["bits"] == 8 * (c["stats_bytes"] + c["dense"]) / (world * c["s"]), what
        u = res["unbiased"]
        diff = (u["mean"] - u["expected"]).abs()
        noisy = u["se"] > 0
        assert u["step"] == STEPS
        assert float((diff[noisy] / u["se"][noisy]).max()) <= 6.0, (world, rank)
        assert float((diff**2).sum() / (u["se"] ** 2).sum()) < 1.6, (world, rank)
        # the summed bias within 4 standard errors (coordinates round independently: Var Σ = Σ se²)
        total = float((u["mean"] - u["expected"]).sum()) / float((u["se"] ** 2).sum().sqrt())
        assert abs(total) <= 4.0, (world, rank, total)
        nf = res["nonfinite"]
        assert torch.equal(torch.nan_to_num(nf["got"], nan=7.0), torch.nan_to_num(nf["plain"], nan=7.0)), rank
        assert [f["why"] for f in nf["fallbacks"]] == ["non-finite gradient on some rank"]
        assert nf["kinds"] == ["config", "fallback", "stats"]
        pt = res["passthrough"]
        assert pt["route"] == "passthrough" and torch.equal(pt["got"], pt["plain"])
        assert pt["records"] == [("passthrough", "all_to_all", world * 13 * 2)]  # the bf16 values, once
        nb = res["named_bf16"]
        assert torch.equal(nb["got"], nb["plain"]), rank
        assert nb["records"] == [("passthrough", "all_to_all", world * 13 * 2)]
        assert nb["state"]["config"]["compressor"] == {"name": "bf16"} and nb["state"]["step"] == 1
        rt = res["roundtrip"]
        assert rt["equal"] and rt["steps"] == (4, 4) and rt["keys"] == [f"0:{world * 21}"]
    if world >= 2:  # the NaN sits in rank 0's row, the Inf in the last rank's
        assert math.isnan(float(results[0]["nonfinite"]["got"][3]))
        assert math.isinf(float(results[-1]["nonfinite"]["got"][2]))


@pytest.mark.parametrize("world", [2, 4])
def test_direct_calls_are_exact_unbiased_and_counted(world: int) -> None:
    names = ["tnq", "tuq", "tbq", "single-scale"] if world == 2 else ["tnq", "single-scale"]
    _check_direct(launch(w_direct, world, [5, 13, 257], names), world)


def test_odd_world_size_and_mismatched_bits() -> None:
    """N = 3: the SUM path multiplies the mean by 3, which rounds; everything else is as for N = 2 and 4. Then
    rank 0 asks for 3 bits and the others for 4: every rank fails on the first call, naming both."""
    res = launch(w_odd, 3, timeout=120)
    for msg in (r["mismatch"] for r in res):
        assert "configured differently" in msg and '"bits": 3' in msg and '"bits": 4' in msg
    for r in (r["direct"] for r in res):
        for c in r["cases"]:
            assert torch.equal(c["got"], c["hand"])
            assert torch.allclose(c["sum"].double(), c["got"].double() * 3, rtol=2**-23, atol=0)
            assert c["records"][1] == ("payload", "all_to_all", c["dense"])
        u = r["unbiased"]
        noisy = u["se"] > 0
        assert float(((u["mean"] - u["expected"]).abs()[noisy] / u["se"][noisy]).max()) <= 6.0


def test_bad_arguments_are_refused_clearly() -> None:
    import tailq.fsdp
    from tailq.integrations.fsdp import shardable_compressors

    assert {"single-scale", "tbq", "tnq", "tuq"} <= set(shardable_compressors())  # (+ any a test registered)
    with pytest.raises(ValueError, match="accepted: " + ", ".join(shardable_compressors())):
        tailq.fsdp.reduce_scatter("qsgd")
    with pytest.raises(ValueError, match="unknown compressor 'nope'"):
        tailq.fsdp.reduce_scatter("nope")
    with pytest.raises(TypeError, match=r"gather_bits, route configure the DDP hook's routes or warm-up"):
        tailq.fsdp.reduce_scatter("tnq", route="twophase", gather_bits=4)
    with pytest.raises(TypeError, match="unknown option"):
        tailq.fsdp.reduce_scatter("tnq", colour=1)
    with pytest.raises(ValueError, match="min_bucket"):
        tailq.fsdp.reduce_scatter("tnq", min_bucket=-1)
    comm = tailq.fsdp.reduce_scatter("tnq", bits=3)
    with pytest.raises(ValueError, match=r"set_force_sum_reduction_for_comms\(True\)"):
        comm(torch.empty(2), torch.zeros(4), None, dist.ReduceOp.PREMUL_SUM(0.5))
    with pytest.raises(TypeError, match="takes only timeout_s"):
        tailq.fsdp.reduce_scatter("bf16", bits=3)
    with pytest.raises(ValueError, match="no FSDP module"):
        tailq.fsdp.compress(torch.nn.Linear(2, 2), "tnq")


@pytest.mark.slow
def test_fsdp2_training_with_compressed_reduce_scatter() -> None:
    steps = 30
    res = launch(w_fsdp_train, 2, steps)
    for variant in ("none", "tnq", "tnq-bf16"):  # every rank holds the same full parameters
        for a, b in zip(res[0][variant]["params"], res[1][variant]["params"], strict=True):
            assert torch.equal(a, b), variant
    base, tnq, bf16 = res[0]["none"], res[0]["tnq"], res[0]["tnq-bf16"]
    # loss falls (the first batch's loss is ≈ ln 10 = 2.3; plain FSDP ends near 0.44, 3-bit TNQ near 0.50), and the
    # compressed run ends within a factor 1.3 of plain FSDP: 3-bit TNQ adds an unbiased error of vNMSE ≈ 0.07-0.12
    # (checked below) to the SGD noise of batch 128, which slows the descent a little without stopping it
    assert tnq["full_loss"] < 0.35 * tnq["losses"][0] and base["full_loss"] < 0.35 * base["losses"][0]
    assert tnq["full_loss"] < 1.3 * base["full_loss"], (tnq["full_loss"], base["full_loss"])
    assert all(v < 0.2 for v in tnq["vnmse"]) and len(tnq["vnmse"]) == steps // 10 * 3
    # steps: one per backward, three calls each (the root's own, reduced in FSDP's final callback, included)
    assert tnq["step"] == steps and tnq["calls_per_step"] == 3 and tnq["fallbacks"] == 0
    assert tnq["steps_seen"] == list(range(steps)) and tnq["calls_seen"] == [0, 1, 2]
    # bits per coordinate: counted bytes, = the model exactly; 3 bits + the statistics and the padding
    assert tnq["payload"] == tnq["payload_model"]
    assert tnq["bits"] == pytest.approx(tnq["model_bits"], rel=1e-12)
    assert 3.0 < tnq["bits"] < 3.7, tnq["bits"]
    assert bf16["step"] == 5 and all(math.isfinite(v) for v in bf16["losses"])
