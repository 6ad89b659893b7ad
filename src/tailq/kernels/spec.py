"""What a kernel needs to know about a codebook: the exact float32 constants of the reference arithmetic.

The codec builds one :class:`RoundSpec` per codebook (``Codebook.round_spec``); every implementation (the plain
torch reference in :mod:`tailq.codec.codebook`, the compiled CPU path, the Triton kernels) rounds with these same
float32 numbers, which is what makes their codes bit-identical.

Stochastic rounding with a :class:`~tailq.kernels.rng.RandKey` (``u`` the counter-based uniform of the element):

* **affine** (uniform codebooks): ``t = clamp((x - low) * inv, 0, s)``, ``j = min(floor(t), s - 1)``,
  ``code = j + (u < t - j)`` — ``low`` and ``inv = 1/step`` are float32; no division per element.
* **levels** (any increasing levels ``l_0 < ... < l_s``): ``xt = clamp(x, l_0, l_s)``,
  ``j = #{k in 1..s-1 : l_k <= xt}``, ``code = j + (u * w_j < xt - l_j)`` with ``w_j = l_{j+1} - l_j`` in float32.
  Exact at the levels: ``xt = l_j`` never rounds up, ``xt = l_{j+1}`` always does.

Decoding is a table lookup ``values[code]``: ``values`` is the reference decode of ``0..s`` computed once, so a
kernel's float32 output equals the reference's bit for bit without re-deriving its arithmetic. When the table is
exactly ``float32(float32(k * dec_step) + dec_low)`` (checked on the host, typical for uniform codebooks) a
kernel may compute that instead of gathering.
"""

from __future__ import annotations

import dataclasses

import torch

__all__ = ["RoundSpec"]


@dataclasses.dataclass(frozen=True, eq=False)
class RoundSpec:
    """Float32 constants of one codebook's rounding and decoding (see the module docstring)."""

    s: int  # number of intervals; codes are 0..s
    affine: bool  # uniform codebook: affine map instead of a level search
    low: float  # float32 value of l_0 (affine path)
    inv: float  # float32 value of 1/step (affine path)
    levels: torch.Tensor  # float32 (s + 1,)
    widths: torch.Tensor  # float32 (s,): levels[1:] - levels[:-1] computed in float32
    values: torch.Tensor  # float32 (s + 1,): the reference decode of codes 0..s
    fine: torch.Tensor | None = None  # int64 (s + 1,): fine-grid index of each code (snapped codebooks)
    grid: int = 0  # fine grid size G (codes sent are 0..G) for snapped codebooks; s otherwise
    # decode by arithmetic instead of the table: values[k] == float32(float32(k * dec_step) + dec_low) for every k
    # (checked when the spec is built; kernels may then compute instead of gathering)
    dec_affine: bool = False
    dec_step: float = 0.0
    dec_low: float = 0.0

    def __post_init__(self) -> None:
        if self.s < 1:
            raise ValueError(f"RoundSpec.s must be >= 1; got {self.s}")
        if self.levels.numel() != self.s + 1 or self.values.numel() != self.s + 1:
            raise ValueError("RoundSpec: levels and values must have s + 1 entries")
        if self.widths.numel() != self.s:
            raise ValueError("RoundSpec: widths must have s entries")

    @classmethod
    def for_rounding(cls, levels: torch.Tensor, affine: bool, low: float = 0.0, inv: float = 0.0) -> RoundSpec:
        """A spec for rounding only (its decode table is the levels themselves): ``affine`` uses ``low``/``inv``."""
        lv = levels.detach().to("cpu", torch.float32).contiguous()
        return cls(s=lv.numel() - 1, affine=affine, low=low, inv=inv, levels=lv, widths=lv[1:] - lv[:-1],
                   values=lv, grid=lv.numel() - 1)  # fmt: skip

    @property
    def max_code(self) -> int:
        """Largest code a kernel writes: ``grid`` for snapped codebooks (fine indices), ``s`` otherwise."""
        return self.grid if self.fine is not None else self.s

    def to(self, device: torch.device) -> RoundSpec:
        """The same spec with its tables on ``device`` (cached per device by the caller)."""
        if self.levels.device == device:
            return self
        return dataclasses.replace(
            self,
            levels=self.levels.to(device),
            widths=self.widths.to(device),
            values=self.values.to(device),
            fine=None if self.fine is None else self.fine.to(device),
        )
