"""Contract tests run on *every* registered compressor (a new compressor is covered automatically)."""

import math

import numpy as np
import pytest
import torch

import tailq
from tailq.codec import list_compressors

NAMES = sorted(list_compressors())
EXPECTED = {
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
    "fp8",
    "int8sigma",
    "fp4",
}


def make(name: str, bits: int | None = 3) -> tailq.Compressor:
    cls = tailq.codec.get_compressor_class(name)
    opts = {"bits": bits} if bits is not None and "bits" in cls.options else {}
    return tailq.compressor(name, **opts)


def heavy(n: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    x = rng.standard_t(3.5, n)
    x[: min(n, 2)] = [25.0, -40.0][: min(n, 2)]  # outliers, as real gradients have
    return torch.from_numpy(x.astype(np.float32))


def test_every_named_compressor_is_registered() -> None:
    assert EXPECTED <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_unbiased_for_target_within_4_standard_errors(name: str) -> None:
    comp = make(name)
    if not comp.unbiased:
        pytest.skip(f"{name} is biased by design (used with error feedback)")
    x = heavy(64, seed=1)
    target = comp.target(x).double()
    reps = 3000
    outs = torch.stack(
        [comp.roundtrip(x, generator=torch.Generator().manual_seed(r)) for r in range(reps)]
    ).double()
    mean, sd = outs.mean(0), outs.std(0)
    tol = 4 * sd / math.sqrt(reps) + 1e-5 * (1 + target.abs())
    assert bool(((mean - target).abs() <= tol).all()), (mean - target).abs().max()


@pytest.mark.parametrize("name", NAMES)
def test_zero_in_zero_out_empty_and_shapes(name: str) -> None:
    comp = make(name)
    z = torch.zeros(5, 7)
    out = comp.roundtrip(z)
    assert out.shape == z.shape and torch.equal(out, torch.zeros(5, 7))
    e = comp.roundtrip(torch.zeros(0))
    assert e.numel() == 0
    for n in (1, 3, 513, 1001):
        x = heavy(n, seed=n)
        y = comp.roundtrip(x.reshape(1, n))
        assert y.shape == (1, n) and bool(torch.isfinite(y).all())


@pytest.mark.parametrize("name", NAMES)
def test_non_finite_input_is_rejected_naming_the_input(name: str) -> None:
    comp = make(name)
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = heavy(100)
        x[17] = bad
        with pytest.raises(ValueError, match="non-finite"):
            comp.encode(x)


@pytest.mark.parametrize("name", NAMES)
def test_bits_out_of_range_and_unknown_options_are_rejected(name: str) -> None:
    cls = tailq.codec.get_compressor_class(name)
    if "bits" in cls.options:
        opt = cls.options["bits"]
        for bad in (opt.low - 1, opt.high + 1):
            with pytest.raises(ValueError, match=r"'bits' must be in \["):
                tailq.compressor(name, bits=int(bad))
    with pytest.raises(TypeError, match="unknown option"):
        tailq.compressor(name, not_an_option=1)
    with pytest.raises(ValueError, match="seed"):
        tailq.compressor(name, seed=-1)


@pytest.mark.parametrize("name", NAMES)
def test_wire_bits_are_bytes_of_the_encoded_tensors(name: str) -> None:
    comp = make(name)
    x = heavy(4099)
    enc = comp.encode(x)
    nbytes = sum(t.numel() * t.element_size() for t in enc.tensors.values())
    assert enc.wire_bits() == 8 * nbytes
    assert enc.bits_per_coord() == pytest.approx(8 * nbytes / 4099)
    # decode only needs the wire tensors: a copy with the diagnostics stripped decodes identically
    stripped = tailq.Encoded({k: v.clone() for k, v in enc.tensors.items()}, enc.shape, enc.dtype)
    assert torch.equal(comp.decode(stripped), comp.decode(enc))


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_output(name: str) -> None:
    comp = make(name)
    x = heavy(3000)
    a = comp.roundtrip(x, generator=torch.Generator().manual_seed(5))
    b = comp.roundtrip(x, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
