"""``tailq bench codec`` and ``tailq bench hook``: codec throughput per kernel path, hook time against bf16.

**codec** — encode/decode throughput of every compressor against a memory copy of the same tensor timed in the
same run (``dst.copy_(src)``, preallocated ``dst``), so the ratio (compressor elements/s ÷ copy elements/s) is
meaningful across machines. Each number is the median of ``repeat`` timed calls after one warm-up call (the
warm-up also compiles, so compile time never enters the ratio; it is reported separately). Input: Student-t
(3.5 dof) values, heavy-tailed like real gradients, so the tail fit and the design run on realistic data.

For the compressors with fused kernels (``tuq``, ``tnq``, ``tbq``, ``single-scale``) every available path is
measured (``reference`` plain torch, ``compiled`` CPU, ``triton`` GPU) with the same counter-based key, and the
encoded bytes are checked identical to the reference's. ``encode`` is the whole ``compressor.encode`` (finite
check, statistics, cached design, rounding, packing); ``decode`` is ``compressor.decode`` (a fresh float32
tensor, as the API returns). For the truncated quantizers the parts are also timed: ``stats`` (statistics
alone), ``round_pack`` (rounding + packing with the codebook known — what the hook does after agreeing the
statistics) and ``decode_into`` (decoding into a preallocated tensor, the copy's own condition).

On a GPU (``--device cuda``) times come from CUDA events and the copy is a device-to-device ``copy_``.

**hook** — ms per step of the DDP hooks on ``world`` processes over loopback Gloo (one bucket of ``numel``
values per rank), every tailq hook on every CPU path, against ``tailq.ddp_hook("bf16")``.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from tailq.codec import Aggregation, Compressor, SharesCodebook, compressor, list_compressors
from tailq.errors import UsageError
from tailq.kernels import RandKey, available_paths, compile_seconds, use

BENCH_BITS = (2, 3, 4, 8)
HOOK_CASES: list[tuple[str, dict[str, Any]]] = [
    ("tuq", {"bits": 3}),
    ("tnq", {"bits": 3}),
    ("tnq", {"bits": 3, "route": "allreduce"}),
    ("tbq", {"bits": 3}),
    ("single-scale", {"bits": 3}),
]


# ---------------------------------------------------------------------------------------------------------
# timing


def _time(fn: Callable[[], Any], repeat: int, device: torch.device) -> tuple[float, float]:
    """(median seconds of ``repeat`` calls after a warm-up call, seconds of the warm-up call)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        first = time.perf_counter() - t0
        times = []
        for _ in range(repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times), first
    t0 = time.perf_counter()
    fn()  # warm-up (compiles fast paths, fills design caches, as in steady-state training)
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), first


def _fast(cls: type[Compressor]) -> bool:
    """Shared-codebook compressors round and pack through :class:`~tailq.codec.Codebook` (the fused kernels);
    others say so by ``fast_paths``."""
    return cls.aggregation is Aggregation.SHARED_CODEBOOK or cls.fast_paths


def _configs(only: list[str] | None, bits: tuple[int, ...]) -> list[tuple[str, int | None, dict[str, Any]]]:
    out: list[tuple[str, int | None, dict[str, Any]]] = []
    for name, cls in list_compressors().items():
        if only and name not in only:
            continue
        if "bits" not in cls.options:  # a fixed code width (or none, top-k): its default options
            out.append((name, cls.fixed_bits, {}))
            continue
        opt = cls.options["bits"]
        lo = 1 if opt.low is None else opt.low
        hi = 8 if opt.high is None else opt.high
        out += [(name, b, {"bits": b}) for b in bits if lo <= b <= hi]
    return out


