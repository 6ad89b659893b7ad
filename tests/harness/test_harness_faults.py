"""The fault matrix of the harness and the CLI: bad input gets one clear line and exit status 2 before anything
starts; a comparison never loses finished work (a failed method is recorded, the others go on, ``--resume`` reruns
only what is missing); a worker that dies at exit after its last collective costs nothing; SIGTERM and SIGHUP to the
launcher stop its workers and remove its network. README's "What happens when…" table names these tests."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tailq.cli import main
from tailq.comm.network import Network
from tailq.harness.compare import ComparisonIncomplete, compare, parse_method, resume
from tailq.harness.config import RunConfig
from tailq.harness.launch import launch_run
from tailq.harness.netem import emulation_available


# -- bad input: one line, exit 2, nothing started ------------------------------------------------------------
def _files(tmp: Path) -> dict[str, str]:
    rng = np.random.default_rng(0)
    arrays = {"tiny": rng.standard_normal(20), "const": np.ones(1000), "complex": rng.standard_normal(500) + 1j,
              "strings": np.array(["a", "b"] * 100)}
    out = {}
    for name, arr in arrays.items():
        np.save(tmp / f"{name}.npy", arr)
        out[name] = str(tmp / f"{name}.npy")
    (tmp / "corrupt").mkdir()
    (tmp / "corrupt" / "results.json").write_text('{"runs": [')
    (tmp / "partial").mkdir()
    (tmp / "partial" / "results.json").write_text('{"runs": []}')
    np.save(tmp / "huge.npy", np.concatenate([rng.standard_normal(1000), [1e300]]))  # float64 beyond float32
    out["huge"] = str(tmp / "huge.npy")
    np.save(tmp / "unit.npy", rng.laplace(0, 1, 1000))
    out["unit"] = str(tmp / "unit.npy")
    plan = {"workload": "synthetic", "workers": 2, "net": "none", "steps": 2, "eval_every": 1, "seed": 0,
            "target_fraction": 0.99, "target_metric": "accuracy", "extra": {}, "notes": [], "methods": [["bf16", []]]}
    for name, patch in (("plan-key", {"bogus": 1, "workload": "nosuch"}), ("plan-extra", {"extra": {"bogus": 1}}),
                        ("plan-target", {"target_fraction": "high"}), ("plan-nodes", {"extra": {"nodes": 3}})):
        (tmp / name).mkdir()
        (tmp / name / "compare.json").write_text(json.dumps({**plan, **patch}))
    return out


DESIGN = ["design", "--scheme", "tnq", "--tail", "laplace", "--bits", "3"]
HARNESS = ["--net", "none", "--workers", "2"]
FAST = [*HARNESS, "--workload", "synthetic", "--steps", "2", "--eval-every", "1"]  # short, should a run start
QUICK = ["--numel", "1000", "--repeat", "1", "--compressors", "tnq", "--bits", "2", "--paths", "reference"]
BAD_INPUT = [
    # (argv, the words the one line must contain)
    (["train", *HARNESS, "--steps", "0"], "--steps must be an integer >= 1; got 0"),
    (["train", *HARNESS, "--eval-every", "0"], "--eval-every must be an integer >= 1; got 0"),
    (["compare", *HARNESS, "--steps", "0"], "--steps must be an integer >= 1"),
    (["compare", *HARNESS, "--seeds", "0"], "--seeds must be an integer >= 1; got 0"),
    (["compare", *HARNESS, "--methods", "bf16", "tnq:3", "tnq:3"], "tnq-3b given more than once"),
    (["compare", "--net", "garbage"], "--net: cannot use 'garbage'"),
    (["compare", *HARNESS, "--methods", "bf16", "tnq:3:foo=1"], "unknown option(s) foo"),
    (["compare", *HARNESS, "--methods", "bf16", "tnq:3:bits=abc"], "option 'bits' must be an integer, got 'abc'"),
    (["compare", *HARNESS, "--methods", "bf16", "powersgd:3"], "powersgd: unknown option(s) ['bits']"),
    (["compare", *HARNESS, "--methods", "bf16", "nosuch:3"], "must be one of"),
    (["train", *HARNESS, "--compressor", "powersgd", "--bits", "3"], "powersgd: unknown option(s) ['bits']"),
    (["train", *HARNESS, "--compressor", "tnq", "--bits", "9"], "--bits for tnq must be in 1..8; got 9"),
    ([*DESIGN, "--scale", "inf"], "--scale must be a finite number in [1.17549e-38, 3.40282e+38]"),
    ([*DESIGN, "--scale", "1", "--seed", "-1"], "--seed must be an integer >= 0; got -1"),
    (["fit", "{tiny}"], "20 non-zero values; a tail fit needs at least 50"),
    (["fit", "{const}"], "every non-zero value has the same magnitude"),
    (["fit", "{complex}"], "holds complex128 values; expected real numbers"),
    (["fit", "{strings}"], "expected real numbers"),
    (["report", "{tmp}/corrupt"], "is not a tailq comparison summary"),
    (["report", "{tmp}/partial"], "is not a tailq comparison summary"),
    (["compare", "--resume", "{tmp}/nothing-here"], "has no compare.json"),
    # issue 24, item 8: every number finite and in range, checked before anything starts
    (["train", *FAST, "--lr", "inf"], "--lr must be a finite number > 0; got inf"),
    (["compare", *FAST, "--methods", "bf16", "--lr", "inf"], "--lr must be a finite number > 0; got inf"),
    (["compare", *FAST, "--methods", "bf16", "--lr", "nan"], "--lr must be a finite number > 0; got nan"),
    *[(["train", *FAST, "--tail-df", v], f"--tail-df must be a finite number > 2 (Student-t degrees of freedom with "
       f"finite variance); got {float(v)}") for v in ("0", "-1", "nan", "inf")],
    (["compare", *FAST, "--methods", "bf16", "--tail-df", "inf"], "--tail-df must be a finite number > 2"),
    (["compare", *FAST, "--methods", "bf16", "tnq:3:timeout_s=inf"], "option 'timeout_s' must be a finite number"),
    (["train", *FAST, "--option", "timeout_s=inf"], "option 'timeout_s' must be a finite number; got inf"),
    (["train", *FAST, "--bucket-cap-mb", "inf"], "--bucket-cap-mb must be a finite number in (0, 1e+06]; got inf"),
    (["train", *FAST, "--bucket-cap-mb", "1e300"], "--bucket-cap-mb must be a finite number in (0, 1e+06]"),
    (["train", *FAST, "--seed", "-1"], "--seed must be an integer >= 0; got -1"),
    (["train", *FAST, "--seed", str(2**64 + 1)], "--seed must be in 0..4294967295"),
    (["compare", *FAST, "--methods", "bf16", "--seed", "4294967295", "--seeds", "2"],
     "--seed 4294967295 with --seeds 2 would run seeds up to 4294967296; seeds must be in 0..4294967295"),
    (["train", *FAST, "--workers", "1000"], "--workers must be in 1..250; got 1000"),
    # --nodes K: K nodes of equal size (a divisor of --workers), on a network that has nodes (issue 21, item 5)
    (["train", *FAST, "--nodes", "0"], "--nodes must be an integer >= 1; got 0"),
    (["train", *FAST, "--nodes", "1000"], "--nodes must be in 1..250; got 1000"),
    (["train", *FAST, "--nodes", "3"], "--nodes must divide --workers (2) into nodes of equal size: accepted 1, 2; "
     "got 3"),
    (["compare", *FAST, "--workers", "6", "--methods", "bf16", "--nodes", "4"],
     "--nodes must divide --workers (6) into nodes of equal size: accepted 1, 2, 3, 6; got 4"),
    (["train", *FAST, "--steps", str(10**30)], "--steps must be in 1..9223372036854775807"),
    (["train", *FAST, "--batch-size", str(10**30)], "--batch-size must be in 1..9223372036854775807"),
    ([*DESIGN, "--scale", "1e300"], "--scale must be a finite number in [1.17549e-38, 3.40282e+38] (float32's normal "
     "range"),
    ([*DESIGN, "--scale", "1e-300"], "--scale must be a finite number in [1.17549e-38, 3.40282e+38]"),
    (["design", "--scheme", "tnq", "--tail", "laplace", "--bits", "8", "--scale", "1e38"],
     "--scale: the design's levels reach 1.27627e+39, beyond float32's range"),
    (["design", "--scheme", "tnq", "--tail", "powerlaw", "--bits", "3", "--gamma", "4", "--m", "1e300"],
     "--m must be a finite number in [1.17549e-38, 3.40282e+38]"),
    ([*DESIGN, "--scale", "1", "--mc-samples", str(10**14)], "--mc-samples must be in 1..100000000"),
    ([*DESIGN, "--scale", "1", "--seed", str(2**64 + 1)], "--seed must be in 0..4294967295"),
    (["fit", "{huge}"], "huge.npy: values up to 1e+300 are beyond float32's range (+-3.40282e+38)"),
    (["demo", "--n", "0"], "--n must be an integer >= 1; got 0"),
    (["demo", "--n", "-1"], "--n must be an integer >= 1; got -1"),
    (["bench", "codec", "--numel", str(10**14)], "--numel must be in 1..2147483647"),
    (["bench", "codec", *QUICK, "--threads", "0"], "--threads must be an integer >= 1; got 0"),
    (["bench", "codec", *QUICK, "--world", "1000"], "--world must be in 1..64; got 1000"),
    (["bench", "codec", "--numel", "1000", "--repeat", "1", "--compressors", "tnq", "--paths", "reference", "--bits"],
     "--bits needs at least one value"),
    (["bench", "scale", "--compressor", "nosuch"], "--compressor nosuch --code-bits 3: unknown compressor 'nosuch'"),
    (["bench", "scale", "--grid", "2by2"], "--grid must be KxL (K nodes x L workers per node, e.g. 2x4) with 2 <= K*L "
     "<= 64; got '2by2'"),
    (["bench", "scale", "--grid", "2x2", "8x16"], "--grid must be KxL (K nodes x L workers per node, e.g. 2x4) with "
     "2 <= K*L <= 64; got '8x16'"),
    (["bench", "scale", "--grid"], "argument --grid: expected at least one argument"),
    # a compare.json that is not a plan: one line naming the file and the key
    (["compare", "--resume", "{tmp}/plan-key"], "plan-key/compare.json: unknown key 'bogus'"),
    (["compare", "--resume", "{tmp}/plan-extra"], "plan-extra/compare.json: unknown key 'extra.bogus'"),
    (["compare", "--resume", "{tmp}/plan-target"], "plan-target/compare.json: --target must be a finite number"),
    (["compare", "--resume", "{tmp}/plan-nodes"], "plan-nodes/compare.json: --nodes must divide --workers (2)"),
    # what becomes a path component is a plain name; an empty string is not a silent default
    (["compare", *FAST, "--methods", "bf16", "--out", "{tmp}/out", "--id", "../x"], "--id must be a plain name"),
    (["compare", *FAST, "--methods", "bf16", "--out", "{tmp}/out", "--id", ".."], "--id must be a plain name"),
    (["compare", *FAST, "--methods", "bf16", "--out", "{tmp}/out", "--id", ""], "--id must be a plain name"),
    (["compare", *FAST, "--methods", "bf16", "--out", "{tmp}/out", "--id", "a/b"], "--id must be a plain name"),
    (["compare", *FAST, "--methods", ""], "--methods: '': the method must be one of"),
    (["compare", *FAST, "--methods", "bf16", "--resume", ""], "--resume must be a path; got ''"),
    (["compare", *FAST, "--methods", "bf16", "--json", ""], "--json must be a path; got ''"),
    (["train", *FAST, "--run-dir", "{tmp}/partial/results.json/run"], "--run-dir {tmp}/partial/results.json/run: "
     "cannot create it under {tmp}/partial/results.json (not a writable directory)"),
    (["compare", *FAST, "--methods", "bf16", "--out", "{tmp}/partial/results.json"], "exists and is not a directory"),
    (["compare", *FAST, "--methods", "bf16", "--json", "{tmp}/nothing-here/s.json"],
     "--json {tmp}/nothing-here/s.json: {tmp}/nothing-here is not a writable directory (it is not created)"),
    (["demo", "--n", "100", "--json", "{tmp}"], "--json {tmp}: is a directory; give a file path"),
    (["train", *FAST, "--workload", ""], "--workload must be one of digits"),
    (["train", *FAST, "--run-dir", ""], "--run-dir must be a path; got ''"),
    # --net-schedule STEP:RATE,...: a rate to change (not loopback), steps positive, increasing, below --steps
    (["train", *FAST, "--net-schedule", "1:20mbit"], "--net-schedule: --net none (loopback) cannot be shaped"),
    (["compare", *FAST, "--methods", "bf16", "--net-schedule", "1:20mbit"], "--net-schedule: --net none (loopback) "
     "cannot be shaped"),
    (["train", *FAST, "--net", "model:1gbit", "--net-schedule", "1:fast"], "--net-schedule: cannot use '1:fast': "
     "'fast' is not a RATE; accepted: STEP:RATE[,STEP:RATE...]"),
    (["train", *FAST, "--net", "model:1gbit", "--net-schedule", "0:20mbit"], "--net-schedule: cannot use '0:20mbit': "
     "the step '0' is not a positive integer; accepted: STEP:RATE"),
    (["train", *FAST, "--net", "model:1gbit", "--net-schedule", "1:20mbit,1:1gbit"], "the steps must increase (1, "
     "then 1); accepted: STEP:RATE"),
    (["train", *FAST, "--net", "model:1gbit", "--net-schedule", "1:50kbit"], "--net-schedule: cannot use '1:50kbit': "
     "the rate '50kbit' is outside 100kbit..100gbit"),
    (["train", *FAST, "--net", "model:1gbit", "--net-schedule", "5:20mbit"], "--net-schedule: cannot use '5:20mbit': "
     "step 5 is not below --steps (2)"),
    (["compare", *FAST, "--net", "model:1gbit", "--methods", "bf16", "--net-schedule", "20mbit"],
     "--net-schedule: cannot use '20mbit': '20mbit' is not STEP:RATE; accepted: STEP:RATE"),
    # argparse's own complaints are one line too, named by the subcommand
    ([*DESIGN[:-1], "abc", "--scale", "1"], "argument --bits: invalid int value: 'abc'"),
    (["fit", "{unit}", "--bits", "0"], "argument --bits: invalid choice: 0"),
    (["list", "--json", "extra"], "unrecognized arguments: extra"),
]


@pytest.mark.parametrize(("argv", "words"), BAD_INPUT, ids=[" ".join(a[:1] + a[-2:]) for a, _ in BAD_INPUT])
def test_bad_input_is_one_clear_line_and_exit_2(argv: list[str], words: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    files = _files(tmp_path)
    monkeypatch.chdir(tmp_path)  # a run directory would land here: nothing may be created

    def started(*_: object, **__: object) -> None:
        raise AssertionError("a run started")

    import tailq.harness.compare
    import tailq.harness.launch

    monkeypatch.setattr(tailq.harness.launch, "launch_run", started)
    monkeypatch.setattr(tailq.harness.compare, "launch_run", started)
    before = sorted(tmp_path.rglob("*"))
    argv = [a.format(tmp=tmp_path, **files) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"tailq {argv[0]}: error: "), err
    words = words.format(tmp=tmp_path)
    assert words in err and "Traceback" not in err, err
    assert not (tmp_path / "runs").exists()  # validated before anything started
    assert sorted(tmp_path.rglob("*")) == before  # nothing written anywhere (an --id cannot leave --out)


# -- a comparison never loses finished work ------------------------------------------------------------------
COMPARE = {"workload": "synthetic", "workers": 2, "net": "none", "steps": 6, "eval_every": 3, "quiet": True}


def test_a_failed_method_is_recorded_the_others_go_on_and_resume_reruns_only_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    methods = [parse_method(m) for m in ("bf16", "fp32", "fp16")]
    monkeypatch.setenv("TAILQ_FAULT_LABEL", "fp32")  # fp32's rank 1 dies after step 3; bf16 and fp16 do not
    monkeypatch.setenv("TAILQ_FAULT_EXIT_AT_STEP", "3")
    monkeypatch.setenv("TAILQ_FAULT_RANK", "1")
    with pytest.raises(ComparisonIncomplete, match=r"1 method\(s\) failed: fp32(.|\n)*--resume"):
        compare(methods=methods, out_dir=str(tmp_path), run_id="c", **COMPARE)  # type: ignore[arg-type]
    root = tmp_path / "c"
    summary = json.loads((root / "results.json").read_text())
    assert [r["name"] for r in summary["runs"]] == ["bf16", "fp16"]  # the one after the failure ran too
    assert [f["name"] for f in summary["failed"]] == ["fp32"]
    assert "rank 1 exited with status 17" in summary["failed"][0]["error"]
    failed = json.loads((root / "fp32" / "failed.json").read_text())
    assert set(failed["logs"]) == {"rank0.log", "rank1.log"}
    assert "fp32 FAILED" in (root / "report.md").read_text()
    kept = {n: (root / n / "result.json").stat().st_mtime_ns for n in ("bf16", "fp16")}

    monkeypatch.delenv("TAILQ_FAULT_EXIT_AT_STEP")
    resume(root, quiet=True)
    summary = json.loads((root / "results.json").read_text())
    assert sorted(r["name"] for r in summary["runs"]) == ["bf16", "fp16", "fp32"] and not summary["failed"]
    assert {n: (root / n / "result.json").stat().st_mtime_ns for n in kept} == kept  # not rerun
    assert any("resumed: kept the finished runs of bf16, fp16" in n for n in summary["notes"])
    assert not (root / "fp32" / "failed.json").exists()


def test_a_worker_that_dies_at_exit_after_its_last_collective_costs_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fresh-clone `make demo` failure: a rank aborted (SIGABRT) in teardown after training."""
    monkeypatch.setenv("TAILQ_FAULT_ABORT_AT_EXIT", "1")
    cfg = RunConfig(workload="synthetic", hook="bf16", workers=2, steps=6, eval_every=3, net=Network("none", None),
                    run_dir=str(tmp_path / "run"))
    res = launch_run(cfg)
    assert res["steps_done"] == 6
    assert res["exit_notes"] == ["rank 1 exited with status -6 after its last collective of the run (a crash at "
                                 "process exit); the result stands"]


