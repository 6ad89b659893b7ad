"""Rank functions for test_direct_passthrough.py: DDP on real Gloo ranks with buckets the hook sends as bf16 from
DDP's own thread (``TailqState._direct_passthrough``) beside buckets that go through its ordered worker."""

from __future__ import annotations

import time
from typing import Any

import torch
from workers import _dataset, _model, _train_steps

import tailq
from tailq.comm.network import Network

CAP_MB = 0.004
"""Three buckets in the model's steady layout: ~1.2k values (the last layer: first to be ready), 16k, ~4.2k."""


def _ddp(hook: str, opts: dict[str, Any]) -> tuple[Any, Any, Any]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(_model(), bucket_cap_mb=CAP_MB)
    state, fn = tailq.ddp_hook(hook, **opts)
    ddp.register_comm_hook(state, fn)
    return ddp, torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9), state


def _count_direct(state: Any) -> list[int]:
    """Count the buckets the hook sent from DDP's thread (the fast path returned a future)."""
    calls = [0]
    inner = state._direct_passthrough

    def counted(bucket: Any) -> Any:
        fut = inner(bucket)
        calls[0] += fut is not None
        return fut

    state._direct_passthrough = counted
    return calls


def w_mixed(rank: int, world: int, opts: dict[str, Any], direct: bool, steps: int) -> dict[str, Any]:
    """Train ``steps`` steps; ``direct=False`` turns the fast path off (every bucket through the worker)."""
    ddp, opt, state = _ddp("tnq", opts)
    calls = _count_direct(state)
    if not direct:
        state._direct_passthrough = lambda bucket: None
    _train_steps(rank, world, ddp, opt, 0, steps)
    sizes = {i: v["route"] for i, v in state.metrics.last.items()}
    assert state.metrics.direct == calls[0], (state.metrics.direct, calls[0])  # what the harness reports
    out = {"params": [p.detach().clone() for p in ddp.parameters()], "direct": calls[0], "routes": sizes,
           "wire": state.metrics.wire.summary()["by_kind"], "seconds": dict(state.metrics.seconds)}
    state.close()
    return out


def w_bf16_reference(rank: int, world: int, steps: int) -> list[torch.Tensor]:
    """The same training with tailq's bf16 hook (PyTorch's bf16_compress_hook code)."""
    ddp, opt, state = _ddp("bf16", {})
    _train_steps(rank, world, ddp, opt, 0, steps)
    state.close()
    return [p.detach().clone() for p in ddp.parameters()]


def w_loop(rank: int, world: int, steps: int) -> dict[str, Any]:
    """route="auto" told 50 Mbit/s on loopback, rank 1 30 ms slower on every compressed bucket: the loop moves the
    buckets to passthrough, which then goes from DDP's thread; the loop must still measure it and still probe."""
    ddp, opt, state = _ddp("tnq", {"bits": 3, "warmup_steps": 1, "min_bucket": 0, "redesign_every": 10,
                                   "network": Network.parse("model:50mbit")})
    calls = _count_direct(state)
    if rank == 1:
        inner = state._on_route

        def slow(g: torch.Tensor, step: int, idx: int, key: str, r: str, dest: Any) -> torch.Tensor:
            if r != "passthrough":
                time.sleep(0.03)
            return inner(g, step, idx, key, r, dest)

        state._on_route = slow
    routes: list[dict[int, str]] = []
    per_step: list[int] = []
    x, y = _dataset()
    for step in range(steps):
        before = calls[0]
        gen = torch.Generator().manual_seed(10_000 * step + rank)
        idx = torch.randint(0, len(x), (64,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ddp(x[idx]), y[idx]).backward()
        opt.step()
        routes.append({i: v["route"] for i, v in state.metrics.last.items()})
        per_step.append(calls[0] - before)
    state.worker.submit(lambda: torch.zeros(0)).wait()  # the last decision, if one is queued
    out = {"routes": routes, "direct": per_step, "loop": state.loop.report(), "buckets": len(routes[-1]),
           "params": [p.detach().clone() for p in ddp.parameters()]}
    state.close()
    return out


def w_timeout(rank: int, world: int) -> dict[str, Any]:
    """Every bucket bf16 (``min_bucket`` above them all), hook ``timeout_s=1``; at step 2 rank 1 joins 4 s late: rank
    0's backward must raise tailq's timeout after ~1 s (the fast path waits under the hook's timeout too)."""
    ddp, opt, state = _ddp("tnq", {"bits": 3, "warmup_steps": 1, "min_bucket": 10**9, "timeout_s": 1,
                                   "route": "allgather"})
    calls = _count_direct(state)
    x, y = _dataset()
    out: dict[str, Any] = {"error": "", "elapsed": 0.0}
    for step in range(3):
        if step == 2 and rank == 1:
            time.sleep(4.0)
        idx = torch.arange(64) + 64 * step
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(ddp(x[idx]), y[idx])
        t0 = time.perf_counter()
        try:
            loss.backward()
        except RuntimeError as err:
            out["error"], out["elapsed"] = str(err), time.perf_counter() - t0
            break
        opt.step()
    out["direct"] = calls[0]
    if rank == 0:
        time.sleep(4.0)  # rank 1's late all-reduce pairs with the one rank 0 issued: let it finish before teardown
    state.close()
    return out
