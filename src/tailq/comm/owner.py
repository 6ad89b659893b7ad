"""The owner's half of the two-phase route: requantize a mean shard on a design of its own (SPEC §6, route 3).

The owner of shard r holds the exact mean of the N phase-1 decodes of its elements. It quantizes that mean again
at ``gather_bits`` with the compressor's own scheme at that width, designed from the shard's own statistics (its
histogram, for the empirical tail): nothing is agreed, because only the owner encodes it and the design travels in
the payload's header. The phase-1 mean is already truncated (bounded by the shared α), so the second design is not
allowed to clip again: when the design's outer level falls inside the shard's largest |value| the levels are
stretched to reach it. Phase 2 then stays unbiased for the phase-1 mean, and so the route's mean for the truncated
inputs (measured: the stretched design is within ±10% of the truncated one's error at equal bits, and lower at
``bits + 2``; see BENCHMARKS.md "Two-phase").

Payload of one shard: a float32 header — (low, high) for a uniform scheme, the 2^gather_bits levels otherwise; all
zero for an all-zero shard — then the codes packed at ``gather_bits``. Every rank (the owner too) decodes the
codebook from the header, so the mean is bit-identical everywhere.

Options: **owner-side error feedback** keeps, per bucket and shard, the residual of the owner's rounding and adds it
before the next requantization (1-bit Adam's server-side compensation); ``redesign_every`` = k designs on every
k-th requantization of a shard and rescales the kept design by Σ|mean| in between. Both live in
:meth:`OwnerRequantizer.state_dict` for exact resume.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from tailq.codec import FLOAT32_MAX, Codebook, SharesCodebook
from tailq.codec.codebook import fit_float32
from tailq.kernels import RandKey

__all__ = ["OwnerRequantizer", "default_gather_bits"]


def default_gather_bits(bits: int) -> int:
    """Phase-2 width when not given: ``bits + 2`` (at most 8), chosen by measurement (BENCHMARKS.md "Two-phase")."""
    return min(bits + 2, 8)


class OwnerRequantizer:
    """Phase 2 of the two-phase route for one hook: the owner's design, header, codes and (optional) residuals."""

    def __init__(self, comp: SharesCodebook, gather_bits: int, *, owner_feedback: bool, redesign_every: int) -> None:
        opts = {k: getattr(comp, k) for k in getattr(comp, "options", {})}
        self.comp: SharesCodebook = type(comp)(**{**opts, "bits": gather_bits, "seed": getattr(comp, "seed", 0)})
        self.bits = gather_bits
        self.uniform = bool(comp.uniform_codebook)
        self.header_len = 2 if self.uniform else 2**gather_bits
        self.owner_feedback = owner_feedback
        self.redesign_every = redesign_every
        self.residual: dict[str, torch.Tensor] = {}  # "bucket key/shard" -> float32 residual of the valid part
        self.designs: dict[str, dict[str, Any]] = {}  # "bucket key/shard" -> {"levels", "sum_abs", "uses"}

    def payload_bytes(self, m: int) -> int:
        return 4 * self.header_len + (m * self.bits + 7) // 8

    # -- the owner -------------------------------------------------------------------------------------------
    def requantize(self, key: str, mean: torch.Tensor, valid: int, rkey: RandKey) -> torch.Tensor:
        """The payload for one shard of ``mean.numel()`` elements, of which the first ``valid`` are real."""
        m = mean.numel()
        v = mean[:valid]
        if self.owner_feedback and key in self.residual:
            v = v + self.residual[key]
        header = self._header(key, v)
        cb = self._codebook(header)
        x = torch.zeros(m, dtype=torch.float32, device=mean.device)
        x[:valid] = v
        codes = (torch.zeros((m * self.bits + 7) // 8, dtype=torch.uint8, device=mean.device) if cb is None
                 else cb.encode_packed(x, rkey, self.bits))
        payload = torch.cat([header.to(mean.device).view(torch.uint8), codes])
        if self.owner_feedback:
            self.residual[key] = (v - self.decode(payload, m)[:valid]).clone()
        return payload

    def _header(self, key: str, v: torch.Tensor) -> torch.Tensor:
        top = float(v.abs().max()) if v.numel() else 0.0
        if top == 0.0:
            return torch.zeros(self.header_len, dtype=torch.float32)
        sum_abs = float(v.abs().double().sum())
        kept = self.designs.get(key)
        if kept is not None and kept["uses"] % self.redesign_every != 0:  # between redesigns: rescale
            levels = torch.from_numpy(fit_float32(kept["levels"].double() * (sum_abs / kept["sum_abs"])))
            kept["uses"] += 1
        else:
            # the compressor's own design for this shard at any scale (its octave shift), where it has one
            own = getattr(self.comp, "local_codebook", None)
            cb = own(v) if callable(own) else self.comp.codebook(self.comp.local_stats(v))
            if cb is None:
                return torch.zeros(self.header_len, dtype=torch.float32)
            levels = cb.levels.double()
            if self.redesign_every > 1:
                self.designs[key] = {"levels": cb.levels.clone(), "sum_abs": sum_abs, "uses": 1}
        # never clip the (already truncated) mean a second time: stretch the levels to its largest |value|
        if float(levels[-1]) < top or float(levels[0]) > -top:
            levels = levels * (top / max(float(levels[-1]), -float(levels[0])))
        lv = torch.from_numpy(fit_float32(levels)).to(torch.float32)  # a stretch near float32's top stays finite
        if lv.numel() != 2**self.bits:
            raise RuntimeError(f"{self.comp.name}: a {self.bits}-bit design gave {lv.numel()} levels, expected "
                               f"{2**self.bits}")
        # the outer levels just beyond the largest |value| (at it when that is float32's largest value)
        above = top if top >= FLOAT32_MAX else float(np.nextafter(np.float32(top), np.float32(np.inf)))
        lv[-1] = max(float(lv[-1]), above)
        lv[0] = min(float(lv[0]), -float(lv[-1]))
        if self.uniform:
            return torch.tensor([float(lv[0]), float(lv[-1])], dtype=torch.float32)
        return lv

    # -- every rank ------------------------------------------------------------------------------------------
    def _codebook(self, header: torch.Tensor) -> Codebook | None:
        h = header.detach().cpu()
        if float(h[-1]) == 0.0:
            return None
        if self.uniform:
            return Codebook.from_levels(np.linspace(float(h[0]), float(h[1]), 2**self.bits), uniform=True)
        return Codebook(h.clone(), uniform=False)

    def decode(self, payload: torch.Tensor, m: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """One shard's values (``m``, float32) from its payload; the same on every rank."""
        hb = 4 * self.header_len
        cb = self._codebook(payload[:hb].clone().view(torch.float32))
        if cb is None:
            return out.zero_() if out is not None else torch.zeros(m, dtype=torch.float32, device=payload.device)
        return cb.decode_packed(payload[hb:], self.bits, m, out)

    # -- persistence ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"residual": {k: v.clone() for k, v in self.residual.items()},
                "designs": {k: {"levels": d["levels"].clone(), "sum_abs": d["sum_abs"], "uses": d["uses"]}
                            for k, d in self.designs.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.residual = {k: v.clone() for k, v in state["residual"].items()}
        self.designs = {k: {"levels": d["levels"].clone(), "sum_abs": float(d["sum_abs"]), "uses": int(d["uses"])}
                        for k, d in state["designs"].items()}
