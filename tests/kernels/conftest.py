"""Kernel tests: Triton kernels run on CPU tensors through Triton's interpreter (CI has no GPU).

``TRITON_INTERPRET`` is read when a kernel is decorated, so it is set here, before any test imports
``tailq.kernels.triton_impl``. It does not change which path ``auto`` picks for CPU tensors (``compiled``).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _inductor_only(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests parametrized with ``impl="inductor"`` run the CPU fast path with the C kernels switched off."""
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    if params.get("impl") == "inductor":
        from tailq.kernels import native

        monkeypatch.setattr(native, "available", lambda: False)
