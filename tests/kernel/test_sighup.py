"""SIGHUP reloads the config file in a running `xdpflow run`: timeouts, collectors and log level change,
the XDP program stays attached (same program id), and no flow is lost or counted twice across a reload.
A file that no longer parses or validates is refused with one error line; the old settings stay.

Collectors are `xdpflow collect --json` processes in the observer namespace writing to files, so the
test can read what each one has received while the exporter runs.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import JsonCollector, Proc, xdp_attached, xdp_prog_id
from tools import trafgen
from tools.netns import VethPair
from tools.packets import UDP, Flow

SCAN = 0.25
RELOAD_FAILED = "reload failed, keeping the running configuration"


# -- helpers --------------------------------------------------------------------------------------

def toml_value(v: object) -> str:
    if isinstance(v, str | list):
        return json.dumps(v)  # a JSON string / list of strings is valid TOML
    return repr(v)


def write_config(path: Path, **keys: object) -> None:
    """Replace the file atomically, as an editor or a config manager would."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in keys.items()))
    os.replace(tmp, path)


def base_config(veth: VethPair, **over: object) -> dict[str, object]:
    cfg: dict[str, object] = {"interfaces": [veth.obs_if], "collectors": ["udp://127.0.0.1:4739"],
                              "scan_interval": SCAN, "idle_timeout": 30.0, "active_timeout": 60.0,
                              "max_entries": 4096}
    cfg.update(over)
    return cfg


def hup(p: Proc, count: int) -> dict[str, Any]:
    """SIGHUP; wait for the count-th reload outcome (applied or refused)."""
    p.popen.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 15
    while len(p.events("reloaded")) + len(p.events(RELOAD_FAILED)) < count:
        assert time.monotonic() < deadline, f"no reload outcome after SIGHUP; logs: {p.logs[-20:]}"
        assert p.popen.poll() is None, f"exited on SIGHUP ({p.popen.returncode}); logs: {p.logs[-20:]}"
        p._take(0.1)
    return (p.events("reloaded") + p.events(RELOAD_FAILED))[-1]


def scans_after(p: Proc, n: int) -> None:
    """Wait for n more debug "scan" events than have been logged so far."""
    p.wait_for("scan", count=len(p.events("scan")) + n, timeout=15 + n * SCAN)


@pytest.fixture
def collectors(veth: VethPair, tmp_path: Path) -> Iterator[Callable[[int], JsonCollector]]:
    started: list[JsonCollector] = []

    def start(port: int) -> JsonCollector:
        c = JsonCollector(veth.obs, port, tmp_path)
        started.append(c)
        return c

    try:
        yield start
    finally:
        for c in started:
            c.kill()


def flow(n: int, count: int) -> Flow:
    """A UDP flow told apart from the others by its source address and port."""
    return Flow(f"f{n}", f"198.18.9.{n}", "198.19.9.1", UDP, 10_000 + n, 9, count=count)


def assert_exact(records: list[dict[str, Any]], sent: list[Flow]) -> None:
    """Each sent flow's packets and octets appear in the records exactly once; nothing else does."""
    for fl in sent:
        mine = [r for r in records if (r.get("sourceIPv4Address"), r.get("sourceTransportPort"))
                == (fl.src, fl.sport)]
        assert sum(r["packetDeltaCount"] for r in mine) == fl.count, (fl.name, mine)
        assert sum(r["octetDeltaCount"] for r in mine) == fl.count * fl.octets_per_packet, (fl.name, mine)
    assert sum(r["packetDeltaCount"] for r in records) == sum(fl.count for fl in sent), records


def start_from_file(veth: VethPair, xdpflow_proc: Any, collectors: Callable[[int], JsonCollector],
                    tmp_path: Path) -> tuple[JsonCollector, Path, Proc, int]:
    """A collector on 4739, `xdpflow run --config` with the base config: (collector, file, process, XDP prog id)."""
    col = collectors(4739)
    conf = tmp_path / "xdpflow.toml"
    write_config(conf, **base_config(veth))
    p = xdpflow_proc(veth.obs, "run", "--config", str(conf), "--log-level", "debug")
    p.wait_ready()
    return col, conf, p, xdp_prog_id(veth.obs, veth.obs_if)


# -- tests ----------------------------------------------------------------------------------------