# -- SIGTERM / SIGHUP to the launcher ------------------------------------------------------------------------
def _workers_of(run_dir: Path) -> list[int]:
    """Live worker processes of the run (their command line names the run's config.json)."""
    needle = str(run_dir / "config.json").encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes()
                state = (proc / "stat").read_text().split(") ")[-1][:1]
            except OSError:
                continue
            if needle in cmd and b"tailq.harness.worker" in cmd and state != "Z":
                pids.append(int(proc.name))
    return pids


# The launcher starts with SIGTERM's and SIGHUP's default dispositions whatever the test runner's: started under
# nohup (SIGHUP ignored, inherited), it keeps SIGHUP ignored by design, and the SIGHUP case would wait out its 60 s.
LAUNCHER = ("import signal, sys; [signal.signal(s, signal.SIG_DFL) for s in (signal.SIGTERM, signal.SIGHUP)]; "
            "from tailq.cli import main; sys.exit(main(sys.argv[1:]))")


def _start(argv: list[str], run_dir: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "w") as fh:
        p = subprocess.Popen([sys.executable, "-c", LAUNCHER, *argv], stdout=fh, stderr=subprocess.STDOUT)
    deadline = time.time() + 180
    while len(_workers_of(run_dir)) < 2 or not (run_dir / "progress.json").is_file():  # training has begun
        assert p.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    return p


