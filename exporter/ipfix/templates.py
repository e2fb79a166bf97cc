"""IPFIX templates: an id and an ordered list of (information element, length).

Information elements come from the `ipfix` package's IANA registry, looked up
by name, so ids and types are never restated here. A Template knows how to
encode its own template record (RFC 7011 3.4.1, or 3.4.2 with a scope count
for options templates), the packed big-endian numpy dtype whose itemsize
and byte layout are exactly one data record on the wire, and which of its
fields are flow keys (the flowKeyIndicator bitmap of RFC 7011 4.4).

An element may appear more than once in a template (RFC 7011 4.2 and 4.3 put
a time window in two observationTime* fields; RFC 5476 lists a sequence's
selectors as repeated selectorId fields). Numpy field names must be unique,
so the wire dtype names the n-th occurrence `name#n` (n >= 2), as the built-in
collector's decoder names its keys: `keys` lists them.

Variable-length fields (RFC 7011 7: interface names and descriptions) are
allowed in options templates whose records are built by hand; such a
template has no wire dtype and no fixed record length.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import ipfix.ie
import ipfix.types
import numpy as np

from exporter.ipfix.elements import register as register_elements
from exporter.tunnels import TECHNOLOGY_LENGTH

TEMPLATE_SET_ID = 2
OPTIONS_TEMPLATE_SET_ID = 3
MIN_DATA_SET_ID = 256
VARLEN = 65535
ENTERPRISE_BIT = 0x8000
FLOW_KEY_BITS = 64

ipfix.ie.use_iana_default()
ipfix.ie.use_5103_default()  # the reverse elements of RFC 5103 (enterprise 29305), for biflows
register_elements()          # the enterprise elements of the tunnel templates

# Abstract data types (RFC 7011 6.1) that are numbers on the wire; every other
# type is carried as raw octets. Only integers may use reduced-size encoding.
_NUMERIC_KIND = {
    "unsigned8": "u", "unsigned16": "u", "unsigned32": "u", "unsigned64": "u",
    "signed8": "i", "signed16": "i", "signed32": "i", "signed64": "i",
    "float32": "f", "float64": "f", "boolean": "u",
    "dateTimeSeconds": "u", "dateTimeMilliseconds": "u",
    "dateTimeMicroseconds": "u", "dateTimeNanoseconds": "u",
}
_REDUCIBLE = {name for name in _NUMERIC_KIND if name.startswith(("unsigned", "signed"))}
_VARIABLE_TYPES = {"string", "octetArray"}

_SET_HEADER = struct.Struct("!HH")
_TEMPLATE_HEADER = struct.Struct("!HH")
_OPTIONS_TEMPLATE_HEADER = struct.Struct("!HHH")
_FIELD_SPEC = struct.Struct("!HH")
_PEN = struct.Struct("!I")


def ie(name: str) -> Any:
    """The registry's InformationElement for an IANA (or RFC 5103) name."""
    try:
        return ipfix.ie.for_spec(name)
    except ValueError as exc:
        raise ValueError(f"unknown information element {name!r}") from exc


@dataclass(frozen=True)
class Field:
    """One field specifier: an information element at a fixed length; `key` marks a flow key."""

    element: Any  # ipfix.ie.InformationElement (the package ships no type hints)
    length: int
    key: bool = False

    @property
    def name(self) -> str:
        return str(self.element.name)

    def numpy_format(self) -> Any:
        type_name = self.element.type.name
        native = ipfix.types.for_name(type_name).length
        kind = _NUMERIC_KIND.get(type_name)
        if kind is None:
            if native not in (VARLEN, self.length):
                raise ValueError(f"{self.name}: {type_name} must be {native} octets long")
            return ("u1", (self.length,))
        reduced = type_name in _REDUCIBLE and self.length in (1, 2, 4) and self.length < native
        if self.length != native and not reduced:
            raise ValueError(f"{self.name}: length {self.length} is not a valid encoding of {type_name}")
        return f">{kind}{self.length}"


