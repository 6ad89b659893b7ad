"""Comm layer: codebook agreement, summable all-reduce, all-gather, route planner, wire accounting."""

from .aggregate import Aggregator, Gathered, MultiScaleAgg, Outcome, SharedCodebook, aggregator_for
from .wire import Comm, NetworkModel, WireLog, WireRecord, ring_traffic_bytes
from .worker import OrderedWorker

__all__ = [
    "Aggregator",
    "Comm",
    "Gathered",
    "MultiScaleAgg",
    "NetworkModel",
    "OrderedWorker",
    "Outcome",
    "SharedCodebook",
    "WireLog",
    "WireRecord",
    "aggregator_for",
    "ring_traffic_bytes",
]
