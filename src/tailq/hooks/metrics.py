"""What a hook measured, in one object every hook state exposes as ``state.metrics``.

The harness reads it the same way for tailq's hooks and PyTorch's built-ins: the wire log (bytes handed to every
collective, by kind), the vNMSE on sampled steps, the buckets that fell back, what each bucket's last step
reported (route, α, levels, …), the seconds spent, and :meth:`HookMetrics.lap` for one training step's share.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any, Protocol

import torch

from tailq.comm.wire import WireLog, WireRecord

__all__ = ["HookMetrics", "HookState", "Lap"]


@dataclasses.dataclass(frozen=True)
class Lap:
    """One interval's share of a hook's time and traffic (see :meth:`HookMetrics.lap`)."""

    codec_s: float
    """Seconds in the hook outside collectives (encode, decode, design), measurement excluded."""
    comm_s: float
    """Seconds waiting for the method's collectives."""
    measure_s: float
    """Seconds of vNMSE measurement (not part of the method: callers subtract it from their clock)."""
    records: list[WireRecord]
    """Every collective of the interval."""


class HookMetrics:
    """The measurements of one hook state."""

    def __init__(self) -> None:
        self.wire = WireLog()
        self.vnmse: list[dict[str, float]] = []  # {"step", "bucket", "vnmse"} on sampled steps
        self.fallbacks: list[dict[str, Any]] = []  # {"step", "bucket", "why"}: buckets sent uncompressed
        self.last: dict[int, dict[str, Any]] = {}  # bucket index -> what its last compressed step reported
        self.plan: dict[str, Any] = {}  # route="auto": the network and codec cost planned against, each size's pick
        self.topology: dict[str, Any] = {}  # the agreed nodes x workers, where it came from, why it fell back to flat
        # cumulative wall seconds in the hook: total (measurement excluded), waiting on collectives, measurement
        self.seconds = {"total": 0.0, "communicate": 0.0, "measure": 0.0}
        self._lap = (0.0, 0.0, 0.0, 0)
        self._lock = threading.Lock()  # the hook's worker and a collective's completion callback both add seconds
        self.direct = 0
        """Buckets sent as bf16 straight from DDP's thread, without the hook's worker (tailq's hook)."""

    def add_seconds(self, total: float, communicate: float) -> None:
        """Add to the hook's ``total`` and ``communicate`` seconds (from any thread)."""
        with self._lock:
            self.seconds["total"] += total
            self.seconds["communicate"] += communicate

    def record_vnmse(self, step: int, bucket: int, mean: torch.Tensor, exact: torch.Tensor,
                     phases: dict[str, float] | None = None, warmup: bool = False) -> None:
        """vNMSE = ‖mean − exact‖² / ‖exact‖² (SPEC §7), NaN for an all-zero exact mean.

        ``warmup``: the sample is of a warm-up step, sent uncompressed (marked ``"warmup": True``: not the method's
        error).

        ``phases`` (two-phase route): squared errors of phase 1 (its exact mean against the true mean) and of
        phase 2 (the requantized mean against phase 1's), recorded as ``vnmse_phase1`` and ``vnmse_phase2``.
        """
        denom = float((exact.double() ** 2).sum())
        err = float(((mean.double() - exact.double()) ** 2).sum())
        rec = {"step": step, "bucket": bucket, "vnmse": err / denom if denom > 0 else float("nan")}
        for k, v in (phases or {}).items():
            rec[f"vnmse_{k}"] = v / denom if denom > 0 else float("nan")
        if warmup:
            rec["warmup"] = True
        self.vnmse.append(rec)

    def lap(self) -> Lap:
        """Time and collectives since the previous ``lap()`` (or since the start)."""
        total, comm, meas, added = self._lap
        with self._lock:
            sec = dict(self.seconds)
        self._lap = (sec["total"], sec["communicate"], sec["measure"], self.wire.added)
        return Lap((sec["total"] - total) - (sec["communicate"] - comm), sec["communicate"] - comm,
                   sec["measure"] - meas, self.wire.since(added))


class HookState(Protocol):
    """What every hook state offers (tailq's :class:`~tailq.hooks.TailqState` and the built-ins' state)."""

    name: str
    step: int
    priming: bool
    metrics: HookMetrics

    @property
    def bound(self) -> bool:
        """Whether the state has bound to its process group (it may be created before one exists)."""
        ...

    def config(self) -> dict[str, Any]:
        ...

    def state_dict(self) -> dict[str, Any]:
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ...

    def close(self) -> None:
        ...
