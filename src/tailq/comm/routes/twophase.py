"""Route ``twophase``: all-to-all of b-bit shards, owner-side mean and requantization, all-gather (SPEC §6, route 3).

The bucket is zero-padded to N shards of m elements (m a multiple of 8, so shards start on bytes of the dense
packing). Phase 1: every rank encodes its bucket on the shared codebook and sends shard r to rank r
(``all_to_all_single``); the owner decodes the N contributions and averages them in fp32. Phase 2: the owner
requantizes its mean shard at ``gather_bits`` with a design from that shard's own histogram (no agreement), and
an ``all_gather`` of every owner's codebook header and codes gives every rank the same mean, bit for bit (the
owner too uses the decoded requantized shard, not its exact mean).

A requantizable per-rank compressor (fp8, fp4, int8sigma: ``Compressor.requantizable``) takes the same route with
its own scales: every shard is encoded on its own, and the owner re-encodes its mean with the same compressor
(``gather_bits`` does not apply) — torchft's FP8 collective for DiLoCo's outer gradients.

Traffic per worker: (N − 1)/N · (b + gather_bits) bits per coordinate plus N − 1 headers — about b + gather_bits
at any N, where the all-gather grows as (N − 1) · b and summable lanes as ⌈log2(N·G + 1)⌉.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, cast

import torch

from tailq.kernels import RandKey

from ..wire import Comm, Tag
from .base import Capabilities, Coder, Outcome, ShardCheck, ShardCoder, register, shard_numel

OWNER_STREAM = 1 << 40
"""Added to the rank of the phase-2 random key: the owner's rounding never reuses its phase-1 stream."""


@register
class TwoPhase:
    name: ClassVar[str] = "twophase"
    preference: ClassVar[int] = 2

    def supports(self, family: Capabilities) -> bool:
        return family.shardable

    def phases(self, numel: int, n_workers: int, family: Capabilities) -> tuple[tuple[str, int], ...]:
        m = shard_numel(numel, n_workers)
        return (("all_to_all", n_workers * family.dense_bytes(m)), ("all_gather", family.gather_bytes(m)))

    def codec_passes(self, numel: int, n_workers: int) -> float:
        # encode; decode the N contributions to one shard (= one bucket's worth); the owner's statistics and
        # encode of its shard; decode every owner's shard
        return 3.0 + 2.0 / n_workers

    def run(self, comm: Comm, tag: Tag, coder: Coder, key: RandKey, out: torch.Tensor | None = None) -> Outcome:
        sc = cast(ShardCoder, coder)
        n, r = comm.n, comm.rank
        packed, m = sc.encode_shards(key, n)
        rows = comm.all_to_all(packed, tag, "payload")  # row j: rank j's codes of my shard
        mean1 = sc.decode_shard_mean(rows, m)
        payload, mine = sc.requantize(mean1, r, dataclasses.replace(key, rank=key.rank + OWNER_STREAM))
        mean = sc.dequantize(comm.all_gather(payload, tag, "payload"), m, out)
        valid = max(0, min(m, coder.numel - r * m))
        check = ShardCheck(r * m, mean1[:valid], mine[:valid])
        return Outcome(mean, coder.own, coder.target, self.name, coder.info, check)
