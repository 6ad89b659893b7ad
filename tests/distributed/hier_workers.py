"""Rank functions for the hierarchical-route tests (spawned by ``workers.launch``; importable by the children)."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from workers import FakeBucket, heavy

import tailq
from tailq.comm.network import Network
from tailq.comm.routes import ROUTES
from tailq.comm.routes.hierarchical import NodeComms
from tailq.comm.topology import Shape
from tailq.comm.wire import Comm, Tag, WireLog, new_group_like


def grads(world: int, d: int, step: int) -> list[torch.Tensor]:
    """Every rank's gradient at ``step`` (every rank can rebuild every other's: the references need them)."""
    return [heavy(d, 1000 * step + r) * (1.0 + 0.5 * r) for r in range(world)]


def exact(world: int, d: int, step: int) -> torch.Tensor:
    """The exact mean as float64."""
    return torch.stack([g.double() for g in grads(world, d, step)]).mean(0)


def set_env(env: dict[str, str] | None, rank: int) -> None:
    for k, v in (env or {}).items():
        os.environ[k] = v.format(rank=rank, local=rank % 2, node=rank // 2)


def w_exact_stages(rank: int, world: int, L: int, d: int) -> dict[str, Any]:
    """The hierarchical route with an exact fp32 mean across nodes: must equal the exact mean."""
    shape = Shape(world // L, L)
    log = WireLog()
    pg = dist.distributed_c10d._get_default_group()
    node = Comm(new_group_like(pg, shape.node_ranks(shape.node_of(rank)), "t_node"), log, 60, scope="node", shape=shape)
    cross = Comm(new_group_like(pg, shape.cross_ranks(shape.local_of(rank)), "t_cross"), log, 60, scope="cross",
                 shape=shape)
    comms = NodeComms(shape, rank, node, cross)
    tag = Tag(0, 0, d, "hier-twophase")

    def exact_across(comm: Comm, x: torch.Tensor, inner: str) -> torch.Tensor:
        t = x / comm.n
        comm.all_reduce(t, tag, "payload")
        return t

    g = grads(world, d, 0)[rank]
    out = ROUTES["hier-twophase"].run(comms, tag, g.clone(), exact_across)  # type: ignore[attr-defined]
    into = torch.empty(d)
    ROUTES["hier-twophase"].run(comms, tag, g.clone(), exact_across, into)  # type: ignore[attr-defined]
    return {"out": out, "into": into, "exact": exact(world, d, 0), "nic": log.totals["payload"][2],
            "node_bytes": log.totals["node"][0]}


def w_hook_steps(rank: int, world: int, name: str, opts: dict[str, Any], d: int, steps: int,
                 env: dict[str, str] | None = None, same: bool = False) -> dict[str, Any]:
    """``steps`` buckets through the hook (gradients of step 0 every time when ``same``); outputs and metrics."""
    set_env(env, rank)
    if isinstance(opts.get("network"), str):
        opts = {**opts, "network": Network.parse(opts["network"])}
    state, hook = tailq.ddp_hook(name, **opts)
    outs, infos = [], []
    for s in range(steps):
        g = grads(world, d, 0 if same else s)[rank]
        out = hook(state, FakeBucket(g.clone())).wait()
        outs.append(out[0] if isinstance(out, list) else out)
        infos.append({k: v for k, v in state.metrics.last.get(0, {}).items() if k in ("alpha", "route")}
                     | {"levels": torch.as_tensor(state.metrics.last.get(0, {}).get("levels", [])).double()})
    res = {"outs": torch.stack(outs), "infos": infos, "topology": state.metrics.topology,
           "wire": state.metrics.wire.summary(), "fallbacks": list(state.metrics.fallbacks),
           "vnmse": list(state.metrics.vnmse), "plan_network": state.metrics.plan.get("network"),
           "plan_route": (state.metrics.plan.get("buckets") or {}).get(d, {}).get("route")}
    if state.shape is not None and "route" in opts:
        res["model_nic_bits"] = state.planner.nic_bits(opts.get("route", "auto"), d)
    state.close()
    return res


def w_bad_topology(rank: int, world: int, opts: dict[str, Any], env: dict[str, str] | None) -> str:
    set_env(env, rank)
    state, hook = tailq.ddp_hook("tnq", bits=3, warmup_steps=0, min_bucket=0, **opts)
    try:
        hook(state, FakeBucket(heavy(4096, rank))).wait()
    except Exception as err:  # noqa: BLE001 - the message is the result
        return f"error: {err}"
    finally:
        state.close()
    return f"ok: {state.metrics.topology}"


def w_nonfinite(rank: int, world: int, d: int) -> dict[str, Any]:
    """Rank 3 sends a NaN at coordinate 5: that coordinate's shard goes in fp32, every rank alike."""
    state, hook = tailq.ddp_hook("tnq", bits=3, warmup_steps=0, min_bucket=0, route="hier-twophase", node_size=2)
    g = grads(world, d, 0)[rank].clone()
    if rank == 3:
        g[5] = float("nan")
    out = hook(state, FakeBucket(g)).wait()
    out = out[0] if isinstance(out, list) else out
    res = {"out": out, "fallbacks": list(state.metrics.fallbacks)}
    state.close()
    return res


def w_ddp(rank: int, world: int, route: str, steps: int) -> dict[str, Any]:
    """A small model under DDP with the hierarchical route on 2 nodes x 2 workers: replicas stay identical."""
    from workers import _ddp, _full_loss, _train_steps

    ddp, opt, state = _ddp("tnq", {"bits": 3, "route": route, "node_size": 2, "error_feedback": True,
                                   "min_bucket": 0, "measure_every": 1})
    before = _full_loss(ddp)
    _train_steps(rank, world, ddp, opt, 0, steps)
    params = torch.cat([p.detach().reshape(-1) for p in ddp.parameters()])
    res = {"before": before, "after": _full_loss(ddp), "params": params, "routes": sorted(
        {v.get("route") for v in state.metrics.last.values()}),
        "vnmse": [r for r in state.metrics.vnmse if not r.get("warmup")]}
    state.close()
    return res
