"""The closed loop of route="auto" (tailq.comm.adapt), simulated: ranks measure, agree (MAX), and switch.

Ranks are threads sharing a MAX all-reduce (the same arithmetic Gloo's would do), so the tests can give each rank
its own costs: what the loop must guarantee is that every rank takes the same route at every step whatever it
measured, that it switches to the cheaper arm within a bounded number of steps, that noise below its margin does not
flip a bucket, and that probes stay within ``1 + explore × steps``.
"""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Callable

import pytest
import torch

from tailq.comm.adapt import ClosedLoop, LoopConfig
from tailq.comm.wire import Tag

PICK, ALT = "twophase", "passthrough"


class MaxGroup:
    """``world`` threads' all-reduce MAX, in place (what Comm.all_reduce(op="max") does across processes)."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.barrier = threading.Barrier(world)
        self.slots: list[torch.Tensor | None] = [None] * world

    def comm(self, rank: int) -> FakeComm:
        return FakeComm(self, rank)


class FakeComm:
    def __init__(self, group: MaxGroup, rank: int) -> None:
        self.group, self.rank, self.calls = group, rank, 0

    def all_reduce(self, t: torch.Tensor, tag: Tag, kind: str, op: str = "sum") -> None:
        assert op == "max" and kind == "plan"
        self.calls += 1
        g = self.group
        g.slots[self.rank] = t.clone()
        g.barrier.wait()
        agreed = torch.stack([s for s in g.slots if s is not None]).max(0).values
        g.barrier.wait()
        t.copy_(agreed)


def model(numel: int) -> tuple[str, str, float, float]:
    """The prior: the model picks the compressing route at 1 ms, passthrough modeled at 2 ms."""
    return PICK, ALT, 1e-3, 2e-3


Cost = Callable[[int, int, int, str], float]  # (rank, step, bucket, route) -> seconds


def simulate(cost: Cost, *, world: int = 3, steps: int = 200, buckets: int = 3,
             config: LoopConfig | None = None) -> list[dict[int, list[str]]]:
    """Every rank's route per bucket and step (rank -> bucket -> [route at step 0, 1, ...])."""
    config = config or LoopConfig()
    group = MaxGroup(world)
    out: list[dict[int, list[str]]] = [{} for _ in range(world)]
    loops = [ClosedLoop(config, model) for _ in range(world)]
    errors: list[BaseException] = []

    def rank_main(rank: int) -> None:
        try:
            loop, comm = loops[rank], group.comm(rank)
            for step in range(steps):
                for b in range(buckets):
                    route = loop.route(b, f"k{b}", 1000 * (b + 1), step)
                    out[rank].setdefault(b, []).append(route)
                    loop.record(b, cost(rank, step, b, route))
                if loop.due(step):
                    loop.decide(comm, Tag(step, buckets - 1, 1, "plan"), step)  # type: ignore[arg-type]
        except BaseException as e:  # noqa: BLE001 - surfaced below
            errors.append(e)
            group.barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    simulate.loops = loops  # type: ignore[attr-defined]
    return out


def first_step_on(routes: list[str], route: str, after: int = 0) -> int:
    return next(i for i, r in enumerate(routes) if i >= after and r == route)


def test_ranks_that_measure_different_costs_take_the_same_route_at_every_step() -> None:
    """Rank 1 finds passthrough cheaper, rank 2 the compressing route, each with noise of its own: the MAX over
    ranks decides, so every rank issues the same route at every step (no mismatched collectives)."""
    rng = [random.Random(r) for r in range(3)]

    def cost(rank: int, step: int, b: int, route: str) -> float:
        base = {0: {PICK: 3e-3, ALT: 3e-3}, 1: {PICK: 5e-3, ALT: 1e-3}, 2: {PICK: 1e-3, ALT: 6e-3}}[rank][route]
        return base * (1 + 0.5 * rng[rank].random())

    out = simulate(cost, world=3)
    for b in out[0]:
        assert out[0][b] == out[1][b] == out[2][b]
    # the slowest rank's view decides: MAX(PICK) ~ 5-7.5 ms, MAX(ALT) ~ 6-9 ms: the compressing route stays
    assert all(routes[-1] == PICK for routes in out[0].values())


def test_a_route_measured_slower_than_passthrough_is_left_within_first_decision() -> None:
    """The model's pick costs 3x passthrough when run: passthrough is modeled at 2 ms, the pick measured at 6 ms,
    so the first decision (after ``first`` steps) moves every bucket to passthrough; the loop then measures it and
    stays."""
    cfg = LoopConfig()

    def cost(rank: int, step: int, b: int, route: str) -> float:
        return {PICK: 6e-3, ALT: 2e-3}[route]

    out = simulate(cost, config=cfg)
    for routes in out[0].values():
        assert routes[: cfg.first] == [PICK] * cfg.first and routes[cfg.first] == ALT
        # afterwards the pick runs only as a re-probe: after 50 steps, then backing off (100, 200, ...)
        assert routes[cfg.first :].count(PICK) <= 3, [i for i, r in enumerate(routes) if r == PICK]


