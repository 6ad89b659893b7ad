"""Kernel tests: Triton kernels run on CPU tensors through Triton's interpreter (CI has no GPU).

``TRITON_INTERPRET`` is read when a kernel is decorated, so it is set here, before any test imports
``tailq.kernels.triton_impl``. It does not change which path ``auto`` picks for CPU tensors (``compiled``).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
