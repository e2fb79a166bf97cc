"""tshark decodes the encoder's templates, options records and flow records without warnings.

The messages go into a pcap written here (classic libpcap format, Ethernet +
IPv4 + UDP to port 4739, checksums filled in), so no network or root is needed.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from exporter.ipfix import (
    CONFIG_TEMPLATE_ID,
    FLOW_KEYS_TEMPLATE_ID,
    FLOW_V4,
    METERING_TEMPLATE_ID,
    RELIABILITY_TEMPLATE_ID,
    Encoder,
    ExporterState,
    SequenceMode,
)
from exporter.ipfix.options import Interface
from tests.interop.collecting import flow_sets, udp_frame, write_pcap
from tools.packets import checksum
from tools.synthetic import random_records

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark not installed (apt-get install tshark)"),
]

NOW = 1_700_000_000.0
PORT = 4739
def tshark(pcap: Path, *args: str) -> str:
    cmd = ["tshark", "-n", "-r", str(pcap), "-d", f"udp.port=={PORT},cflow", *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=60).stdout


def keep_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose repeated keys (tshark's repeated elements) become lists of their values."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            out[k] = [*out[k], v] if isinstance(out[k], list) and k.startswith("cflow.") else [out[k], v]
        else:
            out[k] = v
    return out


def shown_time(ms: int) -> str:
    """tshark's rendering of an absolute time in milliseconds."""
    return f"{datetime.fromtimestamp(ms / 1000, UTC):%b %d, %Y %H:%M:%S}.{ms % 1000:03d}000000 UTC"


def state(**overrides: Any) -> ExporterState:
    values: dict[str, Any] = {
        "not_sent_flows": 11, "not_sent_packets": 12, "not_sent_octets": 13, "exported_messages": 14,
        "exported_flows": 15, "exported_octets": 16, "observed_packets": 1_000_017, "observed_octets": 9_000_000_018,
        "ignored_packets": 19, "ignored_octets": 20, "active_timeout_s": 60.0, "idle_timeout_s": 15.0,
        "system_init_ms": 1_699_999_000_123, "sampling_interval": 1, "sampling_probability": 1.0,
        "ignored_first_ms": 1_699_999_100_001, "ignored_last_ms": 1_699_999_200_002,
        "not_sent_first_ms": 1_699_999_300_003, "not_sent_last_ms": 1_699_999_400_004,
        "frames": 1_000_100, "selected": (1_000_036, 1_000_036, 1_000_036),
        "interfaces": (Interface(2, "eth0", "uplink to the core"), Interface(41, "veth-obs")),
    }
    values.update(overrides)
    return ExporterState(**values)


def stream(odid: int, address: str, mode: SequenceMode, st: ExporterState) -> tuple[Encoder, int, list[bytes]]:
    """What one exporter sends: templates, options with flows, options alone, flows alone."""
    enc = Encoder(odid=odid, mtu=1400, exporter_address=address, exporting_process_id=odid * 10,
                  sequence_mode=mode)
    recs = random_records(300, seed=odid, ipv6_share=0.4)
    msgs = [enc.templates_message(NOW), *enc.encode(recs, NOW + 1, options=st),
            *enc.encode_options(st, NOW + 2), *enc.encode(recs[:20], NOW + 3)]
    return enc, len(recs) + 20, msgs


def options_then_more(msgs: list[bytes]) -> int:
    """Messages holding options records that another message follows (where a dialect mismatch shows)."""
    def has_options(raw: bytes) -> bool:
        pos = 16
        while pos < len(raw):
            set_id, set_len = struct.unpack_from("!HH", raw, pos)
            if set_id >= CONFIG_TEMPLATE_ID:
                return True
            pos += set_len
        return False

    return sum(has_options(m) for m in msgs[:-1])


