"""The CLI contract: list, design, fit, bench (JSON keys, numbers, errors)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tailq.cli import main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_list_json_names_every_compressor(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "list", "--json")
    assert rc == 0
    rows = {r["name"]: r for r in json.loads(out)}
    assert {
        "tuq",
        "tnq",
        "tbq",
        "qsgd",
        "nuqsgd",
        "terngrad",
        "efsign",
        "topk",
        "single-scale",
        "multi-scale",
    } <= set(rows)
    assert "[1, 8]" in rows["tnq"]["options"]["bits"]
    rc, out, _ = run(capsys, "list")
    assert rc == 0 and "tnq" in out


def test_design_laplace_reproduces_spec_worked_values(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(
        capsys,
        "design",
        "--scheme",
        "tnq",
        "--tail",
        "laplace",
        "--bits",
        "3",
        "--scale",
        "1",
        "--mc-samples",
        "200000",
        "--json",
    )
    assert rc == 0
    d = json.loads(out)
    assert {"scheme", "tail", "bits", "alpha", "levels", "predicted_mse", "measured_mse"} <= set(d)
    # the reference spec printed alpha* = 3.200; the closed form gives 3.19946 (docs/spec.md §3.1, Appendix A)
    assert d["alpha"] == pytest.approx(3.19946, abs=1e-5)
    assert d["predicted_mse"] == pytest.approx(0.237, abs=5e-4)
    assert [round(v, 4) for v in d["levels"][4:]] == [0.2951, 0.9899, 1.8957, 3.1995]
    # measured MSE of real stochastic rounding sits below the Δ²/4 proxy and near the exact integral:
    # the per-sample squared error is bounded by ~(max gap)² so 200k samples give a ~1% standard error
    assert d["measured_mse"] < d["predicted_mse"]
    assert d["measured_mse"] == pytest.approx(d["exact_mse"], rel=0.03)


def test_design_powerlaw_spec_check_values(capsys: pytest.CaptureFixture[str]) -> None:
    for s_bits, alpha in ((4, 3.3515), (3, 1.3744)):
        rc, out, _ = run(
            capsys,
            "design",
            "--scheme",
            "tnq",
            "--tail",
            "powerlaw",
            "--bits",
            str(s_bits),
            "--gamma",
            "4.5",
            "--m",
            "0.8",
            "--mc-samples",
            "100000",
            "--json",
        )
        assert rc == 0
        assert json.loads(out)["alpha"] == pytest.approx(alpha, abs=5e-5)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--bits", "0", "--scale", "1"], "--bits must be an integer >= 1; got 0 (accepted: 1..8)"),
        (["--bits", "9", "--scale", "1"], "--bits must be in 1..8"),
        (["--bits", "3"], "--scale"),
        (["--bits", "3", "--scale", "-1"], "--scale must be a finite number in [1.17549e-38, 3.40282e+38]"),
        (["--bits", "3", "--scale", "0"], "--scale must be a finite number in [1.17549e-38, 3.40282e+38]"),
    ],
)
def test_design_bad_arguments(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    rc, _, err = run(capsys, "design", "--scheme", "tuq", "--tail", "laplace", *argv)
    assert rc == 2 and message in err


def test_design_powerlaw_gamma_at_most_3_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(
        capsys, "design", "--scheme", "tnq", "--tail", "powerlaw", "--bits", "3", "--gamma", "2.5", "--m", "1"
    )
    assert rc == 2 and "--gamma must be > 3" in err and "empirical" in err


def test_design_empirical_from_samples(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    f = tmp_path / "g.npy"
    np.save(f, rng.laplace(0, 1, 200_000).astype(np.float32))
    rc, out, _ = run(
        capsys,
        "design",
        "--scheme",
        "tnq",
        "--tail",
        "empirical",
        "--bits",
        "3",
        "--samples",
        str(f),
        "--json",
    )
    assert rc == 0
    d = json.loads(out)
    # the empirical design of Laplace samples lands near the Laplace closed form (alpha* = 3.200)
    assert d["alpha"] == pytest.approx(3.200, rel=0.08)
    assert d["measured_mse"] == pytest.approx(0.1867, rel=0.08)


def _design(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    rc, out, err = run(capsys, "design", *argv, "--mc-samples", "20000", "--json")
    assert rc == 0, err
    return json.loads(out)


@pytest.mark.parametrize("scheme", ["tnq", "tuq", "tbq"])
@pytest.mark.parametrize(("tail", "arg"), [(["--tail", "laplace"], "--scale"),
                                           (["--tail", "powerlaw", "--gamma", "4.5"], "--m")])
def test_design_is_scale_equivariant_across_float32s_range(capsys: pytest.CaptureFixture[str], scheme: str,
                                                           tail: list[str], arg: str) -> None:
    """A scale anywhere in float32's normal range gets the unit-scale design scaled: levels and alpha x scale, MSEs
    x scale² (designed at unit scale in float64, measured there with the same draws), not a float32 overflow or
    underflow of the draws (issue 24, item 8: --scale 1e-300 / 1e300 were tracebacks; 1e38's draws overflowed)."""
    unit = _design(capsys, "--scheme", scheme, *tail, "--bits", "3", arg, "1")
    for scale in (2e-38, 1e-30, 1e30, 1e38):
        d = _design(capsys, "--scheme", scheme, *tail, "--bits", "3", arg, repr(scale))
        assert d["levels"] == pytest.approx([scale * v for v in unit["levels"]], rel=1e-12)
        assert d["alpha"] == pytest.approx(scale * unit["alpha"], rel=1e-12)
        for key in ("predicted_mse", "exact_mse", "measured_mse"):
            assert d[key] == pytest.approx(scale**2 * unit[key], rel=1e-12), key


def test_fit_and_design_are_scale_equivariant_on_tiny_and_large_gradients(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Samples of any scale the codec handles are fitted at unit scale and scaled back: the fitted parameters are
    the unit-scale fit's, scaled (Laplace scale and power-law m x c, gamma and KS unchanged), and so are the
    designs; before, mean |g| <= ~1e-12 fell below the empirical histogram's range (a different design at 1e-13, a
    traceback at 1e-20)."""
    x = np.random.default_rng(3).laplace(0, 1, 20_000)
    fits, designs = {}, {}
    for c in (1.0, 1e-13, 1e-30, 1e30):
        np.save(tmp_path / f"g{c:g}.npy", x * c)
        rc, out, err = run(capsys, "fit", str(tmp_path / f"g{c:g}.npy"), "--json")
        assert rc == 0, err
        fits[c] = json.loads(out)
        designs[c] = _design(capsys, "--scheme", "tnq", "--tail", "empirical", "--bits", "3", "--samples",
                             str(tmp_path / f"g{c:g}.npy"))
    unit = fits[1.0]
    for c in (1e-13, 1e-30, 1e30):
        f = fits[c]
        assert f["laplace"]["scale"] == pytest.approx(c * unit["laplace"]["scale"], rel=1e-12)
        assert f["powerlaw"]["m"] == pytest.approx(c * unit["powerlaw"]["m"], rel=1e-12)
        assert f["powerlaw"]["gamma"] == pytest.approx(unit["powerlaw"]["gamma"], rel=1e-9)
        assert f["powerlaw"]["ks"] == pytest.approx(unit["powerlaw"]["ks"], rel=1e-9)
        assert f["powerlaw"]["n_tail"] == unit["powerlaw"]["n_tail"]
        assert [(d["scheme"], d["tail"]) for d in f["designs"]] == [(d["scheme"], d["tail"]) for d in unit["designs"]]
        for d, u in zip(f["designs"], unit["designs"], strict=True):
            assert d["alpha"] == pytest.approx(c * u["alpha"], rel=1e-9), d
            assert d["predicted_mse"] == pytest.approx(c * c * u["predicted_mse"], rel=1e-9), d
            assert d["measured_mse"] == pytest.approx(c * c * u["measured_mse"], rel=1e-6), d
        e, eu = designs[c], designs[1.0]
        assert e["levels"] == pytest.approx([c * v for v in eu["levels"]], rel=1e-9)
        assert e["measured_mse"] == pytest.approx(c * c * eu["measured_mse"], rel=1e-6)


def test_fit_npy_and_pt(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(1)
    x = rng.laplace(0, 0.5, 100_000)
    np.save(tmp_path / "g.npy", x)
    torch.save(
        {"layer1": torch.from_numpy(x[:50_000]), "layer2": torch.from_numpy(x[50_000:])}, tmp_path / "g.pt"
    )
    for name in ("g.npy", "g.pt"):
        rc, out, _ = run(capsys, "fit", str(tmp_path / name), "--json")
        assert rc == 0
        d = json.loads(out)
        assert d["n"] == 100_000
        # Laplace MLE: relative standard error 1/sqrt(n) = 0.3%
        assert d["laplace"]["scale"] == pytest.approx(0.5, rel=0.015)
        assert {r["scheme"] for r in d["designs"]} == {"tuq", "tnq"}


def test_fit_refuses_pickles_and_bad_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    rc, _, err = run(capsys, "fit", str(tmp_path / "obj.npy"))
    assert rc == 2 and "pickle" in err

    class Evil:
        def __reduce__(self):  # noqa: ANN204
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    rc, _, err = run(capsys, "fit", str(tmp_path / "evil.pt"))
    assert rc == 2 and "weights_only=True" in err

    rc, _, err = run(capsys, "fit", str(tmp_path / "missing.npy"))
    assert rc == 2 and "does not exist" in err
    (tmp_path / "g.csv").write_text("1,2,3")
    rc, _, err = run(capsys, "fit", str(tmp_path / "g.csv"))
    assert rc == 2 and ".npy, .pt" in err
    np.save(tmp_path / "nan.npy", np.array([1.0, math.nan]))
    rc, _, err = run(capsys, "fit", str(tmp_path / "nan.npy"))
    assert rc == 2 and "non-finite" in err
    np.save(tmp_path / "zero.npy", np.zeros(10))
    rc, _, err = run(capsys, "fit", str(tmp_path / "zero.npy"))
    assert rc == 2 and "zero" in err


def test_bench_codec_json_shape(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    rc, _, _ = run(
        capsys,
        "bench",
        "codec",
        "--numel",
        "4096",
        "--repeat",
        "1",
        "--compressors",
        "tnq",
        "efsign",
        "--json",
        str(out),
    )
    assert rc == 0
    d = json.loads(out.read_text())
    assert d["copy_elements_per_s"] > 0
    rows = d["results"]
    assert {(r["compressor"], r["bits"]) for r in rows} == {
        ("tnq", 2),
        ("tnq", 3),
        ("tnq", 4),
        ("tnq", 8),
        ("efsign", 1),
    }
    for r in rows:  # each row's ratios are to the copy timed right before it
        assert r["copy_elements_per_s"] > 0
        assert r["encode_ratio_to_copy"] == pytest.approx(r["encode_elements_per_s"] / r["copy_elements_per_s"])
        assert r["decode_ratio_to_copy"] == pytest.approx(r["decode_elements_per_s"] / r["copy_elements_per_s"])
    lo, hi = d["copy_elements_per_s_range"]
    assert lo <= d["copy_elements_per_s"] <= hi


def test_console_script_help() -> None:
    exe = Path(sys.executable).with_name("tailq")
    r = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    for cmd in ("list", "design", "fit", "demo", "bench"):
        assert cmd in r.stdout


@pytest.mark.slow
def test_bench_hook_json_shape(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """`tailq bench hook`: every case timed against an adjacent bf16 run on real Gloo ranks; ratios consistent."""
    out = tmp_path / "h.json"
    rc, _, _ = run(capsys, "bench", "hook", "--world", "2", "--numel", "20000", "--steps", "1", "--paths",
                   "compiled", "--json", str(out))
    assert rc == 0
    d = json.loads(out.read_text())
    assert d["world"] == 2 and d["numel"] == 20000 and d["rows"]
    assert {(r["hook"], r.get("route")) for r in d["rows"]} >= {("tnq", "allreduce"), ("single-scale", "allgather")}
    for r in d["rows"]:
        assert r["path"] == "compiled" and r["ms"] > 0 and r["bf16_ms"] > 0
        assert r["x_bf16"] == pytest.approx(r["ms"] / r["bf16_ms"])
        assert r["overhead_ms_vs_bf16"] == pytest.approx(r["ms"] - r["bf16_ms"])
