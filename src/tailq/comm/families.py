"""Aggregation families: how a compressor's ranks agree, chosen by its ``aggregation`` attribute alone.

A family turns the agreed codebook into this rank's :class:`~tailq.comm.routes.Coder` for one bucket; the routes
(:mod:`tailq.comm.routes`) then move its payloads. Nothing here switches on compressor names:

* :class:`SharedCodebook` (``Aggregation.SHARED_CODEBOOK``: tuq, tnq, tbq, single-scale, …): every rank holds the
  same codebook. Summable codes sit on a uniform grid {0..G}: the codebook's own grid when its levels are uniform
  (``uniform_codebook``), else the levels snapped onto a fine grid G = 2^(bits + fine_bits) − 1 (SPEC §6.1).
  Dense codes are the b-bit indices into the codebook; they split into byte-aligned shards that an owner decodes
  and requantizes (``shardable``, the two-phase route; phase 2 in :mod:`tailq.comm.owner`).
* :class:`AgreedScales` (``Aggregation.AGREED_SCALES``: multi-scale [V]): the shared max M (its codebook), then per
  element or block the finest scale every rank can represent — a MIN all-reduce of indices decided *before*
  rounding — then b-bit codes on the agreed scales, summed or gathered.
* :class:`PerRank` (``Aggregation.PER_RANK``: qsgd, nuqsgd, terngrad, efsign, topk, …): per-rank scales, so
  nothing is summable; every rank's encoded tensors are gathered (with a tiny header giving each tensor's length)
  and decoded. A ``requantizable`` compressor (fp8, fp4, int8sigma) is also shardable: each rank encodes its N
  shards on their own, and each owner re-encodes its shard's mean with the same compressor (torchft's collective).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, Protocol

import torch

from tailq.codec import Aggregation, AgreesScales, Codebook, Compressor, Encoded, SharesCodebook
from tailq.codec.packing import LanePlan, pack_lanes, unpack_bits, unpack_lanes
from tailq.kernels import RandKey

from .owner import OwnerRequantizer, default_gather_bits
from .routes.base import Coder, shard_numel
from .wire import Comm, Tag

__all__ = ["AgreedScales", "Family", "PerRank", "SharedCodebook", "family_for"]

GRID_CAP = 2**16 - 1  # the fine grid of snapped levels: lane plans are defined up to 16-bit codes


class Family(Protocol):
    """What the agreement and the routes need from a compressor's family."""

    stats_op: str
    """How ranks combine the statistics: ``"sum"`` or ``"max"``."""
    grid: int | None
    """Codes are integers 0..grid and summable; ``None``: gathered only."""
    shardable: bool
    """Codes on one shared codebook that owners can decode per shard and requantize (the two-phase route)."""
    uses_stats: bool
    """Whether the codebook comes from agreed statistics (the per-rank family agrees a non-finite flag only)."""

    def local_stats(self, x: torch.Tensor, shift: int = 0) -> torch.Tensor:
        """This rank's statistics, binned at the octave ``shift`` (the same on every rank; 0 where not binned)."""
        ...

    def codebook(self, stats: torch.Tensor, shift: int = 0) -> Codebook | None:
        ...

    def rebin_shift(self, stats: torch.Tensor, shift: int) -> int | None:
        """``None`` when the agreed statistics (binned at ``shift``) represent the bucket; else the shift to agree
        them again with (a pure function of the agreed statistics: every rank decides alike)."""
        ...

    def next_shift(self, stats: torch.Tensor, shift: int) -> int:
        """The shift for this bucket's next statistics, from the ones agreed at ``shift``."""
        ...

    def dense_bytes(self, numel: int) -> int:
        """Bytes of one rank's all-gather payload for a ``numel``-element bucket."""
        ...

    def gather_bytes(self, m: int) -> int:
        """Bytes of an owner's phase-2 payload for a shard of ``m`` elements (shardable families)."""
        ...

    def coder(self, x: torch.Tensor, codebook: Codebook | None, comm: Comm, tag: Tag, key: str) -> Coder | None:
        """This rank's coder for bucket ``x`` (finite) on the agreed codebook; ``None``: every rank's bucket is zero.
        ``key``: the bucket's state key (the owner's residuals and kept designs are filed under it)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ...


def family_for(comp: Compressor, *, fine_bits: int, keep_own: bool, gather_bits: int | None = None,
               owner_feedback: bool = False, redesign_every: int = 1) -> Family:
    """The family of ``comp``, from its ``aggregation`` attribute. ``keep_own``: error feedback will read
    :meth:`Coder.own` (the summable route then keeps a copy of this rank's words). ``gather_bits``,
    ``owner_feedback`` and ``redesign_every`` configure the two-phase owner (shared-codebook families)."""
    if comp.aggregation is Aggregation.SHARED_CODEBOOK:
        if not isinstance(comp, SharesCodebook):
            raise TypeError(f"{comp.name}: declares Aggregation.SHARED_CODEBOOK but lacks the SharesCodebook methods")
        gb = default_gather_bits(comp.bits) if gather_bits is None else gather_bits
        owner = (OwnerRequantizer(comp, gb, owner_feedback=owner_feedback, redesign_every=redesign_every)
                 if "bits" in getattr(comp, "options", {}) else None)
        return SharedCodebook(comp, fine_bits=fine_bits, keep_own=keep_own, owner=owner)
    if comp.aggregation is Aggregation.AGREED_SCALES:
        if not isinstance(comp, AgreesScales):
            raise TypeError(f"{comp.name}: declares Aggregation.AGREED_SCALES but lacks the AgreesScales methods")
        return AgreedScales(comp)
    return PerRank(comp)


class _Agreeing:
    """What the two families that agree statistics share: the compressor's statistics, codebook and code width.

    A compressor whose statistics are a histogram with an octave shift (``rebin_shift``, as the truncated
    quantizers) gets it passed through; for the others the shift is always 0 and never corrected.
    """

    uses_stats = True
    shardable = False

    def __init__(self, comp: SharesCodebook | AgreesScales) -> None:
        self.bits = comp.bits
        self.stats_op = comp.stats_op
        self._comp: Any = comp
        self.octave_shift = callable(getattr(comp, "rebin_shift", None))
        """The compressor bins its statistics at an octave shift (``local_stats(x, shift)``, ...)."""

    def local_stats(self, x: torch.Tensor, shift: int = 0) -> torch.Tensor:
        if self.octave_shift:
            return self._comp.local_stats(x, shift)
        _no_shift(shift)
        return self._comp.local_stats(x)

    def codebook(self, stats: torch.Tensor, shift: int = 0) -> Codebook | None:
        if self.octave_shift:
            return self._comp.codebook(stats, shift)
        _no_shift(shift)
        return self._comp.codebook(stats)

    def rebin_shift(self, stats: torch.Tensor, shift: int) -> int | None:
        return self._comp.rebin_shift(stats, shift) if self.octave_shift else None

    def next_shift(self, stats: torch.Tensor, shift: int) -> int:
        return int(self._comp.next_shift(stats, shift)) if self.octave_shift else 0

    def dense_bytes(self, numel: int) -> int:
        return math.ceil(numel * self.bits / 8)

    def gather_bytes(self, m: int) -> int:
        raise TypeError("this family is not shardable")

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


# -------------------------------------------------------------------------------------------- shared codebook
class SharedCodebook(_Agreeing):
    def __init__(self, comp: SharesCodebook, *, fine_bits: int, keep_own: bool,
                 owner: OwnerRequantizer | None = None) -> None:
        super().__init__(comp)
        s = 2**self.bits - 1
        self.grid: int | None = s if comp.uniform_codebook else min(2 ** (self.bits + fine_bits) - 1, GRID_CAP)
        self.keep_own = keep_own
        self.owner = owner
        self.shardable = owner is not None

    def gather_bytes(self, m: int) -> int:
        if self.owner is None:
            raise TypeError("this compressor has no bits option: it cannot be requantized by an owner")
        return self.owner.payload_bytes(m)

    def coder(self, x: torch.Tensor, codebook: Codebook | None, comm: Comm, tag: Tag, key: str) -> Coder | None:
        if codebook is None:
            return None
        assert self.grid is not None
        return _CodebookCoder(x, codebook, self.bits, self.grid, self.keep_own, self.owner, key)

    def state_dict(self) -> dict[str, Any]:
        return {} if self.owner is None else {"owner": self.owner.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.owner is not None and "owner" in state:
            self.owner.load_state_dict(state["owner"])


def _into(res: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """``res``, or ``res`` copied into ``out`` when the caller gave a destination."""
    return res if out is None else out.copy_(res.reshape(-1))


class _CodebookCoder:
    def __init__(self, x: torch.Tensor, cb: Codebook, bits: int, grid: int, keep_own: bool,
                 owner: OwnerRequantizer | None = None, key: str = "") -> None:
        self.x, self.cb, self.bits, self.grid, self.keep_own = x, cb, bits, grid, keep_own
        self.owner, self.key = owner, key
        self.numel = x.numel()
        self.info: dict[str, Any] = {}
        self._own: Callable[[], torch.Tensor] | None = None

    def encode_lanes(self, key: RandKey, plan: LanePlan) -> torch.Tensor:
        snapped = self._snapped = self.cb.snap(self.grid)
        words = snapped.encode_lanes(self.x, key, plan)  # round + fine index + lanes, one pass with a RandKey
        mine = words.clone() if self.keep_own else None
        self._own = lambda: snapped.decode_lanes(_kept(mine), plan, self.numel, 1)
        self.info = {"alpha": self.cb.high, "grid": self.grid, "levels": snapped.codebook.levels}
        return words

    def decode_lanes(self, words: torch.Tensor, plan: LanePlan, n_workers: int,
                     out: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        return self._snapped.decode_lanes(words, plan, self.numel, n_workers, out)

    def encode_dense(self, key: RandKey) -> torch.Tensor:
        packed = self.cb.encode_packed(self.x, key, self.bits)  # round + dense pack, one pass with a RandKey
        self._own = lambda: self.cb.decode_packed(packed, self.bits, self.numel)
        self.info = {"alpha": self.cb.high, "levels": self.cb.levels}
        return packed

    def decode_dense_mean(self, rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return self.cb.decode_mean_packed(list(rows), self.bits, self.numel, out)

    # -- the shard interface (two-phase) --------------------------------------------------------------------
    def encode_shards(self, key: RandKey, n_workers: int) -> tuple[torch.Tensor, int]:
        m = shard_numel(self.numel, n_workers)
        x = torch.nn.functional.pad(self.x, (0, n_workers * m - self.numel))  # padding is encoded, then dropped
        packed = self.cb.encode_packed(x, key, self.bits)
        self._own = lambda: self.cb.decode_packed(packed, self.bits, n_workers * m)[: self.numel]
        assert self.owner is not None
        self.info = {"alpha": self.cb.high, "levels": self.cb.levels, "gather_bits": self.owner.bits}
        return packed, m

    def decode_shard_mean(self, rows: torch.Tensor, m: int) -> torch.Tensor:
        return self.cb.decode_mean_packed(list(rows), self.bits, m)

    def requantize(self, mean: torch.Tensor, shard: int, key: RandKey) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.owner is not None
        m = mean.numel()
        valid = max(0, min(m, self.numel - shard * m))
        payload = self.owner.requantize(f"{self.key}/{shard}", mean, valid, key)
        return payload, self.owner.decode(payload, m)

    def dequantize(self, rows: torch.Tensor, m: int, out: torch.Tensor | None = None) -> torch.Tensor:
        assert self.owner is not None
        n = self.numel
        if out is None:
            out = torch.empty(rows.shape[0] * m, dtype=torch.float32, device=self.x.device)
        for r, row in enumerate(rows):
            lo, hi = r * m, min((r + 1) * m, n)
            if hi - lo == m:  # a whole shard: decoded in place
                self.owner.decode(row, m, out[lo:hi])
            elif hi > lo:  # the last shard ends in padding (out may hold only the bucket's values)
                out[lo:hi] = self.owner.decode(row, m)[: hi - lo]
        return out[:n]

    def own(self) -> torch.Tensor:
        assert self._own is not None, "own() before an encode"
        return self._own()

    def target(self) -> torch.Tensor:
        return self.cb.truncate(self.x)


def _no_shift(shift: int) -> None:
    if shift:
        raise RuntimeError(f"an octave shift ({shift}) for a compressor whose statistics take none")


def _kept(mine: torch.Tensor | None) -> torch.Tensor:
    if mine is None:
        raise RuntimeError("this rank's own decode was not kept (the family was built with keep_own=False)")
    return mine


# -------------------------------------------------------------------------------------------- agreed scales
class AgreedScales(_Agreeing):
    def __init__(self, comp: AgreesScales) -> None:
        super().__init__(comp)
        self.comp = comp
        self.grid: int | None = 2**self.bits - 1

    def coder(self, x: torch.Tensor, codebook: Codebook | None, comm: Comm, tag: Tag, key: str) -> Coder | None:
        if codebook is None:
            return None
        m = codebook.high
        target = x.clamp(-m, m)  # a stale shared scale below this rank's max clips (blocking mode never does)
        # agree the scale per element/block before rounding: the coarsest index any rank needs (MIN)
        idx = self.comp.local_scale_index(target, m).to(torch.int8)
        comm.all_reduce(idx, tag, "index", op="min")
        return _ScalesCoder(self.comp, target, self.comp.agreed(codebook, idx), self.bits)


class _ScalesCoder:
    def __init__(self, comp: AgreesScales, target: torch.Tensor, agreed: Any, bits: int) -> None:
        self.comp, self.x, self.agreed, self.bits = comp, target, agreed, bits
        self.numel = target.numel()
        self.grid: int | None = 2**bits - 1
        self.info: dict[str, Any] = {"scale": agreed.scale}
        self._enc: Encoded | None = None

    def _encode(self, key: RandKey) -> Encoded:
        self._enc = self.comp.encode_with(self.x, self.agreed, generator=key)
        return self._enc

    def encode_lanes(self, key: RandKey, plan: LanePlan) -> torch.Tensor:
        codes = unpack_bits(self._encode(key).tensors["codes"], self.bits, self.numel)
        return pack_lanes(codes, plan, check=False)

    def decode_lanes(self, words: torch.Tensor, plan: LanePlan, n_workers: int,
                     out: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        total = unpack_lanes(words, plan, self.numel, check=False)
        return _into(self.comp.decode_sum(total, self.agreed, n_workers), out)

    def encode_dense(self, key: RandKey) -> torch.Tensor:
        return self._encode(key).tensors["codes"]

    def decode_dense_mean(self, rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        acc = torch.zeros(self.numel, dtype=torch.float32, device=self.x.device)
        for row in rows:
            acc += unpack_bits(row, self.bits, self.numel).to(torch.float32)
        return _into(self.comp.decode_sum(acc, self.agreed, rows.shape[0]), out)

    def own(self) -> torch.Tensor:
        assert self._enc is not None
        return self.comp.decode(self._enc).reshape(-1)

    def target(self) -> torch.Tensor:
        return self.x


# -------------------------------------------------------------------------------------------- per rank
class PerRank:
    """All-gather of each rank's own encoding (per-rank scales are not summable)."""

    uses_stats = False
    stats_op = "max"  # the agreement carries the non-finite flag only
    grid: int | None = None

    def __init__(self, comp: Compressor) -> None:
        self.comp = comp
        self.shardable = comp.requantizable
        """Two-phase: each rank encodes its N shards on their own, owners average and re-encode with ``comp``."""

    def local_stats(self, x: torch.Tensor, shift: int = 0) -> torch.Tensor:
        return torch.zeros(0, dtype=torch.float64)

    def codebook(self, stats: torch.Tensor, shift: int = 0) -> Codebook | None:
        return None

    def rebin_shift(self, stats: torch.Tensor, shift: int) -> int | None:
        return None

    def next_shift(self, stats: torch.Tensor, shift: int) -> int:
        return 0

    @functools.lru_cache(maxsize=64)  # noqa: B019 - one entry per bucket size, lives as long as the hook
    def template(self, numel: int) -> tuple[tuple[str, torch.dtype, int], ...]:
        """(name, dtype, largest byte size) of every tensor an encoding of ``numel`` elements may hold."""
        enc = self.comp.encode(torch.ones(numel))
        return tuple((k, t.dtype, t.numel() * t.element_size()) for k, t in sorted(enc.tensors.items()))

    def dense_bytes(self, numel: int) -> int:
        tmpl = self.template(numel)
        return 8 * len(tmpl) + sum(nb for _, _, nb in tmpl)

    def gather_bytes(self, m: int) -> int:
        if not self.shardable:
            raise TypeError(f"{self.comp.name}: per-rank encodings are not shardable (not requantizable)")
        return self.dense_bytes(m)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def coder(self, x: torch.Tensor, codebook: Codebook | None, comm: Comm, tag: Tag, key: str) -> Coder | None:
        return _PerRankCoder(self, x)


class _PerRankCoder:
    grid: int | None = None

    def __init__(self, family: PerRank, x: torch.Tensor) -> None:
        self.family, self.comp, self.x = family, family.comp, x
        self.numel = x.numel()
        self.info: dict[str, Any] = {}
        self._enc: Encoded | None = None
        self._shard_encs: list[Encoded] = []
        self._shard_x = x

    def encode_dense(self, key: RandKey) -> torch.Tensor:
        # counter-based compressors (QSGD, NUQSGD, TernGrad) take the key itself, so their fused kernels run; the
        # others draw with torch.rand from a generator the key seeds
        gen: Any = key if self.comp.counter_randomness else key.torch_generator(self.x.device)
        self._enc = self.comp.encode(self.x, generator=gen)
        return _serialize(self._enc.tensors, self.family.template(self.numel))

    def decode_dense_mean(self, rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return _into(self._mean(rows, self.numel), out)

    def _decode_row(self, row: torch.Tensor, numel: int) -> torch.Tensor:
        # every rank's compressor has this configuration (checked when the hook starts): its format id
        shell = Encoded(_deserialize(row, self.family.template(numel)), torch.Size([numel]), torch.float32,
                        maker=self.comp.format_id)
        return self.comp.decode(shell).reshape(-1)

    def _mean(self, rows: torch.Tensor, numel: int) -> torch.Tensor:
        # N decodes near float32's largest value (their mean is finite) would overflow a float32 sum: each is added
        # at 2^-k with 2^k ≥ 2N (exact), and the sum divided by N·2^-k (exact) — the same bits as summing and then
        # dividing by N (rounding scales with a power of two; values below 2^(k-126) lose low subnormal bits), in
        # the same passes, and finite (a rounded sum of values ≤ float32's max never exceeds N times it)
        n_rows = rows.shape[0]
        scale = 2.0 ** -(max(1, n_rows - 1).bit_length() + 1)
        mean = torch.zeros(numel, dtype=torch.float32, device=self.x.device)
        for row in rows:
            mean.add_(self._decode_row(row, numel), alpha=scale)
        return mean.div_(n_rows * scale)

    # -- the shard interface (two-phase; requantizable compressors) ----------------------------------------
    def _encode_row(self, x: torch.Tensor, key: RandKey, numel: int) -> tuple[torch.Tensor, Encoded]:
        gen: Any = key if self.comp.counter_randomness else key.torch_generator(self.x.device)
        enc = self.comp.encode(x, generator=gen)
        return _serialize(enc.tensors, self.family.template(numel)), enc

    def encode_shards(self, key: RandKey, n_workers: int) -> tuple[torch.Tensor, int]:
        """Each of the N zero-padded shards encoded on its own (its own scales), one payload row per owner."""
        m = shard_numel(self.numel, n_workers)
        x = torch.nn.functional.pad(self.x, (0, n_workers * m - self.numel))
        rows, encs = [], []
        for j in range(n_workers):
            row, enc = self._encode_row(x[j * m : (j + 1) * m], _shard_key(key, j), m)
            rows.append(row)
            encs.append(enc)
        self._enc = None
        self._shard_x = x
        self._shard_encs = encs
        return torch.stack(rows), m

    def decode_shard_mean(self, rows: torch.Tensor, m: int) -> torch.Tensor:
        return self._mean(rows, m)

    def requantize(self, mean: torch.Tensor, shard: int, key: RandKey) -> tuple[torch.Tensor, torch.Tensor]:
        """The owner encodes its shard's mean with the same compressor (a second rounding, as torchft's)."""
        payload, enc = self._encode_row(mean, key, mean.numel())
        return payload, self.comp.decode(enc).reshape(-1)

    def dequantize(self, rows: torch.Tensor, m: int, out: torch.Tensor | None = None) -> torch.Tensor:
        n = self.numel
        if out is None:
            out = torch.empty(n, dtype=torch.float32, device=self.x.device)
        for r, row in enumerate(rows):
            lo, hi = r * m, min((r + 1) * m, n)
            if hi > lo:
                out[lo:hi] = self._decode_row(row, m)[: hi - lo]
        return out[:n]

    def encode_lanes(self, key: RandKey, plan: LanePlan) -> torch.Tensor:
        raise TypeError(f"{self.comp.name}: per-rank encodings are not summable")

    def decode_lanes(self, words: torch.Tensor, plan: LanePlan, n_workers: int,
                     out: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        raise TypeError(f"{self.comp.name}: per-rank encodings are not summable")

    def own(self) -> torch.Tensor:
        if self._enc is None:  # the shard path: this rank's N shard encodings
            assert self._shard_encs, "own() before an encode"
            return torch.cat([self.comp.decode(e).reshape(-1) for e in self._shard_encs])[: self.numel]
        return self.comp.decode(self._enc).reshape(-1)

    def target(self) -> torch.Tensor:
        if self._enc is None and self._shard_encs:  # a truncating compressor truncates each shard on its own
            m = self._shard_x.numel() // len(self._shard_encs)
            return torch.cat([self.comp.target(s).reshape(-1) for s in self._shard_x.split(m)])[: self.numel]
        return self.comp.target(self.x).reshape(-1)


SHARD_STREAM = 1 << 44
"""Added (times the shard) to the rank of a random key: each shard of the two-phase encode draws its own stream."""


def _shard_key(key: RandKey, shard: int) -> RandKey:
    return dataclasses.replace(key, rank=key.rank + shard * SHARD_STREAM)


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
            raise RuntimeError(f"encoded tensor {key!r} has {b.numel()} bytes, template allows {max_bytes}")
        lengths.append(b.numel())
        parts.append(b)
    header = torch.tensor(lengths, dtype=torch.int64).view(torch.uint8)
    body = torch.cat([header, *parts]) if parts else header
    total = 8 * len(tmpl) + sum(nb for _, _, nb in tmpl)
    return torch.nn.functional.pad(body, (0, total - body.numel()))


def _deserialize(chunk: torch.Tensor, tmpl: Any) -> dict[str, torch.Tensor]:
    h = 8 * len(tmpl)
    lengths = chunk[:h].clone().view(torch.int64).tolist()
    out, pos = {}, h
    for (key, dtype, _), nb in zip(tmpl, lengths, strict=True):
        if nb:
            out[key] = chunk[pos : pos + nb].clone().view(dtype)
            pos += nb
    return out
