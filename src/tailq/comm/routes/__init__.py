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
from typing import TYPE_CHECKING, Any

from ..network import Network
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

if TYPE_CHECKING:
    from ..families import Family

__all__ = ["PASSTHROUGH", "ROUTES", "Capabilities", "CodecCost", "Coder", "Outcome", "Planner", "Route",
           "ShardCheck", "ShardCoder", "register", "route_names", "shard_numel", "zero_outcome"]

PASSTHROUGH = "passthrough"
"""The planner's uncompressed choice: the bucket in bf16, one all-reduce SUM (PyTorch's ``bf16_compress_hook``)."""


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
    """

    def __init__(self, family: Family, n_workers: int, network: Network, codec: CodecCost | None = None,
                 *, passthrough: bool = False) -> None:
        self.family = family
        self.n_workers = n_workers
        self.network = network
        self.codec = codec or CodecCost()
        self.routes = tuple(r for r in route_names()[1:] if ROUTES[r].supports(family))
        self.candidates = ((PASSTHROUGH,) if passthrough else ()) + self.routes

    def phases(self, route: str, numel: int) -> tuple[tuple[str, int], ...]:
        """(collective, bytes this rank hands) of ``route``'s payload for a ``numel``-element bucket."""
        if route == PASSTHROUGH:
            return (("all_reduce", 2 * numel),)
        return ROUTES[route].phases(numel, self.n_workers, self.family)

    def payload_bytes(self, route: str, numel: int) -> int:
        """Bytes this rank hands to ``route``'s payload collectives for a ``numel``-element bucket."""
        return sum(b for _, b in self.phases(route, numel))

    def comm_seconds(self, route: str, numel: int) -> float:
        return sum(self.network.time(c, b, self.n_workers) for c, b in self.phases(route, numel))

    def codec_seconds(self, route: str, numel: int) -> float:
        if route == PASSTHROUGH:
            return self.codec.cast_s * numel
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
        return {"numel": numel, "route": self.plan(numel),
                "candidates": {r: {"comm_s": self.comm_seconds(r, numel), "codec_s": self.codec_seconds(r, numel),
                                   "bytes": self.payload_bytes(r, numel)} for r in self.candidates}}


# the built-in routes
for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")
