"""What every route is built from: the bucket's coder (given by its family), the outcome, the route interface.

A **coder** is one rank's bucket on the agreed, rank-identical grid, built by the compressor's family after the
agreement (:mod:`tailq.comm.families`). Routes only move its payloads: they never look at the compressor. A coder
offers the dense (all-gather) interface, and the lanes (summable all-reduce) interface when its codes can be
added (``grid`` is not ``None``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, Protocol

import torch

from tailq.codec.packing import LanePlan
from tailq.kernels import RandKey

from ..wire import Comm, Tag

__all__ = ["ROUTES", "Coder", "Outcome", "Route", "register", "zero_outcome"]

Lazy = torch.Tensor | Callable[[], torch.Tensor]


@dataclasses.dataclass
class Outcome:
    """The mean over ranks, and this rank's own decoded contribution with what it is unbiased for (for EF).

    ``own`` and ``target`` may be given as zero-argument callables: they are computed on first access (only error
    feedback reads them; each is a full pass over the bucket).
    """

    mean: torch.Tensor
    own_: Lazy
    target_: Lazy
    route: str
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def own(self) -> torch.Tensor:
        if not isinstance(self.own_, torch.Tensor):
            self.own_ = self.own_()
        return self.own_

    @property
    def target(self) -> torch.Tensor:
        if not isinstance(self.target_, torch.Tensor):
            self.target_ = self.target_()
        return self.target_


def zero_outcome(x: torch.Tensor, route: str, **info: Any) -> Outcome:
    """Every rank's bucket is zero: the mean, the own decode and the target are exactly zero."""
    z = torch.zeros_like(x)
    return Outcome(z, z, z, route, {"zero": True, **info})


class Coder(Protocol):
    """One rank's bucket on the agreed grid. ``info`` (alpha, levels, …) is filled in by the encode used."""

    numel: int
    info: dict[str, Any]

    @property
    def grid(self) -> int | None:
        """Codes are integers 0..grid, summable in headroom lanes; ``None``: not summable (all-gather only)."""
        ...

    def encode_dense(self, key: RandKey) -> torch.Tensor:
        """This rank's payload for an all-gather (the same size on every rank)."""
        ...

    def decode_dense_mean(self, rows: torch.Tensor) -> torch.Tensor:
        """The mean over ranks from the gathered payloads, one row per rank."""
        ...

    def encode_lanes(self, key: RandKey, plan: LanePlan) -> torch.Tensor:
        """This rank's codes packed in headroom lanes (integer words an all-reduce SUM adds lane by lane)."""
        ...

    def decode_lanes(self, words: torch.Tensor, plan: LanePlan, n_workers: int) -> torch.Tensor:
        """The exact mean from the all-reduced words."""
        ...

    def own(self) -> torch.Tensor:
        """This rank's own decoded contribution (after an encode)."""
        ...

    def target(self) -> torch.Tensor:
        """What this rank's contribution is unbiased for (the truncated bucket)."""
        ...


class Route(Protocol):
    """One way to turn every rank's coder into the mean. Registered by name (:func:`tailq.comm.routes.register`)."""

    name: ClassVar[str]
    collective: ClassVar[str]
    """The collective of the payload, for the cost model: ``all_reduce`` or ``all_gather``."""
    preference: ClassVar[int]
    """Order among routes the cost model finds equally fast (lower first)."""

    def supports(self, grid: int | None) -> bool:
        """Whether the route can carry a family's codes (``grid``: the family's summable grid, or ``None``)."""
        ...

    def payload_bytes(self, numel: int, n_workers: int, grid: int | None, dense_bytes: int) -> int:
        """Bytes of payload this rank hands to the collective for a ``numel``-element bucket (cost model)."""
        ...

    def run(self, comm: Comm, tag: Tag, coder: Coder, key: RandKey) -> Outcome:
        """Aggregate one bucket."""
        ...


ROUTES: dict[str, Route] = {}
"""Every registered route by name, in registration order."""


def register(cls: type[Any]) -> type[Any]:
    """Class decorator: register one instance of a route class under ``cls.name``."""
    if cls.name in ROUTES and type(ROUTES[cls.name]) is not cls:
        raise ValueError(f"route name {cls.name!r} registered twice")
    ROUTES[cls.name] = cls()
    return cls
