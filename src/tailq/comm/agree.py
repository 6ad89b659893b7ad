"""Agreeing on a bucket's codebook (SPEC §6 "Agreeing on the codebook"): the statistics record and the policies.

Before a bucket is encoded its ranks all-reduce one small vector, :class:`BucketStats` packed: the number of
non-finite values (so a NaN/Inf on any rank sends the bucket uncompressed on every rank), optionally Σ|g|, and the
family's statistics. A **codebook policy** decides when that happens and where the codebook comes from; each owns
its cache and its part of the hook's ``state_dict``:

* :class:`EveryStep` — agree this step's statistics (one blocking round trip), design from them;
* :class:`OneStepStale` — design from the statistics agreed at the previous step for the same bucket and agree
  this step's asynchronously beside the payload (the first step blocks); if they show a non-finite value on some
  rank, the step's payload is void and the bucket goes uncompressed;
* :class:`RedesignEvery` — design on every k-th step only (``redesign_every=k``, our choice beyond SPEC §6); in
  between agree just ``[non-finite count, Σ|g|]`` and rescale the kept design by Σ|g_t| / Σ|g_design|, exact for
  scale-equivariant designs when only the gradients' scale moved. Still unbiased for the truncated input.

**Octave shift.** A family whose statistics are a histogram (the truncated quantizers' powerlaw and empirical
tails) bins them at an integer octave shift, the same on every rank: each policy keeps one per bucket key, taken
from the statistics that bucket last agreed (``family.next_shift``; 0 on its first step: today's binning). When
the agreed statistics show the bucket fell outside the histogram's range (``family.rebin_shift``: it jumped in
scale by many octaves since, or its first step is far from 1), the policy agrees them once more at the corrected
shift, before designing: a blocking round that steady state never needs (with stale statistics: this step's
exchange is made blocking instead). Every rank takes the same decision from the same agreed vector. ``rebins``
counts these corrections.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import torch

from tailq.codec import Codebook
from tailq.codec.codebook import fit_float32

from .families import Family
from .wire import Comm, Tag

__all__ = ["Agreement", "BucketStats", "CodebookPolicy", "EveryStep", "OneStepStale", "RedesignEvery", "policy_for"]

MAX_REBINS = 3
"""At most this many extra agreements for one bucket and step (one suffices below 2^28 elements)."""


@dataclasses.dataclass(frozen=True)
class BucketStats:
    """The statistics ranks agree on for one bucket, in one all-reduce (summed, or maxed, element by element).

    Packed as ``[nonfinite, sum_abs?, *body]``: in the body's dtype, or float64 when ``sum_abs`` is present.
    """

    nonfinite: float
    """NaN/Inf count on this rank (after agreement: over all ranks); > 0 sends the bucket uncompressed."""
    sum_abs: float | None = None
    """Σ|g| in float64, the scale reference of :class:`RedesignEvery`; ``None`` when not exchanged."""
    body: torch.Tensor | None = None
    """The family's statistics (``local_stats``); ``None`` when not exchanged (between redesigns)."""

    def pack(self) -> torch.Tensor:
        dtype = torch.float64 if self.sum_abs is not None or self.body is None else self.body.dtype
        head = [self.nonfinite] if self.sum_abs is None else [self.nonfinite, self.sum_abs]
        parts = [torch.tensor(head, dtype=dtype)]
        if self.body is not None:
            parts.append(self.body.to(dtype))
        return torch.cat(parts)

    def unpack(self, packed: torch.Tensor) -> BucketStats:
        """The record laid out like this one, read from ``packed`` (e.g. the all-reduced vector)."""
        start = 1 if self.sum_abs is None else 2
        return BucketStats(float(packed[0]), None if self.sum_abs is None else float(packed[1]),
                           None if self.body is None else packed[start:])


_WITH_BODY = BucketStats(0.0, body=torch.zeros(0))  # the layout [nonfinite, *body] (to unpack a kept vector)


def _sum_abs(x: torch.Tensor) -> float:
    """Σ|x| in float64 (the scale statistic agreed between codebook redesigns)."""
    return float(torch.linalg.vector_norm(x, 1, dtype=torch.float64))


@dataclasses.dataclass
class Agreement:
    """What a policy agreed for one bucket: void (non-finite somewhere) or the shared codebook."""

    nonfinite: bool
    """Some rank's bucket holds NaN/Inf: send it uncompressed."""
    codebook: Codebook | None = None
    """The shared codebook; ``None`` when every rank's bucket is zero or the family has none (per-rank)."""
    pending: Any = None
    """:class:`OneStepStale`: this step's statistics, still being all-reduced: ``(work, packed, shift)``."""
    shift: int = 0
    """The octave shift the codebook's statistics were binned at."""
    rebins: int = 0
    """Extra agreements this step made because the agreed statistics fell outside the histogram's range."""


