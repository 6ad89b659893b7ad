"""Routes (SPEC §6): how one bucket's codes become the mean over workers, and the planner that picks one.

Every module of this package that defines a route registers it with :func:`register`; this file imports them all,
so a new route is one new file here. :class:`Planner` picks, per bucket size, the registered route the family
supports with the least modeled time (:meth:`~tailq.comm.network.Network.time`, the one cost model); ties go to
the route with the lower ``preference`` (the summable all-reduce before the all-gather).
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from typing import TYPE_CHECKING

from ..network import Network
from .base import ROUTES, Coder, Outcome, Route, register, zero_outcome

if TYPE_CHECKING:
    from ..families import Family

__all__ = ["ROUTES", "Coder", "Outcome", "Planner", "Route", "register", "route_names", "zero_outcome"]

def route_names() -> tuple[str, ...]:
    """``auto`` and every registered route (by preference): the accepted values of the hook's ``route`` option."""
    return ("auto", *sorted(ROUTES, key=lambda r: ROUTES[r].preference))


class Planner:
    """The route for each bucket size, from the cost model of ``network`` (cached per size: a pure function)."""

    def __init__(self, family: Family, n_workers: int, network: Network) -> None:
        self.family = family
        self.n_workers = n_workers
        self.network = network
        self.routes = tuple(r for r in route_names()[1:] if ROUTES[r].supports(family.grid))

    def payload_bytes(self, route: str, numel: int) -> int:
        """Bytes this rank hands to ``route``'s payload collective for a ``numel``-element bucket."""
        return ROUTES[route].payload_bytes(numel, self.n_workers, self.family.grid, self.family.dense_bytes(numel))

    def seconds(self, route: str, numel: int) -> float:
        """The cost model's time for one bucket's payload on ``route``."""
        return self.network.time(ROUTES[route].collective, self.payload_bytes(route, numel), self.n_workers)

    @functools.lru_cache(maxsize=256)  # noqa: B019 - one entry per bucket size, lives as long as the hook
    def plan(self, numel: int) -> str:
        return min(self.routes, key=lambda r: (self.seconds(r, numel), ROUTES[r].preference))  # ties: preference


# the built-in routes
for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")
