"""An independent IPFIX wire parser for the unit tests (struct-based, written here): message and set
structure, template ids, record counts by template (shared by test_encoder and test_options)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from exporter.ipfix import Encoder

ALL_TEMPLATES = Encoder().templates
RECLEN = {t.template_id: t.record_length for t in ALL_TEMPLATES if not t.variable}
INTERFACES_ID = 264  # interfaceName/interfaceDescription: variable-length records, counted by walking them
FLOW_IDS = (256, 257)


@dataclass
class Message:
    length: int
    export_time: int
    sequence: int
    odid: int
    sets: list[tuple[int, bytes]]  # (set id, set body without its header)
    reclen: dict[int, int]

    def template_ids(self) -> list[int]:
        ids = []
        for set_id, body in self.sets:
            if set_id not in (2, 3):
                continue
            pos = 0
            while pos < len(body):
                tid, count = struct.unpack_from("!HH", body, pos)
                assert count > 0
                if set_id == 3:
                    scope = struct.unpack_from("!H", body, pos + 4)[0]
                    assert 1 <= scope <= count, "options template scope count"
                    pos += 2
                ids.append(tid)
                pos += 4 + 4 * count
            assert pos == len(body)
        return ids

    def data_sets(self) -> list[tuple[int, int]]:
        """(template id, record count) of each flow data set."""
        return [(sid, len(body) // self.reclen[sid]) for sid, body in self.sets if sid in FLOW_IDS]

    def options_sets(self) -> list[tuple[int, int]]:
        """(template id, record count) of each options data set."""
        return [(sid, interface_records(body) if sid == INTERFACES_ID else len(body) // self.reclen[sid])
                for sid, body in self.sets if sid >= 256 and sid not in FLOW_IDS]

    @property
    def data_records(self) -> int:
        return sum(n for _, n in self.data_sets())


def parse(raw: bytes, reclen: dict[int, int] | None = None) -> Message:
    """Check the wire structure; `reclen` gives record lengths by template id (default: the default Encoder's)."""
    reclen = RECLEN if reclen is None else reclen
    version, length, export_time, sequence, odid = struct.unpack_from("!HHIII", raw)
    assert version == 10
    assert length == len(raw)
    sets = []
    pos = 16
    while pos < len(raw):
        set_id, set_len = struct.unpack_from("!HH", raw, pos)
        assert set_len > 4, "empty set"
        assert pos + set_len <= len(raw), "set overruns the message"
        body = raw[pos + 4:pos + set_len]
        if set_id == INTERFACES_ID:
            interface_records(body)
        elif set_id >= 256:
            assert set_id in reclen, f"unexpected set id {set_id}"
            assert len(body) % reclen[set_id] == 0, "padding or a partial record"
        else:
            assert set_id in (2, 3), f"unexpected set id {set_id}"
        sets.append((set_id, body))
        pos += set_len
    assert pos == len(raw)
    return Message(length, export_time, sequence, odid, sets, reclen)


def interface_records(body: bytes) -> int:
    """Records in a template-264 set (ifindex, then two RFC 7011 7 variable-length strings); checks they end flush."""
    pos = n = 0
    while pos < len(body):
        pos += 4
        for _ in range(2):
            length = body[pos]
            pos += 1
            if length == 255:
                length = struct.unpack_from("!H", body, pos)[0]
                pos += 2
            pos += length
        assert pos <= len(body), "interface record overruns its set"
        n += 1
    return n
