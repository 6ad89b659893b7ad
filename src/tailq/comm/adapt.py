"""The closed loop of ``route="auto"`` (SPEC §6.7): measure what each bucket's route really costs, and switch.

The cost model (:class:`~tailq.comm.routes.Planner`) is the prior. It prices a route from a network and a codec
measured apart from the run (one rank's codec alone, a quiet warm-up), so it can be wrong where the run's conditions
differ: four ranks on two cores, a busy machine, a link that got slower. The loop corrects it per bucket.

**Two arms per bucket.** The model's pick and its alternative: bf16 passthrough when the pick compresses, else the
model's cheapest compressing route (a hierarchical one where the shape has nodes of several workers). Each arm's
cost is the seconds the hook spends on the bucket with it, on the critical path: codec, collectives and the wait for
the slowest rank, on every rank; until an arm has been run, its cost is the model's.

**Agreed decisions.** Every ``every`` steps (and once ``first`` steps after the loop starts) the ranks all-reduce,
with MAX, one fixed-length vector (per 64 buckets): four numbers that must agree (how many buckets each tracks, the
first's index: a mismatch raises on every rank), then per bucket the median of each arm's seconds since the last
decision (``-1`` where it did not run). Every rank then applies the same rule to the same numbers, so every rank
issues the same collectives:

1. a bucket switches to its other arm when that arm's cost is below ``(1 - margin)`` × the current arm's
   (hysteresis: noise below the margin never flips a bucket) — on the model's word only for passthrough, whose
   price is the bf16 all-reduce the warm-up timed (or the given network's); a compressing arm is probed first;
2. otherwise it runs its other arm on the next step (a **probe**) when that arm was never measured and its modeled
   cost is within 2× of the current arm's; or it was measured ``2 / explore`` steps ago or more (doubling after
   each probe that confirmed the current arm, up to 2^``backoff``: routine re-probes use at most half the budget);
   or the current arm's cost has been away by more than ``drift`` from what it was when the other was measured, at
   two decisions in a row (a slower or faster link, a busier machine; one noisy window is not a change).

**Budget.** A bucket runs its other arm as a probe on at most ``1 + explore × (steps since the loop started)``
steps: the first probe, then ``explore`` of the steps (2% by default). Switches are not probes: they follow a
measurement.

The first sample of an arm after the bucket changed arm pays one-time costs (a design, a cold cache); it is left out
of the median when the arm has other samples in the window.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable
from typing import Any

import torch

from .wire import Comm, Tag

__all__ = ["BucketLoop", "ClosedLoop", "LoopConfig"]

NOT_RUN = -1.0
"""An arm that did not run since the last decision (in the agreed vector)."""
CHUNK = 64
"""Buckets per decision all-reduce (the vector has a fixed length, so every rank hands the same size)."""
PLAUSIBLE = 2.0
"""A probe is spent only on an arm whose known cost is within this factor of the current arm's."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoopConfig:
    """How the closed loop measures and decides (hook options ``adapt_every``, ``explore``)."""

    every: int = 4
    """Agree the measurements and decide every this many steps (0: no loop, the model's plan stays)."""
    first: int = 2
    """The first decision comes this many steps after the loop starts (the model's error shows at once)."""
    explore: float = 0.02
    """Fraction of a bucket's steps that may run its other arm to re-measure it (after one free probe)."""
    margin: float = 0.15
    """Switch only when the other arm is measured at least this much cheaper (hysteresis)."""
    drift: float = 0.5
    """Re-probe the other arm when the current arm's cost moved by more than this fraction since it was measured."""
    backoff: int = 4
    """Routine re-probes that confirm the current arm space out: ``2 / explore`` steps × 2^(confirmations, at most
    this many)."""

    def __post_init__(self) -> None:
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 0:
            raise ValueError(f"adapt_every must be an integer >= 0; got {self.every!r}")
        if not isinstance(self.explore, int | float) or isinstance(self.explore, bool) or not 0 <= self.explore <= 0.5:
            raise ValueError(f"explore must be a number in [0, 0.5]; got {self.explore!r}")

    @property
    def on(self) -> bool:
        return self.every > 0


@dataclasses.dataclass
class Arm:
    """One route a bucket may take, with what is known of its cost."""

    route: str
    cost: float
    """Seconds per bucket: agreed (max over ranks) median when ``measured``, else the cost model's."""
    measured: bool = False
    at: int = -1
    """The step of the decision that last measured it."""
    ref: float = 0.0
    """The other arm's cost when this one was last measured (to notice that conditions changed since)."""


