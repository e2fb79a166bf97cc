"""Scraping `xdpflow run`'s Prometheus endpoint from inside a test's namespace (shared by the kernel tests)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable

from prometheus_client.parser import text_string_to_metric_families

from tools.netns import in_netns

METRICS_PORT = 9477  # each test has a fresh namespace: nothing else listens there

FETCH = "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(netns: str, port: int = METRICS_PORT) -> Samples:
    """Every sample of the endpoint as {(sample name, sorted labels): value}, fetched inside `netns`."""
    res = subprocess.run(in_netns(netns, [sys.executable, "-c", FETCH, f"http://127.0.0.1:{port}/metrics"]),
                         capture_output=True, text=True, timeout=30, check=False)
    assert res.returncode == 0, f"scrape failed: {res.stderr.strip()[-600:]}"
    samples: Samples = {}
    for family in text_string_to_metric_families(res.stdout):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    assert key in samples, f"no sample {name}{labels or ''}; have: {sorted({n for n, _ in samples})}"
    return samples[key]


def poll(netns: str, until: Callable[[Samples], bool], what: str, timeout: float = 15) -> Samples:
    deadline = time.monotonic() + timeout
    while True:
        s = scrape(netns)
        if until(s):
            return s
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; last scrape: {s}")
        time.sleep(0.1)
