"""What every route is built from: the bucket's coder (given by its family), the outcome, the route interface.

A **coder** is one rank's bucket on the agreed, rank-identical grid, built by the compressor's family after the
agreement (:mod:`tailq.comm.families`). Routes only move its payloads: they never look at the compressor. A coder
offers the dense (all-gather) interface, the lanes (summable all-reduce) interface when its codes can be added
(``grid`` is not ``None``), and the shard interface (:class:`ShardCoder`, two-phase) when its family is
``shardable``: codes on one shared codebook that an owner can decode per shard and requantize.

A route states its cost as the collectives it issues (:meth:`Route.phases`, bytes handed) and its codec work in
passes over the bucket (:meth:`Route.codec_passes`); the planner prices both with one model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, Protocol

import torch

from tailq.codec.packing import LanePlan
from tailq.kernels import RandKey

from ..wire import Comm, Tag

__all__ = ["ROUTES", "Capabilities", "Coder", "Outcome", "Route", "ShardCheck", "ShardCoder", "register",
           "shard_numel", "zero_outcome"]

Lazy = torch.Tensor | Callable[[], torch.Tensor]


def shard_numel(numel: int, n_workers: int) -> int:
    """Elements per shard of the two-phase route: ⌈numel / N⌉ rounded up to a multiple of 8, so every shard
    starts on a byte of the dense packing at any bit width (the bucket is zero-padded to N shards)."""
    per_rank = -(-numel // n_workers)
    return max(8, -(-per_rank // 8) * 8)


@dataclasses.dataclass
class ShardCheck:
    """What the owner of one shard knows for the per-phase vNMSE: its slice, the exact mean of the phase-1 decodes
    (``mean1``) and what phase 2 delivered for it (``mean2``), both over the valid part of the shard."""

    offset: int
    mean1: torch.Tensor
    mean2: torch.Tensor


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
    shard: ShardCheck | None = None

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

    def decode_dense_mean(self, rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The mean over ranks from the gathered payloads, one row per rank (written into ``out`` when given)."""
        ...

    def encode_lanes(self, key: RandKey, plan: LanePlan) -> torch.Tensor:
        """This rank's codes packed in headroom lanes (integer words an all-reduce SUM adds lane by lane)."""
        ...

    def decode_lanes(self, words: torch.Tensor, plan: LanePlan, n_workers: int,
                     out: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """The exact mean from the all-reduced words (written into ``out`` when given)."""
        ...

    def own(self) -> torch.Tensor:
        """This rank's own decoded contribution (after an encode)."""
        ...

    def target(self) -> torch.Tensor:
        """What this rank's contribution is unbiased for (the truncated bucket)."""
        ...


class ShardCoder(Coder, Protocol):
    """A coder whose bucket can be aggregated shard by shard (two-phase): dense codes split on byte boundaries,
    each shard's N contributions decoded and averaged by its owner, the mean requantized by the owner alone."""

    def encode_shards(self, key: RandKey, n_workers: int) -> tuple[torch.Tensor, int]:
        """This rank's dense codes of the zero-padded bucket as N equal byte shards, and the shard length."""
        ...

    def decode_shard_mean(self, rows: torch.Tensor, m: int) -> torch.Tensor:
        """The fp32 mean of the N contributions to one shard of ``m`` elements (one row per rank)."""
        ...

    def requantize(self, mean: torch.Tensor, shard: int, key: RandKey) -> tuple[torch.Tensor, torch.Tensor]:
        """The owner's payload for shard ``shard`` (its codebook header and codes) and that payload's decode."""
        ...

    def dequantize(self, rows: torch.Tensor, m: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """The bucket's mean from every owner's payload (one row per shard): identical on every rank (written
        into ``out``, the bucket's length, when given)."""
        ...


class Capabilities(Protocol):
    """What a route needs to know of a family to say whether it can carry it, and at what size."""

    grid: int | None
    """Codes are integers 0..grid, summable in headroom lanes; ``None``: not summable."""
    shardable: bool
    """Codes on one shared codebook that an owner can decode per shard and requantize (two-phase)."""

    def dense_bytes(self, numel: int) -> int:
        """Bytes of one rank's all-gather payload for a ``numel``-element bucket."""
        ...

    def gather_bytes(self, m: int) -> int:
        """Bytes of an owner's phase-2 payload for a shard of ``m`` elements (shardable families)."""
        ...


class Route(Protocol):
    """One way to turn every rank's coder into the mean. Registered by name (:func:`tailq.comm.routes.register`)."""

    name: ClassVar[str]
    preference: ClassVar[int]
    """Order among routes the cost model finds equally fast (lower first)."""

    def supports(self, family: Capabilities) -> bool:
        """Whether the route can carry this family's codes."""
        ...

    def phases(self, numel: int, n_workers: int, family: Capabilities) -> tuple[tuple[str, int], ...]:
        """The payload collectives for a ``numel``-element bucket: (collective, bytes this rank hands), in order."""
        ...

    def codec_passes(self, numel: int, n_workers: int) -> float:
        """Encode and decode work, in passes over the bucket (the planner multiplies by a measured cost)."""
        ...

    def run(self, comm: Comm, tag: Tag, coder: Coder, key: RandKey, out: torch.Tensor | None = None) -> Outcome:
        """Aggregate one bucket. ``out``: a float32 tensor of the bucket's length the mean is decoded into (the
        bucket's own buffer, so no fresh full-size tensor and no copy back); ``None``: a new tensor."""
        ...


ROUTES: dict[str, Route] = {}
"""Every registered route by name, in registration order."""


def register(cls: type[Any]) -> type[Any]:
    """Class decorator: register one instance of a route class under ``cls.name``."""
    if cls.name in ROUTES and type(ROUTES[cls.name]) is not cls:
        raise ValueError(f"route name {cls.name!r} registered twice")
    ROUTES[cls.name] = cls()
    return cls
