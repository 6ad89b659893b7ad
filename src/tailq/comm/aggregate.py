"""Aggregation routes (SPEC §6): how one bucket's codes become the mean over workers.

Three families, one small class each:

* :class:`SharedCodebook` — ``tuq, tnq, tbq, single-scale``: every rank builds the same codebook from agreed
  statistics. Route ``allreduce``: codes on a uniform grid {0..G} (non-uniform levels snapped to a fine grid,
  G = 2^(bits + fine_bits) − 1), packed into headroom lanes and summed by an integer all-reduce, decoded exactly
  to the mean. Route ``allgather``: the b-bit codes densely packed, gathered, each decoded with the shared
  codebook and averaged.
* :class:`MultiScaleAgg` — ``multi-scale`` [V]: the shared max (MAX all-reduce), then per element or block the
  finest scale every rank can represent (MIN all-reduce of indices, agreed *before* rounding), then codes summed
  in lanes (or gathered).
* :class:`Gathered` — ``qsgd, nuqsgd, terngrad, efsign, topk``: per-rank scales, so nothing is summable; every
  rank's encoded tensors are gathered (with a tiny header giving each tensor's length) and decoded.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import torch

from tailq.codec import Codebook, Compressor, Encoded
from tailq.codec.codebook import Generator
from tailq.codec.packing import LanePlan, pack_lanes, plan_lanes, unpack_bits, unpack_lanes
from tailq.kernels import RandKey

from .wire import Comm, NetworkModel

__all__ = ["Outcome", "zero_outcome", "Aggregator", "SharedCodebook", "MultiScaleAgg", "Gathered", "aggregator_for"]

ROUTES = ("auto", "allreduce", "allgather")


Lazy = torch.Tensor | Callable[[], torch.Tensor]


@dataclasses.dataclass
class Outcome:
    """The mean over ranks, and this rank's own decoded contribution with what it is unbiased for (for EF).

    ``own`` and ``target`` may be given as zero-argument callables: they are computed on first access (only error
    feedback reads them; each is a full pass over the bucket).
    """

    mean: torch.Tensor
    own_: Lazy
    target_: Lazy
    route: str
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def own(self) -> torch.Tensor:
        if not isinstance(self.own_, torch.Tensor):
            self.own_ = self.own_()
        return self.own_

    @property
    def target(self) -> torch.Tensor:
        if not isinstance(self.target_, torch.Tensor):
            self.target_ = self.target_()
        return self.target_


class Aggregator:
    uses_stats = False
    stats_op = "sum"
    routes: tuple[str, ...] = ("allgather",)

    def __init__(self, comp: Compressor, comm: Comm, fine_bits: int, network: NetworkModel) -> None:
        self.comp = comp
        self.comm = comm
        self.fine_bits = fine_bits
        self.network = network
        # whether Outcome.own will be read (error feedback); when False the summable route skips keeping a copy
        # of this rank's own lane words
        self.need_own = True

    def local_stats(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def plan(self, n: int) -> str:
        return self.routes[0]

    def predicted_payload_bytes(self, n: int, route: str) -> int:
        """Bytes of payload this rank hands to the collective for an n-element bucket (cost model)."""
        raise NotImplementedError

    def run(self, x: torch.Tensor, stats: torch.Tensor | None, gen: Generator, route: str) -> Outcome:
        """Aggregate one bucket; ``gen`` is the rank's randomness (a ``RandKey`` in the hook)."""
        raise NotImplementedError


def zero_outcome(x: torch.Tensor, route: str, **info: Any) -> Outcome:
    """Every rank's bucket is zero: the mean, the own decode and the target are exactly zero."""
    z = torch.zeros_like(x)
    return Outcome(z, z, z, route, {"zero": True, **info})


