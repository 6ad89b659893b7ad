"""Reports of a comparison: ``report.md`` and four plots from ``results.json`` and the per-run results.

Plots: accuracy vs training clock (with the target), TTA vs wire bits per coordinate, vNMSE over training, and
the histogram of one gradient (the tailq run's last probe) with the fitted Laplace and power-law tails and the
truncation thresholds α*. ``tailq report DIR`` re-renders all of it from the saved JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["OVERLAP_HEADER", "buckets_line", "buckets_text", "header", "network_text", "overlap_rows",
           "overlap_skips", "overlap_text", "render", "table_rows", "print_table"]

PLOTS = ("accuracy_vs_time.png", "tta_vs_bits.png", "vnmse.png", "gradient_histogram.png")


def network_text(net: dict[str, Any]) -> str:
    """The summary's network for people: ``emulated 1 Gbit/s``, with ``--net-schedule``'s changes after a
    semicolon: ``emulated 1 Gbit/s; 20 Mbit/s from step 40, 1 Gbit/s from step 80``."""
    changes = net.get("schedule_text")
    return f"{net['rate']}; {changes}" if changes else str(net["rate"])


def _fmt(v: Any, spec: str, none: str = "—") -> str:
    return none if v is None else format(v, spec)


def has_nodes(summary: dict[str, Any]) -> bool:
    """Several workers share each node's link (``--nodes K`` with K < workers): the per-node NIC column is shown."""
    nodes = summary.get("nodes")
    return isinstance(nodes, int) and nodes < int(summary["workers"])


def workers_text(summary: dict[str, Any]) -> str:
    """``4 workers`` or ``8 workers on 2 nodes``."""
    nodes = f" on {summary['nodes']} nodes" if has_nodes(summary) else ""
    return f"{summary['workers']} workers{nodes}"


def _node_nic(r: dict[str, Any]) -> str:
    """Bits per coordinate leaving each node's NIC, measured, and the hook's own account of them in parentheses."""
    model = r.get("node_nic_bits_per_coord_model")
    return _fmt(r.get("node_nic_bits_per_coord"), ".2f") + (f" ({model:.2f})" if model is not None else "")


def header(summary: dict[str, Any]) -> list[str]:
    """The table's columns: :data:`HEADER`, with the per-node NIC column beside the per-worker one when several
    workers share a node."""
    if not has_nodes(summary):
        return list(HEADER)
    at = HEADER.index("bits/coord (NIC)") + 1
    return [*HEADER[:at], NODE_NIC, *HEADER[at:]]


def table_rows(summary: dict[str, Any]) -> list[list[str]]:
    rows = []
    nodes = has_nodes(summary)
    for r in summary["runs"]:
        rows.append([
            r["name"],
            _fmt(r["tta_s"], ".1f", "not reached"),
            _fmt(r.get("tta_step"), "d") + (f" ({r['tta_step_interp']:.0f})" if r.get("tta_interpolated") else ""),
            _fmt(r["speedup_vs_bf16"], ".2f") + ("×" if r["speedup_vs_bf16"] else "")
            + (f" ({r['speedup_interp_vs_bf16']:.2f}×)" if r.get("speedup_interp_vs_bf16") else ""),
            f"{r['best_accuracy']:.4f}",
            f"{r['final_accuracy']:.4f}",
            _fmt(r.get("final_test_loss"), ".4f"),
            _fmt(r["wire_bits_per_coord"], ".2f"),
            _fmt(r["nic_bits_per_coord"], ".2f"),
            *([_node_nic(r)] if nodes else []),
            _fmt(r["vnmse"], ".3g"),
            f"{1e3 * r['step_s']:.1f}",
            f"{1e3 * r['codec_s']:.1f}",
            f"{1e3 * r['comm_s']:.1f}",
        ])
    for f in summary.get("failed", []):  # a method whose run failed: recorded, never silently dropped
        rows.append([f["name"], "FAILED", *["—"] * (len(header(summary)) - 2)])
    return rows


def buckets_text(b: dict[str, Any] | None) -> str | None:
    """``10 (sizes 16,768 … 66,048 values, 6 distinct; --bucket-cap-mb 0.05)``: a run's DDP buckets after DDP
    rebuilt them (None where not recorded: --fsdp, or a result from before)."""
    if not b or not b.get("count"):
        return None
    sizes = b.get("sizes")
    cap = f"--bucket-cap-mb {b['cap_mb']:g}" if b.get("cap_mb") is not None else ""
    if not sizes:
        return f"{b['count']}" + (f" ({cap})" if cap else "")
    span = f"{sizes[0]:,} values" if len(set(sizes)) == 1 else (f"{min(sizes):,} … {max(sizes):,} values, "
                                                                 f"{len(set(sizes))} distinct")
    return f"{b['count']} (sizes {span}" + (f"; {cap})" if cap else ")")


