"""EF-signSGD: scaled sign compression, designed for error feedback (SPEC §4, §5).

S. P. Karimireddy, Q. Rebjock, S. U. Stich, M. Jaggi, *Error Feedback Fixes SignSGD and other Gradient
Compression Schemes*, ICML 2019.

C(v) = (‖v‖₁ / d) · sign(v), with sign(0) = +1 (our choice; it never matters for the decode of a zero
vector, whose scale is 0). Deterministic and biased, so ``unbiased=False``; ``memory=True`` because it is
meant to run inside :class:`~tailq.codec.memory.ErrorFeedback`, which keeps the residual
e ← e + g − C(e + g). The compressor itself is stateless.

Wire format: one bit per coordinate (1 = non-negative), packed (ceil(n/8) bytes), plus the scale as one
float32: bits per coordinate = (8·ceil(n/8) + 32) / n  (= 1 + 32/n when 8 divides n).

Error: ‖C(v) − v‖² = ‖v‖² − ‖v‖₁²/d (a δ-approximate compressor with δ = ‖v‖₁²/(d‖v‖²) in the paper).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from tailq.kernels import baselines

from .base import Compressor, Encoded, Option, check_input, register
from .packing import pack_bits, unpack_bits

__all__ = ["EFSign"]


@register
class EFSign(Compressor):
    """EF-signSGD (Karimireddy et al., ICML 2019): 1 sign bit per coordinate + scale ‖v‖₁/d."""

    fast_paths = True  # tailq.kernels.baselines

    name = "efsign"
    summary = "scaled sign, 1 bit per coordinate + one float32 scale ||v||_1/d; use with error feedback"
    paper = "Karimireddy et al. 2019, Error Feedback Fixes SignSGD (ICML)"
    unbiased = False
    fixed_bits = 1
    memory = True
    options: ClassVar[dict[str, Option]] = {}
    format_options: ClassVar[tuple[str, ...]] = ()

    def encode(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> Encoded:
        """Deterministic: ``generator`` is accepted for the common interface and ignored."""
        flat = check_input(x)
        n = flat.numel()
        if n == 0:
            return self._empty(x)
        scale = (flat.abs().sum(dtype=torch.float64) / n).to(torch.float32).reshape(1)
        packed = baselines.efsign_encode(flat)  # the sign bits in one fused pass where a fast path exists
        if packed is None:
            packed = pack_bits((flat >= 0).to(torch.uint8), 1, check=False)
        return Encoded({"signs": packed, "scale": scale}, x.shape, x.dtype)

    def decode(self, enc: Encoded, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 decode shaped like the input; ``out``: a float32 tensor of as many elements to write into."""
        n = enc.numel
        if n == 0:
            return torch.zeros(enc.shape, dtype=torch.float32) if out is None else out.reshape(enc.shape)
        signs, scale = enc.tensors["signs"], enc.tensors["scale"]
        fo = baselines.flat_out(out, n)
        if out is None or fo is not None:
            fast = baselines.efsign_decode(signs, scale, n, fo)
            if fast is not None:
                return fast.reshape(enc.shape)
        b = unpack_bits(signs, 1, n).to(torch.float32)
        dec = ((2.0 * b - 1.0) * scale.to(torch.float32)).reshape(enc.shape)
        return dec if out is None else out.copy_(dec.reshape(out.shape)).reshape(enc.shape)
