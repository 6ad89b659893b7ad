"""DiLoCo and Streaming DiLoCo: H local steps, then a (compressed) outer mean of the pseudo-gradients.

    diloco = tailq.DiLoCo(model, inner_opt, sync_every=20, compressor="tnq", bits=2)
    for x, y in data:
        loss_fn(model(x), y).backward(); inner_opt.step(); inner_opt.zero_grad()
        diloco.step()  # on a fragment's sync step: its outer mean and outer step

The algorithm (DiLoCo, arXiv 2311.08105; Streaming DiLoCo, 2501.18512), for each fragment p of the parameters,
every ``sync_every`` = H inner steps, at the fragment's offset:

1. the pseudo-gradient Δ_p = θ_global,p − θ_local,p (float32), this rank's;
2. its mean over the outer group's ranks, through a DDP hook of tailq's (:func:`tailq.ddp_hook`): any tailq
   compressor with its routes, planner, error feedback (kept per fragment, on by default for lossy compressors) and
   NaN/Inf fallback, or PyTorch's ``fp32``/``fp16``/``bf16`` all-reduce (the paper's and OpenDiLoCo's) — the same
   code the per-step hooks run, fed one fragment as one bucket (or several of at most ``bucket_numel``);
3. with ``delay`` = τ > 0 the mean runs in the background (the hook's worker thread, or Gloo/NCCL's own) while τ
   more inner steps run, then is merged (Streaming DiLoCo's overlap);
4. the outer step: ``grad = mean Δ_p`` on θ_global,p with the outer optimizer (default Nesterov SGD, lr 0.7,
   momentum 0.9), one optimizer per fragment;
5. the merge: θ_local,p ← α·θ_local,p + (1 − α)·θ_global,p (``merge_alpha`` = α; with τ = 0 the local parameters
   are exactly the new global ones whatever α is). A mean with NaN/Inf (it reached every rank uncompressed) skips the
   outer step of that fragment on every rank, as ``GradScaler`` skips a step, and resets θ_local,p to θ_global,p.

Fragments: the parameters (``model.parameters()`` order, those that require a gradient) cut into F contiguous
groups of about equal size; fragment p syncs when ``step % H == ((p + 1)·H // F) % H``, so with F = 1 every H-th
step and with F > 1 one fragment about every H/F steps (F ≤ H). At construction rank 0's parameters are broadcast
(every rank starts from the same θ_global, as DDP does) and the ranks' configurations compared (a mismatch raises on
every rank, listing them).

Checkpoint ``model.state_dict()``, the inner optimizer's and ``diloco.state_dict()`` together: the latter holds
θ_global, the outer optimizers, the hook's state (residuals, statistics, plan), the step, and the means in flight
(waited for), so a resumed run continues bit-identically. Evaluate the global model with
``with diloco.global_model(): ...``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist

from tailq.comm.wire import Comm, Tag, own_group
from tailq.hooks import LocalBucket, ddp_hook
from tailq.options import check_float, check_int

__all__ = ["DiLoCo", "OuterFactory", "hook_options", "nesterov"]

STATE_VERSION = 1
OuterFactory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]
log = logging.getLogger("tailq")
_PLAIN = ("fp32", "fp16", "bf16")  # PyTorch's own all-reduces: no compressor, nothing kept between syncs


def hook_options(compressor: str, options: dict[str, Any], subgroup: bool = False) -> dict[str, Any]:
    """The hook options :class:`DiLoCo` builds its outer mean with: the caller's, over DiLoCo's defaults —
    ``error_feedback=True`` (every tailq compressor is lossy), ``warmup_steps=0`` and ``min_bucket=0`` (every
    outer sync is the method's), ``fixed_layout=True`` (fragments never regroup), and ``node_size=1`` on a proper
    subgroup (one rank per node: no node link inside it). PyTorch's ``fp32``/``fp16``/``bf16`` take none."""
    if compressor in _PLAIN:
        if options:
            raise TypeError(f"{compressor}: PyTorch's all-reduce takes no options; got {sorted(options)}")
        return {}
    if compressor == "powersgd":
        raise ValueError("compressor='powersgd' is a per-step DDP hook (low rank per weight matrix); the outer "
                         "mean takes a tailq compressor or fp32/fp16/bf16")
    out = {"error_feedback": True, "warmup_steps": 0, "min_bucket": 0, **options, "fixed_layout": True}
    if subgroup:
        out.setdefault("node_size", 1)
    return out


def nesterov(lr: float = 0.7, momentum: float = 0.9) -> OuterFactory:
    """DiLoCo's outer optimizer: SGD with Nesterov momentum (the paper's lr 0.7, momentum 0.9)."""
    check_float("outer lr", lr, 0.0, low_open=True)
    check_float("outer momentum", momentum, 0.0, 1.0, high_open=True)

    def make(params: list[torch.Tensor]) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=momentum > 0)

    desc = {"optimizer": "SGD", "lr": lr, "momentum": momentum, "nesterov": momentum > 0}
    make.describe = desc  # type: ignore[attr-defined]
    return make


