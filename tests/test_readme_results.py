"""The README's headline tables are generated from recorded results, never hand-copied.

Every ``<!-- generated: NAME from FILE ... -->`` block of README.md must equal what benchmarks/readme_tables.py
builds from the files it names (so a hand edit of a figure, or a results file replaced without rerunning the
script, fails here); the files must exist; the main-job table must be one of them. Then the tables themselves, on
small synthetic summaries: a method that never reached the target, one missing from a comparison, one that failed,
and over seeds.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
REFRESH = "python benchmarks/readme_tables.py"


def _load_script() -> Any:
    spec = importlib.util.spec_from_file_location("readme_tables", ROOT / "benchmarks" / "readme_tables.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # (its dataclass looks its module up)
    spec.loader.exec_module(mod)
    return mod


rt = _load_script()


def readme_blocks() -> list[Any]:
    return rt.find_blocks(README.read_text(encoding="utf-8"))


# ---- the README against its files ---------------------------------------------------------------------------

def test_readme_has_the_main_block() -> None:
    names = [b.name for b in readme_blocks()]
    assert "main" in names, f"README.md has no generated main-job table (blocks: {names})"


def test_every_block_names_recorded_files() -> None:
    for b in readme_blocks():
        for f in b.files:
            assert (ROOT / f).is_file(), f"README block {b.name!r} reads {f}, which does not exist"
            assert f.startswith("benchmarks/results/"), f"README block {b.name!r}: {f} is not a recorded result"


@pytest.mark.parametrize("name", [b.name for b in readme_blocks()])
def test_readme_block_matches_its_files(name: str) -> None:
    block = next(b for b in readme_blocks() if b.name == name)
    assert block.body == rt.render(block), (
        f"README.md's generated block {name!r} differs from what {', '.join(block.files)} give: "
        f"a hand edit, or a results file replaced without refreshing; run {REFRESH}")


def test_script_check_passes_on_the_readme(capsys: pytest.CaptureFixture[str]) -> None:
    assert rt.main(["--check"]) == 0, capsys.readouterr().err


def test_a_hand_edit_inside_a_block_is_caught() -> None:
    text = README.read_text(encoding="utf-8")
    main = next(b for b in rt.find_blocks(text) if b.name == "main")
    cell = re.search(r"\| (\d+\.\d+)", main.body)
    assert cell is not None
    at = main.start + cell.start(1)
    edited = text[:at] + "9" + text[at:]
    new, changed = rt.refresh(edited)
    assert [b.name for b in changed] == ["main"]
    assert new == text


def test_the_section_states_no_date_by_hand() -> None:
    """The main job's section, outside its generated blocks, up to the second block: no hand-typed date."""
    text = README.read_text(encoding="utf-8")
    blocks = rt.find_blocks(text)
    start = text.index("## The main job")
    spans = [(b.start, b.end) for b in blocks]
    stop = max(b.end for b in blocks)
    outside = "".join(text[i] for i in range(start, stop) if not any(s <= i < e for s, e in spans))
    assert not re.search(r"20\d\d-\d\d-\d\d|UTC", outside), "a date typed into the main job's tables' prose"


# ---- the tables on synthetic summaries -----------------------------------------------------------------------

def run(name: str, tta: float | None, speedup: float | None, hook: str = "tnq") -> dict[str, Any]:
    return {"name": name, "compressor": hook, "bits": 3, "options": {} if hook == "bf16" else {"bits": 3},
            "tta_s": tta, "tta_step": None if tta is None else 100, "speedup_vs_bf16": speedup,
            "tta_s_interp": tta, "tta_step_interp": None if tta is None else 100.0, "best_accuracy": 0.97,
            "final_accuracy": 0.96, "final_test_loss": 0.1, "vnmse": None if hook == "bf16" else 0.2,
            "wire_bits_per_coord": 3.0, "nic_bits_per_coord": 9.0, "step_s": 0.1, "codec_s": 0.02, "comm_s": 0.07}


