"""Comm layer: agreeing on codebooks, aggregation families, routes and their planner, wire accounting.

* :mod:`~tailq.comm.network` — the one network description (``--net``) and the cost model;
* :mod:`~tailq.comm.wire` — :class:`Comm`: every collective, tagged and counted in bytes;
* :mod:`~tailq.comm.agree` — the statistics record and the codebook policies (every step, stale, rescaled);
* :mod:`~tailq.comm.families` — how each :class:`~tailq.codec.Aggregation` turns a codebook into codes;
* :mod:`~tailq.comm.routes` — how codes become the mean (summable all-reduce, all-gather) and the planner;
* :mod:`~tailq.comm.worker` — the ordered worker thread that keeps every rank's collectives in one order.
"""

from .agree import Agreement, BucketStats, CodebookPolicy, EveryStep, OneStepStale, RedesignEvery, policy_for
from .families import Family, family_for
from .network import PLANNING_DEFAULT, Network, ring_traffic_bytes
from .routes import ROUTES, Coder, Outcome, Planner, Route
from .wire import Comm, Tag, WireLog, WireRecord
from .worker import OrderedWorker

__all__ = [
    "PLANNING_DEFAULT",
    "ROUTES",
    "Agreement",
    "BucketStats",
    "Coder",
    "CodebookPolicy",
    "Comm",
    "EveryStep",
    "Family",
    "Network",
    "OneStepStale",
    "OrderedWorker",
    "Outcome",
    "Planner",
    "RedesignEvery",
    "Route",
    "Tag",
    "WireLog",
    "WireRecord",
    "family_for",
    "policy_for",
    "ring_traffic_bytes",
]
