"""Counter-based random numbers for stochastic rounding: one pure function of (key, element index).

A :class:`RandKey` names one stream: ``(seed, rank, step, bucket)``. The uniform number of element ``i`` of a
bucket is a hash of ``i`` keyed by two 32-bit words derived from the key, so every implementation — the plain
torch reference here, the compiled CPU path and the Triton kernels — computes exactly the same numbers in any
order, on any device, in any chunking. No generator state is carried between calls: resuming a run at step t
reproduces step t's codes bit for bit.

**The hash** (our choice; it is the wire-visible definition of the randomness, changing it changes codes):

* key words ``(k0, k1)``: the first 8 bytes of ``blake2b(pack("<4q", seed, rank, step, bucket))``, little-endian,
  split into two 32-bit words (the same digest the hook used to seed a ``torch.Generator``);
* ``lowbias32(v)``: ``v ^= v >> 16; v *= 0x7feb352d; v ^= v >> 15; v *= 0x846ca68b; v ^= v >> 16`` (all mod 2^32;
  C. Wellons' "hash prospector" mixer, a bijection on 32 bits with low avalanche bias);
* ``h(i) = lowbias32(lowbias32(i ^ k0) ^ k1)`` for the element index ``0 <= i < 2^32``;
* the uniform number is ``u(i) = (h(i) >> 8) * 2^-24``: 24 random bits, exactly representable in float32, in
  ``[0, 1)`` — the same resolution as ``torch.rand`` in float32.

Two keyed rounds make streams of different keys unrelated (one round keyed by XOR alone would make every stream a
permutation of the same sequence). The functions below use int64 arithmetic with every product kept below 2^63,
so the reference never relies on integer overflow; the compiled path uses int32 with wrap-around and the Triton
kernels uint32, and the parity tests check all three agree bit for bit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct

import torch

__all__ = ["RandKey", "MAX_COUNTER", "MIX_C1", "MIX_C2", "counter_uint24", "counter_uniform", "lowbias32_int64"]

MIX_C1 = 0x7FEB352D
MIX_C2 = 0x846CA68B
MAX_COUNTER = 1 << 32  # element indices are 32-bit counters
_M32 = 0xFFFFFFFF


@dataclasses.dataclass(frozen=True)
class RandKey:
    """The key of one counter-based random stream: ``(seed, rank, step, bucket)``, each a non-negative int < 2^63.

    Accepted wherever a ``torch.Generator`` is accepted for stochastic rounding (``Codebook.encode``,
    ``compressor.encode(x, generator=...)``). Compressors whose randomness is not stochastic rounding onto a
    codebook (terngrad, qsgd's norms path aside) get :meth:`torch_generator`, a generator seeded from the key.
    """

    seed: int = 0
    rank: int = 0
    step: int = 0
    bucket: int = 0

    def __post_init__(self) -> None:
        for name in ("seed", "rank", "step", "bucket"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**63:
                raise ValueError(f"RandKey.{name} must be an integer in [0, 2^63); got {v!r}")

    def digest(self) -> int:
        """64-bit blake2b digest of the key (little-endian), the source of every derived number."""
        raw = hashlib.blake2b(struct.pack("<4q", self.seed, self.rank, self.step, self.bucket), digest_size=8)
        return int.from_bytes(raw.digest(), "little")

    @property
    def words(self) -> tuple[int, int]:
        """``(k0, k1)``: the two 32-bit key words of the hash (unsigned)."""
        d = self.digest()
        return d & _M32, (d >> 32) & _M32

    @property
    def signed_words(self) -> tuple[int, int]:
        """The key words as signed int32 values (what the int32 compiled path consumes)."""
        return tuple(w - (1 << 32) if w >= 1 << 31 else w for w in self.words)  # type: ignore[return-value]

    def torch_seed(self) -> int:
        """A 63-bit ``torch.Generator`` seed from the key (equal to the hook's former ``_seed_for``)."""
        return self.digest() & (2**63 - 1)

    def torch_generator(self, device: torch.device | str | None = None) -> torch.Generator:
        """A ``torch.Generator`` seeded from the key, for randomness that is not counter-based."""
        return torch.Generator(device=device if device is not None else "cpu").manual_seed(self.torch_seed())


def _mul32(v: torch.Tensor, c: int) -> torch.Tensor:
    """``(v * c) mod 2^32`` for int64 ``v`` in [0, 2^32) without ever exceeding 2^63 (no overflow anywhere).

    For ``c >= 2^31``: ``v*c = v*(c - 2^31) + v*2^31`` and ``v*2^31 mod 2^32 = (v & 1) << 31``.
    """
    if c >= 1 << 31:
        return (v * (c - (1 << 31)) + ((v & 1) << 31)) & _M32
    return (v * c) & _M32


def lowbias32_int64(v: torch.Tensor) -> torch.Tensor:
    """The lowbias32 mixer on int64 tensors holding unsigned 32-bit values (reference arithmetic)."""
    v = v ^ (v >> 16)
    v = _mul32(v, MIX_C1)
    v = v ^ (v >> 15)
    v = _mul32(v, MIX_C2)
    return v ^ (v >> 16)


def _check_range(n: int, offset: int) -> None:
    if n < 0 or offset < 0 or offset + n > MAX_COUNTER:
        raise ValueError(
            f"counter-based randomness indexes elements with 32-bit counters: offset + n must be <= 2^32; "
            f"got offset={offset}, n={n}"
        )


def counter_uint24(
    n: int, key: RandKey, offset: int = 0, device: torch.device | str | None = None
) -> torch.Tensor:
    """The 24-bit integers ``h(i) >> 8`` for ``i = offset .. offset + n - 1`` (int64 tensor; reference)."""
    _check_range(n, offset)
    k0, k1 = key.words
    i = torch.arange(offset, offset + n, dtype=torch.int64, device=device)
    h = lowbias32_int64(lowbias32_int64(i ^ k0) ^ k1)
    return h >> 8


def counter_uniform(
    n: int, key: RandKey, offset: int = 0, device: torch.device | str | None = None
) -> torch.Tensor:
    """Uniform float32 numbers ``u(i) = (h(i) >> 8) * 2^-24`` in [0, 1) for ``i = offset .. offset + n - 1``."""
    return counter_uint24(n, key, offset, device).to(torch.float32) * (1.0 / 16777216.0)
