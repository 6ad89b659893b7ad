"""FSDP2 gradient compression: ``tailq.fsdp.compress(model, "tnq", bits=3)`` (see :mod:`tailq.integrations.fsdp`)."""

from .integrations.fsdp import FsdpReduceScatter, ModuleReduceScatter, compress, reduce_scatter

__all__ = ["FsdpReduceScatter", "ModuleReduceScatter", "compress", "reduce_scatter"]
