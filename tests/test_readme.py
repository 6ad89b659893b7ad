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
