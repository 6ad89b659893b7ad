"""PyTorch's own DDP hooks under tailq's names: ``fp32``, ``fp16``, ``bf16``, ``powersgd``.

These are PyTorch's implementations (``default_hooks.allreduce_hook``, ``fp16_compress_hook``,
``bf16_compress_hook``, ``powerSGD_hook``), not re-implementations. Two of them fail on Gloo as shipped, and the
wrappers here fix exactly that and nothing else:

* ``bf16``: DDP refuses to *register* a function named ``bf16_compress_hook`` unless CUDA + NCCL ≥ 2.10 are
  present — a name check, not a capability check; Gloo sums bf16 tensors. Calling PyTorch's function from a
  hook with another name runs the identical code on Gloo.
* ``powersgd``: ``powerSGD_hook`` launches its P and Q all-reduces from ``Future.then`` callbacks. With several
  buckets in flight the callbacks fire in a completion order that differs between ranks, and Gloo aborts on the
  mismatched messages (pytorch/pytorch#58467). On Gloo the hook runs on an :class:`OrderedWorker`, one bucket
  at a time, so every rank issues the same collectives in the same order. On NCCL it runs as shipped.

What they add, as the tailq hooks do:

* **their own process group**: from the first bucket inside a backward every collective of the hook goes on a
  group of its own with the ranks, backend and timeout of ``process_group`` (:func:`~tailq.comm.wire.own_group`;
  PowerSGD's ``PowerSGDState.process_group`` is switched to it). DDP issues collectives of its own on its group
  from the autograd thread (the used-parameter all-reduce with ``find_unused_parameters=True``, and in the first
  iteration with ``static_graph=True``); PowerSGD's ordered worker issuing on the same group would interleave with
  them differently on each rank (Gloo: a hang or an abort; NCCL: two threads enqueuing on one communicator can
  deadlock).
* **the configuration check**: on the first bucket, before any payload collective, every rank's configuration
  digest is all-gathered (:meth:`~tailq.comm.wire.Comm.verify_same_config`, the same one-int64 all-gather the tailq
  hooks issue first, so a builtin on one rank and a tailq compressor on another fail the same way); ranks
  configured differently (``bf16`` and ``fp16``, PowerSGD ranks 1 and 2, ``bf16`` and ``tnq``) raise on every rank
  with every rank's configuration listed.
* **wire accounting**: the bytes handed to the collectives in ``state.metrics``.
"""

import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

from tailq.comm.network import ring_traffic_bytes
from tailq.comm.wire import Comm, Tag, WireRecord, own_group
from tailq.comm.worker import Handoff, OrderedWorker
from tailq.options import check_int

from .config import HookConfig
from .metrics import HookMetrics

__all__ = ["BuiltinState", "builtin_hook", "BUILTINS"]

BUILTINS = ("fp32", "fp16", "bf16", "powersgd")
_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
_POWERSGD_OPTIONS = (
    "matrix_approximation_rank",
    "start_powerSGD_iter",
    "min_compression_rate",
    "use_error_feedback",
    "warm_start",
    "orthogonalization_epsilon",
    "random_seed",
    "batch_tensors_with_same_shape",
)


