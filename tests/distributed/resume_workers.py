"""Workers for test_resume.py (spawned ranks import them by module name): bucket-layout changes, a checkpoint
taken between the warm-up and the plan, and world size 1."""

from __future__ import annotations

from typing import Any

import torch
from workers import FakeBucket, _dataset, _ddp, heavy

from tailq.hooks.tailq_hook import TailqState, bucket_key


def w_residuals_across_regrouping(rank: int, world: int) -> dict[str, Any]:
    """Under static_graph DDP regroups its buckets after step 1. Per parameter: the residual step 1 left (under the
    first layout) and the residual step 2 added to the gradient (under the new one), read off the buckets."""
    ddp, opt, state = _ddp("tnq", {"bits": 2, "min_bucket": 0, "error_feedback": True, "route": "allreduce"},
                           static_graph=True)
    params: dict[str, list[tuple[int, int]]] = {}  # bucket key → (parameter id, numel) in buffer order
    keys: dict[int, list[str]] = {}  # step → bucket keys
    added: dict[str, torch.Tensor] = {}  # bucket key → the residual compensate added at step 2
    process, compensate = state.process, state.memory.compensate

    def spy_process(bucket: Any) -> torch.Tensor:
        key = bucket_key(bucket)
        params.setdefault(key, [(id(p), p.numel()) for p in bucket.parameters()])
        keys.setdefault(state.step, []).append(key)
        return process(bucket)

    def spy_compensate(key: str, g: torch.Tensor) -> torch.Tensor:
        if state.step == 2:  # what compensate is about to add (carried over, if the layout changed)
            m = state.memory
            added[key] = (m.rounding.get(key, torch.zeros_like(g)) + m.truncation.get(key, 0)).clone()
        return compensate(key, g)

    state.process, state.memory.compensate = spy_process, spy_compensate
    left: dict[str, torch.Tensor] = {}
    x, y = _dataset()
    for step in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ddp(x[64 * step : 64 * step + 64]), y[64 * step : 64 * step + 64]).backward()
        opt.step()
        if step == 1:  # the residuals the first layout holds after step 1 (truncation + rounding)
            m = state.memory
            left = {k: m.rounding[k] + m.truncation.get(k, 0) for k in set(m.rounding) | set(m.truncation)}

    def per_param(key: str, flat: torch.Tensor) -> dict[int, torch.Tensor]:
        out, off = {}, 0
        for pid, n in params[key]:
            out[pid] = flat[off : off + n]
            off += n
        return out

    before = {pid: r for k, flat in left.items() for pid, r in per_param(k, flat).items()}
    after = {pid: r for k, flat in added.items() for pid, r in per_param(k, flat).items()}
    state.close()
    return {"keys": keys, "params": sorted(before), "same": sorted(before) == sorted(after) and all(
        torch.equal(before[p], after[p]) for p in before), "norm": float(sum(r.norm() ** 2 for r in before.values()))}


def w_checkpoint_after_warmup(rank: int, world: int) -> dict[str, Any]:
    """route="auto", the network fitted from 2 warm-up steps: a state saved at the end of the warm-up (before the
    plan) and loaded into a fresh state plans against the same fitted network as the state that went on."""
    def buckets(step: int) -> list[FakeBucket]:
        return [FakeBucket(heavy(d, seed=rank + 10 * i + 100 * step), index=i, last=i == 1)
                for i, d in enumerate((20_000, 300_000))]

    state = TailqState("tnq", bits=3, warmup_steps=2, min_bucket=0)
    for step in range(2):
        for b in buckets(step):
            state.process(b)
    saved = state.state_dict()
    again = TailqState("tnq", bits=3, warmup_steps=2, min_bucket=0)
    again.load_state_dict(saved)
    for st in (state, again):  # the first compressed step: both calibrate now
        for b in buckets(2):
            st.process(b)
    out = {"went_on": state.metrics.plan, "resumed": again.metrics.plan, "saved": saved.get("warmup_timings")}
    state.close()
    again.close()
    return out


def w_world_of_one(rank: int, world: int) -> list[tuple[str, str, bool, str]]:
    """World size 1: every tailq hook leaves the gradient exactly as it is, on every route."""
    out = []
    g = heavy(50_000, seed=3)
    for name, route in (("tnq", "auto"), ("tnq", "twophase"), ("tnq", "allgather"), ("tuq", "allreduce"),
                        ("qsgd", "allgather")):
        state = TailqState(name, bits=3 if name != "qsgd" else 4, route=route, warmup_steps=0, min_bucket=0)
        buf = g.clone()
        for _ in range(2):
            state.process(FakeBucket(buf))
        out.append((name, route, torch.equal(buf, g), state.metrics.last[0]["route"]))
        state.close()
    return out


def w_unused_loaded_residuals(rank: int, world: int) -> list[str]:
    """A state with residuals for one bucket layout, loaded where the buckets are laid out otherwise: the warnings
    logged after the first step."""
    import logging

    opts = {"bits": 3, "warmup_steps": 1, "min_bucket": 0, "error_feedback": True, "route": "allreduce"}
    state = TailqState("tnq", **opts)
    for _ in range(2):  # the warm-up step, then one that leaves a residual
        state.process(FakeBucket(heavy(4096, seed=rank)))
    saved = state.state_dict()
    state.close()
    again = TailqState("tnq", **opts)
    again.load_state_dict(saved)
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler = Keep(logging.WARNING)
    logging.getLogger("tailq").addHandler(handler)
    try:
        for _ in range(2):  # the same parameters in two buckets of 2048: other keys than the saved one
            again.process(FakeBucket(heavy(2048, seed=rank), index=0, last=False))
            again.process(FakeBucket(heavy(2048, seed=rank + 1), index=1, last=True))
    finally:
        logging.getLogger("tailq").removeHandler(handler)
        again.close()
    return seen


def w_resume_with_other_options(rank: int, world: int) -> dict[str, str]:
    """A state loaded by a hook with another ``measure_every`` (measurement only), another ``timeout_s``, or other
    ``bits`` (arithmetic): "ok" or the error."""
    base = {"bits": 3, "warmup_steps": 1, "min_bucket": 0, "error_feedback": True, "route": "allreduce"}
    state = TailqState("tnq", **base)
    for _ in range(2):
        state.process(FakeBucket(heavy(4096, seed=rank)))
    saved = state.state_dict()
    state.close()
    out = {}
    for what, change in (("measure_every", {"measure_every": 2}), ("timeout_s", {"timeout_s": 600}),
                         ("bits", {"bits": 4})):
        again = TailqState("tnq", **{**base, **change})
        try:
            again.load_state_dict(saved)
            again.process(FakeBucket(heavy(4096, seed=rank)))
            out[what] = "ok" if again.step == 3 else f"step {again.step}"
        except ValueError as err:
            out[what] = str(err).splitlines()[0]
        again.close()
    return out
