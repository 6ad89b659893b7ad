"""``tailq`` command line: one parser, a thin layer over theory, codec, tools and the harness.

Subcommands: ``list``, ``design``, ``fit``, ``demo``, ``bench codec|hook``, ``train``, ``compare``, ``report``.
Every subcommand has ``--help``, prints human output by default and JSON with ``--json``. Bad input
(:class:`~tailq.errors.UsageError`) exits with status 2 and one line naming the argument and the accepted range;
a training run that fails exits with status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from tailq.errors import UsageError
from tailq.options import (
    FLOAT32_MAX,
    FLOAT32_TINY,
    INT64_MAX,
    MAX_BUCKET_CAP_MB,
    MAX_WORKERS,
    SEED_MAX,
    check_float,
    check_int,
    check_name,
)
from tailq.tools.samples import load_samples, monte_carlo_mse

__all__ = ["main"]


def _console() -> Any:
    from rich.console import Console

    # Piped output (CI logs, files) gets a wide fixed width instead of rich's 80-column default.
    return Console(width=None if sys.stdout.isatty() else 130)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=_json_default))


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ---------------------------------------------------------------------------------------------------------
# tailq list
def cmd_list(args: argparse.Namespace) -> int:
    from tailq.codec import list_compressors

    rows: list[dict[str, Any]] = []
    for name, cls in list_compressors().items():
        rows.append(
            {
                "name": name,
                "summary": cls.summary,
                "paper": cls.paper,
                "unbiased": cls.unbiased,
                "truncating": cls.truncating,
                "error_feedback_recommended": cls.memory,
                "options": {k: o.describe() for k, o in cls.options.items()},
            }
        )
    if args.json:
        _print_json(rows)
        return 0
    from rich.table import Table

    table = Table(title="tailq compressors (the DDP hooks add fp32, fp16, bf16, powersgd)")
    for col in ("name", "what", "unbiased", "options"):
        table.add_column(col, overflow="fold")
    for r in rows:
        opts = "\n".join(f"{k}: {v}" for k, v in r["options"].items()) + "\nseed: int >= 0 (default 0)"
        unb = "yes" if r["unbiased"] else "no (use error feedback)"
        if r["truncating"]:
            unb = "for the truncated input"
        table.add_row(r["name"], f"{r['summary']}\n[dim]{r['paper']}[/dim]", unb, opts)
    _console().print(table)
    return 0


# ---------------------------------------------------------------------------------------------------------
# tailq design
def _unit_scale(x: np.ndarray) -> float:
    """The scale that samples are divided by before a fit or a design: their mean |value| (the Laplace fit), or 1
    for all zeros. Every fit and design here is scale-equivariant: done on ``x / u`` and scaled back by ``u`` (levels,
    alpha, m) or ``u²`` (MSEs), so values of any scale in float32's range give the same design as at unit scale
    (the log histogram of the empirical tail has a fixed range, ``2^-40 .. 2^16``, that tiny gradients fall below)."""
    u = float(np.mean(np.abs(x)))
    return u if u > 0 else 1.0


def _tail_from_args(args: argparse.Namespace) -> tuple[Any, np.ndarray | None, str | None, float, str, str]:
    """(tail model at unit scale, samples / u or None, fallback note or None, u, the model at the real scale as
    text, what set the scale: an argument or the samples file)."""
    from tailq import theory

    samples = load_samples(args.samples) if args.samples is not None else None
    if samples is not None:
        u = _unit_scale(samples)
        unit = samples / u
        where = f"--samples {args.samples}"
        if args.tail == "laplace":
            lap = theory.fit_laplace(unit)
            return lap, unit, None, u, repr(theory.LaplaceTail(scale=lap.scale * u)), where
        if args.tail == "powerlaw":
            fit = theory.fit_powerlaw(unit)
            if fit.gamma > 3:
                return fit.tail, unit, None, u, repr(theory.PowerLawTail(m=fit.m * u, gamma=fit.gamma)), where
            note = (
                f"fitted power law has gamma={fit.gamma:.3f} <= 3 (infinite variance): the closed "
                "forms do not apply; used the empirical design"
            )
        else:
            note = None
        emp = theory.EmpiricalTail(theory.LogHistogram.from_samples(unit))
        text = repr(emp) if u == 1.0 else f"{emp!r} of the values / {u:.6g}"
        return emp, unit, note, u, text, where
    if args.tail == "laplace":
        if args.scale is None:
            raise UsageError("--tail laplace needs --scale GAMMA (> 0) or --samples FILE")
        return theory.LaplaceTail(scale=1.0), None, None, args.scale, repr(theory.LaplaceTail(args.scale)), "--scale"
    if args.tail == "powerlaw":
        if args.gamma is None or args.m is None:
            raise UsageError("--tail powerlaw needs --gamma G (> 3) and --m M (> 0), or --samples FILE")
        if not args.gamma > 3:
            raise UsageError(
                f"--gamma must be > 3 for the power-law design (finite variance); got {args.gamma}. "
                "For heavier tails use --tail empirical --samples FILE"
            )
        text = repr(theory.PowerLawTail(m=args.m, gamma=args.gamma))
        return theory.PowerLawTail(m=1.0, gamma=args.gamma), None, None, args.m, text, "--m"
    raise UsageError("--tail empirical needs --samples FILE")


def _check_levels(levels: np.ndarray, where: str) -> None:
    """The codec computes in float32: scaled-back levels beyond its range are refused, naming what set the scale."""
    top = float(np.max(np.abs(levels)))
    if not top <= FLOAT32_MAX:
        raise UsageError(f"{where}: the design's levels reach {top:.6g}, beyond float32's range (+-{FLOAT32_MAX:.6g}) "
                         "that the codec computes in; use a smaller scale")


def cmd_design(args: argparse.Namespace) -> int:
    from tailq import theory

    if not 1 <= args.bits <= 8:
        raise UsageError(f"--bits must be in 1..8; got {args.bits}")
    try:
        tail, samples, note, u, model, where = _tail_from_args(args)
    except UsageError:
        raise
    except ValueError as err:  # the tail model refused the given parameters or samples: its message names them
        raise UsageError(f"--tail {args.tail}: {err}") from err
    try:  # at unit scale; scaled back by u below (every design here is scale-equivariant)
        des = theory.design(args.scheme, tail, args.bits, refine=args.refine)
    except theory.HeavyTailError as err:
        raise UsageError(str(err)) from err
    levels = des.levels * u
    _check_levels(levels, where)
    rng = np.random.default_rng(args.seed)
    mc = tail.sample(args.mc_samples, rng) if samples is None else samples
    measured = monte_carlo_mse(des.levels, mc, seed=args.seed) * u * u
    notes = list(des.notes) + ([note] if note else [])
    if u != 1.0:
        notes.append(f"designed at unit scale (values / {u:.6g}), then scaled back: levels and alpha x {u:.6g}, "
                     f"MSEs x {u:.6g}^2 (numbers in the notes above are at unit scale)")
    out = {
        "scheme": args.scheme,
        "tail": args.tail,
        "bits": args.bits,
        "alpha": float(des.alpha) * u,
        "levels": [float(v) for v in levels],
        "predicted_mse": float(des.predicted_mse) * u * u,
        "measured_mse": measured,
        "exact_mse": float(theory.exact_mse(des.levels, tail)) * u * u,
        "measured_on": "the samples file" if samples is not None else f"{len(mc)} draws from the model",
        "model": model,
        "method": des.method,
        "notes": notes,
    }
    if args.json:
        _print_json(out)
        return 0
    con = _console()
    con.print(
        f"[bold]{args.scheme.upper()}[/bold] design, {args.bits} bits, tail {out['model']} ({des.method})"
    )
    con.print(f"  alpha*          {out['alpha']:.6g}")
    con.print(f"  predicted MSE   {out['predicted_mse']:.6g}   (design proxy, SPEC §2)")
    con.print(f"  exact MSE       {out['exact_mse']:.6g}   (model integral, real rounding variance)")
    con.print(f"  measured MSE    {out['measured_mse']:.6g}   ({out['measured_on']})")
    lv = ", ".join(f"{v:.5g}" for v in out["levels"])
    con.print(f"  levels ({len(out['levels'])}): {lv}")
    for n in out["notes"]:
        con.print(f"  [yellow]note:[/yellow] {n}")
    return 0


# ---------------------------------------------------------------------------------------------------------
# tailq fit
FIT_MIN_VALUES = 50
def cmd_fit(args: argparse.Namespace) -> int:
    from scipy import stats as sstats

    from tailq import theory

    x = load_samples(args.file)
    nonzero = int(np.count_nonzero(x))
    if nonzero < FIT_MIN_VALUES:
        raise UsageError(f"{args.file}: {nonzero} non-zero values; a tail fit needs at least {FIT_MIN_VALUES} "
                         "(the power-law fit's minimum tail)")
    mags = np.abs(x[x != 0])
    if mags.min() == mags.max():
        raise UsageError(f"{args.file}: every non-zero value has the same magnitude ({mags[0]:g}); there is no "
                         "tail to fit")
    # fitted and designed at unit scale (x / u, u = mean |x|), then scaled back: tiny or large gradients get the
    # design of their shape (the empirical tail's log histogram has a fixed range)
    u = _unit_scale(x)
    unit = x / u
    lap_u = theory.fit_laplace(unit)
    try:
        pl_u = theory.fit_powerlaw(unit)
    except ValueError as err:  # too few distinct tail values: say so, fit and design the rest
        raise UsageError(f"{args.file}: the power-law fit is impossible on these values ({err})") from err
    lap = theory.LaplaceTail(scale=lap_u.scale * u)
    out: dict[str, Any] = {
        "file": args.file,
        "n": int(x.size),
        "mean_abs": float(np.mean(np.abs(x))),
        "std": float(np.std(x)),
        "max_abs": float(np.max(np.abs(x))),
        "excess_kurtosis": float(sstats.kurtosis(unit)),
        "laplace": {"scale": float(lap.scale)},
        "powerlaw": {
            "m": float(pl_u.m) * u,
            "gamma": float(pl_u.gamma),
            "ks": float(pl_u.ks),
            "n_tail": int(pl_u.n_tail),
        },
        "designs": [],
    }
    hist_tail = theory.EmpiricalTail(theory.LogHistogram.from_samples(unit))
    tails: list[tuple[str, Any]] = [("laplace", lap_u), ("empirical", hist_tail)]
    if pl_u.gamma > 3:
        tails.insert(1, ("powerlaw", pl_u.tail))
    else:
        out["powerlaw"]["note"] = "gamma <= 3: infinite variance, the power-law closed forms do not apply"
    for tname, tail in tails:
        for scheme in ("tuq", "tnq"):
            des = theory.design(scheme, tail, args.bits)
            _check_levels(des.levels * u, args.file)
            out["designs"].append(
                {
                    "scheme": scheme,
                    "tail": tname,
                    "bits": args.bits,
                    "alpha": float(des.alpha) * u,
                    "predicted_mse": float(des.predicted_mse) * u * u,
                    "measured_mse": monte_carlo_mse(des.levels, unit) * u * u,
                }
            )
    if args.json:
        _print_json(out)
        return 0
    from rich.table import Table

    con = _console()
    con.print(
        f"[bold]{args.file}[/bold]: n={out['n']}, mean|g|={out['mean_abs']:.4g}, std={out['std']:.4g}, "
        f"max|g|={out['max_abs']:.4g}, excess kurtosis={out['excess_kurtosis']:.3g}"
    )
    pl = out["powerlaw"]
    con.print(f"  Laplace fit: scale={lap.scale:.4g}")
    con.print(
        f"  power-law fit (CSN): m={pl['m']:.4g}, gamma={pl['gamma']:.4g}, KS={pl['ks']:.4g}, tail n={pl['n_tail']}"
    )
    if "note" in out["powerlaw"]:
        con.print(f"  [yellow]note:[/yellow] {out['powerlaw']['note']}")
    table = Table(title=f"designs at {args.bits} bits, MSE measured on these values")
    for col in ("scheme", "tail", "alpha*", "predicted MSE", "measured MSE"):
        table.add_column(col)
    for d in out["designs"]:
        table.add_row(
            d["scheme"],
            d["tail"],
            f"{d['alpha']:.4g}",
            f"{d['predicted_mse']:.4g}",
            f"{d['measured_mse']:.4g}",
        )
    con.print(table)
    return 0


# ---------------------------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    from tailq.tools.demo import run_demo

    return run_demo(json_path=args.json, n=args.n, seed=args.seed)


# ---------------------------------------------------------------------------------------------------------
# tailq bench
def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from tailq.tools import bench

    # --numel, --repeat, --bits, --world, --steps, --threads, --workers, --sizes: checked by main (the option table)
    if args.device not in ("cpu", "cuda") or (args.device == "cuda" and not torch.cuda.is_available()):
        raise UsageError(f"--device must be cpu or cuda (with a GPU present); got {args.device!r}")
    if args.what == "scale":
        from tailq.comm.network import Network
        from tailq.harness.netem import emulation_available, unavailable_message
        from tailq.tools.scale import parse_grid, run_scale_bench

        try:
            grid = [parse_grid(g) for g in args.grid] if args.grid is not None else None
        except ValueError as err:
            raise UsageError(str(err)) from err
        # --grid alone measures its cases only; --workers alone (or neither: the default counts) N x 1 each
        workers = args.workers if args.workers is not None or grid is not None else SCALE_WORKERS
        try:
            _check_scale_compressor(args.compressor, args.code_bits, Network.parse(args.net))
        except ValueError as err:
            raise UsageError(str(err)) from err
        net = _network(args.net, [])
        ok, why = emulation_available(net) if net.kind == "emulated" else (False, "")
        if not ok:
            raise UsageError("bench scale measures NIC bytes on an emulated network (--net RATE[,DELAY]); "
                             + (unavailable_message(net, why) if net.kind == "emulated" else f"got {args.net!r}"))
        try:
            modeled_grid = [parse_grid(g, modeled=True) for g in args.modeled_grid]
        except ValueError as err:
            raise UsageError(str(err)) from err
        return run_scale_bench(net, workers, args.sizes, name=args.compressor, bits=args.code_bits, grid=grid,
                               steps=args.steps, modeled=args.modeled, modeled_grid=modeled_grid,
                               json_out=None if args.json == "-" else args.json)
    if args.what == "hook":
        return bench.run_hook_bench(world=args.world, numel=args.numel or 1 << 22, steps=args.steps,
                                    threads=args.threads, paths=args.paths, json_out=args.json)
    return bench.run_codec_bench(numel=args.numel or 1 << 24, repeat=args.repeat, json_out=args.json,
                                 only=args.compressors, bits=tuple(args.bits), paths=args.paths, device=args.device,
                                 hook=args.hook, hook_numel=args.hook_numel, world=args.world, steps=args.steps,
                                 threads=args.threads)


def _check_scale_compressor(name: str, bits: int, net: Any) -> None:
    """bench scale's compressor on every route it measures, built unbound before any worker starts (a shared-codebook
    compressor that takes bits): its own message names the option and the accepted values."""
    from tailq.codec import compressor
    from tailq.comm.families import family_for
    from tailq.hooks import ddp_hook
    from tailq.tools.scale import HIER_ROUTES, ROUTES

    try:
        family_for(compressor(name, bits=bits), fine_bits=2, keep_own=False)
        for route in ROUTES + HIER_ROUTES:
            state, _ = ddp_hook(name, bits=bits, route=route, warmup_steps=0, min_bucket=0, network=net)
            close = getattr(state, "close", None)
            if close is not None:
                close()
    except (TypeError, ValueError) as err:
        raise UsageError(f"--compressor {name} --code-bits {bits}: {' '.join(str(err).split())}") from err


SCALE_WORKERS = [2, 4, 8, 16]  # bench scale's worker counts when neither --workers nor --grid is given


# ---------------------------------------------------------------------------------------------------------
# tailq train | compare | report (the harness)
DEFAULT_NET = "50mbit"


def _network(text: str, notes: list[str]) -> Any:
    """``--net`` parsed once. The default network is emulated; where emulation is impossible say so and model it;
    an emulated network asked for explicitly must be possible."""
    from tailq.comm.network import Network
    from tailq.harness.netem import emulation_available, unavailable_message

    try:
        net = Network.parse(text)
    except ValueError as err:
        raise UsageError(str(err)) from err
    if net.kind != "emulated":
        return net
    ok, why = emulation_available(net)
    if ok:
        return net
    if text != DEFAULT_NET:
        raise UsageError(unavailable_message(net, why))
    notes.append(f"network emulation unavailable ({why}): the default network is MODELED (model:{text})")
    return Network("model", net.rate_bps, net.delay_s)


def _require_harness_extras() -> None:
    missing = [m for m in ("sklearn", "matplotlib") if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"the harness needs {', '.join(missing)}: pip install 'tailq[harness]' "
                         "(scikit-learn for the embedded digits data, matplotlib for the plots)")


def _extra(args: argparse.Namespace) -> dict[str, Any]:
    return {"lr": args.lr, "batch_size": args.batch_size, "data_dir": args.data_dir, "tail_df": args.tail_df,
            "bucket_cap_mb": args.bucket_cap_mb, "measure_every": args.measure_every, "fsdp": args.fsdp,
            "nodes": args.nodes, "net_schedule": args.net_schedule}


def cmd_train(args: argparse.Namespace) -> int:
    from rich.console import Console

    from tailq.harness.config import RunConfig, parse_value
    from tailq.harness.launch import launch_run
    from tailq.harness.workloads import DEFAULT_STEPS, check_data

    _require_harness_extras()
    opts: dict[str, Any] = {}
    if args.bits is not None:
        opts["bits"] = args.bits
    for kv in args.option:
        if "=" not in kv:
            raise UsageError(f"--option must be KEY=VALUE; got {kv!r}")
        k, v = kv.split("=", 1)
        opts[k] = parse_value(v)
    diloco = None
    if args.diloco is not None:  # the same keys as a --methods entry's: H=20,F=2,tau=1,alpha=0.5,olr=0.7,omom=0.9
        from tailq.harness.compare import parse_method

        diloco = dict(parse_method(f"diloco:{args.compressor}:{args.diloco}").diloco)
    notes: list[str] = []
    net = _network(args.net, notes)
    workload = "digits" if args.workload is None else args.workload
    steps, every = DEFAULT_STEPS.get(workload, (300, 25))
    cfg = RunConfig(workload=workload, hook=args.compressor, hook_options=opts, workers=args.workers, diloco=diloco,
                    steps=steps if args.steps is None else args.steps,
                    eval_every=every if args.eval_every is None else args.eval_every, seed=args.seed,
                    net=net, run_dir=f"runs/train-{args.compressor}" if args.run_dir is None else args.run_dir,
                    checkpoint_every=args.checkpoint_every, **_extra(args)).validate()
    check_data(cfg.workload, cfg.data_dir)
    con = Console()
    for n in notes:
        con.print(f"[yellow]note:[/yellow] {n}")
    res = launch_run(cfg, progress=lambda s, t, i: None)
    h = res["history"][-1]
    con.print(f"{cfg.name}: {res['steps_done']} steps, training clock {res['steps'][-1]['clock']:.1f} s "
              f"({res['network']['describe']}), final accuracy {h['accuracy']:.4f}, "
              f"{res['wire']['bits_per_coord_handed']:.2f} bits/coord; results in {cfg.run_dir}/result.json")
    from tailq.harness.report import buckets_text, overlap_text

    for line in (f"DDP buckets: {buckets_text(res.get('buckets'))}" if buckets_text(res.get("buckets")) else None,
                 overlap_text(res.get("overlap"))):
        if line:
            con.print(line, highlight=False, soft_wrap=True)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from tailq.harness.compare import (
        DEFAULT_METHODS,
        FSDP_METHODS,
        Y1_METHODS,
        Y1_WORKLOAD,
        ComparisonIncomplete,
        compare,
        resume,
    )
    from tailq.harness.report import print_table
    from tailq.harness.workloads import DEFAULT_STEPS, check_data

    _require_harness_extras()
    def run(fn: Any) -> Path:
        try:
            return Path(fn())
        except ComparisonIncomplete as err:  # the table of what finished, then the failures (exit 1)
            if (err.root / "results.json").is_file():
                print_table(json.loads((err.root / "results.json").read_text()))
            raise

    if args.resume is not None:
        return _compare_done(run(lambda: resume(args.resume)), [], args.json)
    notes: list[str] = []
    workload, workers = args.workload, args.workers
    methods = [_method(m) for m in args.methods] if args.methods else list(
        FSDP_METHODS if args.fsdp else DEFAULT_METHODS)
    steps, every = DEFAULT_STEPS.get("digits" if workload is None else workload, (300, 25))
    metric = args.target_metric or "accuracy"
    if args.preset == "y1":
        workers = 8 if args.workers == 4 else args.workers
        methods = [_method(m) for m in args.methods] if args.methods else list(Y1_METHODS)
        if workload is None:
            workload, steps, every, metric = Y1_WORKLOAD
            metric = args.target_metric or metric
        else:
            steps, every = DEFAULT_STEPS.get(workload, (300, 25))
    workload = "digits" if workload is None else workload
    check_data(workload, args.data_dir)
    net = _network(args.net, notes)
    root = run(lambda: compare(workload=workload, workers=workers, net=net, methods=methods,
                               steps=steps if args.steps is None else args.steps,
                               eval_every=every if args.eval_every is None else args.eval_every, seed=args.seed,
                               out_dir=args.out, run_id=args.id, target_fraction=args.target, extra=_extra(args),
                               notes=notes, seeds=args.seeds, target_metric=metric))
    return _compare_done(root, notes, args.json)


def _method(text: str) -> Any:
    """One ``--methods`` entry, its compressor named by ``tailq list`` (or fp32, fp16, bf16, powersgd)."""
    from tailq.harness.compare import parse_method
    from tailq.hooks import hook_names

    method = parse_method(text)
    if method.hook not in hook_names():
        raise UsageError(f"--methods: {text!r}: the method must be one of {', '.join(hook_names())}; "
                         f"got {method.hook!r}")
    return method


def _compare_done(root: Path, notes: list[str], json_path: str | None) -> int:
    from tailq.harness.report import print_table

    summary = json.loads((root / "results.json").read_text())
    print_table(summary)
    for n in notes:
        print(f"note: {n}")
    print(f"report: {root / 'report.md'}")
    if json_path:
        Path(json_path).write_text(json.dumps(summary, indent=2))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from tailq.harness.report import print_table, render

    root = Path(args.dir)
    if not (root / "results.json").is_file():
        raise UsageError(f"{root} has no results.json (is it a directory written by tailq compare?)")
    bad = (f"{root / 'results.json'} is not a tailq comparison summary; rebuild it with tailq compare --resume "
           f"{root}")
    try:
        summary = json.loads((root / "results.json").read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise UsageError(f"{bad} (not JSON: {err})") from err
    need = ("runs", "network", "workload", "workers", "steps")
    if not isinstance(summary, dict) or not isinstance(summary.get("runs"), list) or any(k not in summary
                                                                                          for k in need):
        raise UsageError(f"{bad} (it needs the keys {', '.join(need)})")
    try:
        path = render(root)
        print_table(summary)
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise UsageError(f"{bad} (a field is missing or malformed: {type(err).__name__}: {err})") from err
    print(f"report: {path}")
    return 0


# ---------------------------------------------------------------------------------------------------------
# the command line: every bad input is one line naming the argument and the accepted values, exit 2, checked
# before anything starts
class _ArgumentError(Exception):
    """argparse's own complaint (an unknown option, ``--bits abc``, a choice not offered), as one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        text = " ".join(message.split())
        raise _ArgumentError(f"{self.prog}: error: {text} (usage: {self.prog} --help)")


