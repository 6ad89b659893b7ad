"""Multi-process helpers for the distributed tests: real Gloo process groups on localhost.

``launch(fn, world, *args)`` spawns ``world`` processes, each running ``fn(rank, world, *args)`` inside an
initialised Gloo group (file rendezvous: no port races), and returns the per-rank return values. A rank that
raises makes ``launch`` raise with that rank's traceback. Worker functions live in this module so the spawned
children can import them.
"""

from __future__ import annotations

import datetime
import io
import os
import tempfile
import traceback
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tailq
from tailq.hooks.tailq_hook import TailqState
from tailq.kernels import RandKey


class FakeBucket:
    """The part of ``dist.GradBucket`` the tailq hook uses (buffer, index, is_last, gradients)."""

    def __init__(self, buf: torch.Tensor, index: int = 0, last: bool = True) -> None:
        self._buf, self._index, self._last = buf, index, last

    def buffer(self) -> torch.Tensor:
        return self._buf

    def index(self) -> int:
        return self._index

    def is_last(self) -> bool:
        return self._last

    def gradients(self) -> list[torch.Tensor]:
        return [self._buf]


def init_group(rank: int, world: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))


def _entry(fn: Any, rank: int, world: int, init_file: str, q: Any, args: tuple[Any, ...], init: bool) -> None:
    torch.set_num_threads(1)
    try:
        if init:
            init_group(rank, world, init_file)
            out = fn(rank, world, *args)
        else:  # the worker initialises the group itself: fn(rank, world, init_file, *args)
            out = fn(rank, world, init_file, *args)
        buf = io.BytesIO()
        torch.save(out, buf)  # plain bytes: tensors must not depend on this process staying alive
        q.put((rank, "ok", buf.getvalue()))
    except BaseException:  # noqa: BLE001 - reported to the parent
        q.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass


def launch(fn: Any, world: int, *args: Any, timeout: float = 300.0, expect: int | None = None,
           init: bool = True, check_exit: bool = False) -> list[Any]:
    """Run fn on ``world`` ranks; returns results in rank order (``expect`` = how many ranks report).

    ``init=False``: no process group is created; ``fn(rank, world, init_file, *args)`` calls :func:`init_group`.
    ``check_exit``: also fail unless every process exited with status 0 (a signal, e.g. SIGABRT, is -6).
    """
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_entry, args=(fn, r, world, init_file, q, args, init)) for r in range(world)]
        for p in procs:
            p.start()
        results: dict[int, Any] = {}
        errors = []
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
        want = world if expect is None else expect
        while len(results) + len(errors) < want:
            if datetime.datetime.now() > deadline:
                for p in procs:
                    p.kill()
                raise TimeoutError(f"ranks did not finish within {timeout} s; got {sorted(results)}")
            if q.empty():
                if all(not p.is_alive() for p in procs) and q.empty():
                    break
                import time

                time.sleep(0.05)
                continue
            rank, status, out = q.get()
            if status == "ok":
                results[rank] = torch.load(io.BytesIO(out), weights_only=True)
            else:
                errors.append(f"rank {rank}:\n{out}")
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    if check_exit:
        errors += [f"rank {r}: exit status {p.exitcode}" for r, p in enumerate(procs) if p.exitcode != 0]
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in sorted(results)]