class BuiltinState:
    """State for PyTorch's own hooks, with ``metrics`` (wire accounting) and ``state_dict`` / ``load_state_dict``."""

    def __init__(
        self, name: str, *, process_group: Any = None, ordered: bool | None = None, **options: Any
    ) -> None:
        if name not in BUILTINS:
            raise ValueError(f"unknown built-in hook {name!r}; available: {', '.join(BUILTINS)}")
        self.name = name
        self.process_group = process_group
        self.group: Any = process_group  # where the collectives go: process_group, then the hook's own (_use_own_group)
        self._ordered = ordered
        self._bound: tuple[int, str] | None = None  # (world size, backend) once bound: see _bind
        self._comm: Comm | None = None  # the configuration check's collectives (bound with the group)
        self._own_group: Any = None
        self._verified = False
        self._handoff = Handoff()
        self.worker: OrderedWorker | None = None
        self.metrics = HookMetrics()
        self.step = 0
        self.powersgd: powerSGD_hook.PowerSGDState | None = None
        if name == "powersgd":
            unknown = sorted(set(options) - set(_POWERSGD_OPTIONS))
            if unknown:
                raise TypeError(
                    f"powersgd: unknown option(s) {unknown}; accepted: {', '.join(_POWERSGD_OPTIONS)}"
                )
            options.setdefault("matrix_approximation_rank", 1)
            options.setdefault("start_powerSGD_iter", 2)
            check_int("powersgd: matrix_approximation_rank", options["matrix_approximation_rank"], 1)
            self.powersgd = powerSGD_hook.PowerSGDState(process_group=process_group, **options)
        elif options:
            raise TypeError(f"{name}: takes no options besides process_group; got {sorted(options)}")
        self.priming = False  # see tailq.hooks.prime_buckets
        if dist.is_initialized():
            self._bind()

    def _bind(self) -> tuple[int, str]:
        """Bind to the process group — now if one exists, else on the first bucket (as :class:`TailqState`)."""
        if self._bound is None:
            if not dist.is_initialized():
                raise RuntimeError(
                    f"tailq.ddp_hook({self.name!r}): no process group to bind to. The state can be created before "
                    "torch.distributed.init_process_group, but it must have been called by the first bucket; call "
                    "init_process_group before training")
            self._bound = (dist.get_world_size(self.process_group), str(dist.get_backend(self.process_group)))
            self._comm = Comm(self.group, self.metrics.wire, HookConfig().timeout_s)
            # Gloo needs the ordered worker for PowerSGD (see module docstring); NCCL runs PyTorch's hook as is.
            ordered = self._ordered
            if ordered is None:
                ordered = self.name == "powersgd" and self._bound[1] != "nccl"
            self.worker = OrderedWorker("tailq-powersgd") if ordered else None
        return self._bound

    @property
    def bound(self) -> bool:
        """Whether the state has bound to its process group yet."""
        return self._bound is not None

    def _use_own_group(self) -> None:
        """Called by the hook on DDP's thread at its first bucket inside a backward, the same point on every rank:
        create the hook's own process group; the collectives move there in :meth:`_prepare`, between two buckets."""
        if self._own_group is None:
            self._bind()
            self._own_group = own_group(self.process_group)

    def _prepare(self, bucket: dist.GradBucket) -> None:
        """Before a bucket's collectives (where they run: the worker, or DDP's thread): move to the own group
        once it exists, and on the first bucket check that every rank is configured the same."""
        assert self._comm is not None
        if self._own_group is not None and self.group is not self._own_group:
            self.group = self._own_group
            self._comm.use_group(self.group)
            if self.powersgd is not None:
                self.powersgd.process_group = self.group
        if not self._verified:
            n = bucket.buffer().numel()
            self._comm.verify_same_config(self.config(), Tag(self.step, bucket.index(), n, "config"))
            self._verified = True

    @property
    def n(self) -> int:
        """World size of the bound group."""
        return self._bind()[0]

    @property
    def backend(self) -> str:
        return self._bind()[1]

    def config(self) -> dict[str, Any]:
        opts = (
            {} if self.powersgd is None else {k: getattr(self.powersgd, k, None) for k in _POWERSGD_OPTIONS}
        )
        return {"name": self.name, "world_size": self.n, **opts}

    # -- accounting ----------------------------------------------------------------------------------------
    def _account(self, bucket: dist.GradBucket) -> None:
        n = bucket.buffer().numel()
        idx = bucket.index()
        if self.name != "powersgd":
            self._add(idx, n, "payload", n * _BYTES[self.name])
        else:
            self._add(idx, n, "payload", 4 * self._powersgd_numel(bucket))
        self.metrics.wire.count_bucket(n)
        if bucket.is_last():
            self.step += 1

    def _add(self, idx: int, n: int, kind: str, handed: int) -> None:
        self.metrics.wire.add(
            WireRecord(
                self.step,
                idx,
                n,
                self.name,
                kind,
                "all_reduce",
                handed,
                ring_traffic_bytes("all_reduce", handed, self.n),
            )
        )

    def _powersgd_numel(self, bucket: dist.GradBucket) -> int:
        """Elements PowerSGD all-reduces for this bucket: uncompressed tensors + P and Q (PyTorch's rule)."""
        st = self.powersgd
        assert st is not None
        if st.iter < st.start_powerSGD_iter:
            return bucket.buffer().numel()
        r = st.matrix_approximation_rank
        total = 0
        for t in bucket.gradients():
            if t.ndim <= 1:
                total += t.numel()
                continue
            rows, cols = t.shape[0], t.numel() // t.shape[0]
            rk = min(rows, cols, r)
            if (rows * cols) >= (rows + cols) * rk * st.min_compression_rate:
                total += (rows + cols) * rk
            else:
                total += t.numel()
        return total

    # -- persistence -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"config": self.config(), "step": self.step}
        st = self.powersgd
        if st is not None:
            name, keys, pos, has_gauss, cached = st.rng.get_state()
            out["powersgd"] = {
                "iter": st.iter,
                "error_dict": {str(k): v.clone() for k, v in st.error_dict.items()},
                "p_memory_dict": {str(k): v.clone() for k, v in st.p_memory_dict.items()},
                "q_memory_dict": {str(k): v.clone() for k, v in st.q_memory_dict.items()},
                "rng": {
                    "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                    "pos": int(pos),
                    "has_gauss": int(has_gauss),
                    "cached_gaussian": float(cached),
                },
            }
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("config") != self.config():
            raise ValueError(f"hook state was saved with {state.get('config')}, this hook is {self.config()}")
        self.step = int(state["step"])
        st = self.powersgd
        if st is not None:
            p = state["powersgd"]
            st.iter = int(p["iter"])
            st.error_dict = {int(k): v.clone() for k, v in p["error_dict"].items()}
            st.p_memory_dict = {int(k): v.clone() for k, v in p["p_memory_dict"].items()}
            st.q_memory_dict = {int(k): v.clone() for k, v in p["q_memory_dict"].items()}
            r = p["rng"]
            st.rng.set_state(
                (
                    "MT19937",
                    r["keys"].numpy().astype(np.uint32),
                    r["pos"],
                    r["has_gauss"],
                    r["cached_gaussian"],
                )
            )

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()

    def __repr__(self) -> str:
        if self._bound is None:
            return f"BuiltinState({self.name!r}, unbound)"
        ordered = self.worker is not None
        return f"BuiltinState({self.name!r}, backend={self.backend}, world_size={self.n}, ordered={ordered})"


