"""FSDP2: a compressed gradient reduce-scatter, :func:`reduce_scatter` / :func:`compress`.

    model = ...                                   # fully_shard(...) applied to submodules and the root
    comm = tailq.fsdp.compress(model, "tnq", bits=3)
    ...                                           # train as usual; comm.metrics.wire.bits_per_coord()

FSDP2 (torch >= 2.9) lets a user replace its gradient reduce-scatter
(``FSDPModule.set_custom_reduce_scatter``): once per FSDP parameter group and backward it hands the comm an input of
N row-major chunks of S elements (chunk r belongs to rank r of FSDP's group) in the reduce dtype (fp32, or bf16
under ``MixedPrecisionPolicy(reduce_dtype=torch.bfloat16)``) and an output of S elements for this rank's shard.

What runs is phase 1 of tailq's two-phase route (SPEC §6, route 3), built from the same pieces as the DDP hook:
error-feedback compensation (:class:`~tailq.codec.ErrorFeedback`) → the agreed statistics
(:mod:`tailq.comm.agree`; a NaN/Inf on any rank is seen there) → the shared codebook, bit-identical on every rank →
this rank's codes as N byte-aligned shards (``_CodebookCoder.encode_shards``, randomness keyed by ``RandKey``,
see "Module identity") → one ``all_to_all_single`` of the packed codes → the owner decodes its N
contributions and averages them in fp32 (``decode_shard_mean``). There is no phase 2: FSDP wants the shard only
on its owner, so nothing is requantized or gathered. Wire per rank: (N − 1)/N · d · b bits plus the statistics.

**Hierarchy** (SPEC §9). At the first call the ranks agree their layout as the DDP hook does
(:func:`tailq.comm.topology.detect` from the ``node_size`` option, else torchrun's ``LOCAL_WORLD_SIZE``, else one
worker per node; one all-gather of three integers, :func:`~tailq.comm.topology.agree`; ``metrics.topology``). On K
> 1 nodes of L > 1 workers (ranks numbered node by node, L of them behind one NIC) a compressed call has two stages
and no third: (1) inside the node, an exact fp32 reduce-scatter — the (N, S) input viewed as (K, L, S), each rank's
values divided by L, permuted to (L, K, S) — gives local rank l the node's mean of the K chunks (k', l), those of
the ranks with its local rank; (2) across nodes, phase 1 above over the K ranks of its cross group (error feedback,
statistics, codebook and codes of that (K, S) input, state keyed ``"<key>|hier"``, randomness still keyed by the
rank in the whole group) → the mean over nodes of its own chunk, which is the mean over all N ranks. A NaN/Inf
seen by a cross group sends its K node means in fp32 (the in-node stage is exact, so non-finite values arrive as
with plain FSDP). Bits leaving each node's NIC per coordinate (``metrics.wire.node_nic_bits_per_coord()``):
(K − 1)/K · b for the compressed stage (+ the statistics, all-reduced among K), against L · (K − 1)/K · b for the
flat all-to-all over N ranks, whose (N − L)/N share off the node each of the node's L ranks sends; the in-node
stage never touches the NIC, and each rank encodes d/L values instead of d. The node and cross groups are created
at the first hierarchical call (node group first). With one node (K = 1) or one worker per node (L = 1) the call is
the flat one, bit for bit. Uncompressed paths (small inputs, ``fp32``/``bf16``) stay flat.

**Padding.** The coder's shards hold m = ``shard_numel(N·S, N)`` elements (S rounded up to a multiple of 8, at
least 8, so each shard starts on a byte of the dense packing). FSDP's S need not be one, so the input is viewed as
(N, S) and every *row* is zero-padded to (N, m): row r stays FSDP's chunk r and goes to rank r, and the owner
drops the m − S padded decodes. The statistics are agreed on the *unpadded* input, so the codebook is exactly
the one the N·S real coordinates define; the padded zeros only cost (m − S)/S extra code bits (they are rounded
stochastically like any value and their decodes are discarded, so they bias nothing). Error-feedback residuals
are kept on the unpadded layout.

**Reduce ops.** ``SUM`` (what :func:`compress` makes FSDP pass, via ``set_force_sum_reduction_for_comms(True)``;
FSDP then divides by N itself) writes N × the mean — exact in fp32 for N a power of two, within one rounding
otherwise — and ``AVG`` (FSDP's default for fp32/bf16) writes the mean. ``PREMUL_SUM`` (a gradient divide factor)
and anything else is refused: with :func:`compress`, or ``set_force_sum_reduction_for_comms(True)``, FSDP applies
its divide factor itself and passes SUM.

**Uncompressed paths** (inputs below ``min_bucket`` elements, and NaN/Inf fallbacks): one ``all_to_all_single`` of
the raw values (the reduce dtype for small inputs; fp32 for the fallback, so non-finite values arrive exactly as
with plain FSDP), summed by the owner in fp32 in rank order. That is the cheapest correct reduce-scatter on both
backends: Gloo implements ``reduce_scatter_tensor`` as a full all-reduce (2(N − 1)/N · d values per rank) where
the all-to-all moves (N − 1)/N · d, the same as NCCL's ring reduce-scatter.

**Module identity.** :func:`compress` makes one shared comm and installs on each FSDP module a view of it,
``comm.for_module(fqn)`` (:class:`ModuleReduceScatter`, FSDP2's ``ReduceScatter`` interface), ``fqn`` being the
module's name in ``model.named_modules()``. Per-call state — error-feedback residuals, stale statistics, kept
designs, the octave shift — is keyed by that name, and the randomness by ``RandKey(seed, rank, step,
2^32 + crc32(name))``: a module that gets no gradient in some step (layer drop, conditional compute, a branch not
taken; FSDP then makes no call for it) leaves every other module's state and randomness where they were. The
state a name holds is for one input size: a call of another size (FSDP leaves parameters without a gradient out of
the group's input) raises a ValueError naming the module and both sizes, never reusing it. The comm installed bare
(``set_custom_reduce_scatter(comm)``) knows no module, so it keys by call position (``"<call>:<numel>"``, the
randomness by call index): harmless without state, so with ``error_feedback``, ``stale_stats`` or
``redesign_every`` > 1 it refuses its first call, pointing to :func:`compress` and
:meth:`~FsdpReduceScatter.for_module`.

**Steps.** FSDP calls the comm once per parameter group and backward, in the same order on every rank. Inside a
backward (the normal case) a step is one autograd graph task: the first call of a backward opens a step (call
index 0, 1, … in call order, which numbers the wire tags: collectives run in the same order on every rank) and
queues an autograd final callback that closes it after FSDP's own post-backward callback (which reduce-scatters
the root's parameters when the inputs do not require grad) has run. A backward that raised never runs its
callback: the next backward's first call closes the stale step first. Gradient accumulation without sync
(``set_requires_gradient_sync(False)``) makes no calls, so it makes no step; one backward with sync is one step.
Called outside a backward (directly), every call is a step of its own. This counts what happened rather than a
number of calls per step fixed in advance, so a parameter group that gets no gradient in some backward (FSDP then
skips its call) cannot shift later steps. ``calls_per_step`` is the number of calls in the last step. Should FSDP
call one module twice in a step, its second call is keyed ``"<fqn>#1"``. Reentrant activation checkpointing
(``use_reentrant=True``) would run parts of a backward as nested graph tasks and so split its step: use the
non-reentrant kind with FSDP2 (as FSDP2's own examples do).

**Route** (``route``). ``"twophase"``, the default: every call at or above ``min_bucket`` is compressed (phase 1
above), as before this option existed. ``"auto"``: per module, the closed loop of the DDP hook's ``route="auto"``
(:mod:`tailq.comm.adapt`, SPEC §6.7) chooses between two arms, the compressed call and a bf16 reduce-scatter (the
``bf16`` passthrough's: the chunks cast to bf16, one all-to-all, summed by the owner in fp32 — the traffic of FSDP2's
own reduce-scatter with ``reduce_dtype=torch.bfloat16`` on NCCL; flat even on a hierarchy). The prior is the cost
model's, priced for phase 1 alone from the wire bytes (:meth:`~tailq.comm.network.Network.time`, through
:func:`~tailq.comm.topology.link_seconds`) on the ``network`` the comm is given (else
:data:`~tailq.comm.network.PLANNING_DEFAULT`, 10 Gbit/s): compressed, the statistics all-reduce's latency (none with
``stale_stats``) + the all-to-all of N shards of ``dense_bytes(m)`` (the first of
``Planner.phases("twophase")``; on a hierarchy the fp32 reduce-scatter in the node, then that over the K nodes) +
3 codec passes per element (statistics, encode, decode; of d/L elements on a hierarchy); bf16, the all-to-all of
2·N·S bytes + the cast. The codec's costs are measured on every rank at the first call
(:func:`~tailq.hooks.tailq_hook.measure_codec_cost`) and agreed (their mean, one all-reduce), so every rank prices
alike. The model's cheaper arm starts (ties: compressed). Each arm's cost is the seconds of the call on the
critical path (casts, codec, collectives and the wait for the slowest rank; not ``measure_every``'s exact reduce):
``perf_counter`` around it on the CPU, where the call is synchronous; on a GPU, CUDA events around it on the current
stream (FSDP's reduce-scatter stream), read when the step closes so the backward is not held up.
Decisions come at the end of a step, in the autograd final callback that closes it (queued after FSDP's own, so
every reduce-scatter of the backward, the root's included, has run and no FSDP collective of that backward is left:
the same point in every rank's sequence of collectives on the group): every ``adapt_every`` steps (first after 2)
the ranks agree the measurements (``ClosedLoop.decide``: MAX all-reduces on the comm's group) and switch a module
whose other arm is measured cheaper by 15%; the other arm is probed on at most 1 + ``explore`` × steps. A step that
did not finish (a backward or a direct call that raised) decides nothing. Calls below ``min_bucket`` stay outside
the loop. ``metrics.plan["loop"]`` reports per module (``plan["loop_modules"]``: index → name) the plan, each arm's
cost, the route now, probes and switches; the loop is in the ``state_dict``.

*Why the default is not* ``auto``: ``compress(model, "tnq", bits=3)`` names a compressor, and what it does —
bits per coordinate, the quantization error, states saved by earlier versions (they load as ``"twophase"``) — must
not change under its users; with ``auto`` a module may run bf16 instead. ``auto`` keeps a module compressed only
while compressed is measured no slower than bf16 / (1 − 0.15) on the slowest rank, spending at most
1 + ``explore`` × steps probes on the other arm: the choice for a user who wants no slower than bf16.

Faults, as the DDP hook: a NaN/Inf on any rank sends that call uncompressed (fp32) on every rank; ranks configured
differently fail on the first call with every rank's configuration listed (``Comm.verify_same_config``); every
wait has the ``timeout_s`` timeout.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from tailq.codec import Aggregation, Compressor, ErrorFeedback, compressor, get_compressor_class, list_compressors
from tailq.comm.adapt import ClosedLoop, LoopConfig
from tailq.comm.agree import OneStepStale, RedesignEvery, policy_for
from tailq.comm.families import family_for
from tailq.comm.network import PLANNING_DEFAULT, Network
from tailq.comm.routes import CodecCost, Planner, shard_numel
from tailq.comm.routes.hierarchical import NODE_KIND, NodeComms
from tailq.comm.topology import Shape, detect, link_seconds
from tailq.comm.topology import agree as agree_shape
from tailq.comm.wire import Comm, Tag, new_group_like
from tailq.hooks.config import HookConfig
from tailq.hooks.metrics import HookMetrics
from tailq.hooks.tailq_hook import measure_codec_cost, resume_config
from tailq.kernels import RandKey, dispatch

try:  # torch >= 2.9 (FSDP2's pluggable collectives)
    from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter as _ReduceScatterBase
except ImportError:  # pragma: no cover - older torch: the comm still works when called directly
    _ReduceScatterBase = object  # type: ignore[assignment,misc]

__all__ = ["FSDP_OPTIONS", "FsdpReduceScatter", "ModuleReduceScatter", "compress", "reduce_scatter",
           "shardable_compressors"]

STATE_VERSION = 4
"""2: per-call state is keyed by module name (:meth:`FsdpReduceScatter.for_module`), not ``"<call>:<numel>"``.
3: ``node_size`` in the configuration, the agreed ``layout`` saved, and a hierarchical call's state filed under
``"<key>|hier"`` (see "Hierarchy"); a version-2 state loads as one of the flat layout.
4: ``route``, ``adapt_every`` and ``explore`` in the configuration, the closed loop's state saved (``loop``,
``loop_modules``, ``prior``; see "Route"); a version-2 or -3 state loads as ``route="twophase"``."""
ROUTE = "reduce_scatter"
"""The route name in wire records and ``metrics.last``."""
HIER_ROUTE = "hier-reduce_scatter"
"""The route name of a hierarchical call (K > 1 nodes of L > 1 workers; see "Hierarchy")."""
HIER_SUFFIX = "|hier"
"""Appended to a call's state key on the hierarchical path: its state is for the (K, S) node means, not (N, S)."""
PASSTHROUGH = {"fp32": torch.float32, "bf16": torch.bfloat16}
"""Uncompressed names: one ``all_to_all_single`` of the chunks in that dtype, summed by the owner in fp32 — the
reduce-scatter traffic of NCCL's ring, (N − 1)/N · d values per rank, where Gloo's own ``reduce_scatter_tensor``
is an all-reduce in disguise (2 (N − 1)/N · d). The fair uncompressed baseline on Gloo."""
FSDP_OPTIONS = ("route", "adapt_every", "explore", "error_feedback", "stale_stats", "redesign_every", "min_bucket",
                "measure_every", "node_size", "timeout_s")
