"""Shared fixtures: namespaces + veth, and xdpflow processes run inside them.

Every fixture that creates kernel state removes it in `finally`; a session
finalizer fails the run if any of this project's namespaces survived.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tools.netns import VethPair, in_netns, leftovers  # noqa: E402 - needs ROOT on sys.path
from tools.ready import NotReady, wait_ready  # noqa: E402

if TYPE_CHECKING:
    from tools.packets import Flow


@pytest.fixture(scope="session", autouse=True)
def _nothing_left_behind() -> Iterator[None]:
    yield
    after = set(leftovers())
    for ns in after:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    assert not after, f"tests left network namespaces behind: {sorted(after)}"


@pytest.fixture
def veth() -> Iterator[VethPair]:
    pair = VethPair()
    try:
        pair.create()
        yield pair
    finally:
        pair.destroy()


@dataclass
class Proc:
    """An xdpflow subprocess whose stderr log lines (JSON) are collected as they come."""

    popen: subprocess.Popen[str]
    logs: list[dict[str, Any]] = field(default_factory=list)
    _q: queue.Queue[str | None] = field(default_factory=queue.Queue)
    ready_file: Path | None = None   # run/dump: the --ready-file spawn() gave it

    def start_reader(self) -> None:
        def pump() -> None:
            assert self.popen.stderr is not None
            for line in self.popen.stderr:
                self._q.put(line)
            self._q.put(None)

        threading.Thread(target=pump, daemon=True).start()

    _ended: bool = False

    def _take(self, timeout: float) -> bool:
        """Move one stderr line into logs; False when none came or the stream ended."""
        if self._ended:
            return False
        try:
            line = self._q.get(timeout=timeout)
        except queue.Empty:
            return False
        if line is None:
            self._ended = True
            return False
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rec = {"event": "_raw", "line": line.rstrip()}
        self.logs.append(rec)
        return True

    def events(self, event: str) -> list[dict[str, Any]]:
        return [r for r in self.logs if r.get("event") == event]

    def wait_for(self, event: str, timeout: float = 30, count: int = 1) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while len(self.events(event)) < count:
            if self._ended:
                raise AssertionError(f"process exited ({self.popen.wait()}) before logging {event!r}; "
                                     f"logs: {self.logs}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {event!r}; logs so far: {self.logs}")
            self._take(0.1)
        return self.events(event)[count - 1]

    def wait_ready(self, timeout: float = 60) -> dict[str, Any]:
        """Wait for the process's readiness (its --ready-file); the log event that says what it meters."""
        assert self.ready_file is not None, "not spawned with a ready file (run or dump)"
        try:
            wait_ready(self.ready_file, lambda: not self._ended and self.popen.poll() is None, timeout,
                       tail=lambda: [json.dumps(r) for r in self.logs], poll=lambda: self._take(0.05))
        except NotReady as e:
            raise AssertionError(f"xdpflow {e}") from None
        return self.wait_for("exporting" if "run" in self.popen.args else "metering")

    def stop(self, sig: int = signal.SIGINT, timeout: float = 60) -> tuple[int, str]:
        """Signal, collect stdout and every remaining log line, return (exit code, stdout)."""
        self.popen.send_signal(sig)
        stdout = self.popen.stdout
        assert stdout is not None
        # Read stdout beside the wait, not before it: a process that does not exit must fail this
        # test within `timeout`, not hang the suite on a read that never ends.
        chunks: list[str] = []
        reader = threading.Thread(target=lambda: chunks.append(stdout.read()), daemon=True)
        reader.start()
        try:
            rc = self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout=10)
            while self._take(1):
                pass
            raise AssertionError(f"xdpflow did not exit within {timeout:g} s of signal {sig}; "
                                 f"last logs: {self.logs[-5:]}") from None
        reader.join(timeout=10)
        while self._take(5):
            pass
        return rc, "".join(chunks)

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(timeout=10)


def xdpflow_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "exporter.cli", *args]


_READY_DIR = tempfile.TemporaryDirectory(prefix="xdpflow-tests-ready-")


def spawn(netns: str | None, args: Sequence[str], env: dict[str, str] | None = None) -> Proc:
    """`xdpflow ARGS` (JSON logs); `run` and `dump` also get a --ready-file for Proc.wait_ready().

    `env`: variables added to this process's environment."""
    args = list(args)
    ready = None
    if args and args[0] in ("run", "dump") and "--ready-file" not in args:
        ready = Path(tempfile.mkdtemp(dir=_READY_DIR.name)) / "ready"
        args += ["--ready-file", str(ready)]
    cmd = xdpflow_cmd(*args, "--log-format", "json")
    if netns:
        cmd = in_netns(netns, cmd)
    full = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1", **(env or {}))
    p = Proc(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full, cwd=ROOT),
             ready_file=ready)
    p.start_reader()
    return p


