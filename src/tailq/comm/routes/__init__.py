"""Routes (SPEC §6): how one bucket's codes become the mean over workers, and the planner that picks one.

Every module of this package that defines a route registers it with :func:`register`; this file imports them all,
so a new route is one new file here. :class:`Planner` picks, per bucket size, the cheapest of ``passthrough``
(bf16, as PyTorch's hook) and every registered route the family supports, under one cost model: the modeled time
of the route's collectives (:meth:`~tailq.comm.network.Network.time`) plus its codec work
(:meth:`Route.codec_passes` × a measured cost per element and pass, :class:`CodecCost`). Ties go to the lower
``preference`` (passthrough first, then the summable all-reduce, the all-gather, the two-phase route).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import pkgutil
from typing import Any

from ..network import Network
from ..topology import Shape, link_seconds, nic_bytes
from .base import (
    ROUTES,
    Capabilities,
    Coder,
    Outcome,
    Route,
    ShardCheck,
    ShardCoder,
    register,
    shard_numel,
    zero_outcome,
)

__all__ = ["PASSTHROUGH", "ROUTES", "Capabilities", "CodecCost", "Coder", "Outcome", "Planner", "Route",
           "ShardCheck", "ShardCoder", "is_staged", "register", "route_names", "shard_numel", "zero_outcome"]

PASSTHROUGH = "passthrough"
"""The planner's uncompressed choice: the bucket in bf16, one all-reduce SUM (PyTorch's ``bf16_compress_hook``)."""


def is_staged(route: str) -> bool:
    """Whether ``route`` restructures the group (the hierarchical routes) rather than moving one coder's payloads."""
    return bool(getattr(ROUTES.get(route), "staged", False))


def route_names() -> tuple[str, ...]:
    """``auto`` and every registered route (by preference): the accepted values of the hook's ``route`` option."""
    return ("auto", *sorted(ROUTES, key=lambda r: ROUTES[r].preference))


@dataclasses.dataclass(frozen=True)
class CodecCost:
    """Measured seconds per element of one codec pass (encode or decode) and of the bf16 cast of passthrough.

    Zero (the default) prices communication alone. The hook measures both on every rank and agrees on the mean
    before planning, so every rank plans the same routes.
    """

    per_pass_s: float = 0.0
    """One encode or decode pass (statistics included), seconds per element."""
    cast_s: float = 0.0
    """bf16 cast, divide and cast back of passthrough, seconds per element."""


class Planner:
    """The route for each bucket size, from the cost model (cached per size: a pure function of its inputs).

    ``passthrough``: whether the uncompressed bf16 all-reduce is a candidate (the hook's ``route="auto"``).
    ``shape``: K nodes × L workers (default: one worker per node). With L > 1 every route is priced by the traffic
    on each link (:func:`~tailq.comm.topology.link_seconds`): the flat routes' by what their collectives over all N
    ranks put on the node's shared NIC, the hierarchical ones (candidates only when K > 1 and L > 1) by their stages
    on the node link and across nodes.
    """

    def __init__(self, family: Capabilities, n_workers: int, network: Network, codec: CodecCost | None = None,
                 *, passthrough: bool = False, shape: Shape | None = None) -> None:
        self.family = family
        self.n_workers = n_workers
        self.shape = shape if shape is not None else Shape.flat(n_workers)
        if self.shape.n != max(1, n_workers):
            raise ValueError(f"planner: {self.shape.describe()} is not {n_workers} workers")
        self.network = network
        self.codec = codec or CodecCost()
        self.routes = tuple(r for r in route_names()[1:] if ROUTES[r].supports(family))
        """Every route the family can take (the hierarchical ones run as their flat route without a hierarchy)."""
        planned = tuple(r for r in self.routes if self.shape.hierarchical or not is_staged(r))
        self.candidates = ((PASSTHROUGH,) if passthrough else ()) + planned

    def flat(self, route: str) -> str:
        """The route that runs for ``route`` on this shape: a hierarchical route without a hierarchy is its flat one."""
        if is_staged(route) and not self.shape.hierarchical:
            return str(ROUTES[route].flat_equivalent())  # type: ignore[attr-defined]
        return route

    def phases(self, route: str, numel: int) -> tuple[tuple[str, int], ...]:
        """(collective, bytes this rank hands) of a flat ``route``'s payload over all N ranks."""
        route = self.flat(route)
        if route == PASSTHROUGH:
            return (("all_reduce", 2 * numel),)
        if is_staged(route):
            raise ValueError(f"{route} runs in stages on several groups; use Planner.stages")
        return ROUTES[route].phases(numel, self.n_workers, self.family)

    def stages(self, route: str, numel: int) -> tuple[tuple[str, str, int], ...]:
        """(scope, collective, bytes this rank hands) of every payload collective of ``route``."""
        route = self.flat(route)
        if is_staged(route):
            return ROUTES[route].stages(numel, self.shape, self.family)  # type: ignore[attr-defined, no-any-return]
        return tuple(("world", c, b) for c, b in self.phases(route, numel))

    def payload_bytes(self, route: str, numel: int) -> int:
        """Bytes this rank hands to ``route``'s payload collectives for a ``numel``-element bucket."""
        return sum(b for _, _, b in self.stages(route, numel))

    def nic_bits(self, route: str, numel: int) -> float:
        """Bits leaving each node's NIC per coordinate on ``route`` (modeled; one worker per node: ring traffic)."""
        node = self.shape.node_size * sum(nic_bytes(c, b, s, self.shape) for s, c, b in self.stages(route, numel))
        return 8 * node / max(1, numel)

    def comm_seconds(self, route: str, numel: int) -> float:
        return sum(link_seconds(self.network, s, c, b, self.shape) for s, c, b in self.stages(route, numel))

    def codec_seconds(self, route: str, numel: int) -> float:
        route = self.flat(route)
        if route == PASSTHROUGH:
            return self.codec.cast_s * numel
        if is_staged(route):
            return ROUTES[route].codec_seconds(  # type: ignore[attr-defined, no-any-return]
                numel, self.shape, self.codec.per_pass_s, self.codec.cast_s)
        # +1: the statistics pass every compressed bucket makes before its route
        return self.codec.per_pass_s * numel * (1.0 + ROUTES[route].codec_passes(numel, self.n_workers))

    def seconds(self, route: str, numel: int) -> float:
        """The cost model's time for one bucket on ``route``: its collectives plus its codec work."""
        return self.comm_seconds(route, numel) + self.codec_seconds(route, numel)

    @functools.lru_cache(maxsize=256)  # noqa: B019 - one entry per bucket size, lives as long as the hook
    def plan(self, numel: int) -> str:
        order = {PASSTHROUGH: -1, **{r: ROUTES[r].preference for r in self.routes}}
        return min(self.candidates, key=lambda r: (self.seconds(r, numel), order[r]))  # ties: preference

    def explain(self, numel: int) -> dict[str, Any]:
        """The choice for ``numel`` and why: every candidate's modeled communication and codec seconds."""
        return {"numel": numel, "route": self.plan(numel), "shape": [self.shape.nodes, self.shape.node_size],
                "candidates": {r: {"comm_s": self.comm_seconds(r, numel), "codec_s": self.codec_seconds(r, numel),
                                   "bytes": self.payload_bytes(r, numel), "node_nic_bits": self.nic_bits(r, numel)}
                               for r in self.candidates}}


# the built-in routes
for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")
