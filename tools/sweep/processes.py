"""The sweep's children: every process it starts runs in its own session, logs to a file and dies
with the sweep.

A Child is signalled as a process group (the probe and whatever it forks), reaped here with wait4
so its CPU time, children included, is known at exit, and writes to a log file rather than a pipe,
so a chatty child cannot block on a full pipe while the sweep sleeps through a window. With
setpriv on the machine it also gets a death signal (PR_SET_PDEATHSIG): even a SIGKILLed sweep
leaves no probe or trafgen running.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from tools.sweep.parsers import parse_status_mb, process_cpu_seconds


class Child:
    """A process in its own session: signalled as a group, reaped here with wait4 for its CPU time.

    Output goes to a log file, never a pipe, so a chatty child cannot block on
    a full pipe while we sleep.
    """

    def __init__(self, name: str, argv: Sequence[str], log_path: Path, cwd: Path | None = None,
                 death_signal: int = signal.SIGKILL) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self._log = open(log_path, "w", encoding="utf-8")  # closed in close()
        try:
            self.proc = subprocess.Popen(with_death_signal(self.argv, death_signal), stdout=self._log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd,
                                         start_new_session=True)
        except BaseException:
            self._log.close()
            raise
        self.cpu_total: float | None = None   # user+sys at exit, children included (wait4)
        self.returncode: int | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _reap(self, block: bool) -> bool:
        if self.returncode is not None:
            return True
        try:
            pid, status, ru = os.wait4(self.pid, 0 if block else os.WNOHANG)
        except ChildProcessError:
            self.returncode = self.proc.returncode if self.proc.returncode is not None else -1
            return True
        if pid == 0:
            return False
        self.returncode = os.waitstatus_to_exitcode(status)
        self.proc.returncode = self.returncode  # so Popen never waits for it again
        self.cpu_total = ru.ru_utime + ru.ru_stime
        return True

    def alive(self) -> bool:
        return not self._reap(block=False)

    def cpu_now(self) -> float:
        """CPU seconds so far (live), or the total once reaped."""
        if self.cpu_total is not None:
            return self.cpu_total
        return process_cpu_seconds(self.pid)

    def memory_mb(self, key: str = "VmRSS") -> float:
        try:
            return parse_status_mb(Path(f"/proc/{self.pid}/status").read_text(encoding="ascii"), key)
        except OSError:
            return 0.0

    def signal_group(self, sig: int) -> None:
        """Signal the whole process group; only while the leader is unreaped (its pgid cannot be reused)."""
        if self.returncode is None:
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                pass

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._reap(block=False):
                return True
            time.sleep(0.05)
        return self._reap(block=False)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> bool:
        """Signal, wait; SIGKILL the group if it does not exit. True if it exited by itself."""
        if not self.alive():
            return True
        self.signal_group(sig)
        if self.wait(timeout):
            return True
        self.kill()
        return False

    def kill(self) -> None:
        if self.returncode is None:
            self.signal_group(signal.SIGKILL)
            self._reap(block=True)

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def close(self) -> None:
        try:
            self.kill()
        finally:
            self._log.close()


def with_death_signal(argv: Sequence[str], sig: int) -> list[str]:
    """`argv` run so that it gets `sig` when this process dies (even by SIGKILL): nothing outlives a bench.

    setpriv (util-linux) sets PR_SET_PDEATHSIG, which survives its execve and `ip netns exec`'s; children
    the command forks itself (trafgen's worker) are stopped by that command's own handling of `sig`.
    """
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return list(argv)
    return [setpriv, "--pdeathsig", signal.Signals(sig).name, *argv]
