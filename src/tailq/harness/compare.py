"""``tailq compare``: several methods on one workload and network, judged by time-to-accuracy against bf16.

SPEC §7: TTA is the training clock (evaluation excluded) at the first evaluation whose test accuracy reaches
the target, by default 99% of the bf16 run's best accuracy in the same comparison (``target_metric="loss"``: the
first whose test loss is within 1% of bf16's best test loss, for workloads where accuracy saturates before the
quantization error shows; see :func:`tailq.harness.stats.target_from`); speedup vs bf16 =
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
from tailq.options import SEED_MAX, check_float

from .config import RunConfig, is_baseline, parse_value
from .launch import RunFailed, launch_run
from .netem import EmulationError
from .stats import METRICS, crossing, median_interval, paired_ratios, target_from

__all__ = ["ComparisonIncomplete", "Method", "DEFAULT_METHODS", "FSDP_METHODS", "Y1_BITS", "Y1_METHODS", "Y1_WORKLOAD",
           "aggregate", "compare", "overlap_row", "resume", "summarize", "parse_method"]


@dataclasses.dataclass(frozen=True)
class Method:
    hook: str
    options: tuple[tuple[str, Any], ...] = ()
    diloco: tuple[tuple[str, Any], ...] = ()
    """DiLoCo's options (``sync_every``, ``fragments``, …): then ``hook`` is the outer mean's compressor."""

    @property
    def label(self) -> str:
        opts = dict(self.options)
        bits = opts.get("bits")
        loop = sorted(self.diloco, key=lambda kv: list(_DILOCO_ALIASES.values()).index(kv[0]))  # H, F, tau, ...
        extra = [f"{_SHORT.get(k, k)}={v}" for k, v in (*loop, *self.options) if k != "bits"]
        name = self.hook if bits is None else f"{self.hook}-{bits}b"
        return ("diloco-" if self.diloco else "") + name + (f"({','.join(extra)})" if extra else "")

    @property
    def baseline(self) -> bool:
        return self.hook == "bf16" and not self.options and not self.diloco

    def as_plan(self) -> list[Any]:
        """The method as compare.json keeps it: ``[hook, [[key, value], …], [[diloco key, value], …]]``."""
        return [self.hook, [list(kv) for kv in self.options], [list(kv) for kv in self.diloco]]

    @classmethod
    def from_plan(cls, m: list[Any]) -> Method:
        """The inverse of :meth:`as_plan` (plans written before DiLoCo have no third element)."""
        return cls(m[0], tuple((k, v) for k, v in m[1]), tuple((k, v) for k, v in (m[2] if len(m) > 2 else [])))


# short option names for --methods and labels: rank=2 (PowerSGD), redesign=10 (codebook design every 10th step),
# and DiLoCo's: H (sync_every), F (fragments), tau (delay), alpha (merge_alpha), olr/omom (the outer Nesterov SGD)
_ALIASES = {"rank": "matrix_approximation_rank", "redesign": "redesign_every"}
_DILOCO_ALIASES = {"H": "sync_every", "F": "fragments", "tau": "delay", "alpha": "merge_alpha", "olr": "outer_lr",
                   "omom": "outer_momentum"}
_SHORT = {v: k for k, v in {**_ALIASES, **_DILOCO_ALIASES}.items()}


def parse_method(text: str) -> Method:
    """``tnq:3`` (bits), ``tnq:3:tail=laplace,route=allgather``, ``powersgd:rank=2``, ``tnq:3:redesign=10`` or a
    plain name; ``diloco:tnq:2:H=20,F=2,tau=1`` (DiLoCo, its outer mean compressed by ``tnq:2``) or
    ``diloco:fp32:H=20``."""
    parts = text.split(":")
    diloco = parts[0] == "diloco"
    if diloco:
        parts = parts[1:]
        if not parts or not parts[0]:
            raise UsageError(f"--methods: {text!r}: DiLoCo needs the outer mean's compressor, e.g. diloco:tnq:2:H=20")
    opts: dict[str, Any] = {}
    outer: dict[str, Any] = {}
    for part in parts[1:]:
        if part.isdigit():
            opts["bits"] = int(part)
            continue
        for kv in filter(None, part.split(",")):
            if "=" not in kv:
                raise UsageError(f"--methods: cannot parse {text!r} (use NAME, NAME:BITS or NAME:BITS:key=value,...)")
            k, v = kv.split("=", 1)
            if diloco and k in _DILOCO_ALIASES:
                outer[_DILOCO_ALIASES[k]] = parse_value(v)
                continue
            k = _ALIASES.get(k, k)
            opts[k] = parse_value(v)
    if diloco and "sync_every" not in outer:
        raise UsageError(f"--methods: {text!r}: DiLoCo needs H (inner steps between syncs), e.g. diloco:tnq:2:H=20")
    return Method(parts[0], tuple(sorted(opts.items())), tuple(sorted(outer.items())))


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
# [Y1]'s comparison: QSGD and NUQSGD against the truncated quantizers at equal bits (2, 3 and 4), 8 workers. The
# truncated ones redesign every 10th step as in the default comparison; every method is pinned to a compressed
# route (two-phase for the truncated ones, what the model picks at 8 workers; the all-gather, their one compressed
# route, for QSGD and NUQSGD), because route="auto" may rightly send a bucket as bf16 — the closed loop measures,
# and on a loaded machine or a small model it passes buckets through — which would compare nothing of [Y1].
Y1_BITS = (2, 3, 4)
Y1_METHODS = [Method("bf16")] + [parse_method(f"{name}:{b}:{opt}") for b in Y1_BITS
                                 for name, opt in (("qsgd", "route=allgather"), ("nuqsgd", "route=allgather"),
                                                   ("tuq", "redesign=10:route=twophase"),
                                                   ("tnq", "redesign=10:route=twophase"),
                                                   ("tbq", "redesign=10:route=twophase"))]
Y1_WORKLOAD = ("charlm", 100, 10, "loss")
"""The y1 preset's workload, steps, evaluation period and target metric: chosen by measurement as the embedded
workload where the quantization error decides convergence (README, "A workload where error decides")."""


def _first(history: list[dict[str, Any]], target: float, metric: str) -> dict[str, Any] | None:
    """The first evaluation at the target (TTA = its clock, at evaluation granularity)."""
    key, higher = METRICS[metric]
    return next((h for h in history if h.get(key) is not None
                 and ((h[key] >= target) if higher else (h[key] <= target))), None)


def _steady_vnmse(result: dict[str, Any]) -> list[float]:
    """The run's vNMSE samples of what the method sent: without the DDP hook's warm-up steps, which go as bf16 by
    construction (``warmup_steps``, 1 by default: step 0's sample is bf16's ~1e-5 and would pull a 10-sample mean
    down by a tenth), and without NaN (an all-zero gradient)."""
    from tailq.hooks.config import HookConfig

    # FSDP's compressed reduce-scatter has no warm-up: every sample there is the method's
    config = result["config"]
    warm = 0 if config.get("fsdp") or config.get("diloco") else int(config["hook_options"].get(
        "warmup_steps", HookConfig.warmup_steps))
    return [float(v["vnmse"]) for v in result.get("vnmse", [])
            if v["vnmse"] == v["vnmse"] and not v.get("warmup") and v["step"] >= warm]


def summarize(results: list[dict[str, Any]], target_fraction: float = 0.99,
              target_metric: str = "accuracy") -> dict[str, Any]:
    """The comparison's summary (SPEC §7 metrics) from the per-run results; bf16 must be among them.

    The target is set by the bf16 run (:func:`tailq.harness.stats.target_from`): ``target_fraction`` of its best
    accuracy, or with ``target_metric="loss"`` its best test loss × (2 − ``target_fraction``).
    """
    base = next((r for r in results if is_baseline(r["config"])), None)
    if base is None:
        raise UsageError("a comparison needs the bf16 baseline among its methods (SPEC §7)")
    best_bf16 = max(h["accuracy"] for h in base["history"])
    target = target_from(base["history"], target_fraction, target_metric)
    key, higher = METRICS[target_metric]
    first_bf16 = _first(base["history"], target, target_metric)
    tta_bf16 = float(first_bf16["clock"]) if first_bf16 else None
    cross_bf16 = crossing(base["history"], target, key, higher)
    runs = []
    for r in results:
        hist = r["history"]
        first = _first(hist, target, target_metric)
        tta = float(first["clock"]) if first else None
        cross = crossing(hist, target, key, higher)
        losses = [h["test_loss"] for h in hist if h.get("test_loss") is not None]
        vn = _steady_vnmse(r)
        steps = r["steps"]
        params, n = r["parameters"], len(steps)
        tx = r["network"].get("tx_bytes_per_rank")  # a worker's own interface: only where a node is one worker
        tx_node = r["network"].get("tx_bytes_per_node", tx)  # (results from before nodes: the ranks were the nodes)

        def mean(key: str, steps: list[dict[str, Any]] = steps) -> float:
            return sum(s[key] for s in steps) / len(steps) if steps else float("nan")

        runs.append({
            "name": r["name"],
            "compressor": r["config"]["hook"],
            "bits": r["config"]["hook_options"].get("bits"),
            "options": r["config"]["hook_options"],
            "diloco": r["config"].get("diloco"),
            **diloco_row(r),
            "tta_s": tta,
            "tta_step": int(first["step"]) if first else None,
            "speedup_vs_bf16": (tta_bf16 / tta) if (tta and tta_bf16) else None,
            "tta_s_interp": cross["clock"] if cross else None,
            "tta_step_interp": cross["step"] if cross else None,
            "tta_interpolated": bool(cross and cross["interpolated"]),
            "speedup_interp_vs_bf16": (cross_bf16["clock"] / cross["clock"]) if (cross and cross_bf16) else None,
            "final_test_loss": losses[-1] if losses else None,
            "best_test_loss": min(losses) if losses else None,
            "best_accuracy": max(h["accuracy"] for h in hist),
            "final_accuracy": hist[-1]["accuracy"],
            "accuracy_gap_vs_bf16": max(h["accuracy"] for h in hist) - best_bf16,
            "vnmse": (sum(vn) / len(vn)) if vn else None,
            # per coordinate and step: a DiLoCo run's outer bits spread over the inner steps between syncs
            "wire_bits_per_coord": r.get("bits_per_param_step", r["wire"]["bits_per_coord_handed"]),
            "ring_traffic_bits_per_coord": r["wire"]["bits_per_coord_ring_traffic"],
            "nic_bits_per_coord": (8 * sum(tx) / len(tx) / (params * n)) if tx and n else None,
            # bits leaving each node's NIC (mean over nodes), measured; and the hook's own account of them
            "node_nic_bits_per_coord": (8 * sum(tx_node) / len(tx_node) / (params * n)) if tx_node and n else None,
            "node_nic_bits_per_coord_model": r["wire"].get("node_nic_bits_per_coord"),
            "train_clock_s": steps[-1]["clock"] if steps else 0.0,
            "steps": n,
            "step_s": mean("step_s"),
            "codec_s": mean("codec_s"),
            "comm_s": mean("comm_s"),
            "stopped_early": r.get("stopped_early", False),
            "extended": r.get("extended", False),
            "kernel_warmup_s": r.get("kernel_warmup_s"),
            **overlap_row(r),
        })
    net = Network.parse(results[0]["network"]["spec"])  # as the run recorded it
    recorded = results[0]["network"]  # (results from before nodes: one worker per node)
    return {
        "nodes": recorded.get("nodes", results[0]["config"].get("workers")),
        "node_size": recorded.get("node_size", 1),
        "target_metric": target_metric,
        "target": target,
        "target_accuracy": target if target_metric == "accuracy" else None,
        "target_fraction_of_bf16_best": target_fraction,
        "network": {"rate": net.describe(), "spec": net.as_arg(), "emulated": net.kind == "emulated",
                    "modeled": net.kind == "model", "rate_bps": net.rate_bps, "delay_s": net.delay_s,
                    # --net-schedule: the rate's changes (the run's own record; absent without one)
                    **{k: recorded[k] for k in ("schedule", "schedule_spec", "schedule_text") if k in recorded}},
        "runs": runs,
    }


def diloco_row(result: dict[str, Any]) -> dict[str, Any]:
    """A DiLoCo run's outer loop for the summary row: syncs, bits per synced coordinate, outer vNMSE (every sync
    measured against the exact fp32 mean), and the pseudo-gradients' tails at the last evaluation; {} otherwise."""
    d = result.get("diloco")
    if not d:
        return {}
    tails = [h["outer_tail"] for h in result.get("history", []) if h.get("outer_tail")]
    vn = [float(v["vnmse"]) for v in result.get("vnmse", []) if v.get("vnmse") == v.get("vnmse")]
    return {"outer_syncs": d.get("syncs"), "outer_skipped": d.get("skipped"),
            "outer_bits_per_synced_coord": result["wire"]["bits_per_coord_handed"],
            "outer_vnmse": (sum(vn) / len(vn)) if vn else None, "outer_tail": tails[-1] if tails else None,
            "outer_wait_s": d.get("wait_s")}


