"""The tailq DDP communication hook: :func:`tailq_hook` and its state, :class:`TailqState`.

The state composes four parts, each from its own layer, so a new compressor touches only ``codec/`` and a new
route only ``comm/routes/``:

* the **compressor** (:mod:`tailq.codec`), whose ``aggregation`` attribute picks its **family**
  (:mod:`tailq.comm.families`: shared codebook, agreed scales, per rank);
* the **codebook policy** (:mod:`tailq.comm.agree`: every step, one step stale, every k-th step rescaled);
* the **routes** and their planner (:mod:`tailq.comm.routes`: bf16 passthrough, summable all-reduce, all-gather,
  two-phase), whose cost model is the caller's network (the harness passes its ``--net``) or one fitted from the
  timed bf16 all-reduces of the warm-up steps, plus the codec's own cost measured on every rank (agreed, so every
  rank plans the same routes; the plan and why is in ``metrics.plan``);
* **error feedback** (:class:`~tailq.codec.ErrorFeedback`), keyed per bucket like the policy's cache.

Every bucket runs on the state's :class:`~tailq.comm.worker.OrderedWorker`, so all ranks issue their collectives
in the same order, and — from the first bucket of a backward on — on a process group of the state's own
(:func:`~tailq.comm.wire.own_group`: the ranks, backend and timeout of ``process_group``), so DDP's own collectives
(``find_unused_parameters=True``, ``static_graph=True``) cannot interleave with them. The one exception: a bucket
that goes as bf16 this step (the closed loop settled on passthrough, or it is below ``min_bucket``) while the worker
is idle is issued straight from DDP's thread, as PyTorch's ``bf16_compress_hook`` does — the same collective at the
same point of the sequence, without the thread hop (:meth:`TailqState._direct_passthrough`).

Faults: a bucket with NaN/Inf on any rank goes uncompressed in fp32 on every rank (detected through the agreed
statistics), so non-finite values arrive exactly as with plain DDP and ``GradScaler`` skips the step. Ranks with
different configurations fail on the first bucket with the configurations listed. Every wait has a timeout. A
failure inside a backward reaches the user as tailq's own exception, raised by ``loss.backward()``
(:class:`~tailq.comm.worker.Handoff`).
"""

import dataclasses
import logging
import math
import threading
import time
import zlib
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from tailq.codec import (
    Aggregation,
    Codebook,
    Compressor,
    ErrorFeedback,
    compressor,
    get_compressor_class,
    list_compressors,
)
from tailq.codec.base import registered_in_order
from tailq.comm.adapt import ClosedLoop, LoopConfig
from tailq.comm.agree import policy_for
from tailq.comm.families import family_for
from tailq.comm.network import (
    MAX_NODE_RATE_BPS,
    MAX_RATE_BPS,
    PLANNING_DEFAULT,
    Network,
    fit_network,
    ring_traffic_bytes,
)
from tailq.comm.routes import PASSTHROUGH, ROUTES, CodecCost, Planner, ShardCheck, is_staged, zero_outcome
from tailq.comm.routes.hierarchical import BF16, Hierarchical, NodeComms, node_shard_numel
from tailq.comm.topology import Shape, detect
from tailq.comm.topology import agree as agree_shape
from tailq.comm.wire import Comm, Tag, new_group_like, own_group
from tailq.comm.worker import Handoff, OrderedWorker
from tailq.kernels import RandKey, dispatch

from .config import HookConfig
from .layout import BucketLayouts
from .metrics import HookMetrics

__all__ = ["MEASUREMENT_ONLY", "TailqState", "bucket_key", "measure_codec_cost", "resume_config", "tailq_hook"]

STATE_VERSION = 2  # 2: the closed loop of route="auto" (adapt_every, explore; its state under "loop")
MEASUREMENT_ONLY = frozenset({"measure_every"})
"""Options every rank must share (they add collectives) but a resumed run may change: they measure, and change
nothing that goes on the wire for the method or into its state."""
log = logging.getLogger("tailq")


def resume_config(config: dict[str, Any]) -> dict[str, Any]:
    """What a loaded state's ``config()`` must equal: everything but :data:`MEASUREMENT_ONLY`."""
    return {k: v for k, v in config.items() if k not in MEASUREMENT_ONLY}


def bucket_key(bucket: dist.GradBucket) -> str:
    """The key of per-bucket state (residuals, stale statistics, kept designs): index, size and tensor shapes.

    DDP rebuilds its buckets after the first iteration; a bucket that keeps its index but changes its content
    gets a new key, so state can never be applied to other parameters.
    """
    shapes = ",".join("x".join(map(str, t.shape)) for t in bucket.gradients())
    return f"{bucket.index()}:{bucket.buffer().numel()}:{zlib.crc32(shapes.encode()):08x}"


