"""Absmax-scaled small formats for outer (pseudo-)gradients: torchft's rowwise FP8 and Streaming DiLoCo's FP4
(SPEC §4.1).

Both split the flat bucket into blocks ("rows") of a fixed length (the last may be shorter), send one float32 scale
per block and one small code per coordinate, and decode code × scale. The block's largest |x| maps onto the code's
largest value, so nothing is clipped; rounding is to the nearest code, deterministic and therefore biased
(``unbiased = False``; the seed and the generator are accepted and ignored).

Scale: s = absmax / top **rounded up** to float32 (top = the code's largest magnitude), so |x|/s ≤ top holds
exactly and no code ever saturates; an all-zero block sends s = 0 and decodes to zeros. A block with
max|x| < top·2^−126 gets a subnormal s with fewer significant bits: the bounds below hold with that s, and rounding
it up costs at most top·2^−149 more. The decode is the float32 product code·s (one rounding), clamped to ±float32's
largest value (reached only by a block whose absmax is within one unit of it).

Wire format: the codes (``fp8``: one byte each, n bytes; ``fp4``: 4-bit codes packed two per byte, ⌈n/2⌉ bytes)
plus ⌈n/B⌉ float32 scales: bits per coordinate = (8·bytes + 32·⌈n/B⌉)/n, e.g. 8 + 32/1024 = 8.03 for ``fp8``
at its default row length and 4 + 32/128 = 4.25 for ``fp4`` at its default block length.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from .base import FLOAT32_MAX, Compressor, Encoded, Option, check_input, register
from .packing import pack_bits, unpack_bits
from .scales import round_up_f32

__all__ = ["FP4", "FP8", "block_scales"]


def block_scales(flat: torch.Tensor, block: int, top: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, s): the flat float32 tensor as a (blocks, block) matrix of y = x / s (zero-padded), and the float32
    per-block scales s = max|x| / top rounded up (so |y| ≤ top exactly; s = 0 for an all-zero block, whose y is 0).
    """
    n = flat.numel()
    b = min(block, n)
    nb = -(-n // b)
    pad = nb * b - n
    v = (torch.nn.functional.pad(flat, (0, pad)) if pad else flat).view(nb, b)
    absmax = v.abs().amax(dim=1).to(torch.float64)
    s = round_up_f32(absmax / top, "block scale")
    short = s.to(torch.float64) * top < absmax  # the float64 quotient rounded down past a float32: one step up
    if bool(short.any()):
        s = torch.where(short, torch.nextafter(s, torch.full_like(s, math.inf)), s)
    y = v / torch.where(s > 0, s, torch.ones_like(s)).unsqueeze(1)
    return y, s


def _scaled_decode(q: torch.Tensor, scales: torch.Tensor, block: int, n: int, top: float) -> torch.Tensor:
    """The flat float32 decode q·s (q: the n decoded code values), clamped to ±FLOAT32_MAX when a scale could
    overflow it."""
    b = min(block, n)
    dec = q * scales.to(torch.float32).repeat_interleave(b)[:n]
    if scales.numel() and float(scales.abs().max()) * top > FLOAT32_MAX:
        dec.clamp_(-FLOAT32_MAX, FLOAT32_MAX)
    return dec


@register
class FP8(Compressor):
    """torchft's DiLoCo outer quantization: rowwise absmax scale, values cast to FP8 e4m3 (or int8).

    What we follow, from ``torchft/quantization.py`` (pytorch/torchft, read at commit 73dafea, 2025-10-21):

    * **code**: ``float8_e4m3fn`` (1 sign, 4 exponent, 3 mantissa bits, bias 7, no infinities; largest 448;
      subnormals down to 2^−9) where the GPU has it (sm90+), else int8 with largest 127 (``format="int8"``);
    * **scale**: one float32 per row from the row's max |x|. torchft stores the reciprocal 448/absmax (1 where the
      row is zero) and decodes by dividing; we store s = absmax/448 rounded up to float32 and decode by multiplying
      (the same values up to one float32 rounding, and |x|/s ≤ 448 exactly);
    * **rounding**: the float32 → e4m3 cast, round to nearest, ties to even (Triton's default downcast rounding,
      and torch's ``.to(torch.float8_e4m3fn)``, used here); deterministic, so biased: ``unbiased = False``. For
      ``int8`` we round to nearest, ties to even (``torch.round``) — torchft's int8 fallback is a Triton
      float → int8 cast, which truncates toward zero (twice the worst-case error, and biased toward zero);
    * **rows**: torchft quantizes each 2-D tensor row by row (its last dimension). A flat bucket has no rows, so
      ``row_length`` (default 1024) sets them. (torchft turns a 1-D tensor — its bucketized path's flat buffer
      included — into an (n, 1) matrix: one scale per element, 8 bytes per element with its 4-byte row alignment.)

    Collective: ``route="twophase"`` is torchft's (each rank's N shards encoded on their own and sent by an
    all-to-all, the owner's float32 mean re-encoded in FP8, an all-gather; the mean is rounded twice, and the
    traffic is 2·(N − 1)/N·8.03 bits per coordinate); ``route="allgather"`` gathers every rank's encoding instead
    ((N − 1)·8.03 bits, one rounding). ``route="auto"`` prices both against bf16 (``requantizable``).

    Error: |x − decode| ≤ s·u(x/s) (+ float32 rounding) with u(y) half an e4m3 ULP at |y|: 2^(⌊log2|y|⌋ − 4)
    for |y| ≥ 2^−6, 2^−10 below (values under s·2^−10 flush to 0); int8: ≤ s/2.
    Wire: n code bytes (uint8: the e4m3 bit pattern; or int8) + ⌈n/row_length⌉ float32 scales.
    """

    name = "fp8"
    summary = "rowwise absmax scale (float32 per row) + FP8 e4m3 (or int8) codes, round to nearest (torchft)"
    paper = "torchft (pytorch/torchft, torchft/quantization.py): DiLoCo outer all-reduce in FP8"
    unbiased = False
    fixed_bits = 8
    requantizable = True
    options: ClassVar[dict[str, Option]] = {
        "format": Option(str, "e4m3", "code: e4m3 (float8_e4m3fn, largest 448) or int8 (largest 127)",
                         choices=("e4m3", "int8")),
        "row_length": Option(int, 1024, "coordinates per row (one float32 absmax scale each)", 1, 2**31),
    }
    format_options: ClassVar[tuple[str, ...]] = ("format", "row_length")
    format: str
    row_length: int

    @property
    def top(self) -> float:
        """The code's largest magnitude: 448 (e4m3) or 127 (int8)."""
        return 448.0 if self.format == "e4m3" else 127.0

    def encode(self, x: torch.Tensor, *, generator: Any = None) -> Encoded:
        """Deterministic: ``generator`` is accepted for the common interface and ignored."""
        flat = check_input(x)
        n = flat.numel()
        if n == 0:
            return self._empty(x)
        y, scales = block_scales(flat, self.row_length, self.top)
        if self.format == "e4m3":
            q = y.to(torch.float8_e4m3fn).view(torch.uint8)
        else:
            q = torch.round(y).to(torch.int8)
        codes = q.reshape(-1)[:n].contiguous()
        return Encoded({"codes": codes, "scales": scales}, x.shape, x.dtype, {"rows": scales.numel()})

    def decode(self, enc: Encoded) -> torch.Tensor:
        n = enc.numel
        if n == 0:
            return torch.zeros(enc.shape, dtype=torch.float32)
        codes = enc.tensors["codes"]
        if self.format == "e4m3":
            q = codes.view(torch.float8_e4m3fn).to(torch.float32)
        else:
            q = codes.to(torch.float32)
        return _scaled_decode(q, enc.tensors["scales"], self.row_length, n, self.top).reshape(enc.shape)


# 4-bit float magnitudes by code 0..7 (the sign is bit 3), scaled so that the largest is the block's scale unit
_FP4_LEVELS: dict[str, tuple[float, ...]] = {
    # E3M0: 1 sign, 3 exponent bits, no mantissa, no infinities; exponent code 0 is zero, code c = 1..7 is
    # 2^(c − 7) (bias 7: the top code is 1 = the block's absmax; any other bias is the same format under the scale)
    "e3m0": (0.0, 2.0**-6, 2.0**-5, 2.0**-4, 2.0**-3, 2.0**-2, 2.0**-1, 1.0),
    # E2M1 (OCP MX FP4): 1 sign, 2 exponent bits (bias 1), 1 mantissa bit; ±{0, 0.5, 1, 1.5, 2, 3, 4, 6}
    "e2m1": (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0),
}


@register
class FP4(Compressor):
    """Streaming DiLoCo's 4-bit float outer gradients: blockwise absmax scale + a 4-bit float code.

    Format: Streaming DiLoCo (Douillard et al., arXiv 2501.18512) communicates its outer gradients in a 4-bit float
    and accumulates in float32. Which 4-bit float: **E3M0** (1 sign, 3 exponent, 0 mantissa bits), as two sources
    found through the search index name it — a survey table of pseudo-gradient compression listing "FP4 (E3M0)
    pseudo-grads" for arXiv 2501.18512, and an MLX re-implementation of Streaming DiLoCo whose quantizer is
    ``_quantize_e3m0``. The paper's own text on the format was not readable in the index (only its abstract), and
    neither source gives a scale or its granularity: the **per-block float32 absmax scale, block length 128, and
    round to nearest are our reading**. ``format="e2m1"`` is the OCP MX FP4 element (±{0, 0.5, 1, 1.5, 2, 3, 4, 6});
    its scale here is again a float32 absmax per block (MX itself uses a power-of-two E8M0 scale per 32 values).

    Levels (×s): E3M0 {0, 2^−6, …, 2^−1, 1} with s = the block's max |x|; E2M1 {0, 0.5, …, 4, 6} with
    s = max|x|/6 rounded up to float32. Rounding: to the nearest level of |x|/s, ties to the even code (IEEE round
    to nearest even); the sign bit is set for x < 0. Deterministic: ``unbiased = False``.

    Error: |x − decode| ≤ s·(half the gap between the two levels around |x|/s) (+ float32 rounding): E3M0
    ≤ s·2^(⌊log2(|x|/s)⌋ − 1) for |x| ≥ s·2^−6 and ≤ s·2^−7 below (|x| < s·2^−7 flushes to 0) — half the value
    itself at worst; E2M1 ≤ 0.25·s on [0, 2], 0.5·s on [2, 4], 1·s on [4, 6].
    Wire: 4-bit codes packed two per byte (⌈n/2⌉ bytes) + ⌈n/block_size⌉ float32 scales.
    """

    name = "fp4"
    summary = "blockwise absmax scale (float32 per block) + 4-bit float codes, E3M0 or E2M1 (Streaming DiLoCo)"
    paper = "Douillard et al. 2025, Streaming DiLoCo (arXiv 2501.18512): 4-bit float outer gradients"
    unbiased = False
    fixed_bits = 4
    requantizable = True
    options: ClassVar[dict[str, Option]] = {
        "format": Option(str, "e3m0", "4-bit float: e3m0 (levels 2^-6..1, and 0) or e2m1 (OCP MX: 0.5..6, and 0)",
                         choices=tuple(_FP4_LEVELS)),
        "block_size": Option(int, 128, "coordinates per block (one float32 absmax scale each)", 1, 2**31),
    }
    format_options: ClassVar[tuple[str, ...]] = ("format", "block_size")
    format: str
    block_size: int

    def levels(self, device: torch.device | None = None) -> torch.Tensor:
        """The 8 float32 magnitudes of codes 0..7 (in units of the block scale)."""
        return torch.tensor(_FP4_LEVELS[self.format], dtype=torch.float32, device=device)

    def encode(self, x: torch.Tensor, *, generator: Any = None) -> Encoded:
        """Deterministic: ``generator`` is accepted for the common interface and ignored."""
        flat = check_input(x)
        n = flat.numel()
        if n == 0:
            return self._empty(x)
        lv = self.levels(flat.device)
        y, scales = block_scales(flat, self.block_size, float(lv[-1]))
        y = y.reshape(-1)[:n]
        mag = y.abs()
        mids = (lv[:-1] + lv[1:]) / 2  # exact in float32 (dyadic levels)
        k = torch.bucketize(mag, mids, right=True)  # how many midpoints are <= |y|: ties go up ...
        tie = (k % 2 == 1) & (mag == mids[(k - 1).clamp(min=0)])
        k -= tie.to(k.dtype)  # ... except onto an odd code: ties to even
        codes = k + (y < 0).to(k.dtype) * 8
        return Encoded({"codes": pack_bits(codes, 4, check=False), "scales": scales}, x.shape, x.dtype,
                       {"blocks": scales.numel()})

    def decode(self, enc: Encoded) -> torch.Tensor:
        n = enc.numel
        if n == 0:
            return torch.zeros(enc.shape, dtype=torch.float32)
        codes, scales = enc.tensors["codes"], enc.tensors["scales"]
        lv = self.levels(codes.device)
        lut = torch.cat([lv, -lv])
        q = lut[unpack_bits(codes, 4, n).to(torch.int64)]
        return _scaled_decode(q, scales, self.block_size, n, float(lv[-1])).reshape(enc.shape)
