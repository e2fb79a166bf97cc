"""exporter.kstats without a kernel: softnet parsing, deltas, vanished interfaces, the rate-limited warning."""

from __future__ import annotations

from dataclasses import replace

import pytest
from prometheus_client import generate_latest
from structlog.testing import capture_logs

from exporter.kstats import (
    _XDP_DROPS,
    _XDP_PACKETS,
    DropWarning,
    KernelDelta,
    KernelStats,
    NetdevCounters,
    SoftnetCpu,
    _Ethtool,
    _pick,
    parse_softnet,
    softnet_delta,
)
from exporter.metrics import Metrics

SOFTNET = (
    "0000a000 00000002 00000003 00000000 00000000 00000000 00000000 00000000 00000000 00000005 00000000 "
    "00000000 00000000\n"
    "ffffffff 00000010 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 "
    "00000000 00000002\n"
)


def test_softnet_columns_are_hex_and_the_13th_names_the_cpu() -> None:
    cpus = parse_softnet(SOFTNET)
    assert cpus == (SoftnetCpu(0, 0xA000, 2, 3), SoftnetCpu(2, 0xFFFFFFFF, 16, 0))
    old = parse_softnet("00000001 00000002 00000003\nnot a line\n\n00000004 00000005 00000006\n")
    assert [c.cpu for c in old] == [0, 3], "without the CPU column, the line number"


def test_softnet_deltas_wrap_at_32_bits_and_new_cpus_start_a_baseline() -> None:
    before = (SoftnetCpu(0, 0xFFFFFFF0, 0xFFFFFFFF, 7),)
    now = (SoftnetCpu(0, 0x10, 0x4, 7), SoftnetCpu(1, 100, 100, 100))
    assert softnet_delta(now, before) == (SoftnetCpu(0, 0x20, 5, 0),)


def test_counters_that_go_backwards_restarted() -> None:
    assert NetdevCounters(rx_packets=5, rx_dropped=3).since(NetdevCounters(rx_packets=10, rx_dropped=1)) \
        == NetdevCounters(rx_packets=5, rx_dropped=2)


class FakeKernel:
    def __init__(self) -> None:
        self.links: dict[tuple[str, int], NetdevCounters] = {}
        self.softnet = (SoftnetCpu(0, 0, 0, 0),)
        self.fail = False

    def read_netdev(self, links: list[tuple[str, int]]) -> dict[tuple[str, int], dict[str, int] | None]:
        if self.fail:
            raise OSError("netlink says no")
        out: dict[tuple[str, int], dict[str, int] | None] = {}
        for key in links:
            c = self.links.get(key)
            out[key] = None if c is None else {k: v for k, v in vars(c).items() if not k.startswith("xdp_")}
        return out

    def read_xdp(self, ifname: str) -> tuple[int, int]:
        c = next((c for (n, _), c in self.links.items() if n == ifname), None)
        return (c.xdp_packets, c.xdp_drops) if c else (0, 0)

    def stats(self) -> KernelStats:
        return KernelStats(read_netdev=self.read_netdev, read_xdp=self.read_xdp, read_softnet=lambda: self.softnet)

    def bump(self, key: tuple[str, int], **by: int) -> None:
        c = self.links[key]
        self.links[key] = replace(c, **{k: getattr(c, k) + v for k, v in by.items()})


def test_deltas_start_at_attach_and_follow_each_scan() -> None:
    k = FakeKernel()
    k.links[("eth0", 2)] = NetdevCounters(rx_packets=1000, rx_dropped=7, xdp_packets=990)
    ks = k.stats()
    ks.sync({"eth0": 2})
    k.bump(("eth0", 2), rx_packets=50, rx_dropped=2, xdp_packets=48)
    k.softnet = (SoftnetCpu(0, 10, 1, 2),)
    d = ks.scan()
    assert d.interfaces == {"eth0": NetdevCounters(rx_packets=50, rx_dropped=2, xdp_packets=48)}
    assert d.softnet == (), "the first scan only takes the softnet baseline"
    assert d.drops() == {"eth0": {"rx_dropped": 2}}
    k.softnet = (SoftnetCpu(0, 15, 4, 2),)
    d = ks.scan()
    assert d.interfaces == {"eth0": NetdevCounters()} and d.drops() == {}
    assert (d.softnet_dropped, d.softnet_time_squeeze) == (3, 0)
    assert d.log_fields() == {"netdev": {"eth0": {}}, "softnet_dropped": 3, "softnet_time_squeeze": 0}


def test_a_vanished_interface_is_reported_gone_and_forgotten() -> None:
    k = FakeKernel()
    k.links[("veth1", 5)] = NetdevCounters(rx_packets=1)
    k.links[("veth2", 6)] = NetdevCounters(rx_packets=1)
    ks = k.stats()
    ks.sync({"veth1": 5, "veth2": 6})
    del k.links[("veth1", 5)]
    k.links[("other", 5)] = NetdevCounters()  # the index was reused: the name tells
    del k.links[("veth2", 6)]
    k.links[("veth2", 9)] = NetdevCounters()
    d = ks.scan()
    assert d.interfaces == {} and sorted(d.gone) == ["veth1", "veth2"] and sorted(d.released) == ["veth1", "veth2"]
    assert d.log_fields()["netdev_gone"] == sorted(d.gone)
    assert ks.scan().gone == ()
    ks.sync({"veth2": 9})  # it came back: a new baseline, a series again
    k.bump(("veth2", 9), rx_packets=4)
    d = ks.scan()
    assert d.interfaces == {"veth2": NetdevCounters(rx_packets=4)} and d.released == ()


