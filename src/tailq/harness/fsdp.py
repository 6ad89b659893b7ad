"""``--fsdp``: a harness run whose gradients leave through FSDP2's reduce-scatter instead of DDP buckets.

Sharding: ``fully_shard`` on every ``nn.TransformerEncoderLayer`` and on the root, ``reshard_after_forward=False``
(one parameter all-gather per step, in fp32, as ZeRO-2; it is the same for every method). The gradient
reduce-scatter, per method:

* ``fp32`` — FSDP2's own (``dist.reduce_scatter_single``);
* ``bf16`` — FSDP2's own in bf16, ``MixedPrecisionPolicy(reduce_dtype=torch.bfloat16)``: the baseline. On Gloo
  ``reduce_scatter_tensor`` runs as an all-reduce plus a copy (measured: slower than ``all_reduce`` of the same
  tensor, BENCHMARKS.md), so its traffic is an all-reduce's, 2 (N − 1)/N · 16 bits per coordinate;
* ``bf16:reduce=a2a`` (``fp32:reduce=a2a``) — tailq's uncompressed reduce-scatter, one all-to-all of bf16 chunks
  summed in fp32: the traffic of NCCL's ring reduce-scatter, (N − 1)/N · 16 bits — the fair bf16 on Gloo;
* a shardable tailq compressor (``tuq``, ``tnq``, ``tbq``, ``single-scale``) — :func:`tailq.fsdp.compress`, every
  call compressed; with ``route=auto`` (``--methods tnq:3:route=auto``) per module compressed or bf16 by the closed
  loop, its prior priced on the run's ``--net`` (the loop's report: ``metrics.plan["loop"]``).

FSDP's own collectives are wrapped (:class:`CountedReduceScatter`) only to count their bytes and time in the
same :class:`~tailq.hooks.HookMetrics` the tailq comm keeps; what runs is FSDP's code.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import tailq.fsdp
from tailq.comm.network import ring_traffic_bytes
from tailq.comm.wire import WireRecord
from tailq.hooks import HookMetrics
from tailq.integrations.fsdp import FSDP_OPTIONS, shardable_compressors

__all__ = ["FSDP_HOOKS", "CountedReduceScatter", "check_method", "full_state", "shard"]

NATIVE = ("fp32", "bf16")
FSDP_HOOKS = (*NATIVE, *shardable_compressors())
"""The methods ``--fsdp`` accepts."""


def check_method(hook: str, options: dict[str, Any]) -> str | None:
    """Why ``hook`` with ``options`` cannot run under ``--fsdp`` (None if it can)."""
    if hook not in FSDP_HOOKS:
        return (f"--fsdp takes {', '.join(FSDP_HOOKS)} (FSDP2's reduce-scatter needs codes on one shared codebook); "
                f"got {hook!r}")
    if hook in NATIVE:
        extra = sorted(set(options) - {"reduce"})
        if extra or options.get("reduce", "fsdp") not in ("fsdp", "a2a"):
            return f"--fsdp {hook}: the only option is reduce=fsdp|a2a; got {options}"
    elif "reduce" in options:
        return f"--fsdp {hook}: reduce= applies to fp32 and bf16 only"
    return None


class CountedReduceScatter:
    """FSDP2's default reduce-scatter (``dist.reduce_scatter_single``), its bytes and time counted in ``metrics``.

    Recorded as the all-reduce Gloo performs (its traffic); on NCCL it would be a ring reduce-scatter, half that.
    """

    def __init__(self, name: str, calls_per_step: int) -> None:
        from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultReduceScatter

        self._inner = DefaultReduceScatter()
        self.name = name
        self.metrics = HookMetrics()
        self.step = 0
        self.priming = False
        self._calls_per_step = max(1, calls_per_step)
        self._calls = 0

    @property
    def bound(self) -> bool:
        return dist.is_initialized()

    def allocate(self, size: Any, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return self._inner.allocate(size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: Any, op: Any,
                 async_op: bool = False) -> Any:
        t0 = time.perf_counter()
        work = self._inner(output_tensor=output_tensor, input_tensor=input_tensor, group=group, op=op,
                           async_op=async_op)
        if work is not None and not async_op:
            work.wait()
        dt = time.perf_counter() - t0
        n = dist.get_world_size(group)
        handed = input_tensor.numel() * input_tensor.element_size()
        idx = self._calls % self._calls_per_step
        self.metrics.wire.add(WireRecord(self.step, idx, input_tensor.numel(), "fsdp", "payload", "all_reduce",
                                         handed, ring_traffic_bytes("all_reduce", handed, n)))
        self.metrics.wire.count_bucket(input_tensor.numel())
        self.metrics.last[idx] = {"route": f"fsdp-{self.name}"}
        self.metrics.seconds["total"] += dt
        self.metrics.seconds["communicate"] += dt
        self._calls += 1
        if self._calls % self._calls_per_step == 0:
            self.step += 1
        return work

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "fsdp": True}

    def state_dict(self) -> dict[str, Any]:
        return {"config": self.config(), "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])

    def close(self) -> None:
        pass


def shard(model: nn.Module, hook: str, options: dict[str, Any]) -> Any:
    """Apply FSDP2 to ``model`` in place and install the method's reduce-scatter; returns its state (``metrics``)."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    why = check_method(hook, options)
    if why:
        raise ValueError(why)
    opts = dict(options)
    reduce = opts.pop("reduce", "fsdp")
    native = hook in NATIVE and reduce == "fsdp"
    mp = MixedPrecisionPolicy(reduce_dtype=torch.bfloat16 if native and hook == "bf16" else None)
    for m in [m for m in model.modules() if isinstance(m, nn.TransformerEncoderLayer)]:
        fully_shard(m, mp_policy=mp, reshard_after_forward=False)
    fully_shard(model, mp_policy=mp, reshard_after_forward=False)
    if native:
        units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        state = CountedReduceScatter(hook, calls_per_step=len(units))
        for unit in units:
            unit.set_custom_reduce_scatter(state)  # type: ignore[operator,arg-type]
        return state
    keep = set(FSDP_OPTIONS) | {"seed", "network"} | (set() if hook in NATIVE else set(_compressor_options(hook)))
    return tailq.fsdp.compress(model, hook, **{k: v for k, v in opts.items() if k in keep})


def _compressor_options(hook: str) -> list[str]:
    from tailq.codec import get_compressor_class

    return list(get_compressor_class(hook).options)


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict (a collective: every rank calls it; every rank gets the full tensors)."""
    out = {}
    for k, v in model.state_dict().items():
        full = v.full_tensor() if hasattr(v, "full_tensor") else v
        out[k] = full.detach().clone()
    return out
