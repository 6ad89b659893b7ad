"""Whether network emulation works on this host: checked once per process by doing it, with one wording."""

from __future__ import annotations

import itertools
import os
import shutil
import sys
import threading
from dataclasses import dataclass

from tailq.comm.network import Network, format_delay, rate_arg

from .namespaces import _IP, _TC, EmulationError, _add_netns, _delete_netns, _host_lock, _run

__all__ = ["emulation_available", "require_emulation", "unavailable_message"]


@dataclass(frozen=True)
class _Capabilities:
    ok: bool
    netem: bool
    reason: str


_caps: _Capabilities | None = None
_caps_lock = threading.Lock()
_probe_counter = itertools.count()


def _probe() -> _Capabilities:
    """Check by doing: create a throwaway namespace with a veth pair, a bridge and a tbf (and netem) qdisc."""
    if not sys.platform.startswith("linux"):
        return _Capabilities(False, False, f"network emulation needs Linux network namespaces (this is {sys.platform})")
    if os.geteuid() != 0:
        return _Capabilities(
            False,
            False,
            f"network emulation needs root (network namespaces and tc need CAP_SYS_ADMIN and CAP_NET_ADMIN); "
            f"this process runs as uid {os.geteuid()}",
        )
    for tool, package in ((_IP, "iproute2"), (_TC, "iproute2")):
        if shutil.which(tool) is None:
            return _Capabilities(False, False, f"network emulation needs the `{tool}` command ({package})")
    name = f"tq-{os.getpid()}-probe{next(_probe_counter)}"
    with _host_lock():
        return _probe_in(name)


def _probe_in(name: str) -> _Capabilities:
    try:
        proc = _add_netns(name)
        if proc.returncode != 0:
            return _Capabilities(False, False, f"creating a network namespace failed: {proc.stderr.strip()}")
        steps = [
            ([_IP, "-n", name, "link", "add", "tqa", "type", "veth", "peer", "name", "tqb"], "a veth pair"),
            ([_IP, "-n", name, "link", "add", "tqbr", "type", "bridge"], "a bridge"),
            ([_TC, "-n", name, "qdisc", "add", "dev", "tqa", "root", "tbf", "rate", "1mbit", "burst", "16384",
              "limit", "65536"], "a tbf qdisc"),
        ]  # fmt: skip
        for args, what in steps:
            proc = _run(args, check=False)
            if proc.returncode != 0:
                return _Capabilities(False, False, f"creating {what} in a network namespace failed: "
                                     f"{proc.stderr.strip()}")  # fmt: skip
        netem = _run([_TC, "-n", name, "qdisc", "add", "dev", "tqb", "root", "netem", "delay", "1ms"], check=False)
        has_netem = netem.returncode == 0
        return _Capabilities(
            True,
            has_netem,
            "network namespaces, veth pairs, bridges and tc tbf work"
            + ("" if has_netem else " (no netem qdisc: rate only, no added delay)"),
        )
    except EmulationError as exc:
        return _Capabilities(False, False, str(exc))
    finally:
        _delete_netns(name)


def emulation_available(spec: Network | None = None) -> tuple[bool, str]:
    """Whether emulated networks can be created here, and a human sentence saying why (not).

    Checks root, the ``ip`` and ``tc`` commands, and actually creates and deletes a throwaway namespace with a veth
    pair, a bridge and a tbf qdisc (once per process; the answer is cached). With a ``spec`` that has a delay, the
    kernel's netem qdisc is required too. When the answer is no, the caller should suggest
    ``--net model:RATE[,DELAY]`` instead.
    """
    global _caps
    with _caps_lock:
        if _caps is None:
            _caps = _probe()
        caps = _caps
    if not caps.ok:
        return False, caps.reason
    if spec is not None and spec.kind == "emulated" and spec.delay_s > 0 and not caps.netem:
        rate = rate_arg(spec.rate_bps or 1.0)
        return False, (
            f"this kernel has no netem qdisc (CONFIG_NET_SCH_NETEM), so the added delay of "
            f"{format_delay(spec.delay_s)} cannot be emulated (the rate alone can: --net {rate})"
        )
    return True, caps.reason


def unavailable_message(net: Network, why: str) -> str:
    """The one sentence for "this network cannot be emulated here", with what to use instead."""
    return (f"--net {net.as_arg()}: network emulation is not available here ({why}); use --net model:{net.as_arg()} "
            "(communication time from the cost model, outputs labelled modeled) or --net none")


def require_emulation(net: Network) -> None:
    """Raise :class:`EmulationError` with :func:`unavailable_message` unless ``net`` can be emulated here."""
    ok, why = emulation_available(net)
    if not ok:
        raise EmulationError(unavailable_message(net, why))