@pytest.mark.parametrize(("mode", "address", "sampling"), [("rfc", "192.0.2.1", 1), ("nfdump", "2001:db8::1", 100)])
def test_tshark_decodes_options_and_flows(tmp_path: Path, mode: SequenceMode, address: str, sampling: int) -> None:
    st = state(sampling_interval=sampling)
    enc, n_flows, msgs = stream(7, address, mode, st)
    pcap = tmp_path / "ipfix.pcap"
    write_pcap(pcap, [(NOW + i, udp_frame(m, "192.0.2.1", "192.0.2.2", 40000)) for i, m in enumerate(msgs)])

    # tshark checks sequence numbers the RFC way (options records count): silent on the rfc dialect, and on the
    # nfdump dialect one "Sequence" warning after each message with options records, nothing else.
    expert = tshark(pcap, "-z", "expert,warn", "-q")
    assert "Malformed" not in expert and "Errors" not in expert, expert
    sequence_warnings = re.findall(r"^\s*(\d+)\s+Sequence\s+CFLOW\s+Unexpected flow sequence", expert, re.M)
    other = re.findall(r"^\s*\d+\s+(?!Sequence)\w+\s+\w+", expert, re.M)
    assert other == [], expert
    assert sum(map(int, sequence_warnings)) == (0 if mode == "rfc" else options_then_more(msgs)), expert

    packets = json.loads(tshark(pcap, "-T", "json"), object_pairs_hook=keep_repeats)
    assert len(packets) == len(msgs)
    records: list[tuple[int, dict[str, Any]]] = []
    for pkt in packets:
        layers = pkt["_source"]["layers"]
        assert "cflow" in layers, f"not decoded as IPFIX: {list(layers)}"
        assert int(layers["cflow"]["cflow.od_id"]) == enc.odid
        records.extend(flow_sets(layers["cflow"]))

    flows = [r for sid, r in records if sid in (256, 257)]
    assert len(flows) == n_flows, "every flow record decoded"
    options: dict[int, list[dict[str, Any]]] = {}
    for sid, rec in records:
        if sid not in (256, 257):
            options.setdefault(sid, []).append(rec)
    assert sorted(options) == [CONFIG_TEMPLATE_ID, FLOW_KEYS_TEMPLATE_ID, METERING_TEMPLATE_ID,
                               RELIABILITY_TEMPLATE_ID, 264, 265, 266, 267, 268]
    # Two options runs; two flow-key and two property-selector records a run; the interface
    # names once (with the templates), one record per interface.
    assert {sid: len(v) for sid, v in options.items()} == {
        CONFIG_TEMPLATE_ID: 2, FLOW_KEYS_TEMPLATE_ID: 4, METERING_TEMPLATE_ID: 2, RELIABILITY_TEMPLATE_ID: 2,
        264: 2, 265: 2, 266: 4, 267: 2, 268: 2}

    config = options[CONFIG_TEMPLATE_ID][0]
    assert int(config["cflow.od_id"]) == enc.odid
    assert int(config["cflow.sampling_interval"]) == sampling
    assert int(config["cflow.sampling_packet_interval"]) == sampling
    assert int(config["cflow.flow_active_timeout"]) == 60
    assert int(config["cflow.flow_inactive_timeout"]) == 15
    init = datetime.fromtimestamp(st.system_init_ms / 1000, UTC)
    assert config["cflow.sys_init_time"] == f"{init:%b %d, %Y %H:%M:%S}.{st.system_init_ms % 1000:03d}000000 UTC"

    # flowKeyIndicator is shown as 8 colon-separated octets under tshark's name for it, "post_key".
    keys = {int(r["cflow.template_id"]): int(r["cflow.post_key"].replace(":", ""), 16)
            for r in options[FLOW_KEYS_TEMPLATE_ID]}
    assert keys == {256: FLOW_V4.flow_key_indicator, 257: FLOW_V4.flow_key_indicator}

    metering = options[METERING_TEMPLATE_ID][0]
    # tshark names IEs 40-42 after their NetFlow v9 ancestors ("packets/flows/octets exported").
    names = {"cflow.od_id": enc.odid, "cflow.packetsexp": st.exported_messages, "cflow.flowsexp": st.exported_flows,
             "cflow.octetsexp": st.exported_octets, "cflow.permanent_packets": st.observed_packets,
             "cflow.permanent_octets": st.observed_octets, "cflow.ignore_packets": st.ignored_packets,
             "cflow.ignore_octets": st.ignored_octets}
    assert {k: int(metering[k]) for k in names} == names
    # RFC 7011 4.2: the window of the ignored packets, two observationTimeMilliseconds (IE 323).
    assert metering["cflow.observation_time_milliseconds"] == [shown_time(st.ignored_first_ms),
                                                              shown_time(st.ignored_last_ms)]

    reliability = options[RELIABILITY_TEMPLATE_ID][0]
    assert int(reliability["cflow.flow_exporter"]) == 70
    assert [int(reliability[f"cflow.notsent_{k}"]) for k in ("flows", "packets", "octets")] == [
        st.not_sent_flows, st.not_sent_packets, st.not_sent_octets]
    shown = {k: v for k, v in reliability.items() if k.startswith("cflow.exporter_addr")}
    assert list(shown.values()) == [address], reliability
    assert reliability["cflow.observation_time_milliseconds"] == [shown_time(st.not_sent_first_ms),
                                                                 shown_time(st.not_sent_last_ms)]

    # RFC 5476: IEs 318/319 in the selection sequence statistics, the selectors in their reports.
    stats = options[268][0]
    assert int(stats["cflow.selection_sequence_id"]) == 1
    assert int(stats["cflow.selector_id_total_pkts_observed"]) == st.frames
    assert [int(v) for v in stats["cflow.selector_id_total_pkts_selected"]] == list(st.selected)
    assert [int(v) for v in options[265][0]["cflow.selector_id"]] == [1, 2, 3]
    assert {int(r["cflow.selector_id"]): int(r["cflow.selector_algorithm"]) for r in options[266]} == {1: 5, 2: 5}
    assert float(options[267][0]["cflow.sampling_probability"]) == st.sampling_probability

    names_shown = {int(r["cflow.inputint"]): (r["cflow.if_name"], r.get("cflow.if_descr", "")) for r in options[264]}
    assert names_shown == {i.ifindex: (i.name, i.description) for i in st.interfaces}


def test_expert_check_catches_a_broken_set(tmp_path: Path) -> None:
    # The warning check above must be able to fail: a set length below 4 is flagged as malformed.
    msg = bytearray(Encoder().encode(random_records(5), NOW, options=state())[0])
    struct.pack_into("!H", msg, 16 + 2, 3)
    pcap = tmp_path / "broken.pcap"
    write_pcap(pcap, [(NOW, udp_frame(bytes(msg), "192.0.2.1", "192.0.2.2", 40000))])
    assert re.search(r"Malformed", tshark(pcap, "-z", "expert,warn", "-q"))


def test_pcap_frames_have_valid_checksums() -> None:
    frame = udp_frame(b"\x00\x0a\x00\x10" + bytes(12), "10.0.0.1", "10.0.0.2", 1234)
    ip, udp = frame[14:34], frame[34:]
    assert checksum(ip) == 0
    pseudo = ip[12:20] + struct.pack("!BBH", 0, 17, len(udp))
    assert checksum(pseudo + udp) == 0
    assert np.frombuffer(udp[:4], ">u2").tolist() == [1234, PORT]
