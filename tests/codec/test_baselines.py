"""Baseline compressors (SPEC §4): QSGD, NUQSGD, TernGrad, EF-signSGD, top-k, single- and multi-scale [V].

Statistical checks use fixed seeds and a 4-standard-error tolerance per coordinate (standard error = sample
std / sqrt(R)); coordinates whose decode never varies must match exactly (up to float32 rounding).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch

from tailq.codec.base import Compressor, Encoded, list_compressors
from tailq.codec.efsign import EFSign
from tailq.codec.memory import ErrorFeedback
from tailq.codec.packing import unpack_bits
from tailq.codec.qsgd import NUQSGD, QSGD
from tailq.codec.scales import MultiScale, SingleScale
from tailq.codec.terngrad import TernGrad
from tailq.codec.topk import TopK

R = 4000  # repetitions for the Monte-Carlo checks
K_SE = 4.0  # tolerance in standard errors


def heavy_tailed(n: int = 64, seed: int = 0) -> torch.Tensor:
    """n Student-t(3.5) samples, two large outliers and an exact zero."""
    rng = np.random.default_rng(seed)
    body = rng.standard_t(3.5, size=n)
    return torch.tensor(np.concatenate([body, [40.0, -25.0, 0.0]]), dtype=torch.float32)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sample_decodes(
    encode: Callable[[torch.Generator], Encoded], decode: Callable[[Encoded], torch.Tensor], reps: int = R
) -> torch.Tensor:
    """(reps, n) float64 matrix of decodes with generator seeds 0..reps-1."""
    return torch.stack([decode(encode(gen(i))).reshape(-1).double() for i in range(reps)])


def assert_mean_matches(samples: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per coordinate, the decode is a two-point law on adjacent levels lo <= t <= hi with mean t = target.

    A plain sample-std standard error fails for rarely-taken levels (p = 0.003 with R = 4000 often shows
    3 hits where 12 are expected and then under-estimates the std), so the test uses the variance under
    the null hypothesis, (hi - t)(t - lo), which is exact for a two-point law with mean t, and requires
    |mean - t| <= K_SE * sqrt((hi - t)(t - lo) / R). A coordinate that never moved must equal t exactly
    (up to float32 rounding) unless missing its other level in R draws is plausible:
    (1 - |t - v| / gap)^R >= 1e-4 with gap <= D, the widest level gap seen, i.e. |t - v| <= 9.2 D / R.
    """
    t = target.reshape(-1).double()
    reps = samples.shape[0]
    lo, hi = samples.min(dim=0).values, samples.max(dim=0).values
    assert bool(((samples == lo) | (samples == hi)).all()), "stochastic rounding must use two adjacent levels"
    tol = 1e-6 * t.abs() + 1e-30
    two = hi > lo
    assert bool((lo[two] <= t[two] + tol[two]).all() and (t[two] <= hi[two] + tol[two]).all())
    mean = samples.mean(dim=0)
    var0 = ((hi - t) * (t - lo)).clamp_min(0.0)
    z = (mean - t).abs() / (var0 / reps).sqrt()
    assert bool((z[two] <= K_SE).all()), f"max z = {float(z[two].max()):.2f}"
    gap = float((hi - lo).max()) if bool(two.any()) else 0.0
    miss = (lo - t).abs()
    one_ok = (miss <= tol) | (miss <= 9.2 * gap / reps)
    assert bool(one_ok[~two].all()), f"constant coordinates off target by {miss[~two & ~one_ok].tolist()}"
    return var0