@dataclasses.dataclass(frozen=True)
class _Check:
    """The accepted values of one option: a number in a range (NaN and infinities never), a non-empty path, or
    a plain name that becomes one path component."""

    flag: str
    dest: str
    kind: type  # int, float, or str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    note: str = ""
    name: bool = False  # str: a plain name (check_name), not only non-empty
    output: str = ""  # str: "dir" (a directory the command creates or writes in) or "file" (written at the end)

    def check(self, value: Any) -> None:
        if isinstance(value, list) and not value:
            raise UsageError(f"{self.flag} needs at least one value")
        for v in value if isinstance(value, list) else [value]:
            if v is None:
                continue
            if self.kind is int:
                low = int(self.low if self.low is not None else -INT64_MAX)
                accepted = f"{low}..{int(self.high)}" if self.high is not None else ""
                try:
                    check_int(self.flag, v, low, error=UsageError)
                except UsageError as err:
                    raise UsageError(f"{err} (accepted: {accepted})" if accepted and self.high != INT64_MAX
                                     else str(err)) from None
                if self.high is not None and v > self.high:
                    raise UsageError(f"{self.flag} must be in {accepted}{self.note}; got {v}")
            elif self.kind is float:
                check_float(self.flag, v, self.low, self.high, low_open=self.low_open, note=self.note,
                            error=UsageError)
            elif self.name:
                check_name(self.flag, v, error=UsageError)
            elif not v.strip():
                raise UsageError(f"{self.flag} must be a path; got {v!r}")
            elif self.output and not (self.output == "file" and v == "-"):
                _check_output(self.flag, v, self.output == "dir")


