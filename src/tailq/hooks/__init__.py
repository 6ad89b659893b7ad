"""DDP communication hooks: ``tailq.ddp_hook(name, **options) -> (state, hook)``.

    state, hook = tailq.ddp_hook("tnq", bits=3)
    model.register_comm_hook(state, hook)

Names: every compressor of ``tailq list`` (tuq, tnq, tbq, qsgd, nuqsgd, terngrad, efsign, topk, single-scale,
multi-scale, and the outer-gradient formats fp8, int8sigma, fp4) and PyTorch's own ``fp32``, ``fp16``, ``bf16``,
``powersgd`` (working on Gloo as well as NCCL).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from tailq.codec import list_compressors

from .builtin import BUILTINS, BuiltinState, builtin_hook
from .config import HookConfig
from .metrics import HookMetrics, HookState, Lap
from .tailq_hook import TailqState, measure_codec_cost, tailq_hook

__all__ = ["BUILTINS", "BuiltinState", "HookConfig", "HookMetrics", "HookState", "Lap", "LocalBucket", "TailqState",
           "ddp_hook", "hook_names", "prime_buckets", "warm_kernels"]


def hook_names() -> list[str]:
    return sorted(list_compressors()) + list(BUILTINS)


def ddp_hook(name: str, **options: Any) -> tuple[HookState, Callable[..., Any]]:
    """(state, hook) for ``DistributedDataParallel.register_comm_hook``.

    Builtins take ``process_group`` (and, for ``powersgd``, PyTorch's ``PowerSGDState`` options, default rank 1,
    ``start_powerSGD_iter=2``). tailq compressors take their own options (``bits``, ``tail``, …), the hook's
    (:class:`HookConfig`: ``route, gather_bits, owner_feedback, error_feedback, stale_stats, redesign_every,
    min_bucket, warmup_steps, fine_bits, measure_every, timeout_s``) and ``process_group, network, seed``.
    """
    if name in BUILTINS:
        return BuiltinState(name, **options), builtin_hook
    if name not in list_compressors():
        raise ValueError(f"unknown hook {name!r}; available: {', '.join(hook_names())}")
    return TailqState(name, **options), tailq_hook


def prime_buckets(ddp: Any, state: Any, forward_backward: Callable[[], Any]) -> None:
    """Make a freshly built DDP model use its final bucket layout before the first real step.

    DDP (torch 2.13, without ``find_unused_parameters``) puts every parameter in one bucket for the first
    iteration of each instance and regroups them afterwards, in the order the gradients became ready — after the
    first iteration, or after the second with ``static_graph=True``. A run resumed from a checkpoint would
    therefore compress its first steps over other buckets than the uninterrupted run did at those steps. Call
    this once after restoring: it runs ``forward_backward()`` (one forward and backward on any batch; twice under
    ``static_graph``) with the hook in *priming* mode — a plain fp32 all-reduce that leaves the hook's step,
    residuals and statistics untouched — then discards the gradients and restores the module's buffers (e.g.
    BatchNorm statistics) and the CPU and CUDA random states (dropout), so the next step continues exactly where
    the saved run was.
    """
    buffers = {k: v.clone() for k, v in ddp.module.named_buffers()}
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    state.priming = True
    try:
        for _ in range(2 if getattr(ddp, "static_graph", False) else 1):  # DDP's iterations before it regroups
            forward_backward()
            ddp.zero_grad(set_to_none=True)
    finally:
        state.priming = False
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    ddp.zero_grad(set_to_none=True)
    with torch.no_grad():
        for k, v in ddp.module.named_buffers():
            v.copy_(buffers[k])


class LocalBucket:
    """One flat tensor posing as a ``dist.GradBucket`` (the part the hooks read): for warm-ups and benchmarks."""

    def __init__(self, buf: torch.Tensor) -> None:
        self._buf = buf

    def buffer(self) -> torch.Tensor:
        return self._buf

    def index(self) -> int:
        return 0

    def is_last(self) -> bool:
        return True

    def gradients(self) -> list[torch.Tensor]:
        return [self._buf]


def warm_kernels(name: str, numel: int, steps: int = 2, **options: Any) -> float:
    """Compile the fused codec kernels a tailq hook will use, before training starts; returns the seconds spent.

    The CPU fast path compiles each kernel on its first call (seconds per kernel with inductor, once per process;
    inductor's on-disk cache makes later processes faster). Called at the start of a run, that cost would land in
    the first compressed step. This runs ``steps`` throwaway buckets of ``numel`` heavy-tailed values through a
    fresh :class:`TailqState` with the same options (after one passthrough step, no vNMSE probes; with
    ``route="auto"`` once per route the compressor can take), then closes it: the real hook state is untouched,
    and kernels compile for any length (dynamic shapes), so one size serves every bucket. Every rank must call it
    (it runs the hook's collectives). Builtins need nothing: 0.0.
    """
    import time

    if name in BUILTINS:
        return 0.0
    from tailq.kernels.dispatch import AUTO_MIN_NUMEL

    t0 = time.perf_counter()
    # one passthrough step first (error feedback requires warmup_steps >= 1), then `steps` compressed ones; with
    # route="auto" on every route the compressor can take, since the plan is only known at the first real bucket
    opts = {**options, "warmup_steps": 1, "min_bucket": 0, "measure_every": 0}
    if opts.get("route", "auto") != "auto":
        routes = [opts["route"]]
    else:  # building a state issues no collective: this one only lists the routes
        probe = TailqState(name, **{**opts, "route": "allgather"})
        routes = list(probe.routes)
        probe.close()
    gen = torch.Generator().manual_seed(12345)
    n = max(int(numel), AUTO_MIN_NUMEL)
    for i, route in enumerate(routes):
        state = TailqState(name, **{**opts, "route": route})
        try:
            for _ in range(steps + 1):
                x = torch.randn(n, generator=gen) / torch.rand(n, generator=gen).add_(0.05).sqrt()  # heavy-tailed
                state.process(LocalBucket(x * 1e-3))  # type: ignore[arg-type]
            if i == 0:  # the planner's codec probe too: its size would otherwise compile inside the first step
                measure_codec_cost(state.comp, state.family, x.device, state.comm.n)
        finally:
            state.close()
    return time.perf_counter() - t0
