"""The DiLoCo-family outer-gradient baselines (SPEC §4.1): ``fp8`` (torchft), ``int8sigma`` (INTELLECT-1), ``fp4``
(Streaming DiLoCo).

Every bound here is derived from the format, recomputed by an oracle in float64 from x alone (not read back from
the encoder), plus float32 rounding of the encoder's own arithmetic (x/s, the decode product: a few units of 2^-24
relative):

* fp8 e4m3: s = absmax/448 rounded up to float32; the code is a nearest e4m3 value to x/s, so
  |x − decode| ≤ s·u(x/s), u = half an e4m3 ULP at that magnitude (2^(⌊log2|y|⌋ − 4), 2^−10 in the subnormals);
  int8: s = absmax/127 rounded up, |x − decode| ≤ s/2;
* fp4: the code is a nearest level of |x|/s; |x − decode| ≤ s·(half the gap around |x|/s);
* int8sigma: Δ = float32(2kσ/256), σ = ‖x‖/√(n − 1); the codes are round-half-away(x/Δ) clamped to −128..127,
  plus 128; the table is the per-bin mean; interior bins decode within Δ (x and its bin's mean share a bin of width
  Δ), each bin mean within Δ/2 of the bin's centre; end bins take every clipped value and decode to their mean.
"""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import tailq
from tailq.cli import main as cli_main
from tailq.codec.int8sigma import Int8Sigma
from tailq.codec.minifloat import FP4, FP8

_DIST = str(Path(__file__).resolve().parents[1] / "distributed")
if _DIST not in sys.path:  # the Gloo launcher of the distributed tests (spawned ranks re-import this module)
    sys.path.insert(0, _DIST)
workers = importlib.import_module("workers")

EPS = 2.0**-23  # float32 rounding slack (two units of 2^-24)
VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("fp8", {}), ("fp8", {"format": "int8"}), ("fp8", {"row_length": 100}),
    ("fp4", {}), ("fp4", {"format": "e2m1"}), ("fp4", {"block_size": 32}),
    ("int8sigma", {}), ("int8sigma", {"clip_sigma": 2.0}),
]
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in o.items()) or 'default'}" for n, o in VARIANTS]


def student_t(n: int, seed: int = 0, dof: float = 3.0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_t(dof, n).astype(np.float32))


