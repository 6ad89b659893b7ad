"""Wire accounting (SPEC §7 "Bits per coordinate"): every collective a hook issues, counted in bytes.

Every collective goes through :class:`Comm`, which records the bytes this rank *hands* to the collective
(payload and metadata alike, by kind) under an explicit :class:`Tag` (step, bucket, route), and the per-worker
traffic a ring algorithm would move for it (:func:`~tailq.comm.network.ring_traffic_bytes`). Bits per coordinate
are computed from those counted bytes, never from a formula; the planner's prediction uses the same cost model
(:class:`~tailq.comm.network.Network`) so the two can be compared.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import hashlib
import inspect
import json
import time
from typing import Any

import torch
import torch.distributed as dist

from .network import ring_traffic_bytes
from .topology import Shape, nic_bytes

__all__ = ["Comm", "Tag", "WireLog", "WireRecord", "group_timeout_s", "new_group_like", "own_group"]

# kinds of traffic: what the compressed method costs, and what is only measurement
METHOD_KINDS = ("payload", "stats", "index", "passthrough", "fallback", "plan")


# torch >= 2.13 renamed all_gather_into_tensor (deprecated) to all_gather_single; the package supports both.
_HELD_WORKS = 8  # Work objects kept alive after their wait (see Comm.__init__)
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def group_timeout_s(group: Any) -> float | None:
    """The timeout ``group``'s backend applies to each of its collectives (``init_process_group(timeout=…)``,
    ``new_group(timeout=…)``), in seconds; ``None`` where the backend does not say."""
    pg = group if group is not None else dist.distributed_c10d._get_default_group()
    for device in getattr(pg, "_device_types", ()):
        try:
            return float(pg._get_backend(device).options._timeout.total_seconds())
        except (AttributeError, RuntimeError, ValueError):
            continue
    return None


def own_group(group: Any) -> Any:
    """A new process group with the ranks (in the same order), backend and timeout of ``group`` (default: the
    default group), for one hook's collectives alone.

    Why: DDP issues collectives of its own on its process group while the hooks' buckets are in flight — the
    used-parameter all-reduce at the end of every backward with ``find_unused_parameters=True`` (and in the first
    iteration with ``static_graph=True``), from the autograd thread, while the hook's collectives come from its
    ordered worker thread. Two threads issuing collectives on one group interleave differently on each rank, and
    Gloo pairs collectives by their order of issue: a hang, a size-mismatch abort, or silently mixed payloads.
    (With NCCL two threads enqueuing on one communicator can deadlock the same way.) On a group of its own the
    hook is the only one issuing collectives, from one thread, in bucket order.

    Every rank of ``group`` must call this at the same point of its program (the hooks do at their first bucket
    inside a backward); ranks outside ``group`` need not: a proper subgroup is created with group-local
    synchronization (its name hashed from its ranks), the whole world with torch's ordinary creation order.
    Group creation rendezvouses through the store, not through collectives on ``group``, so it never races with
    collectives in flight there. The group lives as long as the process group machinery
    (``destroy_process_group()`` releases it): destroying it earlier, rank by rank, could let a later group's
    hashed name repeat this one's in the store.
    """
    pg = group if group is not None else dist.distributed_c10d._get_default_group()
    new = new_group_like(pg, list(range(dist.get_world_size(pg))), "tailq_hook")
    ranks = dist.get_process_group_ranks(pg)
    if dist.get_process_group_ranks(new) != ranks:
        raise RuntimeError(f"tailq: the hook's own process group has ranks {dist.get_process_group_ranks(new)}, "
                           f"its process group {ranks}")
    return new


def new_group_like(pg: Any, group_ranks: list[int], desc: str) -> Any:
    """A process group over ``group_ranks`` (ranks *of* ``pg``, in that order) with ``pg``'s backend and timeout.

    A proper subgroup of the world is created with group-local synchronization (only its members call this; its
    name is hashed from its ranks and the number of groups this process holds), the whole world with torch's
    ordinary creation order. Ranks that create several groups must create them in the same order (the hooks:
    their own group, then the node group, then the cross-node group), so the hashed names agree.
    """
    ranks = dist.get_process_group_ranks(pg)
    members = [ranks[r] for r in group_ranks]
    kwargs: dict[str, Any] = {"backend": dist.get_backend(pg), "group_desc": desc}
    timeout = group_timeout_s(pg)
    if timeout is not None:
        kwargs["timeout"] = datetime.timedelta(seconds=timeout)
    if "sort_ranks" in inspect.signature(dist.new_group).parameters:
        kwargs["sort_ranks"] = False  # group rank r stays the r-th of ``members``
    subgroup = len(members) < dist.get_world_size()
    try:
        return dist.new_group(ranks=members, use_local_synchronization=subgroup, **kwargs)
    except Exception as err:
        raise RuntimeError(f"tailq: could not create a process group ({desc}: ranks {members}, backend "
                           f"{kwargs['backend']}): {err}") from err


@dataclasses.dataclass(frozen=True)
class Tag:
    """What a collective belongs to: the step, the bucket (DDP index and size) and the route (or mode)."""

    step: int
    bucket: int
    numel: int
    route: str


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
    nic_bytes: float | None = None
    """What this rank's collective put on its node's NIC (:func:`~tailq.comm.topology.nic_bytes`); ``None``: one
    worker per node, where it equals ``traffic_bytes``."""
    scope: str = "world"
    """Where the collective ran: ``world``, ``node`` (the L ranks of a node) or ``cross`` (one rank per node)."""


class WireLog:
    """Per-step, per-bucket record of every collective; bounded, with running totals per kind."""

    def __init__(self, max_records: int = 200_000) -> None:
        self.records: collections.deque[WireRecord] = collections.deque(maxlen=max_records)
        self.totals: dict[str, list[float]] = collections.defaultdict(
            lambda: [0.0, 0.0, 0.0]
        )  # kind -> [handed, traffic, node NIC]
        self.node_size = 1  # workers sharing this rank's NIC (set by the hook once the ranks agreed the topology)
        self.coords = 0  # Σ numel over (step, bucket) pairs that were communicated by the method
        self.added = 0  # records ever added (the deque keeps the newest max_records)

    def add(self, rec: WireRecord) -> None:
        self.records.append(rec)
        self.added += 1
        t = self.totals[rec.kind]
        t[0] += rec.handed_bytes
        t[1] += rec.traffic_bytes
        t[2] += rec.traffic_bytes if rec.nic_bytes is None else rec.nic_bytes

    def count_bucket(self, numel: int) -> None:
        """One bucket of ``numel`` coordinates went through the hook (the denominator of bits per coordinate)."""
        self.coords += numel

    def since(self, added: int) -> list[WireRecord]:
        """The records added after the log held ``added`` of them (those still retained)."""
        new = min(self.added - added, len(self.records))
        return list(self.records)[len(self.records) - new :] if new > 0 else []

    def bits_per_coord(self, kinds: tuple[str, ...] = METHOD_KINDS, traffic: bool = False) -> float:
        """Σ bits handed (or ring traffic, with ``traffic=True``) over Σ bucket coordinates communicated."""
        if not self.coords:
            return float("nan")
        i = 1 if traffic else 0
        return 8 * sum(self.totals[k][i] for k in kinds if k in self.totals) / self.coords

    def node_nic_bits_per_coord(self, kinds: tuple[str, ...] = METHOD_KINDS) -> float:
        """Bits leaving this rank's node through its NIC per coordinate (modeled from the collectives issued): this
        rank's share × the node's L ranks, which issue the same collectives. One worker per node: ring traffic."""
        if not self.coords:
            return float("nan")
        return 8 * self.node_size * sum(self.totals[k][2] for k in kinds if k in self.totals) / self.coords

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
            "node_size": self.node_size,
            "node_nic_bits_per_coord": self.node_nic_bits_per_coord(),
            "by_kind": {k: {"handed_bytes": v[0], "traffic_bytes": v[1], "node_nic_bytes": v[2]}
                        for k, v in self.totals.items()},
        }


class Comm:
    """Collectives on one process group, each recorded in the wire log under its :class:`Tag` and kind.

    Every call is blocking unless stated; every wait has the timeout (``timeout_s``; the group's own timeout
    applies too, and whichever is shorter fires first: the error names it). ``seconds`` accumulates the time spent
    waiting for collectives.
    """

    def __init__(self, group: Any, log: WireLog, timeout_s: float, *, scope: str = "world",
                 shape: Shape | None = None) -> None:
        self.log = log
        self.scope = scope  # world | node | cross: what its collectives put on the node's NIC (wire accounting)
        self.shape = shape
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.seconds = 0.0  # time spent waiting for collectives
        self.n: int = dist.get_world_size(group)
        # the last few Work objects, kept so that the backend's thread never drops the last reference to one:
        # Gloo's thread marks a Work complete and only then releases its own reference; if Python had already
        # dropped it, the thread frees the Work's tensors and needs the GIL to release their Python objects, which
        # aborts the process when that happens after interpreter finalization began (measured: 1 in 6 runs of the
        # README's FSDP2 snippet under load; std::terminate in ~AsyncAlltoallWork on a Gloo thread)
        self._held: collections.deque[Any] = collections.deque(maxlen=_HELD_WORKS)
        self._set_group(group)

    def use_group(self, group: Any) -> None:
        """Issue every later collective on ``group`` (one of the same size; see :func:`own_group`)."""
        n = dist.get_world_size(group)
        if n != self.n:
            raise ValueError(f"tailq: cannot move the hook's collectives from a group of {self.n} ranks to one of {n}")
        self._set_group(group)

    def _set_group(self, group: Any) -> None:
        self.group = group
        self.rank: int = dist.get_rank(group)
        self.group_timeout_s = group_timeout_s(group)
        backend = str(dist.get_backend(group)).lower()
        # small CPU tensors (agreed statistics, config digests) must travel on the group's device where the
        # backend has no CPU support (a pure NCCL group): staged through the current CUDA device and back
        self.cpu_ok = any(b in backend for b in ("gloo", "mpi", "cpu:")) or not torch.cuda.is_available()

    def _timeout_text(self) -> str:
        """The timeout that applied to a wait: the hook's ``timeout_s`` or the group's own, whichever is shorter."""
        mine, group = self.timeout.total_seconds(), self.group_timeout_s
        if group is not None and group < mine:
            return f"{group:g} s (the process group's timeout; the hook's timeout_s is {mine:g} s)"
        return f"{mine:g} s"

    def _staged(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` itself, or a copy on the current CUDA device when the group cannot take CPU tensors."""
        if t.device.type == "cpu" and not self.cpu_ok:
            return t.to(torch.device("cuda", torch.cuda.current_device()))
        return t

    def _record(self, tag: Tag, kind: str, collective: str, t: torch.Tensor) -> None:
        handed = t.numel() * t.element_size()
        nic = None if self.shape is None else nic_bytes(collective, handed, self.scope, self.shape)
        self.log.add(WireRecord(tag.step, tag.bucket, tag.numel, tag.route, kind, collective, handed,
                                ring_traffic_bytes(collective, handed, self.n), nic, self.scope))

    def _wait(self, work: Any, what: str) -> None:
        self._held.append(work)
        t0 = time.perf_counter()
        try:
            work.wait(self.timeout)
        except Exception as err:
            raise RuntimeError(
                f"tailq: {what} failed or timed out after {self._timeout_text()} on rank {self.rank} "
                f"(a peer may have died or be configured differently): {err}"
            ) from err
        finally:
            self.seconds += time.perf_counter() - t0

    def all_reduce(self, t: torch.Tensor, tag: Tag, kind: str, op: str = "sum", async_op: bool = False) -> Any:
        """In-place all-reduce of ``t`` (op: sum | max | min). Returns the Work when ``async_op``."""
        rop = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
        self._record(tag, kind, "all_reduce", t)
        dev = self._staged(t)
        work = dist.all_reduce(dev, op=rop, group=self.group, async_op=True)
        if async_op:
            self._held.append(work)
            if dev is not t:  # the caller waits on the Work and reads t: complete the copy-back first
                work.wait(self.timeout)
                t.copy_(dev)
            return work
        self._wait(work, f"all_reduce({kind})")
        if dev is not t:
            t.copy_(dev)
        return t

    def wait(self, work: Any, what: str) -> None:
        self._wait(work, what)

    def all_gather(self, t: torch.Tensor, tag: Tag, kind: str) -> torch.Tensor:
        """Gather a 1-D tensor from every rank: returns (N, len) in rank order."""
        flat = t.reshape(-1).contiguous()
        self._record(tag, kind, "all_gather", flat)
        src = self._staged(flat)
        out = torch.empty(self.n * flat.numel(), dtype=flat.dtype, device=src.device)
        work = _all_gather_single(out, src, group=self.group, async_op=True)
        self._wait(work, f"all_gather({kind})")
        return out.to(flat.device).view(self.n, flat.numel())

    def all_to_all(self, t: torch.Tensor, tag: Tag, kind: str) -> torch.Tensor:
        """Rank r's ``i``-th of N equal chunks of the 1-D ``t`` goes to rank i: returns (N, len/N), row j from rank j.

        ``dist.all_to_all_single`` (supported by Gloo and NCCL); ``t.numel()`` must divide by N.
        """
        flat = t.reshape(-1).contiguous()
        if flat.numel() % self.n:
            raise ValueError(f"all_to_all: {flat.numel()} elements do not split into {self.n} equal chunks")
        self._record(tag, kind, "all_to_all", flat)
        src = self._staged(flat)
        out = torch.empty_like(src)
        work = dist.all_to_all_single(out, src, group=self.group, async_op=True)
        self._wait(work, f"all_to_all({kind})")
        return out.to(flat.device).view(self.n, flat.numel() // self.n)

    def reduce_scatter(self, t: torch.Tensor, tag: Tag, kind: str) -> torch.Tensor:
        """The sum over ranks of chunk r of the 1-D ``t`` (N equal chunks), on rank r.

        NCCL: ``reduce_scatter_tensor``. Gloo has none: an all-to-all of the chunks, then the sum of the N received
        rows here (the same bytes on the wire as a pairwise reduce-scatter). Rows are added in rank order, so the
        result is the same on every backend run to run.
        """
        flat = t.reshape(-1).contiguous()
        if flat.numel() % self.n:
            raise ValueError(f"reduce_scatter: {flat.numel()} elements do not split into {self.n} equal chunks")
        if "nccl" in str(dist.get_backend(self.group)).lower() and flat.is_cuda:
            self._record(tag, kind, "all_to_all", flat)  # the same traffic: (N - 1)/N of the input leaves
            out = torch.empty(flat.numel() // self.n, dtype=flat.dtype, device=flat.device)
            work = dist.reduce_scatter_tensor(out, flat, group=self.group, async_op=True)
            self._wait(work, f"reduce_scatter({kind})")
            return out
        rows = self.all_to_all(flat, tag, kind)
        return rows.sum(dim=0) if self.n > 1 else rows[0].clone()

    def verify_same_config(self, config: dict[str, Any], tag: Tag) -> None:
        """Fail on every rank, with the differing configurations, unless all ranks hold the same config."""
        blob = json.dumps(config, sort_keys=True, default=str)
        digest = int.from_bytes(hashlib.sha256(blob.encode()).digest()[:7], "little")
        mine = torch.tensor([digest], dtype=torch.int64)
        allv = self.all_gather(mine, tag, "config").reshape(-1)
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