@dataclasses.dataclass
class BucketLoop:
    """One bucket's loop: its two arms, which runs, its probes and switches."""

    key: str
    numel: int
    arms: list[Arm]
    """``[the model's pick, the alternative]``."""
    current: int = 0
    start: int = 0
    probe_at: int = -1
    """The step on which the other arm runs (a probe); -1: none scheduled."""
    probes: int = 0
    drifting: int = 0
    """Decisions in a row that saw the current arm's cost away from its reference by more than ``drift``."""
    quiet: int = 0
    """Probes in a row that confirmed the current arm (the routine re-probe period doubles with each)."""
    probe_steps: list[int] = dataclasses.field(default_factory=list)
    switches: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    samples: list[list[tuple[float, bool]]] = dataclasses.field(default_factory=lambda: [[], []])
    """This rank's (seconds, cold) per arm since the last decision."""
    last_arm: int = -1
    running: int = 0

    @property
    def other(self) -> int:
        return 1 - self.current

    def budget(self, step: int, explore: float) -> float:
        """Probes this bucket may have made by ``step``."""
        return 1.0 + explore * max(0, step - self.start)


class ClosedLoop:
    """Per-bucket route choice, corrected by measurement (see the module docstring).

    ``model(numel) -> (pick, alternative, seconds of each)``: the cost model's prior for a bucket size. ``trusted``:
    the routes whose modeled cost a bucket may switch to before it ran them (passthrough: its price is the bf16
    all-reduce the warm-up timed, or the given network's); any other arm is probed first.
    """

    def __init__(self, config: LoopConfig, model: Callable[[int], tuple[str, str, float, float]],
                 trusted: frozenset[str] = frozenset({"passthrough"})) -> None:
        self.config = config
        self.model = model
        self.trusted = trusted
        self.buckets: dict[int, BucketLoop] = {}
        self.first_step: int | None = None
        self.decisions = 0

    # -- each bucket -----------------------------------------------------------------------------------------
    def route(self, idx: int, key: str, numel: int, step: int) -> str:
        """The route bucket ``idx`` takes at ``step`` (the same on every rank: a function of agreed state)."""
        b = self.buckets.get(idx)
        if b is None or b.key != key:  # a new bucket, or DDP regrouped this one: start afresh from the model
            pick, alt, c_pick, c_alt = self.model(numel)
            b = BucketLoop(key, numel, [Arm(pick, c_pick), Arm(alt, c_alt)], start=step)
            self.buckets[idx] = b
            if self.first_step is None:
                self.first_step = step
        b.running = b.other if b.probe_at == step else b.current
        if b.probe_at == step:
            b.probe_steps.append(step)
        return b.arms[b.running].route

    def peek(self, idx: int, key: str, step: int) -> str | None:
        """The route :meth:`route` will give bucket ``idx`` at ``step``, without taking it (``None``: a bucket the
        loop does not track yet, or one DDP regrouped)."""
        b = self.buckets.get(idx)
        if b is None or b.key != key:
            return None
        return b.arms[b.other if b.probe_at == step else b.current].route

    def record(self, idx: int, seconds: float, arm: int | None = None) -> None:
        """This rank's seconds for bucket ``idx`` on the arm :meth:`route` gave it this step (``arm``: on that
        arm, for a measurement that completes later, after the bucket may have taken its next route)."""
        b = self.buckets[idx]
        a = b.running if arm is None else arm
        b.samples[a].append((seconds, a != b.last_arm))
        b.last_arm = a

    def running(self, idx: int) -> int:
        """The arm bucket ``idx`` runs on this step (after :meth:`route`)."""
        return self.buckets[idx].running

    # -- deciding ----------------------------------------------------------------------------------------------
    def due(self, step: int) -> bool:
        """Whether the end of ``step`` is a decision point (the same on every rank)."""
        if not self.config.on or self.first_step is None or not self.buckets:
            return False
        done = step + 1 - self.first_step
        return done == self.config.first or (done > self.config.first and (done - self.config.first)
                                              % self.config.every == 0)

    def decide(self, comm: Comm, tag: Tag, step: int) -> None:
        """Agree every bucket's measured costs (MAX over ranks) and apply the rule to each bucket."""
        vecs = self.agreement()
        for vec in vecs:
            comm.all_reduce(vec, tag, "plan", op="max")
        self.apply(vecs, step)

    def agreement(self) -> list[torch.Tensor]:
        """This rank's side of a decision: one vector per CHUNK buckets (one in all but the largest models) — a
        header every rank must match (how many buckets it tracks, its first bucket's index), then two medians per
        bucket. All-reduce each with MAX, then :meth:`apply` them."""
        order = sorted(self.buckets)
        vecs = []
        for c in range(0, max(1, len(order)), CHUNK):
            part = order[c : c + CHUNK]
            vec = torch.full((4 + 2 * CHUNK,), NOT_RUN, dtype=torch.float64)
            vec[:4] = torch.tensor([len(order), -len(order), order[0] if order else 0, -(order[0] if order else 0)])
            for j, i in enumerate(part):
                vec[4 + 2 * j] = _median(self.buckets[i].samples[0])
                vec[5 + 2 * j] = _median(self.buckets[i].samples[1])
            vecs.append(vec)
        return vecs

    def apply(self, vecs: list[torch.Tensor], step: int) -> None:
        """The rule, applied to the agreed vectors of :meth:`agreement` at the end of ``step``."""
        order = sorted(self.buckets)
        agreed = torch.empty(0, dtype=torch.float64)
        for c, vec in zip(range(0, max(1, len(order)), CHUNK), vecs, strict=True):
            part = order[c : c + CHUNK]
            if int(vec[0]) != -int(vec[1]) or int(vec[2]) != -int(vec[3]):
                raise RuntimeError(f"route=auto: the ranks track different buckets ({int(-vec[1])} to {int(vec[0])}; "
                                   f"this rank {len(order)}): their DDP bucket layouts differ")
            agreed = torch.cat([agreed, vec[4 : 4 + 2 * len(part)]])
        agreed = torch.cat([torch.zeros(2, dtype=torch.float64), agreed])
        self.decisions += 1
        cfg = self.config
        for j, i in enumerate(order):
            b = self.buckets[i]
            m = agreed[2 + 2 * j : 4 + 2 * j].tolist()
            cur, oth = b.arms[b.current], b.arms[b.other]
            probed = m[b.other] != NOT_RUN
            if probed:
                ref = m[b.current] if m[b.current] != NOT_RUN else cur.cost
                b.arms[b.other] = dataclasses.replace(oth, cost=m[b.other], measured=True, at=step, ref=ref)
            if m[b.current] != NOT_RUN:  # its reference: what the other arm costs now (measured or known)
                b.arms[b.current] = dataclasses.replace(cur, cost=m[b.current], measured=True, at=step,
                                                        ref=b.arms[b.other].cost)
            b.samples = [[], []]
            cur, oth = b.arms[b.current], b.arms[b.other]
            if b.probe_at <= step:
                b.probe_at = -1
            if oth.cost < cur.cost * (1.0 - cfg.margin) and (oth.measured or oth.route in self.trusted):
                b.switches.append({"step": step + 1, "from": cur.route, "to": oth.route, "from_s": cur.cost,
                                   "to_s": oth.cost, "from_measured": cur.measured, "to_measured": oth.measured,
                                   "why": f"{oth.route} {'measured' if oth.measured else 'modeled'} at "
                                          f"{oth.cost * 1e3:.3g} ms < {cur.route} "
                                          f"{'measured' if cur.measured else 'modeled'} at {cur.cost * 1e3:.3g} ms"})
                b.current, b.probe_at, b.quiet = b.other, -1, 0
                continue
            if probed:
                b.quiet += 1
            if b.probe_at >= 0 or b.probes + 1 > b.budget(step + 1, cfg.explore):
                continue
            if not oth.measured:  # the model's guess: worth a probe only if it is not far off the current arm
                due = oth.cost < PLAUSIBLE * cur.cost
            else:
                period = (2.0 / cfg.explore if cfg.explore > 0 else float("inf")) * 2 ** min(b.quiet, cfg.backoff)
                b.drifting = b.drifting + 1 if oth.ref > 0 and abs(cur.cost / oth.ref - 1.0) > cfg.drift else 0
                due = step + 1 - oth.at >= period or b.drifting >= 2
            if due:
                b.probe_at, b.probes = step + 1, b.probes + 1

    # -- report and persistence --------------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        """Per bucket: the model's pick, each arm's cost (measured or modeled), the route now, probes, switches."""
        return {str(i): {"numel": b.numel, "planned": b.arms[0].route, "route": b.arms[b.current].route,
                         "costs_ms": {a.route: round(a.cost * 1e3, 4) for a in b.arms},
                         "measured": {a.route: a.measured for a in b.arms}, "probes": b.probes,
                         "probe_steps": list(b.probe_steps), "switches": list(b.switches), "start": b.start}
                for i, b in sorted(self.buckets.items())}

    def state_dict(self) -> dict[str, Any]:
        return {"first_step": self.first_step, "decisions": self.decisions,
                "buckets": {str(i): {**dataclasses.asdict(b), "arms": [dataclasses.asdict(a) for a in b.arms],
                                     "samples": [[[s, c] for s, c in arm] for arm in b.samples]}
                            for i, b in self.buckets.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.first_step = state.get("first_step")
        self.decisions = int(state.get("decisions", 0))
        self.buckets = {}
        for i, d in (state.get("buckets") or {}).items():
            d = dict(d)
            arms = [Arm(**a) for a in d.pop("arms")]
            samples = [[(float(s), bool(c)) for s, c in arm] for arm in d.pop("samples")]
            self.buckets[int(i)] = BucketLoop(**d, arms=arms, samples=samples)


def _median(samples: list[tuple[float, bool]]) -> float:
    """The median seconds of an arm's samples, the cold ones left out when warm ones exist; ``NOT_RUN`` if none."""
    if not samples:
        return NOT_RUN
    warm = [s for s, cold in samples if not cold]
    return float(statistics.median(warm or [s for s, _ in samples]))