class SharedCodebook(Aggregator):
    uses_stats = True
    routes = ("allreduce", "allgather")

    def __init__(self, comp: Compressor, comm: Comm, fine_bits: int, network: NetworkModel) -> None:
        super().__init__(comp, comm, fine_bits, network)
        self.bits: int = comp.bits  # type: ignore[attr-defined]
        self.stats_op = comp.stats_op  # type: ignore[attr-defined]
        self.s = 2**self.bits - 1
        self.uniform = comp.name in ("tuq", "single-scale")
        self.grid = self.s if self.uniform else min(2 ** (self.bits + fine_bits) - 1, 2**16 - 1)

    def local_stats(self, x: torch.Tensor) -> torch.Tensor:
        return self.comp.local_stats(x)  # type: ignore[attr-defined,no-any-return]

    @functools.cached_property
    def lanes(self) -> LanePlan:
        return plan_lanes(self.comm.n, self.grid)

    def predicted_payload_bytes(self, n: int, route: str) -> int:
        if route == "allreduce":
            return self.lanes.words_for(n) * self.lanes.word_bits // 8
        return math.ceil(n * self.bits / 8)

    def plan(self, n: int) -> str:
        costs = {
            r: self.network.time(
                "all_reduce" if r == "allreduce" else "all_gather",
                self.predicted_payload_bytes(n, r),
                self.comm.n,
            )
            for r in self.routes
        }
        return min(costs, key=lambda r: (costs[r], r != "allreduce"))

    def run(
        self,
        x: torch.Tensor,
        stats: torch.Tensor | None,
        gen: Generator,
        route: str,
        codebook: Codebook | None = None,
    ) -> Outcome:
        """``codebook``: use this shared codebook (already agreed) instead of designing one from ``stats``."""
        cb: Codebook | None = codebook
        if cb is None:
            assert stats is not None
            cb = self.comp.codebook_from_stats(stats)  # type: ignore[attr-defined]
        if cb is None:  # every rank's bucket is zero: nothing to send
            return zero_outcome(x, route)
        n, N = x.numel(), self.comm.n
        bits, lanes = self.bits, self.lanes
        if route == "allreduce":
            snapped = cb.snap(self.grid)
            words = snapped.encode_lanes(x, gen, lanes)  # round + fine index + lanes, one pass with a RandKey
            mine = words.clone() if self.need_own else None
            self.comm.all_reduce(words, "payload")
            mean = snapped.decode_lanes(words, lanes, n, N)
            info = {"alpha": cb.high, "grid": self.grid, "levels": snapped.codebook.levels}
            return Outcome(mean, _own_lanes(snapped, mine, lanes, n), lambda: cb.truncate(x), route, info)
        packed = cb.encode_packed(x, gen, bits)  # round + dense pack, one pass with a RandKey
        gathered = self.comm.all_gather(packed, "payload")
        mean = cb.decode_mean_packed(list(gathered), bits, n)
        return Outcome(
            mean,
            lambda: cb.decode_packed(packed, bits, n),
            lambda: cb.truncate(x),
            route,
            {"alpha": cb.high, "levels": cb.levels},
        )


def _own_lanes(snapped: Any, mine: torch.Tensor | None, lanes: LanePlan, n: int) -> Callable[[], torch.Tensor]:
    def own() -> torch.Tensor:
        if mine is None:
            raise RuntimeError("this rank's own decode was not kept (aggregator.need_own is False)")
        return snapped.decode_lanes(mine, lanes, n, 1)  # type: ignore[no-any-return]

    return own


class MultiScaleAgg(Aggregator):
    uses_stats = True
    stats_op = "max"
    routes = ("allreduce", "allgather")

    def __init__(self, comp: Compressor, comm: Comm, fine_bits: int, network: NetworkModel) -> None:
        super().__init__(comp, comm, fine_bits, network)
        self.bits: int = comp.bits  # type: ignore[attr-defined]
        self.s = 2**self.bits - 1

    def local_stats(self, x: torch.Tensor) -> torch.Tensor:
        return self.comp.local_stats(x)  # type: ignore[attr-defined,no-any-return]

    @functools.cached_property
    def lanes(self) -> LanePlan:
        return plan_lanes(self.comm.n, self.s)

    def predicted_payload_bytes(self, n: int, route: str) -> int:
        if route == "allreduce":
            return self.lanes.words_for(n) * self.lanes.word_bits // 8
        return math.ceil(n * self.bits / 8)

    def plan(self, n: int) -> str:
        costs = {
            r: self.network.time(
                "all_reduce" if r == "allreduce" else "all_gather",
                self.predicted_payload_bytes(n, r),
                self.comm.n,
            )
            for r in self.routes
        }
        return min(costs, key=lambda r: (costs[r], r != "allreduce"))

    def run(self, x: torch.Tensor, stats: torch.Tensor | None, gen: Generator, route: str) -> Outcome:
        assert stats is not None
        comp: Any = self.comp
        m = float(stats.reshape(-1)[0])
        if m == 0.0:
            return zero_outcome(x, route)
        n, N = x.numel(), self.comm.n
        target = x.clamp(-m, m)  # a stale shared scale below this rank's max clips (blocking mode never does)
        # agree the scale per element/block before rounding: the coarsest index any rank needs (MIN)
        idx = comp.local_scale_index(target, m).to(torch.int8)
        self.comm.all_reduce(idx, "index", op="min")
        enc = comp.encode(target, generator=gen, stats=stats, scale_index=idx)
        own = comp.decode(enc).reshape(-1)
        codes = unpack_bits(enc.tensors["codes"], self.bits, n)
        scale = comp.scales(m).to(x.device)[comp._expand(idx.to(torch.int64), n)]
        if route == "allreduce":
            words = pack_lanes(codes, self.lanes, check=False)
            self.comm.all_reduce(words, "payload")
            total = unpack_lanes(words, self.lanes, n, check=False).to(torch.float64)
            mean = ((total * (2.0 / (self.s * N)) - 1.0) * scale.double()).to(torch.float32)
            return Outcome(mean, own, target, route, {"scale": m})
        gathered = self.comm.all_gather(enc.tensors["codes"], "payload")
        acc = torch.zeros(n, dtype=torch.float32, device=x.device)
        for r in range(N):
            acc += unpack_bits(gathered[r], self.bits, n).to(torch.float32)
        mean = (acc * (2.0 / (self.s * N)) - 1.0) * scale
        return Outcome(mean, own, target, route, {"scale": m})


