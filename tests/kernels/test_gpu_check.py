"""benchmarks/gpu_check.py, the one-command GPU check, in its CPU small mode (Triton's interpreter): CI has no GPU,
so this runs the whole script on tiny sizes to keep it from rotting. Checked: every section is in the JSON, every
kernel's parity passed, the throughput ratios are positive finite numbers (no timing thresholds), the one-rank DDP
hook returned its gradients exactly, and the FSDP2 check passed or says why it was skipped. Also: the script refuses
the CPU mode without ``TRITON_INTERPRET=1``, and its exact comparison does catch a mismatch.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
HAVE_TRITON = importlib.util.find_spec("triton") is not None


def _env(interpret: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TAILQ_KERNELS")}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return env


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _positive_finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
def test_small_mode_runs_every_check_and_passes(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--out", str(out)], cwd=ROOT,
                          env=_env(True), capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "overall: PASSED" in proc.stdout
    rep = json.loads(out.read_text())
    assert rep["mode"] == "small" and rep["device"] == "cpu" and rep["triton_interpret"] is True
    assert rep["versions"]["torch"] == torch.__version__ and rep["versions"]["triton"]
    assert rep["passed"] is True
    for section in ("parity", "throughput", "ddp", "fsdp"):
        assert section in rep and "seconds" in rep[section], section

    parity = rep["parity"]
    assert parity["status"] == "passed"
    kernels = {k["kernel"]: k for k in parity["kernels"]}
    ops = ("encode_dense", "decode_dense", "decode_dense_mean", "encode_lanes", "decode_lanes")
    want = {f"{s}.{op}" for s in ("tuq", "tnq", "tbq") for op in ops}
    want |= {"histogram_stats", "round_codes.uniform", "round_codes.levels"}
    want |= {f"{b}.{op}" for b in ("qsgd", "nuqsgd", "terngrad", "efsign") for op in ("encode", "decode")}
    want |= {f"codec.{c}" for c in ("tuq", "tnq", "tbq", "single-scale", "multi-scale", "qsgd", "nuqsgd", "terngrad",
                                    "efsign")}  # fmt: skip
    assert want <= set(kernels), sorted(want - set(kernels))
    for k in kernels.values():
        assert k["passed"] and k["cases"] > 0 and not k["failures"], k
        assert k["max_abs_diff"] == 0.0 and k["mismatched"] == 0, k

    tp = rep["throughput"]
    assert tp["status"] == "passed" and tp["sizes"] == [1 << 12, 1 << 14]
    rows = tp["rows"]
    assert {(r["compressor"], r["numel"]) for r in rows} == {(c, n) for c in ("tnq", "tuq", "tbq", "qsgd")
                                                             for n in (1 << 12, 1 << 14)}  # fmt: skip
    for r in rows:
        assert "error" not in r, r
        assert r["identical_to_reference"] and r["triton_path_used"], r
        for key in ("copy_s", "copy_gb_per_s", "encode_s", "decode_s", "encode_over_copy", "decode_over_copy",
                    "encode_gb_per_s", "decode_gb_per_s"):  # fmt: skip
            assert _positive_finite(r[key]), (key, r)
    parts = [r for r in rows if "round_pack_over_copy" in r]
    assert parts and all(_positive_finite(r["round_pack_over_copy"]) and _positive_finite(r["decode_into_over_copy"])
                         for r in parts)  # fmt: skip

    ddp = rep["ddp"]
    assert ddp["status"] == "passed" and ddp["backend"] == "gloo" and ddp["world_size"] == 1, ddp
    assert ddp["hook_returned_its_input_exactly"] and ddp["routes"] == ["local"] and ddp["hook_calls"] >= ddp["steps"]

    fsdp = rep["fsdp"]
    assert fsdp["status"] in ("passed", "skipped"), fsdp
    if fsdp["status"] == "skipped":
        assert fsdp["reason"], fsdp
    else:
        d = fsdp["direct_call"]
        assert d["route"] == "reduce_scatter" and d["identical_to_reference_path"], d
        assert d["within_one_gap"] and d["outputs_are_levels"], d


def test_cpu_mode_needs_the_triton_interpreter(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--out", str(tmp_path / "x.json")],
                          cwd=ROOT, env=_env(False), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert "TRITON_INTERPRET=1" in proc.stderr
    assert not (tmp_path / "x.json").exists()


def test_the_parity_comparison_is_exact_and_catches_failures() -> None:
    pc = _script().Parity()
    pc.compare("same", "c", torch.tensor([1.0, -0.0]), torch.tensor([1.0, -0.0]))
    pc.compare("float", "c", torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.5]))
    pc.compare("codes", "c", torch.tensor([1, 2, 3], dtype=torch.uint8), torch.tensor([1, 0, 0], dtype=torch.uint8))
    pc.compare("dtype", "c", torch.tensor([1, 2]), torch.tensor([1, 2], dtype=torch.uint8))
    pc.compare("none", "c", None, torch.zeros(1))

    def boom() -> None:
        raise RuntimeError("kernel failed")

    pc.run("raises", "c", torch.zeros(1), boom)
    rep = pc.report()
    k = {r["kernel"]: r for r in rep["kernels"]}
    assert k["same"]["passed"] and k["same"]["cases"] == 1
    assert not k["float"]["passed"] and k["float"]["max_abs_diff"] == 0.5
    assert not k["codes"]["passed"] and k["codes"]["mismatched"] == 2
    assert not k["dtype"]["passed"] and not k["none"]["passed"]
    assert not k["raises"]["passed"] and "RuntimeError: kernel failed" in k["raises"]["failures"][0]
    assert rep["passed"] is False