# ---------------------------------------------------------------------------------------------------------
# data
def heavy(d: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    x = rng.standard_t(3.5, d) * 0.01
    x[: min(d, 3)] = [0.5, -0.8, 0.3][: min(d, 3)]
    return torch.from_numpy(x.astype(np.float32))


def _agreed_stats(state: TailqState, x: torch.Tensor) -> torch.Tensor:
    """The statistics exactly as the hook agrees them: [non-finite count, stats] in one all-reduce."""
    own = state.family.local_stats(x)
    local = torch.cat([torch.zeros(1, dtype=own.dtype), own])
    dist.all_reduce(local, op=dist.ReduceOp.MAX if state.family.stats_op == "max" else dist.ReduceOp.SUM)
    return local[1:]


def _plain_ddp(g: torch.Tensor) -> torch.Tensor:
    """What plain DDP averages ``g`` to: PyTorch's own ``allreduce_hook`` (divide by N, then all-reduce SUM)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    out = default_hooks.allreduce_hook(None, FakeBucket(g.clone())).wait()  # type: ignore[arg-type]
    return out[0] if isinstance(out, list) else out


def _mean(t: torch.Tensor) -> torch.Tensor:
    t = t.clone().double()
    dist.all_reduce(t)
    return t / dist.get_world_size()


# ---------------------------------------------------------------------------------------------------------
# workers
def w_statistics(rank: int, world: int, cases: list[tuple[str, dict[str, Any]]], steps: int, d: int) -> list[Any]:
    """Each case: run ``steps`` hook calls on a fixed per-rank vector; return mean/std of the output, the
    expected value (exact mean of targets), the agreed levels and the wire bits (measured and modeled)."""
    out = []
    g = heavy(d, seed=1000 + rank)
    for name, opts in cases:
        state = TailqState(name, warmup_steps=0, min_bucket=0, **opts)
        acc = torch.zeros(d, dtype=torch.float64)
        acc2 = torch.zeros(d, dtype=torch.float64)
        for _ in range(steps):
            res = state.process(FakeBucket(g.clone())).double()
            acc += res
            acc2 += res * res
        mean = acc / steps
        std = (acc2 / steps - mean * mean).clamp_min(0).sqrt() * (steps / max(steps - 1, 1)) ** 0.5
        comp = state.comp
        if hasattr(comp, "codebook") and name != "multi-scale":
            cb = comp.codebook(_agreed_stats(state, g))
            target = cb.truncate(g)
        elif comp.unbiased:
            target = comp.target(g)
        else:  # deterministic, biased: the exact mean of the compressed vectors
            target = comp.roundtrip(g)
        expected = _mean(target)
        info = state.metrics.last.get(0, {})
        # the exact variance of the hooked mean where the rounding is onto known levels: each rank rounds its
        # target t in [l_j, l_j+1] with variance (l_j+1 - t)(t - l_j), independently of the other ranks
        exact_var = None  # two-phase: the owner's second rounding adds variance the formula below omits
        if info.get("levels") is not None and name != "multi-scale" and info.get("route") != "twophase":
            lv = info["levels"].double()
            t = target.double().clamp(float(lv[0]), float(lv[-1]))
            j = (torch.searchsorted(lv, t, right=True) - 1).clamp(0, lv.numel() - 2)
            exact_var = _mean((lv[j + 1] - t) * (t - lv[j])) / world
        route = info.get("route", "")
        stats_len = 0 if not state.family.uses_stats else state.family.local_stats(g).numel() + 1
        stats_bytes = 8 if not state.family.uses_stats else stats_len * state.family.local_stats(g).element_size()
        model_bytes = state.planner.payload_bytes(route, d) + stats_bytes
        if name == "multi-scale":
            model_bytes += comp.n_indices(d)  # int8 index per element/block
        out.append({
            "name": name, "opts": opts, "mean": mean, "std": std, "expected": expected, "route": route,
            "exact_var": exact_var,
            "levels": info.get("levels"),
            "bits_measured": state.metrics.wire.bits_per_coord(),
            "bits_model": 8 * model_bytes / d,
            "last": res.float(),
        })
        state.close()
    return out


def w_lanes_exact(rank: int, world: int, names: list[str], d: int) -> list[tuple[str, int, float]]:
    """The summable route decodes to exactly the mean of every rank's own (reproduced) codes."""
    out = []
    g = heavy(d, seed=2000 + rank)
    for name in names:
        for bits in range(1, 9):
            state = TailqState(name, bits=bits, route="allreduce", warmup_steps=0, min_bucket=0, seed=5)
            res = state.process(FakeBucket(g.clone()))
            stats = _agreed_stats(state, g)
            cb = state.comp.codebook(stats)
            snapped = cb.snap(state.family.grid)
            codes = snapped.encode_fine(g, RandKey(5, rank, 0, 0))  # the hook's counter key (seed, rank, step, bucket)
            total = codes.clone()
            dist.all_reduce(total)
            expected = snapped.decode_sum(total, world)
            out.append((name, bits, float((res - expected).abs().max())))
            state.close()
    return out


def w_nonfinite(rank: int, world: int, name: str, stale: bool, opts: dict[str, Any] | None = None) -> dict[str, Any]:
    """Step 0 normal; step 1 rank 1 has +Inf and NaN: every rank's result must equal plain fp32 DDP's."""
    state = TailqState(name, warmup_steps=0, min_bucket=0, stale_stats=stale, **(opts or {}))
    g = heavy(4096, seed=3000 + rank)
    state.process(FakeBucket(g.clone()))
    bad = g.clone()
    if rank == 1:
        bad[5] = float("inf")
        bad[7] = float("nan")
    res = state.process(FakeBucket(bad.clone()))
    plain = _plain_ddp(bad)
    state.close()
    return {"equal": bool(torch.equal(torch.nan_to_num(res, nan=123.0), torch.nan_to_num(plain, nan=123.0))),
            "inf": bool(torch.isinf(res[5])), "nan": bool(torch.isnan(res[7])), "fallbacks": state.metrics.fallbacks}


def w_mismatch(rank: int, world: int, opts: list[dict[str, Any]] | None = None) -> str:
    mine = opts[rank] if opts else {"bits": 3 if rank == 0 else 4}
    state = TailqState("tnq", warmup_steps=0, min_bucket=0, timeout_s=20, **mine)
    try:
        state.process(FakeBucket(heavy(1000, rank)))
    except RuntimeError as err:
        return str(err)
    finally:
        state.close()
    return "no error"


def w_dead_peer(rank: int, world: int) -> dict[str, Any]:
    import time

    state = TailqState("tuq", warmup_steps=0, min_bucket=0, timeout_s=15)
    g = heavy(1000, rank)
    state.process(FakeBucket(g.clone()))
    if rank == world - 1:
        os._exit(0)  # dies without a word, mid-run
    t0 = time.perf_counter()
    try:
        state.process(FakeBucket(g.clone()))
        msg = "no error"
    except RuntimeError as err:
        msg = str(err)
    return {"message": msg, "seconds": time.perf_counter() - t0}


# -- DDP training ----------------------------------------------------------------------------------------
def _dataset(n: int = 2048, d: int = 32, classes: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(d, classes, generator=gen)
    x = torch.randn(n, d, generator=gen)
    y = (x @ w + 0.5 * torch.randn(n, classes, generator=gen)).argmax(1)
    return x, y


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128), torch.nn.ReLU(),
                               torch.nn.Linear(128, 8))


