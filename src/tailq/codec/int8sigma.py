"""INTELLECT-1's outer int8 quantization: 256 uniform bins over ±k·σ, each decoded to the mean of its values
(SPEC §4.1).

S. Jaghouar, J. M. Ong, M. Basra, F. Obeid, J. Straube, M. Keiblinger, E. Bakouch, L. Atkins, M. Panahi,
C. Goddard, M. Ryabinin, J. Hagemann, *INTELLECT-1 Technical Report*, arXiv 2412.01152 (2024): DiLoCo with a
custom int8 all-reduce of the pseudo-gradients. What we follow is its code, prime's ``uniform_8bit_quantize``
(``src/zeroband/C/csrc/compress.cpp`` and ``src/zeroband/compression.py`` of PrimeIntellect-ai/prime, adapted
there from hivemind's ``Uniform8BitQuantization``; read in the fork CloudEngineHub/prime, since the upstream
repository now holds another project):

* σ = ‖x‖₂ / √(n − 1) — the root mean square with Bessel's n − 1, *not* centred (the centring is commented out);
* bin width Δ = RANGE_IN_SIGMAS·σ / 256 with RANGE_IN_SIGMAS = 6: the 256 bins span 6σ in all, ±3σ. Our option
  ``clip_sigma`` = k is the half-width: Δ = 2kσ/256, default k = 3 (the repository's value);
* code c = clamp(round(x/Δ), −128, 127) + 128 ∈ {0..255} (``std::round``: ties away from zero). Bins 1..254 hold
  x/Δ ∈ (−127.5, 126.5); bin 0 collects everything from −127.5·Δ ≈ −kσ down and bin 255 everything from
  126.5·Δ ≈ +0.99·kσ up — that is the clipping;
* lookup table: per bin the mean of the values that fell into it (0 for an empty bin), 256 float32; the receiver
  decodes table[c]. The table is sent: 1024 bytes per encoding.

Our choices beyond that: σ and the bin sums are computed in float64 (the repository: float32), Δ is rounded to
float32 as the repository passes it, and x/Δ is one float32 division (the repository multiplies by a float32
1/Δ: the two can differ only for a value within a float32 rounding of a bin edge); n = 1 uses n − 1 → 1. A bucket
whose Δ is 0 (all zeros, or σ so small that Δ underflows float32) puts every value in bin 128.

Not unbiased (``unbiased = False``): the decode is deterministic and equals the bin's mean, not x. Within the
interior bins |x − decode| ≤ Δ (x and the mean of its bin lie in the same bin of width Δ; half a bin from the bin's
centre would hold for centre decoding, not for the mean); an end bin's values decode to their common mean, so a
single outlier pulls its whole end bin (the clipping is not a truncation at ±kσ, and ``target(x)`` is x).
The per-bin mean minimises the squared error of that bin among all single decode values.

Wire format: n uint8 codes + 256 float32 means: bits per coordinate = 8 + 8192/n (8.125 at n = 2^16).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from .base import Compressor, Encoded, Option, check_input, register

__all__ = ["Int8Sigma"]

N_BINS = 256
ZERO_CODE = N_BINS // 2  # the repository's zero point: code 128 holds x/Δ in [-0.5, 0.5]


@register
class Int8Sigma(Compressor):
    """INTELLECT-1 (Jaghouar et al. 2024): 256 bins of width 2kσ/256, decoded to per-bin means; see module doc."""

    name = "int8sigma"
    summary = "256 uniform bins on +-clip_sigma*sigma (outside: the end bins), decoded to each bin's mean (INTELLECT-1)"
    paper = "Jaghouar et al. 2024, INTELLECT-1 Technical Report (arXiv 2412.01152); prime's uniform_8bit_quantize"
    unbiased = False
    fixed_bits = 8
    requantizable = True
    options: ClassVar[dict[str, Option]] = {
        "clip_sigma": Option(
            float, 3.0, "the 256 bins span +-clip_sigma * sigma (sigma = ||x|| / sqrt(n - 1)); beyond: the end bins",
            0.0, 1e6, low_open=True,
        ),
    }
    format_options: ClassVar[tuple[str, ...]] = ()  # the receiver only looks codes up in the sent table
    clip_sigma: float

    def sigma(self, flat: torch.Tensor) -> float:
        """‖x‖₂ / √max(n − 1, 1) in float64 (the repository's "unbiased std", uncentred)."""
        n = flat.numel()
        return float(torch.linalg.vector_norm(flat, dtype=torch.float64)) / math.sqrt(max(n - 1, 1))

    def bin_width(self, flat: torch.Tensor) -> float:
        """Δ = 2·clip_sigma·σ / 256 rounded to float32 (as a Python float)."""
        return float(torch.tensor(2.0 * self.clip_sigma * self.sigma(flat) / N_BINS, dtype=torch.float32))

    def codes(self, flat: torch.Tensor, delta: float) -> torch.Tensor:
        """uint8 codes clamp(round(x/Δ), −128, 127) + 128, ties away from zero (all 128 when Δ = 0)."""
        if delta == 0.0:
            return torch.full((flat.numel(),), ZERO_CODE, dtype=torch.uint8, device=flat.device)
        y = flat / delta  # finite for finite x unless Δ is tiny: ±inf then clamps into the end bins
        t = torch.trunc(y)
        r = torch.where((y - t).abs() >= 0.5, t + torch.sign(y), t)  # exact: y − trunc(y) is exact in float32
        return (r.clamp_(-ZERO_CODE, ZERO_CODE - 1) + ZERO_CODE).to(torch.uint8)

    def encode(self, x: torch.Tensor, *, generator: Any = None) -> Encoded:
        """Deterministic: ``generator`` is accepted for the common interface and ignored."""
        flat = check_input(x)
        n = flat.numel()
        if n == 0:
            return self._empty(x)
        delta = self.bin_width(flat)
        codes = self.codes(flat, delta)
        idx = codes.to(torch.int64)
        sums = torch.bincount(idx, weights=flat.to(torch.float64), minlength=N_BINS)
        counts = torch.bincount(idx, minlength=N_BINS)
        table = torch.where(counts > 0, sums / counts.clamp(min=1), torch.zeros_like(sums)).to(torch.float32)
        return Encoded({"codes": codes, "table": table}, x.shape, x.dtype, {"bin_width": delta})

    def decode(self, enc: Encoded) -> torch.Tensor:
        n = enc.numel
        if n == 0:
            return torch.zeros(enc.shape, dtype=torch.float32)
        table = enc.tensors["table"].to(torch.float32)
        return table[enc.tensors["codes"].to(torch.int64)].reshape(enc.shape)
