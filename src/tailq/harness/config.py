"""One training run's configuration: validated up front, saved as JSON, reproducible from that file."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from tailq.comm.network import Network
from tailq.errors import UsageError
from tailq.options import INT64_MAX, MAX_BUCKET_CAP_MB, MAX_WORKERS, SEED_MAX, check_float, check_int

from .net_schedule import NetSchedule
from .workloads import WORKLOADS

__all__ = ["DILOCO_KEYS", "RunConfig", "is_baseline", "parse_value"]

DILOCO_KEYS = ("sync_every", "fragments", "delay", "merge_alpha", "outer_lr", "outer_momentum")


def parse_value(text: str) -> Any:
    """A ``KEY=VALUE`` option's value from the command line: int, float, true/false, or the text itself."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


@dataclasses.dataclass
class RunConfig:
    workload: str = "digits"
    hook: str = "bf16"
    hook_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    workers: int = 4
    # K nodes of workers / K workers each (--nodes): the workers of one node share its network link (one namespace
    # and one shaped NIC per node when emulated) and get torchrun's LOCAL_RANK / LOCAL_WORLD_SIZE / GROUP_RANK;
    # ranks numbered node by node. None = one worker per node (K = workers), what every run was before
    nodes: int | None = None
    steps: int = 300
    eval_every: int = 25
    seed: int = 0
    lr: float | None = None  # workload default when None
    batch_size: int | None = None  # per worker; workload default when None
    data_dir: str | None = None
    tail_df: float = 3.0  # synthetic workload
    bucket_cap_mb: float = 25.0
    threads: int = 1  # torch threads per worker
    checkpoint_every: int = 0  # 0 = never
    measure_every: int = 10  # vNMSE on every k-th step (tailq hooks); 0 = never
    # forward + backward passes timed without communication, once after the warm-up and outside the clock, for the
    # hook's overlap with backward (tailq.harness.overlap); 0 = none. Changes nothing of the training
    compute_calibration: int = 5
    time_budget_s: float | None = None  # stop when the training clock passes this
    # run past ``steps`` (up to ``max_steps``) while the best test accuracy is below this target (compare: a
    # method still short of bf16's target when the step budget ends gets more steps, within the time budget)
    extend_to_target: float | None = None
    max_steps: int | None = None
    # what extend_to_target is: "accuracy" (best test accuracy at or above it) or "loss" (test loss at or below)
    target_metric: str = "accuracy"
    # gradients through FSDP2's reduce-scatter (fully_shard per transformer layer and the root) instead of DDP
    # buckets: bf16 = FSDP2's own in bf16, bf16:reduce=a2a = an all-to-all reduce-scatter, a shardable tailq
    # compressor = tailq.fsdp.compress (see tailq.harness.fsdp)
    fsdp: bool = False
    # DiLoCo (tailq.DiLoCo) instead of a per-step DDP hook: ``hook``/``hook_options`` are then the outer mean's
    # compressor and options; keys sync_every (H), fragments (F), delay (tau), merge_alpha, outer_lr, outer_momentum
    diloco: dict[str, Any] | None = None
    net: Network = dataclasses.field(default_factory=lambda: Network("none", None))  # --net text is parsed here
    # --net-schedule: the network's rate changes at these training steps (tailq.harness.net_schedule); its text is
    # parsed here. The hook is told only ``net``, the network the run starts with
    net_schedule: NetSchedule | None = None
    run_dir: str = "runs/run"
    label: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.net, str):
            try:
                self.net = Network.parse(self.net)
            except ValueError as err:
                raise UsageError(str(err)) from err
        if isinstance(self.net_schedule, str):
            self.net_schedule = NetSchedule.parse(self.net_schedule)

    def validate(self) -> RunConfig:
        from tailq.hooks import hook_names

        if self.workload not in WORKLOADS:
            raise UsageError(f"--workload must be one of {', '.join(WORKLOADS)}; got {self.workload!r}")
        if self.hook not in hook_names():
            raise UsageError(f"--compressor must be one of {', '.join(hook_names())}; got {self.hook!r}")
        for key, lo, hi in (("workers", 1, MAX_WORKERS), ("steps", 1, INT64_MAX), ("eval_every", 1, INT64_MAX),
                            ("threads", 1, 1024), ("checkpoint_every", 0, INT64_MAX), ("measure_every", 0, INT64_MAX),
                            ("seed", 0, SEED_MAX)):
            name = f"--{key.replace('_', '-')}"
            check_int(name, getattr(self, key), lo, error=UsageError)  # "must be an integer >= lo" below the range
            check_int(name, getattr(self, key), lo, hi, error=UsageError)
        check_int("compute_calibration", self.compute_calibration, 0, 1000, error=UsageError)  # a config key only
        self._check_nodes()
        if not isinstance(self.hook_options, dict):
            raise UsageError(f"hook_options must be a dict of KEY=VALUE options; got {self.hook_options!r}")
        bits = self.hook_options.get("bits")
        if isinstance(bits, int) and not isinstance(bits, bool):
            from tailq.codec import list_compressors

            cls = list_compressors().get(self.hook)
            opt = cls.options.get("bits") if cls is not None else None
            if opt is not None and opt.low is not None and opt.high is not None and not opt.low <= bits <= opt.high:
                raise UsageError(f"--bits for {self.hook} must be in {opt.low:g}..{opt.high:g}; got {bits}")
        # every number finite and in range (NaN, inf and wrong types refused here, before any worker starts)
        if self.lr is not None:
            check_float("--lr", self.lr, 0, low_open=True, error=UsageError)
        if self.batch_size is not None:
            check_int("--batch-size", self.batch_size, 1, error=UsageError)
        check_float("--tail-df", self.tail_df, 2, low_open=True, note=" (Student-t degrees of freedom with finite "
                    "variance)", error=UsageError)
        check_float("--bucket-cap-mb", self.bucket_cap_mb, 0, MAX_BUCKET_CAP_MB, low_open=True, error=UsageError)
        if self.time_budget_s is not None:
            check_float("time_budget_s", self.time_budget_s, 0, low_open=True, error=UsageError)
        if self.target_metric not in ("accuracy", "loss"):
            raise UsageError(f"--target-metric must be accuracy or loss; got {self.target_metric!r}")
        if self.extend_to_target is not None:
            accuracy = self.target_metric == "accuracy"
            try:
                check_float("extend_to_target", self.extend_to_target, 0, 1 if accuracy else None,
                            low_open=not accuracy, error=UsageError)
            except UsageError:
                need = "an accuracy in [0, 1]" if accuracy else "a test loss > 0"
                raise UsageError(f"extend_to_target must be {need}; got {self.extend_to_target!r}") from None
        if self.max_steps is not None and (isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int)
                                           or self.max_steps < self.steps):
            raise UsageError(f"max_steps must be an integer >= steps ({self.steps}); got {self.max_steps!r}")
        if not isinstance(self.fsdp, bool):
            raise UsageError(f"fsdp must be true or false; got {self.fsdp!r}")
        for key in ("data_dir", "run_dir", "label"):
            value = getattr(self, key)
            if not (value is None and key == "data_dir") and not isinstance(value, str):
                raise UsageError(f"{key} must be a string; got {value!r}")
        if not isinstance(self.net, Network):
            raise UsageError(f"net must be a tailq.comm.network.Network or --net text; got {self.net!r}")
        if self.net_schedule is not None:
            if not isinstance(self.net_schedule, NetSchedule):
                raise UsageError(f"net_schedule must be --net-schedule text or a NetSchedule; got "
                                 f"{self.net_schedule!r}")
            self.net_schedule.check(self.net, self.steps)
        if self.fsdp:
            from .fsdp import check_method

            why = check_method(self.hook, self.hook_options)
            if why:
                raise UsageError(why)
            if self.checkpoint_every:
                raise UsageError("--checkpoint-every is not supported with --fsdp (sharded checkpoints); use 0")
            if self.net.kind == "model":
                raise UsageError("--fsdp needs a real or emulated network (--net none or RATE): FSDP2's own "
                                 "parameter all-gathers are not in the wire log, so a modeled clock would omit them")
        elif "reduce" in self.hook_options:
            raise UsageError("the method option reduce= applies to --fsdp runs only")
        self._check_diloco()
        self._check_hook_options()
        return self

    def _check_diloco(self) -> None:
        d = self.diloco
        if d is None:
            return
        if not isinstance(d, dict):
            raise UsageError(f"diloco must be a dict of DiLoCo options; got {d!r}")
        unknown = sorted(set(d) - set(DILOCO_KEYS))
        if unknown:
            raise UsageError(f"DiLoCo: unknown option(s) {', '.join(unknown)}; accepted: {', '.join(DILOCO_KEYS)} "
                             f"(in --methods: H, F, tau, alpha, olr, omom)")
        if "sync_every" not in d:
            raise UsageError("DiLoCo needs H (sync_every), e.g. diloco:tnq:2:H=20")
        H = check_int("DiLoCo H (sync_every)", d["sync_every"], 1, error=UsageError)
        check_int("DiLoCo F (fragments)", d.get("fragments", 1), 1, H, error=UsageError)
        check_int("DiLoCo tau (delay)", d.get("delay", 0), 0, H - 1, error=UsageError)
        check_float("DiLoCo alpha (merge_alpha)", d.get("merge_alpha", 0.5), 0, 1, error=UsageError)
        check_float("DiLoCo olr (outer_lr)", d.get("outer_lr", 0.7), 0, low_open=True, error=UsageError)
        check_float("DiLoCo omom (outer_momentum)", d.get("outer_momentum", 0.9), 0, 1, high_open=True,
                    error=UsageError)
        if self.fsdp:
            raise UsageError("DiLoCo runs train a plain model per worker: not with --fsdp")
        if self.hook == "powersgd":
            raise UsageError("DiLoCo's outer mean takes a tailq compressor or fp32/fp16/bf16, not powersgd")

    def _check_nodes(self) -> None:
        if self.nodes is None:
            return
        divisors = [d for d in range(1, self.workers + 1) if self.workers % d == 0]
        if isinstance(self.nodes, bool) or not isinstance(self.nodes, int) or self.nodes not in divisors:
            raise UsageError(f"--nodes must divide --workers ({self.workers}) into nodes of equal size: accepted "
                             f"{', '.join(map(str, divisors))}; got {self.nodes!r}")

    @property
    def n_nodes(self) -> int:
        """K: the number of nodes (``nodes``, or one per worker)."""
        return self.workers if self.nodes is None else self.nodes

    @property
    def node_size(self) -> int:
        """L: workers per node (``workers / n_nodes``)."""
        return self.workers // self.n_nodes

    def _check_hook_options(self) -> None:
        """Build the run's hook (or FSDP reduce-scatter) here, unbound, so a bad option fails before any worker
        starts, with the hook's own message (which names the option and the accepted values)."""
        from tailq.hooks import BUILTINS, ddp_hook

        opts = dict(self.hook_options)
        what = f"method {self.name}: " if self.label else ""
        from tailq.codec import list_compressors

        cls = list_compressors().get(self.hook)
        for key, value in opts.items():  # an infinite value only where the option says inf is meant (no clipping)
            if isinstance(value, float) and math.isinf(value):
                opt = cls.options.get(key) if cls is not None else None
                if opt is None or opt.high != math.inf or value < 0:
                    raise UsageError(f"{what}option {key!r} must be a finite number; got {value!r}")
        if self.fsdp and self.hook not in BUILTINS:
            from tailq.fsdp import reduce_scatter

            build: Any = lambda: reduce_scatter(self.hook, **opts)  # noqa: E731
        elif self.diloco is not None:  # the outer mean's hook, with DiLoCo's defaults
            from tailq.diloco import hook_options

            build = lambda: ddp_hook(self.hook, **hook_options(self.hook, opts))[0]  # noqa: E731
        else:
            if self.fsdp:
                opts.pop("reduce", None)
            build = lambda: ddp_hook(self.hook, **opts)[0]  # noqa: E731
        try:
            state = build()
        except (TypeError, ValueError) as err:
            raise UsageError(f"{what}{err}") from err
        close = getattr(state, "close", None)
        if close is not None:
            close()

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (the network as its ``--net`` text, the schedule as its ``--net-schedule`` text)."""
        return {**dataclasses.asdict(self), "net": self.net.as_arg(),
                "net_schedule": None if self.net_schedule is None else self.net_schedule.as_arg()}

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        data = json.loads(Path(path).read_text())
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UsageError(f"{path}: unknown keys {unknown}")
        return cls(**data)

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        bits = self.hook_options.get("bits")
        name = self.hook if bits is None else f"{self.hook}-{bits}b"
        return name if self.diloco is None else f"diloco-{name}(H={self.diloco['sync_every']})"

    @property
    def baseline(self) -> bool:
        """The comparison's baseline: PyTorch's bf16 DDP hook, plain (not DiLoCo with a bf16 outer mean)."""
        return is_baseline(self.to_dict())


def is_baseline(config: dict[str, Any]) -> bool:
    """Whether a run's recorded config is the bf16 DDP baseline (plain bf16 hook, no options, not DiLoCo)."""
    return config.get("hook") == "bf16" and not config.get("hook_options") and not config.get("diloco")