def buckets_line(summary: dict[str, Any]) -> str | None:
    """``DDP buckets: …`` for the report's header: one text when every run had the same buckets, else per run."""
    texts = {r["name"]: buckets_text(r.get("buckets")) for r in summary["runs"]}
    got = {k: v for k, v in texts.items() if v is not None}
    if not got:
        return None
    if len(set(got.values())) == 1 and len(got) == len(texts):
        return f"DDP buckets: {next(iter(got.values()))}"
    return "DDP buckets: " + "; ".join(f"{k} {v}" for k, v in got.items())


OVERLAP_HEADER = ["method", "compute ms", "opt ms", "hook ms", "step ms", "exposed ms",
                  "step / (compute + opt + hook)", "overlap %"]


def overlap_rows(summary: dict[str, Any]) -> list[list[str]]:
    """Per run: medians over the steps after the warm-up (tailq.harness.overlap); a run without a calibration
    says why in its last cell."""
    rows = []
    for r in summary["runs"]:
        if r.get("compute_s") is None:
            if r.get("overlap_skipped"):  # (results from before the overlap was measured have no row)
                rows.append([r["name"], *["—"] * (len(OVERLAP_HEADER) - 2), "not measured"])
            continue
        ms = [_fmt(None if r.get(k) is None else 1e3 * r[k], ".2f")
              for k in ("compute_s", "opt_s", "hook_s", "overlap_step_s", "exposed_s")]
        rows.append([r["name"], *ms, _fmt(r.get("step_over_parts"), ".2f"),
                     _fmt(None if r.get("overlap") is None else 100 * r["overlap"], ".0f")])
    return rows


def overlap_skips(summary: dict[str, Any]) -> list[str]:
    """Why a run has no overlap figures (``name: reason``)."""
    return [f"{r['name']}: {r['overlap_skipped']}" for r in summary["runs"]
            if r.get("compute_s") is None and r.get("overlap_skipped")]


def overlap_text(o: dict[str, Any] | None) -> str | None:
    """One line for ``tailq train``: a run's ``overlap`` record."""
    if not o:
        return None
    if o.get("compute_s") is None:
        return f"overlap with backward: {o.get('skipped') or 'not measured'}"
    pct = "—" if o.get("overlap") is None else f"{100 * o['overlap']:.0f}%"
    return (f"overlap with backward (median of {o['steps']} steps from step {o['from_step']}, {o['basis']}): "
            f"compute {1e3 * o['compute_s']:.2f} ms + opt {1e3 * (o.get('opt_s') or 0):.2f} ms + hook "
            f"{1e3 * o['hook_s']:.2f} ms, step {1e3 * o['step_s']:.2f} ms = {o['step_over_parts']:.2f} of their "
            f"sum; {pct} of the hook's time hidden")


OVERLAP_NOTE = ("compute = one forward + backward of the step's batch without communication (median of the "
                "passes timed once after the warm-up, outside the clock, under `ddp.no_sync()`; rank 0); opt = the "
                "optimizer step, timed in every step; hook = codec + comm (the hook's time outside and inside "
                "collectives); step = wall time of the step. Medians over the steps after the warm-up. "
                "exposed = max(0, step − compute − opt): what the step waited for beyond compute and optimizer. "
                "step / (compute + opt + hook): 1 = one after the other, lower = the hook overlapped backward. "
                "overlap = 1 − exposed / hook with exposed = max(0, step − compute − opt), clipped to the hook's "
                "time (the step cannot wait for the hook longer than it ran): the share of the hook's time hidden "
                "behind backward. Exposed also holds DDP's own work outside the hook (copies into and out of its "
                "buckets, the buffer broadcast before each forward), so the overlap is a lower bound. For PyTorch's "
                "built-in hooks hook time is each bucket's time from the hook call to its all-reduce's completion, "
                "and buckets in flight together each count theirs (so hook ms can exceed step ms and the overlap "
                "reads high: compare exposed ms across methods).")


NODE_NIC = "bits/coord (node NIC)"
HEADER = ["method", "TTA (s)", "at step (interp.)", "speedup vs bf16 (interp.)", "best acc", "final acc",
          "final test loss", "bits/coord (hook)",
          "bits/coord (NIC)", "vNMSE", "step ms", "codec ms", "comm ms"]


