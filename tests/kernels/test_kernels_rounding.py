"""Counter-key stochastic rounding stays unbiased with the exact two-point variance (SPEC §2), on every path."""

from __future__ import annotations

import math

import pytest
import torch

from tailq.codec import Codebook
from tailq.codec.packing import unpack_bits
from tailq.kernels import RandKey, use

R = 20000  # repetitions per coordinate; 4 standard errors of the mean


def _points(levels: torch.Tensor) -> torch.Tensor:
    lo, hi = float(levels[0]), float(levels[-1])
    inside = torch.linspace(lo, hi, 37)[1:-1]
    return torch.cat([inside, levels, (levels[1:] + levels[:-1]) / 2, torch.tensor([lo - 3.0, hi + 5.0])])


@pytest.mark.parametrize("path", ["reference", "compiled"])
@pytest.mark.parametrize(
    "cb",
    [
        Codebook.uniform_grid(2.0, 7),
        Codebook.from_levels([-3.0, -1.0, -0.2, 0.0, 0.1, 0.5, 2.5, 2.6]),
        Codebook.uniform_grid(0.5, 1),
    ],
    ids=["uniform-s7", "nonuniform-s7", "uniform-s1"],
)
def test_counter_rounding_unbiased_with_exact_variance(cb: Codebook, path: str) -> None:
    x = _points(cb.levels)
    bits = max(1, cb.s.bit_length())
    with use(path):
        packed = cb.encode_packed(x.repeat(R), RandKey(3, 1, 4, 1), bits)  # R copies: distinct counters
    codes = unpack_bits(packed, bits, x.numel() * R).to(torch.int64).reshape(R, -1)
    assert int(codes.max()) <= cb.s
    dec = cb.decode(codes).double()
    xt = cb.truncate(x).double()
    lv = cb.levels.double()
    j = (torch.searchsorted(lv, xt, right=True) - 1).clamp(0, cb.s - 1)
    var = (lv[j + 1] - xt) * (xt - lv[j])
    err = (dec.mean(0) - xt).abs()
    assert bool((err <= 4 * (var / R).sqrt() + 1e-6).all()), err.max()
    gap = lv[j + 1] - lv[j]
    pq = var / gap**2
    mu4 = gap**4 * pq * (1 - 3 * pq)
    emp = dec.var(0, unbiased=False)
    tol = 5 * ((mu4 - var**2).clamp_min(0) / R).sqrt() + 10 * var / R + 1e-9
    assert bool(((emp - var).abs() <= tol).all())
    # exactly on a level: no randomness at all
    with use(path):
        on = cb.decode(cb.encode(cb.levels, RandKey(9, 9, 9, 9)))
    assert torch.allclose(on, cb.levels, rtol=0, atol=4e-7 * float(cb.levels.abs().max()))


def test_snapped_sum_over_workers_is_unbiased_with_keys() -> None:
    cb = Codebook.from_levels([-3.1995, -1.8957, -0.9899, -0.2951, 0.2951, 0.9899, 1.8957, 3.1995])
    grid = 2 ** (3 + 3) - 1
    sn = cb.snap(grid)
    step = (cb.high - cb.low) / grid
    n_workers, n = 3, 50
    xs = torch.randn(n_workers, n, generator=torch.Generator().manual_seed(0)) * 2
    reps = 4000
    total = torch.zeros(reps, n, dtype=torch.int64)
    for w in range(n_workers):
        total += sn.encode_fine(xs[w].repeat(reps), RandKey(0, w, 0, 0)).reshape(reps, n)
    mean = sn.decode_sum(total, n_workers).double()
    target = cb.truncate(xs).double().mean(0)
    se_bound = (step * 64) / 2 / math.sqrt(reps) / math.sqrt(n_workers)
    assert float((mean.mean(0) - target).abs().max()) <= 4 * se_bound