def _ddp(hook: str, opts: dict[str, Any], **ddp_kwargs: Any) -> tuple[Any, Any, Any]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = _model()
    ddp = DDP(model, bucket_cap_mb=0.02, **ddp_kwargs)
    state = None
    if hook != "none":
        state, fn = tailq.ddp_hook(hook, **opts)
        ddp.register_comm_hook(state, fn)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    return ddp, opt, state


def _train_steps(rank: int, world: int, ddp: Any, opt: Any, start: int, stop: int, batch: int = 64) -> None:
    x, y = _dataset()
    for step in range(start, stop):
        gen = torch.Generator().manual_seed(10_000 * step + rank)
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ddp(x[idx]), y[idx]).backward()
        opt.step()


def _full_loss(ddp: Any) -> float:
    x, y = _dataset()
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(ddp.module(x), y))


def w_train(rank: int, world: int, hooks: list[tuple[str, dict[str, Any]]], steps: int) -> dict[str, float]:
    out = {}
    for hook, opts in hooks:
        ddp, opt, state = _ddp(hook, opts)
        _train_steps(rank, world, ddp, opt, 0, steps)
        out[hook + ("" if not opts else str(sorted(opts.items())))] = _full_loss(ddp)
        if state is not None:
            state.close()
    return out


def w_lazy(rank: int, world: int, init_file: str, hooks: list[tuple[str, dict[str, Any]]], steps: int) -> Any:
    """States created before ``init_process_group`` (as Lightning's DDPStrategy does) train exactly as states
    created after it; an unbound state's hook fails clearly when no group ever appears."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    early = [tailq.ddp_hook(hook, **opts) for hook, opts in hooks]
    out: dict[str, Any] = {"bound_before": [s.bound for s, _ in early],
                           "repr": [repr(s) for s, _ in early]}
    try:  # no group yet: a state_dict (it records the world size) says why it cannot answer
        early[0][0].state_dict()
    except RuntimeError as err:
        out["unbound_error"] = str(err)
    init_group(rank, world, init_file)
    for (hook, opts), (state, fn) in zip(hooks, early, strict=True):
        params = []
        for st, f in ((state, fn), tailq.ddp_hook(hook, **opts)):  # created early, then created after init
            model = _model()
            ddp = DDP(model, bucket_cap_mb=0.02)
            ddp.register_comm_hook(st, f)
            opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
            _train_steps(rank, world, ddp, opt, 0, steps)
            params.append([p.detach().clone() for p in ddp.module.parameters()])
            out.setdefault(hook, []).append({"step": st.step, "bits": st.metrics.wire.bits_per_coord()})
            st.close()
        out[hook].append(all(torch.equal(a, b) for a, b in zip(*params, strict=True)))
    return out


def w_checkpoint(rank: int, world: int, hook: str, opts: dict[str, Any], phase: str, path: str,
                 ddp_kwargs: dict[str, Any] | None = None) -> list[torch.Tensor]:
    """12 steps in one go ("full"), or 6, a checkpoint ("first"), and 6 more after a restore ("resume")."""
    ddp, opt, state = _ddp(hook, opts, **(ddp_kwargs or {}))
    if phase == "full":
        _train_steps(rank, world, ddp, opt, 0, 12)
    elif phase == "first":
        _train_steps(rank, world, ddp, opt, 0, 6)
        torch.save({"model": ddp.module.state_dict(), "opt": opt.state_dict(), "hook": state.state_dict()},
                   f"{path}.{rank}")
    else:
        ck = torch.load(f"{path}.{rank}", weights_only=True)
        ddp.module.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        state.load_state_dict(ck["hook"])
        x, y = _dataset()
        tailq.hooks.prime_buckets(ddp, state, lambda: torch.nn.functional.cross_entropy(ddp(x[:8]), y[:8]).backward())
        _train_steps(rank, world, ddp, opt, 6, 12)
    state.close()
    return [p.detach().clone() for p in ddp.module.parameters()]


def w_powersgd_parity(rank: int, world: int) -> list[list[torch.Tensor]]:
    """One bucket: PyTorch's powerSGD_hook registered directly vs tailq.ddp_hook('powersgd') (ordered)."""
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as ps
    from torch.nn.parallel import DistributedDataParallel as DDP

    results = []
    for variant in ("pytorch", "tailq"):
        model = _model()
        ddp = DDP(model, bucket_cap_mb=100)  # one bucket: PyTorch's hook works on Gloo then
        if variant == "pytorch":
            st = ps.PowerSGDState(process_group=None, matrix_approximation_rank=2, start_powerSGD_iter=2,
                                  random_seed=7)
            ddp.register_comm_hook(st, ps.powerSGD_hook)
        else:
            st, fn = tailq.ddp_hook("powersgd", matrix_approximation_rank=2, start_powerSGD_iter=2, random_seed=7)
            ddp.register_comm_hook(st, fn)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        _train_steps(rank, world, ddp, opt, 0, 8)
        results.append([p.detach().clone() for p in model.parameters()])
    return results