def ragged(n: int = 5000, block: int = 64, seed: int = 0) -> torch.Tensor:
    """Student-t rows whose scales span 1e-30..1e30, an all-zero row, and a row whose small values fall below the
    formats' smallest codes (flushed to zero)."""
    x = student_t(n, seed)
    rng = np.random.default_rng(seed + 1)
    nb = -(-n // block)
    scale = torch.from_numpy(10.0 ** rng.uniform(-30, 30, nb)).repeat_interleave(block)[:n]
    x = (x.double() * scale).float()
    x[block : 2 * block] = 0.0
    x[2 * block : 3 * block] *= 1e-6
    x[2 * block] = 1.0
    return x


def round_up_f32(v: torch.Tensor) -> torch.Tensor:
    """Oracle: the smallest float32 >= each float64 value, as float64."""
    f = v.to(torch.float32)
    below = f.double() < v
    return torch.where(below, torch.nextafter(f, torch.full_like(f, math.inf)), f).double()


def block_scales(x: torch.Tensor, block: int, top: float) -> torch.Tensor:
    """Oracle: per element, its block's s = max|x|/top rounded up to float32 (float64)."""
    n = x.numel()
    b = min(block, n)
    pad = -n % b
    a = torch.nn.functional.pad(x.double().abs(), (0, pad)).view(-1, b).amax(dim=1)
    return round_up_f32(a / top).repeat_interleave(b)[:n]


def e4m3_half_ulp(y: torch.Tensor) -> torch.Tensor:
    a = y.abs()
    e = torch.floor(torch.log2(a.clamp(min=2.0**-6)))
    return torch.where(a >= 2.0**-6, torch.pow(2.0, e - 4), torch.full_like(a, 2.0**-10))


def fp4_half_gap(y: torch.Tensor, fmt: str) -> torch.Tensor:
    a = y.abs()
    if fmt == "e3m0":
        e = torch.floor(torch.log2(a.clamp(min=2.0**-6)))
        return torch.where(a >= 2.0**-6, torch.pow(2.0, e - 1), torch.full_like(a, 2.0**-7))
    return torch.where(a <= 2, 0.25, torch.where(a <= 4, 0.5, 1.0)).to(a.dtype)


def int8sigma_oracle(x: torch.Tensor, k: float) -> tuple[float, torch.Tensor, torch.Tensor]:
    """(Δ, codes, table) from the definition: σ = ‖x‖/√(n − 1) in float64, Δ rounded to float32, codes by round
    half away from zero of x/Δ (float64 quotient) clamped, table = float32 of the float64 per-bin means."""
    x64 = x.double()
    n = x.numel()
    sigma = float(x64.norm()) / math.sqrt(max(n - 1, 1))
    delta = float(np.float32(2 * k * sigma / 256))
    y = x64 / delta
    r = torch.sign(y) * torch.floor(y.abs() + 0.5)
    codes = (r.clamp(-128, 127) + 128).long()
    table = torch.zeros(256, dtype=torch.float64)
    for b in codes.unique().tolist():
        table[b] = x64[codes == b].mean()
    return delta, codes, table.float()


def format_bound(comp: tailq.Compressor, x: torch.Tensor) -> torch.Tensor:
    """Per element, the largest |x − decode| the format allows (float64), float32 rounding included."""
    x64 = x.double()
    slack = 4 * EPS * x64.abs()
    if isinstance(comp, FP8):
        top = comp.top
        s = block_scales(x, comp.row_length, top)
        y = x64 / torch.where(s > 0, s, torch.ones_like(s))
        u = e4m3_half_ulp(y) if comp.format == "e4m3" else torch.full_like(y, 0.5)
        return s * u + slack
    if isinstance(comp, FP4):
        top = 1.0 if comp.format == "e3m0" else 6.0
        s = block_scales(x, comp.block_size, top)
        y = x64 / torch.where(s > 0, s, torch.ones_like(s))
        return s * fp4_half_gap(y, comp.format) + slack
    assert isinstance(comp, Int8Sigma)
    delta, codes, _ = int8sigma_oracle(x, comp.clip_sigma)
    bound = torch.full_like(x64, delta)
    for b in (0, 255):  # an end bin: its values decode to their mean, within the bin's spread
        m = codes == b
        if bool(m.any()):
            bound[m] = float(x64[m].max() - x64[m].min())
    return bound + slack + 4 * EPS * float(x64.abs().max())


# ----------------------------------------------------------------------------------------------------- registry
def test_registered_listed_and_biased() -> None:
    reg = tailq.list_compressors()
    for name, cls in (("fp8", FP8), ("int8sigma", Int8Sigma), ("fp4", FP4)):
        assert reg[name] is cls
        assert cls.unbiased is False and cls.truncating is False and cls.memory is False
        assert cls.summary and cls.paper
    assert (FP8.fixed_bits, Int8Sigma.fixed_bits, FP4.fixed_bits) == (8, 8, 4)


def test_tailq_list_names_them(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    for name in ("fp8", "int8sigma", "fp4"):
        assert rows[name]["unbiased"] is False
    assert "e4m3 | int8" in rows["fp8"]["options"]["format"]
    assert "e3m0 | e2m1" in rows["fp4"]["options"]["format"]
    assert "default 3.0" in rows["int8sigma"]["options"]["clip_sigma"]


@pytest.mark.parametrize("name, opts", VARIANTS, ids=IDS)
def test_config_round_trips(name: str, opts: dict[str, Any]) -> None:
    comp = tailq.compressor(name, seed=7, **opts)
    cfg = comp.config()
    again = tailq.compressor(cfg["name"], **{k: v for k, v in cfg.items() if k != "name"})
    assert again.config() == cfg and again.format_id == comp.format_id
    with pytest.raises(ValueError):
        tailq.compressor(name, **({"clip_sigma": 0.0} if name == "int8sigma" else {"format": "e5m2"}))


# ----------------------------------------------------------------------------------------------------- wire
@pytest.mark.parametrize("n", [1, 2, 3, 100, 1024, 2049, 65536])
def test_bits_per_coordinate_are_exact(n: int) -> None:
    x = student_t(n, seed=n)
    cases = [
        (FP8(), n + 4 * math.ceil(n / 1024)),
        (FP8(format="int8", row_length=100), n + 4 * math.ceil(n / 100)),
        (FP4(), math.ceil(n / 2) + 4 * math.ceil(n / 128)),
        (FP4(format="e2m1", block_size=32), math.ceil(n / 2) + 4 * math.ceil(n / 32)),
        (Int8Sigma(), n + 4 * 256),
    ]
    for comp, nbytes in cases:
        enc = comp.encode(x)
        assert enc.wire_bytes() == nbytes, (comp, n)
        assert enc.bits_per_coord() == 8 * nbytes / n
    if n == 65536:  # the headline figures: 8 + 1/32, 4 + 1/4, 8 + 1/8
        assert [c.encode(x).bits_per_coord() for c in (FP8(), FP4(), Int8Sigma())] == [8.03125, 4.25, 8.125]


@pytest.mark.parametrize("name, opts", VARIANTS, ids=IDS)
def test_empty_and_tiny_buckets(name: str, opts: dict[str, Any]) -> None:
    comp = tailq.compressor(name, **opts)
    e = comp.encode(torch.zeros(0))
    assert comp.decode(e).numel() == 0 and e.wire_bytes() == 0
    exact = name == "int8sigma" or (name == "fp4" and opts.get("format", "e3m0") == "e3m0")  # bin mean; top code 1
    for v in (3.5, -1e-30, 2.5e38, 0.0):  # one value is its block's absmax: the top code times s (rounded up)
        one = torch.tensor([v])
        got, v32 = comp.roundtrip(one), float(one)
        assert torch.equal(got, one) if exact else abs(float(got) - v32) <= 2.0**-22 * abs(v32), (v, float(got))
    for n in (2, 3, 7):
        x = student_t(n, seed=n).reshape(1, n)
        y = comp.roundtrip(x)
        bound = format_bound(comp, x.reshape(-1)).view(1, n)
        assert y.shape == (1, n) and bool(((y - x).abs().double() <= bound).all())


@pytest.mark.parametrize("name, opts", VARIANTS, ids=IDS)
def test_deterministic_and_generator_free(name: str, opts: dict[str, Any]) -> None:
    x = ragged()
    a = tailq.compressor(name, seed=1, **opts).encode(x, generator=torch.Generator().manual_seed(1))
    b = tailq.compressor(name, seed=2, **opts).encode(x, generator=torch.Generator().manual_seed(2))
    assert a.tensors.keys() == b.tensors.keys()
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


# ----------------------------------------------------------------------------------------------------- error bounds
@pytest.mark.parametrize("name, opts", VARIANTS, ids=IDS)
def test_decode_error_within_the_formats_bound(name: str, opts: dict[str, Any]) -> None:
    comp = tailq.compressor(name, **opts)
    for x in (ragged(), student_t(4099, seed=3), student_t(3000, seed=4) * 1e-20):
        err = (comp.roundtrip(x).double() - x.double()).abs()
        bound = format_bound(comp, x)
        assert bool((err <= bound).all()), (name, opts, float((err - bound).max()))


@pytest.mark.parametrize("fmt", ["e4m3", "int8"])
def test_fp8_codes_are_the_nearest_code_of_x_over_s(fmt: str) -> None:
    comp = FP8(format=fmt, row_length=64)
    x = ragged()
    enc = comp.encode(x)
    s = block_scales(x, 64, comp.top)
    assert torch.equal(enc.tensors["scales"].double(), s[::64])  # absmax/top rounded up, one per row
    y = x.double() / torch.where(s > 0, s, torch.ones_like(s))
    assert float(y.abs().max()) <= comp.top  # rounded up: never beyond the largest code
    if fmt == "e4m3":
        grid = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).double()
        grid = grid[torch.isfinite(grid)]
        q = enc.tensors["codes"].view(torch.float8_e4m3fn).double()
        assert enc.tensors["codes"].dtype == torch.uint8
    else:
        grid = torch.arange(-127, 128, dtype=torch.float64)
        q = enc.tensors["codes"].double()
        assert enc.tensors["codes"].dtype == torch.int8
    nearest = (y[:, None] - grid[None, :]).abs().min(dim=1).values
    assert bool(((y - q).abs() <= nearest + 4 * EPS * y.abs()).all())
    if fmt == "e4m3":  # values below half the smallest subnormal flush to zero; 448 is reached
        tiny = (y.abs() < 2.0**-10) & (y != 0)
        assert bool(tiny.any()) and bool((q[tiny] == 0).all())
        assert float(q.abs().max()) == 448.0


@pytest.mark.parametrize("fmt", ["e3m0", "e2m1"])
def test_fp4_codes_are_the_nearest_level_ties_to_even(fmt: str) -> None:
    comp = FP4(format=fmt, block_size=16)
    lv = comp.levels().double()
    top = float(lv[-1])
    x = ragged(2000, block=16)
    dec = comp.roundtrip(x).double()
    s = block_scales(x, 16, top)
    y = x.double() / torch.where(s > 0, s, torch.ones_like(s))
    q = dec / torch.where(s > 0, s, torch.ones_like(s))
    grid = torch.cat([lv, -lv])
    nearest = (y[:, None] - grid[None, :]).abs().min(dim=1).values
    assert bool(((y - q).abs() <= nearest + 4 * EPS * y.abs()).all())
    # ties (midpoints between levels, scaled exactly by the block's absmax) go to the even code
    mids = ((lv[:-1] + lv[1:]) / 2).float()
    block = torch.cat([torch.tensor([top]), mids, -mids]).float()  # absmax = top: s = 1
    out = comp.roundtrip(block).double()
    codes = torch.arange(8)
    want = lv[torch.where(codes[:-1] % 2 == 0, codes[:-1], codes[:-1] + 1)]  # mid between c and c+1: the even one
    assert torch.equal(out[1:8], want) and torch.equal(out[8:], -want)


# ----------------------------------------------------------------------------------------------------- int8sigma
@pytest.mark.parametrize("k", [3.0, 2.0, 0.5])
def test_int8sigma_codes_table_and_bin_means(k: float) -> None:
    comp = Int8Sigma(clip_sigma=k)
    x = student_t(20000, seed=5)
    x[:3] = torch.tensor([60.0, -80.0, 0.0])
    enc = comp.encode(x)
    delta, codes, table = int8sigma_oracle(x, k)
    assert enc.info["bin_width"] == delta == pytest.approx(2 * k * float(x.double().norm()) / math.sqrt(19999) / 256,
                                                          rel=1e-7)
    assert torch.equal(enc.tensors["codes"].long(), codes)
    assert enc.tensors["codes"].dtype == torch.uint8 and enc.tensors["table"].dtype == torch.float32
    assert torch.equal(enc.tensors["table"], table)  # the bin means are the bin means (empty bins: 0)
    dec = comp.decode(enc).double()
    x64 = x.double()
    inner = (codes > 0) & (codes < 255)
    centre = (codes - 128).double() * delta
    assert bool(((table.double()[codes] - centre)[inner].abs() <= delta / 2 * (1 + 1e-6)).all())
    assert bool(((dec - x64)[inner].abs() <= delta * (1 + 1e-6)).all())
    # bin-mean decoding keeps the bucket's sum (up to float32 rounding of each mean)
    assert abs(float(dec.sum() - x64.sum())) <= 256 * EPS * float(x64.abs().sum())
    # the mean minimises each bin's squared error: better than the bin centres wherever both apply
    assert float(((dec - x64)[inner] ** 2).sum()) <= float(((centre - x64)[inner] ** 2).sum())


def test_int8sigma_clipping_goes_to_the_end_bins() -> None:
    x = student_t(4096, seed=6)
    x[10] = 50 * float(x.double().norm()) / math.sqrt(4095)
    sigma = float(x.double().norm()) / math.sqrt(4095)  # the outlier counts in σ
    x[11], x[12] = 3.2 * sigma, -3.1 * sigma  # beyond ±3σ: clipped into the end bins
    comp = Int8Sigma()
    enc = comp.encode(x)
    codes, dec = enc.tensors["codes"], comp.decode(enc)
    delta = enc.info["bin_width"]
    assert codes[10] == codes[11] == 255 and codes[12] == 0
    top = codes == 255
    assert float(dec[10]) == float(dec[11]) == pytest.approx(float(x[top].double().mean()), rel=1e-6)
    assert float(dec[11]) > 126.5 * delta  # the outlier pulls the end bin's mean beyond the range
    # the bins' edges (round half away from zero): bin 255 from x/Δ = 126.5 up, bin 0 from −127.5 down
    edge = torch.tensor([126.5, 126.49, -127.49, -127.5], dtype=torch.float32) * delta
    assert comp.codes(edge, delta).tolist() == [255, 254, 1, 0]
    # a wide enough range holds them all inside
    wide = Int8Sigma(clip_sigma=200.0).encode(x).tensors["codes"]
    assert 0 < int(wide.min()) and int(wide.max()) < 255


def test_int8sigma_is_biased() -> None:
    x = student_t(1000, seed=7)
    dec = Int8Sigma().roundtrip(x)
    assert not torch.equal(dec, x) and Int8Sigma().target(x) is x


# ----------------------------------------------------------------------------------------------------- DDP hook
HOOK_CASES: list[tuple[str, dict[str, Any]]] = [("fp8", {}), ("fp8", {"format": "int8"}), ("int8sigma", {}),
                                                ("fp4", {}), ("fp4", {"format": "e2m1"})]


def w_hook_mean(rank: int, world: int, d: int) -> list[dict[str, Any]]:
    """Each case: one hooked bucket (route allgather) of this rank's Student-t values; returns the hooked mean, the
    exact mean, the mean of every rank's own decode, and the mean of the format's per-element bounds."""
    import torch.distributed as dist

    from tailq.hooks import TailqState

    def mean64(t: torch.Tensor) -> torch.Tensor:
        t = t.double().clone()
        dist.all_reduce(t)
        return t / world

    out = []
    g = student_t(d, seed=100 + rank) * (1.0 + 9.0 * rank)  # the ranks' scales differ
    for name, opts in HOOK_CASES:
        state = TailqState(name, route="allgather", warmup_steps=0, min_bucket=0, seed=3, **opts)
        res = state.process(workers.FakeBucket(g.clone())).clone()
        comp = state.comp
        out.append({
            "name": name, "opts": opts, "res": res, "route": state.metrics.last.get(0, {}).get("route"),
            "exact": mean64(g), "mean_dec": mean64(comp.roundtrip(g)), "bound": mean64(format_bound(comp, g)),
            "bits": state.metrics.wire.bits_per_coord(), "enc_bits": comp.encode(g).bits_per_coord(),
        })
        state.close()
    return out


@pytest.mark.slow
def test_ddp_hook_allgather_mean_is_within_the_formats_error() -> None:
    d = 20001
    results = workers.launch(w_hook_mean, 2, d, timeout=300)
    for r0, r1 in zip(*results, strict=True):
        what = (r0["name"], r0["opts"])
        assert r0["route"] == "allgather", what
        assert torch.equal(r0["res"], r1["res"]), what  # every rank holds the same mean
        res = r0["res"].double()
        scale = float(r0["mean_dec"].abs().max())
        assert float((res - r0["mean_dec"]).abs().max()) <= 4 * EPS * scale, what  # the mean of the decodes
        err = (res - r0["exact"]).abs()
        assert bool((err <= r0["bound"] + 4 * EPS * scale).all()), (what, float((err - r0["bound"]).max()))
        assert float(err.max()) > 0  # compressed, not passed through
        # the wire: the encoding's bytes plus the gather's framing (8 bytes per tensor) and the 8-byte agreement
        assert r0["enc_bits"] <= r0["bits"] <= r0["enc_bits"] + 8 * 8 * 4 / d, what


def w_twophase_mean(rank: int, world: int, d: int) -> list[dict[str, Any]]:
    """Each case: one bucket through route twophase (torchft's collective: every rank encodes its N shards, owners
    average the decodes and re-encode the mean with the same format, then an all-gather); returns the hooked mean,
    every rank's input (for the reference) and the wire."""
    import torch.distributed as dist

    from tailq.hooks import TailqState

    g = student_t(d, seed=200 + rank) * (1.0 + 9.0 * rank)
    gs = [torch.empty_like(g) for _ in range(world)]
    dist.all_gather(gs, g)
    out = []
    for name, opts in HOOK_CASES:
        state = TailqState(name, route="twophase", warmup_steps=0, min_bucket=0, seed=3, **opts)
        res = state.process(workers.FakeBucket(g.clone())).clone()
        out.append({"name": name, "opts": opts, "res": res, "gs": gs,
                    "route": state.metrics.last.get(0, {}).get("route"),
                    "bytes": state.metrics.wire.bits_per_coord() * d / 8})
        state.close()
    return out


@pytest.mark.slow
def test_ddp_hook_twophase_requantizes_the_owners_mean_within_two_roundings() -> None:
    """|res − exact| splits into phase 1 (the mean of N decodes of each rank's shard: within the mean of the
    format's bounds on the inputs) and phase 2 (the owner's re-encode of that mean: within the format's bound on
    the mean). Both checked per element, the shards' own blocks, on 3 ranks with a padded last shard."""
    from tailq.comm.routes.base import shard_numel

    d, world = 20001, 3
    results = workers.launch(w_twophase_mean, world, d, timeout=300)
    m = shard_numel(d, world)
    assert m * world > d  # the last shard is padded
    for r0, *rest in zip(*results, strict=True):
        what = (r0["name"], r0["opts"])
        assert r0["route"] == "twophase", what
        for r in rest:
            assert torch.equal(r0["res"], r["res"]), what  # every rank holds the same mean, bit for bit
        comp = tailq.compressor(r0["name"], **r0["opts"])
        padded = [torch.nn.functional.pad(x, (0, world * m - d)) for x in r0["gs"]]
        exact = torch.stack([x.double() for x in padded]).mean(0)
        mean1 = torch.zeros(world * m, dtype=torch.float64)
        b1 = torch.zeros(world * m, dtype=torch.float64)
        b2 = torch.zeros(world * m, dtype=torch.float64)
        for j in range(world):
            sl = slice(j * m, (j + 1) * m)
            mean1[sl] = torch.stack([comp.roundtrip(x[sl]).double() for x in padded]).mean(0)
            b1[sl] = torch.stack([format_bound(comp, x[sl]) for x in padded]).mean(0)
            b2[sl] = format_bound(comp, mean1[sl].float())
        res = r0["res"].double()
        scale = float(exact.abs().max())
        assert float((mean1 - exact).abs().max()) > 0 and bool(((mean1 - exact).abs() <= b1 + 4 * EPS * scale).all())
        err2 = (res - mean1[:d]).abs()
        assert bool((err2 <= b2[:d] + 4 * EPS * scale).all()), (what, float((err2 - b2[:d]).max()))
        # the wire, per rank: the all-to-all hands N shard encodings, the all-gather one (N + 1 encodings of m
        # elements, each with its 8-byte-per-tensor frame), plus the 8-byte agreement; at N=3 that is 4/3 of the
        # all-gather's encoding where it would be one bucket's encoding received twice per other rank
        one = comp.encode(torch.ones(m)).bits_per_coord() * m / 8 + 8 * 2
        assert abs(r0["bytes"] - ((world + 1) * one + 8)) <= 8 * world, (what, r0["bytes"], (world + 1) * one + 8)
