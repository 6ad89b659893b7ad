"""The multi-node comparison tables of BENCHMARKS.md ("Several workers per node"), from recorded summaries.

    python benchmarks/nodes_table.py benchmarks/results/compare_digits-2x4-50mbit.json [...]

Per run: TTA, speedup against bf16 and against the flat route of the same compressor (``route=twophase`` for TNQ,
``route=allreduce`` for TUQ; interpolated in parentheses), and the bits leaving each node's NIC per coordinate —
measured on the node's interface, the same less the vNMSE measurement's own traffic (``measure_every``; fp32
all-reduces that are not the method's, counted from the hook's wire log), and the hook's own count of the method's
collectives (payload, statistics, the warm-up's bf16 step). The per-run ``wire`` records sit in ``runs`` of the
summary (``wire_by_kind``) when this script's companion results were written with them; otherwise the measured
column stands alone. ``--record RUN_DIR SUMMARY OUT``: add them from a comparison's run directory and write
``OUT``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

FLAT = {"route=hier-twophase": "route=twophase", "route=hier-allreduce": "route=allreduce",
        "route=hier-allgather": "route=allgather"}


def flat_of(name: str) -> str | None:
    for hier, flat in FLAT.items():
        if hier in name:
            return name.replace(hier, flat)
    return None


def table(summary: dict[str, Any]) -> str:
    runs = {r["name"]: r for r in summary["runs"]}
    lines = [f"{summary['workload']}, {summary['workers']} workers on {summary['nodes']} nodes, "
             f"{summary['network']['rate']}, seed {summary['seed']}, target {summary['target']:.4g}",
             "",
             "| method | TTA (s) | × bf16 (interp.) | × flat route (interp.) | node NIC bits/coord measured | "
             "less vNMSE measurement | hook's count | vNMSE | step ms | codec ms | comm ms |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in runs.items():
        flat = runs.get(flat_of(name) or "")
        vs_flat = "—"
        if flat and r.get("tta_s") and flat.get("tta_s"):
            vs_flat = (f"{flat['tta_s'] / r['tta_s']:.2f}× "
                       f"({flat['tta_s_interp'] / r['tta_s_interp']:.2f}×)")
        measure = r.get("node_nic_bits_measure")
        less = "—" if measure is None or r.get("node_nic_bits_per_coord") is None else \
            f"{r['node_nic_bits_per_coord'] - measure:.2f}"
        fmt = lambda v, f: "—" if v is None else format(v, f)  # noqa: E731
        tta = fmt(r.get("tta_s"), ".1f")
        sp = "—" if r.get("speedup_vs_bf16") is None else \
            f"{r['speedup_vs_bf16']:.2f}× ({r['speedup_interp_vs_bf16']:.2f}×)"
        lines.append(f"| {name} | {tta} | {sp} | {vs_flat} | {fmt(r.get('node_nic_bits_per_coord'), '.2f')} | "
                     f"{less} | {fmt(r.get('node_nic_bits_per_coord_model'), '.2f')} | {fmt(r.get('vnmse'), '.3f')} | "
                     f"{1e3 * r['step_s']:.1f} | {1e3 * r['codec_s']:.1f} | {1e3 * r['comm_s']:.1f} |")
    return "\n".join(lines)


def add_measure_bits(summary: dict[str, Any], run_root: Path) -> None:
    """``node_nic_bits_measure``: the vNMSE measurement's bits per coordinate on each node's NIC, from each run's
    result.json wire log (its ``measure`` kind; the node's L ranks issue the same)."""
    for r in summary["runs"]:
        res = run_root / r["name"] / "result.json"
        if not res.is_file():
            continue
        wire = json.loads(res.read_text())["wire"]
        m = wire.get("by_kind", {}).get("measure")
        if m is not None and wire.get("coords"):
            r["node_nic_bits_measure"] = 8 * wire.get("node_size", 1) * m["node_nic_bytes"] / wire["coords"]


if __name__ == "__main__":
    if sys.argv[1:2] == ["--record"]:
        run_dir, src, out = sys.argv[2:5]
        data = json.loads(Path(src).read_text())
        add_measure_bits(data, Path(run_dir))
        Path(out).write_text(json.dumps(data, indent=1))
        sys.exit(0)
    for path in sys.argv[1:]:
        print(table(json.loads(Path(path).read_text())))
        print()