def assert_sum_unbiased(
    per_worker: list[torch.Tensor], summed: torch.Tensor, targets: list[torch.Tensor]
) -> None:
    """Each worker's decode is unbiased (two-point law), the code-sum decode equals the sum of the decodes,
    and its mean is within K_SE standard errors of the summed targets (null variance: the sum of the
    workers' two-point variances, workers round independently)."""
    var = torch.stack([assert_mean_matches(s, t) for s, t in zip(per_worker, targets, strict=True)]).sum(0)
    assert torch.allclose(summed, torch.stack(per_worker).sum(0), rtol=0, atol=1e-5)
    total = torch.stack([t.reshape(-1).double() for t in targets]).sum(0)
    z = (summed.mean(dim=0) - total).abs() / (var / summed.shape[0]).sqrt()
    moving = var > 0
    assert bool((z[moving] <= K_SE).all()), f"max z = {float(z[moving].max()):.2f}"
    assert torch.allclose(summed.mean(dim=0)[~moving], total[~moving], rtol=1e-6, atol=1e-30)


ALL_FACTORIES: dict[str, Callable[[], Compressor]] = {
    "qsgd": lambda: QSGD(),
    "nuqsgd": lambda: NUQSGD(),
    "terngrad": lambda: TernGrad(),
    "efsign": lambda: EFSign(),
    "topk": lambda: TopK(ratio=0.1),
    "single-scale": lambda: SingleScale(),
    "multi-scale-block": lambda: MultiScale(),
    "multi-scale-element": lambda: MultiScale(granularity="element"),
}


# ---------------------------------------------------------------------------------------------------------
# registry and metadata


def test_registered_with_metadata() -> None:
    reg = list_compressors()
    expected = {
        "qsgd": (QSGD, True, False, False),
        "nuqsgd": (NUQSGD, True, False, False),
        "terngrad": (TernGrad, True, True, False),
        "efsign": (EFSign, False, False, True),
        "topk": (TopK, False, False, True),
        "single-scale": (SingleScale, True, False, False),
        "multi-scale": (MultiScale, True, False, False),
    }
    for name, (cls, unbiased, truncating, memory) in expected.items():
        assert reg[name] is cls
        assert (cls.unbiased, cls.truncating, cls.memory) == (unbiased, truncating, memory)
        assert cls.summary and cls.paper
    assert SingleScale.stats_op == MultiScale.stats_op == "max"
    assert MultiScale.scale_index_op == "min"


# ---------------------------------------------------------------------------------------------------------
# unbiasedness


UNBIASED_CASES: dict[str, Callable[[], Compressor]] = {
    "qsgd-b4-bucket16": lambda: QSGD(bits=4, bucket_size=16),
    "qsgd-b2-bucket512": lambda: QSGD(bits=2),
    "nuqsgd-b3-bucket16": lambda: NUQSGD(bits=3, bucket_size=16),
    "terngrad": lambda: TernGrad(),
    "terngrad-bucket16-clip2": lambda: TernGrad(bucket_size=16, clip_sigma=2.0),
    "terngrad-noclip": lambda: TernGrad(clip_sigma=math.inf),
    "single-scale-b2": lambda: SingleScale(bits=2),
    "multi-scale-element": lambda: MultiScale(bits=2, n_scales=3, scale_ratio=4.0, granularity="element"),
    "multi-scale-block": lambda: MultiScale(bits=3, n_scales=4, block_size=8),
}


@pytest.mark.parametrize("case", sorted(UNBIASED_CASES))
def test_unbiased(case: str) -> None:
    comp = UNBIASED_CASES[case]()
    assert comp.unbiased
    x = heavy_tailed()
    samples = sample_decodes(lambda g: comp.encode(x, generator=g), comp.decode)
    target = comp.target(x)
    if comp.truncating and not case.endswith("noclip"):
        assert bool((target != x).any()), "the clipping should be active on the outliers"
    else:
        assert torch.equal(target, x)
    assert_mean_matches(samples, target)


# ---------------------------------------------------------------------------------------------------------
# QSGD / NUQSGD