def w_bf16_parity(rank: int, world: int) -> dict[str, Any]:
    """tailq's bf16 on Gloo runs PyTorch's bf16_compress_hook code; registering that hook directly is refused."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel as DDP

    g = heavy(5000, seed=rank)
    state, hook = tailq.ddp_hook("bf16")
    ours = hook(state, FakeBucket(g.clone())).wait()
    ours = ours[0] if isinstance(ours, list) else ours
    theirs = default_hooks.bf16_compress_hook(None, FakeBucket(g.clone())).wait()  # type: ignore[arg-type]
    theirs = theirs[0] if isinstance(theirs, list) else theirs
    refused = ""
    try:
        DDP(_model()).register_comm_hook(None, default_hooks.bf16_compress_hook)
    except TypeError as err:
        refused = str(err)
    exact = _mean(g).float()
    return {"equal": bool(torch.equal(ours, theirs)), "refused": refused,
            "rel_err": float((ours - exact).norm() / exact.norm())}


def w_ddp_statistics(rank: int, world: int, name: str, opts: dict[str, Any], steps: int) -> dict[str, Any]:
    """Real DDP, one bucket, the same batch every step, no optimizer step: the mean over steps of p.grad
    against the exact expectation, computed without knowing the bucket's element order (statistics and
    truncation are permutation-invariant; efsign's scale is ‖v‖₁/d of the whole bucket)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = _model()
    ddp = DDP(model, bucket_cap_mb=100)  # DDP's first iterations use one bucket; keep it one
    state, fn = tailq.ddp_hook(name, warmup_steps=0, min_bucket=0, **opts)
    ddp.register_comm_hook(state, fn)
    x, y = _dataset()
    gen = torch.Generator().manual_seed(rank)
    idx = torch.randint(0, len(x), (64,), generator=gen)
    local = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x[idx]), y[idx]), list(model.parameters()))
    flat = torch.cat([t.reshape(-1) for t in local])
    acc = torch.zeros_like(flat, dtype=torch.float64)
    acc2 = torch.zeros_like(acc)
    for _ in range(steps):
        ddp.zero_grad()
        torch.nn.functional.cross_entropy(ddp(x[idx]), y[idx]).backward()
        got = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()
        acc += got
        acc2 += got * got
    if name == "efsign":
        own = torch.where(flat >= 0, 1.0, -1.0) * flat.abs().sum() / flat.numel()
    else:
        own = state.comp.codebook(_agreed_stats(state, flat)).truncate(flat)
    mean = acc / steps
    std = (acc2 / steps - mean**2).clamp_min(0).sqrt() * (steps / (steps - 1)) ** 0.5
    state.close()
    return {"mean": mean, "std": std, "expected": _mean(own), "levels": state.metrics.last[0].get("levels")}


