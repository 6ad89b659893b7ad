"""tailq: truncated quantization for heavy-tailed gradients, for communication-efficient training.

Docstrings and comments cite the specification as ``SPEC §n``: section n of ``docs/spec.md`` in the repository.
"""

from .codec import Codebook, Compressor, Encoded, ErrorFeedback, compressor, list_compressors
from .diloco import DiLoCo
from .hooks import ddp_hook

__version__ = "0.1.0"

__all__ = [
    "Codebook",
    "Compressor",
    "DiLoCo",
    "Encoded",
    "ErrorFeedback",
    "__version__",
    "compressor",
    "ddp_hook",
    "list_compressors",
]
