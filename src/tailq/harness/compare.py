"""``tailq compare``: several methods on one workload and network, judged by time-to-accuracy against bf16.

SPEC §7: TTA is the training clock (evaluation excluded) at the first evaluation whose test accuracy reaches
the target, by default 99% of the bf16 run's best accuracy in the same comparison; speedup vs bf16 =
TTA_bf16 / TTA_method; a method that never reaches the target has no TTA. bf16 runs first and sets the target
and the budgets: every other method gets the same step budget and, if it has not reached the target by then,
keeps training until it does, up to 3× the steps, all within 3× bf16's training clock (so a method that is
faster per step but needs more steps is judged by time, not cut off by the step count; one that cannot keep up
stops and has no TTA). ``extended`` in the summary marks the runs that needed the extra steps.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import platform
from pathlib import Path
from typing import Any

from tailq.comm.network import Network
from tailq.errors import UsageError

from .config import RunConfig, parse_value
from .launch import launch_run

__all__ = ["Method", "DEFAULT_METHODS", "FSDP_METHODS", "Y1_METHODS", "compare", "summarize", "parse_method"]


@dataclasses.dataclass(frozen=True)
class Method:
    hook: str
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        opts = dict(self.options)
        bits = opts.get("bits")
        extra = [f"{_SHORT.get(k, k)}={v}" for k, v in self.options if k != "bits"]
        name = self.hook if bits is None else f"{self.hook}-{bits}b"
        return name + (f"({','.join(extra)})" if extra else "")


# short option names for --methods and labels: rank=2 (PowerSGD), redesign=10 (codebook design every 10th step)
_ALIASES = {"rank": "matrix_approximation_rank", "redesign": "redesign_every"}
_SHORT = {v: k for k, v in _ALIASES.items()}


def parse_method(text: str) -> Method:
    """``tnq:3`` (bits), ``tnq:3:tail=laplace,route=allgather``, ``powersgd:rank=2``, ``tnq:3:redesign=10`` or a
    plain name."""
    parts = text.split(":")
    opts: dict[str, Any] = {}
    for part in parts[1:]:
        if part.isdigit():
            opts["bits"] = int(part)
            continue
        for kv in filter(None, part.split(",")):
            if "=" not in kv:
                raise UsageError(f"--methods: cannot parse {text!r} (use NAME, NAME:BITS or NAME:BITS:key=value,...)")
            k, v = kv.split("=", 1)
            k = _ALIASES.get(k, k)
            opts[k] = parse_value(v)
    return Method(parts[0], tuple(sorted(opts.items())))


# The truncated quantizers design their codebook every 10th step and rescale it in between (redesign_every: the
# design is milliseconds per bucket, tens for TBQ; see BENCHMARKS.md for the per-step design's numbers).
DEFAULT_METHODS = [Method("fp32"), Method("bf16"), Method("powersgd"), parse_method("qsgd:4"),
                   parse_method("tuq:3:redesign=10"), parse_method("tnq:3:redesign=10"),
                   parse_method("tbq:3:redesign=10")]
# --fsdp: FSDP2's own fp32 and bf16 reduce-scatters, the all-to-all bf16 reduce-scatter (Gloo's own is an
# all-reduce: the fair bf16 there), and the truncated quantizers through tailq.fsdp.compress
FSDP_METHODS = [Method("fp32"), Method("bf16"), parse_method("bf16:reduce=a2a"),
                parse_method("tuq:3:redesign=10"), parse_method("tnq:3:redesign=10"),
                parse_method("tbq:3:redesign=10")]
# [Y1]'s comparison: QSGD and NUQSGD against the truncated quantizers at equal bits, 8 workers.
Y1_METHODS = [Method("bf16"), parse_method("qsgd:3"), parse_method("nuqsgd:3"), parse_method("tuq:3"),
              parse_method("tnq:3"), parse_method("tbq:3")]


def _tta(history: list[dict[str, Any]], target: float) -> float | None:
    for h in history:
        if h["accuracy"] >= target:
            return float(h["clock"])
    return None


def _tta_step(history: list[dict[str, Any]], target: float) -> int | None:
    """The step of the first evaluation reaching the target (TTA = step time × this, at eval granularity)."""
    for h in history:
        if h["accuracy"] >= target:
            return int(h["step"])
    return None


def summarize(results: list[dict[str, Any]], target_fraction: float = 0.99) -> dict[str, Any]:
    """The comparison's summary (SPEC §7 metrics) from the per-run results; bf16 must be among them."""
    base = next((r for r in results if r["config"]["hook"] == "bf16"), None)
    if base is None:
        raise UsageError("a comparison needs the bf16 baseline among its methods (SPEC §7)")
    best_bf16 = max(h["accuracy"] for h in base["history"])
    target = target_fraction * best_bf16
    tta_bf16 = _tta(base["history"], target)
    runs = []
    for r in results:
        hist = r["history"]
        tta = _tta(hist, target)
        vn = [v["vnmse"] for v in r.get("vnmse", []) if v["vnmse"] == v["vnmse"]]
        steps = r["steps"]
        params, n = r["parameters"], len(steps)
        tx = r["network"].get("tx_bytes_per_rank")

        def mean(key: str, steps: list[dict[str, Any]] = steps) -> float:
            return sum(s[key] for s in steps) / len(steps) if steps else float("nan")

        runs.append({
            "name": r["name"],
            "compressor": r["config"]["hook"],
            "bits": r["config"]["hook_options"].get("bits"),
            "options": r["config"]["hook_options"],
            "tta_s": tta,
            "tta_step": _tta_step(hist, target),
            "speedup_vs_bf16": (tta_bf16 / tta) if (tta and tta_bf16) else None,
            "best_accuracy": max(h["accuracy"] for h in hist),
            "final_accuracy": hist[-1]["accuracy"],
            "accuracy_gap_vs_bf16": max(h["accuracy"] for h in hist) - best_bf16,
            "vnmse": (sum(vn) / len(vn)) if vn else None,
            "wire_bits_per_coord": r["wire"]["bits_per_coord_handed"],
            "ring_traffic_bits_per_coord": r["wire"]["bits_per_coord_ring_traffic"],
            "nic_bits_per_coord": (8 * sum(tx) / len(tx) / (params * n)) if tx and n else None,
            "train_clock_s": steps[-1]["clock"] if steps else 0.0,
            "steps": n,
            "step_s": mean("step_s"),
            "codec_s": mean("codec_s"),
            "comm_s": mean("comm_s"),
            "stopped_early": r.get("stopped_early", False),
            "extended": r.get("extended", False),
            "kernel_warmup_s": r.get("kernel_warmup_s"),
        })
    net = Network.parse(results[0]["network"]["spec"])  # as the run recorded it
    return {
        "target_accuracy": target,
        "target_fraction_of_bf16_best": target_fraction,
        "network": {"rate": net.describe(), "spec": net.as_arg(), "emulated": net.kind == "emulated",
                    "modeled": net.kind == "model", "rate_bps": net.rate_bps, "delay_s": net.delay_s},
        "runs": runs,
    }


