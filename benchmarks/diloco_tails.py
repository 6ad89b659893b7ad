"""Are DiLoCo's pseudo-gradients heavy-tailed, and at which H? Their tails against the per-step gradient's, and the
outer vNMSE of each compressor on them.

    .venv/bin/python benchmarks/diloco_tails.py --workload digits    # ~1 min on 2 cores
    .venv/bin/python benchmarks/diloco_tails.py --workload charlm    # ~4.5 min on 2 cores

W = 4 ranks on loopback Gloo (torch.multiprocessing spawn, file:// rendezvous) train the workload of
``tailq.harness.workloads`` with its own model and inner optimizer (``digits``: SGD, momentum 0.9, lr 0.05;
``charlm``: AdamW lr 2e-3), its batches (``tailq.harness.worker._batch``: each rank its shard), and ``tailq.DiLoCo``
with the exact fp32 outer mean (Nesterov 0.7 / 0.9), once per H. Every ``--record-every`` steps (a multiple of
every H, so all H are recorded at the same inner steps) each rank takes, at that sync:

* its pseudo-gradient Δ = θ_global − θ_local (``diloco.last_pseudo_gradient``) and the gradient of that step's
  batch at θ_local before the inner step (the per-step gradient at the same point);
* the tail statistics of both, by ``tailq.harness.worker._tail_stats`` (what the harness reports for gradients):
  excess kurtosis (0 for a Gaussian, 3 for a Laplace), the CSN power-law fit p(|x|) ∝ |x|^-γ above m (γ: the
  density exponent; γ <= 3 means infinite variance, a Gaussian sample fits γ >~ 10) and the fraction of values in
  that tail. Zeros are dropped first (as the harness does). The table gives the median over the 4 ranks;
* the vNMSE ‖mean̂ − mean‖² / ‖mean‖² of each compressor's mean of the 4 ranks' Δ (and of their gradients): the
  4 vectors go through a ``tailq.ddp_hook`` state of that compressor (the code DiLoCo's outer mean runs) with
  ``measure_every=1`` (the hook all-reduces the exact fp32 mean beside it), ``route="allgather"`` (each rank's own
  encoding; the shared-codebook quantizers design theirs from the agreed statistics), ``error_feedback=False``
  (one-shot error of these vectors, not of a trajectory), ``warmup_steps=0``, ``min_bucket=0``. The training
  itself is never affected: its outer mean stays fp32.

Writes ``benchmarks/results/diloco_tails_<workload>.json`` (the command, the machine, every record) and prints
markdown tables.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tailq
from tailq.diloco import nesterov
from tailq.harness.worker import _batch, _tail_stats
from tailq.harness.workloads import load_workload
from tailq.hooks import LocalBucket

COMPRESSORS: list[tuple[str, str, dict[str, Any]]] = [
    *[(f"{n}{b}", n, {"bits": b}) for n in ("tnq", "tuq", "tbq", "qsgd") for b in (2, 3)],
    ("fp8", "fp8", {}), ("int8sigma", "int8sigma", {}), ("fp4", "fp4", {}),
]
DEFAULTS = {"digits": {"steps": 300, "record_every": 100}, "charlm": {"steps": 300, "record_every": 100}}
TAIL_KEYS = ("excess_kurtosis", "powerlaw_gamma", "powerlaw_tail_fraction", "mean_abs")
OUT_DIR = Path(__file__).resolve().parent / "results"


def _flat_grad(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).float()
                      for p in model.parameters() if p.requires_grad])


def _vnmse(state: Any, hook: Any, vec: torch.Tensor) -> dict[str, Any]:
    before = len(state.metrics.vnmse)
    hook(state, LocalBucket(vec.clone())).wait()
    assert len(state.metrics.vnmse) == before + 1
    rec = state.metrics.vnmse[-1]
    return {"vnmse": rec["vnmse"], "route": state.metrics.last.get(0, {}).get("route")}


def rank_main(rank: int, world: int, init_file: str, args: argparse.Namespace, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    wl = load_workload(args.workload, seed=args.seed)
    hooks = {label: tailq.ddp_hook(name, route="allgather", error_feedback=False, warmup_steps=0, min_bucket=0,
                                   measure_every=1, **opts) for label, name, opts in COMPRESSORS}
    runs = []
    for H in args.H:
        torch.manual_seed(args.seed)
        model = wl.make_model()
        inner = wl.make_optimizer(model.parameters())
        lr, mom = (1.0, 0.0) if H == 1 and not args.h1_nesterov else (args.outer_lr, args.outer_momentum)
        diloco = tailq.DiLoCo(model, inner, sync_every=H, compressor="fp32", outer_optimizer=nesterov(lr, mom))
        records, t0, losses = [], time.perf_counter(), []
        for step in range(args.steps):
            x, y = _batch(wl, rank, world, step, wl.batch_size, args.seed)
            loss = wl.loss(model(x), y)
            loss.backward()
            losses.append(float(loss.detach()))
            record = (step + 1) % args.record_every == 0
            grad = _flat_grad(model) if record else None
            inner.step()
            inner.zero_grad(set_to_none=True)
            diloco.step()
            if not record:
                continue
            assert grad is not None and diloco.syncs[-1]["launched"] == step + 1  # a sync at this very step
            pg = diloco.last_pseudo_gradient
            assert pg is not None
            rec: dict[str, Any] = {"step": step + 1, "pg": _tail_stats(pg), "grad": _tail_stats(grad),
                                   "pg_norm": float(pg.norm()), "grad_norm": float(grad.norm()),
                                   "pg_zero_fraction": float((pg == 0).float().mean()),
                                   "grad_zero_fraction": float((grad == 0).float().mean()),
                                   "inner_loss": statistics.fmean(losses[-args.record_every:]),
                                   "vnmse_pg": {}, "vnmse_grad": {}}
            for label, (state, hook) in hooks.items():
                rec["vnmse_pg"][label] = _vnmse(state, hook, pg)
                rec["vnmse_grad"][label] = _vnmse(state, hook, grad)
            if rank == 0:
                with diloco.global_model() as m:
                    rec["global_accuracy"], rec["global_test_loss"] = wl.evaluate(m)
            records.append(rec)
        diloco.close()
        runs.append({"H": H, "outer_lr": lr, "outer_momentum": mom, "seconds": time.perf_counter() - t0,
                     "syncs": len(diloco.syncs), "records": records})
        if rank == 0:
            print(f"  H={H}: {len(diloco.syncs)} syncs, {runs[-1]['seconds']:.1f} s", flush=True)
    bits = {label: state.metrics.wire.bits_per_coord() for label, (state, _) in hooks.items()}
    for state, _ in hooks.values():
        state.close()
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, {"runs": runs, "bits_per_coord": bits})
    if rank == 0:
        torch.save(gathered, out_file)
    dist.barrier()
    dist.destroy_process_group()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _median(values: list[float]) -> float:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else float("nan")


def summarise(per_rank: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (H, recorded step): the median over ranks of each tail statistic; vNMSE (the same on every
    rank: it is of the mean) from rank 0."""
    rows = []
    for i, run in enumerate(per_rank[0]["runs"]):
        for j, rec in enumerate(run["records"]):
            ranks = [r["runs"][i]["records"][j] for r in per_rank]
            row: dict[str, Any] = {"H": run["H"], "step": rec["step"], "global_accuracy": rec.get("global_accuracy"),
                                   "inner_loss": statistics.fmean(r["inner_loss"] for r in ranks)}
            for kind in ("pg", "grad"):
                for k in TAIL_KEYS:
                    row[f"{kind}_{k}"] = _median([r[kind].get(k) for r in ranks])
                row[f"{kind}_norm"] = _median([r[f"{kind}_norm"] for r in ranks])
                row[f"{kind}_zero_fraction"] = _median([r[f"{kind}_zero_fraction"] for r in ranks])
                row[f"vnmse_{kind}"] = {k: v["vnmse"] for k, v in rec[f"vnmse_{kind}"].items()}
            row["routes"] = sorted({v["route"] for v in rec["vnmse_pg"].values()} | {
                v["route"] for v in rec["vnmse_grad"].values()})
            rows.append(row)
    return rows


