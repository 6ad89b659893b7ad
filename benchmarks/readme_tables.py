"""The README's headline tables, generated from recorded comparison summaries (``benchmarks/results/*.json``).

    python benchmarks/readme_tables.py            # rewrite every generated block of README.md from its files
    python benchmarks/readme_tables.py --check    # exit 1 naming the blocks that differ from their files

A generated block is everything between the two markers

    <!-- generated: NAME from benchmarks/results/A.json by benchmarks/readme_tables.py; do not edit -->
    <!-- end generated: NAME -->

(paths relative to the repository root; a kind that reads several files lists them: ``from A.json, B.json by``).
NAME is a kind, optionally with a ``-label`` to tell two blocks of one kind apart (``main``, ``speedups``,
``main-charlm``):

- ``main``: one summary's table, as ``tailq compare`` writes it into its ``report.md`` (the same code,
  :mod:`tailq.harness.report`): one seed's table, or over seeds the medians and intervals; above it a caption from
  the summary's own fields (workload, workers, network, seeds, step budget, target, date, machine).
- ``speedups``: speedup vs bf16 per method across several summaries, one column per file named from its workload
  and network (the cell is the report's speedup cell; ``not reached``: the method never reached the target; ``—``:
  not in that comparison).
- ``nodes``: benchmarks/nodes_table.py's multi-node tables, one per file.

To refresh after recording a comparison: copy its summary (``tailq compare --json PATH``, or ``<run>/results.json``)
over the file a block names, or point the block's marker at a new file, and run this script. The README states no
figure or date of its own in these blocks; tests/test_readme_results.py fails when a block differs from its files.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tailq.harness.report import (
    SEED_HEADER,
    _coverage_text,
    _md_table,
    _target_rule,
    header,
    seed_rows,
    table_rows,
    target_text,
    workers_text,
)

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SCRIPT = "benchmarks/readme_tables.py"
START = re.compile(r"<!-- generated: (?P<name>[A-Za-z0-9_.-]+) from (?P<files>[^<>]+?) by "
                   + re.escape(SCRIPT) + r"; do not edit -->")
END = "<!-- end generated: {name} -->"

Summary = dict[str, Any]


# ---- the tables ------------------------------------------------------------------------------------------------

def multi_seed(summary: Summary) -> bool:
    return "per_seed" in summary


def report_table(summary: Summary) -> tuple[list[str], list[list[str]]]:
    """The comparison report's table (:mod:`tailq.harness.report`): its header and rows, one seed or over seeds."""
    if multi_seed(summary):
        return list(SEED_HEADER), seed_rows(summary)
    return header(summary), table_rows(summary)


def _when(summary: Summary) -> str:
    return str(summary.get("date") or "an unrecorded date").replace("T", " ")


def _machine(summary: Summary) -> str:
    m = summary.get("machine") or {}
    parts = [str(m["platform"])] if m.get("platform") else []
    parts += [f"{m['cpus']} CPUs"] if m.get("cpus") else []
    parts += [f"Python {m['python']}"] if m.get("python") else []
    return ", ".join(parts) or "an unrecorded machine"


def setting(summary: Summary) -> str:
    """``digits, 4 workers, emulated 50 Mbit/s`` (FSDP2 and a modeled network said)."""
    net = summary["network"]
    return (f"{summary['workload']}, {workers_text(summary)}{', FSDP2' if summary.get('fsdp') else ''}, "
            f"{net['rate']}{' (MODELED network)' if net.get('modeled') else ''}")


def seeds_text(summary: Summary) -> str:
    if multi_seed(summary):
        return f"seeds {', '.join(str(s) for s in summary['seeds'])}"
    return f"seed {summary.get('seed', 0)}"