@pytest.mark.kernel
def test_sighup_changes_timeouts_without_reattaching_or_losing_flows(
        veth: VethPair, xdpflow_proc: Any, collectors: Callable[[int], JsonCollector], tmp_path: Path) -> None:
    col, conf, p, prog = start_from_file(veth, xdpflow_proc, collectors, tmp_path)

    # idle 30 s: a short flow stays in the table, scan after scan.
    a = flow(1, 5)
    trafgen.send_flows(veth.gen, veth.gen_if, [a])
    scans_after(p, 8)
    assert col.of(a) == [], "idle_timeout 30 s: nothing may end yet"

    # Shorter timeouts: the idle flow ends at the next scans (flowEndReason 1 = idle).
    write_config(conf, **base_config(veth, idle_timeout=1.0, active_timeout=2.0))
    reloaded = hup(p, 1)
    assert reloaded["event"] == "reloaded", reloaded
    assert reloaded["changed"] == ["active_timeout", "idle_timeout"], reloaded
    assert (reloaded["idle_timeout"], reloaded["active_timeout"]) == (1.0, 2.0)
    col.wait_for("flow a to end idle", partial(col.has, a))
    assert [r["flowEndReason"] for r in col.of(a)] == [1]

    # active 2 s: a flow lasting about 3 s is cut into records ending "active" (flowEndReason 2).
    b = flow(2, 30)
    trafgen.send(veth.gen, veth.gen_if, [b.frame()], b.count, gap_us=100_000)
    col.wait_for("flow b complete", lambda: sum(r["packetDeltaCount"] for r in col.of(b)) == b.count)
    assert 2 in {r["flowEndReason"] for r in col.of(b)}, col.of(b)

    # Longer timeouts again: a short flow outlives the 1 s idle timeout it would have had.
    write_config(conf, **base_config(veth, idle_timeout=20.0, active_timeout=40.0))
    reloaded = hup(p, 2)
    assert reloaded["changed"] == ["active_timeout", "idle_timeout"], reloaded
    c = flow(3, 7)
    trafgen.send_flows(veth.gen, veth.gen_if, [c])
    scans_after(p, 1)
    time.sleep(2.0)
    scans_after(p, 1)
    assert col.of(c) == [], "idle_timeout is 20 s again: flow c must still be held"

    assert not p.events(RELOAD_FAILED)
    assert xdp_attached(veth.obs, veth.obs_if)
    assert xdp_prog_id(veth.obs, veth.obs_if) == prog, "SIGHUP must not re-attach the program"
    rc, _ = p.stop(signal.SIGTERM)
    assert rc == 0
    assert [r["flowEndReason"] for r in col.of(c)] == [4], "held until shutdown (flowEndReason 4)"
    assert p.events("stopped")[0]["observed_packets"] == a.count + b.count + c.count
    assert col.stop()["gaps"] == 0
    assert_exact(col.records(), [a, b, c])


@pytest.mark.kernel
def test_sighup_adds_and_removes_collectors(veth: VethPair, xdpflow_proc: Any,
                                            collectors: Callable[[int], JsonCollector], tmp_path: Path) -> None:
    old, kept, new = collectors(4739), collectors(4740), collectors(4741)
    conf = tmp_path / "xdpflow.toml"
    timeouts = {"idle_timeout": 1.5, "active_timeout": 10.0}
    write_config(conf, **base_config(veth, collectors=[old.url, kept.url], **timeouts))
    p = xdpflow_proc(veth.obs, "run", "--config", str(conf), "--log-level", "debug")
    p.wait_ready()
    prog = xdp_prog_id(veth.obs, veth.obs_if)

    a = flow(1, 10)
    trafgen.send_flows(veth.gen, veth.gen_if, [a])
    old.wait_for("flow a", partial(old.has, a))
    kept.wait_for("flow a", partial(kept.has, a))
    assert new.all_records() == []

    # m is still in the table (idle 1.5 s) when the collectors change: it goes to the new set.
    m = flow(2, 10)
    trafgen.send_flows(veth.gen, veth.gen_if, [m])
    write_config(conf, **base_config(veth, collectors=[new.url, kept.url], **timeouts))
    reloaded = hup(p, 1)
    assert reloaded["event"] == "reloaded", reloaded
    assert reloaded["changed"] == ["collectors"], reloaded
    assert reloaded["collectors"] == [new.url, kept.url]
    scans_after(p, 2)  # a datagram the old collector may have had in flight has arrived by now
    old_seen = len(old.all_records())

    b = flow(3, 10)
    trafgen.send_flows(veth.gen, veth.gen_if, [b])
    for c in (new, kept):
        c.wait_for("flows m and b", partial(c.has, m, b))
    scans_after(p, 4)
    assert len(old.all_records()) == old_seen, "the removed collector still receives"
    assert xdp_prog_id(veth.obs, veth.obs_if) == prog

    rc, _ = p.stop(signal.SIGTERM)
    assert rc == 0
    assert list(p.events("stopped")[0]["sent"]) == [new.url, kept.url]
    summaries = {c.port: c.stop() for c in (old, kept, new)}
    for port, s in summaries.items():
        assert s["malformed"] == 0 and s["unknown_template_sets"] == 0, (port, s)
    assert summaries[kept.port]["gaps"] == 0, "the collector kept across the reload keeps its sequence"
    assert summaries[new.port]["gaps"] == 0
    assert_exact(old.records(), [a])
    assert_exact(new.records(), [m, b])
    assert_exact(kept.records(), [a, m, b])


