"""QSGD and NUQSGD: bucketed L2-norm quantizers with a signed code (SPEC §4).

* QSGD — D. Alistarh, D. Grubic, J. Li, R. Tomioka, M. Vojnovic, *QSGD: Communication-Efficient SGD via
  Gradient Quantization and Encoding*, NeurIPS 2017.
* NUQSGD — A. Ramezani-Kebrya, F. Faghri, I. Markov, V. Aksenov, D. Alistarh, D. M. Roy, *NUQSGD: Provably
  Communication-efficient Data-parallel SGD via Nonuniform Quantization*, JMLR 2021.

Per bucket v of ``bucket_size`` coordinates (the last may be shorter) the sender transmits ‖v‖₂ and, per
coordinate, a signed code c ∈ {−s..s}, s = 2^(bits−1) − 1, that stochastically rounds r_i = |v_i|/‖v‖ to
the magnitude levels (uniform {0, 1/s, …, 1} for QSGD; {0, 2^−(s−1), …, ½, 1} for NUQSGD), with rounding
probabilities from the real distances between levels, so E[decode] = v.

Wire format (identical for both): the codes c + s ∈ {0..2s} packed at ``bits`` bits each (no padding codes:
exactly ceil(n·bits/8) bytes), plus one float32 norm per bucket:
bits per coordinate = (8·ceil(n·bits/8) + 32·ceil(n/bucket_size)) / n  (≈ bits + 32/bucket_size).

The norm is rounded *up* to float32 so r_i ≤ 1 holds exactly; encode and decode use the same float32 norm,
which keeps the estimate unbiased. A norm beyond float32's range (a bucket of values near its largest value) is
sent as that largest value instead: a scale S ≥ every |v_i| below ‖v‖, so r_i ≤ 1 still holds, the estimate stays
unbiased and the variance only shrinks (each term ≤ S²/(4s²) — the bounds below with S in place of ‖v‖ hold a
fortiori); every decoded value S·level stays finite.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import torch

from tailq.kernels import RandKey, baselines

from .base import FLOAT32_MAX, Compressor, Encoded, Option, check_input, register
from .codebook import stochastic_round_levels, stochastic_round_uniform
from .packing import pack_bits, unpack_bits
from .scales import round_up_f32

__all__ = ["NUQSGD", "QSGD"]


class _BucketNormQuantizer(Compressor):
    """Shared bucketing, norms, signs and packing; subclasses choose the magnitude levels."""

    fast_paths = True  # tailq.kernels.baselines

    unbiased = True
    counter_randomness = True  # rounds through stochastic_round_* (a RandKey works)
    options: ClassVar[dict[str, Option]] = {
        "bits": Option(
            int, 4, "total code bits per coordinate (signed code in {-s..s}, s = 2^(bits-1) - 1)", 2, 8
        ),
        "bucket_size": Option(int, 512, "coordinates per bucket (one float32 L2 norm each)", 1, 2**31),
    }
    format_options: ClassVar[tuple[str, ...]] = ("bits", "bucket_size")
    bits: int
    bucket_size: int

    @property
    def s(self) -> int:
        """Number of non-zero magnitude levels."""
        return 2 ** (self.bits - 1) - 1

    @abc.abstractmethod
    def _round(self, r: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Stochastically round r ∈ [0, 1] to a magnitude level; int64 level index k ∈ {0..s}."""

    @abc.abstractmethod
    def _magnitude(self, k: torch.Tensor) -> torch.Tensor:
        """float32 magnitude level of index k."""

    def _fast_levels(self) -> torch.Tensor | None:
        """What the fused kernels round onto: None for QSGD's uniform levels, the float32 levels otherwise."""
        return None

    def _layout(self, n: int) -> tuple[int, int]:
        b = min(self.bucket_size, n)
        return b, -(-n // b)

    def norms(self, flat: torch.Tensor) -> torch.Tensor:
        """Per-bucket float32 L2 norms of the flat float32 tensor: float64 norms rounded up to float32.

        Every path uses this same torch reduction (its float64 rounding depends on torch's summation order).
        """
        n = flat.numel()
        b, nb = self._layout(n)
        pad = nb * b - n
        v = torch.nn.functional.pad(flat, (0, pad)) if pad else flat
        norm64 = torch.linalg.vector_norm(v.view(nb, b), dim=1, dtype=torch.float64)
        # a norm beyond float32 (values near its top) is sent as float32's largest value: still >= every |v_i|
        return round_up_f32(norm64.clamp_(max=FLOAT32_MAX), f"{self.name}: bucket L2 norm")

    def encode(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> Encoded:
        """``generator``: a ``torch.Generator`` or a :class:`~tailq.kernels.RandKey`; with a key the rounding,
        sign and packing run fused where a fast path exists (:mod:`tailq.kernels.baselines`), same bytes."""
        flat = check_input(x)
        n = flat.numel()
        if n == 0:
            return self._empty(x)
        b, nb = self._layout(n)
        norms = self.norms(flat)
        info: dict[str, Any] = {"buckets": nb, "bucket_size": b}
        if isinstance(generator, RandKey):
            packed = baselines.qsgd_encode(flat, norms, generator, self.bits, b, self._fast_levels())
            if packed is not None:
                return Encoded({"codes": packed, "norms": norms}, x.shape, x.dtype, info)
        ne = norms.repeat_interleave(b)[:n]
        r = flat.abs() / torch.where(ne > 0, ne, torch.ones_like(ne))
        k = self._round(r, self._gen(generator))
        codes = torch.where(flat < 0, -k, k) + self.s
        return Encoded(
            {"codes": pack_bits(codes, self.bits, check=False), "norms": norms}, x.shape, x.dtype, info
        )

    def decode(self, enc: Encoded, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 decode shaped like the input; ``out``: a float32 tensor of as many elements to write into."""
        n = enc.numel
        if n == 0:
            return torch.zeros(enc.shape, dtype=torch.float32) if out is None else out.reshape(enc.shape)
        b, _ = self._layout(n)
        codes, norms = enc.tensors["codes"], enc.tensors["norms"]
        fo = baselines.flat_out(out, n)
        if out is None or fo is not None:
            fast = baselines.qsgd_decode(codes, norms, self.bits, b, n, self._fast_levels(), fo)
            if fast is not None:
                return fast.reshape(enc.shape)
        c = unpack_bits(codes, self.bits, n).to(torch.int64) - self.s
        mag = self._magnitude(c.abs())
        ne = norms.to(torch.float32).repeat_interleave(b)[:n]
        dec = (torch.where(c < 0, -mag, mag) * ne).reshape(enc.shape)
        return dec if out is None else out.copy_(dec.reshape(out.shape)).reshape(enc.shape)


@register
class QSGD(_BucketNormQuantizer):
    """QSGD (Alistarh et al., NeurIPS 2017): s uniform magnitude levels {0, 1/s, …, 1} per bucket.

    Variance: coordinate i of a bucket v contributes ‖v‖²/s²·f_i(1 − f_i), f_i = frac(s·r_i); per bucket
    E‖Q(v) − v‖² ≤ min(d_b/s², √d_b/s)·‖v‖² (Lemma 3.1 of the paper), d_b the bucket length.
    Wire format: see the module docstring (bits + 32/bucket_size bits per coordinate).
    """

    name = "qsgd"
    summary = "bucketed L2 norm + signed b-bit code, uniform magnitude levels {0, 1/s, ..., 1}"
    paper = "Alistarh et al. 2017, QSGD (NeurIPS)"

    def _round(self, r: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return stochastic_round_uniform(r * float(self.s), 0.0, 1.0, self.s, generator)

    def _magnitude(self, k: torch.Tensor) -> torch.Tensor:
        return k.to(torch.float32) / float(self.s)


@register
class NUQSGD(_BucketNormQuantizer):
    """NUQSGD (Ramezani-Kebrya et al., JMLR 2021): magnitude levels {0, 2^−(s−1), …, ¼, ½, 1}.

    s exponentially spaced levels above 0; r ∈ [l_j, l_{j+1}] goes up with probability
    (r − l_j)/(l_{j+1} − l_j). Variance per coordinate ‖v‖²·(l_{j+1} − r)(r − l_j), which is ≤ ‖v‖²·r²/8
    on the doubling intervals and ≤ ‖v‖²·2^−(s−1)·r on [0, 2^−(s−1)], so per bucket
    E‖Q(v) − v‖² ≤ (1/8 + 2^−(s−1)·min(√d_b, 2^−(s−1)·d_b/4))·‖v‖².
    Wire format: as QSGD (bits + 32/bucket_size bits per coordinate).
    """

    name = "nuqsgd"
    summary = "QSGD with exponentially spaced magnitude levels {0, 2^-(s-1), ..., 1/2, 1}"
    paper = "Ramezani-Kebrya et al. 2021, NUQSGD (JMLR)"

    def levels(self, device: torch.device | None = None) -> torch.Tensor:
        """The s + 1 magnitude levels [0, 2^−(s−1), …, ½, 1] (float32, exact powers of two)."""
        e = torch.arange(-(self.s - 1), 1, dtype=torch.float64)
        lv = torch.cat([torch.zeros(1, dtype=torch.float64), torch.pow(2.0, e)])
        return lv.to(device=device, dtype=torch.float32)

    def _round(self, r: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return stochastic_round_levels(r, self.levels(r.device), generator)

    def _magnitude(self, k: torch.Tensor) -> torch.Tensor:
        return self.levels(k.device)[k]

    def _fast_levels(self) -> torch.Tensor | None:
        return self.levels()