@pytest.mark.parametrize("bits", [2, 4])
def test_qsgd_variance_exact_and_bound(bits: int) -> None:
    comp = QSGD(bits=bits, bucket_size=64)
    s = comp.s
    x = torch.randn(192, generator=gen(7))
    x[5] = 9.0  # one large value in the first bucket
    encs = [comp.encode(x, generator=gen(i)) for i in range(2000)]
    err2 = torch.stack([(comp.decode(e).double() - x.double()) ** 2 for e in encs])  # (R, n)
    norms = encs[0].tensors["norms"].double()
    assert torch.allclose(norms, x.double().view(3, 64).norm(dim=1), rtol=1e-6)
    # exact variance per coordinate: norm^2 / s^2 * f (1 - f), f = frac(s |x| / norm)
    ne = norms.repeat_interleave(64)
    t = s * x.double().abs() / ne
    f = t - t.floor()
    var_exact = (ne**2 / s**2 * f * (1 - f)).view(3, 64).sum(dim=1)
    per_bucket = err2.view(-1, 3, 64).sum(dim=2)  # (R, buckets)
    mean = per_bucket.mean(dim=0)
    se = per_bucket.std(dim=0) / math.sqrt(per_bucket.shape[0])
    assert bool(((mean - var_exact).abs() <= K_SE * se).all()), (mean, var_exact, se)
    bound = min(64 / s**2, math.sqrt(64) / s) * norms**2
    assert bool((var_exact <= bound).all())
    assert bool((mean <= bound).all())
    if bits == 2:
        # s = 1: variance = ||v||^2 (||r||_1 - 1); for Gaussian buckets ||r||_1 ~ sqrt(2 d / pi), so the
        # sqrt(d) ||v||^2 bound is nearly reached: (0.8 * 8 - 1) / 8 ~ 0.67 of it (buckets 2 and 3)
        assert bool((var_exact[1:] >= 0.6 * bound[1:]).all())


def test_nuqsgd_levels_and_rounding_probabilities() -> None:
    comp = NUQSGD(bits=4, bucket_size=4)  # s = 7
    lv = comp.levels()
    assert lv.tolist() == [0.0, 1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0]
    x = torch.tensor([3.0, -4.0, 0.05, 0.0, 1.0, 1.0, -1.0, 1.0])  # r = .6, .8, .01, 0 | r = .5 (x4)
    norm = float(comp.encode(x).tensors["norms"][0])
    assert norm == pytest.approx(math.sqrt(25.0025), rel=1e-7)
    samples = sample_decodes(lambda g: comp.encode(x, generator=g), comp.decode)
    r = samples.abs() / torch.tensor([norm] * 4 + [2.0] * 4, dtype=torch.float64)
    allowed = lv.double()
    assert bool(torch.isclose(r.unsqueeze(-1), allowed, rtol=1e-6, atol=0).any(dim=-1).all())
    # each coordinate only takes the two levels around r, with P(up) = (r - l_j) / (l_{j+1} - l_j)
    for i, (lo, hi) in enumerate([(0.5, 1.0), (0.5, 1.0), (0.0, 1 / 64)]):
        rr = abs(float(x[i])) / norm
        up = torch.isclose(r[:, i], torch.tensor(hi, dtype=torch.float64), rtol=1e-6)
        down = torch.isclose(r[:, i], torch.tensor(lo, dtype=torch.float64), rtol=1e-6, atol=1e-12)
        assert bool((up | down).all())
        p = (rr - lo) / (hi - lo)
        assert abs(float(up.double().mean()) - p) <= K_SE * math.sqrt(p * (1 - p) / R)
    assert bool((samples[:, 4:] == x[4:].double()).all())  # r = 1/2 is a level: deterministic
    head = samples[:, :3]
    assert bool(((head.sign() == x[:3].double().sign()) | (head == 0)).all())  # the sign is kept
    # per-bucket variance bound of the docstring: (1/8 + 2^-(s-1) min(sqrt(d), 2^-(s-1) d / 4)) ||v||^2
    err = ((samples[:, :4] - x[:4].double()) ** 2).sum(dim=1).mean()
    bound = (1 / 8 + 2.0**-6 * min(2.0, 2.0**-6 * 4 / 4)) * norm**2
    assert float(err) <= bound


