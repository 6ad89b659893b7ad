"""Codec layer: codebooks, stochastic rounding, bit/lane packing and every compressor (one registry)."""

from . import efsign, qsgd, scales, terngrad, topk, tq  # noqa: F401  (registers the compressors)
from .base import Compressor, Encoded, Option, check_input, compressor, get_compressor_class, list_compressors
from .codebook import Codebook, SnappedCodebook
from .memory import ErrorFeedback

__all__ = [
    "Codebook",
    "Compressor",
    "Encoded",
    "ErrorFeedback",
    "Option",
    "SnappedCodebook",
    "check_input",
    "compressor",
    "get_compressor_class",
    "list_compressors",
]
