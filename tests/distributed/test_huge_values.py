"""Finite gradients up to float32's largest value through the DDP hook, on real Gloo ranks (issue 24, item 6).

Two buckets per compressor and route: every value 3e38 on every rank (the mean is 3e38: plain DDP divides by N
before summing), and one 3e38 element on one rank among ordinary values. Before the fix the all-gather route
summed N decodes in float32 before dividing (inf), the two-phase owner's mean of N contributions overflowed (its
requantization then refused the non-finite shard and its peer saw ``Connection reset by peer``), TNQ/TBQ's design
of a constant 3e38 bucket overflowed to a level of -inf, and QSGD/NUQSGD refused a bucket whose L2 norm is beyond
float32.

Checks for every case, each from the codec's own error (nothing is tuned to the observed results):

* finite on every rank, and bit-identical across ranks;
* the route's arithmetic: the mean it returns equals the float64 mean of every rank's own decoded contribution
  (``coder.own()``) within float32 rounding of a sum of N decodes, |err| ≤ N·2^-23·max|decode| (two-phase: the
  owner's phase-1 mean of its shard, and the delivered shard equals the owner's requantized shard bit for bit);
* the codec's rounding: on a shared codebook every rank's decode lies on one of the two levels around its
  truncated value t (|decode − t| ≤ the width of t's interval, + float32 rounding of the decode table); the
  two-phase owner's requantization likewise on its own levels around its phase-1 mean;
* unbiasedness over the bucket's coordinates (rounding is independent per coordinate): the errors e_i of the
  phase-1 mean against the exact mean of the targets satisfy |Σ e_i| ≤ 6·√(Σ e_i²) (a self-normalised sum:
  ≈ N(0, 1) for zero-mean independent errors, at most √(count) when every error has the same sign), and the same
  for the owner's phase-2 errors;
* plain DDP: for the all-3e38 bucket the target mean is plain DDP's 3e38 (no compressor truncates a constant
  bucket; top-k keeps k values by design and is left out), and the hooked result satisfies the same
  self-normalised bound against it.

World sizes: 2 for the summable all-reduce, 3 for the all-gather and two-phase routes (N not a power of two:
the headroom scaling, and a padded last shard holding the huge element).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.distributed as dist
from workers import FakeBucket, heavy, launch

from tailq.codec import get_compressor_class, list_compressors
from tailq.comm.routes import ROUTES, is_staged, shard_numel
from tailq.hooks.tailq_hook import TailqState
from tailq.kernels.dispatch import AUTO_MIN_NUMEL

pytestmark = pytest.mark.slow

HUGE = 3.0e38
D = 50001  # not a multiple of 8·N (the two-phase route pads its last shard); its shards (16672 at N = 3) and the
# bucket are above the kernels' AUTO_MIN_NUMEL, so the fast paths (C kernels, inductor) run as in training
WORLD = {"allreduce": 2, "allgather": 3, "twophase": 3}
OPTS: dict[str, dict[str, Any]] = {  # defaults, except widths where a compressor's default is 1 bit wide intervals
    "tuq": {"bits": 3}, "tnq": {"bits": 3}, "tbq": {"bits": 3}, "single-scale": {"bits": 4},
    "multi-scale": {"bits": 4}, "qsgd": {"bits": 4, "bucket_size": 64}, "nuqsgd": {"bits": 4, "bucket_size": 64},
    "terngrad": {}, "efsign": {}, "topk": {"ratio": 0.1}, "fp8": {}, "fp4": {}, "int8sigma": {},
}
CASES = ("all", "one")
F32_EPS = 2.0**-23


def _routes_of(name: str) -> tuple[str, ...]:
    state = TailqState(name, **OPTS[name])
    state.close()
    return state.routes


def _names_on(route: str) -> list[str]:
    return [n for n in sorted(list_compressors()) if n in OPTS and route in _routes_of(n)]


def _bucket(case: str, rank: int, world: int) -> torch.Tensor:
    if case == "all":
        return torch.full((D,), HUGE, dtype=torch.float32)
    g = heavy(D, seed=700 + rank)
    if rank == world - 1:  # one element, on the last rank, in the last (padded) shard of the two-phase route
        g[D - 5] = HUGE
    return g


def _sum64(t: torch.Tensor, op: Any = dist.ReduceOp.SUM) -> torch.Tensor:
    t = t.detach().double().clone()
    dist.all_reduce(t, op=op)
    return t


def _within_levels(v: torch.Tensor, t: torch.Tensor, levels: torch.Tensor) -> int:
    """How many of ``v`` are not on (one of) the two levels around ``t`` — within the width of ``t``'s interval of
    ``t``, plus float32 rounding of the decode table."""
    lv = levels.double()
    tt = t.double().clamp(float(lv[0]), float(lv[-1]))
    j = (torch.searchsorted(lv, tt, right=True) - 1).clamp(0, lv.numel() - 2)
    width = lv[j + 1] - lv[j]
    slack = 4 * F32_EPS * float(lv.abs().max())
    return int(((v.double() - tt).abs() > width + slack).sum())


def _self_normalised(e: torch.Tensor, scale: float) -> float:
    """(|Σ e| − count·2^-22·scale) / √(Σ e²): the self-normalised sum of the errors less a float32 rounding bias
    of up to two units in the last place of ``scale`` each (0 when every error is within that)."""
    e = e.double()
    top = float(e.abs().max()) if e.numel() else 0.0
    if top == 0.0:
        return 0.0
    excess = float(e.sum().abs()) - e.numel() * 2 * F32_EPS * scale
    return max(0.0, excess / top) / float((e / top).pow(2).sum().sqrt())


def w_huge(rank: int, world: int, route: str, names: list[str]) -> list[dict[str, Any]]:
    out = []
    for name in names:
        for case in CASES:
            g = _bucket(case, rank, world)
            state = TailqState(name, route=route, warmup_steps=0, min_bucket=0, timeout_s=20, seed=11, **OPTS[name])
            coders: list[Any] = []
            make = state.family.coder

            def spy(*a: Any, _make: Any = make, _coders: list[Any] = coders, **k: Any) -> Any:
                c = _make(*a, **k)
                if c is not None:  # the route decodes into the bucket, which x views: keep the input for target()
                    c.x = c.x.clone()
                _coders.append(c)
                return c

            state.family.coder = spy  # type: ignore[method-assign]
            if hasattr(state.family, "keep_own"):  # the summable route keeps this rank's words for own()
                state.family.keep_own = True
            res = state.process(FakeBucket(g.clone())).clone()
            coder = coders[0]
            own = coder.own().reshape(-1)
            target = coder.target().reshape(-1) if state.comp.unbiased else own  # biased: deterministic
            info = state.metrics.last.get(0, {})
            row: dict[str, Any] = {
                "name": name, "case": case, "res": res,
                "mean_own": _sum64(own) / world, "mean_target": _sum64(target) / world,
                "max_own": float(_sum64(own.abs(), dist.ReduceOp.MAX).max()),
                "off_levels": None, "unbiased": state.comp.unbiased, "truncating": state.comp.truncating,
            }
            plain = g.clone().div_(world)  # plain DDP: divide by N, then all-reduce SUM
            dist.all_reduce(plain)
            row["plain"] = plain
            row["mean_abs"] = _sum64(g.abs()) / world
            levels = info.get("levels")
            if levels is not None and name != "multi-scale":  # this rank's decode on the levels around its target
                row["off_levels"] = _within_levels(own, target, levels)
            shard = state._shard
            if shard is not None:  # two-phase: this rank owned one shard
                owner = getattr(state.family, "owner", None)  # per-rank formats re-encode with the compressor itself
                cb2 = None if owner is None else owner._codebook(owner._header("check", shard.mean1))
                row["shard"] = {
                    "offset": shard.offset, "mean1": shard.mean1.clone(), "mean2": shard.mean2.clone(),
                    "off_levels2": None if cb2 is None else _within_levels(shard.mean2, shard.mean1, cb2.levels),
                }
            state.close()
            out.append(row)
    return out


def check(results: list[list[dict[str, Any]]], world: int) -> None:
    for rows in zip(*results, strict=True):
        r0 = rows[0]
        what = f"{r0['name']}, {r0['case']}"
        for r in rows:
            assert bool(torch.isfinite(r["res"]).all()), (what, "not finite")
            assert torch.equal(r["res"], r0["res"]), (what, "ranks differ")
            if r["off_levels"] is not None:
                assert r["off_levels"] == 0, (what, "decodes off their levels", r["off_levels"])
        res, mean_own, mean_target = r0["res"].double(), r0["mean_own"], r0["mean_target"]
        tol = 4 * world * F32_EPS * r0["max_own"]
        shards = [r["shard"] for r in rows if "shard" in r]
        if not shards:  # one-phase routes: the mean of the decodes, up to float32 rounding of the sum
            assert float((res - mean_own).abs().max()) <= tol, (what, float((res - mean_own).abs().max()), tol)
        for sh in shards:
            lo, m1, m2 = sh["offset"], sh["mean1"].double(), sh["mean2"]
            sl = slice(lo, lo + m1.numel())
            assert float((m1 - mean_own[sl]).abs().max()) <= tol, (what, "phase 1", sh["offset"])
            assert torch.equal(r0["res"][sl], m2), (what, "delivered shard differs from the owner's")
            if sh["off_levels2"] is not None:
                assert sh["off_levels2"] == 0, (what, "phase 2 off its levels", sh["off_levels2"])
            assert _self_normalised(m2.double() - m1, float(m1.abs().max())) <= 6.0, (what, "phase 2 biased")
        # the codec: unbiased for the targets over the bucket's coordinates
        assert _self_normalised(mean_own - mean_target, r0["max_own"]) <= 6.0, (what, "phase 1 biased")
        plain = r0["plain"].double()
        if r0["case"] == "all":
            assert float((plain - HUGE).abs().max()) <= 4 * F32_EPS * HUGE  # plain DDP: 3e38, up to its rounding
        # against plain DDP wherever the target is the input itself: the all-3e38 bucket (no compressor truncates
        # a constant bucket; top-k keeps k values by design), and every bucket of the non-truncating unbiased ones
        if (r0["case"] == "all" and r0["name"] != "topk") or (r0["unbiased"] and not r0["truncating"]):
            slack = 4 * F32_EPS * r0["mean_abs"]  # plain DDP's float32 rounding of g/N and of their sum
            assert bool(((mean_target - plain).abs() <= slack).all()), (what, "target is not plain DDP's mean")
            assert _self_normalised(res - plain, r0["max_own"]) <= 6.0, (what, "biased against plain DDP")


@pytest.mark.parametrize("route", ["allreduce", "allgather", "twophase"])
def test_huge_finite_gradients_average_on_every_route(route: str) -> None:
    # every compressor of the registry, on every route it can take (the three tests together)
    builtin = {n for n in list_compressors() if get_compressor_class(n).__module__.startswith("tailq.")}
    # (other tests register compressors of their own); the hierarchical routes carry these flat ones across nodes
    assert set(OPTS) == builtin and set(WORLD) == {r for r in ROUTES if not is_staged(r)}
    world = WORLD[route]
    assert shard_numel(D, world) >= AUTO_MIN_NUMEL  # the fast paths run (see D)
    names = _names_on(route)
    assert names
    check(launch(w_huge, world, route, names, timeout=600), world)


def w_exact_paths(rank: int, world: int) -> dict[str, Any]:
    """The hook's uncompressed fp32 paths at float32's largest: the measured exact mean (``measure_every``), the
    NaN/Inf fallback, and priming. Every rank holds 3e38 in element 0 (the mean is 3e38)."""
    out: dict[str, Any] = {}
    g = heavy(20_000, seed=rank)
    g[0] = 3.0e38
    state = TailqState("tnq", bits=3, warmup_steps=0, min_bucket=0, measure_every=1, route="allgather")
    buf = g.clone()
    state.process(FakeBucket(buf))
    out["measured"] = state.metrics.vnmse[-1]["vnmse"]
    bad = g.clone()
    if rank == 1:
        bad[1] = float("nan")  # the whole bucket falls back to the fp32 mean
    state.process(FakeBucket(bad))
    out["fallback"] = (float(bad[0]), bool(bad[1].isnan()), len(state.metrics.fallbacks))
    state.priming = True
    primed = g.clone()
    state.process(FakeBucket(primed))
    out["primed"] = float(primed[0])
    state.close()
    return out


def test_the_hooks_exact_paths_keep_float32s_largest_finite() -> None:
    # before: measure, the fallback and priming summed N values before dividing: inf (and a NaN vNMSE)
    for r in launch(w_exact_paths, 2):
        # a finite vNMSE: the exact mean it compares against is finite (large: the design's levels span +-3.1e38
        # with none at zero, so every ordinary value rounds to +-4.5e37, unbiased but with that spread)
        assert math.isfinite(r["measured"]) and r["measured"] > 0
        huge = float(torch.tensor(3.0e38))  # the float32 nearest 3e38
        assert r["fallback"] == (huge, True, 1)  # 3e38 / 2 + 3e38 / 2 = 3e38 in float32, exactly
        assert r["primed"] == huge