def caption(summary: Summary) -> str:
    """One line: what the table measured, and when and where, from the summary's own fields."""
    if multi_seed(summary):
        per_seed = summary.get("target_per_seed") or summary.get("target_accuracy_per_seed") or {}
        targets = ", ".join(f"{float(v):.4f}" for v in per_seed.values())
        target = f"target per seed {targets} ({_target_rule(summary, per_seed=True)})"
        cells = f"; each cell median [interval], speedup paired by seed; {_coverage_text(summary)}"
    else:
        target = f"{target_text(summary)} ({_target_rule(summary)})"
        cells = ""
    return (f"**{setting(summary)}**; {seeds_text(summary)}; bf16's step budget {summary['steps']}; {target}{cells}; "
            f"recorded {_when(summary)} on {_machine(summary)}.")


def main_table(summary: Summary) -> str:
    """The ``main`` block: the caption, then the report's table."""
    return "\n".join([caption(summary), "", *_md_table(*report_table(summary))])


def speedup_cells(summary: Summary) -> dict[str, str]:
    """Method name -> its speedup vs bf16 as the report's table writes it; ``not reached`` where the method never
    reached the target (over seeds: in no seed; in some: how many did), ``FAILED`` where its run failed."""
    head, rows = report_table(summary)
    col = next(i for i, h in enumerate(head) if h.startswith("speedup vs bf16"))
    out: dict[str, str] = {}
    for row in rows:
        cell, status = row[col], row[1]  # status: "TTA (s)" for one seed, "reached" over seeds
        if status == "FAILED":
            cell = "FAILED"
        elif multi_seed(summary):
            reached, k = status.split("/")
            cell = "not reached" if reached == "0" else cell + ("" if reached == k else f" ({status} reached)")
        elif status == "not reached":
            cell = "not reached"
        out.setdefault(row[0], cell)
    return out


def column_labels(summaries: list[Summary]) -> list[str]:
    """``digits, emulated 50 Mbit/s`` per file; the workers too where they differ, the run id where two collide."""
    workers = len({workers_text(s) for s in summaries}) > 1
    labels = [f"{s['workload']}{', ' + workers_text(s) if workers else ''}{', FSDP2' if s.get('fsdp') else ''}, "
              f"{s['network']['rate']}" + (f", {len(s['seeds'])} seeds" if multi_seed(s) else "") for s in summaries]
    return [f"{lab} ({s.get('id', i)})" if labels.count(lab) > 1 else lab
            for i, (lab, s) in enumerate(zip(labels, summaries, strict=True))]


def speedup_table(summaries: list[Summary]) -> str:
    """The ``speedups`` block: speedup vs bf16 per method (rows in order of first appearance) and file (columns)."""
    cells = [speedup_cells(s) for s in summaries]
    methods = list(dict.fromkeys(name for c in cells for name in c))
    labels = column_labels(summaries)
    rows = [[m, *(c.get(m, "—") for c in cells)] for m in methods]
    per_file = "; ".join(
        f"{lab}: {workers_text(s)}, bf16's step budget {s['steps']}, {seeds_text(s)}, recorded {_when(s)}"
        for lab, s in zip(labels, summaries, strict=True))
    text = ("Speedup vs bf16 = bf16's time to target / the method's (as each report's table gives it: over seeds "
            "the median [interval], paired by seed; in parentheses, interpolated between evaluations, where "
            "recorded). *not reached*: never reached the target within its extended budget; —: not in that "
            f"comparison. Columns: {per_file}.")
    return "\n".join([text, "", *_md_table(["method", *labels], rows)])


def nodes_tables(summaries: list[Summary]) -> str:
    """The ``nodes`` block: benchmarks/nodes_table.py's table for each file."""
    spec = importlib.util.spec_from_file_location("nodes_table", Path(__file__).with_name("nodes_table.py"))
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return "\n\n".join(mod.table(s) for s in summaries)


KINDS: dict[str, tuple[Callable[[list[Summary]], str], bool]] = {  # kind: (renderer, takes several files)
    "main": (lambda s: main_table(s[0]), False),
    "speedups": (speedup_table, True),
    "nodes": (nodes_tables, True),
}


# ---- the blocks ------------------------------------------------------------------------------------------------

class BlockError(ValueError):
    """A malformed generated block: unknown kind, missing end marker, a file that is not there."""