class CodebookPolicy(Protocol):
    """When statistics are agreed and where a bucket's codebook comes from."""

    def agree(self, comm: Comm, tag: Tag, key: str, x: torch.Tensor, nonfinite: int) -> Agreement:
        """Agree on bucket ``key`` (``x``: this rank's finite values, ``nonfinite``: how many were NaN/Inf)."""
        ...

    def settle(self, comm: Comm, key: str, agreement: Agreement) -> bool:
        """After the payload: finish any exchange still in flight; ``False`` when the payload is void."""
        ...

    def state_dict(self) -> dict[str, Any]:
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ...


def _agree(comm: Comm, tag: Tag, local: BucketStats, op: str) -> BucketStats:
    packed = local.pack()
    comm.all_reduce(packed, tag, "stats", op=op)
    return local.unpack(packed)


class _Shifts:
    """The octave shift kept per bucket key, the extra agreements counted, and the agreement loop."""

    def __init__(self, family: Family) -> None:
        self.family = family
        self.shifts: dict[str, int] = {}  # bucket key -> the shift of its next statistics (absent: 0)
        self.rebins = 0  # corrections made because agreed statistics fell outside the histogram's range

    def _keep(self, key: str, body: torch.Tensor, shift: int) -> None:
        nxt = self.family.next_shift(body, shift)
        if nxt:
            self.shifts[key] = nxt
        else:
            self.shifts.pop(key, None)

    def _agree_binned(self, comm: Comm, tag: Tag, x: torch.Tensor, nonfinite: int, shift: int,
                      sum_abs: float | None = None) -> tuple[BucketStats, torch.Tensor, int, int]:
        """Agree ``x``'s statistics binned at ``shift``, then again at the corrected shift while they fell outside
        the histogram's range: ``(agreed, packed vector, shift, extra rounds)``."""
        rebins = 0
        while True:
            local = BucketStats(float(nonfinite), sum_abs, self.family.local_stats(x, shift).cpu())
            packed = local.pack()
            comm.all_reduce(packed, tag, "stats", op=self.family.stats_op)
            agreed = local.unpack(packed)
            if agreed.nonfinite > 0 or rebins == MAX_REBINS:
                return agreed, packed, shift, rebins
            assert agreed.body is not None
            new = self.family.rebin_shift(agreed.body, shift)
            if new is None or new == shift:
                return agreed, packed, shift, rebins
            shift, rebins = new, rebins + 1
            self.rebins += 1

    def _shift_state(self) -> dict[str, Any]:
        return {"shifts": dict(self.shifts)}

    def _load_shifts(self, state: dict[str, Any]) -> None:
        self.shifts = {k: int(v) for k, v in state.get("shifts", {}).items()}


class EveryStep(_Shifts):
    """Agree this step's statistics and design from them (the default)."""

    def agree(self, comm: Comm, tag: Tag, key: str, x: torch.Tensor, nonfinite: int) -> Agreement:
        agreed, _, shift, rebins = self._agree_binned(comm, tag, x, nonfinite, self.shifts.get(key, 0))
        if agreed.nonfinite > 0:
            return Agreement(True)
        assert agreed.body is not None
        self._keep(key, agreed.body, shift)
        return Agreement(False, self.family.codebook(agreed.body, shift), shift=shift, rebins=rebins)

    def settle(self, comm: Comm, key: str, agreement: Agreement) -> bool:
        return True

    def state_dict(self) -> dict[str, Any]:
        return self._shift_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._load_shifts(state)