def print_table(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    if "per_seed" in summary:  # over seeds: medians and intervals
        from rich.markup import escape

        t = Table(title=escape(f"{summary['workload']}, {workers_text(summary)}, {network_text(summary['network'])}; "
                               f"{len(summary['seeds'])} seeds, median [interval]; {_coverage_text(summary)}"))
        for h in SEED_HEADER:
            t.add_column(h, justify="left" if h == "method" else "right", no_wrap=h == "method")
        for row in seed_rows(summary):
            t.add_row(*map(escape, row))
        import sys

        Console(width=None if sys.stdout.isatty() else 200).print(t)
        return
    net = summary["network"]
    label = " [MODELED network]" if net.get("modeled") else ""
    fsdp = ", FSDP2" if summary.get("fsdp") else ""
    t = Table(title=f"{summary['workload']}, {workers_text(summary)}{fsdp}, {network_text(net)}{label}; "
                    f"{target_text(summary)}")
    for h in header(summary):
        t.add_column(h, justify="left" if h == "method" else "right", no_wrap=h == "method")
    for row in table_rows(summary):
        t.add_row(*row)
    import sys

    con = Console(width=None if sys.stdout.isatty() else 160)
    con.print(t)
    line = buckets_line(summary)
    if line:
        con.print(line, highlight=False)
    rows = overlap_rows(summary)
    if rows:
        modeled = " (wall clock: the real loopback collectives, not the modeled network)" if net.get("modeled") else ""
        o = Table(title=f"Overlap with backward{modeled}")
        for h in OVERLAP_HEADER:
            o.add_column(h, justify="left" if h == "method" else "right", no_wrap=h == "method")
        for row in rows:
            o.add_row(*row)
        con.print(o)
        for why in overlap_skips(summary):
            con.print(f"not measured: {why}", highlight=False)


def target_text(summary: dict[str, Any]) -> str:
    """``target accuracy 0.9624`` or ``target test loss 1.9870`` (a summary written before loss targets: accuracy)."""
    if summary.get("target_metric", "accuracy") == "loss":
        return f"target test loss {summary['target']:.4f}"
    return f"target accuracy {summary.get('target') or summary['target_accuracy']:.4f}"


def _target_rule(summary: dict[str, Any], per_seed: bool = False) -> str:
    f = summary["target_fraction_of_bf16_best"]
    whose = "that seed's" if per_seed else "the"
    if summary.get("target_metric", "accuracy") == "loss":
        return f"test loss within {1 - f:.0%} of {whose} bf16 run's best test loss"
    return f"{f:.0%} of {whose} bf16 run's best test accuracy"


def _load_runs(root: Path, summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    runs = {}
    for name, d in summary.get("run_dirs", {}).items():
        p = Path(d) / "result.json"
        if not p.is_absolute() and not p.is_file():
            p = root / Path(d).name / "result.json"
        if p.is_file():
            runs[name] = json.loads(p.read_text())
    return runs


def _iv(d: dict[str, Any] | None, spec: str, unit: str = "", none: str = "—") -> str:
    """``median [lo, hi]`` of an aggregate entry; an infinite end (not reached) as ∞."""
    if not d:
        return none

    def one(v: Any) -> str:
        return "∞" if v is None else format(v, spec) + unit

    if d["n"] == 1 or d["lo"] == d["hi"]:
        return one(d["median"])
    return f"{one(d['median'])} [{one(d['lo'])}, {one(d['hi'])}]"


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


SEED_HEADER = ["method", "reached", "TTA (s)", "speedup vs bf16 (paired)", "vs bf16", "steps to target",
               "best acc", "final test loss", "vNMSE", "bits/coord (hook)", "step ms", "codec ms"]


def seed_rows(summary: dict[str, Any]) -> list[list[str]]:
    rows = []
    k = len(summary["seeds"])
    for r in summary["runs"]:
        noise = "—" if r.get("inside_noise") is None else ("inside noise" if r["inside_noise"] else
                                                          ("faster" if r["speedup_vs_bf16"]["lo"] > 1 else "slower"))
        if r["name"] == summary.get("best"):
            noise += " (best)"
        elif r.get("tied_with_best"):
            noise += ", tied with best"
        ms = {kk: ({**r[kk], **{x: None if r[kk][x] is None else 1e3 * r[kk][x] for x in ("median", "lo", "hi")}}
                   if r.get(kk) else None) for kk in ("step_s", "codec_s")}
        rows.append([r["name"], f"{r['reached']}/{k}", _iv(r["tta_s_interp"], ".1f"),
                     _iv(r["speedup_vs_bf16"], ".2f", "×"), noise, _iv(r["tta_step_interp"], ".0f"),
                     _iv(r["best_accuracy"], ".4f"), _iv(r["final_test_loss"], ".4f"), _iv(r["vnmse"], ".3g"),
                     _iv(r["wire_bits_per_coord"], ".2f"), _iv(ms["step_s"], ".1f"), _iv(ms["codec_s"], ".1f")])
    for f in summary.get("failed", []):
        rows.append([f["name"], "FAILED", *["—"] * (len(SEED_HEADER) - 2)])
    return rows


def _coverage_text(summary: dict[str, Any]) -> str:
    cov = {r["tta_s_interp"]["coverage"] for r in summary["runs"] if r.get("tta_s_interp")}
    c = min(cov) if cov else 0.0
    k = len(summary["seeds"])
    short = "" if c >= summary["level"] else (f" — with {k} seeds no order-statistic interval reaches "
                                              f"{summary['level']:.0%}; [min, max] is shown and covers {c:.1%}")
    return f"intervals: {summary['interval_method']}, coverage {c:.1%}{short}"


def render(root: str | Path) -> Path:
    """Write ``report.md`` and the plots into ``root`` (a comparison directory); return the report path."""
    root = Path(root)
    summary = json.loads((root / "results.json").read_text())
    if "per_seed" in summary:
        _steps_vs_vnmse_plot(root, summary)
        (root / "report.md").write_text(_seed_markdown(summary))
        return root / "report.md"
    runs = _load_runs(root, summary)
    _plots(root, summary, runs)
    md = _markdown(summary, runs)
    (root / "report.md").write_text(md)
    return root / "report.md"


def _plots(root: Path, summary: dict[str, Any], runs: dict[str, dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modeled = " (modeled network)" if summary["network"].get("modeled") else ""
    # 1. the target's metric (accuracy, or test loss) vs training clock
    fig, ax = plt.subplots(figsize=(7, 4.5))
    loss = summary.get("target_metric", "accuracy") == "loss"
    key = "test_loss" if loss else "accuracy"
    target = float(summary.get("target") or summary["target_accuracy"])
    for name, r in runs.items():
        h = [e for e in r["history"] if e.get(key) is not None]
        ax.plot([e["clock"] for e in h], [e[key] for e in h], marker=".", label=name,
                linewidth=2.5 if r["config"]["hook"] == "bf16" else 1.5)
    ax.axhline(target, color="k", linestyle="--", linewidth=1, label="target")
    ax.set_xlabel(f"training clock (s){modeled}")
    ax.set_ylabel("test loss" if loss else "test accuracy")
    ax.set_title(f"{summary['workload']}, {workers_text(summary)}, {network_text(summary['network'])}")
    if loss:
        ax.set_yscale("log")
    else:
        lo = min(e["accuracy"] for r in runs.values() for e in r["history"]) if runs else 0
        ax.set_ylim(max(lo, target - 0.25), None)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(root / PLOTS[0], dpi=110)
    plt.close(fig)
    # 2. TTA vs bits per coordinate
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in summary["runs"]:
        x = r["wire_bits_per_coord"]
        if r["tta_s"] is None:
            ax.scatter([x], [0], marker="x", color="red")
            ax.annotate(f"{r['name']} (no TTA)", (x, 0), fontsize=7, textcoords="offset points", xytext=(3, 3))
        else:
            ax.scatter([x], [r["tta_s"]])
            ax.annotate(r["name"], (x, r["tta_s"]), fontsize=7, textcoords="offset points", xytext=(3, 3))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("wire bits per coordinate (handed to collectives)")
    ax.set_ylabel(f"time to target accuracy (s){modeled}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(root / PLOTS[1], dpi=110)
    plt.close(fig)
    # 3. vNMSE over training
    fig, ax = plt.subplots(figsize=(6, 4))
    any_vn = False
    for name, r in runs.items():
        per_step: dict[int, list[float]] = {}
        for v in r.get("vnmse", []):
            if v["vnmse"] == v["vnmse"]:
                per_step.setdefault(v["step"], []).append(v["vnmse"])
        if per_step:
            any_vn = True
            xs = sorted(per_step)
            ax.plot(xs, [float(np.mean(per_step[s])) for s in xs], marker=".", label=name)
    if any_vn:
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no vNMSE samples", ha="center", transform=ax.transAxes)
    ax.set_xlabel("step")
    ax.set_ylabel("vNMSE = ‖ĝ − ḡ‖² / ‖ḡ‖²")
    ax.set_title("compression error of the averaged gradient (tailq hooks, sampled steps)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(root / PLOTS[2], dpi=110)
    plt.close(fig)
    # 4. gradient histogram with fitted tails and alpha*
    _histogram_plot(root, summary, runs, plt)
    _steps_vs_vnmse_plot(root, summary)


STEPS_PLOT = "steps_vs_vnmse.png"


def _steps_vs_vnmse_plot(root: Path, summary: dict[str, Any]) -> None:
    """Steps to target (interpolated) and final test loss against measured vNMSE, one point per method; over seeds
    the medians with their intervals as error bars. Unreached runs at the top, marked ×."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    multi = "per_seed" in summary

    def get(r: dict[str, Any], key: str) -> tuple[float | None, float | None, float | None]:
        v = r.get(key)
        if multi:
            return (None, None, None) if not v else (v["median"], v["lo"], v["hi"])
        return v, v, v

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    cmap = plt.get_cmap("tab10")
    comps = sorted({r["compressor"] for r in summary["runs"]})
    top = max([get(r, "tta_step_interp")[0] or 0 for r in summary["runs"]] + [1.0])
    markers = {1: "s", 2: "v", 3: "o", 4: "^", 5: "D", 6: "P", 8: "*"}
    curves: dict[tuple[str, int], list[tuple[float, float, float]]] = {}  # (compressor, axis): (bits, vNMSE, y)
    for r in summary["runs"]:
        vn = get(r, "vnmse")[0]
        if vn is None or vn <= 0:
            continue
        color = cmap(comps.index(r["compressor"]) % 10)
        bits = r.get("bits")
        for i, (ax, key) in enumerate(zip(axes, ("tta_step_interp", "final_test_loss"), strict=True)):
            y, lo, hi = get(r, key)
            if y is None:
                if key == "tta_step_interp":
                    ax.scatter([vn], [1.1 * top], marker="x", color=color)
                    ax.annotate(f"{r['name']} (not reached)", (vn, 1.1 * top), fontsize=6, xytext=(3, 3),
                                textcoords="offset points")
                continue
            yerr = None
            if multi and lo is not None:
                yerr = [[y - lo], [(hi if hi is not None else 1.1 * top) - y]]
            ax.errorbar([vn], [y], yerr=yerr, fmt=markers.get(bits, "o") if isinstance(bits, int) else "o",
                        color=color, capsize=3, markersize=5)
            ax.annotate(r["name"], (vn, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
            if isinstance(bits, int) and not isinstance(bits, bool):
                curves.setdefault((r["compressor"], i), []).append((bits, vn, y))
    for (comp, i), pts in curves.items():  # one compressor across bit widths: a line from fewer bits to more
        if len({b for b, _, _ in pts}) > 1:
            pts.sort()
            axes[i].plot([p[1] for p in pts], [p[2] for p in pts], color=cmap(comps.index(comp) % 10),
                         linewidth=0.8, alpha=0.6, label=comp if i == 0 else None)
    if any(i == 0 and len(p) > 1 for (_, i), p in curves.items()):
        axes[0].legend(fontsize=7, title="line: bits ↑ (▼2 ●3 ▲4)", title_fontsize=7)
    for ax, lab in zip(axes, ("steps to target (interpolated)", "final test loss"), strict=True):
        ax.set_xscale("log")
        ax.set_xlabel("measured vNMSE of the averaged gradient (mean of the run's samples, warm-up left out)")
        ax.set_ylabel(lab)
        ax.grid(alpha=0.3)
    seeds = f", median and interval over {len(summary['seeds'])} seeds" if multi else ""
    fig.suptitle(f"{summary['workload']}, {workers_text(summary)}: error against convergence{seeds}")
    fig.tight_layout()
    fig.savefig(root / STEPS_PLOT, dpi=110)
    plt.close(fig)


def _seed_markdown(summary: dict[str, Any]) -> str:
    net = summary["network"]
    k = len(summary["seeds"])
    per_seed = summary.get("target_per_seed", summary.get("target_accuracy_per_seed", {}))
    targets = ", ".join(f"{float(v):.4f}" for v in per_seed.values())
    lines = [
        f"# tailq comparison {summary.get('id', '')} over {k} seeds",
        "",
        f"- workload: **{summary['workload']}** — {summary.get('workload_note', '')}",
        f"- workers: {workers_text(summary)}, steps per run: {summary['steps']}, seeds {summary['seeds']}",
        f"- network: **{network_text(net)}**" + (" (MODELED)" if net.get("modeled") else "") + _schedule_note(net),
        f"- target per seed ({_target_rule(summary, per_seed=True)}): {targets}",
        f"- {_coverage_text(summary)}",
        f"- TTA: {summary['tta']}; not reached counts as ∞ (so a median can be finite when some seeds missed)",
        "- speedup paired by seed: bf16's TTA / the method's, in the same seed (same data order and "
        "initialization); **inside noise**: its interval contains 1. *tied with best*: the paired ratio against the "
        "best method's TTA has an interval reaching 1.",
        f"- machine: {summary.get('machine', {})}, date {summary.get('date', '')}",
        "",
        "Each cell: median [interval]. Every seed is a complete comparison in `seed<S>/` (its report, runs and "
        "plots); `results.json` keeps them all under `per_seed`.",
        "",
        *_md_table(SEED_HEADER, seed_rows(summary)),
    ]
    for f in summary.get("failed", []):
        first = f["error"].strip().splitlines()[0] if f["error"].strip() else "(no message)"
        lines += ["", f"**{f['name']} FAILED**: {first}"]
    lines += ["", *[f"> note: {n}" for n in summary.get("notes", [])], ""]
    lines += ["## Error against convergence", "", f"![{STEPS_PLOT}]({STEPS_PLOT})", ""]
    lines += ["## Per seed", ""] + [f"- seed {sm['seed']}: [report](seed{sm['seed']}/report.md)"
                                    for sm in summary["per_seed"]]
    return "\n".join(lines) + "\n"


def _histogram_plot(root: Path, summary: dict[str, Any], runs: dict[str, dict[str, Any]], plt: Any) -> None:
    from tailq import theory

    sample_dir = None
    for name, r in runs.items():
        d = Path(summary["run_dirs"][name])
        d = d if d.is_dir() else root / d.name
        if (d / "grad_sample.npy").is_file() and (sample_dir is None or r["config"]["hook"] in ("tnq", "tuq", "tbq")):
            sample_dir = d
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if sample_dir is None:  # (--fsdp runs take no local gradient sample)
        ax.text(0.5, 0.5, "no gradient sample", ha="center", transform=ax.transAxes)
    else:
        g = np.load(sample_dir / "grad_sample.npy")
        a = np.abs(g[g != 0]).astype(np.float64)
        edges = np.logspace(np.log10(a.min()), np.log10(a.max()), 80)
        dens, _ = np.histogram(a, bins=edges, density=True)
        mids = np.sqrt(edges[1:] * edges[:-1])
        ax.loglog(mids, dens, drawstyle="steps-mid", label=f"|g| of the local gradient ({sample_dir.name}, last probe)")
        lap = theory.fit_laplace(a)
        ax.loglog(mids, 2 * lap.pdf(mids), label=f"Laplace fit, scale {lap.scale:.2e}")
        try:
            pl = theory.fit_powerlaw(a)
            ax.loglog(mids, 2 * pl.tail.pdf(mids) , label=f"power-law fit, m={pl.m:.2e}, γ={pl.gamma:.2f}")
        except ValueError:
            pass
        emp = theory.EmpiricalTail(theory.LogHistogram.from_samples(g))
        for tail, name, style in ((emp, "empirical", "-"), (lap, "Laplace", ":")):
            try:
                alpha = theory.design("tnq", tail, 3).alpha
                ax.axvline(alpha, color="k", linestyle=style, linewidth=1, label=f"TNQ 3-bit α* ({name}) = {alpha:.2e}")
            except ValueError:
                pass
        ax.axvline(a.max(), color="r", linewidth=0.8, label=f"max |g| = {a.max():.2e}")
        ax.set_ylim(max(dens[dens > 0].min() / 10, 1e-12), None)
    ax.set_xlabel("|g|")
    ax.set_ylabel("density")
    ax.set_title("gradient magnitudes: heavy tail, fitted models and the truncation threshold")
    if sample_dir is not None:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(root / PLOTS[3], dpi=110)
    plt.close(fig)


def _schedule_note(net: dict[str, Any]) -> str:
    """After the network line, where ``--net-schedule`` changed the rate: how, and what the hook was told."""
    if not net.get("schedule_spec"):
        return ""
    return (f"; the rate changes mid-run (`--net-schedule {net['schedule_spec']}`, steps counted from 0), the hook "
            "was told only the starting rate")


def _markdown(summary: dict[str, Any], runs: dict[str, dict[str, Any]]) -> str:
    net = summary["network"]
    kind = "emulated (network namespaces, tc)" if net.get("emulated") else ("MODELED: communication time from the "
                                                                          "cost model, not measured"
                                                                          if net.get("modeled") else "loopback")
    lines = [
        f"# tailq comparison {summary.get('id', '')}",
        "",
        f"- workload: **{summary['workload']}** — {summary.get('workload_note', '')}",
        f"- workers: {workers_text(summary)}, steps per run: {summary['steps']}, seed {summary.get('seed', 0)}",
        f"- network: **{network_text(net)}** ({kind}){_schedule_note(net)}",
        *([] if not summary.get("fsdp") else [
            "- **FSDP2** (`--fsdp`): gradients leave through FSDP2's reduce-scatter (`fully_shard` per transformer "
            "layer and the root, one fp32 parameter all-gather per step, the same for every method, and not in "
            "bits/coord); `bf16` = FSDP2's own reduce-scatter in bf16 (on Gloo an all-reduce: its ring traffic is "
            "an all-reduce's), `bf16(reduce=a2a)` = the same values by one all-to-all (a real reduce-scatter's "
            "traffic), the truncated quantizers = `tailq.fsdp.compress`"]),
        f"- {target_text(summary).replace('target ', 'target: ', 1)} = {_target_rule(summary)}",
        *([f"- {buckets_line(summary)}"] if buckets_line(summary) else []),
        f"- machine: {summary.get('machine', {})}, date {summary.get('date', '')}",
        "",
        "TTA = training clock (evaluation excluded) at the first evaluation reaching the target (at step: that "
        "evaluation's step, so TTA ≈ step time × steps); speedup = TTA_bf16 / TTA. In parentheses, the same "
        "not quantized by the evaluation period: the step and clock where the target's metric crosses it, "
        "interpolated linearly between the last evaluation below it and the first at or above it (shown where the "
        "crossing is between two evaluations). bits/coord (hook) = bytes "
        "handed to collectives by the hook, metadata included; bits/coord (NIC) = "
        "bytes sent on the worker's emulated interface (TCP/IP headers and vNMSE measurement traffic included)"
        + (f"; with {summary.get('node_size')} workers per node they share one interface, so that column is empty "
           "and bits/coord (node NIC) = bytes sent on each node's interface (mean over nodes), with the hook's own "
           "account of them in parentheses where it gives one" if has_nodes(summary) else "") + ". "
        "step/codec/comm = mean wall time per step / in the hook's encode+decode / waiting on collectives (the "
        "hook's work overlaps backward).",
        "",
        *_md_table(header(summary), table_rows(summary)),
    ]
    warm = [f"{r['name']} {r['kernel_warmup_s']:.1f} s" for r in summary["runs"] if r.get("kernel_warmup_s")]
    if warm:
        lines += ["", "One-time compilation of the fused codec kernels before training (not in the training clock, "
                  "once per process; inductor's on-disk cache shortens it in later processes): " + ", ".join(warm)
                  + "."]
    ext = [f"{r['name']} ({r['steps']} steps)" for r in summary["runs"] if r.get("extended")]
    if ext:
        lines += ["", f"Below the target when the {summary['steps']}-step budget ended, so trained on until "
                  "reaching it (up to 3× the steps, within 3× bf16's clock; final accuracy is at that step): "
                  + ", ".join(ext) + "."]
    for f in summary.get("failed", []):
        first = f["error"].strip().splitlines()[0] if f["error"].strip() else "(no message)"
        lines += ["", f"**{f['name']} FAILED**: {first} (its error and every rank's log tail: "
                  f"`{f['name']}/failed.json`; rerun it with `tailq compare --resume DIR`)"]
    lines += ["", *[f"> note: {n}" for n in summary.get("notes", [])], ""]
    lines += _overlap_section(summary)
    lines += ["## Plots", ""] + [f"![{p}]({p})" for p in (*PLOTS, STEPS_PLOT)]
    lines += _routes_section(runs)
    lines += _loop_section(runs)
    lines += _diloco_section(summary, runs)
    tails = []
    for name, r in runs.items():
        if r["history"] and "tail" in r["history"][-1]:
            t = r["history"][-1]["tail"]
            tails.append(f"| {name} | {t.get('excess_kurtosis', float('nan')):.1f} | {t.get('laplace_scale', 0):.3g} | "
                         f"{t.get('powerlaw_m', float('nan')):.3g} | {t.get('powerlaw_gamma', float('nan')):.2f} | "
                         f"{_fmt(r['history'][-1].get('alpha_max'), '.3g')} |")
    if tails:
        lines += ["", "## Gradient tails at the last evaluation (local gradient of rank 0)", "",
                  "| run | excess kurtosis | Laplace scale | power-law m | power-law γ | α* (largest bucket) |",
                  "|---|---:|---:|---:|---:|---:|", *tails]
    return "\n".join(lines) + "\n"


def _overlap_section(summary: dict[str, Any]) -> list[str]:
    rows = overlap_rows(summary)
    if not rows:
        return []
    modeled = (" The network is MODELED: these figures are of the wall clock and the real (loopback) collectives; "
               "the modeled clock takes the hook's measured waits out of the step and adds the cost model's "
               "communication time in full, as if none of it overlapped." if summary["network"].get("modeled")
               else "")
    skips = [f"- not measured: {why}" for why in overlap_skips(summary)]
    return ["## Overlap with backward", "", OVERLAP_NOTE + modeled, "", *_md_table(OVERLAP_HEADER, rows),
            *([""] + skips if skips else []), ""]


def _routes_section(runs: dict[str, dict[str, Any]]) -> list[str]:
    """Which route each bucket size took under route=auto, and why: every candidate's modeled seconds."""
    rows = []
    for name, r in runs.items():
        plan = r.get("plan") or {}
        for numel, why in sorted((plan.get("buckets") or {}).items(), key=lambda kv: int(kv[0])):
            cands = why.get("candidates", {})
            costs = ", ".join(f"{k} {1e3 * (v['comm_s'] + v['codec_s']):.3g}"
                              + (f" ({1e3 * v['codec_s']:.2g} codec)" if v["codec_s"] else "")
                              for k, v in sorted(cands.items(), key=lambda kv: kv[1]["comm_s"] + kv[1]["codec_s"]))
            rows.append(f"| {name} | {int(numel):,} | **{why['route']}** | {costs} |")
        if plan.get("buckets"):
            net = plan.get("network", {})
            src = {"given": "the run's --net", "fitted": "fitted from the warm-up's timed bf16 all-reduces",
                   "default": "the planning default (nothing known)"}.get(plan.get("network_source", ""), "")
            codec = plan.get("codec_ns_per_elem_pass")
            rows.append(f"| {name} | | planned against {net.get('describe', '?')} ({src})"
                        + (f"; codec {codec:.3g} ns per element and pass, measured" if codec else "") + " | |")
    if not rows:
        return []
    return ["", "## Routes (route=auto): the cost model's choice per bucket size", "",
            "Modeled milliseconds per bucket and step for every candidate (communication from the cost model + "
            "the codec's measured cost), cheapest first; passthrough is bf16 as PyTorch's hook.", "",
            "| run | bucket (values) | route | candidates, ms |", "|---|---:|---|---|", *rows]


def _loop_section(runs: dict[str, dict[str, Any]]) -> list[str]:
    """The closed loop of route=auto per bucket: the model's plan, each arm's cost (measured on the critical path,
    max over ranks, or modeled where never run), the route at the end, probes, and every switch with its reason."""
    rows, switches, direct = [], [], []
    for name, r in runs.items():
        loop = (r.get("plan") or {}).get("loop") or {}
        if loop and r.get("direct_buckets"):
            direct.append(f"- {name}: {r['direct_buckets']:,} bucket-steps went as bf16 straight from DDP's thread "
                          f"(no worker hop; rank 0)")
        modules = (r.get("plan") or {}).get("loop_modules") or {}  # FSDP: the loop is per module, named here
        for idx, b in sorted(loop.items(), key=lambda kv: int(kv[0])):
            costs = ", ".join(f"{route} {ms:.3g}" + ("" if b["measured"].get(route) else " (modeled)")
                              for route, ms in b["costs_ms"].items())
            which = f"{idx} ({modules[idx]})" if idx in modules else idx
            rows.append(f"| {name} | {which} | {int(b['numel']):,} | {b['planned']} | **{b['route']}** | {costs} | "
                        f"{b['probes']} | {len(b['switches'])} |")
            switches += [f"- {name}, {'module' if idx in modules else 'bucket'} {which}, step {w['step']}: "
                         f"{w['from']} → **{w['to']}** ({w['why']})" for w in b["switches"]]
    if not rows:
        return []
    return ["", "## Routes (route=auto): what the closed loop measured and switched", "",
            "Per bucket: the cost model's plan, then each arm's milliseconds on the critical path (the hook's time "
            "for the bucket, codec + collectives + waiting for the slowest rank; the max over ranks of each decision "
            "window's median), the route at the end of the run, probes of the other arm and switches "
            "(tailq.comm.adapt).", "",
            "| run | bucket | values | planned | route at the end | ms per step (last measured) | probes | switches |",
            "|---|---:|---:|---|---|---|---:|---:|", *rows, "", *(switches or ["- no switch"]), *direct]


def _tail_cells(t: dict[str, Any] | None) -> str:
    t = t or {}
    return (f"{_fmt(t.get('excess_kurtosis'), '.1f')} | {_fmt(t.get('powerlaw_gamma'), '.2f')} | "
            f"{_fmt(t.get('powerlaw_tail_fraction'), '.3f')}")


def _diloco_section(summary: dict[str, Any], runs: dict[str, dict[str, Any]]) -> list[str]:
    """DiLoCo runs: the outer loop (H, F, τ, syncs), its traffic (bits per synced coordinate, per parameter and
    step), the outer mean's vNMSE against the exact fp32 mean (every sync), and the pseudo-gradient's tails beside
    the per-step gradient's at the last evaluation (rank 0's; SPEC's tail fit)."""
    rows = []
    for row in summary["runs"]:
        d = row.get("diloco")
        if not d:
            continue
        r = runs.get(row["name"]) or {}
        hist = r.get("history") or [{}]
        last = hist[-1]
        rows.append(f"| {row['name']} | {d.get('sync_every')} | {d.get('fragments', 1)} | {d.get('delay', 0)} | "
                    f"{_fmt(row.get('outer_syncs'), 'd')} | {_fmt(row.get('outer_bits_per_synced_coord'), '.2f')} | "
                    f"{_fmt(row.get('wire_bits_per_coord'), '.3f')} | {_fmt(row.get('outer_vnmse'), '.3g')} | "
                    f"{_tail_cells(last.get('outer_tail'))} | {_fmt(last.get('outer_alpha_max'), '.3g')} | "
                    f"{_tail_cells(last.get('tail'))} |")
    if not rows:
        return []
    return ["", "## DiLoCo: the outer loop, its traffic and error, pseudo-gradient tails", "",
            "H inner steps between a fragment's syncs, F fragments, τ steps a mean overlaps before it merges. Bits: "
            "the outer collectives' bits per synced coordinate, and per parameter and inner step (what a per-step "
            "hook's bits compare to). Outer vNMSE: every sync's mean against the exact fp32 mean (measured, not "
            "charged). Tails of rank 0's last pseudo-gradient and of its local gradient of one batch at the last "
            "evaluation: excess kurtosis, the fitted power-law γ and the fraction of values in the fitted tail; "
            "α*: the truncated quantizer's clipping threshold at the last sync (absolute).", "",
            "| run | H | F | τ | syncs | bits/synced coord | bits/param/step | outer vNMSE | Δ kurtosis | Δ γ | "
            "Δ tail frac | α* | grad kurtosis | grad γ | grad tail frac |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|", *rows]
