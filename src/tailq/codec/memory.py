"""Error feedback (SPEC §5): e ← e + g − Ĉ(e + g), the residual kept per key (bucket).

For truncating compressors the truncation residual (g − T_α(g)) is kept apart from the rounding residual,
so users may feed back only the bias (``feedback="truncation"``) or everything (``feedback="all"``).
State is saveable: ``state_dict()`` / ``load_state_dict()`` restore a run exactly.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import Compressor, Encoded

__all__ = ["ErrorFeedback"]

_MODES = ("all", "truncation")


class ErrorFeedback:
    """Wrap a compressor with per-key residual memory."""

    def __init__(self, comp: Compressor, feedback: str = "all") -> None:
        if feedback not in _MODES:
            raise ValueError(f"feedback must be one of {', '.join(_MODES)}; got {feedback!r}")
        if feedback == "truncation" and not comp.truncating:
            raise ValueError(
                f"feedback='truncation' needs a truncating compressor; {comp.name} does not truncate"
            )
        self.comp = comp
        self.feedback = feedback
        self.truncation: dict[str, torch.Tensor] = {}
        self.rounding: dict[str, torch.Tensor] = {}

    def compensate(self, key: str, g: torch.Tensor) -> torch.Tensor:
        """g + (stored residual for key)."""
        out = g.reshape(-1).to(torch.float32)
        for store in (self.truncation, self.rounding):
            r = store.get(key)
            if r is not None:
                if r.numel() != out.numel():
                    raise ValueError(
                        f"error-feedback residual for {key!r} has {r.numel()} elements, "
                        f"gradient has {out.numel()}"
                    )
                out = out + r.to(out.device)
        return out.reshape(g.shape)

    def update(
        self, key: str, corrected: torch.Tensor, decoded: torch.Tensor, target: torch.Tensor | None = None
    ) -> None:
        """Store the residual corrected − decoded, split into its truncation and rounding parts.

        ``target`` is what ``decoded`` is unbiased for (the truncated input); by default the compressor's own
        ``target(corrected)``. In a distributed run the truncation threshold comes from statistics agreed
        across workers, so the caller passes the target it actually used.
        """
        c = corrected.reshape(-1).to(torch.float32)
        d = decoded.reshape(-1).to(torch.float32)
        if self.comp.truncating:
            t = (self.comp.target(c) if target is None else target).reshape(-1).to(torch.float32)
            self.truncation[key] = c - t
            if self.feedback == "all":
                self.rounding[key] = t - d
        else:
            self.rounding[key] = c - d

    def step(
        self, key: str, g: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> tuple[Encoded, torch.Tensor]:
        """Compensate, encode, decode locally, update the residual; returns (encoded, local decode)."""
        corrected = self.compensate(key, g)
        enc = self.comp.encode(corrected, generator=generator)
        dec = self.comp.decode(enc)
        self.update(key, corrected, dec)
        return enc, dec

    def state_dict(self) -> dict[str, Any]:
        return {
            "feedback": self.feedback,
            "truncation": {k: v.clone() for k, v in self.truncation.items()},
            "rounding": {k: v.clone() for k, v in self.rounding.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("feedback") != self.feedback:
            raise ValueError(
                f"state was saved with feedback={state.get('feedback')!r}, this has {self.feedback!r}"
            )
        self.truncation = {k: v.clone() for k, v in state["truncation"].items()}
        self.rounding = {k: v.clone() for k, v in state["rounding"].items()}