def overlap_row(result: dict[str, Any]) -> dict[str, Any]:
    """A run's overlap with backward and its DDP buckets, for the summary row (:mod:`tailq.harness.overlap`):
    medians over the steps after the warm-up, ``overlap_skipped`` saying why there are none; None for results
    written before they were measured."""
    o = result.get("overlap") or {}
    b = result.get("buckets") or {}
    return {"compute_s": o.get("compute_s"), "opt_s": o.get("opt_s"), "hook_s": o.get("hook_s"),
            "overlap_step_s": o.get("step_s"), "exposed_s": o.get("exposed_s"), "overlap": o.get("overlap"),
            "step_over_parts": o.get("step_over_parts"), "overlap_skipped": o.get("skipped"),
            "overlap_basis": o.get("basis"),
            "buckets": {k: b[k] for k in ("count", "sizes", "cap_mb") if k in b} or None}


def _one_directory(what: str, name: Any) -> None:
    """``name`` (a run id, a method's label) must be one directory name: no separators, not ``.`` or ``..``
    (``tailq compare --id`` asks more: a plain name, :func:`tailq.options.check_name`)."""
    if not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in "/\\\0"):
        raise UsageError(f"{what}: {name!r} is not one directory name (no '/' or '\\', not '.' or '..')")


PLAN = "compare.json"  # the comparison's arguments, written before the first run: what --resume continues


