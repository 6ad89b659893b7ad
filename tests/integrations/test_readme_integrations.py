"""The README's integration snippets run exactly as written, with 2 CPU processes, and the hook did its work.

Each snippet follows a ``<!-- test: NAME … -->`` marker; it is written to a file and started the way the README
says (Lightning's script starts its second process itself; Accelerate and FSDP2 under ``torchrun``). Each prints
``hook steps S, B bits/coord`` from rank 0: the hook ran every step and moved fewer bits than bf16's 16.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parents[2] / "README.md"
TORCHRUN = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2"]
LAUNCH = {"lightning": [sys.executable], "accelerate": TORCHRUN, "fsdp2": TORCHRUN}


def snippets() -> dict[str, str]:
    return dict(re.findall(r"<!-- test: (\w+)[^>]*-->\n```python\n(.*?)```", README.read_text(), flags=re.S))


def test_every_integration_has_a_tested_snippet() -> None:
    assert set(snippets()) == set(LAUNCH)


@pytest.mark.parametrize("name", sorted(LAUNCH))
def test_readme_integration_snippet_runs(name: str, tmp_path: Path) -> None:
    script = tmp_path / f"{name}_snippet.py"
    script.write_text(snippets()[name])
    proc = subprocess.run([*LAUNCH[name], str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    found = re.findall(r"hook steps (\d+), ([\d.]+) bits/coord", proc.stdout)
    assert len(found) == 1, proc.stdout[-2000:]  # rank 0 only
    steps, bits = int(found[0][0]), float(found[0][1])
    assert steps >= 20 and 3.0 < bits < 16.0, (steps, bits)
