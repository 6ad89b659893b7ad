"""The options of a tailq hook beyond its compressor's own, as one validated dataclass."""

from __future__ import annotations

import dataclasses
from typing import Any

from tailq.comm.routes import route_names
from tailq.options import check_int

__all__ = ["HookConfig"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class HookConfig:
    """Hook options (``tailq.ddp_hook(name, **options)``); every rank must pass the same ones (checked)."""

    route: str = "auto"
    """``auto`` (the cost model's pick per bucket size, bf16 passthrough included), ``allreduce`` (summable codes in
    headroom lanes), ``allgather`` (dense codes, or each rank's own encoding), ``twophase`` (all-to-all of shards,
    the owner's requantized mean all-gathered; shared-codebook quantizers), or ``hier-<inner>`` (exact
    reduce-scatter inside each node, ``<inner>`` = ``bf16``/``allreduce``/``allgather``/``twophase`` across nodes,
    all-gather inside the node; without several nodes of several workers it is its flat ``<inner>`` route)."""
    adapt_every: int = 4
    """``route="auto"``: the closed loop (:mod:`tailq.comm.adapt`) — every k steps the ranks agree each bucket's
    measured seconds on its route and on its alternative (bf16 passthrough, or the cheapest compressing route) and
    switch a bucket whose alternative is measured cheaper by a margin; 0: plan once from the cost model. Needs
    something to plan from (a ``network`` or ``warmup_steps`` >= 1): without either the plan is the deterministic
    one on bytes alone."""
    explore: float = 0.02
    """``route="auto"``: the fraction of a bucket's steps (after one free probe) that may re-measure its alternative."""
    gather_bits: int | None = None
    """Two-phase: bits of the owner's requantized mean shard, 1..8; ``None``: the compressor's bits + 2 (at most 8)."""
    owner_feedback: bool = False
    """Two-phase: the owner adds the residual of its previous requantization of the shard (server-side EF)."""
    error_feedback: bool | str = False
    """``True``/``"all"`` feeds back the whole residual, ``"truncation"`` only the clipped part (SPEC §5)."""
    stale_stats: bool = False
    """Design from the statistics agreed at the previous step (no blocking round trip; the first step blocks)."""
    redesign_every: int = 1
    """TUQ/TNQ/TBQ: design on every k-th compressed step only; in between agree just Σ|g| and rescale."""
    min_bucket: int = 8192
    """Buckets with fewer elements go as bf16: compression cannot pay for itself there ([H])."""
    warmup_steps: int = 1
    """The first steps go as bf16 (DDP rebuilds its buckets after step 0)."""
    fine_bits: int = 2
    """Extra bits of the fine grid that non-uniform levels snap to for the summable route."""
    measure_every: int = 0
    """Every k-th step also all-reduce the exact fp32 mean and record the vNMSE (not charged to the method)."""
    node_size: int | None = None
    """Workers per node (L; SPEC §9): ranks numbered node by node share a NIC. ``None``: torchrun's
    ``LOCAL_WORLD_SIZE`` where set, else one worker per node. Prices the routes on both links and enables the
    hierarchical routes (``hier-*``: exact inside the node, compressed across nodes)."""
    timeout_s: float = 300.0
    """Every wait on a collective: a dead or misconfigured peer raises instead of hanging."""

    def __post_init__(self) -> None:
        routes = route_names()
        if self.route not in routes:
            raise ValueError(f"route must be one of {', '.join(routes)}; got {self.route!r}")
        if self.error_feedback is True:
            object.__setattr__(self, "error_feedback", "all")
        if self.error_feedback not in (False, "all", "truncation"):
            raise ValueError(f"error_feedback must be False, True, 'all' or 'truncation'; got {self.error_feedback!r}")
        if self.gather_bits is not None:
            check_int("gather_bits", self.gather_bits, 1, 8)
        if not isinstance(self.owner_feedback, bool):
            raise ValueError(f"owner_feedback must be True or False; got {self.owner_feedback!r}")
        if not isinstance(self.stale_stats, bool):
            raise ValueError(f"stale_stats must be True or False; got {self.stale_stats!r}")
        check_int("adapt_every", self.adapt_every, 0)
        if isinstance(self.explore, bool) or not isinstance(self.explore, int | float) or not 0 <= self.explore <= 0.5:
            raise ValueError(f"explore must be a number in [0, 0.5]; got {self.explore!r}")
        object.__setattr__(self, "explore", float(self.explore))
        check_int("min_bucket", self.min_bucket, 0)
        check_int("warmup_steps", self.warmup_steps, 0)
        check_int("measure_every", self.measure_every, 0)
        check_int("redesign_every", self.redesign_every, 1)
        check_int("fine_bits", self.fine_bits, 0, 8)
        if self.node_size is not None:
            check_int("node_size", self.node_size, 1)
        if isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, int | float) or not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0; got {self.timeout_s!r}")
        object.__setattr__(self, "timeout_s", float(self.timeout_s))
        if self.redesign_every > 1 and self.stale_stats:
            raise ValueError(
                "redesign_every > 1 and stale_stats both take the codebook design off the critical path; "
                "choose one (between redesigns only two floats are all-reduced)"
            )

    @classmethod
    def names(cls) -> frozenset[str]:
        return frozenset(f.name for f in dataclasses.fields(cls))

    def digest(self) -> dict[str, Any]:
        """The options that decide what goes on the wire (every rank must agree; ``timeout_s`` may differ)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "timeout_s"}
