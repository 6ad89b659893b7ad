"""Bit-identity check for refactors: final parameter checksum and wire bytes per kind of short training runs.

    .venv/bin/python benchmarks/identity_check.py --out before.json            # before the change
    .venv/bin/python benchmarks/identity_check.py --out after.json --against before.json

Each method trains through the public CLI contract (``tailq train --net none --steps 50 --workers 4``, digits)
so the check does not depend on internal APIs; a run is deterministic given its configuration (counter-based
randomness, fixed bucket layout, loopback Gloo). ``--against`` compares checksums and per-kind wire bytes
exactly and exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

# the default comparison's methods, then the other paths of the hook (routes, policies, families, feedback)
METHODS = [
    "fp32", "bf16", "powersgd", "qsgd:4", "tuq:3:redesign_every=10", "tnq:3:redesign_every=10",
    "tbq:3:redesign_every=10",
    "tnq:3", "tnq:3:stale_stats=true", "tnq:3:route=allreduce,error_feedback=true", "tuq:3:tail=laplace",
    "tbq:3:tail=powerlaw", "single-scale:4", "multi-scale:4", "multi-scale:3:granularity=element,route=allgather",
    "nuqsgd:4", "terngrad", "efsign:error_feedback=true", "topk:ratio=0.01,error_feedback=true",
    "tnq:3:route=allgather,error_feedback=truncation",
]


def run(method: str, root: Path, steps: int, workers: int) -> dict[str, object]:
    parts = method.split(":")
    cmd = [sys.executable, "-m", "tailq.cli", "train", "--compressor", parts[0], "--net", "none", "--steps", str(steps),
           "--workers", str(workers), "--run-dir", str(root / method.replace(":", "_").replace(",", "_"))]
    for p in parts[1:]:
        if p.isdigit():
            cmd += ["--bits", p]
        else:
            for kv in p.split(","):
                cmd += ["--option", kv]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{method}: failed\n{proc.stdout}\n{proc.stderr}")
    res = json.loads((root / method.replace(":", "_").replace(",", "_") / "result.json").read_text())
    kinds = {k: v["handed_bytes"] for k, v in sorted(res["wire"]["by_kind"].items())}
    return {"checksum": res["final_params_checksum"], "handed_bytes": kinds, "steps": res["steps_done"],
            "final_accuracy": res["history"][-1]["accuracy"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--against")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--methods", nargs="+", default=METHODS)
    args = ap.parse_args()
    out: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for m in args.methods:
            out[m] = run(m, Path(tmp), args.steps, args.workers)
            print(m, json.dumps(out[m]), flush=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    if not args.against:
        return 0
    ref = json.loads(Path(args.against).read_text())
    bad = [m for m in out if m in ref and out[m] != ref[m]]
    for m in bad:
        print(f"DIFFERENT {m}:\n  before {ref[m]}\n  after  {out[m]}")
    print(f"{len(out) - len(bad)}/{len(out)} identical")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