def _check_output(flag: str, path: str, directory: bool) -> None:
    """Where a command will write can be written, checked without creating anything: a file's directory exists (it
    is written at the end, after the work), a directory is one or can be made under the nearest existing one."""
    p = Path(path)
    if directory:
        if p.exists() and not p.is_dir():
            raise UsageError(f"{flag} {path}: exists and is not a directory")
        near = p
        while not near.exists() and near != near.parent:
            near = near.parent
        if not near.is_dir() or not os.access(near, os.W_OK | os.X_OK):
            raise UsageError(f"{flag} {path}: cannot create it under {near} (not a writable directory)")
        return
    if p.is_dir():
        raise UsageError(f"{flag} {path}: is a directory; give a file path")
    parent = p.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: {parent} is not a writable directory (it is not created)")


def _arg(s: argparse.ArgumentParser, flag: str, kind: type = str, low: float | None = None,
         high: float | None = None, *, low_open: bool = False, note: str = "", name: bool = False,
         output: str = "", **kw: Any) -> None:
    """``add_argument`` with the option's accepted values, checked by :func:`main` before the command runs."""
    action = s.add_argument(flag, type=kind, **kw) if kind is not str else s.add_argument(flag, **kw)
    checks = s.get_default("_checks")
    if checks is None:
        checks = []
        s.set_defaults(_checks=checks)
    shown = flag if flag.startswith("-") else kw.get("metavar", flag.upper())
    checks.append(_Check(shown, action.dest, kind, low, high, low_open, note, name, output))