# ---------------------------------------------------------------------------------------------------------
# TernGrad


def test_terngrad_clip_target_and_codes() -> None:
    x = torch.randn(1000, generator=gen(3))
    x[10], x[20] = 100.0, -60.0
    comp = TernGrad()
    sigma = float(x.double().std(correction=0))
    thr = torch.tensor(2.5 * sigma, dtype=torch.float32)
    expected = torch.maximum(torch.minimum(x, thr), -thr)
    target = comp.target(x)
    assert torch.equal(target, expected)
    assert float(target[10]) == float(thr) and float(target[20]) == -float(thr)
    enc = comp.encode(x, generator=gen(0))
    scale = enc.tensors["scales"]
    assert scale.dtype == torch.float32 and scale.numel() == 1
    assert float(scale[0]) == float(target.abs().max()) == float(thr)
    dec = comp.decode(enc)
    assert set(dec.unique().tolist()) <= {-float(thr), 0.0, float(thr)}
    assert float(dec[10]) == float(thr) and float(dec[20]) == -float(thr)  # P = 1 at the clip
    # no clipping: scale is max|x| and the target is x
    nc = TernGrad(clip_sigma=math.inf)
    assert torch.equal(nc.target(x), x)
    assert float(nc.encode(x).tensors["scales"][0]) == 100.0


def test_terngrad_buckets_and_constant_group() -> None:
    x = torch.randn(50, generator=gen(4)) * torch.linspace(0.1, 10, 50)
    comp = TernGrad(bucket_size=16, clip_sigma=1.0)
    target = comp.target(x)
    for start in range(0, 50, 16):
        seg = x[start : start + 16]
        thr = torch.tensor(float(seg.double().std(correction=0)), dtype=torch.float32)
        assert torch.equal(target[start : start + 16], torch.maximum(torch.minimum(seg, thr), -thr))
    enc = comp.encode(x)
    assert enc.tensors["scales"].numel() == 4
    # a constant group has sigma = 0: not clipped, and ternary codes are then exact
    c = torch.full((8,), -3.0)
    assert torch.equal(TernGrad().roundtrip(c), c)


# ---------------------------------------------------------------------------------------------------------
# EF-signSGD and top-k


def test_efsign_scale_and_signs_exact() -> None:
    x = heavy_tailed(125)
    x[3] = 0.0
    comp = EFSign()
    enc = comp.encode(x)
    scale = torch.tensor(float(x.double().abs().sum() / x.numel()), dtype=torch.float32)
    assert torch.equal(enc.tensors["scale"], scale.reshape(1))
    sign = torch.where(x >= 0, 1.0, -1.0)
    assert torch.equal(comp.decode(enc), sign * scale)
    assert torch.equal(comp.decode(comp.encode(x, generator=gen(5))), comp.decode(enc))  # deterministic


def test_topk_keeps_exactly_the_k_largest() -> None:
    n = 1001
    x = (torch.randperm(n, generator=gen(1)).float() - 500.0) / 7.0  # distinct magnitudes except +-pairs
    x = x + 0.001 * torch.arange(n)  # break the +-pairs
    comp = TopK(ratio=0.02)
    k = comp.k(n)
    assert k == 20
    enc = comp.encode(x)
    assert enc.tensors["indices"].dtype == torch.int32 and enc.tensors["values"].dtype == torch.float32
    dec = comp.decode(enc)
    kept = set(torch.nonzero(dec).reshape(-1).tolist())
    assert kept == set(torch.topk(x.abs(), k).indices.tolist())
    assert torch.equal(dec[list(kept)], x[list(kept)])
    smallest_kept = float(x[list(kept)].abs().min())
    others = torch.ones(n, dtype=torch.bool)
    others[list(kept)] = False
    assert float(x[others].abs().max()) < smallest_kept
    assert TopK(ratio=1e-9).k(n) == 1 and TopK(ratio=1.0).k(n) == n and TopK(ratio=0.0025).k(1000) == 3
    assert torch.equal(TopK(ratio=1.0).roundtrip(x), x)


