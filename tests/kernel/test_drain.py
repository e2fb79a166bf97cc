"""The drain (exporter/drain.py, xdp/loader.py) on a real slot array: every slot exactly once,
whatever the window; a flip sends the next packet of a flow to the new page, through the per-CPU
cache and the flow map alike; a full page denies slots and counts what it could not hold.

Pages are filled two ways: written into the mapped slot array as the programs would
(tools.bench.write_page, no traffic needed), and by the real XDP program through
BPF_PROG_TEST_RUN.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from exporter.core import CoreTable
from exporter.drain import Pages
from exporter.flowtable import FlowTable
from exporter.merge import merge, to_records
from tools.bench import synthetic_slots, write_page
from tools.packets import TCP, Flow
from xdp import bpfsys
from xdp.layout import FLOW_SLOT
from xdp.loader import Datapath

pytestmark = pytest.mark.kernel

N = 20_000


@pytest.fixture(scope="module")
def datapath() -> Iterator[Datapath]:
    with Datapath(max_entries=3 * N).load() as dp:
        yield dp


def frame(sport: int) -> bytes:
    return Flow("f", "198.18.0.1", "198.19.0.1", TCP, sport, 443, tcp_flags=0x10, payload_len=0).frame()


@pytest.mark.parametrize("window", [1024, 4999, 65_536])
def test_windows_cover_the_page_exactly_once(datapath: Datapath, window: int) -> None:
    pages = Pages(datapath, window=window)
    slots = synthetic_slots(N, datapath.cpus, datapath.read_clock().jiffies)
    write_page(datapath, pages.active, slots)
    d = pages.flip()
    assert d.slots == len(slots)
    sizes, got = [], []
    for w in d.windows():
        sizes.append(len(w))
        got.append(w.copy())
    assert max(sizes) <= window and sum(sizes) == len(slots) and len(sizes) == -(-len(slots) // window)
    assert np.concatenate(got).tobytes() == slots.tobytes(), "slots read where they lie, in order, whole"
    d.release()
    assert datapath.slot_count(d.page) == 0, "a released page starts again at slot 0"


def test_flip_and_merge_equals_merge_of_the_whole_page(datapath: Datapath) -> None:
    pages = Pages(datapath, window=3000)
    slots = synthetic_slots(N, datapath.cpus, datapath.read_clock().jiffies, seed=7)
    written = pages.active   # flip_and_merge flips first, then reads the page that was active
    write_page(datapath, written, slots)
    m = pages.flip_and_merge(offset_ns=0)
    assert (m.page, m.entries) == (written, len(slots))
    assert m.timebase is not None and m.timebase.end_jiffies >= m.timebase.start_jiffies
    whole = merge(to_records(slots, m.timebase, 0))
    assert sorted(r.tobytes() for r in m.records) == sorted(r.tobytes() for r in whole)


def test_the_compiled_fold_of_a_page_is_the_numpy_path(datapath: Datapath) -> None:
    pages = Pages(datapath)
    slots = synthetic_slots(N, datapath.cpus, datapath.read_clock().jiffies, seed=3)
    write_page(datapath, pages.active, slots)
    d = pages.flip()
    table = CoreTable(60, 15)
    folded, packets, _ = table.fold_page(d, 10**18)
    d.release()
    assert folded == len(slots) and packets == int(slots["value"]["packets"].sum())
    ref = FlowTable(60, 15)
    ref.update(merge(to_records(slots, d.timebase, 10**18)), 0)
    assert sorted(r.tobytes() for r in table.flows()) == sorted(r.tobytes() for r in ref.flows())


def test_after_a_flip_the_next_packet_goes_to_the_new_page(datapath: Datapath) -> None:
    """The cache line and the flow map's ref of a flow name a slot of the old page: both must go stale."""
    pages = Pages(datapath)
    pages.flip_and_merge(0)
    for gen_packets in (5, 3, 1, 4):
        bpfsys.prog_test_run(datapath.prog_fd, frame(40000), repeat=gen_packets)   # one flow, cache hits
        m = pages.flip_and_merge(0, keep_slots=True)
        assert m.slots is not None and len(m.slots) == 1
        assert [int(p) for p in m.records["packets"]] == [gen_packets], "a packet counted in a drained page"
        assert m.stats["packets"] == gen_packets and m.stats["flows_created"] == 1


def test_a_flow_the_cache_forgot_still_finds_its_slot(datapath: Datapath) -> None:
    """More flows than cache lines, in turn: most packets miss the cache and find the slot in the flow map."""
    pages = Pages(datapath)
    pages.flip_and_merge(0)
    flows, rounds = 6000, 3
    for _ in range(rounds):
        for i in range(flows):
            bpfsys.prog_test_run(datapath.prog_fd, frame(1000 + i))
    m = pages.flip_and_merge(0, keep_slots=True)
    assert m.slots is not None
    assert len(m.records) == flows and set(m.records["packets"].tolist()) == {rounds}
    assert m.stats["flows_created"] == len(m.slots) == flows, "a flow took a second slot in one page"


def test_a_full_page_denies_slots_and_counts_every_packet() -> None:
    cap = 512
    with Datapath(max_entries=cap).load() as dp:
        pages = Pages(dp)
        flows = cap + 100
        for i in range(flows):
            bpfsys.prog_test_run(dp.prog_fd, frame(2000 + i), repeat=2)
        m = pages.flip_and_merge(0, keep_slots=True)
        s = m.stats
        assert m.slots is not None and len(m.slots) == cap
        assert s["flows_created"] == cap and s["flows_denied"] == flows - cap, "a denied flow asked again"
        assert s["insert_failures"] == 2 * (flows - cap)
        assert s["packets"] == 2 * flows == int(m.records["packets"].sum()) + s["insert_failures"]
        # The next page has room again, for every flow.
        for i in range(flows):
            bpfsys.prog_test_run(dp.prog_fd, frame(2000 + i))
        m = pages.flip_and_merge(0)
        assert m.stats["insert_failures"] == flows - cap and len(m.records) == cap
        assert m.stats["flows_denied"] == flows - cap


def test_slots_are_written_whole(datapath: Datapath) -> None:
    pages = Pages(datapath)
    pages.flip_and_merge(0)
    bpfsys.prog_test_run(datapath.prog_fd, frame(3000), repeat=4)
    m = pages.flip_and_merge(0, keep_slots=True)
    assert m.slots is not None and m.slots.dtype == FLOW_SLOT
    (slot,) = m.slots
    assert not slot["key"]["segment"].any() and not slot["value"]["pad"].any()
    assert int(slot["key"]["src_port"]) == 3000 and int(slot["value"]["packets"]) == 4