def w_stale(rank: int, world: int, stale: bool) -> list[float]:
    """Step 0 on g, step 1 on 10·g: stale mode must design step 1's codebook from step 0's statistics."""
    state = TailqState("tuq", bits=3, tail="laplace", warmup_steps=0, min_bucket=0, stale_stats=stale)
    g = heavy(2048, seed=rank)
    alphas = []
    for scale in (1.0, 10.0, 10.0):
        state.process(FakeBucket(g * scale))
        alphas.append(float(state.metrics.last[0]["alpha"]))
    state.close()
    return alphas


def w_redesign(rank: int, world: int, name: str, every: int) -> dict[str, Any]:
    """Gradients scaled by powers of two over 8 steps (a zero step and a NaN step among them), codebook redesigned
    every ``every`` steps: report the levels used, what a fresh design of the agreed statistics gives, the stats
    bytes per step and the outputs of the special steps."""
    state = TailqState(name, bits=3, warmup_steps=0, min_bucket=0, redesign_every=every, seed=3)
    g = heavy(4096, seed=4000 + rank)
    scales = [1.0, 2.0, 0.5, 4.0, 0.0, 8.0, 1.0, 2.0]
    out: dict[str, Any] = {"levels": [], "fresh": [], "stats_bytes": [], "results": []}
    for step, c in enumerate(scales):
        x = g * c
        if step == 6 and rank == 1:
            x[11] = float("nan")
        before = state.metrics.wire.totals.get("stats", (0, 0))[0]
        res = state.process(FakeBucket(x.clone()))
        out["stats_bytes"].append(state.metrics.wire.totals.get("stats", (0, 0))[0] - before)
        out["results"].append(res.clone())
        info = state.metrics.last.get(0, {})
        out["levels"].append(None if info.get("zero") or "levels" not in info else info["levels"].clone())
        # a fresh design from the statistics agreed exactly as the hook agrees them on a design step (float64)
        own = state.family.local_stats(torch.nan_to_num(x, nan=0.0)).double()
        dist.all_reduce(own)
        cb = state.comp.codebook(own)
        out["fresh"].append(None if cb is None else cb.levels.clone())
    plain = g * 1.0
    plain[11] = float("nan") if rank == 1 else plain[11]
    out["plain_nan_step"] = _plain_ddp(plain)
    out["fallbacks"] = state.metrics.fallbacks
    sd = state.state_dict()
    out["saved_designs"] = sorted(sd["designs"])
    state.close()
    return out