def _run(state: BuiltinState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    state._prepare(bucket)
    pg = state.group
    if state.priming:  # plain fp32 mean; PowerSGD's iteration count and memories untouched
        return default_hooks.allreduce_hook(pg, bucket)
    state._account(bucket)
    if state.name == "fp32":
        return default_hooks.allreduce_hook(pg, bucket)
    if state.name == "fp16":
        return default_hooks.fp16_compress_hook(pg, bucket)
    if state.name == "bf16":
        return default_hooks.bf16_compress_hook(pg, bucket)
    assert state.powersgd is not None
    return powerSGD_hook.powerSGD_hook(state.powersgd, bucket)


def builtin_hook(state: BuiltinState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook running PyTorch's own implementation (ordered on Gloo for PowerSGD).

    The first bucket checks the ranks' configurations (without the ordered worker: here, on DDP's thread, so a
    mismatch raises from the hook call itself); inside a backward the hook's collectives go on its own group.
    """
    t0 = time.perf_counter()
    state._bind()
    if torch._C._current_graph_task_id() >= 0:  # called by DDP inside a backward
        state._use_own_group()
    fut = state.worker.submit(_run, state, bucket) if state.worker is not None else _run(state, bucket)

    def done() -> None:
        # wall time from the hook call to the future's completion (overlaps backward); no codec time to split
        elapsed = time.perf_counter() - t0
        state.metrics.seconds["total"] += elapsed
        state.metrics.seconds["communicate"] += elapsed

    return state._handoff(fut, bucket, done)