def _f(v: Any, spec: str = ".3g") -> str:
    return "–" if v is None or v != v else format(v, spec)


def markdown(workload: str, rows: list[dict[str, Any]], bits: dict[str, float], world: int) -> str:
    out = [f"### {workload}: tails of the pseudo-gradient Δ (H inner steps) vs the per-step gradient g "
           f"(median over {world} ranks)", "",
           "| H | step | acc | Δ kurtosis | g kurtosis | Δ γ | g γ | Δ tail frac | g tail frac | Δ zeros | g zeros |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['H']} | {r['step']} | {_f(r['global_accuracy'], '.3f')} | {_f(r['pg_excess_kurtosis'])} "
                   f"| {_f(r['grad_excess_kurtosis'])} | {_f(r['pg_powerlaw_gamma'])} | {_f(r['grad_powerlaw_gamma'])} "
                   f"| {_f(r['pg_powerlaw_tail_fraction'], '.4f')} | {_f(r['grad_powerlaw_tail_fraction'], '.4f')} "
                   f"| {_f(r['pg_zero_fraction'], '.3f')} | {_f(r['grad_zero_fraction'], '.3f')} |")
    labels = [c[0] for c in COMPRESSORS]
    for kind, what in (("pg", f"the mean of the {world} pseudo-gradients Δ"),
                       ("grad", f"the mean of the {world} per-step gradients g")):
        out += ["", f"### {workload}: vNMSE of {what} (route allgather, no error feedback), mean over the recorded "
                "steps", "", "| H | " + " | ".join(labels) + " |", "|---:|" + "---:|" * len(labels),
                "| bits/coord | " + " | ".join(_f(bits[lab], ".3g") for lab in labels) + " |"]
        for H in sorted({r["H"] for r in rows}):
            mine = [r for r in rows if r["H"] == H]
            cells = [_f(statistics.fmean(r[f"vnmse_{kind}"][lab] for r in mine), ".3g") for lab in labels]
            out.append(f"| {H} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="digits", choices=sorted(DEFAULTS))
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--H", type=lambda s: [int(v) for v in s.split(",")], default=[1, 5, 20, 50],
                    help="comma-separated sync periods")
    ap.add_argument("--steps", type=int, default=None, help="inner steps per H (default: 300)")
    ap.add_argument("--record-every", type=int, default=None, help="a multiple of every H (default 100)")
    ap.add_argument("--outer-lr", type=float, default=0.7)
    ap.add_argument("--outer-momentum", type=float, default=0.9)
    ap.add_argument("--h1-nesterov", action="store_true",
                    help="H=1 with the Nesterov outer step too (default: outer SGD lr 1, momentum 0 at H=1, i.e. "
                         "synchronous data-parallel training; Nesterov 0.7/0.9 on top of digits' inner momentum "
                         "diverged there)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="default: benchmarks/results/diloco_tails_<workload>.json")
    args = ap.parse_args()
    args.steps = args.steps or DEFAULTS[args.workload]["steps"]
    args.record_every = args.record_every or DEFAULTS[args.workload]["record_every"]
    bad = [H for H in args.H if args.record_every % H]
    if bad:
        ap.error(f"--record-every {args.record_every} must be a multiple of every H (not of {bad})")
    out = Path(args.out) if args.out else OUT_DIR / f"diloco_tails_{args.workload}.json"

    load = list(os.getloadavg())  # the machine may be shared: times are only indicative
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        init, res = os.path.join(tmp, "init"), os.path.join(tmp, "res.pt")
        print(f"{args.workload}: W={args.world}, H={args.H}, {args.steps} steps each", flush=True)
        mp.start_processes(rank_main, args=(args.world, init, args, res), nprocs=args.world, start_method="spawn")
        per_rank = torch.load(res, weights_only=False)
    seconds = time.perf_counter() - t0
    rows = summarise(per_rank)
    table = markdown(args.workload, rows, per_rank[0]["bits_per_coord"], args.world)
    wl = load_workload(args.workload, seed=args.seed)
    model = wl.make_model()
    doc = {
        "command": " ".join(shlex.quote(a) for a in [".venv/bin/python", "benchmarks/diloco_tails.py", *sys.argv[1:]]),
        "machine": {"processor": platform.processor(), "cpu_model": _cpu_model(), "node": platform.node(),
                    "machine": platform.machine(), "cpus": os.cpu_count(), "load_average_at_start": load,
                    "python": platform.python_version(), "torch": torch.__version__},
        "seconds": seconds,
        "note": ("small by design: the default run takes a few minutes on 2 cores (W=4 ranks share them); "
                 f"{args.steps} inner steps per H, tail statistics and vNMSE at every {args.record_every}-th step "
                 "(a sync for every H). One seed, one workload size; Δ of a rank is its own, the vNMSE is of the "
                 "4 ranks' mean."),
        "setup": {"workload": args.workload, "workload_note": wl.note,
                  "parameters": sum(p.numel() for p in model.parameters()), "world": args.world, "H": args.H,
                  "steps": args.steps, "record_every": args.record_every, "seed": args.seed,
                  "inner_optimizer": {"name": wl.optimizer, "lr": wl.lr,
                                      **({"momentum": 0.9} if wl.optimizer == "sgd" else {"weight_decay": 0.01})},
                  "batch_size_per_rank": wl.batch_size, "outer": "fp32 mean (exact), Nesterov SGD "
                  f"lr {args.outer_lr} momentum {args.outer_momentum}" + (
                      "" if args.h1_nesterov or 1 not in args.H else
                      "; at H=1 plain SGD lr 1 momentum 0 (= synchronous data-parallel training)"),
                  "tail_stats": "tailq.harness.worker._tail_stats (zeros dropped): excess kurtosis, CSN power-law "
                                "gamma (density exponent) above m, tail fraction; median over ranks",
                  "vnmse": "tailq.ddp_hook(route='allgather', error_feedback=False, warmup_steps=0, min_bucket=0, "
                           "measure_every=1) fed the 4 ranks' vectors; ||mean_hat - mean||^2 / ||mean||^2",
                  "compressors": {label: {"name": name, **opts} for label, name, opts in COMPRESSORS}},
        "bits_per_coord": per_rank[0]["bits_per_coord"],
        "rows": rows,
        "markdown": table,
        "per_rank": per_rank,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1, default=float) + "\n")
    print(table)
    print(f"\n{seconds:.0f} s; wrote {out}")


if __name__ == "__main__":
    main()
