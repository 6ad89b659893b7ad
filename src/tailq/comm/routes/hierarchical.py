"""Hierarchical routes ``hier-<inner>`` (SPEC §9): exact inside the node, compressed across nodes, exact again inside.

On K nodes × L workers (N = K·L, ranks numbered node by node), for one bucket of d values:

1. **reduce-scatter inside the node**, fp32: the bucket is zero-padded to L shards of m = ⌈d/L⌉ values (a multiple
   of 8); rank (k, l) gets shard l of its node's mean, Σ_l' g_l' / L (each rank's values divided by L before the sum,
   as DDP divides before its all-reduce). On Gloo an all-to-all and a local sum (Gloo has no reduce-scatter), on
   NCCL ``reduce_scatter_tensor``;
2. **across nodes**: that shard goes through the hook's whole compressed pipeline — error feedback on the shard
   (kept by this shard's owner), statistics and codebook agreed among the K ranks with local rank l, and the flat
   route ``<inner>`` (``twophase``, ``allreduce``, ``allgather``; ``bf16`` is PyTorch's bf16 all-reduce) on the
   cross-node group;
3. **all-gather inside the node** of the K-mean shards: every rank ends with the same mean, bit for bit.

Bits leaving each node's NIC per coordinate: L × the inner route's traffic for m values among K ranks ≈
(K − 1)/K · (b + b₂) for ``hier-twophase`` (4× less than a bf16 ring at L = 8, K = 16), and each rank encodes only
1/L of the bucket. With one node (K = 1) or one worker per node (L = 1) there is no hierarchy: the route is its
inner flat route, bit for bit (:meth:`Hierarchical.flat_equivalent`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..topology import Shape
from ..wire import Comm, Tag
from .base import ROUTES, Capabilities, register, shard_numel

__all__ = ["Hierarchical", "NodeComms", "node_shard_numel"]

BF16 = "bf16"
"""The inner stage that is PyTorch's bf16 all-reduce (the planner's passthrough, across nodes only)."""

NODE_KIND = "node"
"""Wire-log kind of the collectives inside a node: real traffic, on the node's own link, never on its NIC."""


def node_shard_numel(numel: int, node_size: int) -> int:
    """Values per rank after the in-node reduce-scatter: ⌈numel / L⌉ rounded up to a multiple of 8."""
    return shard_numel(numel, node_size)


@dataclasses.dataclass
class NodeComms:
    """This rank's collectives inside its node (``node``: L ranks) and across nodes (``cross``: K ranks)."""

    shape: Shape
    rank: int
    node: Comm
    cross: Comm

    @property
    def local(self) -> int:
        return self.shape.local_of(self.rank)


ShardMean = Callable[[Comm, torch.Tensor, str], torch.Tensor]
"""The hook's pipeline for one shard: ``(cross comm, node-mean shard, inner route) -> the mean over the K nodes``."""


class Hierarchical:
    """Base of the ``hier-<inner>`` routes (one registered subclass per inner route)."""

    name: ClassVar[str]
    inner: ClassVar[str]
    preference: ClassVar[int]
    staged: ClassVar[bool] = True
    """Not a flat route: it restructures the group and calls back into the hook's pipeline (``run``)."""

    def supports(self, family: Capabilities) -> bool:
        return self.inner == BF16 or ROUTES[self.inner].supports(family)

    def flat_equivalent(self) -> str:
        """The route this one is when there is no hierarchy (K = 1 or L = 1): ``passthrough`` for ``bf16``."""
        return "passthrough" if self.inner == BF16 else self.inner

    def stages(self, numel: int, shape: Shape, family: Capabilities) -> tuple[tuple[str, str, int], ...]:
        """(scope, collective, bytes this rank hands) of every collective, in order."""
        L, K = shape.node_size, shape.nodes
        m = node_shard_numel(numel, L)
        inner = (("all_reduce", 2 * m),) if self.inner == BF16 else ROUTES[self.inner].phases(m, K, family)
        return (("node", "all_to_all", 4 * L * m), *(("cross", c, b) for c, b in inner), ("node", "all_gather", 4 * m))

    def codec_seconds(self, numel: int, shape: Shape, per_pass_s: float, cast_s: float) -> float:
        """The in-node sum and copies (about one pass over the bucket) and the inner route's codec on 1/L of it."""
        m = node_shard_numel(numel, shape.node_size)
        if self.inner == BF16:
            shard = cast_s * m
        else:  # + 1: the statistics pass on the shard
            shard = per_pass_s * m * (1.0 + ROUTES[self.inner].codec_passes(m, shape.nodes))
        return per_pass_s * numel + shard

    def run(self, comms: NodeComms, tag: Tag, g: torch.Tensor, shard_mean: ShardMean,
            out: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """The mean of ``g`` over all N ranks (into ``out`` when given): reduce-scatter in the node, ``shard_mean``
        across nodes, all-gather in the node."""
        L, numel = comms.shape.node_size, g.numel()
        m = node_shard_numel(numel, L)
        x = g.reshape(-1).to(torch.float32).div(L)
        x = F.pad(x, (0, L * m - numel)) if L * m > numel else x
        part = comms.node.reduce_scatter(x, tag, NODE_KIND)  # shard `local` of the node's mean
        mean = shard_mean(comms.cross, part, self.inner).to(torch.float32)
        rows = comms.node.all_gather(mean, tag, NODE_KIND).reshape(-1)[:numel]
        if out is None:
            return rows
        out.copy_(rows)
        return out

    def __repr__(self) -> str:
        return f"<route {self.name}>"


def _variant(inner: str, preference: int) -> Any:
    cls = type(f"Hierarchical_{inner}", (Hierarchical,), {"name": f"hier-{inner}", "inner": inner,
                                                          "preference": preference, "__doc__": __doc__})
    return register(cls)


for _inner, _pref in ((BF16, 10), ("allreduce", 11), ("allgather", 12), ("twophase", 13)):
    _variant(_inner, _pref)
