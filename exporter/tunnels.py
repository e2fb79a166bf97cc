"""Tunnels (issue 14): the outer addresses and the tunnel id beside the inner flow, from the
kernel's tunnel entries to the records the encoder sends.

With `tunnels` on, the programs meter a VXLAN, Geneve or GRE packet as its inner flow and write the
outer packet's addresses, the tunnel type and its id into the slot's tunnel entry (xdp/flow.h
struct tunnel_ext). The flow table folds slots into flows and knows nothing of extensions, so this
stage keeps each tunnelled flow's entry beside it, keyed by the flow key (which holds the segment,
the id's low 24 bits, so the inner flows of two segments stay apart):

- `note(drained)` reads a drained page's entries with its slots, before the page is released, and
  keeps per key the entry of its latest slot (by last_seen; a later page's replaces an earlier's).
  A slot whose entry has type 0 was not tunnelled and leaves what is kept alone.
- `split(records)` takes the entries of the flows that end and returns the plain records and the
  tunnelled ones as TUNNEL_RECORDs, export-ready columns the tunnel templates read
  (exporter/ipfix/templates.py). A flow leaves the table once it ends, and its entry leaves here;
  a later slot of the same key brings its entry again.
- `prune(live)`: a flow the table refused (full) never ends, so its entry would stay; when more
  entries are kept than the table holds flows, those whose key the table no longer holds go.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import numpy.typing as npt

from exporter.records import FLOW_RECORD, KEY_SIZE, Records, key_view
from xdp.layout import TUNNEL_EXT, TUNNEL_GENEVE, TUNNEL_GRE, TUNNEL_GRE_KEY, TUNNEL_NONE, TUNNEL_VXLAN

FEATURE = "tunnels"

TECHNOLOGY_LENGTH = 6   # octets of tunnelTechnology in the tunnel templates (exporter/ipfix/templates.py)
TECHNOLOGIES = {TUNNEL_VXLAN: "vxlan", TUNNEL_GENEVE: "geneve", TUNNEL_GRE: "gre", TUNNEL_GRE_KEY: "gre"}
VXLAN_SEGMENT_TYPE = 0x01 << 56   # layer2SegmentId's top octet: 0x01 VXLAN (IANA IE 351)

TUNNEL_RECORD = np.dtype([
    *FLOW_RECORD.descr,
    ("family", "u1"),                # inner ip_version << 4 | outer ip_version: which tunnel template
    ("tunnel_type", "u1"),           # xdp/flow.h XDPFLOW_TUNNEL_*
    ("technology", "u1", (TECHNOLOGY_LENGTH,)),   # IE 289 tunnelTechnology, NUL-padded
    ("segment_id", "<u8"),           # IE 351 layer2SegmentId: VXLAN only (0x01 << 56 | VNI), else 0
    ("gre_key", "<u4"),              # IE 296 greKey: GRE with key only, else 0
    ("tunnel_id", "<u4"),            # ntop 35632/106 UPSTREAM_TUNNEL_ID: VNI or GRE key
    ("outer_src", "u1", (16,)),      # ntop 35632/114, /396 UNTUNNELED_IPV4/6_SRC_ADDR (IPv4-mapped for IPv4)
    ("outer_dst", "u1", (16,)),      # ntop 35632/116, /397 UNTUNNELED_IPV4/6_DST_ADDR
])

_TECH = np.zeros((max(TECHNOLOGIES) + 1, TECHNOLOGY_LENGTH), dtype=np.uint8)
for _type, _name in TECHNOLOGIES.items():
    _TECH[_type, :len(_name)] = np.frombuffer(_name.encode(), dtype=np.uint8)

NO_TUNNELS = np.zeros(0, dtype=TUNNEL_RECORD)


def _keys(key_bytes: npt.NDArray[np.void] | npt.NDArray[np.uint8]) -> list[bytes]:
    # S-dtype strips trailing NULs, but every key is KEY_SIZE long, so the stripped form is still unique.
    return np.ascontiguousarray(key_bytes).view(f"S{KEY_SIZE}").reshape(-1).tolist()  # type: ignore[no-any-return]


def tunnel_records(records: Records, ext: npt.NDArray[np.void]) -> Records:
    """FLOW_RECORDs with their tunnel entries (TUNNEL_EXT, type != 0) as TUNNEL_RECORDs."""
    out = np.zeros(len(records), dtype=TUNNEL_RECORD)
    for name in FLOW_RECORD.names or ():
        out[name] = records[name]
    kind = ext["type"]
    if len(kind) and (kind.max() > TUNNEL_GRE_KEY or kind.min() == TUNNEL_NONE):
        raise ValueError("tunnel entries with a type outside 1..4")
    ident = ext["tunnel_id"].astype(np.uint64)
    out["family"] = (records["ip_version"] << 4) | ext["outer_ip_version"]
    out["tunnel_type"] = kind
    out["technology"] = _TECH[kind]
    out["segment_id"] = np.where(kind == TUNNEL_VXLAN, np.uint64(VXLAN_SEGMENT_TYPE) | ident, np.uint64(0))
    out["gre_key"] = np.where(kind == TUNNEL_GRE_KEY, ext["tunnel_id"], np.uint32(0))
    out["tunnel_id"] = ext["tunnel_id"]
    out["outer_src"] = ext["outer_src"]
    out["outer_dst"] = ext["outer_dst"]
    return out


class TunnelStore:
    """The tunnel entry of each tunnelled flow the table holds, by flow key (see the module docstring)."""

    def __init__(self) -> None:
        self._entries: dict[bytes, bytes] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def note_windows(self, pairs: Iterable[tuple[npt.NDArray[np.void], npt.NDArray[np.void]]]) -> int:
        """Keep the entries of (slots, entries) window pairs (FLOW_SLOT, TUNNEL_EXT); the tunnelled slots seen."""
        seen = 0
        for slots, ext in pairs:
            hit = (ext["type"] != TUNNEL_NONE) & (slots["value"]["packets"] > 0)
            if not hit.any():
                continue
            at = np.flatnonzero(hit)
            at = at[np.argsort(slots["value"]["last_seen"][at], kind="stable")]   # the latest is kept
            raw = np.ascontiguousarray(slots).view(np.uint8).reshape(len(slots), slots.dtype.itemsize)
            keys = _keys(raw[at, :KEY_SIZE])
            entries = np.ascontiguousarray(ext[at]).view(f"V{TUNNEL_EXT.itemsize}").tolist()
            self._entries.update(zip(keys, map(bytes, entries), strict=True))
            seen += len(at)
        return seen

    def split(self, records: Records) -> tuple[Records, Records]:
        """(the records without an entry, the others as TUNNEL_RECORDs); their entries are dropped."""
        if not self._entries or not len(records):
            return records, NO_TUNNELS
        found = [self._entries.pop(k, None) for k in _keys(key_view(records))]
        hit = np.fromiter((f is not None for f in found), dtype=bool, count=len(found))
        if not hit.any():
            return records, NO_TUNNELS
        ext = np.frombuffer(b"".join(f for f in found if f is not None), dtype=TUNNEL_EXT)
        return records[~hit], tunnel_records(records[hit], ext)

    def prune(self, live: Records) -> int:
        """Drop the entries of keys `live` (the table's flows) does not hold; how many went."""
        keep = set(_keys(key_view(live)))
        gone = [k for k in self._entries if k not in keep]
        for k in gone:
            del self._entries[k]
        return len(gone)