@pytest.mark.parametrize("factory", [EFSign, lambda: TopK(ratio=0.05)], ids=["efsign", "topk"])
def test_error_feedback_invariant(factory: Callable[[], Compressor]) -> None:
    """sum_t decode_t + final residual == sum_t g_t (up to float32 accumulation)."""
    comp = factory()
    ef = ErrorFeedback(comp)
    total_in = torch.zeros(300, dtype=torch.float64)
    total_out = torch.zeros(300, dtype=torch.float64)
    for t in range(25):
        g = heavy_tailed(297, seed=100 + t)
        _, dec = ef.step("bucket", g)
        total_in += g.double()
        total_out += dec.double()
    residual = ef.rounding["bucket"].double()
    assert float(residual.abs().max()) > 0.1  # the memory is doing something
    scale = float(total_in.abs().max())
    assert torch.allclose(total_out + residual, total_in, rtol=0, atol=1e-5 * scale)


# ---------------------------------------------------------------------------------------------------------
# single-scale and multi-scale [V]


def test_single_scale_stats_codebook_and_supplied_scale() -> None:
    comp = SingleScale(bits=3)  # s = 7
    x = heavy_tailed(40) / 10.0
    local = comp.local_stats(x)
    assert local.dtype == torch.float64 and local.tolist() == [float(x.abs().max())]
    cb = comp.codebook(torch.tensor([4.0], dtype=torch.float64))
    assert cb is not None and cb.s == 7
    assert torch.allclose(cb.levels, torch.linspace(-4, 4, 8), atol=1e-6)
    assert comp.codebook(torch.zeros(1, dtype=torch.float64)) is None
    agreed = torch.tensor([4.0], dtype=torch.float64)
    enc = comp.encode_with(x, comp.codebook(agreed), generator=gen(0))
    assert float(enc.tensors["scale"][0]) == 4.0
    dec = comp.decode(enc)
    assert bool(torch.isclose(dec.unsqueeze(-1), cb.levels, atol=1e-6).any(dim=-1).all())
    samples = sample_decodes(lambda g: comp.encode_with(x, comp.codebook(agreed), generator=g), comp.decode, reps=2000)
    assert_mean_matches(samples, x)
    # a float64 scale is rounded up to float32 so it still covers the value it came from
    odd = torch.tensor([1.0 + 2.0**-30], dtype=torch.float64)
    assert float(comp.encode_with(x, comp.codebook(odd)).tensors["scale"][0]) >= float(odd[0])


def test_single_scale_codes_sum_to_unbiased_mean() -> None:
    """Two workers, shared MAX scale: the integer code sum decodes to an unbiased estimate of the sum."""
    comp = SingleScale(bits=2)
    xs = [heavy_tailed(30, seed=1), heavy_tailed(30, seed=2) * 0.1]
    m = torch.maximum(comp.local_stats(xs[0]), comp.local_stats(xs[1]))
    s = comp.s
    dec: list[list[torch.Tensor]] = [[], []]
    summed = []
    for i in range(2000):
        encs = [comp.encode_with(x, comp.codebook(m), generator=gen(2 * i + w)) for w, x in enumerate(xs)]
        codes = [unpack_bits(e.tensors["codes"], comp.bits, 33).long() for e in encs]
        total = codes[0] + codes[1]  # what an all-reduce SUM of the codes delivers
        summed.append((total.double() * (2.0 / s) - 2.0) * float(m[0]))  # N = 2: -N*M + K * 2M/s
        for w, e in enumerate(encs):
            dec[w].append(comp.decode(e).double())
    assert_sum_unbiased([torch.stack(d) for d in dec], torch.stack(summed), xs)