def compare(
    *,
    workload: str = "digits",
    workers: int = 4,
    nodes: int | None = None,
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
    resume: bool = False,
    seeds: int = 1,
    target_metric: str = "accuracy",
) -> Path:
    """Run every method, write results.json, report.md and plots; return the run directory.

    Each run's ``result.json`` is written when it ends. A method whose run fails is recorded as failed (its error
    and log tail in ``<label>/failed.json`` and in results.json) and the comparison goes on with the others;
    :class:`ComparisonIncomplete` is raised after the report is written. ``resume=True`` (``tailq compare
    --resume DIR``, see :func:`resume`) keeps every finished run whose configuration matches and reruns the rest.
    Without the bf16 baseline nothing can be judged: if it fails, the comparison stops there.

    ``seeds=K > 1``: the whole comparison K times, with seeds ``seed, seed+1, …`` (each in ``seed<S>/``, a complete
    comparison with its own bf16 target), then :func:`aggregate` over them into the top ``results.json``.

    ``target_metric``: ``"accuracy"`` (the target is ``target_fraction`` of bf16's best test accuracy) or
    ``"loss"`` (bf16's best test loss × (2 − ``target_fraction``): within 1% of it at 0.99).

    ``nodes``: K nodes of ``workers / K`` workers each sharing one link (:attr:`RunConfig.nodes`; default one worker
    per node); kept with the run options (``extra``), so ``--resume`` keeps it.
    """
    from rich.console import Console

    if not isinstance(seeds, int) or seeds < 1:
        raise UsageError(f"--seeds must be an integer >= 1; got {seeds!r}")
    if nodes is not None:  # a run option like the others in extra (the plan's "extra" keeps it for --resume)
        extra = {**(extra or {}), "nodes": nodes}
    if run_id is not None:  # one directory under out_dir, never a path that leaves it
        _one_directory("--id", run_id)
    if isinstance(seed, int) and seed + seeds - 1 > SEED_MAX:  # before the first seed runs, not after
        raise UsageError(f"--seed {seed} with --seeds {seeds} would run seeds up to {seed + seeds - 1}; seeds must be "
                         f"in 0..{SEED_MAX}")
    if seeds > 1:
        return _compare_seeds(seeds, workload=workload, workers=workers, net=net, methods=methods, steps=steps,
                              eval_every=eval_every, seed=seed, out_dir=out_dir, run_id=run_id,
                              target_fraction=target_fraction, extra=extra, notes=notes, quiet=quiet, resume=resume,
                              target_metric=target_metric)

    methods = list(methods or DEFAULT_METHODS)
    if isinstance(net, str):  # --net text from a library caller
        try:
            net = Network.parse(net)
        except ValueError as err:
            raise UsageError(str(err)) from err
    if not any(m.baseline for m in methods):
        methods.insert(0, Method("bf16"))
    # the baseline (plain bf16) first: it sets the time budget and the target
    methods.sort(key=lambda m: (not m.baseline, m.hook != "bf16", m.options != ()))
    labels = [m.label for m in methods]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise UsageError(f"--methods: {', '.join(dupes)} given more than once (each method is one run directory)")
    for label in labels:  # each method's run directory is one directory under the comparison's
        _one_directory("--methods", label)
    check_float("--target", target_fraction, 0, 1, low_open=True, error=UsageError)
    if target_metric not in METRICS:
        raise UsageError(f"--target-metric must be one of {', '.join(METRICS)}; got {target_metric!r}")
    run_id = datetime.datetime.now().strftime("%Y%m%d-%H%M%S") if run_id is None else run_id
    root = Path(out_dir) / run_id
    # every method validated (its hook built, unbound) before anything starts
    configs = [RunConfig(workload=workload, hook=m.hook, hook_options=dict(m.options), workers=workers, steps=steps,
                         eval_every=eval_every, seed=seed, net=net, run_dir=str(root / m.label), label=m.label,
                         target_metric=target_metric, diloco=dict(m.diloco) or None, **(extra or {})).validate()
               for m in methods]
    plan = {"workload": workload, "workers": workers, "net": net.as_arg(), "steps": steps, "eval_every": eval_every,
            "seed": seed, "target_fraction": target_fraction, "target_metric": target_metric, "extra": extra or {},
            "notes": list(notes or []),
            "methods": [m.as_plan() for m in methods]}
    root.mkdir(parents=True, exist_ok=True)
    if not resume:
        (root / PLAN).write_text(json.dumps(plan, indent=2))
    con = Console(quiet=quiet)
    try:
        results, failed, kept = _run_all(configs, target_fraction, target_metric, con, quiet, resume)
    except KeyboardInterrupt as err:  # SIGINT, SIGTERM, SIGHUP: the finished runs stay; say where to resume
        err.tailq_root = root  # type: ignore[attr-defined]
        raise
    if not any(is_baseline(r["config"]) for r in results):
        raise ComparisonIncomplete(root, failed, f"the bf16 baseline failed, so nothing can be judged: "
                                   f"{failed[0]['error'].splitlines()[0] if failed else ''}")
    summary = summarize(results, target_fraction, target_metric)
    summary.update({
        "id": run_id,
        "workload": workload,
        "workload_note": results[0]["workload_note"],
        "parameters": results[0]["parameters"],
        "workers": workers,
        "nodes": configs[0].n_nodes,
        "node_size": configs[0].node_size,
        "fsdp": bool((extra or {}).get("fsdp", False)),
        "steps": steps,
        "seed": seed,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": _cpus()},
        "notes": list(notes or []) + [f"{r['name']}: {n}" for r in results for n in r.get("exit_notes", [])]
        + ([f"resumed: kept the finished runs of {', '.join(kept)}"] if kept else []),
        "failed": [{k: f[k] for k in ("name", "error")} for f in failed],
        "run_dirs": {c.name: str(Path(c.run_dir)) for c in configs if any(r["name"] == c.name for r in results)},
    })
    (root / "results.json").write_text(json.dumps(summary, indent=2))
    from .report import render

    render(root)
    if failed:
        raise ComparisonIncomplete(root, failed, "")
    return root


