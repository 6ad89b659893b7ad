"""A comparison across bit widths, one row per compressor and one column group per width: the [Y1] reading.

Reads the ``results.json`` of a ``tailq compare`` over several seeds (``--preset y1 --seeds K``) and prints, for
each compressor at each bit width, the median [min, max] over seeds of the steps to target (interpolated), the
measured vNMSE, the final test loss and the TTA speedup against bf16 paired by seed, as a markdown table. Also
the within-seed check of [Y1]: at each width, in how many seeds the truncated quantizer with the least error
(TNQ) needed fewer steps than QSGD, and the rank correlation between vNMSE and steps over every method and seed.

    .venv/bin/python benchmarks/bits_table.py benchmarks/results/compare_y1-charlm-n8_seeds3.json
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from scipy.stats import spearmanr

from tailq.harness.report import _iv  # median [lo, hi], ∞ for not reached: as the reports print it

FAMILIES = ("qsgd", "nuqsgd", "tuq", "tnq", "tbq")


def table(summary: dict[str, Any]) -> list[str]:
    rows = {(r["compressor"], r["bits"]): r for r in summary["runs"]}
    widths = sorted({b for (c, b) in rows if c in FAMILIES and isinstance(b, int)})
    out = ["| method | bits | steps to target | vNMSE | final test loss | speedup vs bf16 (paired) |",
           "|---|---:|---:|---:|---:|---:|"]
    base = next(r for r in summary["runs"] if r["compressor"] == "bf16")
    out.append(f"| bf16 | 16 | {_iv(base['tta_step_interp'], '.0f')} | — | {_iv(base['final_test_loss'], '.4f')} "
               "| 1.00× |")
    for b in widths:
        for c in FAMILIES:
            r = rows.get((c, b))
            if r is None:
                continue
            out.append(f"| {c} | {b} | {_iv(r['tta_step_interp'], '.0f')} | {_iv(r['vnmse'], '.3g')} | "
                       f"{_iv(r['final_test_loss'], '.4f')} | {_iv(r['speedup_vs_bf16'], '.2f', '×')} |")
    return out


def within_seed(summary: dict[str, Any]) -> list[str]:
    """Per seed, steps and vNMSE of every method: TNQ against QSGD at equal bits, and the rank correlation."""
    lines = []
    per: dict[tuple[str, int], dict[int, dict[str, Any]]] = {}
    for sm in summary["per_seed"]:
        for r in sm["runs"]:
            if r["compressor"] in FAMILIES:
                per.setdefault((r["compressor"], r["bits"]), {})[int(sm["seed"])] = r
    seeds = [int(s) for s in summary["seeds"]]
    widths = sorted({b for (_, b) in per})
    for b in widths:
        q, t = per.get(("qsgd", b), {}), per.get(("tnq", b), {})
        if not q or not t:
            continue

        wins = sum(_steps(t[s]) < _steps(q[s]) for s in seeds if s in t and s in q)
        lines.append(f"- {b} bits: TNQ needed fewer steps than QSGD in {wins} of {len(seeds)} seeds")
    xs, ys = [], []
    for runs in per.values():
        for r in runs.values():
            if r["vnmse"] is not None:
                xs.append(r["vnmse"])
                ys.append(steps_or_cap(r, summary))
    rho = spearmanr(xs, ys)
    lines.append(f"- Spearman rank correlation of vNMSE and steps to target over {len(xs)} (method, seed) runs: "
                 f"ρ = {rho.statistic:.2f} (p = {rho.pvalue:.2g}; an unreached target ranks last)")
    return lines


def _steps(r: dict[str, Any]) -> float:
    v = r["tta_step_interp"]
    return math.inf if v is None else float(v)


def steps_or_cap(r: dict[str, Any], summary: dict[str, Any]) -> float:
    v = r["tta_step_interp"]
    return float(v) if v is not None else 3.0 * float(summary["steps"]) + 1.0  # past the longest run: last


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", help="results.json of tailq compare --seeds K")
    s = json.loads(open(ap.parse_args().results).read())
    if "per_seed" not in s:
        raise SystemExit("bits_table.py needs a multi-seed comparison (tailq compare --seeds K)")
    print("\n".join(table(s)))
    print()
    print("\n".join(within_seed(s)))


if __name__ == "__main__":
    main()
