"""Wire accounting and the cost model (SPEC §6 "Cost model", §7 "Bits per coordinate").

Every collective a hook issues goes through :class:`Comm`, which records the bytes this rank *hands* to the
collective (payload and metadata alike, tagged by kind) and the per-worker traffic a ring algorithm would move
for it: all-reduce 2(N − 1)/N · bytes, all-gather (N − 1) · bytes. Bits per coordinate are computed from those
counted bytes, never from a formula; the planner's prediction uses the same cost model so the two can be
compared.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import hashlib
import json
import time
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["Comm", "NetworkModel", "WireLog", "WireRecord", "ring_traffic_bytes"]

# kinds of traffic: what the compressed method costs, and what is only measurement
METHOD_KINDS = ("payload", "stats", "index", "passthrough", "fallback")


# torch >= 2.13 renamed all_gather_into_tensor (deprecated) to all_gather_single; the package supports both.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def ring_traffic_bytes(collective: str, handed_bytes: int, n_workers: int) -> float:
    """Bytes each worker sends (= receives) in a ring implementation of the collective."""
    if n_workers <= 1:
        return 0.0
    if collective == "all_reduce":
        return 2.0 * (n_workers - 1) / n_workers * handed_bytes
    if collective == "all_gather":
        return float((n_workers - 1) * handed_bytes)
    raise ValueError(f"unknown collective {collective!r}")


@dataclasses.dataclass(frozen=True)
class NetworkModel:
    """A link of ``bandwidth_bps`` bits/s with ``latency_s`` per message hop (planner and modeled reports)."""

    bandwidth_bps: float = 10e9
    latency_s: float = 50e-6

    def time(self, collective: str, handed_bytes: int, n_workers: int) -> float:
        if n_workers <= 1:
            return 0.0
        hops = 2 * (n_workers - 1) if collective == "all_reduce" else n_workers - 1
        return (
            8 * ring_traffic_bytes(collective, handed_bytes, n_workers) / self.bandwidth_bps
            + hops * self.latency_s
        )


@dataclasses.dataclass(frozen=True)
class WireRecord:
    step: int
    bucket: int
    numel: int
    route: str
    kind: str
    collective: str
    handed_bytes: int
    traffic_bytes: float


class WireLog:
    """Per-step, per-bucket record of every collective; bounded, with running totals per kind."""

    def __init__(self, max_records: int = 200_000) -> None:
        self.records: collections.deque[WireRecord] = collections.deque(maxlen=max_records)
        self.totals: dict[str, list[float]] = collections.defaultdict(
            lambda: [0.0, 0.0]
        )  # kind -> [handed, traffic]
        self.coords = 0  # Σ numel over (step, bucket) pairs that were communicated by the method

    def add(self, rec: WireRecord) -> None:
        self.records.append(rec)
        t = self.totals[rec.kind]
        t[0] += rec.handed_bytes
        t[1] += rec.traffic_bytes

    def bits_per_coord(self, kinds: tuple[str, ...] = METHOD_KINDS, traffic: bool = False) -> float:
        """Σ bits handed (or ring traffic, with ``traffic=True``) over Σ bucket coordinates communicated."""
        if not self.coords:
            return float("nan")
        i = 1 if traffic else 0
        return 8 * sum(self.totals[k][i] for k in kinds if k in self.totals) / self.coords

    def step_bits_per_coord(self, step: int, kinds: tuple[str, ...] = METHOD_KINDS) -> float:
        """Bits handed per coordinate in one step (from the retained records)."""
        recs = [r for r in self.records if r.step == step]
        coords = sum(n for _, n in {(r.bucket, r.numel) for r in recs})
        handed = sum(r.handed_bytes for r in recs if r.kind in kinds)
        return 8 * handed / coords if coords else float("nan")

    def summary(self) -> dict[str, Any]:
        return {
            "coords": self.coords,
            "bits_per_coord_handed": self.bits_per_coord(),
            "bits_per_coord_ring_traffic": self.bits_per_coord(traffic=True),
            "by_kind": {k: {"handed_bytes": v[0], "traffic_bytes": v[1]} for k, v in self.totals.items()},
        }


class Comm:
    """Collectives on one process group, with accounting. Every call is blocking unless stated."""

    def __init__(self, group: Any, log: WireLog, timeout_s: float) -> None:
        self.group = group
        self.n = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.log = log
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.ctx = (0, 0, 0, "")  # step, bucket, numel, route
        self.seconds = 0.0  # time spent waiting for collectives

    def _record(self, kind: str, collective: str, t: torch.Tensor) -> None:
        step, bucket, numel, route = self.ctx
        handed = t.numel() * t.element_size()
        self.log.add(
            WireRecord(
                step,
                bucket,
                numel,
                route,
                kind,
                collective,
                handed,
                ring_traffic_bytes(collective, handed, self.n),
            )
        )

    def _wait(self, work: Any, what: str) -> None:
        t0 = time.perf_counter()
        try:
            work.wait(self.timeout)
        except Exception as err:
            raise RuntimeError(
                f"tailq: {what} failed or timed out after {self.timeout.total_seconds():g} s on rank {self.rank} "
                f"(a peer may have died or be configured differently): {err}"
            ) from err
        finally:
            self.seconds += time.perf_counter() - t0

    def all_reduce(self, t: torch.Tensor, kind: str, op: str = "sum", async_op: bool = False) -> Any:
        """In-place all-reduce of ``t`` (op: sum | max | min). Returns the Work when ``async_op``."""
        rop = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
        self._record(kind, "all_reduce", t)
        work = dist.all_reduce(t, op=rop, group=self.group, async_op=True)
        if async_op:
            return work
        self._wait(work, f"all_reduce({kind})")
        return t

    def wait(self, work: Any, what: str) -> None:
        self._wait(work, what)

    def all_gather(self, t: torch.Tensor, kind: str) -> torch.Tensor:
        """Gather a 1-D tensor from every rank: returns (N, len) in rank order."""
        flat = t.reshape(-1).contiguous()
        out = torch.empty(self.n * flat.numel(), dtype=flat.dtype, device=flat.device)
        self._record(kind, "all_gather", flat)
        work = _all_gather_single(out, flat, group=self.group, async_op=True)
        self._wait(work, f"all_gather({kind})")
        return out.view(self.n, flat.numel())

    def verify_same_config(self, config: dict[str, Any]) -> None:
        """Fail on every rank, with the differing configurations, unless all ranks hold the same config."""
        blob = json.dumps(config, sort_keys=True, default=str)
        digest = int.from_bytes(hashlib.sha256(blob.encode()).digest()[:7], "little")
        mine = torch.tensor([digest], dtype=torch.int64)
        allv = self.all_gather(mine, "config").reshape(-1)
        if bool((allv != allv[0]).any()):
            configs: list[Any] = [None] * self.n
            dist.all_gather_object(configs, config, group=self.group)
            lines = "\n".join(
                f"  rank {r}: {json.dumps(c, sort_keys=True, default=str)}" for r, c in enumerate(configs)
            )
            raise RuntimeError(
                "tailq: ranks are configured differently; every rank must use the same compressor and options:\n"
                + lines
            )