def summary(runs: list[dict[str, Any]], *, workload: str = "digits", rate: str = "emulated 50 Mbit/s",
            seed: int = 0, failed: list[dict[str, str]] | None = None) -> dict[str, Any]:
    return {"id": f"{workload}-{seed}", "workload": workload, "workers": 4, "steps": 300, "seed": seed,
            "network": {"rate": rate, "modeled": False}, "target_metric": "accuracy", "target": 0.9624,
            "target_accuracy": 0.9624, "target_fraction_of_bf16_best": 0.99, "date": "2031-01-02T03:04:05",
            "machine": {"platform": "Linux-test", "python": "3.11.7", "cpus": 2}, "runs": runs,
            "failed": failed or []}


ONE = summary([run("bf16", 20.0, 1.0, "bf16"), run("tnq-3b", 10.0, 2.0), run("qsgd-4b", None, None, "qsgd")],
              failed=[{"name": "tbq-3b", "error": "boom"}])
TWO = summary([run("bf16", 8.0, 1.0, "bf16"), run("qsgd-4b", 16.0, 0.5, "qsgd")], rate="emulated 200 Mbit/s")


def test_main_table_one_seed() -> None:
    text = rt.main_table(ONE)
    caption, blank, head, rule, *rows = text.splitlines()
    for field in ("digits", "4 workers", "emulated 50 Mbit/s", "seed 0", "300", "0.9624", "2031-01-02 03:04:05",
                  "Linux-test", "2 CPUs", "Python 3.11.7"):
        assert field in caption, field
    assert blank == "" and head.startswith("| method | TTA (s) |") and rule.startswith("|---|")
    by = {r.split(" | ")[0].lstrip("| "): r for r in rows}
    assert list(by) == ["bf16", "tnq-3b", "qsgd-4b", "tbq-3b"]
    assert "| 2.00× |" in by["tnq-3b"]
    assert "| not reached |" in by["qsgd-4b"]
    assert "| FAILED |" in by["tbq-3b"]


def test_speedups_across_files_missing_not_reached_failed() -> None:
    text = rt.speedup_table([ONE, TWO])
    lines = text.splitlines()
    head = next(line for line in lines if line.startswith("| method"))
    assert head == "| method | digits, emulated 50 Mbit/s | digits, emulated 200 Mbit/s |"
    rows = {r.split(" | ")[0].lstrip("| "): r for r in lines if r.startswith("| ") and r != head}
    assert rows["bf16"] == "| bf16 | 1.00× | 1.00× |"
    assert rows["tnq-3b"] == "| tnq-3b | 2.00× | — |"  # not in the second comparison
    assert rows["qsgd-4b"] == "| qsgd-4b | not reached | 0.50× |"
    assert rows["tbq-3b"] == "| tbq-3b | FAILED | — |"
    assert "2031-01-02 03:04:05" in lines[0] and "bf16's step budget 300" in lines[0]


def test_speedups_column_labels_tell_files_apart() -> None:
    again = summary([run("bf16", 8.0, 1.0, "bf16")], seed=1)
    assert rt.column_labels([ONE, again]) == ["digits, emulated 50 Mbit/s (digits-0)",
                                              "digits, emulated 50 Mbit/s (digits-1)"]
    eight = {**TWO, "workers": 8}
    assert rt.column_labels([ONE, eight]) == ["digits, 4 workers, emulated 50 Mbit/s",
                                              "digits, 8 workers, emulated 200 Mbit/s"]


