"""One rank of a training run: ``python -m tailq.harness.worker --config RUN.json``.

Started by :mod:`tailq.harness.launch` (one process per rank, inside its network namespace when the network is
emulated) or directly by ``torchrun`` (which sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)::

    torchrun --nproc-per-node 2 --max-restarts 1 -m tailq.harness.worker --config runs/x/config.json

The training clock counts only training steps (forward, backward including the gradient exchange, optimizer);
evaluation, checkpoints, measurement probes and the one-time compilation of the fused codec kernels
(:func:`tailq.hooks.warm_kernels`, reported as ``kernel_warmup_s``) run with the clock paused. With
``--net model:RATE`` the clock counts the step's measured compute and codec time plus the cost model's
communication time for the bytes the hook handed to its collectives (every output is then labelled *modeled*).
A tailq hook's route planner gets the run's network (emulated or modeled) to plan against: the one it starts with.
With ``--net-schedule`` the rate changes at given steps (:mod:`tailq.harness.net_schedule`): the modeled clock
prices each step at its rate; on an emulated network every rank waits before the step, outside the clock, until the
launcher has changed the links; the hook is never told.
A checkpoint (model, optimizer, hook state, step, clock, history) is written every ``checkpoint_every`` steps; a
restarted worker resumes from the latest complete one.
After the warm-up, outside the clock, every rank times ``compute_calibration`` forward + backward passes without
communication (the training unchanged); with the optimizer's time, measured in every step, that gives how much of
the hook's time the backward pass hid (``overlap`` in the result, :mod:`tailq.harness.overlap`), beside DDP's
buckets (``buckets``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import tailq
from tailq.comm.network import Network
from tailq.comm.topology import Shape, link_seconds

from .config import RunConfig
from .fsdp import full_state as fsdp_full_state
from .fsdp import shard as fsdp_shard
from .launch import done_marker
from .net_schedule import wait_for_change
from .overlap import FSDP_SKIPPED, buckets_seen, calibrate_compute, ddp_buckets, overlap_start, run_overlap
from .stats import reached
from .workloads import Workload, load_workload

CKPT_KEEP = 2




def _batch_indices(n: int, rank: int, world: int, step: int, batch: int, seed: int) -> torch.Tensor:
    """This rank's batch at ``step``: its shard of a per-epoch permutation (deterministic, resumable)."""
    shard = n // world
    per_epoch = max(shard // batch, 1)
    epoch, pos = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    mine = perm[rank * shard : (rank + 1) * shard]
    return mine[(pos * batch) % shard : (pos * batch) % shard + batch]


def _tail_stats(grad: torch.Tensor) -> dict[str, Any]:
    from scipy import stats as sstats

    from tailq import theory

    g = grad.double().numpy()
    finite = np.isfinite(g)
    bad = int(g.size - finite.sum())  # a diverged run: its statistics are of the finite values, the count recorded
    g = g[finite & (g != 0)]
    out: dict[str, Any] = {"n": int(g.size), **({"nonfinite": bad} if bad else {})}
    if g.size < 100:
        return out
    out["mean_abs"] = float(np.mean(np.abs(g)))
    out["excess_kurtosis"] = float(sstats.kurtosis(g))
    out["laplace_scale"] = float(theory.fit_laplace(g).scale)
    try:
        pl = theory.fit_powerlaw(g)
        out.update(powerlaw_m=float(pl.m), powerlaw_gamma=float(pl.gamma), powerlaw_tail_fraction=pl.n_tail / pl.n)
    except ValueError:
        pass
    return out


class Checkpoints:
    def __init__(self, run_dir: Path, rank: int) -> None:
        self.dir = run_dir / "ckpt"
        self.rank = rank
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, step: int) -> Path:
        return self.dir / f"step{step:07d}-rank{self.rank}.pt"

    def save(self, step: int, payload: dict[str, Any]) -> None:
        tmp = self.path(step).with_suffix(".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, self.path(step))  # atomic: a crash never leaves a half-written checkpoint
        for old in sorted(self.dir.glob(f"step*-rank{self.rank}.pt"))[:-CKPT_KEEP]:
            old.unlink(missing_ok=True)

    def latest_common_step(self, world: int) -> int | None:
        """The newest step for which every rank's checkpoint exists."""
        steps = None
        for r in range(world):
            mine = {int(p.name[4:11]) for p in self.dir.glob(f"step*-rank{r}.pt")}
            steps = mine if steps is None else steps & mine
        return max(steps) if steps else None


def run(cfg: RunConfig) -> dict[str, Any] | None:
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != cfg.workers:
        raise RuntimeError(f"WORLD_SIZE={world} but the configuration asks for {cfg.workers} workers")
    torch.set_num_threads(cfg.threads)
    init_group(rank, world, datetime.timedelta(seconds=300))
    try:
        result = _train(cfg, rank, world)
        # every collective of the run has completed: a failure from here on (teardown) costs the run nothing
        done_marker(Path(cfg.run_dir), rank).write_text("done\n")
    finally:
        dist.destroy_process_group()
    _maybe_fail_at_exit(cfg, rank)
    return result


def init_group(rank: int, world: int, timeout: datetime.timedelta) -> None:
    """``init_process_group("gloo")``, with the store namespaced by torchrun's restart count when restarted.

    Under ``torchrun --max-restarts`` the workers of every attempt share the agent's TCPStore (torch >= 2.4 shares
    the rendezvous store by default), and the keys Gloo publishes its listening addresses under carry no attempt
    number: a restarted rank could read a dead peer's address from the previous attempt and fail with
    "connectFullMesh ... Connection refused" (pytorch/pytorch#135712; reproduced here on torch 2.13 about one
    restart in three). A prefix per attempt (``TORCHELASTIC_RESTART_COUNT``, the same on every worker of one
    agent) keeps attempts apart.
    """
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is None or "MASTER_ADDR" not in os.environ:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)
        return
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=rank == 0 and not agent_store, timeout=timeout)  # fmt: skip
    prefixed = dist.PrefixStore(f"tailq/attempt{restart}", store)
    dist.init_process_group("gloo", store=prefixed, rank=rank, world_size=world, timeout=timeout)


