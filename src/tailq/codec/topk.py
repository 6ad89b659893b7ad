"""Top-k sparsification, designed for error feedback (SPEC §4, §5).

S. U. Stich, J.-B. Cordonnier, M. Jaggi, *Sparsified SGD with Memory*, NeurIPS 2018.

Keep the k = max(1, round(ratio·d)) coordinates of largest |v| (round half up, at most d), send their
values and positions, zero the rest. Deterministic (ties broken by ``torch.topk``) and biased:
``unbiased=False``, ``memory=True`` — run it inside :class:`~tailq.codec.memory.ErrorFeedback`, which keeps
the residual e ← e + g − C(e + g); the compressor itself is stateless.

Wire format: k float32 values + k indices (int32 while d < 2^31, else int64):
bits per coordinate = k·(32 + 32)/d (k·(32 + 64)/d for d ≥ 2^31).

Error: ‖C(v) − v‖² = Σ of the d − k smallest v_i² ≤ (1 − k/d)·‖v‖² (a k/d-contraction).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from .base import Compressor, Encoded, Option, check_input, register
from .scales import index_dtype

__all__ = ["TopK"]


@register
class TopK(Compressor):
    """Top-k (Stich et al., NeurIPS 2018): the k largest-magnitude values and their int32/int64 indices."""

    name = "topk"
    summary = "keep the k = ratio*d largest |v| (values float32 + indices); use with error feedback"
    paper = "Stich et al. 2018, Sparsified SGD with Memory (NeurIPS)"
    unbiased = False
    memory = True
    options: ClassVar[dict[str, Option]] = {
        "ratio": Option(
            float, 0.01, "fraction of coordinates kept; k = max(1, round(ratio*d))", 0.0, 1.0, low_open=True
        ),
    }
    format_options: ClassVar[tuple[str, ...]] = ()  # k is the number of values sent
    ratio: float

    def k(self, d: int) -> int:
        """Number of kept coordinates for a d-element tensor."""
        return min(d, max(1, math.floor(self.ratio * d + 0.5)))

    def encode(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> Encoded:
        """Deterministic: ``generator`` is accepted for the common interface and ignored."""
        flat = check_input(x)
        n = flat.numel()
        if n == 0:
            return self._empty(x)
        k = self.k(n)
        idx = torch.topk(flat.abs(), k, sorted=False).indices
        tensors = {"values": flat[idx], "indices": idx.to(index_dtype(n))}
        return Encoded(tensors, x.shape, x.dtype, {"k": k})

    def decode(self, enc: Encoded) -> torch.Tensor:
        n = enc.numel
        if n == 0:
            return torch.zeros(enc.shape, dtype=torch.float32)
        vals = enc.tensors["values"]
        out = torch.zeros(n, dtype=torch.float32, device=vals.device)
        out[enc.tensors["indices"].to(torch.int64)] = vals.to(torch.float32)
        return out.reshape(enc.shape)