def test_over_seeds_medians_intervals_and_reached() -> None:
    from tailq.harness.compare import aggregate

    seeds = [summary([run("bf16", 20.0, 1.0, "bf16"), run("tnq-3b", t, None), run("qsgd-4b", None, None, "qsgd"),
                      run("tuq-3b", u, None, "tuq")], seed=s)
             for s, t, u in ((0, 10.0, 10.0), (1, 8.0, None), (2, 5.0, 10.0))]
    agg = aggregate(seeds)
    text = rt.main_table(agg)
    caption = text.splitlines()[0]
    assert "seeds 0, 1, 2" in caption and "median [interval]" in caption and "coverage" in caption
    assert "| tnq-3b | 3/3 |" in text and "2.50× [2.00×, 4.00×]" in text
    cells = rt.speedup_cells(agg)
    assert cells["bf16"] == "1.00×"
    assert cells["tnq-3b"] == "2.50× [2.00×, 4.00×]"
    assert cells["qsgd-4b"] == "not reached"  # in no seed
    assert cells["tuq-3b"].endswith("(2/3 reached)")  # in some


# ---- the markers ---------------------------------------------------------------------------------------------

def marker(name: str, files: str) -> str:
    return f"<!-- generated: {name} from {files} by benchmarks/readme_tables.py; do not edit -->"


def test_refresh_rewrites_from_the_files(tmp_path: Path) -> None:
    res = tmp_path / "benchmarks" / "results"
    res.mkdir(parents=True)
    (res / "a.json").write_text(json.dumps(ONE))
    (res / "b.json").write_text(json.dumps(TWO))
    text = (f"intro\n\n{marker('main', 'benchmarks/results/a.json')}\nstale\n<!-- end generated: main -->\n\n"
            f"{marker('speedups', 'benchmarks/results/a.json, benchmarks/results/b.json')}\n"
            "<!-- end generated: speedups -->\nafter\n")
    new, changed = rt.refresh(text, tmp_path)
    assert [b.name for b in changed] == ["main", "speedups"]
    assert rt.main_table(ONE) in new and rt.speedup_table([ONE, TWO]) in new
    assert new.startswith("intro\n\n") and new.endswith("<!-- end generated: speedups -->\nafter\n")
    assert rt.refresh(new, tmp_path) == (new, [])
    (res / "a.json").write_text(json.dumps({**ONE, "date": "2031-02-03T00:00:00"}))  # a new recording
    assert [b.name for b in rt.refresh(new, tmp_path)[1]] == ["main", "speedups"]


@pytest.mark.parametrize("text, why", [
    (marker("main", "benchmarks/results/a.json") + "\n", "no '<!-- end generated: main -->'"),
    (marker("table", "x.json") + "\n<!-- end generated: table -->", "unknown kind"),
    (marker("main", "a.json, b.json") + "\n<!-- end generated: main -->", "reads one file"),
    ("<!-- end generated: main -->", "without its pair"),
    ("<!-- generated: main from a.json -->\n<!-- end generated: main -->", "without its pair"),
])
def test_malformed_markers_are_refused(text: str, why: str) -> None:
    with pytest.raises(rt.BlockError, match=re.escape(why)):
        rt.find_blocks(text)


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    text = marker("main", "benchmarks/results/gone.json") + "\n<!-- end generated: main -->"
    with pytest.raises(rt.BlockError, match="no such file"):
        rt.refresh(text, tmp_path)


def test_nodes_kind_is_nodes_table() -> None:
    """``nodes`` blocks are benchmarks/nodes_table.py's tables (BENCHMARKS.md's multi-node section), one per file."""
    spec = importlib.util.spec_from_file_location("nodes_table", ROOT / "benchmarks" / "nodes_table.py")
    assert spec is not None and spec.loader is not None
    nodes_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nodes_table)
    files = ["benchmarks/results/compare_digits-2x2-50mbit_nodes.json",
             "benchmarks/results/compare_charlm-2x2-50mbit_nodes.json"]
    block = rt.Block("nodes", tuple(files), 0, 0, "")
    assert rt.render(block) == "\n\n" + "\n\n".join(nodes_table.table(rt.load(f)) for f in files) + "\n\n"