def w_bad_options(rank: int, world: int, cases: list[tuple[str, dict[str, Any]]]) -> list[str]:
    out = []
    for name, opts in cases:
        try:
            TailqState(name, **opts).close()
            out.append("no error")
        except ValueError as err:
            out.append(str(err))
    return out


def w_modes(rank: int, world: int) -> dict[str, Any]:
    """Passthrough below min_bucket (bf16, like PyTorch's hook) and the vNMSE measurement mode."""
    g = heavy(3000, seed=rank)
    small = TailqState("tnq", warmup_steps=0, min_bucket=5000)
    got_small = small.process(FakeBucket(g.clone()))
    ref = g.to(torch.bfloat16).div_(world)
    dist.all_reduce(ref)
    kinds_small = sorted({r.kind for r in small.metrics.wire.records})
    small.close()
    meas = TailqState("tnq", bits=2, warmup_steps=0, min_bucket=0, measure_every=2)
    outs = [meas.process(FakeBucket(g.clone())) for _ in range(4)]
    exact = _mean(g).float()
    manual = [float(((o.double() - exact.double()) ** 2).sum() / (exact.double() ** 2).sum()) for o in outs]
    meas.close()
    return {"passthrough_equal": bool(torch.equal(got_small, ref.float())), "kinds_small": kinds_small,
            "vnmse": meas.metrics.vnmse, "manual": manual,
            "measure_bits": meas.metrics.wire.bits_per_coord(kinds=("measure",)),
            "method_bits": meas.metrics.wire.bits_per_coord()}


def w_twophase_phases(rank: int, world: int, d: int, gather_bits: int) -> dict[str, Any]:
    """Two-phase with measure_every=1: the recorded per-phase errors against a manual reproduction of phase 1."""
    from tailq.comm.routes import shard_numel

    g = heavy(d, seed=4000 + rank)
    state = TailqState("tnq", bits=3, route="twophase", gather_bits=gather_bits, warmup_steps=0, min_bucket=0,
                       measure_every=1, seed=9)
    out = state.process(FakeBucket(g.clone()))
    # phase 1 by hand: every rank's dense codes of the zero-padded bucket on the agreed codebook, decoded, averaged
    cb = state.comp.codebook(_agreed_stats(state, g))
    m = shard_numel(d, world)
    padded = torch.nn.functional.pad(g, (0, world * m - d))
    mine = cb.decode_packed(cb.encode_packed(padded, RandKey(9, rank, 0, 0), 3), 3, world * m)[:d]
    mean1 = _mean(mine)
    exact = _mean(g)
    state.close()
    return {"rec": state.metrics.vnmse[0], "out": out,
            "phase1": float(((mean1 - exact) ** 2).sum() / (exact**2).sum()),
            "phase2": float(((out.double() - mean1) ** 2).sum() / (exact**2).sum())}


def w_twophase_wire(rank: int, world: int, name: str, d: int, opts: dict[str, Any]) -> dict[str, Any]:
    """Bytes handed to the two collectives of one two-phase bucket against the planner's cost model."""
    state = TailqState(name, route="twophase", warmup_steps=0, min_bucket=0, **opts)
    state.process(FakeBucket(heavy(d, seed=rank)))
    recs = [r for r in state.metrics.wire.records if r.kind == "payload"]
    state.close()
    return {"handed": [(r.collective, r.handed_bytes) for r in recs],
            "model": list(state.planner.phases("twophase", d))}