class OneStepStale(_Shifts):
    """Design from last step's agreed statistics; agree this step's beside the payload (``stale_stats=True``).

    ``shifts[key]`` is the octave shift that ``stale[key]`` was binned at. When last step's statistics fell outside
    the histogram's range this step agrees its own blocking, as a first step does.
    """

    def __init__(self, family: Family) -> None:
        super().__init__(family)
        self.stale: dict[str, torch.Tensor] = {}  # bucket key -> the packed statistics agreed last step

    def agree(self, comm: Comm, tag: Tag, key: str, x: torch.Tensor, nonfinite: int) -> Agreement:
        last_shift = self.shifts.get(key, 0)
        if key in self.stale:
            last = _WITH_BODY.unpack(self.stale[key])
            assert last.body is not None
            if self.family.rebin_shift(last.body, last_shift) is None:
                shift = self.family.next_shift(last.body, last_shift)
                packed = BucketStats(float(nonfinite), body=self.family.local_stats(x, shift).cpu()).pack()
                work = comm.all_reduce(packed, tag, "stats", op=self.family.stats_op, async_op=True)
                return Agreement(False, self.family.codebook(last.body, last_shift), pending=(work, packed, shift),
                                 shift=last_shift)
            shift = self.family.next_shift(last.body, last_shift)  # last step's fell outside the range: block
            self.rebins += 1
            extra = 1
        else:
            shift, extra = last_shift, 0  # the first step for this bucket: a blocking exchange
        agreed, packed, shift, rebins = self._agree_binned(comm, tag, x, nonfinite, shift)
        rebins += extra
        if agreed.nonfinite > 0:
            return Agreement(True)
        self._store(key, packed, shift)
        assert agreed.body is not None
        return Agreement(False, self.family.codebook(agreed.body, shift), shift=shift, rebins=rebins)

    def _store(self, key: str, packed: torch.Tensor, shift: int) -> None:
        self.stale[key] = packed
        if shift:
            self.shifts[key] = shift
        else:
            self.shifts.pop(key, None)

    def settle(self, comm: Comm, key: str, agreement: Agreement) -> bool:
        if agreement.pending is None:
            return True
        work, packed, shift = agreement.pending
        comm.wait(work, "all_reduce(stats)")
        self._store(key, packed, shift)
        return not float(packed[0]) > 0  # this step's statistics say some rank had NaN/Inf: the payload is void

    def state_dict(self) -> dict[str, Any]:
        return {"stale": {k: v.clone() for k, v in self.stale.items()}, **self._shift_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stale = {k: v.clone() for k, v in state.get("stale", {}).items()}
        self._load_shifts(state)


class RedesignEvery(_Shifts):
    """Design every ``every``-th compressed step; in between rescale the kept design by the agreed Σ|g|."""

    def __init__(self, family: Family, every: int, first_step: int) -> None:
        super().__init__(family)
        self.every = every
        self.first_step = first_step  # the first compressed step (after the warm-up): a design step
        # bucket key -> (levels of the last design, agreed Σ|g| at that step, uniform?)
        self.designs: dict[str, tuple[torch.Tensor, float, bool]] = {}

    def agree(self, comm: Comm, tag: Tag, key: str, x: torch.Tensor, nonfinite: int) -> Agreement:
        due = (tag.step - self.first_step) % self.every == 0
        if key in self.designs and not due:  # agree only [non-finite count, Σ|g|], rescale the kept design
            agreed = _agree(comm, tag, BucketStats(float(nonfinite), sum_abs=_sum_abs(x)), "sum")
            if agreed.nonfinite > 0:
                return Agreement(True)
            levels, s0, uniform = self.designs[key]
            s1 = agreed.sum_abs
            assert s1 is not None
            if s1 == 0.0:  # every rank's bucket is zero: the mean is exactly zero, nothing else is sent
                return Agreement(False, None)
            scaled = fit_float32(levels.double() * (s1 / s0))  # a jump towards float32's top stays finite
            return Agreement(False, Codebook(torch.from_numpy(scaled).to(torch.float32), uniform=uniform))
        agreed, _, shift, rebins = self._agree_binned(comm, tag, x, nonfinite, self.shifts.get(key, 0),
                                                      sum_abs=_sum_abs(x))
        if agreed.nonfinite > 0:
            return Agreement(True)
        assert agreed.body is not None and agreed.sum_abs is not None
        self._keep(key, agreed.body, shift)
        cb = self.family.codebook(agreed.body, shift)
        if cb is not None and agreed.sum_abs > 0:  # keep the design for the steps until the next
            self.designs[key] = (cb.levels.clone(), agreed.sum_abs, cb.uniform)
        else:
            self.designs.pop(key, None)
        return Agreement(False, cb, shift=shift, rebins=rebins)

    def settle(self, comm: Comm, key: str, agreement: Agreement) -> bool:
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"designs": {k: {"levels": lv.clone(), "sum_abs": torch.tensor(sa, dtype=torch.float64), "uniform": u}
                            for k, (lv, sa, u) in self.designs.items()}, **self._shift_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.designs = {k: (d["levels"].clone(), float(d["sum_abs"]), bool(d["uniform"]))
                        for k, d in state.get("designs", {}).items()}
        self._load_shifts(state)


def policy_for(family: Family, *, stale_stats: bool, redesign_every: int, first_step: int) -> CodebookPolicy:
    """The policy for these hook options (validated by the hook: the two options exclude each other).

    A per-rank family has no codebook to be stale about: it agrees only its non-finite flag, every step.
    """
    if redesign_every > 1:
        return RedesignEvery(family, redesign_every, first_step)
    if stale_stats and family.uses_stats:
        return OneStepStale(family)
    return EveryStep(family)
