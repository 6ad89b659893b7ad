"""Dense bit packing and summable headroom lanes (SPEC §6.1): exact values only."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tailq.codec.packing import (
    LanePlan,
    pack_bits,
    pack_lanes,
    packed_nbytes,
    plan_lanes,
    unpack_bits,
    unpack_lanes,
)

ALL_BITS = list(range(1, 9))
LENGTHS = [0, 1, 7, 8, 9, 1000003]


def _reference_bytes(codes: list[int], bits: int) -> bytes:
    """Little-endian bit stream built with Python ints: code i at bits [i*bits, (i+1)*bits)."""
    value = sum(c << (i * bits) for i, c in enumerate(codes))
    return value.to_bytes((len(codes) * bits + 7) // 8, "little")


# ---------------------------------------------------------------------------------------------------------
# dense packing


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("n", LENGTHS)
def test_dense_roundtrip_and_size(bits: int, n: int) -> None:
    gen = torch.Generator().manual_seed(1000 * bits + n)
    codes = torch.randint(0, 1 << bits, (n,), generator=gen, dtype=torch.int64)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.dim() == 1
    assert packed.numel() == math.ceil(n * bits / 8) == packed_nbytes(n, bits)
    out = unpack_bits(packed, bits, n)
    assert out.dtype == torch.uint8
    assert out.shape == (n,)
    assert torch.equal(out.to(torch.int64), codes)


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.int64])
def test_dense_matches_python_reference(bits: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(bits)
    for n in range(0, 41):
        codes = torch.randint(0, 1 << bits, (n,), generator=gen).to(dtype)
        packed = pack_bits(codes, bits)
        assert bytes(packed.tolist()) == _reference_bytes(codes.tolist(), bits)
        assert torch.equal(unpack_bits(packed, bits, n).to(dtype), codes)


def test_dense_extreme_codes_and_shapes() -> None:
    for bits in ALL_BITS:
        top = (1 << bits) - 1
        codes = torch.full((3, 5, 7), top, dtype=torch.int32)  # any shape, flattened row-major
        packed = pack_bits(codes, bits)
        assert bytes(packed.tolist()) == _reference_bytes([top] * 105, bits)
        assert torch.equal(unpack_bits(packed, bits, 105).to(torch.int32), codes.reshape(-1))
        # non-contiguous input
        nc = torch.arange(64, dtype=torch.int64).remainder(top + 1).reshape(8, 8).t()
        assert torch.equal(unpack_bits(pack_bits(nc, bits), bits, 64).long(), nc.reshape(-1))


def test_dense_known_bytes_bits1() -> None:
    codes = torch.tensor([1, 0, 1, 1, 0, 0, 0, 0, 1, 1])
    # byte 0: bits 0,2,3 set -> 0b00001101 = 13; byte 1: bits 0,1 -> 3
    assert pack_bits(codes, 1).tolist() == [13, 3]
    assert pack_bits(torch.tensor([0, 0, 0, 0, 0, 0, 0, 1]), 1).tolist() == [128]


def test_dense_known_bytes_bits3() -> None:
    codes = torch.tensor([1, 2, 3, 4, 5])
    # 1 + 2<<3 + 3<<6 + 4<<9 + 5<<12 = 22737 = 0x58D1 over 15 bits -> 2 bytes, little-endian
    assert pack_bits(codes, 3).tolist() == [0xD1, 0x58]
    assert pack_bits(torch.full((8,), 7), 3).tolist() == [255, 255, 255]
    # code 1 at index 2 straddles bytes? no: bits 6..8 -> bit 6 of byte 0 is set, nothing in byte 1
    assert pack_bits(torch.tensor([0, 0, 1]), 3).tolist() == [64, 0]
    # code 4 at index 2 sets bit 8 -> straddles into byte 1
    assert pack_bits(torch.tensor([0, 0, 4]), 3).tolist() == [0, 1]


def test_dense_known_bytes_bits8() -> None:
    codes = torch.tensor([0, 1, 255, 128, 17], dtype=torch.int32)
    assert pack_bits(codes, 8).tolist() == [0, 1, 255, 128, 17]
    u8 = codes.to(torch.uint8)
    packed = pack_bits(u8, 8)
    assert packed.data_ptr() != u8.data_ptr()  # a copy, never an alias of the input
    assert unpack_bits(packed, 8, 5).tolist() == [0, 1, 255, 128, 17]


def test_dense_empty() -> None:
    for bits in ALL_BITS:
        packed = pack_bits(torch.empty(0, dtype=torch.int64), bits)
        assert packed.dtype == torch.uint8 and packed.shape == (0,)
        out = unpack_bits(packed, bits, 0)
        assert out.dtype == torch.uint8 and out.shape == (0,)


@pytest.mark.parametrize("bits", [0, 9, -1])
def test_dense_bad_bits(bits: int) -> None:
    with pytest.raises(ValueError, match=r"bits.*1\.\.8"):
        pack_bits(torch.zeros(4, dtype=torch.int64), bits)
    with pytest.raises(ValueError, match=r"bits.*1\.\.8"):
        unpack_bits(torch.zeros(4, dtype=torch.uint8), bits, 4)


def test_dense_codes_out_of_range() -> None:
    with pytest.raises(ValueError, match="codes"):
        pack_bits(torch.tensor([0, 8, 1]), 3)
    with pytest.raises(ValueError, match="codes"):
        pack_bits(torch.tensor([0, -1, 1]), 3)
    with pytest.raises(ValueError, match="codes"):
        pack_bits(torch.tensor([2], dtype=torch.uint8), 1)
    with pytest.raises(TypeError, match="codes"):
        pack_bits(torch.tensor([0.0, 1.0]), 3)
    # check=False skips the validation (hot path); in-range codes still round-trip
    assert pack_bits(torch.tensor([0, 8, 1]), 3, check=False).numel() == 2
    assert unpack_bits(pack_bits(torch.tensor([5, 6]), 3, check=False), 3, 2).tolist() == [5, 6]


def test_dense_wrong_packed_length() -> None:
    packed = pack_bits(torch.arange(10) % 8, 3)  # 4 bytes
    with pytest.raises(ValueError, match="packed"):
        unpack_bits(packed, 3, 11)  # needs 5 bytes
    with pytest.raises(ValueError, match="packed"):
        unpack_bits(packed[:3], 3, 10)
    with pytest.raises(ValueError, match="packed"):
        unpack_bits(torch.zeros(1, dtype=torch.uint8), 3, 0)
    with pytest.raises(TypeError, match="packed"):
        unpack_bits(packed.to(torch.int32), 3, 10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dense_and_lanes_on_cuda() -> None:
    dev = torch.device("cuda")
    for bits in ALL_BITS:
        codes = torch.randint(0, 1 << bits, (1001,), device=dev)
        packed = pack_bits(codes, bits)
        assert packed.device.type == "cuda"
        assert bytes(packed.cpu().tolist()) == _reference_bytes(codes.cpu().tolist(), bits)
        assert torch.equal(unpack_bits(packed, bits, 1001).long(), codes)
    plan = plan_lanes(8, 15, 32)
    codes = torch.randint(0, 16, (8, 1001), device=dev)
    words = torch.stack([pack_lanes(c, plan) for c in codes]).sum(0, dtype=plan.dtype)
    assert words.device.type == "cuda"
    assert torch.equal(unpack_lanes(words, plan, 1001), codes.sum(0))


# ---------------------------------------------------------------------------------------------------------
# headroom lanes: the plan


def _max_word(total: int, w: int, lanes: int) -> int:
    return sum(total << (i * w) for i in range(lanes))


def test_spec_example_n4_g7() -> None:
    plan = plan_lanes(4, 7)
    assert plan == LanePlan(n_workers=4, grid=7, lane_bits=5, word_bits=32, lanes_per_word=6)
    assert plan.dtype == torch.int32
    assert plan.bits_per_coord == pytest.approx(16 / 3)
    assert round(plan.bits_per_coord, 3) == 5.333
    assert plan.words_for(0) == 0 and plan.words_for(6) == 1 and plan.words_for(7) == 2
    p64 = plan_lanes(4, 7, 64)
    assert (p64.lane_bits, p64.lanes_per_word, p64.dtype) == (5, 12, torch.int64)  # 5.333 too: tie -> 32


def test_plan_known_values() -> None:
    # N=8, G=15 -> 120 -> 7 bits; int32 holds 4 lanes (8 b/c), int64 holds 9 (7.11 b/c) -> int64
    p = plan_lanes(8, 15)
    assert (p.lane_bits, p.word_bits, p.lanes_per_word) == (7, 64, 9)
    # N=1, G=1 -> 1-bit lanes: 31 lanes fill int32 (2^31 - 1), 63 fill int64
    assert plan_lanes(1, 1, 32).lanes_per_word == 31
    assert plan_lanes(1, 1, 64).lanes_per_word == 63
    assert plan_lanes(1, 1).word_bits == 64  # 64/63 = 1.016 < 32/31 = 1.032 bits per coordinate
    # lane width needing more than 31 bits: only int64 is possible
    p = plan_lanes(1 << 20, (1 << 12) - 1)
    assert (p.lane_bits, p.word_bits, p.lanes_per_word) == (32, 64, 1)
    with pytest.raises(ValueError, match="n_workers"):
        plan_lanes(1 << 20, (1 << 12) - 1, 32)


def test_plan_auto_picks_fewer_bits_per_coord() -> None:
    for n_workers in (1, 2, 3, 4, 8, 16, 64, 100, 1024):
        for grid in (1, 3, 7, 15, 255, 4095):
            p32 = plan_lanes(n_workers, grid, 32)
            p64 = plan_lanes(n_workers, grid, 64)
            auto = plan_lanes(n_workers, grid)
            want = p32 if p32.bits_per_coord <= p64.bits_per_coord else p64
            assert auto == want


@settings(max_examples=300, deadline=None, database=None)
@given(
    n_workers=st.integers(1, 1 << 24),
    grid=st.integers(1, 1 << 24),
    word_bits=st.sampled_from([32, 64]),
)
def test_plan_is_minimal_and_maximal(n_workers: int, grid: int, word_bits: int) -> None:
    total = n_workers * grid
    limit = (1 << (word_bits - 1)) - 1
    if total > limit:
        with pytest.raises(ValueError, match="n_workers"):
            plan_lanes(n_workers, grid, word_bits)
        return
    plan = plan_lanes(n_workers, grid, word_bits)
    w, lanes = plan.lane_bits, plan.lanes_per_word
    # the lane width is the smallest that holds the sum N*G ...
    assert w == total.bit_length() == math.ceil(math.log2(total + 1))
    assert total < (1 << w)
    assert total > (1 << (w - 1)) - 1  # ... with w-1 bits the max sum would not fit
    # ... and L is maximal: L lanes never overflow the signed word, L+1 would
    assert lanes >= 1
    assert plan.max_word == _max_word(total, w, lanes) <= limit
    assert _max_word(total, w, lanes + 1) > limit
    assert plan.bits_per_coord == word_bits / lanes


# ---------------------------------------------------------------------------------------------------------
# headroom lanes: packing and the all-reduce SUM


def test_lane_layout_is_strided() -> None:
    plan = plan_lanes(4, 7)  # w = 5, L = 6
    n = 14  # nwords = 3
    codes = torch.arange(n) % 8
    words = pack_lanes(codes, plan)
    assert words.dtype == torch.int32 and words.shape == (3,)
    expect = [0, 0, 0]
    for i, c in enumerate(codes.tolist()):
        expect[i % 3] |= c << (5 * (i // 3))  # code i -> word i % nwords, lane i // nwords
    assert words.tolist() == expect
    assert torch.equal(unpack_lanes(words, plan, n), codes)


@pytest.mark.parametrize("word_bits", [32, 64])
@pytest.mark.parametrize("n", [0, 1, 5, 6, 7, 97, 100003])
def test_lane_roundtrip_single_worker(word_bits: int, n: int) -> None:
    for n_workers, grid in [(1, 1), (4, 7), (16, 255), (3, 4095)]:
        plan = plan_lanes(n_workers, grid, word_bits)
        gen = torch.Generator().manual_seed(n + grid)
        codes = torch.randint(0, grid + 1, (n,), generator=gen)
        for dt in (torch.int64, torch.int32):
            words = pack_lanes(codes.to(dt), plan)
            assert words.dtype == plan.dtype
            assert words.shape == (plan.words_for(n),)
            out = unpack_lanes(words, plan, n)
            assert out.dtype == torch.int64
            assert torch.equal(out, codes)
    u8 = torch.randint(0, 8, (n,), dtype=torch.uint8)
    plan = plan_lanes(4, 7, word_bits)
    assert torch.equal(unpack_lanes(pack_lanes(u8, plan), plan, n), u8.long())


def test_inputs_are_not_modified() -> None:
    plan32, plan64 = plan_lanes(4, 7, 32), plan_lanes(4, 7, 64)
    for dt in (torch.uint8, torch.int32, torch.int64):
        codes = (torch.arange(1000) % 8).to(dt)
        before = codes.clone()
        for bits in (3, 4, 8):
            packed = pack_bits(codes, bits)
            packed_before = packed.clone()
            unpack_bits(packed, bits, 1000)
            assert torch.equal(packed, packed_before)
        for plan in (plan32, plan64):
            words = pack_lanes(codes, plan)
            words_before = words.clone()
            unpack_lanes(words, plan, 1000)
            assert torch.equal(words, words_before)
        assert torch.equal(codes, before)


def _allreduce_sum(words: list[torch.Tensor], plan: LanePlan) -> torch.Tensor:
    """SUM in the word dtype (as an all-reduce SUM would), and prove that it did not wrap."""
    stacked = torch.stack(words)
    assert stacked.dtype == plan.dtype
    summed = stacked.sum(dim=0, dtype=plan.dtype)
    exact = stacked.to(torch.int64).sum(dim=0)  # no wrap possible: N * 2^31 << 2^63 (int32 words)
    if plan.word_bits == 32:
        assert torch.equal(summed.to(torch.int64), exact)
    # running partial sums (ring order) stay non-negative and below 2^(W-1)
    acc = torch.zeros_like(summed)
    for w in words:
        acc += w
        if acc.numel():
            assert int(acc.min()) >= 0
    assert torch.equal(acc, summed)
    if summed.numel():
        assert int(summed.max()) <= (1 << (plan.word_bits - 1)) - 1
    return summed


@example(n_workers=1024, grid=4095, word_bits=32, n=64, seed=1, all_max=False)
@example(n_workers=1024, grid=4095, word_bits=64, n=64, seed=2, all_max=True)
@example(n_workers=1024, grid=4095, word_bits=None, n=63, seed=3, all_max=False)
@example(n_workers=1000, grid=1, word_bits=32, n=64, seed=4, all_max=True)
@example(n_workers=4, grid=7, word_bits=32, n=64, seed=5, all_max=True)
@example(n_workers=1, grid=1, word_bits=64, n=64, seed=6, all_max=True)
@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n_workers=st.one_of(st.integers(1, 16), st.integers(1, 1024)),
    grid=st.one_of(st.sampled_from([1, 3, 7, 15, 31, 63, 127, 255, 4095]), st.integers(1, (1 << 12) - 1)),
    word_bits=st.sampled_from([32, 64, None]),
    n=st.integers(0, 64),
    seed=st.integers(0, 2**32 - 1),
    all_max=st.booleans(),
)
def test_lane_sum_over_workers_is_exact(
    n_workers: int, grid: int, word_bits: int | None, n: int, seed: int, all_max: bool
) -> None:
    plan = plan_lanes(n_workers, grid, word_bits)
    if all_max:
        codes = torch.full((n_workers, n), grid, dtype=torch.int64)
    else:
        gen = torch.Generator().manual_seed(seed)
        codes = torch.randint(0, grid + 1, (n_workers, n), generator=gen)
    words = [pack_lanes(codes[k], plan) for k in range(n_workers)]
    summed = _allreduce_sum(words, plan)
    assert torch.equal(unpack_lanes(summed, plan, n), codes.sum(dim=0))


@pytest.mark.parametrize(
    ("n_workers", "grid", "word_bits"),
    [
        (4, 7, 32),
        (4, 7, 64),
        (1, 1, 32),
        (1, 1, 64),
        (8, 15, None),
        (1024, 4095, 32),
        (1024, 4095, 64),
        (5, 3, 32),
        (1000, 1, 32),
        (2, 1073741823, 64),
    ],
)
def test_lane_sum_all_workers_send_grid(n_workers: int, grid: int, word_bits: int | None) -> None:
    """Extreme case: every worker sends the top code everywhere; the summed word is the plan's max."""
    plan = plan_lanes(n_workers, grid, word_bits)
    n = 3 * plan.lanes_per_word  # every word fully used
    one = pack_lanes(torch.full((n,), grid, dtype=torch.int64), plan)
    summed = one.to(torch.int64) * n_workers  # identical words: the SUM is N times one of them
    assert summed.tolist() == [plan.max_word] * plan.words_for(n)
    assert plan.max_word <= (1 << (plan.word_bits - 1)) - 1
    summed = summed.to(plan.dtype)  # exact: below 2^(W-1)
    assert torch.equal(unpack_lanes(summed, plan, n), torch.full((n,), n_workers * grid, dtype=torch.int64))
    if n_workers <= 64:
        s = _allreduce_sum([one] * n_workers, plan)
        assert s.tolist() == [plan.max_word] * plan.words_for(n)