@dataclass(frozen=True)
class Block:
    name: str
    files: tuple[str, ...]
    start: int  # where the body (between the markers) begins and ends in the text
    end: int
    body: str

    @property
    def kind(self) -> str:
        return self.name.split("-", 1)[0]


def find_blocks(text: str) -> list[Block]:
    """Every generated block of ``text``, in order; :class:`BlockError` on a malformed one."""
    blocks: list[Block] = []
    names: set[str] = set()
    marks: set[int] = set()  # where the markers that pair up begin
    pos = 0
    while (m := START.search(text, pos)) is not None:
        name = m["name"]
        end_marker = END.format(name=name)
        end = text.find(end_marker, m.end())
        if end < 0:
            raise BlockError(f"generated block {name!r}: no {end_marker!r} after its start marker")
        inner = START.search(text, m.end(), end)
        if inner is not None:
            raise BlockError(f"generated block {name!r}: block {inner['name']!r} starts inside it")
        if name in names:
            raise BlockError(f"generated block {name!r} appears twice: give the second a -label")
        kind = name.split("-", 1)[0]
        if kind not in KINDS:
            raise BlockError(f"generated block {name!r}: unknown kind {kind!r} (known: {', '.join(KINDS)})")
        files = tuple(f.strip() for f in m["files"].split(","))
        if not all(files):
            raise BlockError(f"generated block {name!r}: an empty file name in {m['files']!r}")
        if len(files) > 1 and not KINDS[kind][1]:
            raise BlockError(f"generated block {name!r}: a {kind} block reads one file, got {m['files']!r}")
        names.add(name)
        marks |= {m.start(), end}
        blocks.append(Block(name, files, m.end(), end, text[m.end():end]))
        pos = end + len(end_marker)
    for stray in re.finditer(r"<!-- (?:end )?generated:", text):
        if stray.start() not in marks:
            line = text[stray.start():].splitlines()[0]
            raise BlockError(f"a generated-block marker without its pair, or that does not parse: {line!r}")
    return blocks


def load(path: str, root: Path = ROOT) -> Summary:
    p = root / path
    if not p.is_file():
        raise BlockError(f"{path}: no such file (paths in the markers are relative to the repository root)")
    data: Summary = json.loads(p.read_text(encoding="utf-8"))
    return data


def render(block: Block, root: Path = ROOT) -> str:
    """The body ``block`` should have: its table from its files, between blank lines."""
    fn = KINDS[block.kind][0]
    return "\n\n" + fn([load(f, root) for f in block.files]) + "\n\n"


def refresh(text: str, root: Path = ROOT) -> tuple[str, list[Block]]:
    """``text`` with every generated block rewritten from its files, and the blocks that changed."""
    out, pos, changed = [], 0, []
    for b in find_blocks(text):
        body = render(b, root)
        if body != b.body:
            changed.append(b)
        out += [text[pos:b.start], body]
        pos = b.end
    out.append(text[pos:])
    return "".join(out), changed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 naming the blocks that differ")
    ap.add_argument("--file", type=Path, default=README, help="the markdown file (default: the README)")
    args = ap.parse_args(argv)
    try:
        text = args.file.read_text(encoding="utf-8")
        new, changed = refresh(text)
        blocks = find_blocks(text)
    except BlockError as err:
        print(f"{args.file}: {err}", file=sys.stderr)
        return 2
    if not blocks:
        print(f"{args.file}: no generated blocks", file=sys.stderr)
        return 2
    what = ", ".join(f"{b.name} (from {', '.join(b.files)})" for b in changed)
    if args.check:
        if changed:
            print(f"{args.file}: generated blocks differ from their files: {what}; "
                  f"run python {SCRIPT}", file=sys.stderr)
            return 1
        print(f"{args.file}: {len(blocks)} generated blocks match their files")
        return 0
    if changed:
        args.file.write_text(new, encoding="utf-8")
        print(f"{args.file}: rewrote {what}")
    else:
        print(f"{args.file}: {len(blocks)} generated blocks already match their files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
