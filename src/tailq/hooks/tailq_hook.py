"""The tailq DDP communication hook: one gradient bucket, end to end (ARCHITECTURE.md "path of a bucket").

``GradBucket.buffer()`` → (+ error-feedback residual) → local statistics → agree them across ranks (a small
all-reduce, or last step's) → codebook (cached, deterministic) → encode (truncate + stochastic rounding with
counter-based randomness keyed by (seed, rank, step, bucket), :class:`~tailq.kernels.RandKey`) → pack (headroom
lanes or dense) → all-reduce SUM or all-gather → unpack → decode to the mean → (update residual) → the future
completes with the averaged bucket. Round + pack and unpack + decode run as fused kernels where available
(:mod:`tailq.kernels`), with the same bits as the plain-torch reference.

Every bucket runs on the state's :class:`~tailq.comm.worker.OrderedWorker`, so all ranks issue their collectives
in the same order. Cost per bucket: one statistics all-reduce (a few hundred float64 at most; skipped from the
critical path with ``stale_stats``) and one payload collective; the ``multi-scale`` quantizer adds its index
agreement. Buckets smaller than ``min_bucket`` and the first ``warmup_steps`` steps go as bf16.

``redesign_every=k`` (truncated quantizers; our choice, beyond SPEC §6): the histogram and the codebook design
(a numerical optimisation, milliseconds per bucket, tens for TBQ) run on every k-th compressed step only. In
between, ranks agree just ``[non-finite count, Σ|g|]`` and rescale the kept design's levels by Σ|g_t| / Σ|g_design|:
the empirical design is scale-equivariant (log-binned histogram), so this is exact when only the gradients'
scale moved and tracks the scale every step when the shape moves slowly. Still unbiased for the truncated
input; the kept designs are part of ``state_dict``.

Faults: a bucket with NaN/Inf on any rank goes uncompressed in fp32 on every rank (detected through the agreed
statistics), so non-finite values arrive exactly as with plain DDP and ``GradScaler`` skips the step. Ranks with
different configurations fail on the first bucket with the configurations listed. Every wait has a timeout.
"""

import hashlib
import struct
import time
import zlib
from typing import Any

import torch
import torch.distributed as dist

from tailq.codec import Codebook, Compressor, ErrorFeedback, compressor
from tailq.codec.tq import TruncatedQuantizer
from tailq.comm.aggregate import ROUTES, Aggregator, Outcome, SharedCodebook, aggregator_for, zero_outcome
from tailq.comm.wire import Comm, NetworkModel, WireLog
from tailq.comm.worker import OrderedWorker
from tailq.kernels import RandKey, dispatch

__all__ = ["TailqState", "tailq_hook"]

STATE_VERSION = 1


