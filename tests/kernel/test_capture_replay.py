"""Differential fuzz of the parser on real captures, through BPF_PROG_TEST_RUN.

test_parser.py fuzzes frames its own generators build; here the seed frames are ones the kernel
built and put on a wire (tests/kernel/captures.py records them once per session in a throw-away
veth pair), so they carry what no generator's author thought of. They are replayed as captured, cut
at every offset, then mutated at random the way damaged or hostile traffic is: bits flipped, header
fields overwritten with values that switch parser paths, cuts, insertions and deletions at header
boundaries, one frame's headers spliced onto another's rest, VLAN tags pushed in, and length fields
that lie (IPv4 total length and IHL, IPv6 payload length, extension header lengths).

Every frame goes through Harness.run (tests/kernel/harness.py): the program must pass it unchanged and move exactly
the counters tests/kernel/refparser.py predicts, and each batch's drained flows must equal the
reference's aggregate. Mutations are placed by `layout()`, a lenient header walk that finds where the
fields are, independent of both parsers. Example counts follow XDPFLOW_FUZZ_EXAMPLES like
test_parser.py; the outcome mix shows with --hypothesis-show-statistics, and the number of frames
replayed is reported when the module ends.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from tests.kernel import captures as cap
from tests.kernel import refparser as ref
from tests.kernel.catalogue import FUZZ
from tests.kernel.harness import FUZZ_EXAMPLES, Harness
from tests.kernel.refparser import Metered, Verdict

pytestmark = pytest.mark.kernel

TALLY: Counter[str] = Counter()


@dataclass(frozen=True)
class Capture:
    path: Path
    frames: list[bytes]

    @cached_property
    def seeds(self) -> st.SearchStrategy[bytes]:
        """A captured frame, its kind drawn first: the rare kinds (IP options, hop-by-hop, VLAN, ARP) come up
        as often as the TCP bulk transfer's segments."""
        by_kind: dict[str, list[bytes]] = {}
        for frame in self.frames:
            by_kind.setdefault(cap.kind(frame), []).append(frame)
        return st.sampled_from(sorted(by_kind)).flatmap(lambda k: st.sampled_from(by_kind[k]))


@pytest.fixture(scope="session")
def capture(tmp_path_factory: pytest.TempPathFactory) -> Capture:
    if os.geteuid() != 0:
        pytest.skip("capturing in network namespaces needs root")
    missing = [tool for tool in ("dumpcap", "trafgen") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"not installed: {missing}")
    path = tmp_path_factory.mktemp("capture") / "real.pcap"
    return Capture(path, [f.data for f in cap.record(path)])


