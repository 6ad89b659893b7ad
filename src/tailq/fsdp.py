"""FSDP2 gradient compression: ``tailq.fsdp.compress(model, "tnq", bits=3)`` (see :mod:`tailq.integrations.fsdp`)."""

from .integrations.fsdp import FsdpReduceScatter, compress, reduce_scatter

__all__ = ["FsdpReduceScatter", "compress", "reduce_scatter"]
