"""Readiness: tell a supervisor, a container runtime and scripts when xdpflow is metering.

Two channels carry the same three moments (ready, reloading, stopping):

- systemd's notification protocol (sd_notify(3)): when $NOTIFY_SOCKET names a socket (a path, or
  "@name" for the abstract namespace), one datagram of newline-separated KEY=VALUE lines goes to
  it per moment: READY=1 with a STATUS= line once every configured interface is attached and the
  collector sockets are open; RELOADING=1 (with MONOTONIC_USEC=, which systemd 253+ wants) then
  READY=1 around a SIGHUP; STOPPING=1 when shutdown begins. A plain AF_UNIX datagram, so no
  dependency on libsystemd; the variable is unset afterwards so no child inherits it.
- a ready file (--ready-file PATH): written atomically (a temporary file in the same directory,
  then rename) when ready, holding one JSON object that says what is metered; removed on exit,
  whatever the exit. A script, a test or a Kubernetes readiness probe (`test -f PATH`) waits for it.

Neither channel can stop the exporter: a notification that can't be sent is logged once and
counted, never raised.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import structlog

log = structlog.get_logger("xdpflow.readiness")

ENV = "NOTIFY_SOCKET"


def notify_address(value: str) -> str | bytes | None:
    """The socket address $NOTIFY_SOCKET names: a path, or "@..." for the abstract namespace."""
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # vsock and relative names: not ours to guess


def message(**fields: object) -> bytes:
    """One sd_notify datagram: KEY=VALUE lines, newlines in values flattened to spaces."""
    return "\n".join(f"{k}={str(v).replace(chr(10), ' ')}" for k, v in fields.items()).encode()


@dataclass
class Readiness:
    """Both channels; either may be absent (no $NOTIFY_SOCKET, no ready file)."""

    ready_file: str | None = None
    environ: dict[str, str] | None = None   # tests pass their own; None: os.environ
    failures: int = 0
    _address: str | bytes | None = field(default=None, init=False)
    _sock: socket.socket | None = field(default=None, init=False)
    _warned: bool = field(default=False, init=False)
    _wrote: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        env = os.environ if self.environ is None else self.environ
        self._address = notify_address(env.get(ENV, ""))
        if self.environ is None:
            os.environ.pop(ENV, None)  # like sd_notify(unset_environment=1): children must not notify for us
        if self.ready_file is not None:
            # A file left by a process that was killed would say "ready" before this one is.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.ready_file)
                log.info("stale ready file removed", path=self.ready_file)
        if self._address is not None:
            try:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            except OSError as e:
                self._failed(f"cannot create the notification socket: {e.strerror}")

    @property
    def notifying(self) -> bool:
        return self._sock is not None

    def _failed(self, why: str) -> None:
        self.failures += 1
        if not self._warned:
            self._warned = True
            log.warning("readiness notification failed", error=why, notify_socket=os.fsdecode(self._address or b""))

    def _notify(self, **fields: object) -> None:
        if self._sock is None or self._address is None:
            return
        try:
            self._sock.sendto(message(**fields), self._address)
        except OSError as e:
            self._failed(e.strerror or str(e))

    def ready(self, status: str, info: dict[str, Any]) -> None:
        """Metering: write the ready file, then tell systemd (so the file exists once READY=1 arrives)."""
        if self.ready_file is not None:
            self._write(info)
        self._notify(READY=1, STATUS=status, MAINPID=os.getpid())

    def reloading(self) -> None:
        self._notify(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000,
                     STATUS="reloading the configuration")

    def stopping(self) -> None:
        self._notify(STOPPING=1, STATUS="stopping: final drain and export")

    def close(self) -> None:
        """Remove the ready file (if this process wrote it) and close the socket."""
        if self.ready_file is not None and self._wrote:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.ready_file)
            self._wrote = False
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _write(self, info: dict[str, Any]) -> None:
        assert self.ready_file is not None
        path = self.ready_file
        tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.{os.getpid()}.tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(json.dumps({"pid": os.getpid(), **info}, sort_keys=True) + "\n")
            os.replace(tmp, path)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            self.failures += 1
            log.error("ready file not written", path=path, error=e.strerror or str(e))
            return
        self._wrote = True


def process_age_seconds() -> float:
    """Seconds since this process started (its start time in /proc/self/stat), 0.0 where unknown."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            fields = f.read().rpartition(")")[2].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")   # field 22: starttime, in clock ticks
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - started)
    except (OSError, ValueError, IndexError):
        return 0.0


def ready_file_problem(path: str) -> str | None:
    """Why a ready file can't be created at `path`, or None (checked at start, before any attach)."""
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        return "is a directory; give a file path"
    if not os.path.isdir(parent):
        return f"directory {parent} does not exist"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"directory {parent} is not writable"
    return None
