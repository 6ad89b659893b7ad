"""How much of a hook's time hides behind the backward pass, and the DDP buckets it saw.

A DDP communication hook runs while autograd continues (tailq's hooks on their own ordered thread, PyTorch's
all-reduces in Gloo's), so a step takes less than compute + hook time when the two overlap. The training loop
measures the step's wall time, the hook's time (``codec_s`` outside collectives + ``comm_s`` waiting on them) and,
around ``opt.step()``, the optimizer's (``opt_s``). What it cannot see inside a step is the compute alone, so
:func:`calibrate_compute` times it once per run, outside the training clock: K forward + backward passes of the
step's own batch under ``ddp.no_sync()`` (no gradient exchange: DDP's reducer stays idle, the hook is never
called, no collective is issued), every rank at the same step, median of K. Nothing of the training changes: the
optimizer is not stepped, the gradients are set to None afterwards, the module's buffers (BatchNorm statistics)
and the global RNG state are restored, and so is DDP's ``require_forward_param_sync`` flag (a no-sync forward
clears it, which would make the next step's forward skip DDP's buffer broadcast).

Per step (from :func:`overlap_start` on, the first step after the warm-up):

* ``hook_s = codec_s + comm_s``;
* ``exposed_s = max(0, wall_s - compute_s - opt_s)``: the part of the step that is neither compute nor the
  optimizer, i.e. what the step waited for the hook (and anything else outside compute: DDP's copies into and out
  of its buckets, its buffer broadcast before each forward where the model has buffers);
* ``overlap = 1 - min(exposed_s, hook_s) / hook_s``: the fraction of the hook's time hidden behind backward;
* ``step_over_parts = wall_s / (compute_s + opt_s + hook_s)``: the step against the sum of its parts (1 = run
  one after the other, lower = overlapped; it cannot go below max(compute + opt, hook) / sum).

The run's figures are medians over those steps. They use the wall clock, also under ``--net model:``: there the
overlap is of the real (loopback) collectives, while the modeled clock takes the hook's measured waits out and adds
the cost model's communication time in full, as if none of it overlapped.

FSDP2 runs are not calibrated: a backward under ``set_requires_gradient_sync(False)`` leaves its unsharded
gradients on the parameters (``FSDPParam.unsharded_accumulated_grad`` or the unsharded parameter's ``.grad``),
which FSDP2 adds into the next synchronised backward, and ``zero_grad`` clears only the sharded gradients, so the
calibration would change the training; its forward would also all-gather the parameters.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["FSDP_SKIPPED", "buckets_seen", "calibrate_compute", "ddp_buckets", "overlap_start", "run_overlap",
           "step_overlap"]

FSDP_SKIPPED = ("not calibrated under --fsdp: a backward under FSDP2's set_requires_gradient_sync(False) keeps its "
                "unsharded gradients and adds them into the next synchronised backward (zero_grad clears only the "
                "sharded ones), so it would change the training")


def overlap_start(hook: str, hook_options: dict[str, Any], builtin: bool) -> int:
    """The first step of the overlap statistics and of the calibration: after DDP's first iteration (step 0, whose
    backward records the order DDP rebuilds its buckets in before step 1) and after a tailq hook's warm-up steps
    (sent as bf16); step 2 at the earliest."""
    warm = 0
    if not builtin:
        from tailq.hooks.config import HookConfig

        warm = int(hook_options.get("warmup_steps", HookConfig.warmup_steps))
    return max(2, warm + 1)


def calibrate_compute(ddp: Any, module: nn.Module, opt: torch.optim.Optimizer,
                      loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], xb: torch.Tensor,
                      yb: torch.Tensor, passes: int) -> list[float]:
    """Seconds of each of ``passes`` forward + backward passes of ``(xb, yb)`` through ``ddp`` under
    ``ddp.no_sync()``: no gradient exchange, no optimizer step; the training is left exactly as it was (gradients
    None, ``module``'s buffers, the global RNG state and DDP's forward-sync flag restored)."""
    rng = torch.get_rng_state()
    buffers = [b.detach().clone() for b in module.buffers()]
    forward_sync = getattr(ddp, "require_forward_param_sync", None)
    times = []
    try:
        for _ in range(passes):
            opt.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            with ddp.no_sync():
                loss_fn(ddp(xb), yb).backward()
            times.append(time.perf_counter() - t0)
    finally:
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for b, saved in zip(module.buffers(), buffers, strict=True):
                b.copy_(saved)
        torch.set_rng_state(rng)
        if forward_sync is not None:
            ddp.require_forward_param_sync = forward_sync
    return times


def step_overlap(step: dict[str, Any], compute_s: float) -> dict[str, Any]:
    """One step's ``hook_s``, ``exposed_s``, ``overlap`` (None when the hook took no time) and
    ``step_over_parts`` from its record (``wall_s``, ``codec_s``, ``comm_s``, ``opt_s``) and the calibrated compute."""
    hook = float(step["codec_s"]) + float(step["comm_s"])
    opt = float(step.get("opt_s") or 0.0)
    wall = float(step["wall_s"])
    exposed = max(0.0, wall - compute_s - opt)
    # the step cannot have waited for the hook longer than the hook ran: what exceeds hook_s is compute noise or
    # DDP's own work outside the hook, so the share is clipped and the overlap lies in [0, 1]
    overlap = 1.0 - min(exposed, hook) / hook if hook > 0 else None
    parts = compute_s + opt + hook
    return {"hook_s": hook, "exposed_s": exposed, "overlap": overlap,
            "step_over_parts": wall / parts if parts > 0 else None}


def _median(values: Sequence[float | None]) -> float | None:
    got = [float(v) for v in values if v is not None]
    return statistics.median(got) if got else None


def run_overlap(steps: list[dict[str, Any]], samples: list[float], start: int, calibrated_at: int | None,
                modeled: bool, skipped: str | None = None) -> dict[str, Any]:
    """The run's overlap record: the calibration, then medians over the steps from ``start`` on; each of those
    step records gains its ``exposed_s``, ``overlap`` and ``step_over_parts`` (every step gets ``hook_s``).
    ``skipped``: why there is no calibration (recorded instead of the medians)."""
    out: dict[str, Any] = {"from_step": start, "calibrated_at_step": calibrated_at, "compute_samples_s": samples,
                           "basis": "wall clock" + (", real (loopback) collectives: the modeled clock counts the "
                                                    "modeled communication in full" if modeled else "")}
    for s in steps:
        s["hook_s"] = float(s["codec_s"]) + float(s["comm_s"])
    compute = _median(samples)
    after = [s for s in steps if s["step"] >= start]
    if skipped is None and (compute is None or not after):
        skipped = f"the run ended before step {start}, the first after the warm-up"
    if skipped is not None or compute is None:
        out["skipped"] = skipped
        return out
    for s in after:
        s.update(step_overlap(s, compute))
    out.update({
        "steps": len(after),
        "compute_s": compute,
        "opt_s": _median([s.get("opt_s") for s in after]),
        "hook_s": _median([s["hook_s"] for s in after]),
        "step_s": _median([s["wall_s"] for s in after]),
        "exposed_s": _median([s["exposed_s"] for s in after]),
        "overlap": _median([s["overlap"] for s in after]),
        "step_over_parts": _median([s["step_over_parts"] for s in after]),
    })
    return out


def ddp_buckets(ddp: Any, module: nn.Module, cap_mb: float) -> dict[str, Any]:
    """DDP's buckets from its logging data: after the rebuild at the second iteration (``rebuilt_bucket_sizes``),
    else the initial ones; sizes in values (bucket index order) when every parameter has one element size."""
    out: dict[str, Any] = {"cap_mb": cap_mb}
    try:
        data = ddp._get_ddp_logging_data()
    except (AttributeError, RuntimeError) as err:
        out["error"] = f"DDP logging data unavailable: {err}"
        return out
    text = data.get("rebuilt_bucket_sizes") or data.get("bucket_sizes") or ""
    sizes = [int(x) for x in str(text).replace(" ", "").split(",") if x]
    elem = {p.element_size() for p in module.parameters() if p.requires_grad}
    out.update({"count": len(sizes), "bytes": sizes, "rebuilt": bool(data.get("has_rebuilt_buckets"))})
    if len(elem) == 1:
        size = elem.pop()
        out["sizes"] = [b // size for b in sizes]
    return out


def buckets_seen(records: Sequence[Any]) -> dict[int, int]:
    """The buckets a hook handled in one step's wire records: DDP bucket index -> values."""
    return {int(r.bucket): int(r.numel) for r in records}
