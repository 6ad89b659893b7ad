"""Each rank's hook state in a file of its own, beside the framework's checkpoint.

A hook's state differs per rank (error-feedback residuals, owner-side residuals). Lightning and Accelerate write
their checkpoint from the main process only; gathering every rank's state there would make the checkpoint (and the
main process's memory) grow with the number of ranks and would need a collective at save time, which hangs when
only some processes save. So every rank writes its own state with :func:`write_rank_file` (``torch.save`` of plain
dicts, ints, strings and tensors) and reads it back with :func:`read_rank_file` (``torch.load(weights_only=True)``:
nothing in the file can run code). No collective at save or load.
"""

from __future__ import annotations

import io
import os
from typing import Any

import torch
import torch.distributed as dist

from tailq.hooks import HookState
from tailq.hooks.tailq_hook import MEASUREMENT_ONLY

__all__ = ["FORMAT", "config_differences", "load_checked", "rank_and_world", "rank_file_state", "read_rank_file",
           "to_cpu", "write_rank_file"]

FORMAT = "tailq.hook_state.rank.v1"
"""The ``format`` field of a per-rank file (and of Lightning's checkpoint entry that names the files)."""


def to_cpu(obj: Any) -> Any:
    """``obj`` with every tensor moved to the CPU (a file must not name a GPU the loading process may not have)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def rank_and_world(group: Any = None) -> tuple[int, int]:
    """This process's rank in ``group`` (default: the default group) and the group's size; ``(0, 1)`` without one."""
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def rank_file_state(state: HookState, rank: int, world: int, **extra: Any) -> dict[str, Any]:
    """What one rank's file holds: ``format``, ``rank``, ``world_size``, ``hook``, ``step``, ``state`` (the hook
    state's ``state_dict()``, on the CPU) and ``extra``."""
    return {"format": FORMAT, "rank": rank, "world_size": world, "hook": state.name, "step": int(state.step),
            "state": to_cpu(state.state_dict()), **extra}


def write_rank_file(path: str, obj: dict[str, Any], fs: Any = None) -> None:
    """``torch.save(obj)`` to ``path`` through a temporary file, so an interrupted save leaves no half-written file.

    ``fs``: an fsspec filesystem (Lightning's checkpoint paths may be remote); ``None``: the local filesystem.
    """
    buf = io.BytesIO()
    torch.save(obj, buf)
    tmp = f"{path}.tmp{os.getpid()}"
    if fs is None:
        with open(tmp, "wb") as f:
            f.write(buf.getvalue())
        os.replace(tmp, path)
    else:
        with fs.open(tmp, "wb") as f:
            f.write(buf.getvalue())
        fs.mv(tmp, path)


def read_rank_file(path: str, *, rank: int, world: int, who: str, fresh: str, fs: Any = None,
                   check: bool = True) -> dict[str, Any]:
    """The file :func:`write_rank_file` wrote for ``rank`` of ``world``, checked; loaded with ``weights_only=True``.

    ``fresh`` names the option that starts the hook afresh instead (for the error messages). ``check=False``: any
    rank's file, of any world size (to read its metadata).
    """
    try:
        if fs is None:
            with open(path, "rb") as f:
                data = f.read()
        else:
            with fs.open(path, "rb") as f:
                data = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{who}: {path} is missing: it holds rank {rank}'s hook state (error-feedback "
                                f"residuals, step). Every process must save (each writes its own file); resume from "
                                f"a checkpoint all {world} processes saved, or pass {fresh} to start the hook "
                                "afresh (step 0, warm-up, zero residuals)") from None
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # pickle.UnpicklingError (a refused global), or a file that is not torch.save's
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        why = next((ln for ln in lines if "Unsupported global" in ln), lines[0] if lines else type(err).__name__)
        why = why.split(" Please")[0].removeprefix("WeightsUnpickler error: ")
        raise ValueError(f"{who}: {path} is not a tailq hook state file (torch.load(weights_only=True) refused it: "
                         f"{why}); nothing in it was run") from err
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ValueError(f"{who}: {path} is not a tailq hook state file (format "
                         f"{obj.get('format') if isinstance(obj, dict) else type(obj).__name__!r}, expected "
                         f"{FORMAT!r})")
    if not check:
        return obj
    if int(obj["world_size"]) != world:
        raise ValueError(f"{who}: {path} was saved by a run of {obj['world_size']} processes; this run has {world}. "
                         f"Each process's hook state (its residuals) belongs to its rank: resume with "
                         f"{obj['world_size']} processes, or pass {fresh} to start the hook afresh (step 0, warm-up, "
                         "zero residuals)")
    if int(obj["rank"]) != rank:
        raise ValueError(f"{who}: {path} holds rank {obj['rank']}'s hook state, not rank {rank}'s")
    return obj


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix or "value": d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        name = f"{prefix}.{k}" if prefix else str(k)
        out.update(_flat(v, name) if isinstance(v, dict) else {name: v})
    return out


def config_differences(saved: dict[str, Any] | None, now: dict[str, Any]) -> list[str]:
    """``["bits: saved 3, now 4", …]``: the entries of two hook ``config()`` dicts that differ (``world_size`` is
    checked on its own). A compressor option is named without its ``compressor.`` prefix, as it is passed."""
    a, b = _flat(saved or {}), _flat(now)
    out = []
    for key in sorted(set(a) | set(b)):
        if key in ("world_size", *MEASUREMENT_ONLY) or a.get(key, "(absent)") == b.get(key, "(absent)"):
            continue
        shown = "hook" if key in ("compressor.name", "name") else key.removeprefix("compressor.")
        out.append(f"{shown}: saved {a.get(key, '(absent)')!r}, now {b.get(key, '(absent)')!r}")
    return out


def load_checked(state: HookState, saved: dict[str, Any], *, who: str, fresh: str, where: str) -> None:
    """``state.load_state_dict(saved)`` after naming every option that differs from the saved run's.

    The hook state refuses another configuration itself; this says which option, and what to do. Options that do
    not change the arithmetic (``timeout_s``, ``measure_every``) and equivalent spellings (``error_feedback=True`` /
    ``"all"``) are not part of the configuration compared, so they may differ.
    """
    diff = config_differences(saved.get("config"), state.config())
    if diff:
        raise ValueError(f"{who}: the hook state in {where} was saved with other options that change what goes on "
                         f"the wire or into the residuals: {'; '.join(diff)}. Resume with the saved run's options "
                         f"(options like timeout_s may differ), or pass {fresh} to start the hook afresh (step 0, "
                         "warm-up, zero residuals)")
    state.load_state_dict(saved)