@dataclass(frozen=True)
class Template:
    """A (data or options) template. scope_count > 0 makes it an options template."""

    template_id: int
    fields: tuple[Field, ...]
    scope_count: int = 0
    wire_dtype: np.dtype[Any] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not MIN_DATA_SET_ID <= self.template_id <= 0xFFFF:
            raise ValueError(f"template id {self.template_id} outside {MIN_DATA_SET_ID}..65535")
        if not self.fields:
            raise ValueError("a template needs at least one field")
        if not 0 <= self.scope_count <= len(self.fields):
            raise ValueError("scope count must be within the field count")
        for f in self.fields:
            if not 0 < f.length <= VARLEN:
                raise ValueError(f"{f.name}: length {f.length} outside 1..65535")
            if f.length == VARLEN and f.element.type.name not in _VARIABLE_TYPES:
                raise ValueError(f"{f.name}: {f.element.type.name} cannot be variable-length here")
        keys = [i for i, f in enumerate(self.fields) if f.key]
        if keys and self.scope_count:
            raise ValueError("flow keys belong to data templates, not options templates")
        if keys and keys[-1] >= FLOW_KEY_BITS:
            raise ValueError(f"flow keys must be among the first {FLOW_KEY_BITS} fields")
        if keys and any(f.length == VARLEN for f in self.fields):
            raise ValueError("data templates here have fixed-length fields only")
        if any(f.length == VARLEN for f in self.fields):
            dtype = np.dtype([])
        else:
            dtype = np.dtype([(k, f.numpy_format()) for k, f in zip(self.keys, self.fields, strict=True)])
        object.__setattr__(self, "wire_dtype", dtype)

    @classmethod
    def from_names(cls, template_id: int, names: Iterable[str], scope_count: int = 0,
                   keys: Iterable[str] = ()) -> Template:
        """Fields at the native length of each element's type; `keys` names the flow-key fields."""
        names = list(names)
        key_set = set(keys)
        if not key_set <= set(names):
            raise ValueError(f"flow keys {sorted(key_set - set(names))} are not fields of the template")
        if len(key_set) != len([n for n in names if n in key_set]):
            raise ValueError("a flow key may appear only once in a template")
        fields = []
        for name in names:
            element = ie(name)
            fields.append(Field(element, int(element.length), name in key_set))
        return cls(template_id, tuple(fields), scope_count)

    @property
    def set_id(self) -> int:
        return OPTIONS_TEMPLATE_SET_ID if self.scope_count else TEMPLATE_SET_ID

    @property
    def variable(self) -> bool:
        """Has variable-length fields: records differ in length and are built by hand."""
        return any(f.length == VARLEN for f in self.fields)

    @property
    def record_length(self) -> int:
        if self.variable:
            raise ValueError(f"template {self.template_id} has variable-length records")
        return int(self.wire_dtype.itemsize)

    @property
    def names(self) -> tuple[str, ...]:
        """Element names in field order (repeated elements repeat)."""
        return tuple(f.name for f in self.fields)

    @property
    def keys(self) -> tuple[str, ...]:
        """Unique field names, in order: an element's n-th occurrence (n >= 2) is `name#n`."""
        seen: dict[str, int] = {}
        out = []
        for f in self.fields:
            seen[f.name] = seen.get(f.name, 0) + 1
            out.append(f.name if seen[f.name] == 1 else f"{f.name}#{seen[f.name]}")
        return tuple(out)

    @property
    def flow_key_indicator(self) -> int:
        """RFC 7011 4.4: bit n (least significant first, from 0) set when field n is a flow key."""
        return sum(1 << i for i, f in enumerate(self.fields) if f.key)

    def template_record(self) -> bytes:
        if self.scope_count:
            parts = [_OPTIONS_TEMPLATE_HEADER.pack(self.template_id, len(self.fields), self.scope_count)]
        else:
            parts = [_TEMPLATE_HEADER.pack(self.template_id, len(self.fields))]
        for f in self.fields:
            pen = int(f.element.pen)
            number = int(f.element.num)
            parts.append(_FIELD_SPEC.pack(number | (ENTERPRISE_BIT if pen else 0), f.length))
            if pen:
                parts.append(_PEN.pack(pen))
        return b"".join(parts)


def template_sets(templates: Sequence[Template]) -> bytes:
    """Template set(s) announcing every template.

    Data templates share one Template Set; each options template gets an
    Options Template Set of its own. RFC 7011 allows several per set, but
    pmacct's nfacctd (1.7) misreads every options template after the first in
    a set and drops them as malformed.
    """
    records = [t.template_record() for t in templates if t.set_id == 2]
    out = []
    if records:
        body = b"".join(records)
        out.append(_SET_HEADER.pack(2, _SET_HEADER.size + len(body)) + body)
    for t in templates:
        if t.set_id != 2:
            rec = t.template_record()
            out.append(_SET_HEADER.pack(t.set_id, _SET_HEADER.size + len(rec)) + rec)
    return b"".join(out)