def _machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001 - optional
        info["triton"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


# ---------------------------------------------------------------------------------------------------------
# codec


def _row_paths(name: str, device: torch.device, paths: list[str] | None) -> list[str]:
    fast = _fast(list_compressors()[name])
    avail = available_paths(device) if fast else ["reference"]
    if device.type == "cuda":
        avail = [p for p in avail if p != "compiled"]
    return [p for p in avail if paths is None or p in paths or (p == "reference" and not fast)]


def _codec_row(
    name: str, bits: int | None, opts: dict[str, Any], path: str, x: torch.Tensor, repeat: int, copy_eps: float
) -> dict[str, Any]:
    n, dev = x.numel(), x.device
    comp = compressor(name, **opts)
    gen: Any = RandKey(0, 0, 0, 0) if comp.counter_randomness else torch.Generator(device=dev).manual_seed(1)
    before = set(compile_seconds())
    with use(path):
        t_enc, first_enc = _time(functools.partial(comp.encode, x, generator=gen), repeat, dev)
        enc = comp.encode(x, generator=gen)
        t_dec, first_dec = _time(functools.partial(comp.decode, enc), repeat, dev)
        row: dict[str, Any] = {
            "compressor": name,
            "bits": bits,
            "options": opts,
            "path": path,
            "encode_elements_per_s": n / t_enc,
            "decode_elements_per_s": n / t_dec,
            "encode_ratio_to_copy": (n / t_enc) / copy_eps,
            "decode_ratio_to_copy": (n / t_dec) / copy_eps,
            "wire_bits_per_coord": enc.bits_per_coord(),
            "first_encode_s": first_enc,
            "first_decode_s": first_dec,
        }
        if isinstance(comp, SharesCodebook) and bits is not None:
            stats = comp.local_stats(x)
            cb = comp.codebook(stats)
            assert cb is not None
            key = RandKey(0, 0, 0, 0)
            t_stats, _ = _time(functools.partial(comp.local_stats, x), repeat, dev)
            t_rp, _ = _time(functools.partial(cb.encode_packed, x, key, bits), repeat, dev)
            packed = cb.encode_packed(x, key, bits)
            out = torch.empty(n, dtype=torch.float32, device=dev)
            t_di, _ = _time(functools.partial(cb.decode_packed, packed, bits, n, out), repeat, dev)
            row.update(
                stats_elements_per_s=n / t_stats,
                round_pack_elements_per_s=n / t_rp,
                decode_into_elements_per_s=n / t_di,
                stats_ratio_to_copy=(n / t_stats) / copy_eps,
                round_pack_ratio_to_copy=(n / t_rp) / copy_eps,
                decode_into_ratio_to_copy=(n / t_di) / copy_eps,
            )
    new = {k: v for k, v in compile_seconds().items() if k not in before}
    if new:
        row["compile_seconds"] = new
    row["_enc"] = enc
    return row


def run_codec_bench(
    numel: int = 1 << 24,
    repeat: int = 3,
    json_out: str | None = None,
    only: list[str] | None = None,
    bits: tuple[int, ...] = BENCH_BITS,
    paths: list[str] | None = None,
    device: str = "cpu",
    hook: bool = False,
    hook_numel: int = 1 << 22,
    world: int = 4,
    steps: int = 5,
    threads: int | None = None,
) -> int:
    from rich.console import Console
    from rich.table import Table

    con = Console(stderr=json_out == "-", width=None if sys.stdout.isatty() else 150)
    if only:
        unknown = sorted(set(only) - set(list_compressors()))
        if unknown:
            raise UsageError(f"--compressors: unknown {unknown}; available: {sorted(list_compressors())}")
    dev = torch.device(device)
    x = torch.from_numpy(np.random.default_rng(0).standard_t(3.5, numel).astype(np.float32)).to(dev)
    dst = torch.empty_like(x)
    copies: list[float] = []

    def copy_rate() -> float:
        # the copy is timed again right before every row and each row's ratios use that adjacent copy: on shared
        # machines the memory bandwidth drifts by several times over a run (seen here: 1.0e9 to 5.9e9 elements/s)
        t_copy, _ = _time(lambda: dst.copy_(x), max(repeat, 5), dev)
        copies.append(numel / t_copy)
        return copies[-1]

    results: list[dict[str, Any]] = []
    for name, b, opts in _configs(only, bits):
        ref_enc = None
        for path in _row_paths(name, dev, paths):
            row_copy = copy_rate()
            row = _codec_row(name, b, opts, path, x, repeat, row_copy)
            row["copy_elements_per_s"] = row_copy
            enc = row.pop("_enc")
            if path == "reference":
                ref_enc = enc
            elif ref_enc is not None:
                row["identical_to_reference"] = all(
                    torch.equal(enc.tensors[k].cpu(), ref_enc.tensors[k].cpu()) for k in ref_enc.tensors
                ) and set(enc.tensors) == set(ref_enc.tensors)
            results.append(row)
            con.print(
                f"{name:>13} bits={b!s:>4} {path:>9}  encode {row['encode_elements_per_s']:.3e}/s "
                f"({row['encode_ratio_to_copy']:.3f}× copy)  decode {row['decode_elements_per_s']:.3e}/s "
                f"({row['decode_ratio_to_copy']:.3f}× copy)"
            )
    copy_eps = statistics.median(copies) if copies else copy_rate()
    report: dict[str, Any] = {
        "numel": numel,
        "repeat": repeat,
        "device": str(dev),
        "copy_elements_per_s": copy_eps,  # median of the adjacent copies; each row carries its own
        "copy_elements_per_s_range": [min(copies), max(copies)] if copies else None,
        "copy_gb_per_s": 2 * 4 * copy_eps / 1e9,
        "timing": "CUDA events" if dev.type == "cuda" else "time.perf_counter",
        "machine": _machine(),
        "compile_seconds": compile_seconds(),
        "results": results,
    }
    table = Table(title=f"codec throughput, {numel} float32 elements on {dev}; copy = {copy_eps:.3e} elements/s "
                        "(median; each row's ratios use the copy timed right before it)")
    cols = ("compressor", "bits", "path", "encode el/s", "enc/copy", "decode el/s", "dec/copy", "round+pack/copy",
            "dec into/copy", "stats/copy", "wire bits")  # fmt: skip
    for col in cols:
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(
            r["compressor"],
            str(r["bits"]),
            r["path"],
            f"{r['encode_elements_per_s']:.3e}",
            f"{r['encode_ratio_to_copy']:.3f}",
            f"{r['decode_elements_per_s']:.3e}",
            f"{r['decode_ratio_to_copy']:.3f}",
            f"{r['round_pack_ratio_to_copy']:.3f}" if "round_pack_ratio_to_copy" in r else "",
            f"{r['decode_into_ratio_to_copy']:.3f}" if "decode_into_ratio_to_copy" in r else "",
            f"{r['stats_ratio_to_copy']:.3f}" if "stats_ratio_to_copy" in r else "",
            f"{r['wire_bits_per_coord']:.3f}",
        )
    con.print(table)
    if hook:
        report["hook"] = _hook_report(world, hook_numel, steps, threads, paths, con)
    _write(report, json_out, con)
    return 0


def _write(report: dict[str, Any], json_out: str | None, con: Any) -> None:
    if json_out == "-":
        print(json.dumps(report, indent=2, default=str))
    elif json_out:
        with open(json_out, "w") as fh:
            json.dump(report, fh, indent=2, default=str)
        con.print(f"wrote {json_out}")


# ---------------------------------------------------------------------------------------------------------
# hook


def _hook_worker(
    rank: int, world: int, init: str, numel: int, steps: int, threads: int, paths: list[str], out: str
) -> None:
    import torch.distributed as dist

    import tailq
    from tailq.hooks import LocalBucket

    torch.set_num_threads(threads)
    dist.init_process_group(
        "gloo", init_method=f"file://{init}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600)
    )
    g = torch.from_numpy((np.random.default_rng(rank).standard_t(3.5, numel) * 1e-3).astype(np.float32))

    def measure(name: str, opts: dict[str, Any], path: str) -> dict[str, Any]:
        extra = {} if name == "bf16" else {"warmup_steps": 0, "min_bucket": 0}
        state, hook = tailq.ddp_hook(name, **opts, **extra)
        times = []
        with use("auto" if path == "builtin" else path):
            for _ in range(steps + 2):  # two warm-up steps (compilation, design caches)
                dist.barrier()
                t0 = time.perf_counter()
                hook(state, LocalBucket(g.clone())).wait()  # type: ignore[arg-type]
                times.append(time.perf_counter() - t0)
        row = {"hook": name, **opts, "path": path, "ms": 1e3 * statistics.median(times[2:]), "first_ms": 1e3 * times[0]}
        if name != "bf16":
            row["route"] = state.metrics.last[0]["route"]
        state.close()
        return row

    rows = []
    for name, opts in HOOK_CASES:
        for path in paths:
            # the bf16 hook is timed right before each case: on shared machines the ratio drifts with the load
            base = measure("bf16", {}, "builtin")
            row = measure(name, opts, path)
            row["bf16_ms"] = base["ms"]
            rows.append(base)
            rows.append(row)
    if rank == 0:
        with open(out, "w") as fh:
            json.dump(rows, fh)
    dist.destroy_process_group()


def _hook_report(
    world: int, numel: int, steps: int, threads: int | None, paths: list[str] | None, con: Any
) -> dict[str, Any]:
    import torch.multiprocessing as mp

    threads = threads or max(1, (os.cpu_count() or 1) // world)
    use_paths = [p for p in available_paths("cpu") if p != "triton" and (paths is None or p in paths)]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        mp.spawn(
            _hook_worker, args=(world, os.path.join(tmp, "init"), numel, steps, threads, use_paths, out), nprocs=world
        )
        with open(out) as fh:
            rows = json.load(fh)
    bf16_all = [r["ms"] for r in rows if r["hook"] == "bf16"]
    bf16 = statistics.median(bf16_all)
    rows = [r for r in rows if r["hook"] != "bf16"]
    for r in rows:
        r["x_bf16"] = r["ms"] / r["bf16_ms"]
        r["overhead_ms_vs_bf16"] = r["ms"] - r["bf16_ms"]
    con.print(
        f"hook time, N = {world} Gloo ranks on loopback, d = {numel}, {threads} thread(s) per rank; bf16 hook "
        f"{bf16:.1f} ms/step (median of {len(bf16_all)} runs, range {min(bf16_all):.1f}-{max(bf16_all):.1f})"
    )
    con.print("| hook | bits | route | path | ms/step | bf16 ms/step (adjacent) | × bf16 | overhead vs bf16 (ms) |")
    con.print("|---|---:|---|---|---:|---:|---:|---:|")
    for r in rows:
        con.print(
            f"| {r['hook']} | {r.get('bits', '—')} | {r.get('route', 'allreduce')} | {r['path']} | {r['ms']:.1f} | "
            f"{r['bf16_ms']:.1f} | {r['x_bf16']:.2f} | {r['overhead_ms_vs_bf16']:+.1f} |"
        )
    return {
        "world": world,
        "numel": numel,
        "steps": steps,
        "threads_per_rank": threads,
        "bf16_ms": bf16,
        "bf16_ms_all": bf16_all,
        "rows": rows,
    }


def run_hook_bench(
    world: int = 4,
    numel: int = 1 << 22,
    steps: int = 5,
    threads: int | None = None,
    paths: list[str] | None = None,
    json_out: str | None = None,
) -> int:
    from rich.console import Console

    con = Console(stderr=json_out == "-", width=None if sys.stdout.isatty() else 150)
    report = _hook_report(world, numel, steps, threads, paths, con)
    report["machine"] = _machine()
    _write(report, json_out, con)
    return 0
