"""Cluster topology (SPEC §9): which ranks share a node, the node and cross-node groups, and who pays for the NIC.

Real clusters put L workers behind one network interface: K nodes × L workers, N = K·L, ranks numbered node by
node (ranks ``k·L .. k·L + L − 1`` on node ``k``), as ``torchrun --nnodes K --nproc-per-node L`` numbers them. Two
kinds of group follow:

* the **node group** of rank r: the L ranks of its node (fast links: NVLink, shared memory, loopback);
* the **cross group** of rank r: the K ranks with its local rank, one per node (each crosses the NIC).

Where a rank learns its node (:func:`detect`): the hook's ``node_size`` option, else torchrun's environment
(``LOCAL_WORLD_SIZE``, ``LOCAL_RANK``, ``GROUP_RANK``), else one worker per node. The ranks then exchange what
they found (:func:`agree`, one all-gather of three integers) so that every rank sees the same
:class:`Shape`: a layout that is not K equal, contiguous nodes gives a clear error naming the ranks when
``node_size`` was given, and the flat routes with a logged reason when it came from the environment — never a
hang. The groups are created once, node group first, then cross group, on every rank
(:func:`tailq.comm.wire.new_group_like`).

**Who pays for the NIC** (:func:`nic_bytes`): what one rank's collective puts on its node's link, so that a node's
bits are the sum over its L ranks. A ring over all N ranks (numbered node by node) has one edge leaving each
node: the node's NIC carries what one worker of a flat ring would, shared by its L ranks. An all-to-all over all
N ranks sends each rank's (N − L)/N share off the node. A cross-group collective crosses the NIC entirely, and the
L cross groups of a node run side by side on it. A node-group collective never touches it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import torch

from .network import Network, ring_traffic_bytes

__all__ = ["SCOPES", "Shape", "agree", "detect", "link_seconds", "nic_bytes"]

SCOPES = ("world", "node", "cross")
"""Where a collective runs: all N ranks, the L ranks of one node, or the K ranks of one local rank (one per node)."""


@dataclasses.dataclass(frozen=True)
class Shape:
    """K nodes of L workers each (N = K·L), ranks numbered node by node."""

    nodes: int
    node_size: int

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.node_size < 1:
            raise ValueError(f"a cluster needs nodes >= 1 and node_size >= 1; got {self.nodes} x {self.node_size}")

    @classmethod
    def flat(cls, n_workers: int) -> Shape:
        """One worker per node (every route's traffic crosses a link of its own)."""
        return cls(max(1, n_workers), 1)

    @property
    def n(self) -> int:
        return self.nodes * self.node_size

    @property
    def hierarchical(self) -> bool:
        """Both levels exist: more than one node, more than one worker in each."""
        return self.nodes > 1 and self.node_size > 1

    def node_of(self, rank: int) -> int:
        return rank // self.node_size

    def local_of(self, rank: int) -> int:
        return rank % self.node_size

    def node_ranks(self, node: int) -> list[int]:
        """Group ranks of node ``node``."""
        return list(range(node * self.node_size, (node + 1) * self.node_size))

    def cross_ranks(self, local: int) -> list[int]:
        """Group ranks with local rank ``local``, one per node, in node order."""
        return [k * self.node_size + local for k in range(self.nodes)]

    def scope_size(self, scope: str) -> int:
        return {"world": self.n, "node": self.node_size, "cross": self.nodes}[scope]

    def describe(self) -> str:
        return f"{self.nodes} node(s) x {self.node_size} worker(s)"


def nic_bytes(collective: str, handed_bytes: int, scope: str, shape: Shape) -> float:
    """Bytes one rank's collective puts on its node's NIC (outbound; the node's total is the sum over its ranks).

    ``scope``: ``"world"`` (all N ranks, a ring or pairwise all-to-all), ``"node"`` (never leaves the node) or
    ``"cross"`` (K ranks, one per node: all of its ring traffic leaves the node).
    """
    if scope == "node" or shape.nodes <= 1:
        return 0.0
    if scope == "cross":
        return ring_traffic_bytes(collective, handed_bytes, shape.nodes)
    if scope != "world":
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}; got {scope!r}")
    n, L = shape.n, shape.node_size
    if collective == "all_to_all":  # each rank's shards for the N − L ranks of other nodes
        return (n - L) / n * handed_bytes
    # a ring numbered node by node: one edge leaves each node, carrying one worker's ring traffic; L ranks share it
    return ring_traffic_bytes(collective, handed_bytes, n) / L


