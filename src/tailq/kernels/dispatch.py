"""Which implementation runs a codec hot loop: ``reference`` (plain torch), ``compiled`` (CPU) or ``triton`` (GPU).

The codec calls the functions here; each returns the result, or ``None`` when no fast path applies (then the
codec runs its plain-torch reference, which gives the same bits). Selection, per call, from the tensor's device:

* ``TAILQ_KERNELS`` environment variable or :func:`use` (a context manager, also usable as a plain call):
  ``auto`` (default), ``reference``, ``compiled``, ``triton``;
* ``auto``: CUDA tensors → ``triton`` when Triton is importable, else ``reference``; CPU tensors → ``compiled``
  when ``torch.compile`` works here, else ``reference``; tensors below ``AUTO_MIN_NUMEL`` elements stay on the
  reference, where a call costs less than a compiled function's dispatch (tens of microseconds);
* ``triton`` on CPU tensors runs only under ``TRITON_INTERPRET=1`` (the parity tests).

A failure inside a fast path (a missing compiler, an inductor or Triton error) is logged once as a warning, the
path is switched off for the rest of the process, and the call returns ``None``: the reference computes the same
result. Nothing here changes results, only where they are computed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType
from typing import Any

import torch

from .rng import MAX_COUNTER, RandKey
from .spec import RoundSpec

__all__ = [
    "PATHS",
    "available_paths",
    "compile_seconds",
    "decode_dense",
    "decode_dense_mean",
    "decode_lanes",
    "encode_dense",
    "encode_lanes",
    "histogram_stats",
    "nonfinite_count",
    "path_for",
    "reset",
    "round_codes",
    "use",
]

log = logging.getLogger("tailq.kernels")

PATHS = ("auto", "reference", "compiled", "triton")
AUTO_MIN_NUMEL = 1 << 14  # under "auto", smaller tensors use the reference (dispatch overhead exceeds the work)
_forced: list[str] = []  # stack of paths set by use()
_broken: dict[str, str] = {}  # path -> why it was switched off
_lock = threading.Lock()


def _requested() -> str:
    if _forced:
        return _forced[-1]
    env = os.environ.get("TAILQ_KERNELS", "auto").strip().lower() or "auto"
    if env not in PATHS:
        raise ValueError(f"TAILQ_KERNELS must be one of {', '.join(PATHS)}; got {env!r}")
    return env


@contextlib.contextmanager
def _use(path: str) -> Iterator[None]:
    _forced.append(path)
    try:
        yield
    finally:
        _forced.remove(path)


def use(path: str) -> contextlib.AbstractContextManager[None]:
    """Force a path: ``with tailq.kernels.use("reference"): ...`` (``auto`` restores the default choice)."""
    if path not in PATHS:
        raise ValueError(f"kernel path must be one of {', '.join(PATHS)}; got {path!r}")
    return _use(path)


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "no Triton"
        return False
    return True


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def path_for(device: torch.device, numel: int | None = None) -> str:
    """The path a hot loop on ``device`` takes now (after ``use``/``TAILQ_KERNELS`` and broken paths)."""
    req = _requested()
    if req == "reference":
        return "reference"
    if req == "auto":
        if numel is not None and numel < AUTO_MIN_NUMEL:
            return "reference"
        req = "triton" if device.type == "cuda" else "compiled" if device.type == "cpu" else "reference"
    if req == "triton" and (not triton_available() or (device.type == "cpu" and not _interpret())):
        return "reference"
    if req == "compiled" and device.type != "cpu":
        return "reference"
    return "reference" if req in _broken else req


def available_paths(device: torch.device | str = "cpu") -> list[str]:
    """Paths that can run on ``device`` in this process (``reference`` always)."""
    dev = torch.device(device)
    out = ["reference"]
    if dev.type == "cpu" and "compiled" not in _broken:
        out.append("compiled")
    if triton_available() and "triton" not in _broken and (dev.type == "cuda" or _interpret()):
        out.append("triton")
    return out


def reset() -> None:
    """Forget broken paths (tests)."""
    with _lock:
        _broken.clear()


def compile_seconds() -> dict[str, float]:
    """Seconds of the first call (trace + compile + run) of every compiled CPU function so far."""
    from . import cpu

    return dict(cpu.COMPILE_SECONDS)


def _impl(path: str) -> ModuleType:
    if path == "compiled":
        from . import cpu

        return cpu
    from . import triton_impl

    return triton_impl


def _run(device: torch.device, numel: int, op: str, *args: Any,
         resolve: Callable[[str, str], Callable[..., Any]] | None = None) -> Any:  # fmt: skip
    """``op`` on the path ``device`` takes now, or ``None`` for the reference (also after a failure, logged once).
    ``resolve(path, op)``: where another module's operations live (default: :mod:`cpu` / :mod:`triton_impl`)."""
    path = path_for(device, numel)
    if path == "reference":
        return None
    try:
        fn = resolve(path, op) if resolve is not None else getattr(_impl(path), op)
        return fn(*args)
    except Exception as err:  # noqa: BLE001 - any failure of a fast path falls back to the identical reference
        with _lock:
            first = path not in _broken
            _broken[path] = f"{type(err).__name__}: {err}"
        if first:
            log.warning(
                "tailq.kernels: the %s path failed (%s: %s); using the plain-torch reference (same results) "
                "for the rest of this process",
                path,
                type(err).__name__,
                str(err).splitlines()[0] if str(err) else "",
            )
        return None