@pytest.mark.kernel
def test_sighup_changes_the_log_level(veth: VethPair, xdpflow_proc: Any, collectors: Callable[[int], JsonCollector],
                                      tmp_path: Path) -> None:
    col = collectors(4739)
    conf = tmp_path / "xdpflow.toml"
    write_config(conf, **base_config(veth, log_level="debug"))
    p = xdpflow_proc(veth.obs, "run", "--config", str(conf))  # the level comes from the file only
    p.wait_ready()
    scans_after(p, 2)

    write_config(conf, **base_config(veth, log_level="info"))
    reloaded = hup(p, 1)
    assert reloaded["event"] == "reloaded", reloaded
    at = p.logs.index(reloaded)
    seen = len(col.all_records())
    col.wait_for("options records of 6 more scans", lambda: len(col.all_records()) >= seen + 6 * 5)
    time.sleep(SCAN)  # a scan logs after it sends: let the last one finish, then read every line so far
    while p._take(0.2):
        pass
    assert not [r for r in p.logs[at:] if r.get("level") == "debug"], "debug lines after switching to info"

    write_config(conf, **base_config(veth, log_level="debug"))
    hup(p, 2)
    scans_after(p, 2)
    assert not p.events(RELOAD_FAILED)
    rc, _ = p.stop(signal.SIGTERM)
    assert rc == 0
    changed = [r["changed"] for r in p.events("reloaded")]
    assert changed == [["log_level"], ["log_level"]], \
        f"the reloaded event should name log_level among the changed keys: {changed}"


@pytest.mark.kernel
def test_sighup_with_a_broken_file_keeps_the_running_config(
        veth: VethPair, xdpflow_proc: Any, collectors: Callable[[int], JsonCollector], tmp_path: Path) -> None:
    col, conf, p, prog = start_from_file(veth, xdpflow_proc, collectors, tmp_path)
    a = flow(1, 12)
    trafgen.send_flows(veth.gen, veth.gen_if, [a])

    # Not TOML at all.
    conf.write_text("idle_timeout = = 1\n")
    failed = hup(p, 1)
    assert failed["event"] == RELOAD_FAILED and failed["level"] == "error", failed
    assert "not valid TOML" in failed["error"] and str(conf) in failed["error"], failed

    # Valid TOML, invalid settings: short timeouts that must not be applied, and an unknown key.
    write_config(conf, **base_config(veth, idle_timeout=1.0, active_timeout=2.0, idle_timout=1.0))
    failed = hup(p, 2)
    assert failed["event"] == RELOAD_FAILED, failed
    assert "idle_timout" in failed["error"] and "did you mean idle_timeout?" in failed["error"], failed

    # Still running, still attached, still scanning, and still with idle_timeout 30 s.
    assert p.popen.poll() is None
    scans_after(p, 4)
    time.sleep(1.5)
    scans_after(p, 1)
    assert col.of(a) == [], "the refused file's idle_timeout = 1 was applied"
    assert xdp_prog_id(veth.obs, veth.obs_if) == prog
    assert not p.events("reloaded")

    rc, _ = p.stop(signal.SIGTERM)
    assert rc == 0
    assert [r["flowEndReason"] for r in col.of(a)] == [4]
    col.stop()
    assert_exact(col.records(), [a])


@pytest.mark.kernel
def test_sighup_without_a_config_file_is_ignored(veth: VethPair, xdpflow_proc: Any,
                                                 collectors: Callable[[int], JsonCollector]) -> None:
    collectors(4739)
    p = xdpflow_proc(veth.obs, "run", "--interface", veth.obs_if, "--scan-interval", str(SCAN),
                     "--max-entries", "4096")
    p.wait_ready()
    p.popen.send_signal(signal.SIGHUP)
    p.wait_for("SIGHUP ignored: no configuration file to reload", timeout=10)
    assert p.popen.poll() is None
    rc, _ = p.stop(signal.SIGTERM)
    assert rc == 0
