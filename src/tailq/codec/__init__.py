"""Codec layer: codebooks, stochastic rounding, bit/lane packing and every compressor (one registry).

Every module of this package is imported here, so a compressor registers itself (``@register``) by being a
file under ``codec/``: adding one touches that file only. Compressors defined elsewhere (a user's module, a
test) register the same way when their module is imported.
"""

import importlib
import pkgutil

from .base import (
    FLOAT32_MAX,
    Aggregation,
    AgreesScales,
    Compressor,
    Encoded,
    Option,
    SharesCodebook,
    check_input,
    compressor,
    get_compressor_class,
    list_compressors,
    register,
)
from .codebook import Codebook, SnappedCodebook
from .memory import ErrorFeedback

for _module in pkgutil.iter_modules(__path__):  # sorted by name: the registration order is stable
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "FLOAT32_MAX",
    "Aggregation",
    "AgreesScales",
    "Codebook",
    "Compressor",
    "Encoded",
    "ErrorFeedback",
    "Option",
    "SharesCodebook",
    "SnappedCodebook",
    "check_input",
    "compressor",
    "get_compressor_class",
    "list_compressors",
    "register",
]
