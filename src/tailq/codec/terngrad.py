"""TernGrad: ternary stochastic gradients with gradient clipping (SPEC §4).

W. Wen, C. Xu, F. Yan, C. Wu, Y. Wang, Y. Chen, H. Li, *TernGrad: Ternary Gradients to Reduce
Communication in Distributed Deep Learning*, NeurIPS 2017.

Per scale group (the whole tensor, or buckets of ``bucket_size``): clip g at c·σ (σ the standard deviation
of the group, c = ``clip_sigma``, 2.5 in the paper), then with scale S = max|g_clipped| send
b_i ∈ {−1, 0, 1} with P(b_i = sign(g_i)) = |g_clipped,i| / S, decode S·b_i. The decode is unbiased for the
*clipped* tensor, so the compressor is ``truncating`` and ``target(x)`` = clamp(x, −c·σ, c·σ).

Our choices: σ is the population standard deviation (divide by the group size) computed in float64 and the
threshold rounded to float32; a constant group (σ = 0) is not clipped — clipping at 0 would erase it.

Wire format: codes b + 1 ∈ {0, 1, 2} packed at 2 bits (ceil(2n/8) bytes) plus one float32 S per group:
bits per coordinate = (8·ceil(n/4) + 32·groups) / n, groups = 1 (``bucket_size=0``) or ceil(n/bucket_size).

Variance per coordinate: S·|g_c| − g_c² ≤ S²/4; per group E‖Q − g_c‖² = S·‖g_c‖₁ − ‖g_c‖².

Randomness: a ``torch.Generator`` (``torch.rand``, the original reference) or a :class:`~tailq.kernels.RandKey`
(counter-based: u_i = :func:`~tailq.kernels.counter_uniform` of element index i, as the codebook rounding uses
it). With a key the clip, scale, codes and packing run fused where a fast path exists
(:mod:`tailq.kernels.baselines`), with the same bytes; the thresholds stay the float64 torch reductions below.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from tailq.kernels import RandKey, baselines, counter_uniform

from .base import Compressor, Encoded, Option, check_input, register
from .packing import pack_bits, unpack_bits

__all__ = ["TernGrad"]


@register
class TernGrad(Compressor):
    """TernGrad (Wen et al., NeurIPS 2017): 2-bit ternary codes, scale max|clip(g, c·σ)|; see module doc."""

    fast_paths = True  # tailq.kernels.baselines

    name = "terngrad"
    summary = "ternary codes {-1, 0, 1} x max|g| after clipping at clip_sigma standard deviations"
    paper = "Wen et al. 2017, TernGrad (NeurIPS)"
    unbiased = True  # for the clipped input, see target()
    fixed_bits = 2  # ternary codes
    truncating = True
    counter_randomness = True  # a RandKey gives the counter uniforms of tailq.kernels.rng
    options: ClassVar[dict[str, Option]] = {
        "clip_sigma": Option(
            float,
            2.5,
            "clip at clip_sigma * std before ternarizing; inf = no clipping",
            0.0,
            math.inf,
            low_open=True,
        ),
        "bucket_size": Option(
            int, 0, "coordinates per scale group (own sigma and scale); 0 = one group per tensor", 0, 2**31
        ),
    }
    format_options: ClassVar[tuple[str, ...]] = ("bucket_size",)  # clip_sigma changes what is sent, not how
    clip_sigma: float
    bucket_size: int

    def _layout(self, n: int) -> tuple[int, int]:
        b = n if self.bucket_size == 0 else min(self.bucket_size, n)
        return b, -(-n // b)

    def _groups(self, flat: torch.Tensor, fill: float) -> torch.Tensor:
        """The tensor as a (groups, group_size) matrix, the last group padded with ``fill``."""
        n = flat.numel()
        b, nb = self._layout(n)
        pad = nb * b - n
        v = torch.nn.functional.pad(flat, (0, pad), value=fill) if pad else flat
        return v.view(nb, b)

    def thresholds(self, flat: torch.Tensor) -> torch.Tensor:
        """Per-group float32 clipping threshold c·σ (inf when not clipping or σ = 0)."""
        _, nb = self._layout(flat.numel())
        if math.isinf(self.clip_sigma):
            return torch.full((nb,), math.inf, dtype=torch.float32, device=flat.device)
        g = self._groups(flat.to(torch.float64), math.nan)
        mean = torch.nanmean(g, dim=1, keepdim=True)
        sigma = torch.nanmean((g - mean) ** 2, dim=1).sqrt()
        thr = (self.clip_sigma * sigma).to(torch.float32)
        return torch.where(sigma > 0, thr, torch.full_like(thr, math.inf))

    def _clip(self, flat: torch.Tensor, thr: torch.Tensor | None = None) -> torch.Tensor:
        b, _ = self._layout(flat.numel())
        thr = self.thresholds(flat) if thr is None else thr
        te = thr.repeat_interleave(b)[: flat.numel()]
        return torch.maximum(torch.minimum(flat, te), -te)

    def target(self, x: torch.Tensor) -> torch.Tensor:
        """clamp(x, −c·σ, c·σ) per group: what the decode estimates without bias."""
        flat = check_input(x)
        if flat.numel() == 0:
            return flat.reshape(x.shape)
        return self._clip(flat).reshape(x.shape)

    def encode(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> Encoded:
        """``generator``: a ``torch.Generator`` or a :class:`~tailq.kernels.RandKey` (see the module doc)."""
        flat = check_input(x)
        n = flat.numel()
        if n == 0:
            return self._empty(x)
        b, nb = self._layout(n)
        info: dict[str, Any] = {"groups": nb}
        thr = self.thresholds(flat)
        if isinstance(generator, RandKey):
            fast = baselines.terngrad_encode(flat, thr, generator, b)
            if fast is not None:
                return Encoded({"codes": fast[0], "scales": fast[1]}, x.shape, x.dtype, info)
        g = self._clip(flat, thr)
        scales = self._groups(g.abs(), 0.0).amax(dim=1)
        se = scales.repeat_interleave(b)[:n]
        p = g.abs() / torch.where(se > 0, se, torch.ones_like(se))
        if isinstance(generator, RandKey):
            u = counter_uniform(n, generator, device=flat.device)
        else:
            u = torch.rand(n, generator=self._gen(generator), dtype=torch.float32, device=flat.device)
        keep = (u < p).to(torch.int64)
        codes = torch.where(g < 0, -keep, keep) + 1
        return Encoded({"codes": pack_bits(codes, 2, check=False), "scales": scales}, x.shape, x.dtype, info)

    def decode(self, enc: Encoded, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 decode shaped like the input; ``out``: a float32 tensor of as many elements to write into."""
        n = enc.numel
        if n == 0:
            return torch.zeros(enc.shape, dtype=torch.float32) if out is None else out.reshape(enc.shape)
        b, _ = self._layout(n)
        codes, scales = enc.tensors["codes"], enc.tensors["scales"]
        fo = baselines.flat_out(out, n)
        if out is None or fo is not None:
            fast = baselines.terngrad_decode(codes, scales, b, n, fo)
            if fast is not None:
                return fast.reshape(enc.shape)
        t = unpack_bits(codes, 2, n).to(torch.float32) - 1.0
        se = scales.to(torch.float32).repeat_interleave(b)[:n]
        dec = (t * se).reshape(enc.shape)
        return dec if out is None else out.copy_(dec.reshape(out.shape)).reshape(enc.shape)
