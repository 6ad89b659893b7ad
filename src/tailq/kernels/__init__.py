"""Fused fast paths for the codec hot loops, each matching its plain-torch reference bit for bit.

* :mod:`~tailq.kernels.rng` — :class:`RandKey` and the counter-based hash: stochastic rounding draws the uniform
  number of element i from (seed, rank, step, bucket, i), so every implementation produces the same codes.
* :mod:`~tailq.kernels.spec` — :class:`RoundSpec`, the float32 constants a codebook rounds and decodes with.
* :mod:`~tailq.kernels.cpu` — the CPU fast path (``torch.compile``, inductor-generated C++).
* :mod:`~tailq.kernels.triton_impl` — the GPU kernels (Triton); parity-tested on CPU with ``TRITON_INTERPRET=1``.
* :mod:`~tailq.kernels.dispatch` — which one runs (``TAILQ_KERNELS`` / :func:`use`), with a logged fallback to
  the reference when a fast path cannot run.

This package depends only on torch (and the histogram layout constants of :mod:`tailq.theory`); the codec calls
into it, and keeps the references.
"""

from . import dispatch
from .dispatch import PATHS, available_paths, compile_seconds, path_for, use
from .rng import RandKey, counter_uint24, counter_uniform
from .spec import RoundSpec

__all__ = [
    "PATHS",
    "RandKey",
    "RoundSpec",
    "available_paths",
    "compile_seconds",
    "counter_uint24",
    "counter_uniform",
    "dispatch",
    "path_for",
    "use",
]
