"""Route ``allreduce`` (SPEC §6.1): summable codes packed in headroom lanes, one integer all-reduce SUM.

Codes k ∈ {0..G} on the shared grid are packed ⌊W/w⌋ to a W-bit word with w = ⌈log2(N·G + 1)⌉ bits per lane
(:func:`~tailq.codec.packing.plan_lanes`), so the SUM adds every lane without carries; the words decode exactly
to Σ_n k_n and so to the mean. Cost: 2(N − 1)/N · (words × W/8) bytes of ring traffic per worker.
"""

from __future__ import annotations

import functools
from typing import ClassVar

import torch

from tailq.codec.packing import LanePlan, plan_lanes
from tailq.kernels import RandKey

from ..wire import Comm, Tag
from .base import Capabilities, Coder, Outcome, register


@functools.lru_cache(maxsize=64)
def lane_plan(n_workers: int, grid: int) -> LanePlan:
    """The headroom lane plan for summing ``n_workers`` codes of ``0..grid``."""
    return plan_lanes(n_workers, grid)


@register
class AllReduce:
    name: ClassVar[str] = "allreduce"
    preference: ClassVar[int] = 0

    def supports(self, family: Capabilities) -> bool:
        return family.grid is not None

    def phases(self, numel: int, n_workers: int, family: Capabilities) -> tuple[tuple[str, int], ...]:
        assert family.grid is not None
        plan = lane_plan(n_workers, family.grid)
        return (("all_reduce", plan.words_for(numel) * plan.word_bits // 8),)

    def codec_passes(self, numel: int, n_workers: int) -> float:
        return 2.0  # encode into lanes, decode the summed lanes

    def run(self, comm: Comm, tag: Tag, coder: Coder, key: RandKey, out: torch.Tensor | None = None) -> Outcome:
        assert coder.grid is not None
        plan = lane_plan(comm.n, coder.grid)
        words = coder.encode_lanes(key, plan)
        comm.all_reduce(words, tag, "payload")
        mean = coder.decode_lanes(words, plan, comm.n, out)
        return Outcome(mean, coder.own, coder.target, self.name, coder.info)