def compare(
    *,
    workload: str = "digits",
    workers: int = 4,
    net: Network | str = "none",
    methods: list[Method] | None = None,
    steps: int = 300,
    eval_every: int = 25,
    seed: int = 0,
    out_dir: str = "runs",
    run_id: str | None = None,
    target_fraction: float = 0.99,
    extra: dict[str, Any] | None = None,
    notes: list[str] | None = None,
    quiet: bool = False,
) -> Path:
    """Run every method, write results.json, report.md and plots; return the run directory."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    methods = list(methods or DEFAULT_METHODS)
    if isinstance(net, str):  # --net text from a library caller
        try:
            net = Network.parse(net)
        except ValueError as err:
            raise UsageError(str(err)) from err
    if not any(m.hook == "bf16" for m in methods):
        methods.insert(0, Method("bf16"))
    # the baseline (plain bf16) first: it sets the time budget and the target
    methods.sort(key=lambda m: (m.hook != "bf16", m.options != ()))
    if not 0 < target_fraction <= 1:
        raise UsageError(f"--target must be in (0, 1]; got {target_fraction}")
    run_id = run_id or datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    root = Path(out_dir) / run_id
    configs = [RunConfig(workload=workload, hook=m.hook, hook_options=dict(m.options), workers=workers, steps=steps,
                         eval_every=eval_every, seed=seed, net=net, run_dir=str(root / m.label), label=m.label,
                         **(extra or {})).validate() for m in methods]
    con = Console(quiet=quiet)
    results = []
    budget = None
    target: float | None = None
    with Progress(TextColumn("{task.description:<22}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=con, disable=quiet) as bar:
        for cfg in configs:
            if budget is not None:
                cfg.time_budget_s = budget
                cfg.extend_to_target, cfg.max_steps = target, 3 * cfg.steps
            task = bar.add_task(cfg.name, total=cfg.steps, info="")

            def progress(step: int, total: int, info: dict[str, Any] | None, task: Any = task) -> None:
                text = "" if info is None else f"acc {info['accuracy']:.3f}, clock {info['clock']:.1f}s"
                bar.update(task, completed=step, info=text)

            res = launch_run(cfg, progress=progress)
            results.append(res)
            if cfg.hook == "bf16" and budget is None:  # the first bf16 run is the baseline
                budget = 3.0 * res["steps"][-1]["clock"]
                target = target_fraction * max(h["accuracy"] for h in res["history"])
    summary = summarize(results, target_fraction)
    summary.update({
        "id": run_id,
        "workload": workload,
        "workload_note": results[0]["workload_note"],
        "parameters": results[0]["parameters"],
        "workers": workers,
        "fsdp": bool((extra or {}).get("fsdp", False)),
        "steps": steps,
        "seed": seed,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": _cpus()},
        "notes": list(notes or []) + [f"{r['name']}: {n}" for r in results for n in r.get("exit_notes", [])],
        "run_dirs": {r["name"]: str(Path(c.run_dir)) for r, c in zip(results, configs, strict=True)},
    })
    (root / "results.json").write_text(json.dumps(summary, indent=2))
    from .report import render

    render(root)
    return root


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
