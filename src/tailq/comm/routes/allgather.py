"""Route ``allgather`` (SPEC §6.2): every rank's payload gathered, every rank decodes all N and averages.

Works for every family (dense b-bit codes on a shared codebook, or each rank's own encoding with its side
information). Cost: (N − 1) · payload bytes of ring traffic per worker.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from tailq.kernels import RandKey

from ..wire import Comm, Tag
from .base import Capabilities, Coder, Outcome, register


@register
class AllGather:
    name: ClassVar[str] = "allgather"
    preference: ClassVar[int] = 1

    def supports(self, family: Capabilities) -> bool:
        return True

    def phases(self, numel: int, n_workers: int, family: Capabilities) -> tuple[tuple[str, int], ...]:
        return (("all_gather", family.dense_bytes(numel)),)

    def codec_passes(self, numel: int, n_workers: int) -> float:
        return 1.0 + n_workers  # encode, then decode every rank's row

    def run(self, comm: Comm, tag: Tag, coder: Coder, key: RandKey, out: torch.Tensor | None = None) -> Outcome:
        rows = comm.all_gather(coder.encode_dense(key), tag, "payload")
        return Outcome(coder.decode_dense_mean(rows, out), coder.own, coder.target, self.name, coder.info)
