"""Bit packing: dense b-bit codes and summable headroom lanes (SPEC §6.1).

Two wire formats, both fully vectorised torch (the only Python loops run over the 8 codes of a group or
the ``L`` lanes of a word, never over elements) and both staying on the input's device:

* **Dense** (:func:`pack_bits` / :func:`unpack_bits`): ``n`` codes of ``b`` bits become exactly
  ``ceil(n * b / 8)`` bytes, little-endian bit order: code ``i`` occupies bits ``[i*b, (i+1)*b)`` of the byte
  stream (bit 0 of the stream is the least significant bit of byte 0). Used by the all-gather route.

* **Headroom lanes** (:func:`plan_lanes`, :func:`pack_lanes` / :func:`unpack_lanes`): codes
  ``k in {0..G}`` of ``N`` workers are packed ``L`` lanes of ``w`` bits to a signed ``W``-bit word so that
  an ordinary integer SUM of the ``N`` packed words (an all-reduce SUM) adds every lane with no carry
  between lanes and no signed overflow. ``w = (N*G).bit_length()`` is the smallest width holding the
  lane sum ``N*G``; ``L`` is the largest count with ``N*G * sum_{i<L} 2^(i*w) <= 2^(W-1) - 1``, i.e. the
  largest possible word sum stays a non-negative value of the signed word dtype.

  Layout (**strided**, chosen because every lane is then one contiguous slice, which is 3-10x faster in
  torch than a column-interleaved layout): with ``nwords = ceil(n / L)``, code ``i`` goes to word
  ``i % nwords``, lane ``i // nwords``; lane ``j`` sits at bit offset ``j * w``. Unused lanes of the last
  lane row are zero.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from tailq.options import check_int

__all__ = [
    "LanePlan",
    "pack_bits",
    "pack_lanes",
    "packed_nbytes",
    "plan_lanes",
    "unpack_bits",
    "unpack_lanes",
]

_LITTLE_ENDIAN = sys.byteorder == "little"
_INT_DTYPES = frozenset(
    {torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64}
    | {d for d in (getattr(torch, n, None) for n in ("uint16", "uint32", "uint64")) if d is not None}
)


# ---------------------------------------------------------------------------------------------------------
# validation helpers


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")


def _check_int_tensor(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _INT_DTYPES:
        raise TypeError(f"{name} must have an integer dtype, got {t.dtype}")


def _check_range(codes: torch.Tensor, high: int, what: str) -> None:
    """Raise ValueError unless every code lies in [0, high]."""
    if codes.numel() == 0:
        return
    lo, hi = torch.aminmax(codes)
    lo_v, hi_v = int(lo), int(hi)
    if lo_v < 0 or hi_v > high:
        raise ValueError(f"codes must lie in [0, {high}] ({what}); found values in [{lo_v}, {hi_v}]")


def _check_n(n: int) -> None:
    check_int("n", n, 0)


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes of the dense packing of ``n`` codes of ``bits`` bits: ``ceil(n * bits / 8)``."""
    _check_bits(bits)
    _check_n(n)
    return (n * bits + 7) // 8


# ---------------------------------------------------------------------------------------------------------
# dense packing