def test_lane_errors() -> None:
    with pytest.raises(ValueError, match="n_workers"):
        plan_lanes(0, 7)
    with pytest.raises(ValueError, match="grid"):
        plan_lanes(4, 0)
    with pytest.raises(ValueError, match="word_bits"):
        plan_lanes(4, 7, 16)
    with pytest.raises(ValueError, match="n_workers"):
        plan_lanes(1 << 40, 1 << 30)  # needs 71-bit lanes
    plan = plan_lanes(4, 7)
    with pytest.raises(ValueError, match="codes"):
        pack_lanes(torch.tensor([0, 8]), plan)
    with pytest.raises(ValueError, match="codes"):
        pack_lanes(torch.tensor([0, -1]), plan)
    with pytest.raises(TypeError, match="codes"):
        pack_lanes(torch.tensor([0.5]), plan)
    assert pack_lanes(torch.tensor([0, 8]), plan, check=False).shape == (1,)  # check skipped
    words = pack_lanes(torch.arange(13) % 8, plan)  # 3 words
    with pytest.raises(ValueError, match="words"):
        unpack_lanes(words, plan, 19)  # needs 4 words
    with pytest.raises(ValueError, match="words"):
        unpack_lanes(words[:2], plan, 13)
    with pytest.raises(ValueError, match="overflow"):
        unpack_lanes(torch.tensor([-1, 0, 0], dtype=torch.int32), plan, 13)