def test_multi_scale_scale_selection() -> None:
    comp = MultiScale(bits=2, n_scales=3, scale_ratio=4.0, granularity="element")
    assert comp.scales(1.0).tolist() == [1.0, 0.25, 0.0625]
    x = torch.tensor([1.0, 0.3, 0.25, -0.1, 0.0625, 0.01, 0.0, -0.2500001])
    idx = comp.local_scale_index(x, torch.tensor([1.0], dtype=torch.float64))
    assert idx.dtype == torch.int64
    assert idx.tolist() == [0, 0, 1, 1, 2, 2, 2, 0]
    blocks = MultiScale(bits=2, n_scales=3, scale_ratio=4.0, block_size=3)
    assert blocks.local_scale_index(x, 1.0).tolist() == [0, 1, 0]  # block maxima 1.0, 0.1, 0.25000001
    # with a larger agreed M the same values need finer (larger) indices relative to it
    assert comp.local_scale_index(x, 4.0).tolist() == [1, 1, 2, 2, 2, 2, 2, 1]
    assert MultiScale(bits=3).scale_ratio == 8.0 and MultiScale().scale_ratio == 16.0


@pytest.mark.parametrize("granularity", ["element", "block"])
def test_multi_scale_agreed_min_index_codes_sum_unbiased(granularity: str) -> None:
    comp = MultiScale(bits=2, n_scales=4, scale_ratio=4.0, granularity=granularity, block_size=4)
    xs = [heavy_tailed(61, seed=11), heavy_tailed(61, seed=12) * torch.logspace(-3, 0, 64)]
    x1, x2 = xs  # x2 has many small values: alone it would choose finer scales
    m = torch.maximum(comp.local_stats(x1), comp.local_stats(x2))
    i1, i2 = comp.local_scale_index(x1, m), comp.local_scale_index(x2, m)
    agreed = torch.minimum(i1, i2)  # the all-reduce MIN: coarsest needed by any worker
    assert bool((agreed != i2).any()), "agreement must change some worker's own choice"
    # the agreed index is the finest scale containing both workers' values (brute force)
    sc = comp.scales(float(m[0])).double()
    a = torch.maximum(x1.abs(), x2.abs()).double()
    if granularity == "block":
        a = torch.nn.functional.pad(a, (0, (-a.numel()) % 4)).view(-1, 4).amax(dim=1)
    brute = torch.tensor([max(j for j in range(4) if j == 0 or v <= sc[j]) for v in a.tolist()])
    assert torch.equal(agreed, brute)
    with pytest.raises(ValueError, match="MIN"):
        comp.encode_with(x1, comp.agreed(comp.codebook(m), torch.maximum(i1, i2)))
    s = comp.s
    se = sc[comp.expand(agreed, x1.numel())]

    dec: list[list[torch.Tensor]] = [[], []]
    summed = []
    for i in range(1500):
        encs = [comp.encode_with(x, comp.agreed(comp.codebook(m), agreed), generator=gen(2 * i + w))
                for w, x in enumerate(xs)]
        if i == 0:  # every worker sends the same agreed scale and indices
            assert torch.equal(encs[0].tensors["index"], encs[1].tensors["index"])
            assert torch.equal(encs[0].tensors["scale"], encs[1].tensors["scale"])
        codes = [unpack_bits(e.tensors["codes"], comp.bits, 64).long() for e in encs]
        total = codes[0] + codes[1]  # all-reduce SUM of the integer codes
        summed.append((total.double() * (2.0 / s) - 2.0) * se)  # on the shared per-element grids
        for w, e in enumerate(encs):
            dec[w].append(comp.decode(e).double())
    assert_sum_unbiased([torch.stack(d) for d in dec], torch.stack(summed), xs)


