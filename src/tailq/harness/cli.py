"""``tailq train``, ``tailq compare``, ``tailq report``: registered on the main CLI by :func:`add_parsers`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

DEFAULT_NET = "50mbit"


def add_parsers(sub: Any) -> None:
    s = sub.add_parser("train", help="one training run (a compressor, N workers, a workload, a network)")
    _common(s)
    s.add_argument("--compressor", default="tnq", help="any hook name (tailq list, or fp32/fp16/bf16/powersgd)")
    s.add_argument("--bits", type=int, help="bits per coordinate (compressors that take bits)")
    s.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="more hook options")
    s.add_argument("--run-dir", help="where to write (default runs/train-<compressor>)")
    s.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints (0 = none)")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("compare", help="the main job: methods on one workload and network, TTA vs bf16, report")
    _common(s)
    s.add_argument("--methods", nargs="+", help="e.g. bf16 tnq:3 qsgd:4 tnq:3:tail=laplace powersgd:rank=2 "
                   "(default: fp32 bf16 powersgd qsgd:4 tuq:3:redesign=10 tnq:3:redesign=10 tbq:3:redesign=10)")
    s.add_argument("--preset", choices=("default", "y1"), default="default",
                   help="y1: [Y1]'s comparison (MNIST, 8 workers, QSGD/NUQSGD vs TUQ/TNQ/TBQ at 3 bits)")
    s.add_argument("--target", type=float, default=0.99, help="target = this fraction of bf16's best accuracy")
    s.add_argument("--out", default="runs", help="parent directory of the run directory")
    s.add_argument("--id", help="run directory name (default: a timestamp)")
    s.add_argument("--json", metavar="PATH", help="also write the summary JSON here")
    s.set_defaults(func=cmd_compare)

    s = sub.add_parser("report", help="re-render report.md and plots of a comparison directory")
    s.add_argument("dir")
    s.set_defaults(func=cmd_report)


def _common(s: argparse.ArgumentParser) -> None:
    s.add_argument("--workload", default="digits", help="digits | charlm | synthetic | mnist | cifar10")
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


WORKLOAD_STEPS = {"digits": (300, 25), "charlm": (400, 50), "synthetic": (200, 20), "mnist": (600, 50),
                  "cifar10": (2000, 200)}


def _extra(args: argparse.Namespace) -> dict[str, Any]:
    return {"lr": args.lr, "batch_size": args.batch_size, "data_dir": args.data_dir, "tail_df": args.tail_df,
            "bucket_cap_mb": args.bucket_cap_mb, "measure_every": args.measure_every}


def _net_or_fallback(net: str, notes: list[str]) -> str:
    """The default network is emulated; where emulation is impossible say so and use the modeled one."""
    from .netem import emulation_available, parse_net

    spec = parse_net(net)
    if spec.kind != "emulated":
        return net
    ok, why = emulation_available(spec)
    if ok:
        return net
    if net != DEFAULT_NET:
        from .config import ConfigError

        raise ConfigError(f"--net {net}: network emulation is not available here ({why}); use --net model:{net} "
                          "(communication time from the cost model, labelled modeled) or --net none")
    notes.append(f"network emulation unavailable ({why}): the default network is MODELED (model:{net})")
    return f"model:{net}"


def _check_data(workload: str, data_dir: str | None) -> None:
    from .config import ConfigError
    from .workloads import DataError, load_workload

    if workload in ("mnist", "cifar10"):
        try:
            load_workload(workload, data_dir=data_dir)
        except DataError as err:
            raise ConfigError(str(err)) from err


def _require_harness_extras() -> None:
    from .config import ConfigError

    missing = [m for m in ("sklearn", "matplotlib") if __import__("importlib").util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"the harness needs {', '.join(missing)}: pip install 'tailq[harness]' "
                          "(scikit-learn for the embedded digits data, matplotlib for the plots)")


def cmd_train(args: argparse.Namespace) -> int:
    from rich.console import Console

    from .compare import _value
    from .config import ConfigError, RunConfig
    from .launch import launch_run

    _require_harness_extras()
    opts: dict[str, Any] = {}
    if args.bits is not None:
        opts["bits"] = args.bits
    for kv in args.option:
        if "=" not in kv:
            raise ConfigError(f"--option must be KEY=VALUE; got {kv!r}")
        k, v = kv.split("=", 1)
        opts[k] = _value(v)
    notes: list[str] = []
    steps, every = WORKLOAD_STEPS.get(args.workload, (300, 25))
    cfg = RunConfig(workload=args.workload, hook=args.compressor, hook_options=opts, workers=args.workers,
                    steps=args.steps or steps, eval_every=args.eval_every or every, seed=args.seed,
                    net=args.net, run_dir=args.run_dir or f"runs/train-{args.compressor}",
                    checkpoint_every=args.checkpoint_every, **_extra(args)).validate()
    _check_data(cfg.workload, cfg.data_dir)
    cfg.net = _net_or_fallback(cfg.net, notes)
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
    from .compare import DEFAULT_METHODS, Y1_METHODS, compare, parse_method
    from .report import print_table

    _require_harness_extras()
    notes: list[str] = []
    workload, workers = args.workload, args.workers
    methods = [parse_method(m) for m in args.methods] if args.methods else list(DEFAULT_METHODS)
    if args.preset == "y1":
        workers = 8 if args.workers == 4 else args.workers
        methods = [parse_method(m) for m in args.methods] if args.methods else list(Y1_METHODS)
        from .workloads import DataError, load_workload

        try:
            load_workload("mnist", data_dir=args.data_dir)
            workload = "mnist"
        except DataError as err:
            workload = "digits"
            notes.append(f"preset y1: MNIST not found ({err}); ran on the embedded digits workload instead")
    _check_data(workload, args.data_dir)
    net = _net_or_fallback(args.net, notes)
    steps, every = WORKLOAD_STEPS.get(workload, (300, 25))
    root = compare(workload=workload, workers=workers, net=net, methods=methods, steps=args.steps or steps,
                   eval_every=args.eval_every or every, seed=args.seed, out_dir=args.out, run_id=args.id,
                   target_fraction=args.target, extra=_extra(args), notes=notes)
    summary = json.loads((root / "results.json").read_text())
    print_table(summary)
    for n in notes:
        print(f"note: {n}")
    print(f"report: {root / 'report.md'}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .config import ConfigError
    from .report import print_table, render

    root = Path(args.dir)
    if not (root / "results.json").is_file():
        raise ConfigError(f"{root} has no results.json (is it a directory written by tailq compare?)")
    path = render(root)
    print_table(json.loads((root / "results.json").read_text()))
    print(f"report: {path}")
    return 0