def _stopped(p: subprocess.Popen[bytes], sig: int, run_dir: Path, log: Path) -> str:
    p.send_signal(sig)
    p.wait(timeout=60)
    out = log.read_text()
    assert p.returncode == 128 + sig, out[-3000:]
    deadline = time.time() + 10
    while _workers_of(run_dir) and time.time() < deadline:
        time.sleep(0.1)
    assert not _workers_of(run_dir), "workers outlived the launcher"
    return out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_or_sighup_to_train_stops_its_workers(sig: int, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    argv = ["train", "--workload", "synthetic", "--workers", "2", "--net", "none", "--steps", "1000000",
            "--compressor", "bf16", "--run-dir", str(run_dir)]
    out = _stopped(_start(argv, run_dir, tmp_path / "log"), sig, run_dir, tmp_path / "log")
    assert f"stopped by {signal.Signals(sig).name}; its workers were stopped" in out


# launch_run with its workers' Popen._waitpid_lock replaced by one that sends SIGHUP to this process right after a
# non-blocking acquire succeeds (once training has begun): the handler runs exactly where a real signal lands when it
# arrives while Popen.poll() is between acquiring that lock and entering the try that releases it. Raised there, the
# launcher's Stopped left the lock held and reap()'s wait() blocked on it forever (the CI failure of the SIGHUP case
# above, on a loaded machine); held until the poll returns (launch._held), it stops the run at once.
SIGNAL_INSIDE_POLL = r"""
import os, signal, subprocess, sys, time
from pathlib import Path
import tailq.harness.launch as launch
from tailq.comm.network import Network
from tailq.harness.config import RunConfig

run_dir = Path(sys.argv[1])
fired = []

class Lock:
    def __init__(self, real):
        self.real = real
    def acquire(self, blocking=True, timeout=-1):
        got = self.real.acquire(blocking, timeout)
        if got and not blocking and not fired and (run_dir / "progress.json").is_file():
            fired.append(time.monotonic())
            os.kill(os.getpid(), signal.SIGHUP)
        return got
    def release(self):
        self.real.release()
    def locked(self):
        return self.real.locked()
    __enter__ = acquire
    def __exit__(self, *exc):
        self.real.release()

class Popen(subprocess.Popen):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not hasattr(self, "_waitpid_lock"):
            print("SKIP: this Python's Popen has no _waitpid_lock", flush=True)
            os._exit(0)
        self._waitpid_lock = Lock(self._waitpid_lock)

signal.signal(signal.SIGHUP, signal.SIG_DFL)
launch.subprocess.Popen = Popen
cfg = RunConfig(workload="synthetic", hook="bf16", workers=2, steps=1_000_000, eval_every=1000,
                net=Network("none", None), run_dir=str(run_dir))
try:
    launch.launch_run(cfg)
except launch.Stopped as err:
    print(f"{err} inside a poll: launch_run returned {time.monotonic() - fired[0]:.3f} s later", flush=True)
"""


def test_sighup_inside_a_workers_poll_still_stops_the_launcher(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    p = subprocess.run([sys.executable, "-c", SIGNAL_INSIDE_POLL, str(run_dir)], capture_output=True, text=True,
                       timeout=300)
    if p.stdout.startswith("SKIP: "):
        pytest.skip(p.stdout[6:].strip())
    assert p.returncode == 0 and "stopped by SIGHUP inside a poll" in p.stdout, p.stdout + p.stderr[-3000:]
    assert not _workers_of(run_dir), "workers outlived the launcher"


def _ours(pid: int) -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {ln.split()[0] for ln in out.splitlines() if re.match(rf"tq-{pid}-n\d+-", ln)}


EMULATION, WHY = emulation_available(Network.parse("50mbit"))


@pytest.mark.slow
@pytest.mark.skipif(not EMULATION, reason=f"network emulation unavailable: {WHY}")
def test_sigterm_to_compare_on_an_emulated_network_stops_workers_and_removes_namespaces(tmp_path: Path) -> None:
    run_dir = tmp_path / "c" / "bf16"
    argv = ["compare", "--workload", "synthetic", "--workers", "2", "--net", "50mbit", "--steps", "1000000",
            "--methods", "bf16", "--out", str(tmp_path), "--id", "c"]
    p = _start(argv, run_dir, tmp_path / "log")
    assert _ours(p.pid)
    out = _stopped(p, signal.SIGTERM, run_dir, tmp_path / "log")
    assert not _ours(p.pid), "namespaces left behind"
    assert f"continue with tailq compare --resume {tmp_path / 'c'}" in out
    assert os.path.isfile(tmp_path / "c" / "compare.json")