def test_multi_scale_beats_single_scale_on_heavy_tails() -> None:
    """The reason multi-scale exists: smaller values get finer grids, so the error drops (fixed seeds)."""
    x = heavy_tailed(4000, seed=5)
    mse = {}
    for name, comp in [("single", SingleScale(bits=3)), ("multi", MultiScale(bits=3, granularity="element"))]:
        err = [float(((comp.roundtrip(x, generator=gen(i)) - x) ** 2).sum()) for i in range(20)]
        mse[name] = sum(err) / len(err)
    assert mse["multi"] < 0.25 * mse["single"], mse


# ---------------------------------------------------------------------------------------------------------
# wire format


def _nb(n: int, bits: int) -> int:
    """Bits of n packed b-bit codes: 8 * ceil(n * b / 8)."""
    return 8 * math.ceil(n * bits / 8)


WIRE_CASES: list[tuple[str, Callable[[], Compressor], int, float]] = [
    ("qsgd-b4", lambda: QSGD(bits=4, bucket_size=512), 4096, (4096 * 4 + 8 * 32) / 4096),
    ("qsgd-b3-odd", lambda: QSGD(bits=3, bucket_size=512), 1001, (_nb(1001, 3) + 2 * 32) / 1001),
    ("qsgd-bucket-big", lambda: QSGD(bits=8, bucket_size=2**31), 1001, (1001 * 8 + 32) / 1001),
    ("nuqsgd-b5", lambda: NUQSGD(bits=5, bucket_size=100), 1001, (_nb(1001, 5) + 11 * 32) / 1001),
    ("terngrad", lambda: TernGrad(), 4096, (4096 * 2 + 32) / 4096),
    ("terngrad-bucket", lambda: TernGrad(bucket_size=1000), 4097, (_nb(4097, 2) + 5 * 32) / 4097),
    ("efsign", lambda: EFSign(), 4096, 1 + 32 / 4096),
    ("efsign-odd", lambda: EFSign(), 1001, (_nb(1001, 1) + 32) / 1001),
    ("topk", lambda: TopK(ratio=0.01), 4096, 41 * (32 + 32) / 4096),
    ("single-b4", lambda: SingleScale(bits=4), 4096, 4 + 32 / 4096),
    ("single-b3-odd", lambda: SingleScale(bits=3), 1001, (_nb(1001, 3) + 32) / 1001),
    ("multi-block", lambda: MultiScale(bits=4), 4096, (4096 * 4 + 32 + _nb(16, 2)) / 4096),
    ("multi-element", lambda: MultiScale(bits=4, granularity="element"), 4096, (4096 * 6 + 32) / 4096),
    (
        "multi-block-odd",
        lambda: MultiScale(bits=3, n_scales=5, block_size=100),
        1001,
        (_nb(1001, 3) + 32 + _nb(11, 3)) / 1001,
    ),
    (
        "multi-element-odd",
        lambda: MultiScale(bits=3, n_scales=2, granularity="element"),
        1001,
        (_nb(1001, 3) + 32 + _nb(1001, 1)) / 1001,
    ),
]


@pytest.mark.parametrize("case", WIRE_CASES, ids=[c[0] for c in WIRE_CASES])
def test_wire_bits_exact(case: tuple[str, Callable[[], Compressor], int, float]) -> None:
    _, factory, n, expected = case
    comp = factory()
    x = torch.randn(n, generator=gen(n)) + 0.01
    enc = comp.encode(x, generator=gen(0))
    assert enc.bits_per_coord() == pytest.approx(expected, rel=1e-12)
    for key, t in enc.tensors.items():
        assert t.dtype in (torch.uint8, torch.float32, torch.int32), (key, t.dtype)
        assert t.dim() == 1
    assert comp.decode(enc).shape == x.shape


# ---------------------------------------------------------------------------------------------------------
# bad input and edge cases