def link_seconds(network: Network, scope: str, collective: str, handed_bytes: int, shape: Shape) -> float:
    """The cost model's seconds for one collective at ``scope`` on a two-link cluster (SPEC §9).

    The NIC (``network``'s rate and delay) is shared by the node's L ranks: a collective is priced by the bytes the
    whole node puts on it (:func:`nic_bytes` × L) plus one inter-node latency per hop. Inside a node, the node link
    (:meth:`~tailq.comm.network.Network.node_link`) carries the node-group collectives; what a world-scope ring moves
    inside nodes runs beside the NIC edge and does not lengthen it. One worker per node: exactly
    :meth:`Network.time`. One node: everything on the node link — which is ``network`` itself unless it gives a
    ``node=`` rate (a single machine's world collectives are what a warm-up fit of ``network`` timed).
    """
    if shape.node_size == 1:
        return network.time(collective, handed_bytes, shape.scope_size(scope))
    if shape.nodes == 1:
        link = network if network.node_rate_bps is None else network.node_link()
        return link.time(collective, handed_bytes, shape.scope_size(scope))
    if scope == "node":
        return network.node_link().time(collective, handed_bytes, shape.scope_size(scope))
    assert network.rate_bps is not None
    n = shape.scope_size(scope)
    hops = 2 * (n - 1) if collective == "all_reduce" else n - 1
    node_bytes = shape.node_size * nic_bytes(collective, handed_bytes, scope, shape)
    return 8 * node_bytes / network.rate_bps + hops * network.hop_latency_s


def detect(node_size: int | None, env: Mapping[str, str] | None = None) -> tuple[int, int, int, str]:
    """This rank's (node size, local rank, node index or −1, where it came from) before the ranks agree.

    ``node_size`` (the hook option) wins; else torchrun's ``LOCAL_WORLD_SIZE``/``LOCAL_RANK``/``GROUP_RANK``; else one
    worker per node. A node index of −1 means "the rank's position says": rank // node_size.
    """
    env = os.environ if env is None else env
    if node_size is not None:
        return int(node_size), -1, -1, "node_size"
    try:
        size, local = int(env["LOCAL_WORLD_SIZE"]), int(env["LOCAL_RANK"])
        node = int(env.get("GROUP_RANK", "-1"))
    except (KeyError, ValueError):
        return 1, -1, -1, "default"
    return size, local, node, "torchrun environment"


def agree(found: tuple[int, int, int, str], gathered: torch.Tensor, n_workers: int) -> tuple[Shape, str | None]:
    """The shape every rank uses, from every rank's :func:`detect` (``gathered``: one row (node size, local rank,
    node) per group rank, identical on every rank). Returns (shape, why it fell back to flat or ``None``).

    Raises ``ValueError`` naming the ranks when the layout was asked for (``node_size``) and cannot hold.
    """
    source = found[3]
    rows = gathered.reshape(n_workers, 3).tolist()
    sizes = sorted({r[0] for r in rows})
    problem: str | None = None
    if len(sizes) != 1:
        by = {s: [i for i, r in enumerate(rows) if r[0] == s] for s in sizes}
        problem = "ranks report different node sizes: " + "; ".join(f"{s} on ranks {v}" for s, v in by.items())
    else:
        L = sizes[0]
        if L < 1 or n_workers % L:
            problem = f"node size {L} does not divide the {n_workers} ranks (accepted: a divisor of {n_workers})"
        else:
            bad = [i for i, (_, local, node) in enumerate(rows)
                   if (local >= 0 and local != i % L) or (node >= 0 and node != i // L)]
            if bad:
                problem = (f"ranks {bad} are not numbered node by node (rank r must be local rank r % {L} of node "
                           f"r // {L}, as torchrun numbers them); their (local rank, node): "
                           + ", ".join(f"{i}: ({rows[i][1]}, {rows[i][2]})" for i in bad))
    if problem is None:
        L = sizes[0]
        return Shape(n_workers // L, L), None
    if source == "node_size":
        raise ValueError(f"node_size: {problem}")
    return Shape.flat(n_workers), f"{problem} ({source}); using the flat routes (one worker per node)"