def test_a_released_interface_hands_in_its_last_interval() -> None:
    k = FakeKernel()
    k.links[("eth1", 3)] = NetdevCounters()
    ks = k.stats()
    ks.sync({"eth1": 3})
    k.bump(("eth1", 3), rx_packets=9, rx_missed_errors=1)
    ks.sync({})  # released by SIGHUP: still there, read once more
    k.bump(("eth1", 3), rx_packets=100)
    d = ks.scan()
    assert d.interfaces == {"eth1": NetdevCounters(rx_packets=9, rx_missed_errors=1)}
    assert d.released == ("eth1",) and d.gone == ()
    assert ks.scan().interfaces == {}


def test_netlink_trouble_keeps_the_baseline_and_warns_once() -> None:
    k = FakeKernel()
    k.links[("eth0", 2)] = NetdevCounters()
    ks = k.stats()
    ks.sync({"eth0": 2})
    k.fail = True
    k.bump(("eth0", 2), rx_packets=3)
    with capture_logs() as logs:
        assert ks.scan().interfaces == {}
        assert ks.scan().interfaces == {}
    assert [r["event"] for r in logs] == ["interface counters unavailable"]
    k.fail = False
    assert ks.scan().interfaces == {"eth0": NetdevCounters(rx_packets=3)}, "nothing lost, only late"


def test_drop_warning_is_once_a_minute_and_carries_what_accumulated() -> None:
    now = [1000.0]
    w = DropWarning(clock=lambda: now[0])
    quiet = KernelDelta({"eth0": NetdevCounters(rx_packets=10)})
    dropped = KernelDelta({"eth0": NetdevCounters(rx_dropped=2, rx_missed_errors=1)}, (SoftnetCpu(0, 0, 2, 0),))
    with capture_logs() as logs:
        assert not w.note(quiet)
        assert w.note(dropped)
        now[0] += 30
        assert not w.note(dropped)
        assert not w.note(quiet)
        now[0] += 31
        assert w.note(quiet), "drops held back by the rate limit are reported when it opens"
        now[0] += 61
        assert not w.note(quiet)
    assert len(logs) == 2 and all(r["log_level"] == "warning" for r in logs)
    assert "not xdpflow" in logs[0]["event"]
    assert logs[0]["dropped"] == {"eth0": {"rx_dropped": 2, "rx_missed_errors": 1}}
    assert logs[1]["dropped"] == {"eth0": {"rx_dropped": 2, "rx_missed_errors": 1}}
    assert logs[1]["softnet_dropped"] == 2


def test_driver_counters_prefer_totals_over_queues() -> None:
    veth = {"peer_ifindex": 7, "rx_queue_0_xdp_packets": 10, "rx_queue_1_xdp_packets": 5, "rx_queue_0_xdp_drops": 1,
            "tx_queue_0_xdp_xmit": 3}
    assert (_pick(veth, _XDP_PACKETS), _pick(veth, _XDP_DROPS)) == (15, 1)
    mlx = {"rx_xdp_drop": 9, "rx0_xdp_drop": 4, "rx1_xdp_drop": 5, "tx0_xdp_drop": 100}
    assert _pick(mlx, _XDP_DROPS) == 9


@pytest.mark.parametrize("ifname", ["lo", "no-such-if0"])
def test_ethtool_without_driver_counters_reads_zero(ifname: str) -> None:
    e = _Ethtool()
    try:
        assert e.xdp(ifname) == (0, 0)
    finally:
        e.close()


def test_metrics_count_per_interface_and_cpu_and_drop_released_series() -> None:
    m = Metrics()
    m.kernel_deltas(KernelDelta({"eth0": NetdevCounters(rx_packets=5, rx_dropped=1, xdp_drops=0)},
                                (SoftnetCpu(1, 9, 2, 3),)))
    m.kernel_deltas(KernelDelta({"eth0": NetdevCounters(rx_dropped=2)}))
    text = generate_latest(m.registry).decode()
    assert 'xdpflow_netdev_rx_packets_total{interface="eth0"} 5.0' in text
    assert 'xdpflow_netdev_rx_dropped_total{interface="eth0"} 3.0' in text
    assert 'xdpflow_driver_xdp_drops_total{interface="eth0"} 0.0' in text
    assert 'xdpflow_softnet_dropped_total{cpu="1"} 2.0' in text
    assert 'xdpflow_softnet_time_squeeze_total{cpu="1"} 3.0' in text
    m.kernel_deltas(KernelDelta(released=("eth0",)))
    assert 'interface="eth0"' not in generate_latest(m.registry).decode()
