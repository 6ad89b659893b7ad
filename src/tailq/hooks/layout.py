"""Which parameters each DDP bucket holds, so per-bucket residuals follow their parameters when DDP regroups.

DDP (torch 2.13) changes its bucket layout once: after the first iteration without ``static_graph``, after the
second with it. Error-feedback residuals are kept per bucket (:func:`~tailq.hooks.tailq_hook.bucket_key`), so a
residual stored under the old layout would otherwise be orphaned at the change — lost from the run, and kept in
memory and checkpoints for nothing. :class:`BucketLayouts` records each bucket key's parameters (this process's
parameter objects, in buffer order) and, when a new key appears, builds its residual from the pieces the old keys
hold for the same parameters; an old key is dropped once every one of its parameters has moved on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["BucketLayouts"]


class BucketLayouts:
    """Bucket key → its parameters (identity, element count), in the order DDP lays them out in the buffer."""

    def __init__(self) -> None:
        self._params: dict[str, list[tuple[int, int]]] = {}
        self._moved: dict[str, set[int]] = {}  # old key → its parameters whose residual moved to a newer key

    def record(self, key: str, bucket: Any) -> None:
        """Note ``key``'s parameters (once per key). Buckets that do not name their parameters are skipped."""
        if key in self._params or not hasattr(bucket, "parameters"):
            return
        params = [(id(p), p.numel()) for p in bucket.parameters()]
        if sum(n for _, n in params) == bucket.buffer().numel():  # DDP's flat buffer: the parameters, in order
            self._params[key] = params

    def carry(self, stores: Sequence[dict[str, torch.Tensor]], key: str) -> bool:
        """Give ``key`` the residuals its parameters have under other keys (when ``key`` has none yet); returns
        whether anything moved. Parameters found nowhere start from zero, as a new bucket does."""
        new = self._params.get(key)
        if new is None or any(key in s for s in stores):
            return False
        where: dict[int, tuple[str, int]] = {}  # parameter → (old key, offset there)
        for old, params in reversed(self._params.items()):  # the newest layout first
            if old != key and any(old in s for s in stores):
                off = 0
                for pid, n in params:
                    where.setdefault(pid, (old, off))
                    off += n
        if not any(pid in where for pid, _ in new):
            return False
        for store in stores:
            src = next((store[k] for k, _ in where.values() if k in store), None)
            if src is None:
                continue
            pieces = []
            for pid, n in new:
                old, off = where.get(pid, ("", 0))
                r = store.get(old)
                pieces.append(r[off : off + n] if r is not None else src.new_zeros(n))
            store[key] = torch.cat(pieces)
        for pid, _ in new:
            if pid in where:
                self._moved.setdefault(where[pid][0], set()).add(pid)
        for old in list(self._moved):  # every parameter of an old key has moved on: its residuals are stale
            if self._moved[old] >= {pid for pid, _ in self._params[old]}:
                for store in stores:
                    store.pop(old, None)
                del self._moved[old]
        return True