def _compare_seeds(seeds: int, *, out_dir: str, run_id: str | None, seed: int, resume: bool, quiet: bool,
                   notes: list[str] | None, net: Network | str, methods: list[Method] | None,
                   **args: Any) -> Path:
    """K complete comparisons (``seed<S>/`` each), then their aggregate; a failed seed does not lose the others."""
    run_id = run_id if run_id is not None else datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    root = Path(out_dir) / run_id
    root.mkdir(parents=True, exist_ok=True)
    net_arg = net if isinstance(net, str) else net.as_arg()
    methods = list(methods or DEFAULT_METHODS)
    if not resume:
        plan = {**{k: args[k] for k in ("workload", "workers", "steps", "eval_every", "target_fraction",
                                        "target_metric")},
                "net": net_arg, "seed": seed, "seeds": seeds, "extra": args.get("extra") or {},
                "notes": list(notes or []), "methods": [m.as_plan() for m in methods]}
        (root / PLAN).write_text(json.dumps(plan, indent=2))
    summaries, failed = [], []
    for s in range(seed, seed + seeds):
        sub = root / f"seed{s}"
        if not quiet:
            print(f"seed {s} ({s - seed + 1} of {seeds})")
        try:
            compare(**args, net=net, methods=methods, seed=s, out_dir=str(root), run_id=sub.name, notes=notes,
                    quiet=quiet, resume=resume and (sub / PLAN).is_file())
        except ComparisonIncomplete as err:
            failed += [{**f, "name": f"{f['name']} (seed {s})"} for f in err.failed] or [
                {"name": f"seed {s}", "error": str(err)}]
        except KeyboardInterrupt as err:
            err.tailq_root = root  # type: ignore[attr-defined]
            raise
        if (sub / "results.json").is_file():
            summaries.append(json.loads((sub / "results.json").read_text()))
    if not summaries:
        raise ComparisonIncomplete(root, failed, "no seed produced a comparison")
    agg = aggregate(summaries)
    agg.update({"id": run_id, "failed": [{k: f[k] for k in ("name", "error")} for f in failed],
                "notes": list(notes or []) + [n for sm in summaries for n in sm.get("notes", [])
                                               if n not in (notes or [])]})
    (root / "results.json").write_text(json.dumps(agg, indent=2))
    from .report import render

    render(root)
    if failed:
        raise ComparisonIncomplete(root, failed, "")
    return root