# RFC 5103 biflows: the uniflow fields (the forward direction), then the reverse direction's values.
REVERSE_FIELDS = ("reverseIngressInterface", "reverseEgressInterface", "reversePacketDeltaCount",
                  "reverseOctetDeltaCount", "reverseFlowStartMilliseconds", "reverseFlowEndMilliseconds",
                  "reverseTcpControlBits",
                  "reverseIpClassOfService", "reverseMinimumTTL", "reverseMaximumTTL", "biflowDirection")


def _flow_template(template_id: int, family: str, biflow: bool = False, per_interface: bool = False) -> Template:
    # The flow key of xdp/layout.py (ip_version picks the template); ICMP type/code lives in the key's dst_port.
    # flowDirection says which hook metered the flow: 0 XDP ingress (ingressInterface), 1 TC egress
    # (egressInterface); the other interface field is 0.
    keys = [f"source{family}Address", f"destination{family}Address", "sourceTransportPort",
            "destinationTransportPort", "protocolIdentifier", "vlanId", f"icmpTypeCode{family}"]
    if not biflow:
        keys += ["ingressInterface", "egressInterface", "flowDirection"]
    elif per_interface:
        # Biflows pair as exporter/biflow.py's pairing_keys(): the interface is part of the key with
        # egress metering (either interface field carries it), never the hook; without, neither is.
        keys += ["ingressInterface", "egressInterface"]
    return Template.from_names(template_id, [
        f"source{family}Address",
        f"destination{family}Address",
        "sourceTransportPort",
        "destinationTransportPort",
        "protocolIdentifier",
        "ingressInterface",
        "egressInterface",
        "flowDirection",
        "vlanId",
        "ipClassOfService",
        "tcpControlBits",
        f"icmpTypeCode{family}",
        "minimumTTL",
        "maximumTTL",
        "packetDeltaCount",
        "octetDeltaCount",
        "flowStartMilliseconds",
        "flowEndMilliseconds",
        "flowEndReason",
        *(REVERSE_FIELDS if biflow else ()),
    ], keys=keys)


FLOW_V4 = _flow_template(256, "IPv4")
FLOW_V6 = _flow_template(257, "IPv6")
BIFLOW_V4 = _flow_template(262, "IPv4", biflow=True)
BIFLOW_V6 = _flow_template(263, "IPv6", biflow=True)
_BIFLOW_PER_INTERFACE = (_flow_template(262, "IPv4", biflow=True, per_interface=True),
                         _flow_template(263, "IPv6", biflow=True, per_interface=True))


def biflow_templates(per_interface: bool) -> tuple[Template, Template]:
    """The (IPv4, IPv6) biflow templates; with `per_interface` the interfaces are flow keys."""
    return _BIFLOW_PER_INTERFACE if per_interface else (BIFLOW_V4, BIFLOW_V6)


# Tunnels (issue 14): the flow template of the inner packet's family, then what the tunnel adds:
# its technology as a fixed-length string ("vxlan", "geneve", "gre", NUL-padded), the VNI as
# layer2SegmentId for VXLAN (type octet 0x01, RFC-less but IANA's definition) and 0 otherwise, the GRE
# key (0 without one), the id whatever the technology (ntop's UPSTREAM_TUNNEL_ID) and the outer
# packet's addresses in the outer family's ntop elements (exporter/ipfix/elements.py). Four templates:
# (inner family, outer family). The segment (the id's low 24 bits) is part of the kernel's flow key,
# so the id fields are flow keys too.
TUNNEL_FIELDS = ("tunnelTechnology", "layer2SegmentId", "greKey", "UPSTREAM_TUNNEL_ID")


def _tunnel_template(template_id: int, inner: str, outer: str) -> Template:
    base = _flow_template(template_id, inner)
    out = [f"UNTUNNELED_{outer.upper()}_SRC_ADDR", f"UNTUNNELED_{outer.upper()}_DST_ADDR"]
    extra = [Field(ie("tunnelTechnology"), TECHNOLOGY_LENGTH)]
    extra += [Field(e, int(e.length), key=True) for e in map(ie, TUNNEL_FIELDS[1:])]
    extra += [Field(e, int(e.length)) for e in map(ie, out)]
    return Template(template_id, base.fields + tuple(extra))


# (inner ip_version, outer ip_version) -> template
TUNNEL_TEMPLATES = {
    (4, 4): _tunnel_template(270, "IPv4", "IPv4"),
    (4, 6): _tunnel_template(271, "IPv4", "IPv6"),
    (6, 4): _tunnel_template(272, "IPv6", "IPv4"),
    (6, 6): _tunnel_template(273, "IPv6", "IPv6"),
}
