"""Codebook rounding: unbiasedness and variance from SPEC §2, snapping from SPEC §6.1."""

import math

import pytest
import torch

from tailq.codec import Codebook

R = 20000  # repetitions per coordinate; the tolerance is 4 standard errors of the mean


def _points(levels: torch.Tensor) -> torch.Tensor:
    lo, hi = float(levels[0]), float(levels[-1])
    inside = torch.linspace(lo, hi, 37)[1:-1]
    # exact levels, midpoints, and values outside the range (those are clipped first)
    return torch.cat([inside, levels, (levels[1:] + levels[:-1]) / 2, torch.tensor([lo - 3.0, hi + 5.0])])


@pytest.mark.parametrize(
    "cb",
    [
        Codebook.uniform_grid(2.0, 7),
        Codebook.from_levels([-3.0, -1.0, -0.2, 0.0, 0.1, 0.5, 2.5]),
        Codebook.uniform_grid(0.5, 1),
    ],
    ids=["uniform-s7", "nonuniform", "uniform-s1"],
)
def test_stochastic_rounding_unbiased_with_exact_variance(cb: Codebook) -> None:
    x = _points(cb.levels)
    gen = torch.Generator().manual_seed(1)
    codes = cb.encode(x.repeat(R), gen).reshape(R, -1)
    assert int(codes.min()) >= 0 and int(codes.max()) <= cb.s
    dec = cb.decode(codes).double()
    xt = cb.truncate(x).double()
    # variance of rounding x in [l_j, l_{j+1}] is (l_{j+1} - x)(x - l_j)
    lv = cb.levels.double()
    j = (torch.searchsorted(lv, xt, right=True) - 1).clamp(0, cb.s - 1)
    var = (lv[j + 1] - xt) * (xt - lv[j])
    se = (var / R).sqrt()
    err = (dec.mean(0) - xt).abs()
    assert bool((err <= 4 * se + 1e-6).all()), err.max()
    # the empirical variance matches the formula: rounding is a two-point law with gap D and P(up) = p,
    # so Var = D²p(1-p), the fourth central moment is D⁴p(1-p)(1-3p(1-p)), and the sample variance has
    # standard error sqrt((mu4 - Var²)/R); allow 5 of those, plus the O(Var/R) bias of estimating the mean.
    gap = lv[j + 1] - lv[j]
    pq = var / gap**2
    mu4 = gap**4 * pq * (1 - 3 * pq)
    emp = dec.var(0, unbiased=False)
    tol = 5 * ((mu4 - var**2).clamp_min(0) / R).sqrt() + 10 * var / R + 1e-9
    assert bool(((emp - var).abs() <= tol).all())
    # values on a level round to that level (up to one float32 ulp of the affine uniform path)
    on = cb.decode(cb.encode(cb.levels, gen))
    assert torch.allclose(on, cb.levels, rtol=0, atol=4e-7 * float(cb.levels.abs().max()))


def test_codebook_rejects_bad_levels() -> None:
    with pytest.raises(ValueError, match="strictly increasing"):
        Codebook.from_levels([0.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="strictly increasing"):
        Codebook.from_levels([0.0, float("nan")])
    with pytest.raises(ValueError, match="at least 2"):
        Codebook.from_levels([1.0])
    with pytest.raises(ValueError, match="alpha"):
        Codebook.uniform_grid(0.0, 3)


def test_snap_to_fine_grid_is_unbiased_and_sums() -> None:
    cb = Codebook.from_levels([-3.1995, -1.8957, -0.9899, -0.2951, 0.2951, 0.9899, 1.8957, 3.1995])
    grid = 2 ** (3 + 3) - 1
    sn = cb.snap(grid)
    step = (cb.high - cb.low) / grid
    # every snapped level is on the fine grid and within half a fine step of the original
    assert sn.fine_index[0] == 0 and sn.fine_index[-1] == grid
    assert torch.allclose(sn.codebook.levels.double(), cb.low + sn.fine_index.double() * step, atol=1e-6)
    assert float((sn.codebook.levels - cb.levels).abs().max()) <= step / 2 + 1e-6
    # N workers: the decoded sum of fine indices is the mean of their (truncated) values, unbiased
    n_workers, n = 3, 50
    gen = torch.Generator().manual_seed(0)
    xs = torch.randn(n_workers, n, generator=gen) * 2
    total = torch.zeros(R, n, dtype=torch.int64)
    for w in range(n_workers):
        total += sn.encode_fine(xs[w].repeat(R), gen).reshape(R, n)
    mean = sn.decode_sum(total, n_workers).double()
    target = cb.truncate(xs).double().mean(0)
    se_bound = (step * 64) / 2 / math.sqrt(R) / math.sqrt(n_workers)  # max level gap is < 64 fine steps
    assert float((mean.mean(0) - target).abs().max()) <= 4 * se_bound


def test_a_uniform_codebook_snapped_off_its_grid_rounds_by_the_real_distances() -> None:
    """A uniform codebook of s = 7 on a fine grid of 31 lands unequally spaced (31/7 is no integer): it must
    not keep the affine (equal-spacing) rounding, which would be biased for the snapped levels. (A TNQ bucket whose
    every |g| is below the histogram's zero bin falls back to such a uniform grid.)"""
    sn = Codebook.uniform_grid(1.0, 7).snap(31)
    assert not sn.codebook.uniform
    assert Codebook.uniform_grid(1.0, 7).snap(7).codebook.uniform  # on its own grid (TUQ, single-scale) it is
    x = torch.linspace(-1, 1, 41)
    gen = torch.Generator().manual_seed(1)
    dec = torch.stack([sn.codebook.decode(sn.codebook.encode(x, gen)) for _ in range(R)]).double()
    lv = sn.codebook.levels.double()
    j = (torch.searchsorted(lv, x.double(), right=True) - 1).clamp(0, lv.numel() - 2)
    se = ((lv[j + 1] - x.double()) * (x.double() - lv[j]) / R).sqrt()
    assert bool(((dec.mean(0) - x.double()).abs() <= 5 * se + 1e-6).all())


def test_snap_merges_colliding_levels() -> None:
    cb = Codebook.from_levels([-1.0, -0.001, 0.0, 0.001, 1.0])
    sn = cb.snap(7)
    assert (
        sn.fine_index.tolist() == [0, 3, 4, 7]
        or sn.fine_index.tolist() == [0, 3, 7]
        or len(sn.fine_index) < 5
    )
    assert bool((sn.fine_index[1:] > sn.fine_index[:-1]).all())
    with pytest.raises(ValueError, match="grid"):
        cb.snap(3)