def _eligible(x: torch.Tensor) -> bool:
    return x.dtype == torch.float32 and 0 < x.numel() <= MAX_COUNTER and x.is_contiguous()


# ---------------------------------------------------------------------------------------------------------
# operations (None = use the reference)


def encode_dense(x: torch.Tensor, spec: RoundSpec, key: RandKey, bits: int) -> torch.Tensor | None:
    """Round ``x`` with ``spec`` and ``key`` and pack the codes densely at ``bits`` bits."""
    if not _eligible(x) or spec.s >= 1 << bits:
        return None
    out: torch.Tensor | None = _run(x.device, x.numel(), "encode_dense", x, spec, key, bits)
    return out


def round_codes(x: torch.Tensor, spec: RoundSpec, key: RandKey) -> torch.Tensor | None:
    """Codes 0..s of ``x`` (uint8, one per element) — the rounding of ``encode_dense`` without packing."""
    if not _eligible(x) or spec.s > 255:
        return None
    out: torch.Tensor | None = _run(x.device, x.numel(), "round_codes", x, spec, key)
    return out


def encode_lanes(x: torch.Tensor, spec: RoundSpec, key: RandKey, plan: Any) -> torch.Tensor | None:
    """Round ``x`` (fine indices when ``spec.fine`` is set) and pack into the headroom lanes of ``plan``."""
    if not _eligible(x) or spec.max_code > plan.grid or spec.s > 255:
        return None
    out: torch.Tensor | None = _run(x.device, x.numel(), "encode_lanes", x, spec, key, plan)
    return out


def _out_ok(out: torch.Tensor | None, n: int, device: torch.device) -> bool:
    return out is None or (
        out.dtype == torch.float32 and out.numel() == n and out.is_contiguous() and out.device == device
    )


def decode_dense(
    packed: torch.Tensor, spec: RoundSpec, bits: int, n: int, out: torch.Tensor | None = None
) -> torch.Tensor | None:
    """``spec.values[unpack_bits(packed, bits, n)]`` (float32), written into ``out`` when given."""
    if n <= 0 or packed.dtype != torch.uint8 or packed.numel() != (n * bits + 7) // 8:
        return None
    if not _out_ok(out, n, packed.device):
        return None
    res: torch.Tensor | None = _run(packed.device, n, "decode_dense", packed, spec, bits, n, out)
    return res


def decode_dense_mean(
    payloads: Sequence[torch.Tensor], spec: RoundSpec, bits: int, n: int, out: torch.Tensor | None = None
) -> torch.Tensor | None:
    """Mean over ``payloads`` of their dense decodes, summed in order from 0.0 then divided by the count."""
    if n <= 0 or not payloads:
        return None
    nbytes = (n * bits + 7) // 8
    if any(p.dtype != torch.uint8 or p.numel() != nbytes or p.device != payloads[0].device for p in payloads):
        return None
    if not _out_ok(out, n, payloads[0].device):
        return None
    res: torch.Tensor | None = _run(payloads[0].device, n, "decode_dense_mean", payloads, spec, bits, n, out)
    return res


def decode_lanes(
    words: torch.Tensor, plan: Any, n: int, low: float, scale: float, out: torch.Tensor | None = None
) -> torch.Tensor | None:
    """``(unpack_lanes(words, plan, n).double() * scale + low).float()``, written into ``out`` when given."""
    if n <= 0 or words.dtype not in (torch.int32, torch.int64) or words.numel() != plan.words_for(n):
        return None
    if not _out_ok(out, n, words.device):
        return None
    res: torch.Tensor | None = _run(words.device, n, "decode_lanes", words, plan, n, low, scale, out)
    return res


def histogram_stats(x: torch.Tensor, shift: int = 0) -> tuple[torch.Tensor, int] | None:
    """``(stats, non-finite count)``: ``stats`` equal to ``tailq.codec.stats.histogram_stats(x, with_logs=False,
    shift=shift)`` bit for bit when the count is 0 (an empty tensor otherwise: the caller raises its usual error).
    Shifts below ``cpu.MIN_SHIFT`` (where a subnormal could leave the zero bin) use the reference."""
    from .cpu import MIN_SHIFT

    if not _eligible(x) or shift < MIN_SHIFT:
        return None
    out: tuple[torch.Tensor, int] | None = _run(x.device, x.numel(), "histogram_stats", x, int(shift))
    return out


def nonfinite_count(x: torch.Tensor) -> int | None:
    """Number of NaN/Inf entries of ``x`` (one fused reduction), or None (then check with torch.isfinite)."""
    if not _eligible(x):
        return None
    out: int | None = _run(x.device, x.numel(), "nonfinite_count", x)
    return out
