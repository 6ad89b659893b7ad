"""``tailq`` command line: a thin layer over theory / codec (ARCHITECTURE.md, CLI contract).

Every subcommand has ``--help``, prints human output by default and JSON with ``--json``.
Errors in arguments exit with status 2 and one line naming the argument and the accepted range.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["main"]


class UsageError(Exception):
    """A bad argument: reported as one line, exit status 2."""


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
# loading gradient samples (no pickle)
def load_samples(path: str) -> np.ndarray:
    """Flattened gradient values from a ``.npy`` file or a ``.pt`` file of tensors (``weights_only=True``)."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(
            f"samples file {path!r} does not exist (expected a .npy or .pt file of gradient values)"
        )
    suffix = p.suffix.lower()
    if suffix == ".npy":
        try:
            arr = np.load(p, allow_pickle=False)
        except ValueError as err:
            raise UsageError(f"{path}: cannot read as a plain .npy array without pickle ({err})") from err
        arrays = [np.asarray(arr, dtype=np.float64).ravel()]
    elif suffix in (".pt", ".pth"):
        import torch

        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for bad or unsafe files
            raise UsageError(f"{path}: cannot load with torch.load(weights_only=True): {err}") from err
        tensors = _collect_tensors(obj)
        if not tensors:
            raise UsageError(f"{path}: no floating-point tensors found")
        arrays = [t.detach().to(torch.float64).reshape(-1).numpy() for t in tensors]
    else:
        raise UsageError(f"samples file {path!r}: unsupported suffix {suffix!r}; accepted: .npy, .pt, .pth")
    x = np.concatenate(arrays) if arrays else np.zeros(0)
    if x.size == 0:
        raise UsageError(f"{path}: contains no values")
    bad = int((~np.isfinite(x)).sum())
    if bad:
        raise UsageError(f"{path}: contains {bad} non-finite values (NaN/Inf) of {x.size}")
    return x


def _collect_tensors(obj: Any) -> list[Any]:
    import torch

    if isinstance(obj, torch.Tensor):
        return [obj] if obj.is_floating_point() else []
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _collect_tensors(v)]
    if isinstance(obj, list | tuple):
        return [t for v in obj for t in _collect_tensors(v)]
    return []


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


def monte_carlo_mse(levels: np.ndarray, samples: np.ndarray, seed: int = 0) -> float:
    """Measured per-coordinate MSE of truncation + stochastic rounding onto ``levels`` (torch codec path)."""
    import torch

    from tailq.codec import Codebook

    uniform = bool(np.allclose(np.diff(levels), (levels[-1] - levels[0]) / (len(levels) - 1), rtol=1e-9))
    cb = Codebook.from_levels(levels, uniform=uniform)
    x = torch.as_tensor(samples, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    err = cb.decode(cb.encode(x, gen)).double() - x.double()
    return float((err * err).mean())


def cmd_design(args: argparse.Namespace) -> int:
    from tailq import theory

    if not 1 <= args.bits <= 8:
        raise UsageError(f"--bits must be in 1..8; got {args.bits}")
    if args.mc_samples < 1:
        raise UsageError(f"--mc-samples must be >= 1; got {args.mc_samples}")
    tail, samples, note = _tail_from_args(args)
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
def cmd_fit(args: argparse.Namespace) -> int:
    from scipy import stats as sstats

    from tailq import theory

    x = load_samples(args.file)
    if not np.any(x):
        raise UsageError(f"{args.file}: every value is zero; there is no tail to fit")
    lap = theory.fit_laplace(x)
    pl = theory.fit_powerlaw(x)
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
    from tailq.demo import run_demo

    return run_demo(json_path=args.json, n=args.n, seed=args.seed)


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

    from tailq import bench
    from tailq.harness import cli as harness_cli

    bench.add_parser(sub)  # `tailq bench ...` is defined next to its implementation
    harness_cli.add_parsers(sub)  # `tailq train | compare | report`
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from tailq.harness.config import ConfigError
    from tailq.harness.launch import RunFailed

    try:
        return int(args.func(args) or 0)
    except (UsageError, ConfigError) as err:
        print(f"tailq {args.command}: error: {err}", file=sys.stderr)
        return 2
    except RunFailed as err:
        print(f"tailq {args.command}: the run failed: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