def _padded_u8(codes: torch.Tensor, multiple: int) -> torch.Tensor:
    """Flattened codes as contiguous uint8, zero-padded to a multiple of ``multiple`` (one copy at most)."""
    flat = codes.reshape(-1)
    n = flat.numel()
    padded = -(-n // multiple) * multiple
    if padded == n and flat.dtype == torch.uint8 and flat.is_contiguous():
        return flat
    buf = torch.empty(padded, dtype=torch.uint8, device=codes.device)
    buf[:n] = flat  # casts to uint8 (values already known / promised to be < 256)
    buf[n:] = 0
    return buf


def pack_bits(codes: torch.Tensor, bits: int, *, check: bool = True) -> torch.Tensor:
    """Pack integer codes in ``[0, 2^bits)`` densely into a 1-D uint8 tensor of ``ceil(n*bits/8)`` bytes.

    ``codes`` may have any shape (it is flattened in row-major order) and any integer dtype. Bit order is
    little-endian: code ``i`` occupies bits ``[i*bits, (i+1)*bits)`` of the byte stream. ``check=False``
    skips the value-range validation (one reduction over the codes) for the hot path; out-of-range codes
    then give unspecified output.
    """
    _check_bits(bits)
    _check_int_tensor(codes, "codes")
    if check:
        _check_range(codes, (1 << bits) - 1, f"bits={bits}")
    n = codes.numel()
    nbytes = (n * bits + 7) // 8
    device = codes.device
    if n == 0:
        return torch.empty(0, dtype=torch.uint8, device=device)

    if bits == 8:
        out = torch.empty(n, dtype=torch.uint8, device=device)
        out.copy_(codes.reshape(-1))
        return out

    if 8 % bits == 0:  # 1, 2, 4: k codes per byte, shifts in uint8 (no overflow: code << s < 256)
        k = 8 // bits
        v = _padded_u8(codes, k).view(-1, k)
        out = v[:, 0].clone()
        for j in range(1, k):
            out |= v[:, j] << (j * bits)
        return out

    # 3, 5, 6, 7: 8 codes -> one int64 group of 8*bits <= 56 bits -> `bits` bytes
    v = _padded_u8(codes, 8).view(-1, 8)
    g = torch.empty(v.shape[0], dtype=torch.int64, device=device)  # fresh, so strides are (1,)
    g.copy_(v[:, 0])
    for j in range(1, 8):
        g |= v[:, j].to(torch.int64) << (j * bits)
    if _LITTLE_ENDIAN:
        by = g.view(torch.uint8).view(-1, 8)[:, :bits]
    else:  # pragma: no cover - big-endian hosts
        shifts = torch.arange(bits, device=device, dtype=torch.int64) * 8
        by = ((g[:, None] >> shifts) & 0xFF).to(torch.uint8)
    flat = by.reshape(-1)  # a fresh contiguous copy (`by` is a strided view of `g`)
    return flat if flat.numel() == nbytes else flat[:nbytes].clone()


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` codes as a 1-D uint8 tensor (caller converts dtype).

    ``packed`` must be a uint8 tensor with exactly ``ceil(n*bits/8)`` elements (any shape; flattened).
    """
    _check_bits(bits)
    _check_n(n)
    _check_int_tensor(packed, "packed")
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be a torch.uint8 tensor, got {packed.dtype}")
    nbytes = (n * bits + 7) // 8
    if packed.numel() != nbytes:
        raise ValueError(
            f"packed has {packed.numel()} bytes but {n} codes of {bits} bits need ceil(n*bits/8) = {nbytes}"
        )
    device = packed.device
    p = packed.reshape(-1)
    if n == 0:
        return torch.empty(0, dtype=torch.uint8, device=device)
    if bits == 8:
        return p.clone()

    mask = (1 << bits) - 1
    if 8 % bits == 0:  # 1, 2, 4
        k = 8 // bits
        m = -(-n // k)  # == nbytes
        out = torch.empty(m, k, dtype=torch.uint8, device=device)
        out[:, 0] = p & mask
        for j in range(1, k):
            out[:, j] = (p >> (j * bits)) & mask
        return out.view(-1)[:n]

    # 3, 5, 6, 7: `bits` bytes -> one int64 group -> 8 codes
    m = -(-n // 8)
    b = torch.zeros(m, 8, dtype=torch.uint8, device=device)
    grp = b[:, :bits]
    if nbytes == m * bits:
        grp.copy_(p.view(m, bits))
    else:  # last group is short: pad the byte stream with zeros
        full = torch.zeros(m * bits, dtype=torch.uint8, device=device)
        full[:nbytes] = p
        grp.copy_(full.view(m, bits))
    if _LITTLE_ENDIAN:
        g = b.view(torch.int64).view(-1)
    else:  # pragma: no cover - big-endian hosts
        shifts = torch.arange(8, device=device, dtype=torch.int64) * 8
        g = (b.to(torch.int64) << shifts).sum(dim=1)
    out = torch.empty(m, 8, dtype=torch.uint8, device=device)
    out[:, 0] = g & mask
    for j in range(1, 8):
        out[:, j] = (g >> (j * bits)) & mask
    return out.view(-1)[:n]


# ---------------------------------------------------------------------------------------------------------
# headroom lanes


def _max_lanes(total: int, lane_bits: int, word_bits: int) -> int:
    """Largest L with ``total * sum_{i<L} 2^(i*lane_bits) <= 2^(word_bits-1) - 1`` (exact integers)."""
    limit = (1 << (word_bits - 1)) - 1
    lanes, acc = 0, 0
    while True:
        nxt = acc + (total << (lanes * lane_bits))
        if nxt > limit:
            return lanes
        acc = nxt
        lanes += 1


@dataclass(frozen=True)
class LanePlan:
    """How codes in ``{0..grid}`` of ``n_workers`` workers are packed into summable signed words."""

    n_workers: int
    grid: int  # each worker's code k is in {0..grid}
    lane_bits: int  # w = (n_workers * grid).bit_length()
    word_bits: int  # 32 or 64
    lanes_per_word: int  # L

    @property
    def dtype(self) -> torch.dtype:
        return torch.int32 if self.word_bits == 32 else torch.int64

    @property
    def bits_per_coord(self) -> float:
        return self.word_bits / self.lanes_per_word

    @property
    def max_sum(self) -> int:
        """Largest value of one lane after the SUM: ``n_workers * grid``."""
        return self.n_workers * self.grid

    @property
    def max_word(self) -> int:
        """Largest possible summed word (every worker sends ``grid`` in every lane)."""
        return sum(self.max_sum << (i * self.lane_bits) for i in range(self.lanes_per_word))

    def words_for(self, n: int) -> int:
        """Words needed for ``n`` codes: ``ceil(n / lanes_per_word)``."""
        _check_n(n)
        return -(-n // self.lanes_per_word)


def plan_lanes(n_workers: int, grid: int, word_bits: int | None = None) -> LanePlan:
    """Plan headroom lanes for a SUM over ``n_workers`` of codes in ``{0..grid}`` (SPEC §6.1).

    ``word_bits`` 32 or 64; ``None`` picks whichever gives fewer bits per coordinate (tie -> 32).
    Example: ``plan_lanes(4, 7)`` -> w = 5, 6 lanes per int32 word, 5.33 bits per coordinate.
    """
    check_int("n_workers", n_workers, 1)
    check_int("grid", grid, 1)
    if word_bits is not None and word_bits not in (32, 64):
        raise ValueError(f"word_bits must be 32, 64 or None, got {word_bits!r}")
    total = n_workers * grid
    w = total.bit_length()
    candidates = (32, 64) if word_bits is None else (word_bits,)
    best: LanePlan | None = None
    for wb in candidates:
        lanes = _max_lanes(total, w, wb)
        if lanes == 0:
            continue
        plan = LanePlan(n_workers=n_workers, grid=grid, lane_bits=w, word_bits=wb, lanes_per_word=lanes)
        if best is None or plan.bits_per_coord < best.bits_per_coord:
            best = plan
    if best is None:
        where = f"a signed {word_bits}-bit word" if word_bits is not None else "a signed 64-bit word"
        raise ValueError(
            f"n_workers * grid = {n_workers} * {grid} = {total} needs {w}-bit lanes; not even one lane fits "
            f"in {where} without overflow"
        )
    return best


def pack_lanes(codes: torch.Tensor, plan: LanePlan, *, check: bool = True) -> torch.Tensor:
    """Pack codes in ``{0..plan.grid}`` into ``plan.words_for(n)`` words of ``plan.dtype`` (strided layout).

    Code ``i`` goes to word ``i % nwords``, lane ``i // nwords`` (bit offset ``lane * plan.lane_bits``).
    The arithmetic runs in the word dtype directly: every shifted code is at most
    ``grid * 2^(j*w) <= plan.max_word < 2^(word_bits-1)``, so nothing overflows even in int32.
    ``check=False`` skips the range validation.
    """
    _check_int_tensor(codes, "codes")
    if check:
        _check_range(codes, plan.grid, f"grid={plan.grid}")
    flat = codes.reshape(-1)
    n = flat.numel()
    nw = plan.words_for(n)
    dt = plan.dtype
    w = plan.lane_bits
    words = torch.zeros(nw, dtype=dt, device=codes.device)
    for j in range(plan.lanes_per_word):
        row = flat[j * nw : (j + 1) * nw]
        cnt = row.numel()
        if cnt == 0:
            break
        if j == 0:
            words[:cnt] = row
        else:
            if row.dtype == dt:
                t = row << (j * w)  # out of place: never modify the caller's codes
            else:
                t = row.to(dt)  # a fresh copy, safe to shift in place
                t <<= j * w
            words[:cnt] |= t
    return words


def unpack_lanes(words: torch.Tensor, plan: LanePlan, n: int, *, check: bool = True) -> torch.Tensor:
    """Extract the ``n`` lane values (e.g. the all-reduced sums, up to ``plan.max_sum``) as int64.

    Inverse of :func:`pack_lanes` for the same ``n``. ``words`` must hold exactly ``plan.words_for(n)``
    elements. With ``check`` (default) a negative word, the sign of a signed overflow, raises ValueError.
    """
    _check_n(n)
    _check_int_tensor(words, "words")
    nw = plan.words_for(n)
    flat = words.reshape(-1)
    if flat.numel() != nw:
        raise ValueError(
            f"words has {flat.numel()} elements but {n} codes at {plan.lanes_per_word} lanes per word "
            f"need {nw}"
        )
    if check and nw and int(flat.min()) < 0:
        raise ValueError("words contain a negative value: the summed words overflowed the lane plan")
    if flat.dtype not in (torch.int32, torch.int64):
        flat = flat.to(torch.int64)
    w = plan.lane_bits
    mask = (1 << w) - 1
    out = torch.empty(n, dtype=torch.int64, device=words.device)
    for j in range(plan.lanes_per_word):
        row = out[j * nw : (j + 1) * nw]
        cnt = row.numel()
        if cnt == 0:
            break
        src = flat[:cnt]
        if j == 0:
            row.copy_(src)
        else:
            row.copy_(src >> (j * w))
        row &= mask
    return out