F32 = " (float32's normal range: the codec computes in float32)"
MAX_NUMEL = 2**31 - 1  # elements of one benchmarked tensor: int32 indexing, 8 GiB of float32


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tailq", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("list", help="compressors and their options")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_list)

    s = sub.add_parser("design", help="optimal truncated quantizer for a tail model (alpha*, levels, MSE)")
    s.add_argument("--scheme", required=True, choices=("tuq", "tnq", "tbq"))
    s.add_argument("--tail", required=True, choices=("laplace", "powerlaw", "empirical"))
    _arg(s, "--bits", int, 1, 8, required=True, help="bits per coordinate, 1..8")
    _arg(s, "--scale", float, FLOAT32_TINY, FLOAT32_MAX, note=F32, help="Laplace scale gamma (mean |g|)")
    _arg(s, "--gamma", float, help="power-law exponent (> 3)")
    _arg(s, "--m", float, FLOAT32_TINY, FLOAT32_MAX, note=F32, help="power-law body width m (> 0)")
    _arg(s, "--samples", help="a .npy or .pt file of gradient values to fit (and measure on)")
    s.add_argument("--refine", action="store_true", help="empirical: refine levels on the exact variance")
    _arg(s, "--mc-samples", int, 1, 10**8, default=1_000_000, help="Monte-Carlo draws from the model (at most 1e8)")
    _arg(s, "--seed", int, 0, SEED_MAX, default=0)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_design)

    s = sub.add_parser("fit", help="tail fit (Laplace, power law) of saved gradient values")
    _arg(s, "file", metavar="FILE", help=".npy or .pt file (loaded without pickle)")
    s.add_argument("--bits", type=int, default=3, choices=range(1, 9), metavar="1..8")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_fit)

    s = sub.add_parser("demo", help="the first main job: every compressor at 2, 3, 4 bits on heavy tails")
    _arg(s, "--n", int, 1, 10**8, default=1 << 18, help="samples per distribution")
    _arg(s, "--seed", int, 0, SEED_MAX, default=0)
    _arg(s, "--json", output="file", metavar="PATH", help="also write the table as JSON")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("bench", help="micro-benchmarks: codec throughput per kernel path, hook time vs bf16")
    s.add_argument("what", choices=("codec", "hook", "scale"),
                   help="codec: encode/decode vs a copy; hook: ms/step vs bf16; scale: every route at N workers on "
                        "an emulated network (NIC bits, ms/step vs bf16, vNMSE) beside the cost model")
    _arg(s, "--numel", int, 1, MAX_NUMEL, default=None, help="elements (default 2^24 for codec, 2^22 for hook)")
    _arg(s, "--repeat", int, 1, INT64_MAX, default=3, help="timed calls (codec) after one warm-up")
    _arg(s, "--compressors", nargs="+", help="only these compressors")
    _arg(s, "--bits", int, 1, 8, nargs="*", default=[2, 3, 4, 8], help="bit widths (default 2 3 4 8)")
    _arg(s, "--paths", nargs="+", choices=("reference", "compiled", "triton"),
                   help="kernel paths (default: every one available on the device)")  # fmt: skip
    s.add_argument("--device", default="cpu", help="cpu or cuda (codec)")
    s.add_argument("--hook", action="store_true", help="codec: also run the hook benchmark and include it")
    _arg(s, "--hook-numel", int, 1, MAX_NUMEL, default=1 << 22, help="elements per rank for --hook (2^22)")
    _arg(s, "--world", int, 1, 64, default=4, help="hook: number of Gloo ranks (1..64)")
    _arg(s, "--steps", int, 1, INT64_MAX, default=5, help="hook: timed steps after two warm-up steps")
    _arg(s, "--threads", int, 1, 1024, default=None, help="hook: torch threads per rank (default cores/world)")
    s.add_argument("--net", default="100mbit", help="scale: the emulated network (RATE[,DELAY], default 100mbit)")
    _arg(s, "--workers", int, 2, 64, nargs="*", default=None,
         help="scale: worker counts measured, one worker per node (default 2 4 8 16 unless --grid is given)")
    s.add_argument("--grid", nargs="+", metavar="KxL",  # checked by tailq.tools.scale.parse_grid
                   help="scale: K nodes x L workers each, e.g. 2x2 2x4 4x2 (2 <= K*L <= 64): the L workers of a "
                        "node share its emulated link (NIC bits per node) and talk over loopback; with --workers, "
                        "both sets are measured")
    _arg(s, "--sizes", int, 1, MAX_NUMEL, nargs="*", default=[1 << 20, 1 << 22], help="scale: bucket lengths")
    _arg(s, "--modeled", int, 2, 2**20, nargs="*", default=[64, 256, 1024],
         help="scale: worker counts modeled, one worker per node")
    s.add_argument("--modeled-grid", nargs="*", metavar="KxL", default=["2x4", "4x8", "16x8", "128x8"],
                   help="scale: K nodes x L workers modeled (two-link cost model; default 2x4 4x8 16x8 128x8)")
    s.add_argument("--compressor", default="tnq", help="scale: a shared-codebook compressor (default tnq)")
    _arg(s, "--code-bits", int, 1, 8, default=3, help="scale: its bits (default 3)")
    _arg(s, "--json", output="file", nargs="?", const="-", metavar="PATH", help="JSON to PATH (or stdout)")
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("train", help="one training run (a compressor, N workers, a workload, a network)")
    _harness_common(s)
    s.add_argument("--compressor", default="tnq", help="any hook name (tailq list, or fp32/fp16/bf16/powersgd)")
    s.add_argument("--bits", type=int, help="bits per coordinate (compressors that take bits)")
    s.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="more hook options")
    _arg(s, "--run-dir", output="dir", help="where to write (default runs/train-<compressor>)")
    _arg(s, "--checkpoint-every", int, 0, INT64_MAX, default=0, help="steps between checkpoints (0 = none)")
    s.add_argument("--diloco", metavar="H=20[,F=..,tau=..,alpha=..,olr=..,omom=..]",
                   help="DiLoCo instead of a per-step hook: --compressor is the outer mean's (tailq.DiLoCo); H inner "
                        "steps between syncs, F fragments, tau delayed merge, alpha merge share, olr/omom the outer "
                        "Nesterov SGD (default 0.7/0.9)")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("compare", help="the main job: methods on one workload and network, TTA vs bf16, report")
    _harness_common(s)
    s.add_argument("--methods", nargs="+", help="e.g. bf16 tnq:3 qsgd:4 tnq:3:tail=laplace powersgd:rank=2 "
                   "diloco:tnq:2:H=20 diloco:fp32:H=20,F=2,tau=1 "
                   "(default: fp32 bf16 powersgd qsgd:4 tuq:3:redesign=10 tnq:3:redesign=10 tbq:3:redesign=10)")
    s.add_argument("--preset", choices=("default", "y1"), default="default",
                   help="y1: [Y1]'s comparison, QSGD/NUQSGD vs TUQ/TNQ/TBQ at 2, 3 and 4 bits, 8 workers, on "
                   "the workload where error decides convergence (charlm, 100 steps, test-loss target, unless "
                   "--workload is given)")
    _arg(s, "--target", float, 0, 1, low_open=True, default=0.99, help="target = this fraction of bf16's best accuracy "
                   "(--target-metric loss: bf16's best test loss x (2 - this), within 1%% of it at 0.99)")
    s.add_argument("--target-metric", choices=("accuracy", "loss"),
                   help="what the target is on: test accuracy (the default) or test loss (the y1 preset's)")
    _arg(s, "--seeds", int, 1, INT64_MAX, default=1,
                   help="run the whole comparison with K seeds (--seed, --seed+1, ...): medians, exact "
                        "order-statistic intervals and speedups paired by seed (default 1)")
    _arg(s, "--out", output="dir", default="runs", help="parent directory of the run directory")
    _arg(s, "--id", name=True, help="run directory name: letters, digits, -_. (default: a timestamp)")
    _arg(s, "--json", output="file", metavar="PATH", help="also write the summary JSON here")
    _arg(s, "--resume", metavar="DIR", help="continue the comparison in DIR: keep its finished runs, rerun "
                   "the missing or failed ones with its saved arguments, rebuild the report (other options ignored)")
    s.set_defaults(func=cmd_compare)

    s = sub.add_parser("report", help="re-render report.md and plots of a comparison directory")
    _arg(s, "dir", metavar="DIR")
    s.set_defaults(func=cmd_report)
    return p