"""The DDP hook's options (:class:`~tailq.hooks.config.HookConfig`) that apply to a reduce-scatter."""
FSDP_ROUTES = ("twophase", "auto")
"""``route``: ``twophase`` (every call compressed; the default) or ``auto`` (the closed loop; see "Route")."""
DEFAULT_ROUTE = "twophase"
BF16_ARM = "passthrough"
"""The loop's uncompressed arm: the chunks in bf16, one all-to-all, summed in fp32 (the DDP loop's name for bf16)."""
STATS_PRICED_BYTES = 16
"""The statistics all-reduce as the prior prices it: its latency (2(N − 1) hops) is what counts."""
PRIOR_PASSES = 3.0
"""Codec passes per element of a compressed call: the statistics, the encode, the decode of the N contributions."""
log = logging.getLogger("tailq")


def shardable_compressors() -> list[str]:
    """Compressors whose codes sit on one shared codebook and split into byte shards (the family's ``shardable``:
    shared-codebook aggregation and a ``bits`` option, the rule of :func:`~tailq.comm.families.family_for`)."""
    return sorted(n for n in list_compressors() if get_compressor_class(n).aggregation is Aggregation.SHARED_CODEBOOK
                  and "bits" in get_compressor_class(n).options)


def _op_name(op: Any) -> str:
    """``"sum"`` or ``"avg"``; anything else is refused, with what to do instead."""
    if op == dist.ReduceOp.SUM:
        return "sum"
    if op == dist.ReduceOp.AVG:
        return "avg"
    raise ValueError(
        f"tailq.fsdp: reduce op {getattr(op, 'op', op)} is not supported (SUM and AVG are); FSDP passes PREMUL_SUM "
        "when a gradient divide factor is set: call set_force_sum_reduction_for_comms(True) on every FSDP module "
        "(FSDP then divides by the factor itself), or use tailq.fsdp.compress(model, name, ...), which does"
    )


