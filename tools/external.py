"""Launchers for real collectors used by the interop tests and benchmarks.

Each starts a Debian-packaged collector on a loopback port (optionally inside a
network namespace), stops it cleanly, and turns what it stored into plain
dicts: nfcapd (nfdump 1.7) via `nfdump -o json`, tshark via its JSON/fields
output. They are context managers: the process is always stopped.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar, Self


def _prefix(netns: str | None) -> list[str]:
    return ["ip", "netns", "exec", netns] if netns else []


def wait_bound(proc: subprocess.Popen[str], port: int, netns: str | None, what: str, timeout: float = 20) -> None:
    """Return once a UDP socket is bound to `port` (in `netns`): the collector receives from then on.

    RuntimeError, with what the process printed, if it exits first or the timeout passes.
    """
    deadline = time.monotonic() + timeout
    while True:
        res = subprocess.run([*_prefix(netns), "ss", "-Hlun", f"sport = :{port}"], capture_output=True, text=True,
                             check=False)
        if res.stdout.strip():
            return
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                proc.kill()
            out = proc.stdout.read() if proc.stdout else ""
            how = "exited at start" if proc.returncode not in (None, -9) else f"bound no socket within {timeout:.0f} s"
            raise RuntimeError(f"{what} {how}: {out.strip()[-300:]}")
        time.sleep(0.05)


def require(binary: str, package: str) -> str:
    path = shutil.which(binary)
    if path is None:
        raise RuntimeError(f"{binary} not found: apt-get install {package}")
    return path


@dataclass(kw_only=True)
class _Launched:
    """A collector process with a work directory: a context manager that always cleans up.

    The work directory is a fresh temporary one unless given; cleanup removes it with the process.
    """

    workdir_prefix: ClassVar[str]
    netns: str | None = None
    workdir: str = ""
    proc: subprocess.Popen[str] | None = None

    def __post_init__(self) -> None:
        if not self.workdir:
            self.workdir = tempfile.mkdtemp(prefix=self.workdir_prefix)

    def start(self) -> Self:
        raise NotImplementedError

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.cleanup()
            raise

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        self.cleanup()


@dataclass
class Nfcapd(_Launched):
    """nfcapd listening on host:port, writing to a temporary directory."""

    workdir_prefix = "xdpflow-nfcapd-"
    port: int
    host: str = "127.0.0.1"

    def start(self) -> Nfcapd:
        require("nfcapd", "nfdump")
        cmd = [
            *_prefix(self.netns),
            "nfcapd",
            "-b",
            self.host,
            "-p",
            str(self.port),
            "-w",
            self.workdir,
            "-t",
            "3600",
            "-I",
            "xdpflow",
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_bound(self.proc, self.port, self.netns, "nfcapd")
        return self

    def stop(self) -> str:
        """SIGTERM: nfcapd writes its current file and exits. Returns its log output."""
        if self.proc is None:
            return ""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=30)
        self.proc = None
        return out or ""

    def flows(self) -> list[dict[str, Any]]:
        files = [
            os.path.join(self.workdir, f)
            for f in os.listdir(self.workdir)
            if f.startswith("nfcapd.") and not f.startswith("nfcapd.current")
        ]
        records: list[dict[str, Any]] = []
        for path in sorted(files):
            res = subprocess.run(
                ["nfdump", "-r", path, "-o", "json"],
                capture_output=True,
                text=True,
                check=True,
                env=dict(os.environ, TZ="UTC"),
            )
            text = res.stdout.strip()
            if not text:
                continue
            records.extend(r for r in json.loads(text) if r.get("type") == "FLOW")
        return records

    def stat_text(self) -> str:
        files = [os.path.join(self.workdir, f) for f in os.listdir(self.workdir) if f.startswith("nfcapd.")]
        return "\n".join(
            subprocess.run(["nfdump", "-r", p, "-I"], capture_output=True, text=True, check=False).stdout
            for p in sorted(files)
        )


@dataclass
class Tshark(_Launched):
    """tshark capturing UDP to `port` on an interface (default loopback) into a pcap."""

    workdir_prefix = "xdpflow-tshark-"
    port: int
    iface: str = "lo"

    @property
    def pcap(self) -> str:
        return os.path.join(self.workdir, "ipfix.pcap")

    def start(self) -> Tshark:
        require("tshark", "tshark")
        cmd = [*_prefix(self.netns), "tshark", "-i", self.iface, "-f", f"udp port {self.port}", "-w", self.pcap, "-q"]
        # Own process group: tshark captures through a dumpcap child that must die with it.
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)
        deadline = time.monotonic() + 20
        assert self.proc.stderr is not None
        while time.monotonic() < deadline:  # tshark prints "Capturing on ..." once the capture runs
            line = self.proc.stderr.readline()
            if "Capturing on" in line or not line:
                break
        if self.proc.poll() is not None:
            raise RuntimeError("tshark exited at start")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            time.sleep(0.5)
            self.proc.send_signal(signal.SIGINT)
            self.proc.communicate(timeout=30)
        self._kill_group()
        self.proc = None

    def _kill_group(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def decode(self) -> tuple[list[dict[str, Any]], str]:
        """(packets as tshark's JSON, tshark's stderr) decoding the capture as IPFIX."""
        res = subprocess.run(
            ["tshark", "-r", self.pcap, "-d", f"udp.port=={self.port},cflow", "-T", "json"],
            capture_output=True,
            text=True,
            check=False,
        )
        return (json.loads(res.stdout) if res.stdout.strip() else []), res.stderr

    def expert_warnings(self) -> str:
        """tshark's expert info (malformed packets and protocol warnings), empty when clean."""
        res = subprocess.run(
            ["tshark", "-r", self.pcap, "-d", f"udp.port=={self.port},cflow", "-q", "-z", "expert,warn"],
            capture_output=True,
            text=True,
            check=False,
        )
        return res.stdout

    def cleanup(self) -> None:
        if self.proc is not None:
            self._kill_group()
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.proc = None
        shutil.rmtree(self.workdir, ignore_errors=True)


@dataclass
class Nfacctd(_Launched):
    """pmacct's nfacctd on host:port with the print plugin writing JSON lines."""

    workdir_prefix = "xdpflow-nfacctd-"
    port: int
    host: str = "127.0.0.1"
    aggregate: str = ("src_host, dst_host, src_port, dst_port, proto, vlan, tos, tcpflags, in_iface, "
                      "timestamp_start, timestamp_end")

    @property
    def output(self) -> str:
        return os.path.join(self.workdir, "flows.json")

    def start(self) -> Nfacctd:
        require("nfacctd", "pmacct")
        conf = os.path.join(self.workdir, "nfacctd.conf")
        with open(conf, "w", encoding="ascii") as f:
            f.write(f"daemonize: false\nnfacctd_ip: {self.host}\nnfacctd_port: {self.port}\n"
                    f"plugins: print\naggregate: {self.aggregate}\nprint_output: json\n"
                    f"print_output_file: {self.output}\nprint_output_file_append: true\n"
                    "print_refresh_time: 1\ntimestamps_secs: false\n")
        self.proc = subprocess.Popen([*_prefix(self.netns), "nfacctd", "-f", conf], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        wait_bound(self.proc, self.port, self.netns, "nfacctd")
        return self

    def stop(self) -> str:
        """SIGINT after a refresh period, so the print plugin has written what it holds."""
        if self.proc is None:
            return ""
        time.sleep(2.5)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            out, _ = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        self.proc = None
        return out or ""

    def flows(self) -> list[dict[str, Any]]:
        if not os.path.exists(self.output):
            return []
        with open(self.output, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip().startswith("{")]