def _harness_common(s: argparse.ArgumentParser) -> None:
    s.add_argument("--workload", help="digits (the default) | charlm | synthetic | mnist | cifar10")
    _arg(s, "--workers", int, 1, MAX_WORKERS, default=4, help=f"worker processes, 1..{MAX_WORKERS}")
    _arg(s, "--nodes", int, 1, MAX_WORKERS, metavar="K",
         help="K nodes of workers/K workers each (a divisor of --workers): a node's workers share one network link "
              "(emulated: one namespace and one shaped NIC per node; they talk over loopback) and get torchrun's "
              "LOCAL_RANK/LOCAL_WORLD_SIZE/GROUP_RANK (default: one worker per node)")
    _arg(s, "--steps", int, 1, INT64_MAX)
    _arg(s, "--eval-every", int, 1, INT64_MAX)
    s.add_argument("--net", default=DEFAULT_NET,
                   help=f"RATE[,DELAY] emulated (default {DEFAULT_NET}), model:RATE[,DELAY] modeled, or none")
    s.add_argument("--net-schedule", metavar="STEP:RATE,...",  # checked by RunConfig (tailq.harness.net_schedule)
                   help="change the network's rate from these training steps on (0-based), e.g. 40:20mbit,80:1gbit: "
                        "every node link (emulated) or the modeled clock (model:); the hook is told only --net")
    _arg(s, "--seed", int, 0, SEED_MAX, default=0)
    _arg(s, "--lr", float, 0, low_open=True)
    _arg(s, "--batch-size", int, 1, INT64_MAX)
    _arg(s, "--data-dir", help="directory with MNIST IDX or CIFAR-10 binary files")
    _arg(s, "--tail-df", float, 2, low_open=True, note=" (Student-t degrees of freedom with finite variance)",
         default=3.0, help="synthetic: Student-t degrees of freedom of inputs (> 2)")
    _arg(s, "--bucket-cap-mb", float, 0, MAX_BUCKET_CAP_MB, low_open=True, default=25.0)
    _arg(s, "--measure-every", int, 0, INT64_MAX, default=25, help="vNMSE every k-th step (0 = never)")
    s.add_argument("--fsdp", action="store_true",
                   help="gradients through FSDP2's reduce-scatter instead of DDP: bf16 = FSDP2's own in bf16, "
                        "bf16:reduce=a2a = an all-to-all reduce-scatter, tuq/tnq/tbq/single-scale = tailq.fsdp "
                        "(compare's default methods then: fp32 bf16 bf16:reduce=a2a tuq:3 tnq:3 tbq:3, redesign=10)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # named by the subcommand that was given them (argparse's own line names only "tailq")
            raise _ArgumentError(f"tailq {args.command}: error: unrecognized arguments: {' '.join(unknown)} "
                                 f"(usage: tailq {args.command} --help)")
    except _ArgumentError as err:
        print(err, file=sys.stderr)
        return 2
    from tailq.harness.launch import RunFailed, Stopped

    try:
        for check in getattr(args, "_checks", ()):  # every option's accepted values, before the command starts
            check.check(getattr(args, check.dest))
        return int(args.func(args) or 0)
    except UsageError as err:
        print(f"tailq {args.command}: error: {err}", file=sys.stderr)
        return 2
    except RunFailed as err:
        print(f"tailq {args.command}: the run failed: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:  # SIGINT, or SIGTERM/SIGHUP (Stopped): workers stopped, networks removed
        signum = err.signum if isinstance(err, Stopped) else 2
        what = err if isinstance(err, Stopped) else "interrupted"
        root = getattr(err, "tailq_root", None)
        kept = f" Finished runs are kept: continue with tailq compare --resume {root}" if root else ""
        print(f"tailq {args.command}: {what}; its workers were stopped and its network removed.{kept}",
              file=sys.stderr)
        return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