@pytest.mark.parametrize("name", sorted(ALL_FACTORIES))
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_input_raises(name: str, bad: float) -> None:
    x = torch.ones(10)
    x[3] = bad
    with pytest.raises(ValueError, match=r"^x contains non-finite"):
        ALL_FACTORIES[name]().encode(x)


@pytest.mark.parametrize(
    "factory, match",
    [
        (lambda: QSGD(bits=1), r"'bits' must be in \[2, 8\]"),
        (lambda: QSGD(bits=9), r"'bits' must be in \[2, 8\]"),
        (lambda: NUQSGD(bits=1), r"'bits' must be in \[2, 8\]"),
        (lambda: SingleScale(bits=0), r"'bits' must be in \[1, 8\]"),
        (lambda: SingleScale(bits=9), r"'bits' must be in \[1, 8\]"),
        (lambda: MultiScale(bits=9), r"'bits' must be in \[1, 8\]"),
        (lambda: MultiScale(n_scales=1), r"'n_scales' must be in \[2, 16\]"),
        (lambda: MultiScale(scale_ratio=1.0), r"'scale_ratio' must be in \[1.5, 1024\]"),
        (lambda: MultiScale(granularity="row"), r"'granularity' must be one of element, block"),
        (lambda: QSGD(bucket_size=0), r"'bucket_size' must be in \[1, "),
        (lambda: TernGrad(clip_sigma=0.0), r"'clip_sigma' must be in \(0, inf\]"),
        (lambda: TernGrad(clip_sigma=-1.0), r"'clip_sigma' must be in"),
        (lambda: TopK(ratio=0.0), r"'ratio' must be in \(0, 1\]"),
        (lambda: TopK(ratio=1.5), r"'ratio' must be in \(0, 1\]"),
    ],
)
def test_bad_options_raise(factory: Callable[[], Compressor], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        factory()


def test_bad_agreed_values_raise() -> None:
    x = torch.randn(20, generator=gen(0))
    with pytest.raises(ValueError, match="stats"):
        SingleScale().encode_with(x, SingleScale().codebook(torch.tensor([math.nan], dtype=torch.float64)))
    with pytest.raises(ValueError, match="exactly one value"):
        SingleScale().encode_with(x, SingleScale().codebook(torch.ones(2, dtype=torch.float64)))
    comp = MultiScale(granularity="element")
    with pytest.raises(ValueError, match="20 entries"):
        comp.encode_with(x, comp.agreed(comp.codebook(comp.local_stats(x)), torch.zeros(3, dtype=torch.int64)))
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        comp.encode_with(x, comp.agreed(comp.codebook(comp.local_stats(x)), torch.full((20,), -1, dtype=torch.int64)))


@pytest.mark.parametrize("name", sorted(ALL_FACTORIES))
def test_edge_cases(name: str) -> None:
    comp = ALL_FACTORIES[name]()
    for shape in [(0,), (0, 3)]:
        enc = comp.encode(torch.empty(shape))
        out = comp.decode(enc)
        assert out.shape == shape and out.dtype == torch.float32
    for n in (1, 3, 513, 1001):
        z = torch.zeros(n)
        out = comp.decode(comp.encode(z))
        assert torch.equal(out, z) and not bool(out.signbit().any())
        x = torch.randn(n, generator=gen(n))
        out = comp.decode(comp.encode(x, generator=gen(1)))
        assert out.shape == (n,) and out.dtype == torch.float32 and bool(torch.isfinite(out).all())
    x2 = torch.randn(7, 13, generator=gen(2))
    out2 = comp.decode(comp.encode(x2, generator=gen(3)))
    flat = comp.decode(comp.encode(x2.reshape(-1), generator=gen(3)))
    assert out2.shape == (7, 13) and torch.equal(out2.reshape(-1), flat)
    # other float dtypes are quantized as float32 and decode to float32
    x64 = x2.double()
    assert torch.equal(comp.decode(comp.encode(x64, generator=gen(3))), out2)
