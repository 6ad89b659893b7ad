"""``tailq.lightning``: the PyTorch Lightning callback (needs ``pytorch-lightning``; see
:mod:`tailq.integrations.lightning`)."""

from .integrations.lightning import TailqCallback

__all__ = ["TailqCallback"]