class _FragmentBucket(LocalBucket):
    """One piece of a fragment's pseudo-gradient as the ``GradBucket`` the hooks read (fixed index; the last piece
    ends the hook's step)."""

    def __init__(self, buf: torch.Tensor, index: int, last: bool) -> None:
        super().__init__(buf)
        self._index, self._last = index, last

    def index(self) -> int:
        return self._index

    def is_last(self) -> bool:
        return self._last


@dataclasses.dataclass
class _Fragment:
    params: list[torch.nn.Parameter]
    offset: int  # syncs when step % H == offset % H (and step >= offset)
    first_bucket: int  # the hook's bucket index of its first piece
    pieces: list[tuple[int, int]]  # (start, stop) of each bucket in the flat fragment
    glob: list[torch.Tensor] = dataclasses.field(default_factory=list)  # θ_global, float32 leaves
    outer: torch.optim.Optimizer | None = None

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)


@dataclasses.dataclass
class _InFlight:
    fragment: int
    launched: int  # the inner step whose parameters gave Δ
    merge_at: int
    futures: list[Any]  # one per piece (or, after state_dict / load, the means themselves)
    ordinal: int = 0  # launches before this one: the hook's step of its collectives (``WireRecord.step``)


class DiLoCo:
    """Outer loop of DiLoCo / Streaming DiLoCo around ``model`` and its inner optimizer (see the module docstring).

    Args:
        model: the module trained locally on every rank (plain, or wrapped in DDP for a node's inner group).
        inner_optimizer: the user's optimizer of ``model`` (kept for ``repr``/checks; the user steps it).
        sync_every: H, inner steps between two syncs of a fragment (>= 1).
        compressor: a tailq compressor (``tailq list``) or ``fp32``/``fp16``/``bf16`` (PyTorch's all-reduce).
        fragments: F, Streaming DiLoCo's fragments (1 <= F <= H).
        delay: τ, inner steps a fragment's mean runs in the background before it is merged (0 <= τ < H).
        merge_alpha: α of the merge (0 <= α <= 1): the share of the local parameters kept (only with τ > 0).
        outer_optimizer: a factory ``params -> torch.optim.Optimizer``; default :func:`nesterov` (0.7, 0.9).
        process_group: the outer group (default: the whole world); e.g. one rank per node with inner DDP in the node.
        bucket_numel: the largest piece of a fragment handed to the hook as one bucket.
        **options: the hook's and the compressor's options (``bits``, ``route``, ``error_feedback``, ``network``,
            ``measure_every``, …; see :func:`tailq.ddp_hook`). DiLoCo's defaults: ``error_feedback=True`` for lossy
            tailq compressors, ``warmup_steps=0``, ``min_bucket=0``, ``node_size=1`` on a proper subgroup.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        inner_optimizer: torch.optim.Optimizer | None = None,
        *,
        sync_every: int,
        compressor: str = "tnq",
        fragments: int = 1,
        delay: int = 0,
        merge_alpha: float = 0.5,
        outer_optimizer: OuterFactory | None = None,
        process_group: Any = None,
        bucket_numel: int = 1 << 24,
        **options: Any,
    ) -> None:
        if not dist.is_initialized():
            raise RuntimeError("tailq.DiLoCo needs torch.distributed.init_process_group to have been called")
        self.H = check_int("sync_every", sync_every, 1)
        self.F = check_int("fragments", fragments, 1, self.H)
        self.delay = check_int("delay", delay, 0, self.H - 1)
        self.alpha = check_float("merge_alpha", merge_alpha, 0.0, 1.0)
        check_int("bucket_numel", bucket_numel, 1)
        self.model, self.inner_optimizer, self.name = model, inner_optimizer, compressor
        self._outer_factory = outer_optimizer or nesterov()
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("model has no parameter that requires a gradient")
        self.group = own_group(process_group)  # the outer mean's collectives on a group of their own
        world = dist.get_world_size(process_group)
        subgroup = process_group is not None and world < dist.get_world_size()
        self.state, self.hook = ddp_hook(compressor, process_group=self.group,
                                         **hook_options(compressor, options, subgroup=subgroup))
        self.metrics = self.state.metrics  # wire, vNMSE (measure_every), fallbacks, plan: the hook's
        self.fragments = self._split(params, bucket_numel)
        with torch.no_grad():
            for p in params:  # every rank starts from rank 0's parameters (DDP's broadcast at construction)
                dist.broadcast(p.data, dist.get_global_rank(self.group, 0), group=self.group)
        for frag in self.fragments:
            frag.glob = [p.detach().to(torch.float32).clone() for p in frag.params]
            frag.outer = self._outer_factory(frag.glob)
        comm = Comm(self.group, self.metrics.wire, 300.0)
        comm.verify_same_config(self.config(), Tag(0, -1, 0, "config"))
        self.step_count = 0
        self.launches = 0  # fragment syncs launched (each is one step of the hook)
        self.syncs: list[dict[str, Any]] = []  # one record per merged fragment (the harness reports them)
        self.skipped = 0
        self.last_pseudo_gradient: torch.Tensor | None = None  # this rank's last Δ (tail statistics), flat
        self._inflight: list[_InFlight] = []

    # -- layout ----------------------------------------------------------------------------------------------
    def _split(self, params: list[torch.nn.Parameter], bucket_numel: int) -> list[_Fragment]:
        total = sum(p.numel() for p in params)
        groups: list[list[torch.nn.Parameter]] = [[] for _ in range(self.F)]
        seen = 0
        for p in params:  # contiguous, cut where the running size passes (k/F)·total
            k = min(self.F - 1, int(self.F * (seen + p.numel() / 2) / total))
            groups[k].append(p)
            seen += p.numel()
        frags, bucket = [], 0
        for k, g in enumerate(groups):
            if not g:
                raise ValueError(f"fragments={self.F} is more than this model's parameters can fill "
                                 f"({len(params)} parameter tensors, {total} values): use fewer fragments")
            n = sum(p.numel() for p in g)
            pieces = [(a, min(a + bucket_numel, n)) for a in range(0, n, bucket_numel)]
            frags.append(_Fragment(g, ((k + 1) * self.H) // self.F, bucket, pieces))
            bucket += len(pieces)
        return frags

    def config(self) -> dict[str, Any]:
        """What every rank and a loaded state must agree on."""
        probe = getattr(self._outer_factory, "describe", None)
        if probe is None:
            opt = self._outer_factory([torch.zeros(1)])
            probe = {"optimizer": type(opt).__name__,
                     **{k: v for k, v in opt.defaults.items() if isinstance(v, bool | int | float | str)}}
        return {"state_version": STATE_VERSION, "sync_every": self.H, "fragments": self.F, "delay": self.delay,
                "merge_alpha": self.alpha, "outer": probe, "compressor": self.name,
                "world_size": dist.get_world_size(self.group),
                "layout": [[list(p.shape) for p in f.params] for f in self.fragments],
                "pieces": [f.pieces for f in self.fragments]}

    # -- the loop ----------------------------------------------------------------------------------------------
    def step(self) -> None:
        """Call once after every inner optimizer step: merges the means that are due, launches the fragments whose
        sync step this is (in that order, the same on every rank)."""
        self.step_count += 1
        s = self.step_count
        due = [f for f in self._inflight if f.merge_at == s]
        for job in due:
            self._merge(job)
        self._inflight = [f for f in self._inflight if f.merge_at != s]
        for p, frag in enumerate(self.fragments):
            if s >= frag.offset and s % self.H == frag.offset % self.H:
                job = self._launch(p, s)
                if self.delay == 0:
                    self._merge(job)
                else:
                    self._inflight.append(job)

    def _launch(self, p: int, s: int) -> _InFlight:
        frag = self.fragments[p]
        with torch.no_grad():
            delta = torch.cat([(g - q.detach().to(torch.float32)).reshape(-1)
                               for g, q in zip(frag.glob, frag.params, strict=True)])
        self.last_pseudo_gradient = delta.detach().clone()
        futures = []
        for i, (a, b) in enumerate(frag.pieces):
            bucket = _FragmentBucket(delta[a:b], frag.first_bucket + i, last=i == len(frag.pieces) - 1)
            futures.append(self.hook(self.state, bucket))
        self.launches += 1
        return _InFlight(p, s, s + self.delay, futures, self.launches - 1)

    def _wait(self, job: _InFlight) -> torch.Tensor:
        parts = [f if isinstance(f, torch.Tensor) else _value(f.wait()) for f in job.futures]
        job.futures = parts
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _merge(self, job: _InFlight) -> None:
        t0 = time.perf_counter()
        mean = self._wait(job)
        waited = time.perf_counter() - t0
        frag = self.fragments[job.fragment]
        finite = bool(torch.isfinite(mean).all())  # the same on every rank: non-finite means arrive exact (fp32)
        assert frag.outer is not None
        with torch.no_grad():
            if finite:
                a = 0
                for g in frag.glob:
                    g.grad = mean[a : a + g.numel()].view_as(g).to(g.dtype)
                    a += g.numel()
                frag.outer.step()
                frag.outer.zero_grad(set_to_none=True)
            else:
                self.skipped += 1
                log.warning("tailq DiLoCo: non-finite outer mean of fragment %d at step %d: its outer step is skipped "
                            "and its local parameters reset to the global ones", job.fragment, job.launched)
            alpha = self.alpha if finite and self.delay > 0 else 0.0
            for g, q in zip(frag.glob, frag.params, strict=True):
                if alpha == 0.0:
                    q.copy_(g)
                else:
                    q.copy_(q.to(torch.float32).mul_(alpha).add_(g, alpha=1.0 - alpha))
        self.syncs.append({"fragment": job.fragment, "launched": job.launched, "merged": self.step_count,
                           "numel": frag.numel, "waited_s": waited, "skipped": not finite, "ordinal": job.ordinal})

    def wait(self) -> None:
        """Wait until every mean in flight has arrived, without merging it (it still merges at its step): what a
        caller that pauses its clock (an evaluation, a checkpoint) calls first, so no mean travels while paused."""
        for job in self._inflight:
            self._wait(job)

    def flush(self) -> None:
        """Merge every mean still in flight now (e.g. at the end of training, before saving the final model)."""
        for job in self._inflight:
            self._merge(job)
        self._inflight = []

    @contextlib.contextmanager
    def global_model(self) -> Iterator[torch.nn.Module]:
        """``with diloco.global_model() as m:`` — the model holding θ_global (what DiLoCo evaluates), restored after."""
        saved = [[q.detach().clone() for q in f.params] for f in self.fragments]
        try:
            with torch.no_grad():
                for f in self.fragments:
                    for g, q in zip(f.glob, f.params, strict=True):
                        q.copy_(g)
            yield self.model
        finally:
            with torch.no_grad():
                for f, qs in zip(self.fragments, saved, strict=True):
                    for q, v in zip(f.params, qs, strict=True):
                        q.copy_(v)

    def global_parameters(self) -> list[torch.Tensor]:
        """θ_global, float32, in ``model.parameters()`` order (those that require a gradient)."""
        return [g for f in self.fragments for g in f.glob]

    # -- persistence -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Loadable with ``torch.load(weights_only=True)``; waits for the means in flight (every rank calls it at the
        same step) and keeps them, so the resumed run merges them at the same steps."""
        for job in self._inflight:
            self._wait(job)
        return {"config": self.config(), "step": self.step_count, "skipped": self.skipped, "launches": self.launches,
                "global": [[g.clone() for g in f.glob] for f in self.fragments],
                "outer": [f.outer.state_dict() for f in self.fragments if f.outer is not None],
                "hook": self.state.state_dict(),
                "inflight": [{"fragment": j.fragment, "launched": j.launched, "merge_at": j.merge_at,
                              "ordinal": j.ordinal, "means": list(j.futures)} for j in self._inflight]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved, mine = state.get("config"), self.config()
        if saved != mine:
            differ = sorted(k for k in set(saved or {}) | set(mine) if (saved or {}).get(k) != mine.get(k))
            raise ValueError(f"DiLoCo state was saved with a different configuration ({', '.join(differ)} differ):\n"
                             f"  saved: {saved}\n  this:  {mine}")
        self.step_count, self.skipped = int(state["step"]), int(state.get("skipped", 0))
        self.launches = int(state["launches"])
        with torch.no_grad():
            for f, gs, os_ in zip(self.fragments, state["global"], state["outer"], strict=True):
                for g, v in zip(f.glob, gs, strict=True):
                    g.copy_(v)
                assert f.outer is not None
                f.outer.load_state_dict(os_)
        self.state.load_state_dict(state["hook"])
        # the hook checks that a loaded state's residuals are all used by its first step (DDP may regroup its
        # buckets); here a hook step is one fragment's sync, the layout is fixed and checked with the config above
        if hasattr(self.state, "_loaded_keys"):
            self.state._loaded_keys = None
        self._inflight = [_InFlight(int(j["fragment"]), int(j["launched"]), int(j["merge_at"]), list(j["means"]),
                                    int(j["ordinal"])) for j in state["inflight"]]

    def close(self) -> None:
        self.state.close()

    def __repr__(self) -> str:
        return (f"DiLoCo({self.name!r}, sync_every={self.H}, fragments={self.F}, delay={self.delay}, "
                f"step={self.step_count}, world_size={dist.get_world_size(self.group)})")


def _value(v: Any) -> torch.Tensor:
    """A hook future's value: the tensor (PyTorch's hooks return it bare or in a one-element list)."""
    if isinstance(v, Sequence) and not isinstance(v, torch.Tensor):
        v = v[0]
    return v.reshape(-1).to(torch.float32)


def expected_syncs(steps: int, sync_every: int, fragments: int) -> int:
    """How many fragment syncs ``steps`` inner steps launch (for reports and tests)."""
    return sum(max(0, (steps - ((k + 1) * sync_every) // fragments) // sync_every + 1)
               for k in range(fragments) if ((k + 1) * sync_every) // fragments <= steps)

