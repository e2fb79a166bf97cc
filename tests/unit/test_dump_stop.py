"""`xdpflow dump` stops on a signal whenever it lands.

A SIGINT handler that called threading.Event.set deadlocked dump when the signal arrived while the
main thread held the Event's lock inside Event.wait (seen in CI: dump never exited, the suite hung).
The race is driven here in a child process, signals landing at varied points of wait(), so a
deadlock fails by timeout instead of hanging the test run.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from exporter.dump import StopSignal

ROOT = Path(__file__).resolve().parents[2]

RACE = """
import os, signal, sys, threading, time
from exporter.dump import StopSignal
pid = os.getpid()
for i in range(ROUNDS):
    stop = StopSignal()
    signal.signal(signal.SIGUSR1, stop.set)
    t = threading.Thread(target=lambda: (time.sleep((i % 50) * 2e-6), os.kill(pid, signal.SIGUSR1)))
    t.start()
    while not stop.wait(0.0005 if i % 2 else 0):
        pass
    t.join()
    stop.close()
print("rounds", i + 1)
"""


def test_a_signal_during_wait_always_stops_it() -> None:
    # threading.Event in StopSignal's place deadlocks within 500 rounds here (3 of 3 tries).
    res = subprocess.run([sys.executable, "-c", RACE.replace("ROUNDS", "3000")], capture_output=True, text=True,
                         cwd=ROOT, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["rounds", "3000"]


def test_wait_times_out_without_a_signal() -> None:
    stop = StopSignal()
    try:
        assert stop.wait(0.01) is False
        stop.set()
        stop.set()
        assert stop.wait(None) is True and stop.is_set
    finally:
        stop.close()