_AGG_KEYS = ("tta_s_interp", "tta_s", "tta_step_interp", "best_accuracy", "final_accuracy", "final_test_loss",
             "vnmse", "wire_bits_per_coord", "nic_bits_per_coord", "node_nic_bits_per_coord", "step_s", "codec_s",
             "comm_s")


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    """inf (not reached) as None: results.json stays strict JSON."""
    return {k: (None if isinstance(v, float) and v in (float("inf"), float("-inf")) else v) for k, v in d.items()}


def aggregate(summaries: list[dict[str, Any]], level: float = 0.9) -> dict[str, Any]:
    """One row per method over the seeds' summaries (see :mod:`tailq.harness.stats`).

    Every quantity: median and the exact order-statistic interval at ``level`` (or [min, max] with its actual
    coverage when the seeds are too few). TTA is the interpolated crossing (not reached = inf, so the median can
    still be finite). Speedup vs bf16 is paired by seed: bf16's TTA / the method's in the same seed.
    ``inside_noise``: the speedup's interval contains 1; ``vs_best``: the paired ratio against the method with the
    best median speedup, ``tied_with_best`` when its interval contains 1. ``per_seed`` keeps every seed's summary.
    """
    if not summaries:
        raise ValueError("aggregate needs at least one seed's summary")
    first = summaries[0]
    seeds = [int(sm["seed"]) for sm in summaries]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"aggregate: seeds repeat: {seeds}")
    names = [r["name"] for r in first["runs"]]
    by: dict[str, dict[int, dict[str, Any]]] = {n: {} for n in names}
    for sm in summaries:
        for r in sm["runs"]:
            if r["name"] in by:
                by[r["name"]][int(sm["seed"])] = r
    base = next(r["name"] for r in first["runs"] if r["compressor"] == "bf16" and not r["options"]
                and not r.get("diloco"))

    def tta(name: str) -> dict[int, float | None]:
        return {s: r["tta_s_interp"] for s, r in by[name].items()}

    rows = []
    for name in names:
        runs = by[name]
        if set(runs) != set(by[base]):
            raise ValueError(f"aggregate: {name} ran for seeds {sorted(runs)}, bf16 for {sorted(by[base])}")
        row: dict[str, Any] = {"name": name, "compressor": runs[seeds[0]]["compressor"],
                               "bits": runs[seeds[0]]["bits"], "options": runs[seeds[0]]["options"],
                               "seeds": sorted(runs), "reached": sum(r["tta_s_interp"] is not None
                                                                     for r in runs.values())}
        for key in _AGG_KEYS:
            got = [r.get(key) for r in runs.values()]
            vals: list[float] = ([float("inf") if v is None else float(v) for v in got] if key.startswith("tta")
                                 else [float(v) for v in got if v is not None])
            row[key] = _jsonable(median_interval(vals, level)) if vals else None
        sp = paired_ratios(tta(base), tta(name))
        row["speedup_vs_bf16"] = _jsonable(median_interval(sp, level)) if sp else None
        row["speedup_per_seed"] = sp
        rows.append(row)
    for row in rows:
        sp = row["speedup_vs_bf16"]
        row["inside_noise"] = bool(sp and sp["lo"] is not None and sp["hi"] is not None
                                   and sp["lo"] <= 1.0 <= sp["hi"]) if row["name"] != base else None
    ranked = [r for r in rows if r["speedup_vs_bf16"] and r["speedup_vs_bf16"]["median"] is not None]
    best = max(ranked, key=lambda r: r["speedup_vs_bf16"]["median"])["name"] if ranked else None
    for row in rows:
        if best is None:
            continue
        ratio = paired_ratios(tta(row["name"]), tta(best))  # the best's speedup over this method, per seed
        row["vs_best"] = _jsonable(median_interval(ratio, level)) if ratio else None
        vb = row["vs_best"]
        row["tied_with_best"] = bool(vb and vb["lo"] is not None and vb["hi"] is not None and vb["lo"] <= 1.0)
    return {
        "workload": first["workload"], "workload_note": first.get("workload_note", ""),
        "parameters": first.get("parameters"), "workers": first["workers"], "fsdp": first.get("fsdp", False),
        "nodes": first.get("nodes", first["workers"]), "node_size": first.get("node_size", 1),
        "steps": first["steps"], "network": first["network"], "seeds": seeds, "level": level,
        "target_fraction_of_bf16_best": first["target_fraction_of_bf16_best"],
        "target_metric": first.get("target_metric", "accuracy"),
        "target_per_seed": {str(sm["seed"]): sm.get("target", sm.get("target_accuracy")) for sm in summaries},
        "target_accuracy_per_seed": {str(sm["seed"]): sm["target_accuracy"] for sm in summaries},
        "interval_method": "exact order statistics for the median (distribution-free; [min, max] with its actual "
                           "coverage when fewer than 5 seeds)",
        "tta": "interpolated crossing of the target between evaluations (training clock, evaluation excluded)",
        "best": best, "baseline": base,
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": first.get("machine", {}),
        "runs": rows,
        "per_seed": summaries,
    }