def w_plan(rank: int, world: int, net: str | None, warmup: int) -> dict[str, Any]:
    """route=auto on real buckets: the plan, where its network came from, and the route each bucket took."""
    from tailq.comm.network import Network

    network = Network.parse(net) if net else None
    state = TailqState("tnq", bits=3, warmup_steps=warmup, min_bucket=0, network=network)
    for _ in range(warmup + 2):
        for i, d in enumerate((20_000, 300_000)):
            state.process(FakeBucket(heavy(d, seed=rank + 10 * i), index=i, last=i == 1))
    saved = state.state_dict()
    routes = {i: state.metrics.last[i]["route"] for i in (0, 1)}
    state.close()
    again = TailqState("tnq", bits=3, warmup_steps=warmup, min_bucket=0, network=network)
    again.load_state_dict(saved)
    restored = again.planner.codec == state.planner.codec and again.network == state.network
    again.close()
    return {"plan": state.metrics.plan, "routes": routes, "restored": restored}


def w_decode_into_bucket(rank: int, world: int, d: int) -> list[tuple[str, str, bool, bool]]:
    """Each route's mean decoded into the bucket's own buffer equals the mean decoded into a fresh tensor, bit for
    bit; returns (name, route, identical, decoded in place) per case."""
    out = []
    for name, route in (("tnq", "twophase"), ("tnq", "allgather"), ("tuq", "allreduce"), ("tbq", "twophase")):
        g = heavy(d, seed=rank + 7)
        res = []
        for into in (True, False):
            state = TailqState(name, bits=3, route=route, warmup_steps=0, min_bucket=0, measure_every=0, seed=3)
            if not into:
                state._decode_target = lambda buf: None  # type: ignore[method-assign]
            buf = g.clone()
            ptr = buf.data_ptr()
            calls = []
            orig = state.compress

            def spy(*a: Any, _orig: Any = orig, _calls: list[Any] = calls, _ptr: int = ptr, **k: Any) -> torch.Tensor:
                m = _orig(*a, **k)
                _calls.append(m.data_ptr() == _ptr)
                return m

            state.compress = spy  # type: ignore[method-assign]
            state.process(FakeBucket(buf))
            state.close()
            res.append((buf, calls[0]))
        out.append((name, route, torch.equal(res[0][0], res[1][0]), res[0][1] and not res[1][1]))
    return out


def w_closed_loop(rank: int, world: int, route: str, slow_rank: int, steps: int) -> dict[str, Any]:
    """route="auto" (or a forced ``route``) planned against a 50 Mbit/s network it does not have (loopback), three
    buckets, ``steps`` steps; rank ``slow_rank`` spends 30 ms more on every compressed bucket (a busy rank). Returns
    the route of every bucket at every step, the loop's report and the probes' budget."""
    import time

    from tailq.comm.network import Network

    state = TailqState("tnq", bits=3, warmup_steps=1, min_bucket=0, network=Network.parse("model:50mbit"),
                       route=route, redesign_every=10)
    if rank == slow_rank:
        inner = state._on_route

        def slow(g: torch.Tensor, step: int, idx: int, key: str, r: str, dest: Any) -> torch.Tensor:
            if r != "passthrough":
                time.sleep(0.03)
            return inner(g, step, idx, key, r, dest)

        state._on_route = slow  # type: ignore[method-assign]
    sizes = (20_000, 60_000, 150_000)
    routes: list[list[str]] = []
    for step in range(steps):
        row = []
        for i, d in enumerate(sizes):
            state.process(FakeBucket(heavy(d, seed=rank + 10 * i + 100 * step), index=i, last=i == len(sizes) - 1))
            row.append(state.metrics.last.get(i, {}).get("route", "warm-up"))
        routes.append(row)
    out = {"routes": routes, "loop": None if state.loop is None else state.loop.report(),
           "plan_loop": state.metrics.plan.get("loop")}
    state.close()
    return out