class Gathered(Aggregator):
    """All-gather of each rank's own encoding (per-rank scales are not summable)."""

    routes = ("allgather",)

    @functools.lru_cache(maxsize=64)  # noqa: B019 - one entry per bucket size, lives as long as the hook
    def _template(self, n: int) -> tuple[tuple[str, torch.dtype, int], ...]:
        enc = self.comp.encode(torch.ones(n))
        return tuple((k, t.dtype, t.numel() * t.element_size()) for k, t in sorted(enc.tensors.items()))

    def predicted_payload_bytes(self, n: int, route: str) -> int:
        tmpl = self._template(n)
        return 8 * len(tmpl) + sum(nb for _, _, nb in tmpl)

    def run(self, x: torch.Tensor, stats: torch.Tensor | None, gen: Generator, route: str) -> Outcome:
        n, N = x.numel(), self.comm.n
        # per-rank-scaled compressors draw with torch.rand: a RandKey seeds their generator (same seed as before)
        enc = self.comp.encode(x, generator=gen.torch_generator(x.device) if isinstance(gen, RandKey) else gen)
        own = self.comp.decode(enc).reshape(-1)
        tmpl = self._template(n)
        gathered = self.comm.all_gather(self._serialize(enc.tensors, tmpl), "payload")
        shell = Encoded({}, enc.shape, enc.dtype)
        mean = torch.zeros(n, dtype=torch.float32, device=x.device)
        for r in range(N):
            shell.tensors = self._deserialize(gathered[r], tmpl)
            mean += self.comp.decode(shell).reshape(-1)
        return Outcome(mean / N, own, self.comp.target(x).reshape(-1), route)

    @staticmethod
    def _serialize(tensors: dict[str, torch.Tensor], tmpl: Any) -> torch.Tensor:
        """[int64 byte length per template key] + the tensors' bytes, padded to the template's size."""
        lengths, parts = [], []
        keys = {k for k, _, _ in tmpl}
        if set(tensors) - keys:
            raise RuntimeError(f"encoded tensors {sorted(set(tensors) - keys)} are not in the wire template")
        for key, dtype, max_bytes in tmpl:
            t = tensors.get(key)
            if t is None:
                lengths.append(0)
                continue
            b = t.to(dtype).contiguous().reshape(-1).view(torch.uint8)
            if b.numel() > max_bytes:
                raise RuntimeError(
                    f"encoded tensor {key!r} has {b.numel()} bytes, template allows {max_bytes}"
                )
            lengths.append(b.numel())
            parts.append(b)
        header = torch.tensor(lengths, dtype=torch.int64).view(torch.uint8)
        body = torch.cat([header, *parts]) if parts else header
        total = 8 * len(tmpl) + sum(nb for _, _, nb in tmpl)
        return torch.nn.functional.pad(body, (0, total - body.numel()))

    @staticmethod
    def _deserialize(chunk: torch.Tensor, tmpl: Any) -> dict[str, torch.Tensor]:
        h = 8 * len(tmpl)
        lengths = chunk[:h].clone().view(torch.int64).tolist()
        out, pos = {}, h
        for (key, dtype, _), nb in zip(tmpl, lengths, strict=True):
            if nb:
                out[key] = chunk[pos : pos + nb].clone().view(dtype)
                pos += nb
        return out


def aggregator_for(comp: Compressor, comm: Comm, fine_bits: int, network: NetworkModel) -> Aggregator:
    if comp.name in ("tuq", "tnq", "tbq", "single-scale"):
        return SharedCodebook(comp, comm, fine_bits, network)
    if comp.name == "multi-scale":
        return MultiScaleAgg(comp, comm, fine_bits, network)
    return Gathered(comp, comm, fine_bits, network)