@pytest.fixture
def xdpflow_proc() -> Iterator[Any]:
    """Factory for xdpflow subprocesses; any still running at teardown are killed."""
    procs: list[Proc] = []

    def start(netns: str | None, *args: str, env: dict[str, str] | None = None) -> Proc:
        p = spawn(netns, args, env)
        procs.append(p)
        return p

    try:
        yield start
    finally:
        for p in procs:
            p.kill()


@pytest.fixture
def procs() -> Iterator[list[Any]]:
    """Collectors, traffic and processes a test started; whatever still runs at the end is stopped."""
    started: list[Any] = []
    try:
        yield started
    finally:
        for x in reversed(started):
            if isinstance(x, subprocess.Popen):
                if x.poll() is None:
                    x.kill()
                    x.wait(timeout=10)
            elif hasattr(x, "kill"):
                x.kill()
            else:  # tools.soak.Churn: a traffic thread
                x._stop.set()


def xdp_prog_id(netns: str, ifname: str) -> int:
    """Id of the XDP program attached to `ifname` (any mode), 0 if none."""
    out = subprocess.run(in_netns(netns, ["ip", "-j", "link", "show", "dev", ifname]), capture_output=True,
                         text=True, check=True).stdout
    return int(json.loads(out)[0].get("xdp", {}).get("prog", {}).get("id", 0))


def xdp_attached(netns: str, ifname: str) -> bool:
    out = subprocess.run(in_netns(netns, ["ip", "-o", "link", "show", ifname]), capture_output=True, text=True,
                         check=False).stdout
    return " xdp" in out or "prog/xdp" in out


class JsonCollector:
    """`xdpflow collect --json` in a namespace, records to a file that can be read at any time."""

    def __init__(self, netns: str, port: int, tmp: Path) -> None:
        self.port = port
        self.url = f"udp://127.0.0.1:{port}"
        self.out = tmp / f"collector-{port}.jsonl"
        self.err = tmp / f"collector-{port}.log"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.popen = subprocess.Popen(
                in_netns(netns, xdpflow_cmd("collect", "--listen", f"127.0.0.1:{port}", "--json",
                                            "--log-format", "json")),
                stdout=out, stderr=err, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1"))
        deadline = time.monotonic() + 30
        while "listening" not in self.err.read_text():
            assert self.popen.poll() is None, f"collector on {port} exited: {self.err.read_text()}"
            assert time.monotonic() < deadline, f"collector on {port} did not start: {self.err.read_text()}"
            time.sleep(0.05)

    def all_records(self) -> list[dict[str, Any]]:
        text = self.out.read_text()
        return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines()]

    def records(self) -> list[dict[str, Any]]:
        """Flow data records received so far (options records left out)."""
        return [r for r in self.all_records() if not r["_options"]]

    flows = records

    def packets_of(self, flow: Flow) -> int:
        src = "sourceIPv4Address" if flow.version == 4 else "sourceIPv6Address"
        return sum(r["packetDeltaCount"] for r in self.records()
                   if (r.get(src), r.get("sourceTransportPort")) == (flow.src, flow.sport))

    def of(self, flow: Flow) -> list[dict[str, Any]]:
        return [r for r in self.records() if (r.get("sourceIPv4Address"), r.get("sourceTransportPort"))
                == (flow.src, flow.sport)]

    def has(self, *flows: Flow) -> bool:
        return all(self.of(fl) for fl in flows)

    def wait_for(self, what: str, cond: Callable[[], bool], timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < deadline, f"collector {self.port}: timed out waiting for {what}; " \
                                                f"records: {self.records()}"
            time.sleep(0.05)

    def stop(self) -> dict[str, Any]:
        """SIGTERM; the summary counters it logs."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        self.popen.wait(timeout=30)
        events = [json.loads(line) for line in self.err.read_text().splitlines() if line.startswith("{")]
        return next(e for e in events if e.get("event") == "summary")

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(timeout=10)


@pytest.fixture
def collector(veth: VethPair, tmp_path: Path) -> Iterator[JsonCollector]:
    """The built-in collector on udp://127.0.0.1:4739 in the observer namespace."""
    c = JsonCollector(veth.obs, 4739, tmp_path)
    try:
        yield c
    finally:
        c.kill()