def _nonfinite_count(x: torch.Tensor) -> int:
    fast = dispatch.nonfinite_count(x)  # one fused reduction where a fast path exists
    return int((~torch.isfinite(x)).sum()) if fast is None else fast


def _completed_work(result: torch.Tensor) -> Any:
    """A ``Work`` that is already done (the comm runs synchronously; an ``async_op`` caller may still wait on it)."""
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(result)
    return torch._C._distributed_c10d._create_work_from_future(fut)  # type: ignore[attr-defined]


class FsdpReduceScatter(_ReduceScatterBase):  # type: ignore[misc,valid-type]
    """A compressed reduce-scatter for FSDP2 (``FSDPModule.set_custom_reduce_scatter``); see the module docstring.

    ``FsdpReduceScatter(name, *, process_group=None, seed=0, **options)``: ``name`` a shardable compressor
    (:func:`shardable_compressors`: single-scale, tbq, tnq, tuq); ``options`` its own (``bits``, ``tail``, …) and
    the hook options of :data:`FSDP_OPTIONS` (``min_bucket`` compares with the whole input, N·S elements: smaller
    inputs go uncompressed; ``measure_every=k``: every k-th step also reduces the exact fp32 shard, kind
    ``"measure"``, and records the vNMSE of the whole input in ``metrics.vnmse``; ``node_size``: workers per node,
    see "Hierarchy" in the module docstring; ``route``: ``"twophase"`` (default) or ``"auto"``, with
    ``adapt_every`` and ``explore``, see "Route"). ``network`` (a :class:`~tailq.comm.network.Network`): what
    ``route="auto"``'s prior prices the wire bytes on (default :data:`~tailq.comm.network.PLANNING_DEFAULT`).
    ``process_group``: the group to reduce over; by default the one FSDP
    passes (bound at the first call; later calls must pass a group of the same size and rank). Like the DDP hook it
    may be created before the process group exists. ``metrics`` is a :class:`~tailq.hooks.HookMetrics`.
    """

    def __init__(self, name: str, *, process_group: Any = None, seed: int = 0, network: Network | None = None,
                 **options: Any) -> None:
        accepted = shardable_compressors()
        if name in PASSTHROUGH:
            self._init_passthrough(name, process_group, seed, options if network is None
                                   else {**options, "network": network})
            return
        self.wire_dtype: torch.dtype | None = None
        if name not in list_compressors():
            raise ValueError(f"tailq.fsdp: unknown compressor {name!r}; accepted (shardable): {', '.join(accepted)}; "
                             f"uncompressed: {', '.join(PASSTHROUGH)}")
        comp_names = set(get_compressor_class(name).options)
        hook_names = HookConfig.names()
        unknown = sorted(set(options) - comp_names - hook_names)
        if unknown:
            raise TypeError(f"tailq.fsdp {name}: unknown option(s) {', '.join(unknown)}; compressor options: "
                            f"{', '.join(sorted(comp_names | {'seed'}))}; reduce-scatter options: "
                            f"{', '.join(sorted({*FSDP_OPTIONS, 'network', 'process_group'}))}")
        refused = sorted(set(options) & (hook_names - set(FSDP_OPTIONS)) - comp_names)
        if refused:
            raise TypeError(f"tailq.fsdp {name}: option(s) {', '.join(refused)} configure the DDP hook's routes or "
                            f"warm-up and do not apply to a reduce-scatter (phase 1 of the two-phase route or bf16, "
                            f"no owner requantization); options that apply: {', '.join(FSDP_OPTIONS)}")
        route = options.get("route", DEFAULT_ROUTE)
        if route not in FSDP_ROUTES:
            raise ValueError(f"tailq.fsdp {name}: route must be 'twophase' (every call compressed: phase 1 of the "
                             f"two-phase route; the default) or 'auto' (per module, compressed or bf16 by the closed "
                             f"loop); got {route!r}")
        if network is not None and not isinstance(network, Network):
            raise TypeError(f"tailq.fsdp {name}: network must be a tailq.comm.network.Network or None; got "
                            f"{type(network).__name__}")
        # HookConfig validates each option (the DDP-only fields keep their defaults and are not used)
        self.options = HookConfig(**{**{k: v for k, v in options.items() if k in FSDP_OPTIONS}, "route": route})
        own = {k: v for k, v in options.items() if k in comp_names}
        self.comp: Compressor | None = compressor(name, seed=seed, **own)
        opts = self.options
        if opts.redesign_every > 1 and not getattr(self.comp, "rescalable", False):
            raise ValueError(f"tailq.fsdp: redesign_every applies to the rescalable quantizers, not {name!r}; "
                             f"use redesign_every=1")
        self.memory = ErrorFeedback(self.comp, feedback=str(opts.error_feedback)) if opts.error_feedback else None
        self.family = family_for(self.comp, fine_bits=opts.fine_bits, keep_own=False,
                                 redesign_every=opts.redesign_every)
        if not self.family.shardable:
            raise ValueError(f"tailq.fsdp: {name!r} cannot be sharded (its codes are not on one shared codebook); "
                             f"accepted: {', '.join(accepted)}")
        self.policy: Any = policy_for(self.family, stale_stats=opts.stale_stats, redesign_every=opts.redesign_every,
                                 first_step=0)
        self._init_common(name, seed, process_group)
        self.route = route
        self.network = network if network is not None and network.known else PLANNING_DEFAULT
        # route="auto": per module, compressed or bf16, the model's prior corrected by measurement (comm/adapt.py)
        self.loop: ClosedLoop | None = (ClosedLoop(LoopConfig(every=opts.adapt_every, explore=opts.explore),
                                                   self._prior) if route == "auto" else None)

    def _init_common(self, name: str, seed: int, process_group: Any) -> None:
        self.name, self.seed = name, seed
        self.route = "passthrough"  # a compressor's: DEFAULT_ROUTE or "auto"
        self.network = PLANNING_DEFAULT
        self.loop = None
        self._loop_ids: dict[str, int] = {}  # module name (bare comm: "call <i>") -> its index in the loop
        self._codec: CodecCost | None = None  # the prior's codec cost, agreed by the ranks at the first call
        self._clocks: list[tuple[int, Any, Any]] = []  # (loop index, start, end) CUDA events of the open step
        self.metrics = HookMetrics()
        self.step = 0
        self.calls_per_step = 0  # calls in the last finished step
        self._process_group = process_group
        self._comm: Comm | None = None
        self._saved_world: int | None = None  # world size of a state loaded before binding: checked at binding
        self._verified = False
        self._call = 0  # calls so far in the open step
        self._task: int | None = None  # autograd graph task of the open step; None: no step open
        self._closed = False
        self._views: dict[str, ModuleReduceScatter] = {}  # module name -> its view (for_module)
        self._sizes: dict[str, int] = {}  # state key -> the numel of the state kept under it (views only)
        self._seen: dict[str, int] = {}  # module name -> its calls so far in the open step
        self.shape: Shape | None = None  # K nodes x L workers, agreed by the ranks at the first call
        self._node: NodeComms | None = None  # the node and cross-node groups (at the first hierarchical call)
        self._saved_layout: str | None = None  # the layout a loaded state was saved on (checked at agreement)

    def _init_passthrough(self, name: str, process_group: Any, seed: int, options: dict[str, Any]) -> None:
        """``fp32`` / ``bf16``: no compression — one all-to-all of the chunks in that dtype, summed in fp32."""
        wrong = sorted(set(options) - {"timeout_s", "node_size"})
        if wrong:
            raise TypeError(f"tailq.fsdp {name}: takes only timeout_s and node_size (and process_group); got "
                            f"{', '.join(wrong)}")
        self.wire_dtype = PASSTHROUGH[name]
        self.options = HookConfig(**options)
        self.comp = None
        self.memory = None
        self.policy = None
        self._init_common(name, seed, process_group)

    # -- per-module identity --------------------------------------------------------------------------------
    def for_module(self, name: str) -> ModuleReduceScatter:
        """The reduce-scatter to install on the FSDP module called ``name`` (``set_custom_reduce_scatter``): this
        comm, with that module's per-call state (error-feedback residuals, stale statistics, kept designs) and
        randomness keyed by ``name``, so a module that makes no call in some step shifts nothing. Names must be
        unique per module and the same on every rank (:func:`compress` uses ``module.named_modules()``); one view
        per name."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"tailq.fsdp: for_module needs a non-empty module name; got {name!r}")
        view = self._views.get(name)
        if view is None:
            view = self._views[name] = ModuleReduceScatter(self, name)
        return view

    @property
    def stateful(self) -> bool:
        """Whether a call leaves state for the same module's next call (``error_feedback``, ``stale_stats``,
        ``redesign_every`` > 1): such a comm must be called through :meth:`for_module` views."""
        return self.memory is not None or isinstance(self.policy, (OneStepStale, RedesignEvery))

    def _state_options(self) -> str:
        o = self.options
        named = [f"error_feedback={o.error_feedback!r}" if self.memory is not None else "",
                 "stale_stats=True" if isinstance(self.policy, OneStepStale) else "",
                 f"redesign_every={o.redesign_every}" if isinstance(self.policy, RedesignEvery) else ""]
        return ", ".join(n for n in named if n)

    # -- the ReduceScatter interface ------------------------------------------------------------------------
    def allocate(self, size: Sequence[int | torch.SymInt], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(tuple(size), dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: Any = None,
                 op: Any = dist.ReduceOp.SUM, async_op: bool = False) -> Any:
        """Write this rank's reduced shard of ``input_tensor`` into ``output_tensor`` (runs synchronously;
        with ``async_op`` the returned ``Work`` is already complete). Called bare (no module identity), state is
        keyed by call position: refused for a :attr:`stateful` comm, use :meth:`for_module`."""
        return self._run(None, output_tensor, input_tensor, group, op, async_op)

    def _run(self, module: str | None, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: Any,
             op: Any, async_op: bool) -> Any:
        """One call, from ``module``'s view (None: the bare comm)."""
        if self._closed:
            raise RuntimeError("tailq.fsdp: this reduce-scatter was closed")
        if module is None and self.stateful:
            raise ValueError(
                f"tailq.fsdp: {self._state_options()} keeps state per module, which a bare comm "
                f"(set_custom_reduce_scatter(comm)) could only key by call position (a skipped module would hand "
                f"its state to the next); use tailq.fsdp.compress(model, ...), or set_custom_reduce_scatter("
                f"comm.for_module(name)) on each FSDP module")
        kind = _op_name(op)
        comm = self._bind(group)
        n, numel, s = comm.n, input_tensor.numel(), output_tensor.numel()
        if numel != n * s:
            raise ValueError(f"tailq.fsdp: input has {numel} elements, expected world size {n} × output {s}")
        if input_tensor.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise TypeError(f"tailq.fsdp: reduce-scatter of {input_tensor.dtype} is not supported (floating only)")
        idx, step = self._begin_call()
        ident = None
        if module is not None:  # the module's k-th call in this step (k > 0 only if FSDP calls it twice)
            k = self._seen.get(module, 0)
            self._seen[module] = k + 1
            ident = module if k == 0 else f"{module}#{k}"
        done = False
        try:
            self._reduce(comm, output_tensor, input_tensor.reshape(n, s), kind, step, idx, ident)
            done = True
        finally:
            if self._task == -1:  # called outside a backward: every call is a step (one that raised decides nothing)
                self._end_step(-1, decide=done)
        return _completed_work(output_tensor) if async_op else None

    # -- one call -------------------------------------------------------------------------------------------
    def _reduce(self, comm: Comm, output: torch.Tensor, x2: torch.Tensor, kind: str, step: int, idx: int,
                ident: str | None) -> None:
        """This rank's shard of the (N, S) input ``x2``, reduced by ``kind`` ("sum" | "avg"), into ``output``;
        ``ident``: the calling module's state key (None: the bare comm, keyed by position)."""
        n, s = x2.shape
        numel = n * s
        t0, comm0, sec = time.perf_counter(), self._comm_seconds(), self.metrics.seconds
        meas0 = sec["measure"]
        if not self._verified:
            # the prior's network too: ranks pricing differently would take different routes (mismatched collectives)
            comm.verify_same_config({**self.config(), **({"network": self.network.as_arg()} if self.loop else {})},
                                    Tag(step, idx, numel, "config"))
            self._agree_topology(comm, Tag(step, idx, numel, "config"))
            if self.loop is not None and self._codec is None:
                self._codec = self._agree_codec(comm, Tag(step, idx, numel, "plan"), x2.device)
            self._verified = True
        g = None
        exact = None
        if self.options.measure_every and step % self.options.measure_every == 0:
            tm = time.perf_counter()
            g = x2.to(torch.float32)  # a copy for bf16; for fp32 the input itself, never written
            exact = self._exact(g, Tag(step, idx, numel, "measure"), "measure") / n
            sec["measure"] += time.perf_counter() - tm  # not part of the method: harnesses subtract it
        small = self.wire_dtype is None and (numel < self.options.min_bucket or s == 0)
        arm, lid, clock = None, -1, None
        if self.loop is not None and not small:  # route="auto": this module's arm at this step (agreed state)
            name = ident if ident is not None else f"call {idx}"
            if name not in self._loop_ids:  # indexed in order of first call: the same on every rank
                self._loop_ids[name] = len(self._loop_ids)
                self.metrics.plan.setdefault("loop_modules", {})[str(self._loop_ids[name])] = name
            lid = self._loop_ids[name]
            arm = self.loop.route(lid, f"{name}:{numel}", numel, step)
            clock = self._start_clock(x2)  # the arm's work from here: casts, codec, collectives, waiting for peers
        if self.wire_dtype is not None:  # fp32 / bf16 passthrough: what a reduce-scatter of that dtype moves
            t, summed = self._exact(x2.to(self.wire_dtype), Tag(step, idx, numel, "passthrough"), "passthrough"), True
            self.metrics.last[idx] = {"route": "passthrough"}
        elif small:
            t, summed = self._exact(x2, Tag(step, idx, numel, "passthrough"), "passthrough"), True
            self.metrics.last[idx] = {"route": "passthrough"}
        elif arm == BF16_ARM:
            t, summed = self._bf16(x2, Tag(step, idx, numel, BF16_ARM)), True
        else:
            t, summed = self._compressed(g if g is not None else x2.to(torch.float32), step, idx, ident)
        if clock is not None:
            self._stop_clock(lid, clock)
        if ident is not None:
            self.metrics.last[idx]["module"] = ident
        if exact is not None:
            tm = time.perf_counter()
            self._record_vnmse(comm, step, idx, t / n if summed else t, exact)
            sec["measure"] += time.perf_counter() - tm
        self.metrics.wire.count_bucket(numel)
        if kind == "avg":
            out = t / n if summed else t
        else:  # the compressed mean times N: exact in fp32 for N a power of two
            out = t if summed else t * n
        output.view(-1).copy_(out)
        measured = sec["measure"] - meas0
        sec["total"] += time.perf_counter() - t0 - measured
        sec["communicate"] += self._comm_seconds() - comm0 - measured

    def _start_clock(self, x: torch.Tensor) -> Any:
        """Where the loop's measurement of a call starts: ``perf_counter`` (the comm is synchronous on the CPU), or a
        CUDA event on the current stream (FSDP's reduce-scatter stream) for an input on a GPU, where the work after
        the last host synchronization runs asynchronously."""
        if x.is_cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            return start
        return time.perf_counter()

    def _stop_clock(self, lid: int, start: Any) -> None:
        """This rank's seconds on the arm for module ``lid`` at this step: now on the CPU; on a GPU the stream's time
        from ``start`` to an end event, read when the step closes (:meth:`_read_clocks`), not during the backward."""
        assert self.loop is not None
        if isinstance(start, float):
            self.loop.record(lid, time.perf_counter() - start)
            return
        end = type(start)(enable_timing=True)  # a torch.cuda.Event
        end.record()
        self._clocks.append((lid, start, end))

    def _read_clocks(self) -> None:
        """The step's GPU measurements into the loop (before it decides): one wait for the step's last event."""
        clocks, self._clocks = self._clocks, []
        if self.loop is None:
            return
        for lid, start, end in clocks:
            end.synchronize()
            self.loop.record(lid, start.elapsed_time(end) / 1e3)  # ms -> s

    def _bf16(self, x2: torch.Tensor, tag: Tag) -> torch.Tensor:
        """The loop's uncompressed arm: the fp32 sum of this rank's shard from the chunks cast to bf16 (one flat
        all-to-all, as the ``bf16`` passthrough; no error-feedback or statistics state is touched)."""
        self.metrics.last[tag.bucket] = {"route": BF16_ARM, "dtype": "bf16"}
        return self._exact(x2.to(torch.bfloat16), tag, "passthrough")

    def _compressed(self, g: torch.Tensor, step: int, idx: int, ident: str | None) -> tuple[torch.Tensor, bool]:
        """(the fp32 mean shard, False), or (the fp32 sum shard, True) when it fell back: phase 1 of the two-phase
        route over all N ranks, or, on K > 1 nodes of L > 1 workers, the hierarchical call (:meth:`_hierarchical`).
        State is filed under ``ident`` (a module's), or under ``"<call>:<numel>"`` for the bare comm (stateless
        then: only the octave shift, and a shift that does not fit the bucket is corrected by extra agreements).
        """
        comm = self.comm
        n, s = g.shape
        numel = n * s
        if ident is None:
            key, stream = f"{idx}:{numel}", idx
        else:
            key, stream = ident, (1 << 32) | zlib.crc32(ident.encode())  # apart from the bare comm's call indices
            if self.stateful:
                self._check_size(key, numel)
        rkey = RandKey(self.seed, comm.rank, step, stream)  # keyed by the rank in the whole group, on either path
        if self.shape is not None and self.shape.hierarchical:
            return self._hierarchical(g, Tag(step, idx, numel, HIER_ROUTE), key + HIER_SUFFIX, rkey)
        tag = Tag(step, idx, numel, ROUTE)
        ftag = dataclasses.replace(tag, route="fallback")
        return self._phase1(comm, g, tag, key, rkey, lambda why: self._fallback(g, ftag, why))

    def _hierarchical(self, g: torch.Tensor, tag: Tag, key: str, rkey: RandKey) -> tuple[torch.Tensor, bool]:
        """K nodes × L workers: the exact fp32 reduce-scatter inside the node gives this rank (local rank l) its
        node's mean of the K chunks owned by the ranks (k', l), one per node; phase 1 over the K ranks of its cross
        group then gives the mean over nodes of its own chunk (see "Hierarchy" in the module docstring)."""
        comms = self._node_comms()
        K, L = comms.shape.nodes, comms.shape.node_size
        n, s = g.shape
        # (K, L, S) -> (L, K, S): block l holds the chunks of the ranks with local rank l, in node order; each rank's
        # values divided by L before the sum, as DDP divides before its all-reduce
        x = g.reshape(K, L, s).div(L).transpose(0, 1).contiguous()
        part = comms.node.reduce_scatter(x.reshape(-1), tag, NODE_KIND).view(K, s)  # row k': node k''s mean
        ftag = dataclasses.replace(tag, route="fallback")

        def fallback(why: str) -> tuple[torch.Tensor, bool]:  # the exact mean of the node means, in fp32
            total, _ = self._fallback(part, ftag, why, comms.cross)
            return total / K, False

        out = self._phase1(comms.cross, part, tag, key, rkey, fallback)
        self.metrics.last[tag.bucket].update({"nodes": K, "node_size": L})
        return out

    def _phase1(self, comm: Comm, g: torch.Tensor, tag: Tag, key: str, rkey: RandKey,
                fallback: Callable[[str], tuple[torch.Tensor, bool]]) -> tuple[torch.Tensor, bool]:
        """Phase 1 of :class:`~tailq.comm.routes.twophase.TwoPhase` over ``comm``'s n ranks for the (n, S) input
        ``g`` (row r: the chunk of ``comm``'s rank r): compensate → agree → codebook → shards → all-to-all → the
        owner's mean; ``(mean, False)``, or what ``fallback(why)`` returns when some rank holds a NaN/Inf."""
        assert self.policy is not None
        n, s = g.shape
        numel = n * s
        x = self.memory.compensate(key, g.reshape(-1)) if self.memory is not None else g.reshape(-1)
        bad = _nonfinite_count(x)
        xs = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0) if bad else x
        agreed = self.policy.agree(comm, tag, key, xs, bad)  # on the unpadded input: padding biases no statistic
        if agreed.nonfinite:
            return fallback("non-finite gradient on some rank")
        m = shard_numel(numel, n)
        padded = torch.nn.functional.pad(xs.view(n, s), (0, m - s)).reshape(-1)  # row r stays chunk r
        coder = self.family.coder(padded, agreed.codebook, comm, tag, key)
        own: torch.Tensor | None
        target: torch.Tensor | None
        if coder is None:  # every rank's input is zero: the mean is exactly zero, nothing else is sent
            mean = torch.zeros(s, dtype=torch.float32, device=g.device)
            own = target = torch.zeros_like(xs)
            info: dict[str, Any] = {"zero": True}
        else:
            sc: Any = coder  # a shard coder: the family is shardable (checked at construction)
            packed, m_coder = sc.encode_shards(rkey, n)
            assert m_coder == m, (m_coder, m)
            rows = comm.all_to_all(packed, tag, "payload")  # row j: rank j's codes of my shard
            mean = sc.decode_shard_mean(rows, m)[:s]
            own = target = None
            info = {k: v for k, v in coder.info.items() if k != "gather_bits"}
        if not self.policy.settle(comm, key, agreed):  # stale statistics arriving now say NaN/Inf: void
            return fallback("non-finite gradient on some rank (seen in stale-mode stats)")
        if self.memory is not None:  # the residual of what this rank sent, on the unpadded layout
            if coder is not None:
                own = coder.own().view(n, m)[:, :s].reshape(-1)
                target = coder.target().view(n, m)[:, :s].reshape(-1)
            assert own is not None and target is not None
            self.memory.update(key, x, own, target=target)
        self.metrics.last[tag.bucket] = {"route": tag.route, "shard_numel": m, **info}
        return mean, False

    def _check_size(self, key: str, numel: int) -> None:
        """A module's state is for the input size it was made with: another size is an error, never a reuse."""
        held = self._sizes.setdefault(key, numel)
        if held != numel:
            raise ValueError(
                f"tailq.fsdp: module {key!r} reduce-scatters {numel} elements this step, but the state kept for it "
                f"({self._state_options()}) was made for {held}: its FSDP parameter group changed size (FSDP "
                f"leaves out parameters that got no gradient); give such parameters a fully_shard of their own, or "
                f"turn these options off")

    def _exact(self, x2: torch.Tensor, tag: Tag, kind: str, comm: Comm | None = None) -> torch.Tensor:
        """The fp32 sum of this rank's shard: one all-to-all of the raw (n, S) rows in their dtype over ``comm``
        (default: the whole group), summed by the owner in rank order starting from rank 0's row."""
        rows = (comm or self.comm).all_to_all(x2.reshape(-1), tag, kind)
        total = rows[0].to(torch.float32).clone()
        for row in rows[1:]:
            total += row.to(torch.float32)
        return total

    def _fallback(self, g: torch.Tensor, tag: Tag, why: str, comm: Comm | None = None) -> tuple[torch.Tensor, bool]:
        """Uncompressed fp32 over ``comm`` (default: the whole group): non-finite values reach the owner exactly as
        with plain FSDP."""
        self.metrics.fallbacks.append({"step": tag.step, "bucket": tag.bucket, "why": why})
        self.metrics.last[tag.bucket] = {"route": "fallback"}
        return self._exact(g, tag, "fallback", comm), True

    def _record_vnmse(self, comm: Comm, step: int, idx: int, mean: torch.Tensor, exact: torch.Tensor) -> None:
        """vNMSE of the whole reduced input: every owner's squared error and norm, summed by one all-reduce."""
        e = torch.tensor([float(((mean.double() - exact.double()) ** 2).sum()), float((exact.double() ** 2).sum())],
                         dtype=torch.float64)
        comm.all_reduce(e, Tag(step, idx, exact.numel() * comm.n, "measure"), "measure")
        self.metrics.vnmse.append({"step": step, "bucket": idx,
                                   "vnmse": float(e[0] / e[1]) if e[1] > 0 else float("nan")})

    # -- steps ----------------------------------------------------------------------------------------------
    def _begin_call(self) -> tuple[int, int]:
        """(call index within the step, step) for this call; opens a step (see "Steps" in the module docstring)."""
        task = int(torch._C._current_graph_task_id())  # -1 outside a backward
        if self._task is not None and self._task != task:  # a backward that raised never closed its step
            self._end_step(self._task, decide=False)
        if self._task is None:
            self._task, self._call = task, 0
            if task != -1:
                torch.autograd.Variable._execution_engine.queue_callback(lambda: self._end_step(task))
        idx = self._call
        self._call += 1
        return idx, self.step

    def _end_step(self, task: int, decide: bool = True) -> None:
        """Close the step of graph task ``task`` (-1: a direct call). With ``route="auto"`` a step that finished
        (``decide``) is where the loop decides, when due: every rank closes every step at the same point of its
        sequence of collectives on the group (after the step's last reduce-scatter, FSDP's final callback included),
        so the agreement's all-reduces match."""
        if self._task != task:  # already closed (by a later backward's first call)
            return
        try:
            self._read_clocks()  # the step's GPU measurements, recorded in the step they belong to
            if decide and self.loop is not None and self._comm is not None and self.loop.due(self.step):
                t0, comm0 = time.perf_counter(), self._comm_seconds()
                self.loop.decide(self._comm, Tag(self.step, self._call, 0, "plan"), self.step)  # MAX over ranks
                self.metrics.plan["loop"] = self.loop.report()
                self.metrics.seconds["total"] += time.perf_counter() - t0
                self.metrics.seconds["communicate"] += self._comm_seconds() - comm0
        finally:
            self.calls_per_step = self._call
            self.step += 1
            self._task, self._call = None, 0
            self._seen = {}

    # -- binding, configuration and persistence -------------------------------------------------------------
    def _bind(self, group: Any) -> Comm:
        if self._comm is None:
            if not dist.is_initialized():
                raise RuntimeError("tailq.fsdp: call torch.distributed.init_process_group before the first backward")
            pg = self._process_group if self._process_group is not None else group
            self._comm = Comm(pg, self.metrics.wire, self.options.timeout_s)
            if self._saved_world is not None and self._saved_world != self._comm.n:
                raise ValueError(f"tailq.fsdp: the loaded state was saved with world size {self._saved_world}, "
                                 f"this group has {self._comm.n} ranks")
        comm = self._comm
        if group is not None and group is not comm.group:
            size, rank = dist.get_world_size(group), dist.get_rank(group)
            if (size, rank) != (comm.n, comm.rank):
                raise ValueError(f"tailq.fsdp: FSDP passed a group of {size} ranks (this rank {rank}) but the comm is "
                                 f"bound to one of {comm.n} ranks (this rank {comm.rank}); FSDP's chunk r belongs to "
                                 f"rank r of its group, so process_group must order the same ranks the same way")
        return comm

    # -- topology -------------------------------------------------------------------------------------------
    def _agree_topology(self, comm: Comm, tag: Tag) -> None:
        """At the first call (the same point on every rank): every rank's node (``node_size``, torchrun's
        environment, or one worker per node), exchanged in one all-gather of three integers and checked, as the DDP
        hook does; the wire log then counts each collective on the node's shared NIC."""
        found = detect(self.options.node_size)
        mine = torch.tensor(found[:3], dtype=torch.int64)
        shape, why = agree_shape(found, comm.all_gather(mine, tag, "config"), comm.n)
        if why is not None:
            log.warning("tailq.fsdp %s: %s", self.name, why)
        self.shape = shape
        comm.shape = shape
        self.metrics.wire.node_size = shape.node_size
        self.metrics.topology = {"nodes": shape.nodes, "node_size": shape.node_size, "source": found[3],
                                 "flat_because": why}
        self._check_layout(self._saved_layout, self._sizes)

    # -- route="auto": the prior -----------------------------------------------------------------------------
    def _agree_codec(self, comm: Comm, tag: Tag, device: torch.device) -> CodecCost:
        """The codec's seconds per element and pass and bf16's cast, measured on every rank and agreed (the mean:
        one all-reduce of two numbers, at the first call) so that every rank prices the arms alike."""
        assert self.comp is not None
        local = measure_codec_cost(self.comp, self.family, device, comm.n, RandKey(self.seed, comm.rank))
        agreed = torch.tensor([local.per_pass_s, local.cast_s], dtype=torch.float64)
        comm.all_reduce(agreed, tag, "plan")
        per_pass, cast = (agreed / comm.n).tolist()
        self._plan_info(CodecCost(per_pass, cast))
        return CodecCost(per_pass, cast)

    def _plan_info(self, codec: CodecCost) -> None:
        self.metrics.plan.update({"network": self.network.summary(), "codec_ns_per_elem_pass": codec.per_pass_s * 1e9,
                                  "cast_ns_per_elem": codec.cast_s * 1e9})

    def _arm_seconds(self, numel: int) -> tuple[float, float]:
        """The cost model's seconds for one call of ``numel`` (= N·S) elements: (compressed, bf16), see "Route".

        Compressed: the statistics all-reduce's latency (unless ``stale_stats`` takes it off the critical path),
        phase 1's all-to-all (the first of the two-phase route's phases) and 3 codec passes per element; on K > 1
        nodes of L > 1 workers the fp32 reduce-scatter inside the node, then that over the K ranks of the cross group
        for the d/L node means. bf16: the all-to-all of the bf16 chunks and the cast."""
        assert self.shape is not None and self._comm is not None
        shape, net, codec = self.shape, self.network, self._codec or CodecCost()
        stats = 0.0 if self.options.stale_stats else 1.0
        if shape.hierarchical:
            part = numel // shape.node_size  # the (K, S) node means each rank compresses among its cross group
            collective, handed = Planner(self.family, shape.nodes, net).phases("twophase", part)[0]
            comp = (link_seconds(net, "node", "all_to_all", 4 * numel, shape)
                    + stats * link_seconds(net, "cross", "all_reduce", STATS_PRICED_BYTES, shape)
                    + link_seconds(net, "cross", collective, handed, shape) + PRIOR_PASSES * codec.per_pass_s * part)
        else:
            collective, handed = Planner(self.family, shape.n, net).phases("twophase", numel)[0]
            comp = (stats * link_seconds(net, "world", "all_reduce", STATS_PRICED_BYTES, shape)
                    + link_seconds(net, "world", collective, handed, shape) + PRIOR_PASSES * codec.per_pass_s * numel)
        bf16 = link_seconds(net, "world", "all_to_all", 2 * numel, shape) + codec.cast_s * numel
        return comp, bf16

    def _prior(self, numel: int) -> tuple[str, str, float, float]:
        """The closed loop's prior for a module's call of ``numel`` elements: the model's cheaper arm (ties:
        compressed), the other, and the model's seconds of each."""
        comp, bf16 = self._arm_seconds(numel)
        name = HIER_ROUTE if self.shape is not None and self.shape.hierarchical else ROUTE
        return (name, BF16_ARM, comp, bf16) if comp <= bf16 else (BF16_ARM, name, bf16, comp)

    def _layout(self) -> str | None:
        """``"flat"`` or ``"<K>x<L>"`` (hierarchical): what the per-module state is for; ``None`` before the ranks
        agreed (then the layout of a loaded state, if any)."""
        if self.shape is None:
            return self._saved_layout
        if self.wire_dtype is not None or not self.shape.hierarchical:
            return "flat"
        return f"{self.shape.nodes}x{self.shape.node_size}"

    def _check_layout(self, saved: str | None, sizes: dict[str, int]) -> None:
        """A loaded state's per-module state (residuals, stale statistics: ``sizes`` non-empty) is for the layout
        ``saved`` it was saved on; checked once the ranks agreed theirs."""
        now = self._layout() if self.shape is not None else None
        if saved is None or now is None or saved == now or not sizes:
            return
        assert self.shape is not None
        raise ValueError(f"tailq.fsdp: the loaded state was saved on layout {saved} (nodes x workers; flat: no "
                         f"hierarchy) and its per-module state is for that layout, but the ranks now agree on "
                         f"{now} ({self.shape.describe()}); resume with the same node_size / torchrun layout, or "
                         f"start this comm fresh")

    def _node_comms(self) -> NodeComms:
        """This rank's node and cross-node groups, created at the first hierarchical call (the same call on every
        rank), node group first."""
        if self._node is None:
            assert self.shape is not None
            comm, shape = self.comm, self.shape
            pg = comm.group if comm.group is not None else dist.distributed_c10d._get_default_group()
            node = new_group_like(pg, shape.node_ranks(shape.node_of(comm.rank)), "tailq_fsdp_node")
            cross = new_group_like(pg, shape.cross_ranks(shape.local_of(comm.rank)), "tailq_fsdp_cross")
            wire, timeout = self.metrics.wire, self.options.timeout_s
            self._node = NodeComms(shape, comm.rank, Comm(node, wire, timeout, scope="node", shape=shape),
                                   Comm(cross, wire, timeout, scope="cross", shape=shape))
        return self._node

    def _comm_seconds(self) -> float:
        """Seconds spent waiting on collectives, on every group of this comm."""
        extra = 0.0 if self._node is None else self._node.node.seconds + self._node.cross.seconds
        return (self._comm.seconds if self._comm is not None else 0.0) + extra

    @property
    def comm(self) -> Comm:
        if self._comm is None:
            raise RuntimeError("tailq.fsdp: not bound to a process group yet (it binds at its first call)")
        return self._comm

    @property
    def bound(self) -> bool:
        """Whether the comm has bound to its process group (at its first call)."""
        return self._comm is not None

    def _world(self) -> int | None:
        if self._comm is not None:
            return self._comm.n
        if self._process_group is not None and dist.is_initialized():
            return int(dist.get_world_size(self._process_group))
        return None

    def config(self) -> dict[str, Any]:
        """Everything that must be identical on every rank and in a checkpoint that is loaded (``world_size`` is
        ``None`` until the comm knows its group)."""
        opts = {k: getattr(self.options, k) for k in FSDP_OPTIONS if k != "timeout_s"}
        opts["route"] = self.route  # "passthrough" for the fp32 / bf16 comms
        comp = self.comp.config() if self.comp is not None else {"name": self.name}
        return {"state_version": STATE_VERSION, "adapter": "fsdp.reduce_scatter", "compressor": comp,
                **opts, "world_size": self._world()}

    def state_dict(self) -> dict[str, Any]:
        """Plain dicts, ints, strings and tensors: loadable with ``torch.load(weights_only=True)``. Save between
        steps (after the optimizer step), as FSDP's own state."""
        codec = self._codec
        return {"config": self.config(), "step": self.step, "layout": self._layout(), "sizes": dict(self._sizes),
                "error_feedback": None if self.memory is None else self.memory.state_dict(),
                "loop": None if self.loop is None else self.loop.state_dict(), "loop_modules": dict(self._loop_ids),
                "prior": None if codec is None else {"per_pass_s": codec.per_pass_s, "cast_s": codec.cast_s},
                **(self.policy.state_dict() if self.policy is not None else {})}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved, mine = resume_config(state.get("config") or {}), resume_config(self.config())
        version = saved.get("state_version")
        if version not in (2, 3, STATE_VERSION):
            raise ValueError(f"tailq.fsdp: state_version {version} cannot be loaded by this tailq (state_version "
                             f"{STATE_VERSION}: per-call state is keyed by module name since version 2, by call "
                             f"position before); start this comm fresh")
        if version == 2:  # before the hierarchy: no node_size option, every call flat
            saved = {**saved, "node_size": None}
        if version in (2, 3):  # before route: every call at or above min_bucket compressed (fp32 / bf16: none)
            fixed = "passthrough" if (saved.get("compressor") or {}).get("name") in PASSTHROUGH else DEFAULT_ROUTE
            saved = {**saved, "state_version": STATE_VERSION, "route": fixed, "adapt_every": HookConfig.adapt_every,
                     "explore": HookConfig.explore}
        world = saved.get("world_size")
        if mine["world_size"] is None or world is None:  # unknown on one side: checked when the comm binds
            saved["world_size"] = mine["world_size"] = None
        if saved != mine:
            raise ValueError(f"tailq.fsdp: state was saved with a different configuration:\n  saved: "
                             f"{state.get('config')}\n  this:  {self.config()}")
        layout = "flat" if version == 2 else state.get("layout")
        layout = None if layout is None else str(layout)
        sizes = {str(k): int(v) for k, v in state.get("sizes", {}).items()}
        self._check_layout(layout, sizes)  # already bound and agreed: checked now, else at the agreement
        self._saved_world = None if world is None else int(world)
        self._saved_layout = layout
        self.step = int(state["step"])
        self._task, self._call, self._seen, self._clocks = None, 0, {}, []
        self._sizes = sizes
        if self.memory is not None:
            self.memory.load_state_dict(state["error_feedback"])
        if self.policy is not None:
            self.policy.load_state_dict(state)
        prior = state.get("prior")
        self._codec = None if not prior else CodecCost(float(prior["per_pass_s"]), float(prior["cast_s"]))
        if self.loop is not None:  # the saved loop (a fresh one if none was saved): it decides as the run it continues
            self.loop = ClosedLoop(self.loop.config, self._prior)
            self._loop_ids = {str(k): int(v) for k, v in (state.get("loop_modules") or {}).items()}
            self.metrics.plan = {}
            if self._codec is not None:
                self._plan_info(self._codec)
            if state.get("loop"):
                self.loop.load_state_dict(state["loop"])
                self.metrics.plan["loop"] = self.loop.report()
            if self._loop_ids:
                self.metrics.plan["loop_modules"] = {str(i): k for k, i in self._loop_ids.items()}

    def close(self) -> None:
        """Drop residuals and cached statistics; later calls raise. Idempotent."""
        self._closed = True
        self.memory = None

    def __repr__(self) -> str:
        world = self._world()
        what = repr(self.comp) if self.comp is not None else repr(self.name)
        return (f"FsdpReduceScatter({what}, world_size={'unbound' if world is None else world}, "
                f"step={self.step})")