@pytest.fixture(scope="module", autouse=True)
def _report(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capman = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capman is None or not TALLY:
        return
    with capman.global_and_fixture_disabled():  # else the line goes to the teardown's captured output
        reporter.write_line(f"\ncapture replay (XDPFLOW_FUZZ_EXAMPLES={FUZZ_EXAMPLES}): {TALLY['batches']} batches, "
                            f"{TALLY['frames']} frames replayed, {TALLY['metered']} metered, "
                            f"{TALLY['parse_failure']} parse failures, {TALLY['non_ip']} not IP")


def replay(harness: Harness, batch: Sequence[bytes]) -> list[ref.Result]:
    results = harness.run(batch)  # asserts kernel == reference, frame by frame and flow by flow
    TALLY["batches"] += 1
    TALLY["frames"] += len(batch)
    for r in results:
        TALLY[r.value if isinstance(r, Verdict) else "metered"] += 1
    return results


# -- the pcap reader ------------------------------------------------------------------

def _pcap(order: str, magic: int, records: Sequence[tuple[int, int, bytes]], linktype: int = 1) -> bytes:
    out = struct.pack(order + "IHHiIII", magic, 2, 4, 0, 0, 65535, linktype)
    for sec, frac, data in records:
        out += struct.pack(order + "IIII", sec, frac, len(data), len(data) + 1) + data
    return out


@pytest.mark.parametrize(("order", "magic", "tick"), [("<", 0xA1B2C3D4, 1e-6), (">", 0xA1B2C3D4, 1e-6),
                                                      ("<", 0xA1B23C4D, 1e-9), (">", 0xA1B23C4D, 1e-9)])
def test_pcap_reader(tmp_path: Path, order: str, magic: int, tick: float) -> None:
    path = tmp_path / "t.pcap"
    path.write_bytes(_pcap(order, magic, [(1, 500, b"\x01" * 60), (2, 0, b""), (3, 7, bytes(range(256)))]))
    frames = cap.read_pcap(path)
    assert [f.data for f in frames] == [b"\x01" * 60, b"", bytes(range(256))]
    assert [f.orig_len for f in frames] == [61, 1, 257]
    assert frames[0].ts == pytest.approx(1 + 500 * tick)
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(cap.CaptureError, match="cut"):
        cap.read_pcap(path)
    path.write_bytes(_pcap(order, magic, [], linktype=113))
    with pytest.raises(cap.CaptureError, match="link type"):
        cap.read_pcap(path)


def test_reader_agrees_with_tshark(capture: Capture) -> None:
    if shutil.which("tshark") is None:
        pytest.skip("tshark not installed")
    out = subprocess.run(["tshark", "-r", str(capture.path), "-T", "fields", "-e", "frame.cap_len", "-e",
                          "frame.len"], capture_output=True, text=True, check=True, timeout=60).stdout
    assert [tuple(map(int, line.split())) for line in out.splitlines()] == [
        (len(f.data), f.orig_len) for f in cap.read_pcap(capture.path)]


# -- the captured frames as they are -----------------------------------------------------

WANTED_KINDS = ["arp", "vlan ipv4 udp", "ipv4 tcp", "ipv4 udp", "ipv4 icmp", "ipv4 opts udp",
                "ipv4 frag-first udp", "ipv4 frag-later udp", "ipv4 frag-first icmp", "ipv4 proto253", "ipv6 tcp",
                "ipv6 udp", "ipv6 icmpv6", "ipv6 hbh icmpv6", "ipv6 hbh dst udp", "ipv6 frag udp",
                "ipv6 frag-later udp", "ipv6 hbh dst frag udp", "ipv6 hbh dst frag-later udp", "ipv6 proto253"]


def test_capture_holds_the_traffic(capture: Capture) -> None:
    kinds = Counter(cap.kind(f) for f in capture.frames)
    assert not [k for k in WANTED_KINDS if k not in kinds], f"missing from the capture: {kinds}"
    assert all(len(f.data) == f.orig_len for f in cap.read_pcap(capture.path)), "snapshot length cut a frame"


def test_replay_unmodified(harness: Harness, capture: Capture) -> None:
    """All frames in capture order in one batch: every real flow aggregates exactly like the reference."""
    results = replay(harness, capture.frames)
    metered = [r for r in results if isinstance(r, Metered)]
    assert len(metered) >= 0.95 * len(results), Counter(r if isinstance(r, Verdict) else "m" for r in results)
    assert Verdict.PARSE_FAILURE not in results
    tcp_flags = 0
    for r in metered:
        tcp_flags |= r.tcp_flags if r.key.protocol == 6 else 0
    assert tcp_flags == 0x0FF, f"TCP flags seen: {tcp_flags:#x} (want FIN..CWR from the real handshakes)"
    assert {(r.key.ip_version, r.key.protocol) for r in metered} >= {(4, 6), (4, 17), (4, 1), (6, 6), (6, 17),
                                                                     (6, 58)}


def test_each_frame_alone(harness: Harness, capture: Capture) -> None:
    """One frame per batch for one frame of each kind, so each key is drained and compared alone."""
    firsts = {cap.kind(f): f for f in reversed(capture.frames)}
    for frame in firsts.values():
        replay(harness, [frame])


def test_every_truncation(harness: Harness, capture: Capture) -> None:
    """Every cut (headers and a little more) of the first frame of each kind, a batch per kind."""
    firsts = {cap.kind(f): f for f in reversed(capture.frames)}
    for frame in firsts.values():
        replay(harness, [frame[:n] for n in range(ref.ETH_HLEN, min(len(frame), 160) + 1)])


# -- where the header fields are -------------------------------------------------------------

@dataclass(frozen=True)
class Field:
    name: str
    offset: int
    width: int  # 1 or 2 bytes


@dataclass(frozen=True)
class Layout:
    fields: list[Field]
    lengths: list[Field]     # the fields that say how long something is
    boundaries: list[int]    # offsets where one header ends and the next begins


def layout(frame: bytes) -> Layout:
    """Walk the headers as far as the bytes go, trusting whatever they say (lying fields included)."""
    fields = [Field("ethertype", 12, 2)]
    lengths: list[Field] = []
    bounds = [12, 14]
    if len(frame) < 14:
        return Layout([f for f in fields if f.offset + f.width <= len(frame)], lengths, bounds)
    ethertype, off = int.from_bytes(frame[12:14]), 14
    while ethertype in ref.VLAN_TPIDS and off + 4 <= len(frame):
        fields += [Field("tci", off, 2), Field("inner ethertype", off + 2, 2)]
        ethertype, off = int.from_bytes(frame[off + 2:off + 4]), off + 4
        bounds.append(off)
    proto, l4 = -1, -1
    if ethertype == ref.ETH_P_IP and off + 20 <= len(frame):
        ihl, total = (frame[off] & 0x0F) * 4, int.from_bytes(frame[off + 2:off + 4])
        fields += [Field("version/ihl", off, 1), Field("tos", off + 1, 1), Field("flags/fragment", off + 6, 2),
                   Field("ttl", off + 8, 1), Field("protocol", off + 9, 1)]
        lengths += [Field("ihl", off, 1), Field("total length", off + 2, 2)]
        bounds += [off + 20, off + ihl, off + total]
        if int.from_bytes(frame[off + 6:off + 8]) & 0x1FFF == 0:
            proto, l4 = frame[off + 9], off + ihl
    elif ethertype == ref.ETH_P_IPV6 and off + 40 <= len(frame):
        fields += [Field("version/class", off, 1), Field("next header", off + 6, 1), Field("hop limit", off + 7, 1)]
        lengths.append(Field("payload length", off + 4, 2))
        bounds += [off + 40, off + 40 + int.from_bytes(frame[off + 4:off + 6])]
        proto, pos = frame[off + 6], off + 40
        for _ in range(ref.IPV6_MAX_EXT + 2):
            if proto not in (*ref.IPV6_SKIPPED, ref.IPV6_FRAGMENT) or pos + 8 > len(frame):
                break
            fields.append(Field("ext next header", pos, 1))
            if proto == ref.IPV6_FRAGMENT:
                fields.append(Field("fragment offset", pos + 2, 2))
                later = int.from_bytes(frame[pos + 2:pos + 4]) >> 3
                proto, pos = frame[pos], pos + 8
                if later:
                    proto = -1
                    break
            else:
                lengths.append(Field("ext length", pos + 1, 1))
                proto, pos = frame[pos], pos + (frame[pos + 1] + 1) * 8
            bounds.append(pos)
        l4 = pos if proto >= 0 else -1
    if l4 >= 0:
        fields += [Field("l4 word 0", l4, 2), Field("l4 word 1", l4 + 2, 2)]
        if proto == ref.IPPROTO_TCP:
            fields.append(Field("tcp offset/flags", l4 + 12, 2))
        bounds += [l4, l4 + 4, l4 + 8, l4 + 12, l4 + 20]
    bounds.append(len(frame))
    inside = [f for f in fields if f.offset + f.width <= len(frame)]
    return Layout(inside, [f for f in lengths if f.offset + f.width <= len(frame)],
                  sorted({b for b in bounds if 0 <= b <= len(frame)}))


# -- mutations ---------------------------------------------------------------------------

# Values that switch parser paths: ethertypes, IP versions and IHLs, the protocols and extension headers
# the parser knows, and the extremes.
BYTES = st.one_of(st.sampled_from([0x00, 0x01, 0x04, 0x05, 0x06, 0x11, 0x2B, 0x2C, 0x3A, 0x3B, 0x3C, 0x84, 0x40,
                                   0x45, 0x46, 0x4F, 0x60, 0x6F, 0x7F, 0x80, 0xFF]), st.integers(0, 255))
WORDS = st.one_of(st.sampled_from([0x0000, 0x0001, 0x0800, 0x86DD, 0x8100, 0x88A8, 0x0806, 0x2000, 0x3FFF,
                                   0x1FFF, 0xFFFF]), st.integers(0, 0xFFFF))
TAG = st.tuples(st.sampled_from(ref.VLAN_TPIDS), st.integers(0, 0xFFFF)).map(lambda t: struct.pack("!HH", *t))
OPS = ["flip", "overwrite", "overwrite", "truncate", "insert", "delete", "splice", "vlan", "lie", "lie"]


def _position(draw: st.DrawFn, frame: bytes, lay: Layout) -> int:
    """A position in the frame: half the time a header boundary (give or take 2), else anywhere, most often
    within the first 80 or 160 bytes."""
    if draw(st.booleans()) and lay.boundaries:
        b = draw(st.sampled_from(lay.boundaries)) + draw(st.integers(-2, 2))
        return min(max(b, 0), len(frame))
    return draw(st.integers(0, min(len(frame), draw(st.sampled_from([80, 160, len(frame)])))))


def _write(out: bytearray, f: Field, value: int) -> None:
    out[f.offset:f.offset + f.width] = (value & ((1 << 8 * f.width) - 1)).to_bytes(f.width)


@st.composite
def lie(draw: st.DrawFn, frame: bytes, f: Field) -> bytes:
    """`frame` with length field `f` set near its true value, to an extreme or to anything."""
    out = bytearray(frame)
    if f.name == "ihl":
        out[f.offset] = (out[f.offset] & 0xF0) | draw(st.integers(0, 15))
    else:
        true = int.from_bytes(out[f.offset:f.offset + f.width])
        _write(out, f, draw(st.one_of(st.integers(-24, 24).map(lambda d: true + d),
                                      st.sampled_from([0, (1 << 8 * f.width) - 1]),
                                      st.integers(0, (1 << 8 * f.width) - 1))))
    return bytes(out)


@st.composite
def mutation(draw: st.DrawFn, frame: bytes, others: Sequence[bytes]) -> tuple[str, bytes]:
    op = draw(st.sampled_from(OPS))
    out = bytearray(frame)
    lay = layout(frame)
    if op == "flip" and out:
        at_field = draw(st.booleans())
        if at_field and lay.fields:
            i = draw(st.sampled_from(lay.fields)).offset
        else:
            i = draw(st.integers(0, len(out) - 1))
        out[i] ^= 1 << draw(st.integers(0, 7))
    elif op == "overwrite" and lay.fields:
        f = draw(st.sampled_from(lay.fields))
        _write(out, f, draw(BYTES if f.width == 1 else WORDS))
    elif op == "truncate":
        del out[_position(draw, frame, lay):]
    elif op == "insert":
        i = _position(draw, frame, lay)
        out[i:i] = draw(st.binary(min_size=1, max_size=8))
    elif op == "delete":
        i = _position(draw, frame, lay)
        del out[i:i + draw(st.integers(1, 8))]
    elif op == "splice":
        # This frame's headers up to a boundary, then another frame from one of its boundaries.
        other = draw(st.sampled_from(others))
        rest = _position(draw, other, layout(other))
        out = out[:_position(draw, frame, lay)] + other[rest:]
    elif op == "vlan":
        # Before the outer tag or after any of the tags already there (where a TPID may stand).
        i = 12 + 4 * draw(st.integers(0, sum(f.name == "tci" for f in lay.fields)))
        out[i:i] = b"".join(draw(st.lists(TAG, min_size=1, max_size=3)))
    elif op == "lie" and lay.lengths:
        out = bytearray(draw(lie(frame, draw(st.sampled_from(lay.lengths)))))
    else:
        op = "none applicable"
    return op, bytes(out)


@st.composite
def mutant(draw: st.DrawFn, seeds: st.SearchStrategy[bytes], frames: Sequence[bytes]) -> bytes:
    """A captured frame with 0 to 3 mutations stacked (each placed by the layout of what the last left)."""
    frame = draw(seeds)
    event(f"seed {cap.kind(frame)}")
    for _ in range(draw(st.integers(0, 3))):
        op, frame = draw(mutation(frame, frames))
        event(f"op {op}")
    return frame


def tally_events(results: Sequence[ref.Result]) -> None:
    for r in results:
        event(f"outcome {r.value}" if isinstance(r, Verdict) else f"outcome metered v{r.key.ip_version}")


@FUZZ
@given(data=st.data())
def test_fuzz_mutated_captures(harness: Harness, capture: Capture, data: st.DataObject) -> None:
    batch = data.draw(st.lists(mutant(capture.seeds, capture.frames), min_size=1, max_size=16), label="batch")
    tally_events(replay(harness, batch))


@FUZZ
@given(data=st.data())
def test_fuzz_lying_lengths(harness: Harness, capture: Capture, data: st.DataObject) -> None:
    """One captured frame with each length field in turn set near its true value (and the extremes)."""
    frame = data.draw(capture.seeds, label="frame")
    event(f"seed {cap.kind(frame)}")
    batch = [frame]
    for f in layout(frame).lengths:
        batch += data.draw(st.lists(lie(frame, f), min_size=4, max_size=4), label=f.name)
    tally_events(replay(harness, batch))