def _run_all(configs: list[RunConfig], target_fraction: float, target_metric: str, con: Any, quiet: bool,
             resume: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
    """Every run in order (bf16 first: its clock sets the others' budget, its evaluations their target);
    returns (results, failures, names of the runs kept from before)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    results: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    kept: list[str] = []
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

            res = _finished(cfg) if resume else None
            if res is not None:
                kept.append(cfg.name)
                bar.update(task, completed=cfg.steps, info="kept (finished before)")
            else:
                (Path(cfg.run_dir) / FAILED).unlink(missing_ok=True)
                try:
                    res = launch_run(cfg, progress=progress)
                except (RunFailed, EmulationError) as err:
                    failed.append(_record_failure(cfg, err))
                    bar.update(task, info="[red]failed[/red]")
                    if budget is None:  # the baseline: nothing can be judged without it
                        break
                    continue
            results.append(res)
            if cfg.baseline and budget is None:  # the bf16 run is the baseline
                budget = 3.0 * res["steps"][-1]["clock"]
                target = target_from(res["history"], target_fraction, target_metric)
    return results, failed, kept


FAILED = "failed.json"


class ComparisonIncomplete(RunFailed):
    """Some methods of a comparison failed; the others' results (and the report, when bf16 finished) are kept."""

    def __init__(self, root: Path, failed: list[dict[str, Any]], why: str) -> None:
        self.root, self.failed = root, failed
        names = ", ".join(f["name"] for f in failed)
        head = why or f"{len(failed)} method(s) failed: {names}; the others are in {root / 'results.json'}"
        details = "\n".join(f"--- {f['name']}: {f['error']}" for f in failed)
        super().__init__(f"{head}\nrerun what is missing with: tailq compare --resume {root}\n{details}")


def _record_failure(cfg: RunConfig, err: Exception) -> dict[str, Any]:
    """``<run_dir>/failed.json``: the method, its error and the end of every rank's log."""
    run_dir = Path(cfg.run_dir)
    logs = {p.name: p.read_text(errors="replace")[-2000:] for p in sorted(run_dir.glob("rank*.log"))}
    info = {"name": cfg.name, "error": str(err), "logs": logs,
            "date": datetime.datetime.now().isoformat(timespec="seconds")}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / FAILED).write_text(json.dumps(info, indent=1))
    return info