def _seed_for(seed: int, rank: int, step: int, bucket: int) -> int:
    """A 63-bit generator seed keyed by (seed, rank, step, bucket): reproducible and restorable.

    Equal to ``RandKey(seed, rank, step, bucket).torch_seed()`` (the seed of the generator that compressors drawing
    with ``torch.rand`` get from the hook's key).
    """
    digest = hashlib.blake2b(struct.pack("<4q", seed, rank, step, bucket), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _sum_abs(x: torch.Tensor) -> torch.Tensor:
    """Σ|x| in float64 (the scale statistic agreed between codebook redesigns)."""
    return torch.linalg.vector_norm(x, 1, dtype=torch.float64).cpu()


def _bucket_key(bucket: dist.GradBucket) -> str:
    """Key of per-bucket state (residuals, stale statistics): index, size and the shapes of its tensors.

    DDP rebuilds its buckets after the first iteration; a bucket that keeps its index but changes its content
    gets a new key, so state can never be applied to other parameters.
    """
    shapes = ",".join("x".join(map(str, t.shape)) for t in bucket.gradients())
    return f"{bucket.index()}:{bucket.buffer().numel()}:{zlib.crc32(shapes.encode()):08x}"


class TailqState:
    """State of a tailq hook: the compressor, the options every rank must share, and what the hook measured.

    Attributes for the harness: ``log`` (:class:`WireLog`: bytes handed to every collective, by kind),
    ``vnmse`` (list of ``{"step", "bucket", "vnmse"}`` on sampled steps), ``seconds`` (wall time in the
    hook: ``{"total", "communicate"}``; encode + decode = total − communicate), ``step``.
    """

    def __init__(
        self,
        name: str,
        *,
        process_group: Any = None,
        route: str = "auto",
        error_feedback: bool | str = False,
        stale_stats: bool = False,
        redesign_every: int = 1,
        min_bucket: int = 8192,
        warmup_steps: int = 1,
        fine_bits: int = 2,
        measure_every: int = 0,
        timeout_s: float = 300.0,
        network: NetworkModel | None = None,
        seed: int = 0,
        **compressor_options: Any,
    ) -> None:
        if not dist.is_initialized():
            raise RuntimeError(
                "tailq.ddp_hook: call torch.distributed.init_process_group before creating the hook"
            )
        self.comp: Compressor = compressor(name, seed=seed, **compressor_options)
        if route not in ROUTES:
            raise ValueError(f"route must be one of {', '.join(ROUTES)}; got {route!r}")
        if error_feedback is True:
            error_feedback = "all"
        if error_feedback not in (False, "all", "truncation"):
            raise ValueError(
                f"error_feedback must be False, True, 'all' or 'truncation'; got {error_feedback!r}"
            )
        for key, val, lo in (
            ("min_bucket", min_bucket, 0),
            ("warmup_steps", warmup_steps, 0),
            ("measure_every", measure_every, 0),
            ("redesign_every", redesign_every, 1),
        ):
            if isinstance(val, bool) or not isinstance(val, int) or val < lo:
                raise ValueError(f"{key} must be an integer >= {lo}; got {val!r}")
        if isinstance(fine_bits, bool) or not isinstance(fine_bits, int) or not 0 <= fine_bits <= 8:
            raise ValueError(f"fine_bits must be an integer in [0, 8]; got {fine_bits!r}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0; got {timeout_s!r}")
        if error_feedback and warmup_steps < 1:
            raise ValueError(
                "error_feedback needs warmup_steps >= 1: DDP rebuilds its buckets after the first iteration, "
                "so residuals kept per bucket during it would not match the buckets that follow"
            )
        if redesign_every > 1 and not isinstance(self.comp, TruncatedQuantizer):
            raise ValueError(
                f"redesign_every applies to the truncated quantizers (tuq, tnq, tbq), not {name!r}; "
                f"use redesign_every=1"
            )
        if redesign_every > 1 and stale_stats:
            raise ValueError(
                "redesign_every > 1 and stale_stats both take the codebook design off the critical path; "
                "choose one (between redesigns only two floats are all-reduced)"
            )
        self.name = name
        self.route = route
        self.error_feedback = error_feedback
        self.stale_stats = bool(stale_stats)
        self.redesign_every = redesign_every
        self.min_bucket = min_bucket
        self.warmup_steps = warmup_steps
        self.fine_bits = fine_bits
        self.measure_every = measure_every
        self.timeout_s = float(timeout_s)
        self.seed = seed
        self.log = WireLog()
        self.comm = Comm(process_group, self.log, self.timeout_s)
        self.agg: Aggregator = aggregator_for(self.comp, self.comm, fine_bits, network or NetworkModel())
        if route != "auto" and route not in self.agg.routes:
            raise ValueError(
                f"{name}: route {route!r} is not available; routes: {', '.join(self.agg.routes)}"
            )
        self.ef = ErrorFeedback(self.comp, feedback=error_feedback) if error_feedback else None
        self.agg.need_own = self.ef is not None  # only error feedback reads a rank's own decoded contribution
        self.step = 0
        self.stale: dict[str, torch.Tensor] = {}
        # redesign_every > 1: bucket key -> (levels of the last design, agreed Σ|g| at that step, uniform?)
        self.designs: dict[str, tuple[torch.Tensor, float, bool]] = {}
        self.vnmse: list[dict[str, float]] = []
        self.seconds = {"total": 0.0, "communicate": 0.0, "measure": 0.0}
        self.fallbacks: list[dict[str, Any]] = []
        self.last: dict[int, dict[str, Any]] = {}  # bucket index -> what the last step's aggregation reported
        self._verified = False
        self.priming = False  # see tailq.hooks.prime_buckets
        self._routes: dict[int, str] = {}
        self.worker = OrderedWorker()

    # -- configuration and persistence ---------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """Everything that must be identical on every rank (checked on the first bucket)."""
        return {
            "state_version": STATE_VERSION,
            "compressor": self.comp.config(),
            "route": self.route,
            "error_feedback": self.error_feedback,
            "stale_stats": self.stale_stats,
            "redesign_every": self.redesign_every,
            "min_bucket": self.min_bucket,
            "warmup_steps": self.warmup_steps,
            "fine_bits": self.fine_bits,
            "measure_every": self.measure_every,
            "world_size": self.comm.n,
        }

    def state_dict(self) -> dict[str, Any]:
        """Plain dicts, ints, strings and tensors: loadable with ``torch.load(weights_only=True)``."""
        return {
            "config": self.config(),
            "step": self.step,
            "error_feedback": None if self.ef is None else self.ef.state_dict(),
            "stale": {k: v.clone() for k, v in self.stale.items()},
            "designs": {
                k: {"levels": lv.clone(), "sum_abs": torch.tensor(sa, dtype=torch.float64), "uniform": u}
                for k, (lv, sa, u) in self.designs.items()
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("config") != self.config():
            raise ValueError(
                f"hook state was saved with a different configuration:\n  saved: {state.get('config')}\n"
                f"  this:  {self.config()}"
            )
        self.step = int(state["step"])
        if self.ef is not None:
            self.ef.load_state_dict(state["error_feedback"])
        self.stale = {k: v.clone() for k, v in state["stale"].items()}
        self.designs = {
            k: (d["levels"].clone(), float(d["sum_abs"]), bool(d["uniform"]))
            for k, d in state.get("designs", {}).items()
        }

    def close(self) -> None:
        self.worker.close()

    def __repr__(self) -> str:
        return f"TailqState({self.comp!r}, route={self.route!r}, world_size={self.comm.n}, step={self.step})"

    # -- one bucket ---------------------------------------------------------------------------------------
    def process(self, bucket: dist.GradBucket) -> torch.Tensor:
        t0 = time.perf_counter()
        comm0 = self.comm.seconds
        meas0 = self.seconds["measure"]
        buf = bucket.buffer()
        if not self._verified:
            self.comm.verify_same_config(self.config())
            self._verified = True
        idx, n, step = bucket.index(), buf.numel(), self.step
        g = buf.reshape(-1).to(torch.float32)
        if self.priming:  # plain fp32 mean; step, residuals, statistics and wire log untouched
            t = g.clone()
            self.comm.ctx = (step, idx, n, "priming")
            self.comm.all_reduce(t, "priming")
            buf.copy_(t.div_(self.comm.n).reshape(buf.shape))
            return buf
        exact = None
        if self.measure_every and step % self.measure_every == 0:
            tm = time.perf_counter()
            exact = g.clone()
            self.comm.ctx = (step, idx, n, "measure")
            self.comm.all_reduce(exact, "measure")
            exact /= self.comm.n
            self.seconds["measure"] += time.perf_counter() - tm  # not part of the method: harnesses subtract it
        if step < self.warmup_steps or n < self.min_bucket or n == 0:
            mean = self._passthrough(g, step, idx)
        else:
            mean = self._compressed(g, step, idx, _bucket_key(bucket))
        if exact is not None:
            denom = float((exact.double() ** 2).sum())
            err = float(((mean.double() - exact.double()) ** 2).sum())
            self.vnmse.append(
                {"step": step, "bucket": idx, "vnmse": err / denom if denom > 0 else float("nan")}
            )
        self.log.coords += n
        if bucket.is_last():
            self.step += 1
        buf.copy_(mean.reshape(buf.shape))
        self.seconds["total"] += time.perf_counter() - t0 - (self.seconds["measure"] - meas0)
        self.seconds["communicate"] += self.comm.seconds - comm0 - (self.seconds["measure"] - meas0)
        return buf

    def _passthrough(self, g: torch.Tensor, step: int, idx: int) -> torch.Tensor:
        """bf16, as PyTorch's bf16_compress_hook: divide first, all-reduce SUM, cast back."""
        self.comm.ctx = (step, idx, g.numel(), "passthrough")
        t = g.to(torch.bfloat16).div_(self.comm.n)
        self.comm.all_reduce(t, "passthrough")
        return t.to(torch.float32)

    def _fallback(self, g: torch.Tensor, step: int, idx: int, why: str) -> torch.Tensor:
        """Uncompressed fp32 mean: non-finite values reach every rank exactly as with plain DDP."""
        self.comm.ctx = (step, idx, g.numel(), "fallback")
        t = g.clone()
        self.comm.all_reduce(t, "fallback")
        self.fallbacks.append({"step": step, "bucket": idx, "why": why})
        return t.div_(self.comm.n)

    def _compressed(self, g: torch.Tensor, step: int, idx: int, key: str) -> torch.Tensor:
        n, agg = g.numel(), self.agg
        route = self.route if self.route != "auto" else self._routes.setdefault(n, agg.plan(n))
        self.comm.ctx = (step, idx, n, route)
        x = self.ef.compensate(key, g) if self.ef is not None else g
        fast = dispatch.nonfinite_count(x)  # one fused reduction where a fast path exists
        bad = int((~torch.isfinite(x)).sum()) if fast is None else fast
        xs = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0) if bad else x
        rkey = RandKey(self.seed, self.comm.rank, step, idx)  # counter-based randomness for this bucket and step
        pending = None
        stats = None
        local = None
        # redesign_every > 1 (truncated quantizers): design every k-th step, rescale the design in between
        shared = agg if self.redesign_every > 1 and isinstance(agg, SharedCodebook) else None
        amortized = shared is not None
        due = (step - self.warmup_steps) % self.redesign_every == 0
        if shared is not None and key in self.designs and not due:
            # between redesigns: agree only [non-finite count, Σ|g|] and rescale the last design's levels
            local = torch.stack([torch.tensor(float(bad), dtype=torch.float64), _sum_abs(xs)])
            self.comm.all_reduce(local, "stats")
            if local[0] > 0:
                return self._fallback(g, step, idx, "non-finite gradient on some rank")
            levels, s0, uniform = self.designs[key]
            s1 = float(local[1])
            if s1 == 0.0:  # every rank's bucket is zero: the mean is exactly zero, nothing else is sent
                return self._finish(x, key, idx, zero_outcome(xs, route))
            cb = Codebook((levels.double() * (s1 / s0)).to(torch.float32), uniform=uniform)
            return self._finish(x, key, idx, shared.run(xs, None, rkey, route, codebook=cb))
        if agg.uses_stats:
            own = agg.local_stats(xs).cpu()
            if amortized:  # [non-finite count, Σ|g|, stats] in float64 (Σ|g| is the reference for rescaling)
                own = own.double()
                local = torch.cat([torch.stack([torch.tensor(float(bad), dtype=torch.float64), _sum_abs(xs)]), own])
            else:  # [non-finite count, stats]
                local = torch.cat([torch.tensor([float(bad)], dtype=own.dtype), own])
            if self.stale_stats and key in self.stale:
                stats = self.stale[key]
                pending = self.comm.all_reduce(local, "stats", op=agg.stats_op, async_op=True)
            else:
                self.comm.all_reduce(local, "stats", op=agg.stats_op)
                if local[0] > 0:
                    return self._fallback(g, step, idx, "non-finite gradient on some rank")
                stats = local
        else:
            flag = torch.tensor([float(bad)], dtype=torch.float64)
            self.comm.all_reduce(flag, "stats", op="max")
            if flag[0] > 0:
                return self._fallback(g, step, idx, "non-finite gradient on some rank")
        if shared is not None and stats is not None:  # a design step: keep the design for the steps until the next
            cb_new = self.comp.codebook_from_stats(stats[2:])  # type: ignore[attr-defined]
            if cb_new is not None and float(stats[1]) > 0:
                self.designs[key] = (cb_new.levels.clone(), float(stats[1]), cb_new.uniform)
            else:
                self.designs.pop(key, None)
            out = shared.run(xs, stats[2:], rkey, route, codebook=cb_new)
        else:
            out = agg.run(xs, None if stats is None else stats[1:], rkey, route)
        if self.stale_stats and local is not None:
            if pending is not None:
                self.comm.wait(pending, "all_reduce(stats)")
            self.stale[key] = local
            if local[0] > 0:  # this step's agreed statistics say some rank had NaN/Inf: the payload is void
                return self._fallback(
                    g, step, idx, "non-finite gradient on some rank (seen in stale-mode stats)"
                )
        return self._finish(x, key, idx, out)

    def _finish(self, x: torch.Tensor, key: str, idx: int, out: Outcome) -> torch.Tensor:
        if self.ef is not None:
            self.ef.update(key, x, out.own, target=out.target)
        self.last[idx] = {"route": out.route, **out.info}
        return out.mean


def tailq_hook(state: TailqState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: ``model.register_comm_hook(state, tailq_hook)``."""
    return state.worker.submit(state.process, bucket)
