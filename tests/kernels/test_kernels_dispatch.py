"""Path selection, the logged fallback when compilation fails, and compiled functions reused across lengths."""

from __future__ import annotations

import logging

import pytest
import torch

from tailq.codec import Codebook
from tailq.kernels import RandKey, available_paths, dispatch, path_for, use
from tailq.kernels import cpu as kcpu


def test_path_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.delenv("TAILQ_KERNELS", raising=False)
    assert path_for(cpu) == "compiled"
    assert "reference" in available_paths() and "compiled" in available_paths()
    monkeypatch.setenv("TAILQ_KERNELS", "reference")
    assert path_for(cpu) == "reference"
    with use("compiled"):  # an explicit choice wins over the environment
        assert path_for(cpu) == "compiled"
    monkeypatch.setenv("TAILQ_KERNELS", "bogus")
    with pytest.raises(ValueError, match="TAILQ_KERNELS"):
        path_for(cpu)
    with pytest.raises(ValueError, match="kernel path"):
        use("fast")
    monkeypatch.setenv("TAILQ_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert path_for(cpu) == "reference"  # Triton on CPU tensors only in the interpreter


def test_compile_failure_falls_back_once_with_identical_results(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken_compile(fn: object, **kwargs: object) -> object:
        def run(*args: object) -> None:
            raise RuntimeError("inductor: C++ compiler not found (simulated)")

        return run

    cb = Codebook.from_levels([-2.0, -0.7, -0.1, 0.0, 0.2, 0.9, 1.5, 3.0])
    x = torch.randn(3001) * 2
    key = RandKey(4, 0, 1, 0)
    with use("reference"):
        ref = cb.encode_packed(x, key, 3)
        ref_dec = cb.decode_packed(ref, 3, x.numel())
    monkeypatch.setattr(kcpu, "_compiled", {})  # forget compiled functions, so the next ones "compile" again
    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(kcpu.native, "available", lambda: False)  # the C kernels would not need the compiler
    dispatch.reset()
    try:
        with use("compiled"), caplog.at_level(logging.WARNING, logger="tailq.kernels"):
            got = cb.encode_packed(x, key, 3)
            got_dec = cb.decode_packed(got, 3, x.numel())
            again = cb.encode_packed(x, key, 3)
            assert path_for(x.device) == "reference"  # switched off after the failure
        assert torch.equal(got, ref) and torch.equal(again, ref) and torch.equal(got_dec, ref_dec)
        warnings = [r for r in caplog.records if r.name == "tailq.kernels"]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        assert "compiled path failed" in warnings[0].getMessage() and "same results" in warnings[0].getMessage()
    finally:
        dispatch.reset()


def test_new_lengths_do_not_recompile(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch._dynamo.utils import counters

    monkeypatch.setattr(kcpu.native, "available", lambda: False)  # the inductor path (the C kernels compile once)

    cb = Codebook.uniform_grid(2.0, 7)
    key = RandKey()
    with use("compiled"):
        cb.decode_packed(cb.encode_packed(torch.randn(5000), key, 3), 3, 5000)  # warm: compiled for any length
        before = counters["stats"]["unique_graphs"]
        for n in (4099, 7777, 12345, 1 << 16):
            x = torch.randn(n)
            with use("reference"):
                want = cb.encode_packed(x, key, 3)
            assert torch.equal(cb.encode_packed(x, key, 3), want)
            cb.decode_packed(want, 3, n)
        assert counters["stats"]["unique_graphs"] == before
    assert all(t >= 0 for t in dispatch.compile_seconds().values())
    assert any(k.startswith("codes/") for k in dispatch.compile_seconds())


def test_ineligible_inputs_use_the_reference() -> None:
    cb = Codebook.uniform_grid(1.0, 3)
    key = RandKey()
    x64 = torch.randn(100, dtype=torch.float64)
    assert dispatch.encode_dense(x64, cb.round_spec, key, 2) is None  # float64: reference
    assert dispatch.encode_dense(torch.randn(0), cb.round_spec, key, 2) is None
    assert dispatch.encode_dense(torch.randn(100), cb.round_spec, key, 1) is None  # s = 3 needs 2 bits
    assert torch.equal(cb.encode_packed(x64, key, 2), cb.encode_packed(x64.float(), key, 2))