def _finished(cfg: RunConfig) -> dict[str, Any] | None:
    """The run's saved result if it finished with exactly this configuration (``--resume`` keeps it)."""
    path = Path(cfg.run_dir) / "result.json"
    try:
        res: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    saved = res.get("config")
    if isinstance(saved, dict):  # a key added to RunConfig since the run (e.g. nodes): it ran with the default
        saved = {**RunConfig().to_dict(), **saved}
    if saved != cfg.to_dict() or not res.get("history") or not res.get("steps"):
        return None
    return res


def resume(root: str | Path, *, quiet: bool = False) -> Path:
    """Continue the comparison in ``root`` (``tailq compare --resume DIR``): the finished runs are kept, the
    missing or failed ones rerun with the saved arguments, and the report rebuilt."""
    root = Path(root).resolve()  # "." or "..": the directory's own name is the run id
    path = root / PLAN
    try:
        plan = json.loads(path.read_text())
        if not isinstance(plan, dict):
            raise TypeError(f"expected a JSON object, got {type(plan).__name__}")
        unknown = sorted(set(plan) - _PLAN_KEYS)
        if unknown:
            raise UsageError(f"--resume: {path}: unknown key {unknown[0]!r} (a comparison plan has the keys "
                             f"{', '.join(sorted(_PLAN_KEYS))})")
        extra = plan["extra"]
        if not isinstance(extra, dict):
            raise TypeError(f"'extra' must be an object, got {extra!r}")
        unknown = sorted(set(extra) - _EXTRA_KEYS)
        if unknown:
            raise UsageError(f"--resume: {path}: unknown key 'extra.{unknown[0]}' (the run options in 'extra' are "
                             f"{', '.join(sorted(_EXTRA_KEYS))})")
        if not isinstance(plan["notes"], list) or not all(isinstance(n, str) for n in plan["notes"]):
            raise TypeError(f"'notes' must be a list of strings, got {plan['notes']!r}")
        methods = [Method.from_plan(m) for m in plan["methods"]]
        args = {k: plan[k] for k in ("workload", "workers", "net", "steps", "eval_every", "seed", "target_fraction",
                                     "extra", "notes")}
        args["seeds"] = int(plan.get("seeds", 1))
        args["target_metric"] = plan.get("target_metric", "accuracy")
    except FileNotFoundError:
        raise UsageError(f"--resume: {root} has no {PLAN} (a directory written by tailq compare)") from None
    except UsageError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UsageError(f"--resume: {path} is not a comparison plan ({type(err).__name__}: {err})") from err
    try:
        return compare(methods=methods, out_dir=str(root.parent), run_id=root.name, quiet=quiet, resume=True, **args)
    except UsageError as err:  # a value of the plan that the comparison refuses (checked before anything runs)
        raise UsageError(f"--resume: {path}: {err}") from err


# the keys of compare.json, and the run options its "extra" may carry (RunConfig's fields that compare does not set)
_PLAN_KEYS = frozenset({"workload", "workers", "net", "steps", "eval_every", "seed", "seeds", "target_fraction",
                        "target_metric", "extra", "notes", "methods"})
_EXTRA_KEYS = frozenset({f.name for f in dataclasses.fields(RunConfig)} - {
    "workload", "hook", "hook_options", "workers", "steps", "eval_every", "seed", "net", "run_dir", "label",
    "target_metric", "time_budget_s", "extend_to_target", "max_steps"})


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
