"""The README's Python examples run, and print what the README says they print."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_examples() -> None:
    assert len(blocks()) >= 2


@pytest.mark.parametrize("i", range(2))
def test_readme_example_runs(i: int) -> None:
    ns: dict = {}
    exec(compile(blocks()[i], f"README block {i}", "exec"), ns)  # noqa: S102 - our own README
    if "d" in ns:  # the theory example: values quoted in its comment
        d = ns["d"]
        assert round(d.alpha, 4) == 3.1995 and round(d.predicted_mse, 4) == 0.2370
        assert [round(v, 4) for v in d.levels[4:]] == [0.2951, 0.9899, 1.8957, 3.1995]
    if "enc" in ns:
        assert abs(ns["enc"].bits_per_coord() - 3.0002) < 1e-4


def fault_rows() -> list[tuple[str, list[str]]]:
    """The README's fault table ("What happens when…"): (when, the tests its last column names as file::test)."""
    text = README.read_text().split("### What happens when", 1)[1]
    rows = []
    for line in text.splitlines()[1:]:
        if line.startswith("|") and not line.startswith("|---") and not line.startswith("| when "):
            when, cell = line.split("|")[1].strip(), line.rstrip().rstrip("|").rsplit("|", 1)[1]
            names, current = [], ""
            for ref in re.findall(r"`([^`]+)`", cell):
                current, _, test = ref.rpartition("::") if "::" in ref else (current, "", ref)
                names.append(f"{current}::{test.split('[')[0]}")
            rows.append((when, names))
        elif rows and not line.startswith("|"):
            break
    return rows


def test_every_fault_table_row_names_tests_that_exist() -> None:
    rows = fault_rows()
    assert len(rows) >= 14
    tests = Path(__file__).resolve().parent
    for when, names in rows:
        assert names, f"fault table row {when!r} names no test"
        for name in names:
            file, test = name.split("::")
            found = [p for p in tests.rglob(file) if re.search(rf"^def {re.escape(test)}\(", p.read_text(), re.M)]
            assert found, f"fault table row {when!r}: {name} is not a test in tests/"