class TailqState:
    """State of a tailq hook: the compressor, the options every rank must share, and ``metrics``.

    ``TailqState(name, *, process_group=None, network=None, seed=0, fixed_layout=False, **options)``: ``options``
    are the compressor's own (``tailq list``) and the hook's (:class:`~tailq.hooks.config.HookConfig`). ``network``
    (a :class:`~tailq.comm.network.Network`) is what ``route="auto"`` plans against. ``fixed_layout``: the caller's
    buckets never change (not DDP's, which regroups after its first iteration; :class:`tailq.DiLoCo`'s fragments),
    so error feedback needs no warm-up step.
    """

    def __init__(
        self,
        name: str,
        *,
        process_group: Any = None,
        network: Network | None = None,
        seed: int = 0,
        fixed_layout: bool = False,
        **options: Any,
    ) -> None:
        if name not in list_compressors():
            raise ValueError(f"unknown compressor {name!r}; available: {', '.join(sorted(list_compressors()))}")
        hook_names, comp_names = HookConfig.names(), set(get_compressor_class(name).options)
        unknown = sorted(set(options) - hook_names - comp_names)
        if unknown:
            raise TypeError(f"{name}: unknown option(s) {', '.join(unknown)}; compressor options: "
                            f"{', '.join(sorted(comp_names | {'seed'}))}; hook options: "
                            f"{', '.join(sorted(hook_names | {'network', 'process_group'}))}")
        self.options = HookConfig(**{k: v for k, v in options.items() if k in hook_names})
        self.comp: Compressor = compressor(name, seed=seed, **{k: v for k, v in options.items() if k in comp_names})
        if network is not None and not isinstance(network, Network):
            raise TypeError(f"network must be a tailq.comm.network.Network or None; got {type(network).__name__}")
        opts = self.options
        if opts.error_feedback and opts.warmup_steps < 1 and not fixed_layout:
            raise ValueError(
                "error_feedback needs warmup_steps >= 1: DDP rebuilds its buckets after the first iteration, "
                "so residuals kept per bucket during it would not match the buckets that follow")
        if opts.redesign_every > 1 and not getattr(self.comp, "rescalable", False):
            which = ", ".join(c.name for c in registered_in_order() if getattr(c, "rescalable", False))
            raise ValueError(f"redesign_every applies to the truncated quantizers ({which}), not {name!r}; "
                             f"use redesign_every=1")
        self.name = name
        self.seed = seed
        given = network is not None and network.known
        # what the planner prices: the caller's network; else fitted from the warm-up's timed bf16 all-reduces
        self.network_source = "given" if given else "fitted" if opts.warmup_steps > 0 else "default"
        self.network = network if given and network is not None else PLANNING_DEFAULT
        self.metrics = HookMetrics()
        self.process_group = process_group
        self._comm: Comm | None = None  # bound on the first bucket, or now if a process group exists (_bind)
        self._planner: Planner | None = None
        self.memory = ErrorFeedback(self.comp, feedback=str(opts.error_feedback)) if opts.error_feedback else None
        self.family = family_for(self.comp, fine_bits=opts.fine_bits, keep_own=self.memory is not None,
                                 gather_bits=opts.gather_bits, owner_feedback=opts.owner_feedback,
                                 redesign_every=opts.redesign_every)
        self.routes = Planner(self.family, 1, self.network).routes  # what the family can take (not N-dependent)
        if opts.route != "auto" and opts.route not in self.routes:
            raise ValueError(f"{name}: route {opts.route!r} is not available; routes: {', '.join(self.routes)}")
        if (opts.gather_bits is not None or opts.owner_feedback) and getattr(self.family, "owner", None) is None:
            raise ValueError(f"{name}: gather_bits and owner_feedback configure the owner's requantizer of the "
                             f"shared-codebook two-phase route, which {name!r} does not have (routes: "
                             f"{', '.join(self.routes)}; a requantizable per-rank compressor re-encodes with itself)")
        # auto with a given or fitted network plans once, at the first compressed bucket (see _calibrate); with
        # neither (warmup_steps=0, no network) it plans on bytes alone against PLANNING_DEFAULT, deterministically
        self._planned = opts.route != "auto" or self.network_source == "default"
        if opts.route == "auto" and self.network_source == "default":
            self.metrics.plan = {"network": self.network.summary(), "network_source": "default", "buckets": {}}
        self._timings: list[tuple[float, float]] = []  # (ring traffic bytes, seconds) of timed warm-up all-reduces
        self._latency: list[float] = []  # seconds of the tiny all-reduces that precede them
        self._node_timings: list[tuple[float, float]] = []  # the same, timed inside the node (two-link fit)
        self._node_latency: list[float] = []
        self._shard: ShardCheck | None = None  # the two-phase owner's view of the last bucket (per-phase vNMSE)
        self.shape: Shape | None = None  # K nodes x L workers, agreed by the ranks at the first bucket
        self._node: NodeComms | None = None  # the node and cross-node groups, made at the first use
        self.policy = policy_for(self.family, stale_stats=opts.stale_stats, redesign_every=opts.redesign_every,
                                 first_step=opts.warmup_steps)
        # route="auto": the model's plan, corrected per bucket by what each route is measured to cost (comm/adapt.py);
        # with neither a network nor a warm-up the plan stays the deterministic one on bytes alone (reproducible)
        self.loop = (ClosedLoop(LoopConfig(every=opts.adapt_every, explore=opts.explore), self._prior)
                     if opts.route == "auto" and opts.adapt_every > 0 and self.network_source != "default" else None)
        self.step = 0
        self.layouts = BucketLayouts()  # residuals follow their parameters when DDP regroups its buckets
        self._step_keys: set[str] = set()  # bucket keys seen in this step
        self._loaded_keys: set[str] | None = None  # residual keys of a loaded state, until the first step checks them
        self.priming = False  # see tailq.hooks.prime_buckets
        self._verified = False
        # passthrough issued from DDP's thread (see _direct_passthrough): completions not yet handed to the loop
        self._direct_lock = threading.Lock()
        self._direct_done = 0.0  # when the last of them completed (perf_counter)
        self._direct_samples: list[tuple[int, int, float]] = []  # (bucket, the loop's arm, seconds)
        self._direct_inflight: list[torch.futures.Future[torch.Tensor]] = []
        self._decision: tuple[list[Any], list[torch.Tensor], Tag] | None = None  # issued, not applied yet
        self.worker = OrderedWorker()
        self._handoff = Handoff()
        self._own_group: Any = None  # the process group of this state's own, from the first bucket in a backward
        if dist.is_initialized():
            self._bind()

    # -- the process group ---------------------------------------------------------------------------------
    def _bind(self) -> Comm:
        """Bind to ``process_group`` (default: the default group) — now, or on the first bucket.

        The state may be created before ``init_process_group`` (Lightning builds ``DDPStrategy(ddp_comm_state=…)``
        before its ``Trainer`` starts the workers); everything that needs the group (its size, the planner) is
        made here, once. Every option was already validated when the state was created.
        """
        if self._comm is None:
            if not dist.is_initialized():
                raise RuntimeError(
                    f"tailq.ddp_hook({self.name!r}): no process group to bind to. The state can be created before "
                    "torch.distributed.init_process_group, but it must have been called by the first bucket (or "
                    "the first state_dict/load_state_dict); call init_process_group before training")
            self._comm = Comm(self.process_group, self.metrics.wire, self.options.timeout_s)
            self._planner = Planner(self.family, self._comm.n, self.network, passthrough=self.options.route == "auto",
                                    shape=self.shape)
        return self._comm

    @property
    def comm(self) -> Comm:
        """The collectives on the bound process group (binds on first use)."""
        return self._bind()

    @property
    def planner(self) -> Planner:
        """The route planner for the bound group's size (binds on first use)."""
        self._bind()
        assert self._planner is not None
        return self._planner

    @property
    def bound(self) -> bool:
        """Whether the state has bound to its process group yet."""
        return self._comm is not None

    def _use_own_group(self) -> None:
        """Called by the hook on DDP's thread at its first bucket inside a backward — the same point on every rank:
        create this state's own process group (:func:`~tailq.comm.wire.own_group`) and have the worker issue every
        later collective there (switched between two jobs, so no bucket straddles two groups)."""
        if self._own_group is None:
            comm = self._bind()
            self._own_group = own_group(self.process_group)
            self.worker.submit(comm.use_group, self._own_group)

    # -- configuration and persistence ---------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """Everything that must be identical on every rank and in a checkpoint that is loaded."""
        return {"state_version": STATE_VERSION, "compressor": self.comp.config(), **self.options.digest(),
                "world_size": self.comm.n}

    def state_dict(self) -> dict[str, Any]:
        """Plain dicts, ints, strings and tensors: loadable with ``torch.load(weights_only=True)``."""
        self._finish_decision()
        return {"config": self.config(), "step": self.step,
                "error_feedback": None if self.memory is None else self.memory.state_dict(),
                "route_state": self.family.state_dict(), "plan": self._plan_state(),
                "loop": None if self.loop is None else self.loop.state_dict(),
                "warmup_timings": self._warmup_timings(), **self.policy.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved, mine = resume_config(state.get("config") or {}), resume_config(self.config())
        if saved != mine:
            differ = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
            raise ValueError(f"hook state was saved with a different configuration ({', '.join(differ)} differ):\n"
                             f"  saved: {state.get('config')}\n  this:  {self.config()}")
        self.step = int(state["step"])
        if self.memory is not None:
            self.memory.load_state_dict(state["error_feedback"])
        self.policy.load_state_dict(state)
        self.family.load_state_dict(state.get("route_state", {}))
        plan = state.get("plan")
        if plan:  # the saved run's calibration: a resumed run plans exactly as the run it continues
            node_rate = plan.get("node_rate_bps")
            net = Network(plan["kind"], float(plan["rate_bps"]), float(plan["delay_s"]),
                          None if node_rate is None else float(node_rate), float(plan.get("node_delay_s", 0.0)))
            self._use_plan(net, CodecCost(float(plan["per_pass_s"]), float(plan["cast_s"])), plan["source"])
        timed = state.get("warmup_timings")
        if timed and not self._planned:  # saved between the warm-up and the plan: the fit still has its inputs
            self._latency = [float(v) for v in timed["latency_s"]]
            self._timings = [(float(b), float(t)) for b, t in timed["allreduces"]]
        if self.loop is not None and state.get("loop"):
            self.loop.load_state_dict(state["loop"])
            self.metrics.plan["loop"] = self.loop.report()
        self._loaded_keys = self._residual_keys()

    def _warmup_timings(self) -> dict[str, Any] | None:
        """The warm-up's timed all-reduces while no plan was made from them yet: what the network fit needs, so a run
        saved at the end of its warm-up and resumed plans against the network it measured, not the default."""
        if self._planned or not (self._timings or self._latency):
            return None
        return {"latency_s": list(self._latency), "allreduces": [[b, t] for b, t in self._timings]}

    def _residual_keys(self) -> set[str]:
        return set() if self.memory is None else set(self.memory.truncation) | set(self.memory.rounding)

    def _end_step(self) -> None:
        """The last bucket of a step: the first step after a load checks that the loaded residuals were used."""
        self.step += 1
        if self._loaded_keys is not None:
            unused = sorted(self._loaded_keys & self._residual_keys() - self._step_keys)
            if unused:
                log.warning("tailq %s: the loaded error-feedback residuals of bucket(s) %s were not used in the "
                            "first step after the load: the bucket layout differs from the saved run's. Call "
                            "tailq.hooks.prime_buckets(ddp, state, forward_backward) after restoring (DDP lays out "
                            "its buckets anew in its first iterations)", self.name, ", ".join(unused))
            self._loaded_keys = None
        self._step_keys = set()

    def _plan_state(self) -> dict[str, Any] | None:
        if self.planner.codec == CodecCost() or not self.metrics.plan:
            return None  # nothing measured: the plan is a pure function of the configuration
        c, net = self.planner.codec, self.network
        return {"kind": net.kind, "rate_bps": net.rate_bps, "delay_s": net.delay_s, "per_pass_s": c.per_pass_s,
                "cast_s": c.cast_s, "source": self.metrics.plan["network_source"],
                "node_rate_bps": net.node_rate_bps, "node_delay_s": net.node_delay_s}

    def close(self) -> None:
        if self._decision is not None and all(w.is_completed() for w in self._decision[0]):
            self._finish_decision()  # for its report (never waits here: a peer may be gone)
        self.worker.close()

    def __repr__(self) -> str:
        world = self._comm.n if self._comm is not None else "unbound"
        return f"TailqState({self.comp!r}, route={self.options.route!r}, world_size={world}, step={self.step})"

    # -- one bucket ---------------------------------------------------------------------------------------
    def process(self, bucket: dist.GradBucket) -> torch.Tensor:
        """Average one bucket in place (runs on the ordered worker): compressed, passthrough, or priming."""
        t0, comm0, sec = time.perf_counter(), self._comm_seconds(), self.metrics.seconds
        meas0 = sec["measure"]
        self._settle_direct()
        buf = bucket.buffer()
        idx, n, step, opts = bucket.index(), buf.numel(), self.step, self.options
        if not self._verified:  # the planner's network too: ranks planning differently would mismatch collectives
            self.comm.verify_same_config({**self.config(), "network": self.network.as_arg()},
                                         Tag(step, idx, n, "config"))
            self._verified = True
        if self.comm.n == 1:  # nothing to average: the bucket is its own mean, exactly (no rounding, no wire)
            self.metrics.last[idx] = {"route": "local"}
            self.metrics.wire.count_bucket(n)
            if bucket.is_last() and not self.priming:
                self._end_step()
            return buf
        if self.shape is None:
            self._agree_topology(Tag(step, idx, n, "config"))
        key = bucket_key(bucket)
        self.layouts.record(key, bucket)
        g = buf.reshape(-1).to(torch.float32)
        if self.priming:  # plain fp32 mean; step, residuals, statistics and metrics untouched
            buf.copy_(self._exact_mean(g, Tag(step, idx, n, "priming"), "priming").reshape(buf.shape))
            return buf
        exact = None
        if opts.measure_every and step % opts.measure_every == 0:
            tm = time.perf_counter()
            exact = self._exact_mean(g, Tag(step, idx, n, "measure"), "measure")
            sec["measure"] += time.perf_counter() - tm  # not part of the method: harnesses subtract it
        self._shard = None
        if step < opts.warmup_steps or n < opts.min_bucket or n == 0:
            timed = step < opts.warmup_steps and not self._planned and self.network_source == "fitted"
            # the node link is timed whenever route="auto" will plan and nothing gave its rate (an emulated or a
            # given network describes the NIC; the workers of a node talk over a link of their own)
            timed_node = step < opts.warmup_steps and not self._planned and self.network.node_rate_bps is None
            mean = self._passthrough(g, Tag(step, idx, n, "passthrough"), timed=timed, timed_node=timed_node)
        else:
            mean = self.compress(g, step, idx, key, dest=self._decode_target(buf))
        if exact is not None:  # measurement: not part of the method (its time goes to "measure")
            tm = time.perf_counter()
            phases = self._phase_errors(exact, self._shard, tag=Tag(step, idx, n, "measure"))
            self.metrics.record_vnmse(step, idx, mean, exact, phases, warmup=step < opts.warmup_steps)
            sec["measure"] += time.perf_counter() - tm
        self.metrics.wire.count_bucket(n)
        self._step_keys.add(key)
        if bucket.is_last():
            if self.loop is not None and step >= opts.warmup_steps and self.loop.due(step):
                # agreed by every rank (MAX): queued behind this bucket on the worker, so it runs while the optimizer
                # step and the next forward do (off the critical path) and before the next step's first bucket
                if self.worker.on_worker():
                    self.worker.submit(self._decide, Tag(step, idx, n, "plan"))
                else:  # called directly (outside DDP): in line, the same order on every rank
                    self._decide(Tag(step, idx, n, "plan"))
            if self.loop is not None and self.loop.buckets:  # probes run since the last decision included
                self.metrics.plan["loop"] = self.loop.report()
            self._end_step()
        if mean.data_ptr() != buf.data_ptr():  # decoded elsewhere (passthrough, fallback, a non-fp32 bucket)
            buf.copy_(mean.reshape(buf.shape))
        measured = sec["measure"] - meas0
        self.metrics.add_seconds(time.perf_counter() - t0 - measured, self._comm_seconds() - comm0 - measured)
        return buf

    def _direct_passthrough(self, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor] | None:
        """A bucket whose route this step is bf16 passthrough, issued here, on DDP's thread, as PyTorch's
        ``bf16_compress_hook`` issues it (divide, cast, asynchronous all-reduce, cast back in the completion
        callback), instead of through the ordered worker — ``None`` where it must go through the worker.

        Why: a fast network's step has no room for the worker's hop (wake a thread, run the bucket, wake DDP's):
        ~3 ms a step against PyTorch's hook in one measurement with 4 ranks on 2 cores, within noise in another
        (BENCHMARKS.md, loopback); from DDP's thread the bucket costs what PyTorch's hook costs.

        Safe for the collective order: only when the worker is idle — every collective submitted before was issued
        and completed, and nothing else submits meanwhile — so this rank issues the same sequence as with the
        worker. Only in steady state: after the warm-up (whose all-reduces are timed), on a step without vNMSE
        measurement, for a bucket the closed loop runs on passthrough this step (not a probe of its other arm) or the
        open-loop plan sends as bf16, or one below ``min_bucket``. The loop still measures it: the seconds from the
        issue (or the previous such bucket's completion, if later) to the completion. The result is the same, bit
        for bit, as the worker's passthrough; the wait has the hook's ``timeout_s`` (checked when the backward
        ends).
        """
        comm, opts, step = self._comm, self.options, self.step
        if comm is None or comm.n == 1 or self.shape is None or not self._verified or self.priming:
            return None
        if step < opts.warmup_steps or (opts.measure_every and step % opts.measure_every == 0):
            return None
        n, idx = bucket.buffer().numel(), bucket.index()
        if n == 0:
            return None
        key = bucket_key(bucket)
        arm = -1
        if n >= opts.min_bucket:  # else: too small to compress, bf16 always
            if not self._planned:
                return None
            if self.loop is not None:
                if self.loop.peek(idx, key, step) != PASSTHROUGH:
                    return None
            elif opts.route != "auto" or n not in self.metrics.plan.get("buckets", {}):
                return None  # a forced route, or a size not planned yet (the worker explains it first)
            elif self.planner.flat(self.planner.plan(n)) != PASSTHROUGH:
                return None
        if not self.worker.idle():  # nothing may be in flight on the worker: it would issue in another order
            return None
        self._settle_direct()
        self.layouts.record(key, bucket)
        if self.loop is not None and n >= opts.min_bucket:
            self.loop.route(idx, key, n, step)
            arm = self.loop.running(idx)
        t0 = time.perf_counter()
        buf = bucket.buffer()
        t = buf.to(torch.bfloat16).div_(comm.n)
        work = comm.all_reduce(t, Tag(step, idx, n, PASSTHROUGH), "passthrough", async_op=True)
        issued = time.perf_counter()
        src: torch.futures.Future[torch.Tensor] = torch.futures.Future()

        def complete(f: Any) -> None:
            try:
                f.value()
                buf.copy_(t)
            except BaseException as err:  # noqa: BLE001 - handed to DDP through the future
                fail = RuntimeError(f"tailq: all_reduce(passthrough) failed on rank {comm.rank} (a peer may have "
                                    f"died or be configured differently): {err}")
                self.worker.fail(fail)
                src.set_exception(fail)  # type: ignore[arg-type]
                return
            now = time.perf_counter()
            with self._direct_lock:
                took = now - max(issued, self._direct_done)  # behind an earlier one still in flight: from its end
                self._direct_done = now
                if arm >= 0:
                    self._direct_samples.append((idx, arm, issued - t0 + took))  # with the casts, as the worker
            self.metrics.add_seconds(issued - t0 + took, took)
            src.set_result(buf)

        work.get_future().add_done_callback(complete)
        with self._direct_lock:
            self._direct_inflight = [f for f in self._direct_inflight if not f.done()] + [src]
        self.metrics.direct += 1
        if n >= opts.min_bucket:  # as the worker reports it: a route the plan or the loop chose
            self.metrics.last[idx] = {"route": PASSTHROUGH}
        self.metrics.wire.count_bucket(n)
        self._step_keys.add(key)
        self._shard = None
        if bucket.is_last():
            if self.loop is not None and step >= opts.warmup_steps and self.loop.due(step):
                self._begin_decision(Tag(step, idx, n, "plan"))  # after this all-reduce, on every rank
            if self.loop is not None and self.loop.buckets:
                self.metrics.plan["loop"] = self.loop.report()
            self._end_step()

        def timed_out() -> BaseException:
            err = RuntimeError(f"tailq: all_reduce(passthrough) failed or timed out after {comm._timeout_text()} on "
                               f"rank {comm.rank} (a peer may have died or be configured differently)")
            self.worker.fail(err)
            return err

        return self._handoff(src, bucket, limit=(opts.timeout_s, timed_out))

    def _begin_decision(self, tag: Tag) -> None:
        """The closed loop's decision at the end of a step whose last bucket went from DDP's thread: its all-reduce
        issued here, right after that bucket's (the same point of every rank's sequence as the worker's
        :meth:`_decide`), without waiting; :meth:`_finish_decision` applies it before the next bucket. (Through the
        worker it would hold the worker, and so the next step's first buckets, until every rank has joined.) The
        samples of buckets still in flight go to the next decision."""
        assert self.loop is not None
        self._settle_direct()
        vecs = self.loop.agreement()
        works = [self.comm.all_reduce(v, tag, "plan", op="max", async_op=True) for v in vecs]
        self._decision = (works, vecs, tag)

    def _finish_decision(self) -> None:
        """Apply a decision :meth:`_begin_decision` issued (before any bucket of the next step reads the loop; on
        DDP's thread while the worker is idle, or from ``state_dict``/``close``)."""
        if self._decision is None:
            return
        works, vecs, tag = self._decision
        self._decision = None
        for w in works:
            self.comm.wait(w, "all_reduce(plan)")
        assert self.loop is not None
        self.loop.apply(vecs, tag.step)
        self.metrics.plan["loop"] = self.loop.report()

    def _settle_direct(self, wait: bool = False) -> None:
        """Hand the closed loop the seconds of direct passthrough buckets that completed (``wait``: once every one in
        flight completed). Runs on the worker, or on DDP's thread while the worker is idle: never beside the loop's
        own updates."""
        if wait:
            with self._direct_lock:
                inflight, self._direct_inflight = self._direct_inflight, []
            for f in inflight:
                try:
                    f.wait()
                except Exception:  # noqa: BLE001, S110 - the failure reaches the user through the bucket's future
                    pass
        with self._direct_lock:
            samples, self._direct_samples = self._direct_samples, []
        if self.loop is not None:
            for idx, arm, took in samples:
                if idx in self.loop.buckets:
                    self.loop.record(idx, took, arm)

    def _decode_target(self, buf: torch.Tensor) -> torch.Tensor | None:
        """Where a route may decode the mean: the bucket's own buffer when it is contiguous float32 and nothing reads
        the gradient after the route (error feedback's truncation target and the stale policy's fallback do)."""
        if buf.dtype != torch.float32 or not buf.is_contiguous() or self.memory is not None or self.options.stale_stats:
            return None
        return buf.reshape(-1)

    def compress(self, g: torch.Tensor, step: int, idx: int, key: str, dest: torch.Tensor | None = None
                 ) -> torch.Tensor:  # fmt: skip
        """One bucket's compressed mean: compensate → agree → codebook → route → update (see :func:`tailq_hook`).

        ``dest``: where the route decodes the mean (see :meth:`_decode_target`); ``None``: a new tensor."""
        n = g.numel()
        if not self._planned:
            self._calibrate(g.device, Tag(step, idx, n, "plan"))
        if self.options.route == "auto" and n not in self.metrics.plan.setdefault("buckets", {}):
            self.metrics.plan["buckets"][n] = self.planner.explain(n)
        if self.loop is None:
            route = self.options.route if self.options.route != "auto" else self.planner.plan(n)
            return self._on_route(g, step, idx, key, self.planner.flat(route), dest)
        t0 = time.perf_counter()
        route = self.loop.route(idx, key, n, step)
        mean = self._on_route(g, step, idx, key, route, dest)
        self.loop.record(idx, time.perf_counter() - t0)
        return mean

    def _decide(self, tag: Tag) -> torch.Tensor:
        """The closed loop's decision at the end of step ``tag.step`` (see :mod:`tailq.comm.adapt`)."""
        assert self.loop is not None
        self._settle_direct(wait=True)  # this step's buckets sent from DDP's thread count in this decision
        self.loop.decide(self.comm, tag, tag.step)
        self.metrics.plan["loop"] = self.loop.report()
        return torch.zeros(0)

    def _prior(self, numel: int) -> tuple[str, str, float, float]:
        """The closed loop's prior for a bucket size: the model's pick and its alternative (passthrough for a
        compressing pick, else the cheapest compressing candidate), with the model's seconds for each."""
        planner = self.planner
        pick = planner.flat(planner.plan(numel))
        if pick == PASSTHROUGH:
            alt = min((r for r in planner.candidates if r != PASSTHROUGH), key=lambda r: planner.seconds(r, numel),
                      default=PASSTHROUGH)
        else:
            alt = PASSTHROUGH
        alt = planner.flat(alt)
        return pick, alt, planner.seconds(pick, numel), planner.seconds(alt, numel)

    def _on_route(self, g: torch.Tensor, step: int, idx: int, key: str, route: str, dest: torch.Tensor | None
                  ) -> torch.Tensor:  # fmt: skip
        """The bucket's mean on ``route`` (passthrough, a flat route, or a hierarchical one)."""
        n = g.numel()
        if route == PASSTHROUGH:  # the cost model found bf16 cheaper for this size: nothing to compress
            self.metrics.last[idx] = {"route": PASSTHROUGH}
            return self._passthrough(g, Tag(step, idx, n, PASSTHROUGH), dest=dest)
        tag = Tag(step, idx, n, route)
        if is_staged(route):
            return self._hierarchical(g, tag, key, dest)
        if self.memory is not None:  # 1. + error-feedback residual (carried over if DDP regrouped its buckets)
            self.layouts.carry((self.memory.truncation, self.memory.rounding), key)
        return self._compressed_on(self.comm, tag, key, g, route, dest)

    def _compressed_on(self, comm: Comm, tag: Tag, key: str, g: torch.Tensor, route: str,
                       dest: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
        """Steps 1-5 of :func:`tailq_hook` for ``g`` over ``comm``'s ranks on the flat ``route`` (the whole group's
        bucket, or, inside a hierarchical route, this rank's node-mean shard among the K nodes)."""
        if self.memory is not None:  # 1. + error-feedback residual
            x = self.memory.compensate(key, g)
        else:
            x = g
        bad = _nonfinite_count(x)
        xs = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0) if bad else x
        agreed = self.policy.agree(comm, tag, key, xs, bad)  # 2. agree statistics across ranks
        if agreed.nonfinite:
            return self._fallback(g, dataclasses.replace(tag, route="fallback"), "non-finite gradient on some rank",
                                  comm)
        coder = self.family.coder(xs, agreed.codebook, comm, tag, key)  # 3. the shared codebook, this rank's codes
        # counter-based randomness for this bucket and step, keyed by the rank in the hook's whole group
        rkey = RandKey(self.seed, self.comm.rank, tag.step, tag.bucket)
        out = zero_outcome(xs, route) if coder is None else ROUTES[route].run(comm, tag, coder, rkey, dest)  # 4.
        if not self.policy.settle(comm, key, agreed):  # stale statistics arriving now say NaN/Inf: void
            return self._fallback(g, dataclasses.replace(tag, route="fallback"),
                                  "non-finite gradient on some rank (seen in stale-mode stats)", comm)
        if self.memory is not None:  # 5. residual of what this rank sent
            self.memory.update(key, x, out.own, target=out.target)
        self.metrics.last[tag.bucket] = {"route": tag.route, **out.info}
        self._shard = out.shard
        return out.mean

    def _hierarchical(self, g: torch.Tensor, tag: Tag, key: str, dest: torch.Tensor | None) -> torch.Tensor:
        """A ``hier-*`` route: exact reduce-scatter in the node, this rank's shard through steps 1-5 among the K ranks
        with its local rank (error feedback, statistics, codebook keyed by the shard), all-gather in the node."""
        comms = self._node_comms()
        shape, local = comms.shape, comms.local
        skey = f"{key}|shard{local}of{shape.node_size}"

        def shard_mean(cross: Comm, x: torch.Tensor, inner: str) -> torch.Tensor:
            if inner == BF16:
                return self._passthrough(x, tag, comm=cross)
            return self._compressed_on(cross, tag, skey, x, inner, None)

        staged = ROUTES[tag.route]
        assert isinstance(staged, Hierarchical)
        mean = staged.run(comms, tag, g, shard_mean, dest)
        if self._shard is not None:  # the two-phase owner's piece, as an offset into the whole (unpadded) bucket
            offset = self._shard.offset + local * node_shard_numel(g.numel(), shape.node_size)
            valid = max(0, min(self._shard.mean1.numel(), g.numel() - offset))
            self._shard = ShardCheck(offset, self._shard.mean1[:valid], self._shard.mean2[:valid])
        self.metrics.last[tag.bucket] = {**self.metrics.last.get(tag.bucket, {}), "route": tag.route}
        return mean

    # -- topology -------------------------------------------------------------------------------------------
    def _agree_topology(self, tag: Tag) -> None:
        """At the first bucket: every rank's node (``node_size``, torchrun's environment, or one worker per node),
        exchanged in one all-gather of three integers, checked, and the planner priced on both links."""
        found = detect(self.options.node_size)
        mine = torch.tensor(found[:3], dtype=torch.int64)
        shape, why = agree_shape(found, self.comm.all_gather(mine, tag, "config"), self.comm.n)
        if why is not None:
            log.warning("tailq %s: %s", self.name, why)
        self.shape = shape
        self.comm.shape = shape  # the whole group's collectives now counted on the node's shared NIC
        self.metrics.wire.node_size = shape.node_size
        self.metrics.topology = {"nodes": shape.nodes, "node_size": shape.node_size, "source": found[3],
                                 "flat_because": why}
        old = self.planner
        self._planner = Planner(self.family, self.comm.n, old.network, old.codec,
                                passthrough=PASSTHROUGH in old.candidates, shape=shape)
        if is_staged(self.options.route) and not shape.hierarchical:
            log.info("tailq %s: route %s runs as %s on %s", self.name, self.options.route,
                     self.planner.flat(self.options.route), shape.describe())

    def _node_comms(self) -> NodeComms:
        """This rank's node and cross-node groups (created at their first use: the same bucket on every rank, from
        the worker thread, node group first)."""
        if self._node is None:
            assert self.shape is not None
            shape, r, pg = self.shape, self.comm.rank, self.comm.group
            node = new_group_like(pg, shape.node_ranks(shape.node_of(r)), "tailq_node")
            cross = new_group_like(pg, shape.cross_ranks(shape.local_of(r)), "tailq_cross")
            wire, timeout = self.metrics.wire, self.options.timeout_s
            self._node = NodeComms(shape, r, Comm(node, wire, timeout, scope="node", shape=shape),
                                   Comm(cross, wire, timeout, scope="cross", shape=shape))
        return self._node

    def _comm_seconds(self) -> float:
        """Seconds spent waiting on collectives, on every group of this state."""
        extra = 0.0 if self._node is None else self._node.node.seconds + self._node.cross.seconds
        return (self._comm.seconds if self._comm is not None else 0.0) + extra

    def _passthrough(self, g: torch.Tensor, tag: Tag, timed: bool = False, comm: Comm | None = None,
                     timed_node: bool = False, dest: torch.Tensor | None = None) -> torch.Tensor:
        """bf16, as PyTorch's bf16_compress_hook: divide first, all-reduce SUM, cast back (over ``comm``: default the
        hook's whole group).

        ``timed``: a warm-up step whose all-reduce calibrates the planner's network — a one-element all-reduce
        lines the ranks up, a second one times the latency, then the bucket's all-reduce is timed. ``timed_node``:
        with several nodes of several workers, the same inside the node (the node link's fit).
        """
        if comm is not None:
            t = g.to(torch.bfloat16).div_(comm.n)
            comm.all_reduce(t, tag, "passthrough")
            return t.to(torch.float32)
        t = g.to(torch.bfloat16).div_(self.comm.n)
        if timed_node and self.shape is not None and self.shape.hierarchical and self.comm.n > 1:
            self._time_node_link(t, dataclasses.replace(tag, route="plan"))
        if timed and self.comm.n > 1:
            probe = torch.zeros(1, dtype=torch.bfloat16, device=g.device)
            self.comm.all_reduce(probe, dataclasses.replace(tag, route="plan"), "plan")  # absorbs the ranks' skew
            t0 = time.perf_counter()
            self.comm.all_reduce(probe, dataclasses.replace(tag, route="plan"), "plan")
            t1 = time.perf_counter()
            self.comm.all_reduce(t, tag, "passthrough")
            t2 = time.perf_counter()
            self._latency.append(t1 - t0)
            self._timings.append((ring_traffic_bytes("all_reduce", t.numel() * 2, self.comm.n), t2 - t1))
        else:
            self.comm.all_reduce(t, tag, "passthrough")
        if dest is not None:  # straight from bf16 into the bucket (one pass, as PyTorch's hook decompresses)
            return dest.copy_(t)
        return t.to(torch.float32)

    def _time_node_link(self, t: torch.Tensor, tag: Tag) -> None:
        """One bf16 all-reduce of the bucket inside the node, timed after the ranks lined up (a measurement: its
        bytes are counted as ``plan``, never as the method's)."""
        node = self._node_comms().node
        probe = torch.zeros(1, dtype=torch.bfloat16, device=t.device)
        node.all_reduce(probe, tag, "plan")
        t0 = time.perf_counter()
        node.all_reduce(probe, tag, "plan")
        t1 = time.perf_counter()
        node.all_reduce(t.clone(), tag, "plan")
        t2 = time.perf_counter()
        self._node_latency.append(t1 - t0)
        self._node_timings.append((ring_traffic_bytes("all_reduce", t.numel() * 2, node.n), t2 - t1))

    # -- planning ---------------------------------------------------------------------------------------------
    def _calibrate(self, device: torch.device, tag: Tag) -> None:
        """Plan once: the network (given, or fitted from the warm-up), the codec's cost, agreed across ranks.

        One all-reduce of four numbers (their mean over ranks), so every rank builds the same planner. The fit
        (:func:`~tailq.comm.network.fit_network`): latency from the one-element all-reduces timed after the ranks
        lined up, seconds per byte from the timed bucket all-reduces.
        """
        local = self._probe_codec(device)
        mine = fit_network(self._latency, self._timings, self.comm.n) if self.network_source == "fitted" else None
        hop, per_byte = (mine.hop_latency_s, 8.0 / mine.rate_bps) if mine and mine.rate_bps else (0.0, 0.0)
        shape = self.shape or Shape.flat(self.comm.n)
        node = fit_network(self._node_latency, self._node_timings, shape.node_size)  # None unless timed
        node_hop, node_per_byte = (node.hop_latency_s, 8.0 / node.rate_bps) if node and node.rate_bps else (0.0, 0.0)
        agreed = torch.tensor([hop, per_byte, local.per_pass_s, local.cast_s, node_hop, node_per_byte],
                              dtype=torch.float64)
        self.comm.all_reduce(agreed, tag, "plan")
        hop, per_byte, per_pass, cast, node_hop, node_per_byte = (agreed / self.comm.n).tolist()
        source, network = self.network_source, self.network
        if mine is not None:
            network = Network("model", min(MAX_RATE_BPS, 8.0 / per_byte) if per_byte > 0 else MAX_RATE_BPS, hop / 2,
                              network.node_rate_bps, network.node_delay_s)
        elif source == "fitted":  # no warm-up bucket was timed (every one was below min_bucket, or N = 1)
            source = "default"
        if node is not None and network.node_rate_bps is None:  # the node link, timed in the warm-up
            network = dataclasses.replace(network, node_rate_bps=min(MAX_NODE_RATE_BPS, 8.0 / node_per_byte)
                                          if node_per_byte > 0 else MAX_NODE_RATE_BPS, node_delay_s=node_hop / 2)
        self._use_plan(network, CodecCost(per_pass, cast), source)
        log.info("tailq %s: planning against %s (%s), codec %.3g ns/element/pass, bf16 cast %.3g ns/element",
                 self.name, network.describe(), source, per_pass * 1e9, cast * 1e9)

    def _use_plan(self, network: Network, codec: CodecCost, source: str) -> None:
        self.network = network
        self._planner = Planner(self.family, self.comm.n, network, codec, passthrough=True, shape=self.shape)
        self._planned = True
        self.metrics.plan = {"network": network.summary(), "network_source": source,
                             "codec_ns_per_elem_pass": codec.per_pass_s * 1e9, "cast_ns_per_elem": codec.cast_s * 1e9,
                             "timed_warmup_allreduces": len(self._timings), "buckets": {}}

    def _probe_codec(self, device: torch.device) -> CodecCost:
        return measure_codec_cost(self.comp, self.family, device, self.comm.n, RandKey(self.seed, self.comm.rank))

    def _phase_errors(self, exact: torch.Tensor, shard: ShardCheck | None, tag: Tag) -> dict[str, float] | None:
        """Two-phase, on measured steps: Σ‖mean1 − exact‖² (phase 1) and Σ‖mean2 − mean1‖² (phase 2) over shards."""
        if shard is None:
            return None
        ex = exact[shard.offset : shard.offset + shard.mean1.numel()].double()
        e = torch.tensor([float(((shard.mean1.double() - ex) ** 2).sum()),
                          float(((shard.mean2.double() - shard.mean1.double()) ** 2).sum())], dtype=torch.float64)
        self.comm.all_reduce(e, tag, "measure")
        return {"phase1": float(e[0]), "phase2": float(e[1])}

    def _fallback(self, g: torch.Tensor, tag: Tag, why: str, comm: Comm | None = None) -> torch.Tensor:
        """Uncompressed fp32 mean (over ``comm``; default the whole group): non-finite values reach every rank
        exactly as with plain DDP."""
        self.metrics.fallbacks.append({"step": tag.step, "bucket": tag.bucket, "why": why})
        return self._exact_mean(g, tag, "fallback", comm)

    def _exact_mean(self, g: torch.Tensor, tag: Tag, kind: str, comm: Comm | None = None) -> torch.Tensor:
        """The fp32 mean as plain DDP takes it: divided by N first, then all-reduced (so finite values up to float32's
        largest stay finite)."""
        comm = comm or self.comm
        t = g / comm.n
        comm.all_reduce(t, tag, kind)
        return t


def measure_codec_cost(comp: Compressor, family: Any, device: torch.device | str, n_workers: int,
                       key: RandKey | None = None) -> CodecCost:
    """The codec's cost per element and pass on this machine: the best of three timed statistics + encode + decode
    passes over 2^16 heavy-tailed values (shared codebook), or encode + decode (the others); and of the bf16 cast
    passthrough does. What the planner multiplies by each route's passes."""
    n = 1 << 16
    key = key or RandKey()
    gen = torch.Generator().manual_seed(12345)
    x = ((torch.randn(n, generator=gen) / torch.rand(n, generator=gen).add_(0.05).sqrt()) * 1e-3).to(device)
    bits = int(getattr(comp, "bits", 8))
    # a codebook of the compressor's kind (uniform or not) on the probe's range: its rounding costs what the real
    # one's does, without a design (scipy, milliseconds, and its first call imports) inside the first step
    uniform = bool(getattr(comp, "uniform_codebook", True))
    grid = np.linspace(-1.0, 1.0, 2**bits)
    cb = Codebook.from_levels(float(x.abs().max()) * (grid if uniform else np.sign(grid) * grid**2), uniform=uniform)
    best, best_cast = math.inf, math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        if comp.aggregation is Aggregation.SHARED_CODEBOOK:
            family.local_stats(x)  # the statistics pass; the design itself (once per bucket and step) is not timed
            cb.decode_packed(cb.encode_packed(x, key, bits), bits, n)
            passes = 3.0
        else:
            gen_or_key: Any = key if comp.counter_randomness else key.torch_generator(device)
            comp.decode(comp.encode(x, generator=gen_or_key))
            passes = 2.0
        t1 = time.perf_counter()
        x.to(torch.bfloat16).div_(n_workers).to(torch.float32)
        t2 = time.perf_counter()
        best, best_cast = min(best, (t1 - t0) / passes / n), min(best_cast, (t2 - t1) / n)
    return CodecCost(best, best_cast)


def _nonfinite_count(x: torch.Tensor) -> int:
    fast = dispatch.nonfinite_count(x)  # one fused reduction where a fast path exists
    return int((~torch.isfinite(x)).sum()) if fast is None else fast


def tailq_hook(state: TailqState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: ``model.register_comm_hook(state, tailq_hook)``.

    Each bucket, on the state's ordered worker thread (the same collective order on every rank) and, inside a
    backward, on the state's own process group (created at the first such bucket; see :class:`TailqState`):

    1. ``GradBucket.buffer()`` as float32, plus the error-feedback residual (``error_feedback``);
    2. agree statistics: one small all-reduce of :class:`~tailq.comm.agree.BucketStats` — the NaN/Inf count and
       the compressor's statistics (or last step's, ``stale_stats``; or only Σ|g| between redesigns,
       ``redesign_every``); a NaN/Inf on any rank sends the bucket in fp32 instead;
    3. the codebook: a pure function of the agreed statistics, so bit-identical on every rank; this rank's codes on
       it, rounded without bias with randomness keyed by (seed, rank, step, bucket);
    4. the route: the codes summed in headroom lanes by one integer all-reduce, or gathered — the cost model's
       pick for the bucket's size (``route="auto"``) — and decoded to the mean;
    5. the residual update, and the future completes with the averaged bucket.

    Buckets smaller than ``min_bucket`` and the first ``warmup_steps`` steps go as bf16 instead. Cost per bucket:
    one statistics all-reduce (a few hundred values at most) and one payload collective; ``multi-scale`` adds its
    index agreement. A failure raises from ``loss.backward()`` as tailq's exception (or from the returned future's
    ``wait()`` when the hook is called outside a backward).
    """
    state._bind()
    state._finish_decision()  # the last step's, if it was issued from DDP's thread
    if torch._C._current_graph_task_id() >= 0:  # called by DDP inside a backward
        state._use_own_group()
        direct = state._direct_passthrough(bucket)  # a settled bf16 bucket: as PyTorch's hook, no worker hop
        if direct is not None:
            return direct
    return state._handoff(state.worker.submit(state.process, bucket), bucket)