class ModuleReduceScatter(_ReduceScatterBase):  # type: ignore[misc,valid-type]
    """One FSDP module's reduce-scatter (:meth:`FsdpReduceScatter.for_module`): FSDP2's ``ReduceScatter``
    interface, forwarding to the shared comm with the module's name as the identity of its state and randomness."""

    def __init__(self, shared: FsdpReduceScatter, name: str) -> None:
        self.shared, self.name = shared, name

    def allocate(self, size: Sequence[int | torch.SymInt], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return self.shared.allocate(size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: Any = None,
                 op: Any = dist.ReduceOp.SUM, async_op: bool = False) -> Any:
        return self.shared._run(self.name, output_tensor, input_tensor, group, op, async_op)

    def __repr__(self) -> str:
        return f"ModuleReduceScatter({self.name!r} of {self.shared!r})"


def reduce_scatter(name: str, **options: Any) -> FsdpReduceScatter:
    """A compressed reduce-scatter for ``FSDPModule.set_custom_reduce_scatter``: see :class:`FsdpReduceScatter`.

    Pass SUM or AVG ops only: call ``set_force_sum_reduction_for_comms(True)`` on the FSDP modules if a gradient
    divide factor is set (or use :func:`compress`, which does both). With ``error_feedback``, ``stale_stats`` or
    ``redesign_every`` > 1 install ``comm.for_module(name)`` on each module, not the comm itself.
    """
    return FsdpReduceScatter(name, **options)


def compress(module: torch.nn.Module, name: str, **options: Any) -> FsdpReduceScatter:
    """Make every FSDP module in ``module.modules()`` reduce-scatter its gradients with one shared tailq comm.

    Calls ``set_custom_reduce_scatter(comm.for_module(fqn))`` and ``set_force_sum_reduction_for_comms(True)`` on
    each (with force-sum FSDP passes SUM and applies any gradient divide factor itself, so the comm never sees
    PREMUL_SUM). ``fqn`` is the module's name in ``module.named_modules()`` (``"<root>"`` for ``module`` itself;
    modules that share one FSDP state, ``fully_shard([a, b])``, share the first one's name): per-call state and
    randomness are keyed by it, so a module that gets no gradient in some step shifts nothing. Returns the shared
    comm (``comm.metrics``, ``comm.state_dict()``).
    """
    from torch.distributed.fsdp import FSDPModule

    fsdp = [(fqn or "<root>", m) for fqn, m in module.named_modules() if isinstance(m, FSDPModule)]
    if not fsdp:
        raise ValueError(f"tailq.fsdp.compress: no FSDP module in {type(module).__name__}; apply "
                         f"torch.distributed.fsdp.fully_shard to it (and its submodules) first")
    comm = FsdpReduceScatter(name, **options)
    names: dict[int, str] = {}  # id of an FSDP state -> the name of its first module
    for fqn, m in fsdp:
        owner = names.setdefault(id(m._get_fsdp_state()), fqn)  # type: ignore[operator]
        m.set_custom_reduce_scatter(comm.for_module(owner))  # type: ignore[operator]
        m.set_force_sum_reduction_for_comms(True)  # type: ignore[operator]
    log.info("tailq.fsdp: %s on %d FSDP module(s)", comm.comp or comm.name, len(fsdp))
    return comm