def test_a_slower_link_moves_buckets_to_compression_and_a_fast_one_back_within_bounded_steps() -> None:
    """Passthrough's communication costs 1 ms until step 60, 20 ms until step 140, then 1 ms again; the compressing
    route costs 2 ms of codec plus a fifth of passthrough's communication (its bytes). The loop must move to
    compression within one decision period of the slowdown (passthrough is what runs: the change is measured at
    once), and back after the speed-up within a decision period of its next probe (compression's own cost drops by
    more than ``drift``, which makes the loop re-measure passthrough as soon as the probe budget allows)."""
    cfg = LoopConfig()

    def cost(rank: int, step: int, b: int, route: str) -> float:
        comm = 20e-3 if 60 <= step < 140 else 1e-3
        return comm if route == ALT else 2e-3 + comm / 5

    out = simulate(cost, steps=260, config=cfg)
    bound = cfg.first + cfg.every + 1
    for routes in out[0].values():
        assert routes[10:60].count(PICK) <= 1, routes[10:60]  # a routine re-probe at most
        down = first_step_on(routes, PICK, after=60)
        assert down - 60 <= bound, (down, routes[55:80])
        assert routes[down:140].count(ALT) <= 2  # at most a probe of passthrough while the link is slow
        probes_by_140 = sum(1 for i, r in enumerate(routes[:140]) if r != routes[i - 1] and i > 0) // 2 + 1
        budget_at = int(math.ceil(max(140, (probes_by_140 + 1 - 1) / cfg.explore)))  # the next probe's first step
        back = first_step_on(routes, ALT, after=140)
        assert back - budget_at <= cfg.every + 2, (back, budget_at, routes[140:170])
        assert back - 140 <= 1 / cfg.explore  # whatever the budget: within 50 steps
        assert routes[back + cfg.every :].count(PICK) <= 2  # then passthrough, but for a routine re-probe


def test_noise_below_the_margin_never_flips_a_bucket() -> None:
    """Both arms cost 2 ms ± 5% (independent noise per rank and step): the margin (15%) holds every bucket."""
    rng = random.Random(7)
    lock = threading.Lock()

    def cost(rank: int, step: int, b: int, route: str) -> float:
        with lock:
            return 2e-3 * (1 + 0.05 * (2 * rng.random() - 1))

    def tie(numel: int) -> tuple[str, str, float, float]:
        return PICK, ALT, 2e-3, 2e-3

    group = MaxGroup(1)
    loop = ClosedLoop(LoopConfig(), tie)
    comm = group.comm(0)
    for step in range(400):
        for b in range(3):
            route = loop.route(b, f"k{b}", 4096, step)
            loop.record(b, cost(0, step, b, route))
        if loop.due(step):
            loop.decide(comm, Tag(step, 2, 1, "plan"), step)  # type: ignore[arg-type]
    assert all(not b["switches"] for b in loop.report().values()), loop.report()


@pytest.mark.parametrize("explore", [0.0, 0.02, 0.1])
def test_exploration_stays_within_its_budget(explore: float) -> None:
    """Costs that drift all the time (so the loop always wants to re-probe): per bucket, the steps run on the other
    arm as probes never exceed 1 + explore x (steps since the loop started), at any point of the run."""
    cfg = LoopConfig(explore=explore)

    def cost(rank: int, step: int, b: int, route: str) -> float:
        wobble = 1.0 + 0.9 * ((step // 7) % 2)  # the current arm's cost jumps by 90% every 7 steps: drift
        return (2e-3 if route == PICK else 3e-3) * wobble

    steps = 600
    simulate(cost, world=2, steps=steps, config=cfg)
    for loop in simulate.loops:  # type: ignore[attr-defined]
        for b in loop.buckets.values():
            for i, s in enumerate(b.probe_steps):
                assert i + 1 <= 1 + explore * (s - b.start) + 1e-9, (i, s, b.probe_steps)
            assert len(b.probe_steps) <= 1 + explore * steps
            if explore > 0:
                assert len(b.probe_steps) >= 1  # drift did make it probe


def test_decisions_are_agreed_only_with_the_same_buckets_on_every_rank() -> None:
    """A rank tracking another bucket count fails on every rank (DDP layouts differ), never a silent mismatch."""
    group = MaxGroup(2)
    loops = [ClosedLoop(LoopConfig(), model) for _ in range(2)]
    errors: list[str] = []

    def run(rank: int) -> None:
        loop = loops[rank]
        for b in range(2 + rank):
            loop.route(b, f"k{b}", 100, 0)
            loop.record(b, 1e-3)
        try:
            loop.decide(group.comm(rank), Tag(0, 0, 1, "plan"), 0)  # type: ignore[arg-type]
        except RuntimeError as e:
            errors.append(str(e))

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(errors) == 2 and all("different buckets" in e for e in errors)


def test_state_round_trips_and_a_resumed_loop_decides_as_the_original() -> None:
    """state_dict/load_state_dict mid-run: the resumed loop takes the same routes as the uninterrupted one."""
    def cost(rank: int, step: int, b: int, route: str) -> float:
        return {PICK: 4e-3, ALT: 2e-3}[route] * (1 + 0.01 * ((step * 7 + b) % 5))

    a = ClosedLoop(LoopConfig(), model)
    comm = MaxGroup(1).comm(0)
    routes_a, routes_b = [], []
    for step in range(120):
        if step == 50:
            b = ClosedLoop(LoopConfig(), model)
            b.load_state_dict(a.state_dict())
        for k in range(2):
            r = a.route(k, f"k{k}", 100, step)
            a.record(k, cost(0, step, k, r))
            routes_a.append(r)
            if step >= 50:
                rb = b.route(k, f"k{k}", 100, step)
                b.record(k, cost(0, step, k, rb))
                routes_b.append(rb)
        if a.due(step):
            a.decide(comm, Tag(step, 1, 1, "plan"), step)  # type: ignore[arg-type]
            b.decide(comm, Tag(step, 1, 1, "plan"), step) if step >= 50 else None  # type: ignore[arg-type, func-returns-value]
    assert routes_b == routes_a[100:]
    assert a.report() == b.report()


def test_bad_options_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="adapt_every"):
        LoopConfig(every=-1)
    with pytest.raises(ValueError, match="explore"):
        LoopConfig(explore=0.9)
