"""``tailq`` command line: one parser, a thin layer over theory, codec, tools and the harness.

Subcommands: ``list``, ``design``, ``fit``, ``demo``, ``bench codec|hook``, ``train``, ``compare``, ``report``.
Every subcommand has ``--help``, prints human output by default and JSON with ``--json``. Bad input
(:class:`~tailq.errors.UsageError`) exits with status 2 and one line naming the argument and the accepted range;
a training run that fails exits with status 1.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from tailq.errors import UsageError
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
def _tail_from_args(args: argparse.Namespace) -> tuple[Any, np.ndarray | None, str | None]:
    """(tail model, samples or None, fallback note or None)."""
    from tailq import theory

    samples = load_samples(args.samples) if args.samples else None
    if args.tail == "laplace":
        if samples is not None:
            return theory.fit_laplace(samples), samples, None
        if args.scale is None:
            raise UsageError("--tail laplace needs --scale GAMMA (> 0) or --samples FILE")
        if not args.scale > 0:
            raise UsageError(f"--scale must be > 0; got {args.scale}")
        return theory.LaplaceTail(scale=args.scale), None, None
    if args.tail == "powerlaw":
        if samples is not None:
            fit = theory.fit_powerlaw(samples)
            if fit.gamma <= 3:
                note = (
                    f"fitted power law has gamma={fit.gamma:.3f} <= 3 (infinite variance): the closed "
                    "forms do not apply; used the empirical design"
                )
                return theory.EmpiricalTail(theory.LogHistogram.from_samples(samples)), samples, note
            return fit.tail, samples, None
        if args.gamma is None or args.m is None:
            raise UsageError("--tail powerlaw needs --gamma G (> 3) and --m M (> 0), or --samples FILE")
        if not args.m > 0:
            raise UsageError(f"--m must be > 0; got {args.m}")
        if not args.gamma > 3:
            raise UsageError(
                f"--gamma must be > 3 for the power-law design (finite variance); got {args.gamma}. "
                "For heavier tails use --tail empirical --samples FILE"
            )
        return theory.PowerLawTail(m=args.m, gamma=args.gamma), None, None
    if samples is None:
        raise UsageError("--tail empirical needs --samples FILE")
    return theory.EmpiricalTail(theory.LogHistogram.from_samples(samples)), samples, None


def cmd_design(args: argparse.Namespace) -> int:
    from tailq import theory

    if not 1 <= args.bits <= 8:
        raise UsageError(f"--bits must be in 1..8; got {args.bits}")
    if args.mc_samples < 1:
        raise UsageError(f"--mc-samples must be >= 1; got {args.mc_samples}")
    if args.seed < 0:
        raise UsageError(f"--seed must be an integer >= 0; got {args.seed}")
    for name in ("scale", "gamma", "m"):
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            raise UsageError(f"--{name} must be a finite number; got {value}")
    try:
        tail, samples, note = _tail_from_args(args)
    except UsageError:
        raise
    except ValueError as err:  # the tail model refused the given parameters or samples: its message names them
        raise UsageError(f"--tail {args.tail}: {err}") from err
    try:
        des = theory.design(args.scheme, tail, args.bits, refine=args.refine)
    except theory.HeavyTailError as err:
        raise UsageError(str(err)) from err
    rng = np.random.default_rng(args.seed)
    if samples is None:
        mc = tail.sample(args.mc_samples, rng)
    else:
        mc = samples
    measured = monte_carlo_mse(des.levels, mc, seed=args.seed)
    out = {
        "scheme": args.scheme,
        "tail": args.tail,
        "bits": args.bits,
        "alpha": float(des.alpha),
        "levels": [float(v) for v in des.levels],
        "predicted_mse": float(des.predicted_mse),
        "measured_mse": measured,
        "exact_mse": float(theory.exact_mse(des.levels, tail)),
        "measured_on": "the samples file" if samples is not None else f"{len(mc)} draws from the model",
        "model": repr(tail),
        "method": des.method,
        "notes": list(des.notes) + ([note] if note else []),
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
    lap = theory.fit_laplace(x)
    try:
        pl = theory.fit_powerlaw(x)
    except ValueError as err:  # too few distinct tail values: say so, fit and design the rest
        raise UsageError(f"{args.file}: the power-law fit is impossible on these values ({err})") from err
    out: dict[str, Any] = {
        "file": args.file,
        "n": int(x.size),
        "mean_abs": float(np.mean(np.abs(x))),
        "std": float(np.std(x)),
        "max_abs": float(np.max(np.abs(x))),
        "excess_kurtosis": float(sstats.kurtosis(x)),
        "laplace": {"scale": float(lap.scale)},
        "powerlaw": {
            "m": float(pl.m),
            "gamma": float(pl.gamma),
            "ks": float(pl.ks),
            "n_tail": int(pl.n_tail),
        },
        "designs": [],
    }
    hist_tail = theory.EmpiricalTail(theory.LogHistogram.from_samples(x))
    tails: list[tuple[str, Any]] = [("laplace", lap), ("empirical", hist_tail)]
    if pl.gamma > 3:
        tails.insert(1, ("powerlaw", pl.tail))
    else:
        out["powerlaw"]["note"] = "gamma <= 3: infinite variance, the power-law closed forms do not apply"
    for tname, tail in tails:
        for scheme in ("tuq", "tnq"):
            des = theory.design(scheme, tail, args.bits)
            out["designs"].append(
                {
                    "scheme": scheme,
                    "tail": tname,
                    "bits": args.bits,
                    "alpha": float(des.alpha),
                    "predicted_mse": float(des.predicted_mse),
                    "measured_mse": monte_carlo_mse(des.levels, x),
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
    con.print(f"  Laplace fit: scale={lap.scale:.4g}")
    con.print(
        f"  power-law fit (CSN): m={pl.m:.4g}, gamma={pl.gamma:.4g}, KS={pl.ks:.4g}, tail n={pl.n_tail}"
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

    if args.numel is not None and args.numel < 1:
        raise UsageError(f"--numel must be >= 1; got {args.numel}")
    if args.repeat < 1:
        raise UsageError(f"--repeat must be >= 1; got {args.repeat}")
    if any(not 1 <= b <= 8 for b in args.bits):
        raise UsageError(f"--bits must be in 1..8; got {args.bits}")
    if args.world < 1 or args.steps < 1:
        raise UsageError(f"--world and --steps must be >= 1; got {args.world}, {args.steps}")
    if args.device not in ("cpu", "cuda") or (args.device == "cuda" and not torch.cuda.is_available()):
        raise UsageError(f"--device must be cpu or cuda (with a GPU present); got {args.device!r}")
    if args.what == "scale":
        from tailq.harness.netem import emulation_available, unavailable_message
        from tailq.tools.scale import run_scale_bench

        net = _network(args.net, [])
        ok, why = emulation_available(net) if net.kind == "emulated" else (False, "")
        if not ok:
            raise UsageError("bench scale measures NIC bytes on an emulated network (--net RATE[,DELAY]); "
                             + (unavailable_message(net, why) if net.kind == "emulated" else f"got {args.net!r}"))
        if any(w < 2 or w > 64 for w in args.workers) or any(s < 1 for s in args.sizes):
            raise UsageError(f"--workers must be in 2..64 and --sizes >= 1; got {args.workers}, {args.sizes}")
        return run_scale_bench(net, args.workers, args.sizes, name=args.compressor, bits=args.code_bits,
                               steps=args.steps, modeled=args.modeled, json_out=None if args.json == "-" else args.json)
    if args.what == "hook":
        return bench.run_hook_bench(world=args.world, numel=args.numel or 1 << 22, steps=args.steps,
                                    threads=args.threads, paths=args.paths, json_out=args.json)
    return bench.run_codec_bench(numel=args.numel or 1 << 24, repeat=args.repeat, json_out=args.json,
                                 only=args.compressors, bits=tuple(args.bits), paths=args.paths, device=args.device,
                                 hook=args.hook, hook_numel=args.hook_numel, world=args.world, steps=args.steps,
                                 threads=args.threads)


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
            "bucket_cap_mb": args.bucket_cap_mb, "measure_every": args.measure_every, "fsdp": args.fsdp}


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
    notes: list[str] = []
    net = _network(args.net, notes)
    workload = args.workload or "digits"
    steps, every = DEFAULT_STEPS.get(workload, (300, 25))
    cfg = RunConfig(workload=workload, hook=args.compressor, hook_options=opts, workers=args.workers,
                    steps=steps if args.steps is None else args.steps,
                    eval_every=every if args.eval_every is None else args.eval_every, seed=args.seed,
                    net=net, run_dir=args.run_dir or f"runs/train-{args.compressor}",
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
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from tailq.harness.compare import (
        DEFAULT_METHODS,
        FSDP_METHODS,
        Y1_METHODS,
        Y1_WORKLOAD,
        ComparisonIncomplete,
        compare,
        parse_method,
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

    if args.resume:
        return _compare_done(run(lambda: resume(args.resume)), [], args.json)
    notes: list[str] = []
    workload, workers = args.workload, args.workers
    methods = [parse_method(m) for m in args.methods] if args.methods else list(
        FSDP_METHODS if args.fsdp else DEFAULT_METHODS)
    steps, every = DEFAULT_STEPS.get(workload or "digits", (300, 25))
    metric = args.target_metric or "accuracy"
    if args.preset == "y1":
        workers = 8 if args.workers == 4 else args.workers
        methods = [parse_method(m) for m in args.methods] if args.methods else list(Y1_METHODS)
        if workload is None:
            workload, steps, every, metric = Y1_WORKLOAD
            metric = args.target_metric or metric
        else:
            steps, every = DEFAULT_STEPS.get(workload, (300, 25))
    workload = workload or "digits"
    check_data(workload, args.data_dir)
    net = _network(args.net, notes)
    root = run(lambda: compare(workload=workload, workers=workers, net=net, methods=methods,
                               steps=steps if args.steps is None else args.steps,
                               eval_every=every if args.eval_every is None else args.eval_every, seed=args.seed,
                               out_dir=args.out, run_id=args.id, target_fraction=args.target, extra=_extra(args),
                               notes=notes, seeds=args.seeds, target_metric=metric))
    return _compare_done(root, notes, args.json)


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tailq", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("list", help="compressors and their options")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_list)

    s = sub.add_parser("design", help="optimal truncated quantizer for a tail model (alpha*, levels, MSE)")
    s.add_argument("--scheme", required=True, choices=("tuq", "tnq", "tbq"))
    s.add_argument("--tail", required=True, choices=("laplace", "powerlaw", "empirical"))
    s.add_argument("--bits", required=True, type=int, help="bits per coordinate, 1..8")
    s.add_argument("--scale", type=float, help="Laplace scale gamma (mean |g|)")
    s.add_argument("--gamma", type=float, help="power-law exponent (> 3)")
    s.add_argument("--m", type=float, help="power-law body width m (> 0)")
    s.add_argument("--samples", help="a .npy or .pt file of gradient values to fit (and measure on)")
    s.add_argument("--refine", action="store_true", help="empirical: refine levels on the exact variance")
    s.add_argument("--mc-samples", type=int, default=1_000_000, help="Monte-Carlo draws from the model")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_design)

    s = sub.add_parser("fit", help="tail fit (Laplace, power law) of saved gradient values")
    s.add_argument("file", help=".npy or .pt file (loaded without pickle)")
    s.add_argument("--bits", type=int, default=3, choices=range(1, 9), metavar="1..8")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_fit)

    s = sub.add_parser("demo", help="the first main job: every compressor at 2, 3, 4 bits on heavy tails")
    s.add_argument("--n", type=int, default=1 << 18, help="samples per distribution")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", metavar="PATH", help="also write the table as JSON")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("bench", help="micro-benchmarks: codec throughput per kernel path, hook time vs bf16")
    s.add_argument("what", choices=("codec", "hook", "scale"),
                   help="codec: encode/decode vs a copy; hook: ms/step vs bf16; scale: every route at N workers on "
                        "an emulated network (NIC bits, ms/step vs bf16, vNMSE) beside the cost model")
    s.add_argument("--numel", type=int, default=None, help="elements (default 2^24 for codec, 2^22 for hook)")
    s.add_argument("--repeat", type=int, default=3, help="timed calls (codec) after one warm-up")
    s.add_argument("--compressors", nargs="*", help="only these compressors")
    s.add_argument("--bits", nargs="*", type=int, default=[2, 3, 4, 8], help="bit widths (default 2 3 4 8)")
    s.add_argument("--paths", nargs="*", choices=("reference", "compiled", "triton"),
                   help="kernel paths (default: every one available on the device)")  # fmt: skip
    s.add_argument("--device", default="cpu", help="cpu or cuda (codec)")
    s.add_argument("--hook", action="store_true", help="codec: also run the hook benchmark and include it")
    s.add_argument("--hook-numel", type=int, default=1 << 22, help="elements per rank for --hook (2^22)")
    s.add_argument("--world", type=int, default=4, help="hook: number of Gloo ranks")
    s.add_argument("--steps", type=int, default=5, help="hook: timed steps after two warm-up steps")
    s.add_argument("--threads", type=int, default=None, help="hook: torch threads per rank (default cores/world)")
    s.add_argument("--net", default="100mbit", help="scale: the emulated network (RATE[,DELAY], default 100mbit)")
    s.add_argument("--workers", nargs="*", type=int, default=[2, 4, 8, 16], help="scale: worker counts measured")
    s.add_argument("--sizes", nargs="*", type=int, default=[1 << 20, 1 << 22], help="scale: bucket lengths")
    s.add_argument("--modeled", nargs="*", type=int, default=[64, 256, 1024], help="scale: worker counts modeled")
    s.add_argument("--compressor", default="tnq", help="scale: a shared-codebook compressor (default tnq)")
    s.add_argument("--code-bits", type=int, default=3, help="scale: its bits (default 3)")
    s.add_argument("--json", nargs="?", const="-", metavar="PATH", help="JSON to PATH (or stdout)")
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("train", help="one training run (a compressor, N workers, a workload, a network)")
    _harness_common(s)
    s.add_argument("--compressor", default="tnq", help="any hook name (tailq list, or fp32/fp16/bf16/powersgd)")
    s.add_argument("--bits", type=int, help="bits per coordinate (compressors that take bits)")
    s.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="more hook options")
    s.add_argument("--run-dir", help="where to write (default runs/train-<compressor>)")
    s.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints (0 = none)")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("compare", help="the main job: methods on one workload and network, TTA vs bf16, report")
    _harness_common(s)
    s.add_argument("--methods", nargs="+", help="e.g. bf16 tnq:3 qsgd:4 tnq:3:tail=laplace powersgd:rank=2 "
                   "(default: fp32 bf16 powersgd qsgd:4 tuq:3:redesign=10 tnq:3:redesign=10 tbq:3:redesign=10)")
    s.add_argument("--preset", choices=("default", "y1"), default="default",
                   help="y1: [Y1]'s comparison, QSGD/NUQSGD vs TUQ/TNQ/TBQ at 2, 3 and 4 bits, 8 workers, on "
                   "the workload where error decides convergence (charlm, 100 steps, test-loss target, unless "
                   "--workload is given)")
    s.add_argument("--target", type=float, default=0.99, help="target = this fraction of bf16's best accuracy "
                   "(--target-metric loss: bf16's best test loss x (2 - this), within 1%% of it at 0.99)")
    s.add_argument("--target-metric", choices=("accuracy", "loss"),
                   help="what the target is on: test accuracy (the default) or test loss (the y1 preset's)")
    s.add_argument("--seeds", type=int, default=1,
                   help="run the whole comparison with K seeds (--seed, --seed+1, ...): medians, exact "
                        "order-statistic intervals and speedups paired by seed (default 1)")
    s.add_argument("--out", default="runs", help="parent directory of the run directory")
    s.add_argument("--id", help="run directory name (default: a timestamp)")
    s.add_argument("--json", metavar="PATH", help="also write the summary JSON here")
    s.add_argument("--resume", metavar="DIR", help="continue the comparison in DIR: keep its finished runs, rerun "
                   "the missing or failed ones with its saved arguments, rebuild the report (other options ignored)")
    s.set_defaults(func=cmd_compare)

    s = sub.add_parser("report", help="re-render report.md and plots of a comparison directory")
    s.add_argument("dir")
    s.set_defaults(func=cmd_report)
    return p


def _harness_common(s: argparse.ArgumentParser) -> None:
    s.add_argument("--workload", help="digits (the default) | charlm | synthetic | mnist | cifar10")
    s.add_argument("--workers", type=int, default=4)
    s.add_argument("--steps", type=int)
    s.add_argument("--eval-every", type=int)
    s.add_argument("--net", default=DEFAULT_NET,
                   help=f"RATE[,DELAY] emulated (default {DEFAULT_NET}), model:RATE[,DELAY] modeled, or none")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--lr", type=float)
    s.add_argument("--batch-size", type=int)
    s.add_argument("--data-dir", help="directory with MNIST IDX or CIFAR-10 binary files")
    s.add_argument("--tail-df", type=float, default=3.0, help="synthetic: Student-t degrees of freedom of inputs")
    s.add_argument("--bucket-cap-mb", type=float, default=25.0)
    s.add_argument("--measure-every", type=int, default=25, help="vNMSE every k-th step (0 = never)")
    s.add_argument("--fsdp", action="store_true",
                   help="gradients through FSDP2's reduce-scatter instead of DDP: bf16 = FSDP2's own in bf16, "
                        "bf16:reduce=a2a = an all-to-all reduce-scatter, tuq/tnq/tbq/single-scale = tailq.fsdp "
                        "(compare's default methods then: fp32 bf16 bf16:reduce=a2a tuq:3 tnq:3 tbq:3, redesign=10)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from tailq.harness.launch import RunFailed, Stopped

    try:
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