def _train(cfg: RunConfig, rank: int, world: int) -> dict[str, Any] | None:
    if cfg.diloco is not None:
        return _train_diloco(cfg, rank, world)
    run_dir, net = Path(cfg.run_dir), cfg.net
    wl, batch, model, opts = _setup(cfg, cfg.measure_every)
    n_params = sum(p.numel() for p in model.parameters())
    state: Any
    ddp: Any
    if cfg.fsdp:  # gradients through FSDP2's reduce-scatter (see tailq.harness.fsdp); ddp is the sharded model
        state = fsdp_shard(model, cfg.hook, opts)
        ddp = model
        warm = {k: v for k, v in opts.items() if k != "reduce"}
        kernel_warmup_s = (0.0 if cfg.hook in tailq.hooks.BUILTINS else
                           tailq.hooks.warm_kernels(cfg.hook, n_params, **{**warm, "route": "twophase"}))
    else:
        ddp = DDP(model, bucket_cap_mb=cfg.bucket_cap_mb)
        state, hook = tailq.ddp_hook(cfg.hook, **opts)
        ddp.register_comm_hook(state, hook)
        # compile the fused codec kernels now, outside the training clock (reported as kernel_warmup_s)
        kernel_warmup_s = tailq.hooks.warm_kernels(cfg.hook, n_params, **opts)
    opt = wl.make_optimizer(ddp.parameters())

    ck, step, clock, history, steps_log, resumed_from = _restore(cfg, run_dir, rank, world, model, opt, "hook", state)
    if resumed_from is not None:
        xb, yb = _batch(wl, rank, world, 0, batch, cfg.seed)
        tailq.hooks.prime_buckets(ddp, state, lambda: wl.loss(ddp(xb), yb).backward())

    grad_sample = None
    stop = False
    limit = max(cfg.steps, cfg.max_steps or 0) if cfg.extend_to_target is not None else cfg.steps
    shape = Shape(cfg.n_nodes, world // cfg.n_nodes)  # what the modeled clock prices (SPEC §9)
    change, step_net = 0, net  # --net-schedule: the network this step has (the hook is not told)
    waits: list[dict[str, Any]] = []
    # the compute alone, timed once outside the clock after the warm-up (tailq.harness.overlap); the buckets the
    # hook handled in the last step
    calib_from = overlap_start(cfg.hook, cfg.hook_options, cfg.hook in tailq.hooks.BUILTINS)
    calib_skip = FSDP_SKIPPED if cfg.fsdp else (None if cfg.compute_calibration else
                                                "no compute calibration (compute_calibration=0)")
    calib_samples: list[float] = []
    calib_at: int | None = None
    seen: dict[int, int] = {}
    while step < limit and not stop:
        change, step_net = _network_now(cfg, run_dir, rank, step, change, step_net, waits)
        xb, yb = _batch(wl, rank, world, step, batch, cfg.seed)
        if calib_at is None and calib_skip is None and step >= calib_from:  # every rank at the same step
            calib_samples = calibrate_compute(ddp, model, opt, wl.loss, xb, yb, cfg.compute_calibration)
            calib_at = step
        state.metrics.lap()
        loss, dt, opt_s = _timed_step(ddp, opt, wl, xb, yb)
        lap = state.metrics.lap()
        seen = buckets_seen(lap.records) or seen
        step_wall = dt - lap.measure_s  # vNMSE measurement collectives are not part of the method
        if net.kind == "model":  # every collective priced on its link: the node's shared NIC, or inside the node
            modeled = sum(link_seconds(step_net, r.scope, r.collective, r.handed_bytes, shape) for r in lap.records
                          if r.kind not in ("measure", "config"))
            step_clock = max(step_wall - lap.comm_s, 0.0) + modeled
        else:
            step_clock = step_wall
        clock += step_clock
        steps_log.append({"step": step, "clock": clock, "step_s": step_clock, "wall_s": step_wall,
                          "codec_s": lap.codec_s, "comm_s": lap.comm_s, "opt_s": opt_s,
                          "loss": float(loss.detach())})
        step += 1
        _maybe_fail(cfg, rank, step)
        if step % cfg.eval_every == 0 or step in (cfg.steps, limit):
            dist.barrier()
            full = fsdp_full_state(model) if cfg.fsdp else None  # a collective: every rank
            if rank == 0:
                acc, test_loss = wl.evaluate(model if full is None else _unsharded(wl, full))
                entry: dict[str, Any] = {"step": step, "clock": clock, "accuracy": acc, "test_loss": test_loss,
                         "train_loss": float(loss.detach())}
                # the local (uncompressed) gradient of one probe batch, for tail statistics: no DDP sync
                # through the plain module, not ddp(...): DDP's forward broadcasts the module's buffers (a causal
                # mask, BatchNorm statistics), a collective the other ranks, waiting at the broadcast below, would
                # match against the wrong message; under no_sync the reducer's gradient hooks stay idle
                if full is None:  # (FSDP: no unsynchronised local gradient to sample)
                    with ddp.no_sync():
                        opt.zero_grad(set_to_none=True)
                        wl.loss(model(xb), yb).backward()
                    grad_sample = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
                    opt.zero_grad(set_to_none=True)
                    entry["tail"] = _tail_stats(grad_sample)
                alphas = [v["alpha"] for v in state.metrics.last.values() if "alpha" in v]
                if alphas:
                    entry["alpha_max"] = float(max(alphas))
                history.append(entry)
                _progress(run_dir, step, cfg.steps, clock, acc)
            stop = _stop_here(cfg, rank, step, clock, history)
        if ck is not None and step % cfg.checkpoint_every == 0:
            ck.save(step, {"model": model.state_dict(), "optimizer": opt.state_dict(), "hook": state.state_dict(),
                           "step": step, "clock": clock, "history": json.dumps(history),
                           "steps_log": json.dumps(steps_log)})
    result = None
    final = fsdp_full_state(model) if cfg.fsdp else {k: v.detach() for k, v in model.state_dict().items()}
    if rank == 0:
        metrics = state.metrics
        overlap = run_overlap(steps_log, calib_samples, calib_from, calib_at, net.kind == "model", calib_skip)
        buckets: dict[str, Any] = {"fsdp": True} if cfg.fsdp else ddp_buckets(ddp, model, cfg.bucket_cap_mb)
        buckets["hook_seen"] = {str(i): n for i, n in sorted(seen.items())}  # the last step's, by bucket index
        result = {
            **_result_head(cfg, wl, n_params, waits, history, steps_log, step, stop, resumed_from, kernel_warmup_s),
            "fsdp": cfg.fsdp,
            "compute_s": overlap.get("compute_s"),  # rank 0's calibrated forward + backward (median)
            "overlap": overlap,
            "buckets": buckets,
            "wire": metrics.wire.summary(),
            **_hook_fields(metrics, final, model),
        }
        _write_result(run_dir, result, grad_sample)
        torch.save({k: v.clone() for k, v in final.items()}, run_dir / "final_model.pt")
    state.close()
    return result


def _timed_step(model: Any, opt: Any, wl: Workload, xb: torch.Tensor, yb: torch.Tensor
                ) -> tuple[torch.Tensor, float, float]:  # fmt: skip
    """One training step (forward, backward — with DDP, the gradient exchange — and the optimizer): (loss, seconds,
    the optimizer's seconds)."""
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss = wl.loss(model(xb), yb)
    loss.backward()
    t_opt = time.perf_counter()
    opt.step()
    t1 = time.perf_counter()
    return loss, t1 - t0, t1 - t_opt


def _hook_fields(metrics: Any, final: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, Any]:
    """The result's fields from the hook's metrics (routes, plan, vNMSE, fallbacks) and the final parameters."""
    return {"routes": sorted({v["route"] for v in metrics.last.values()}),
            "bucket_routes": {str(i): v["route"] for i, v in sorted(metrics.last.items())},
            "plan": _jsonable(getattr(metrics, "plan", {})),
            "vnmse": metrics.vnmse,
            "fallbacks": metrics.fallbacks,
            "direct_buckets": getattr(metrics, "direct", 0),  # bf16 buckets sent from DDP's thread (no worker hop)
            "final_params_checksum": float(sum(float(final[k].double().sum()) for k, _ in model.named_parameters()))}


def _write_result(run_dir: Path, result: dict[str, Any], grad_sample: torch.Tensor | None) -> None:
    (run_dir / "result.json").write_text(json.dumps(result, indent=1))
    if grad_sample is not None:
        np.save(run_dir / "grad_sample.npy", grad_sample.numpy())


def _restore(cfg: RunConfig, run_dir: Path, rank: int, world: int, model: torch.nn.Module, opt: Any, key: str,
             state: Any) -> tuple[Checkpoints | None, int, float, list[Any], list[Any], int | None]:
    """The checkpoints of the run, and what the latest one every rank saved restores (model, optimizer, the hook's or
    DiLoCo's state under ``key``): (checkpoints, step, clock, history, steps log, resumed-from step or None)."""
    ck = Checkpoints(run_dir, rank) if cfg.checkpoint_every else None
    latest = ck.latest_common_step(world) if ck is not None else None
    if ck is None or latest is None:
        return ck, 0, 0.0, [], [], None
    saved = torch.load(ck.path(latest), weights_only=True)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    state.load_state_dict(saved[key])
    step = int(saved["step"])
    return ck, step, float(saved["clock"]), json.loads(saved["history"]), json.loads(saved["steps_log"]), step


def _train_diloco(cfg: RunConfig, rank: int, world: int) -> dict[str, Any] | None:
    """A DiLoCo run (:class:`tailq.DiLoCo`): every rank trains its own model with the workload's optimizer; every H
    steps (per fragment) the outer mean of the pseudo-gradients goes through the run's hook, then the outer step.

    The clock counts the inner steps and the time ``diloco.step()`` blocks (the outer mean on the critical path, or
    the wait for a delayed one); before the clock pauses (an evaluation, a checkpoint) the means in flight are
    waited for on the clock, so none travels for free. Modeled network: each launch's collectives are priced on the
    link when it merges, less the compute of the inner steps it overlapped (τ > 0; launches in flight together are
    each credited with the same compute, optimistic only when two fragments' means overlap each other).
    Evaluations are of the global model (θ_global); every sync's outer vNMSE is measured against the exact fp32
    mean (not charged); the pseudo-gradient's tail statistics are recorded beside the gradient's at every evaluation.
    """
    from tailq.diloco import nesterov

    run_dir, net, d = Path(cfg.run_dir), cfg.net, dict(cfg.diloco or {})
    wl, batch, model, opts = _setup(cfg, 1 if cfg.measure_every else 0)  # every outer sync measured: they are few
    opt = wl.make_optimizer(model.parameters())
    n_params = sum(p.numel() for p in model.parameters())
    kernel_warmup_s = tailq.hooks.warm_kernels(cfg.hook, n_params, **opts)
    diloco = tailq.DiLoCo(model, opt, sync_every=int(d["sync_every"]), compressor=cfg.hook,
                          fragments=int(d.get("fragments", 1)), delay=int(d.get("delay", 0)),
                          merge_alpha=float(d.get("merge_alpha", 0.5)),
                          outer_optimizer=nesterov(float(d.get("outer_lr", 0.7)), float(d.get("outer_momentum", 0.9))),
                          **opts)
    ck, step, clock, history, steps_log, resumed_from = _restore(cfg, run_dir, rank, world, model, opt, "diloco",
                                                                 diloco)
    shape = Shape(cfg.n_nodes, world // cfg.n_nodes)
    change, step_net = 0, net
    waits: list[dict[str, Any]] = []
    priced: dict[int, float] = {}  # modeled: seconds of each launch's collectives (by the hook's step), on the link
    credit: dict[int, float] = {}  # modeled, τ > 0: compute seconds each launch in flight has overlapped
    grad_sample = None
    stop = False
    limit = max(cfg.steps, cfg.max_steps or 0) if cfg.extend_to_target is not None else cfg.steps
    merged = len(diloco.syncs)
    while step < limit and not stop:
        change, step_net = _network_now(cfg, run_dir, rank, step, change, step_net, waits)
        xb, yb = _batch(wl, rank, world, step, batch, cfg.seed)
        # (no lap here: a mean in flight issues collectives between two steps too, and they are this run's)
        loss, compute, opt_s = _timed_step(model, opt, wl, xb, yb)
        launched = diloco.launches
        t1 = time.perf_counter()
        diloco.step()
        t2 = time.perf_counter()
        lap = diloco.metrics.lap()
        outer_wall = max(t2 - t1 - lap.measure_s, 0.0)  # the vNMSE measurement is not the method's
        if net.kind == "model":
            for r in lap.records:
                if r.kind not in ("measure", "config"):
                    priced[r.step] = priced.get(r.step, 0.0) + link_seconds(step_net, r.scope, r.collective,
                                                                            r.handed_bytes, shape)
            for k in credit:  # the link works on the launches in flight while this step computes
                credit[k] += compute
            exposed = 0.0
            for sync in diloco.syncs[merged:]:  # merged in this step (every collective of it issued by now)
                k = int(sync["ordinal"])
                exposed += max(priced.pop(k, 0.0) - credit.pop(k, 0.0), 0.0)  # what the overlap did not hide
            for k in range(launched, diloco.launches):  # launched in this step and still in flight
                if all(int(sync["ordinal"]) != k for sync in diloco.syncs[merged:]):
                    credit[k] = 0.0
            step_clock = compute + max(outer_wall - lap.comm_s, 0.0) + exposed
        else:
            step_clock = compute + outer_wall
        merged = len(diloco.syncs)
        clock += step_clock
        steps_log.append({"step": step, "clock": clock, "step_s": step_clock, "wall_s": compute + outer_wall,
                          "codec_s": lap.codec_s, "comm_s": lap.comm_s, "opt_s": opt_s, "outer_s": outer_wall,
                          "loss": float(loss.detach())})
        step += 1
        _maybe_fail(cfg, rank, step)
        pause = step % cfg.eval_every == 0 or step in (cfg.steps, limit) or bool(
            ck is not None and step % cfg.checkpoint_every == 0)
        if pause and net.kind != "model":  # the clock pauses next: the means in flight arrive first, on the clock
            tw, meas0 = time.perf_counter(), diloco.metrics.seconds["measure"]
            diloco.wait()  # (the vNMSE measurement the hook runs first, on the same link, is not the method's)
            drained = max(time.perf_counter() - tw - (diloco.metrics.seconds["measure"] - meas0), 0.0)
            clock += drained
            steps_log[-1].update(clock=clock, step_s=steps_log[-1]["step_s"] + drained, drain_s=drained)
        if step % cfg.eval_every == 0 or step in (cfg.steps, limit):
            dist.barrier()
            if rank == 0:
                with diloco.global_model() as gm:
                    acc, test_loss = wl.evaluate(gm)
                entry: dict[str, Any] = {"step": step, "clock": clock, "accuracy": acc, "test_loss": test_loss,
                                         "train_loss": float(loss.detach())}
                opt.zero_grad(set_to_none=True)  # this rank's local gradient of one batch: the per-step tails
                wl.loss(model(xb), yb).backward()
                grad_sample = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
                opt.zero_grad(set_to_none=True)
                entry["tail"] = _tail_stats(grad_sample)
                if diloco.last_pseudo_gradient is not None:
                    entry["outer_tail"] = _tail_stats(diloco.last_pseudo_gradient)
                    entry["outer_tail"]["at_step"] = diloco.syncs[-1]["launched"] if diloco.syncs else None
                alphas = [v["alpha"] for v in diloco.metrics.last.values() if "alpha" in v]
                if alphas:  # the truncated quantizers' clipping threshold of the last outer mean
                    entry["outer_alpha_max"] = float(max(alphas))
                history.append(entry)
                _progress(run_dir, step, cfg.steps, clock, acc)
            stop = _stop_here(cfg, rank, step, clock, history)
        if ck is not None and step % cfg.checkpoint_every == 0:
            ck.save(step, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                           "diloco": diloco.state_dict(), "step": step, "clock": clock,
                           "history": json.dumps(history), "steps_log": json.dumps(steps_log)})
    diloco.flush()
    result = None
    if rank == 0:
        with diloco.global_model():
            final = {k: v.detach().clone() for k, v in model.state_dict().items()}
        metrics = diloco.metrics
        wire = metrics.wire.summary()
        method_bytes = sum(v["handed_bytes"] for k, v in wire["by_kind"].items()
                           if k not in ("measure", "config", "plan"))
        result = {
            **_result_head(cfg, wl, n_params, waits, history, steps_log, step, stop, resumed_from, kernel_warmup_s),
            "fsdp": False,
            "compute_s": None,
            "overlap": {"skipped": "DiLoCo: no per-step gradient exchange to overlap with backward"},
            "buckets": {"diloco_fragments": [f.numel for f in diloco.fragments]},
            "wire": wire,
            # the outer traffic per parameter and inner step (what a per-step hook's bits per coordinate compares to)
            "bits_per_param_step": 8 * method_bytes / (n_params * max(step, 1)),
            "diloco": {**d, "syncs": len(diloco.syncs), "skipped": diloco.skipped,
                       "wait_s": sum(x["waited_s"] for x in diloco.syncs),
                       "fragments_numel": [f.numel for f in diloco.fragments]},
            **_hook_fields(metrics, final, model),
        }
        _write_result(run_dir, result, grad_sample)
        torch.save(final, run_dir / "final_model.pt")
    diloco.close()
    return result


def _setup(cfg: RunConfig, measure_every: int) -> tuple[Workload, int, torch.nn.Module, dict[str, Any]]:
    """The workload (its learning rate overridden by ``--lr``), the batch size, the model (seeded) and the hook's
    options (tailq hooks: ``measure_every``, the seed, and the network the run really has, which route="auto" plans
    against — DDP hook, FSDP comm and DiLoCo alike)."""
    wl: Workload = load_workload(cfg.workload, seed=cfg.seed, data_dir=cfg.data_dir, tail_df=cfg.tail_df)
    if cfg.lr is not None:
        wl.lr = cfg.lr
    torch.manual_seed(cfg.seed)
    model = wl.make_model()
    opts = dict(cfg.hook_options)
    if cfg.hook not in tailq.hooks.BUILTINS:
        opts.setdefault("measure_every", measure_every)
        opts.setdefault("seed", cfg.seed)
        if cfg.net.known:
            opts.setdefault("network", cfg.net)
    return wl, cfg.batch_size or wl.batch_size, model, opts


def _network_now(cfg: RunConfig, run_dir: Path, rank: int, step: int, change: int, step_net: Network,
                 waits: list[dict[str, Any]]) -> tuple[int, Network]:
    """``--net-schedule``: the network this step has (the hook is not told), before the step's clock starts; on an
    emulated network every rank waits until the launcher has changed every link (the wait, outside the clock, goes
    to ``waits``)."""
    sched, net = cfg.net_schedule, cfg.net
    if sched is None or sched.change_at(step) == change:
        return change, step_net
    change = sched.change_at(step)
    if net.kind == "emulated":
        waits.append({"step": step, "wait_s": wait_for_change(run_dir, rank, sched, net, change, step)})
    return change, sched.network_at(net, step)


def _stop_here(cfg: RunConfig, rank: int, step: int, clock: float, history: list[dict[str, Any]]) -> bool:
    """After an evaluation: whether every rank stops now (rank 0 decides, one broadcast). Past the time budget; or at
    the step budget, unless ``extend_to_target`` continues while the target is not reached (rank 0 evaluated)."""
    over_time = bool(cfg.time_budget_s and clock > cfg.time_budget_s)
    done = step >= cfg.steps and (cfg.extend_to_target is None or (
        rank == 0 and reached(history, cfg.extend_to_target, cfg.target_metric)))
    flag = torch.tensor([1.0 if over_time or done else 0.0])
    dist.broadcast(flag, 0)
    return bool(flag[0] > 0)


def _result_head(cfg: RunConfig, wl: Workload, n_params: int, waits: list[dict[str, Any]],
                 history: list[dict[str, Any]], steps_log: list[dict[str, Any]], step: int, stop: bool,
                 resumed_from: Any, kernel_warmup_s: float) -> dict[str, Any]:
    """The fields every run's result starts with (DDP, FSDP2 and DiLoCo runs alike)."""
    sched, net = cfg.net_schedule, cfg.net
    return {
        "config": cfg.to_dict(),
        "name": cfg.name,
        "network": {**net.summary(), **({} if sched is None else sched.summary(net)),
                    **({"schedule_waits": waits} if waits else {})},  # rank 0's, outside the clock
        "workload_note": wl.note,
        "parameters": n_params,
        "history": history,
        "steps": steps_log,
        "steps_done": step,
        "stopped_early": stop and step < cfg.steps,
        "extended": step > cfg.steps,
        "resumed_from": resumed_from,
        "kernel_warmup_s": kernel_warmup_s,
    }


def _unsharded(wl: Workload, full: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A plain copy of the model holding the gathered FSDP parameters (rank 0 evaluates it)."""
    model = wl.make_model()
    model.load_state_dict(full)
    return model


def _fault_here(cfg: RunConfig) -> bool:
    """Fault injection applies to this run: TAILQ_FAULT_LABEL, when set, names the one run (a compare method)."""
    label = os.environ.get("TAILQ_FAULT_LABEL")
    return label is None or label == cfg.name


def _maybe_fail(cfg: RunConfig, rank: int, step: int) -> None:
    """Fault injection for tests: TAILQ_FAULT_EXIT_AT_STEP=k and TAILQ_FAULT_RANK=r make rank r die abruptly
    after step k — on the first attempt only (torchrun's TORCHELASTIC_RESTART_COUNT is 0 or unset)."""
    at = os.environ.get("TAILQ_FAULT_EXIT_AT_STEP")
    if at is None or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0 or not _fault_here(cfg):
        return
    if step == int(at) and rank == int(os.environ.get("TAILQ_FAULT_RANK", "1")):
        os._exit(17)


def _maybe_fail_at_exit(cfg: RunConfig, rank: int) -> None:
    """Fault injection for tests: TAILQ_FAULT_ABORT_AT_EXIT=r makes rank r abort (SIGABRT, as a C++ terminate in
    teardown would) after its last collective and the process group's destruction."""
    if os.environ.get("TAILQ_FAULT_ABORT_AT_EXIT") == str(rank) and _fault_here(cfg):
        os.abort()


def _batch(wl: Workload, rank: int, world: int, step: int, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = _batch_indices(len(wl.x_train), rank, world, step, batch, seed)
    return wl.x_train[idx], wl.y_train[idx]


def _progress(run_dir: Path, step: int, total: int, clock: float, acc: float) -> None:
    tmp = run_dir / "progress.tmp"
    tmp.write_text(json.dumps({"step": step, "total": total, "clock": clock, "accuracy": acc}))
    os.replace(tmp, run_dir / "progress.json")


def _jsonable(obj: Any) -> Any:
    """The planner's record with dict keys as strings (bucket sizes are ints)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    return obj


def main() -> None:
    """Run one rank, then leave with ``os._exit``: never through interpreter finalization.

    Gloo's worker threads run (and later release) the Python ``Future.then`` callbacks of PyTorch's PowerSGD hook,
    and they outlive ``destroy_process_group()`` while DDP's reducer still holds the group. A Gloo thread that needs
    the GIL after finalization has begun is ended by CPython with ``pthread_exit``, whose forced unwind meets a
    ``noexcept`` frame of the C++ future code: ``std::terminate`` — "terminate called without an active exception",
    SIGABRT, after every result was written (the stack, reproduced: README "What happens when…"). Exiting without
    finalization leaves no such window; stdout and stderr are flushed first, and every file was closed by then.
    """
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    args = ap.parse_args()
    code = 0
    try:
        run(RunConfig.load(args.config).validate())
    except SystemExit as err:
        code = err.code if isinstance(err.code, int) else 1
    except BaseException:  # noqa: BLE001 - printed like Python would, then the same exit without finalization
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()

