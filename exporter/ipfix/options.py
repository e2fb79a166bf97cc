"""IPFIX options (RFC 7011 section 4, RFC 5476): what the exporter says about itself.

Every options template has an Options Template Set of its own (nfacctd reads
only the first of a set). Counters are totals since the process started,
never per-interval deltas, so a lost datagram loses no information.

RFC 7011 section 4:

- 258 metering configuration, scope observationDomainId: samplingInterval and
  samplingPacketInterval (N when 1 packet in N is metered at random, see
  below), flowActiveTimeout, flowIdleTimeout (seconds),
  systemInitTimeMilliseconds.
- 259 flow keys (4.4), scope templateId: flowKeyIndicator, one record per
  data template.
- 260 metering process statistics and reliability (4.1, 4.2), scope
  observationDomainId: exportedMessageTotalCount, exportedFlowRecordTotalCount,
  exportedOctetTotalCount; packetTotalCount and octetTotalCount for the IP
  traffic metered; ignoredPacketTotalCount and ignoredOctetTotalCount, then
  the window of the ignored packets as two observationTimeMilliseconds
  (first, last ignored; 0 and 0 while none was).
- 261 exporting process reliability (4.3), scoped by the Exporting Process
  (each collector session is one, RFC 7011 10): exportingProcessId, plus
  exporterIPv4Address or exporterIPv6Address (the session's source address)
  once known, both scope fields as 4.3 requires of whichever is present;
  notSentFlowTotalCount, notSentPacketTotalCount, notSentOctetTotalCount and
  the window of the records not sent (two observationTimeMilliseconds).
  ipfixcol2 (libfds) recognises 260 and 261 as the 4.2 and 4.3 templates only
  with exactly two of IEs 322-325: hence the pairs.

264 interface names, scope ingressInterface: interfaceName and
interfaceDescription (variable-length), one record per metered ifindex; they
go with the templates and whenever the set of interfaces changes.

Packet selection (RFC 5476 6.5, the PSAMP reports). The kernel program is a
fixed sequence of three selectors, in this order, per observation domain:
1 keeps IPv4/IPv6 frames (property match), 2 applies the filter rules
(property match; with no rule it keeps everything), 3 is the sampler
(uniform probabilistic: each packet kept with samplingProbability 1/N; 1
when not sampling). A malformed IP packet is kept by selectors 1 to 3 (it is
IP; rules and sampler judge parsed packets only) and then ignored by the
metering process. The shape never changes with the configuration, so no
template is ever redefined by a SIGHUP.

- 265 selection sequence report (6.5.1), scope selectionSequenceId:
  observationDomainId (the observation point: the domain's interfaces), then
  the three selectorId in order.
- 266 property-match selector report (6.5.2.5), scope selectorId:
  selectorAlgorithm 5; records for selectors 1 and 2.
- 267 random selector report (6.5.2.4), scope selectorId: selectorAlgorithm
  4, samplingProbability.
- 268 selection sequence statistics (6.5.3), scope selectionSequenceId:
  selectorIdTotalPktsObserved (every frame the hooks saw), then
  selectorIdTotalPktsSelected after each selector, in order.

So, once the flow table has drained, packets in the records a collector
received + ignoredPacketTotalCount = the last selectorIdTotalPktsSelected,
and on an interface metered at ingress only selectorIdTotalPktsObserved is
its rx_packets.

Sampling rate. samplingInterval (34, deprecated) and samplingPacketInterval
(305) carry N, the rate in the NetFlow sense (1 packet in N), because that is
where nfdump, pmacct, goflow2 and Akvorado read it. For PSAMP (RFC 5476
6.5.2.1) samplingPacketInterval means packets selected in a row under
count-based sampling, which this sampler is not: the sampler's exact
description is template 267's samplingProbability.
"""

from __future__ import annotations

import operator
import struct
from dataclasses import dataclass, fields
from ipaddress import IPv4Address, IPv6Address, ip_address
from itertools import pairwise
from typing import Any, NamedTuple

import numpy as np

from exporter.ipfix.templates import Template

CONFIG_TEMPLATE_ID = 258
FLOW_KEYS_TEMPLATE_ID = 259
METERING_TEMPLATE_ID = 260
RELIABILITY_TEMPLATE_ID = 261
INTERFACES_TEMPLATE_ID = 264
SELECTION_SEQUENCE_TEMPLATE_ID = 265
PROPERTY_SELECTOR_TEMPLATE_ID = 266
RANDOM_SELECTOR_TEMPLATE_ID = 267
SELECTION_STATS_TEMPLATE_ID = 268

SELECTION_SEQUENCE_ID = 1
SELECTOR_IP, SELECTOR_FILTER, SELECTOR_SAMPLER = SELECTORS = (1, 2, 3)
ALGORITHM_UNIFORM_PROBABILISTIC = 4   # RFC 5475 / IANA PSAMP selector algorithm registry
ALGORITHM_PROPERTY_MATCH = 5

U16_MAX = (1 << 16) - 1
U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1
_SHORT_STRING = 255  # RFC 7011 7: longer values take a 3-octet length


class RecordGroup(NamedTuple):
    """One run of records for the encoder to cut into sets: all `records` are `record_length` long."""

    template: Template
    payload: bytes | memoryview
    records: int
    record_length: int


def fixed_group(template: Template, payload: bytes | memoryview, count: int) -> RecordGroup:
    return RecordGroup(template, payload, count, template.record_length)


CONFIG_TEMPLATE = Template.from_names(CONFIG_TEMPLATE_ID, [
    "observationDomainId",
    "samplingInterval",
    "samplingPacketInterval",
    "flowActiveTimeout",
    "flowIdleTimeout",
    "systemInitTimeMilliseconds",
], scope_count=1)

FLOW_KEYS_TEMPLATE = Template.from_names(FLOW_KEYS_TEMPLATE_ID, ["templateId", "flowKeyIndicator"], scope_count=1)

METERING_TEMPLATE = Template.from_names(METERING_TEMPLATE_ID, [
    "observationDomainId",
    "exportedMessageTotalCount",
    "exportedFlowRecordTotalCount",
    "exportedOctetTotalCount",
    "packetTotalCount",
    "octetTotalCount",
    "ignoredPacketTotalCount",
    "ignoredOctetTotalCount",
    "observationTimeMilliseconds",
    "observationTimeMilliseconds",
], scope_count=1)

INTERFACES_TEMPLATE = Template.from_names(INTERFACES_TEMPLATE_ID, [
    "ingressInterface", "interfaceName", "interfaceDescription"], scope_count=1)

SELECTION_SEQUENCE_TEMPLATE = Template.from_names(SELECTION_SEQUENCE_TEMPLATE_ID, [
    "selectionSequenceId", "observationDomainId", *["selectorId"] * len(SELECTORS)], scope_count=1)

PROPERTY_SELECTOR_TEMPLATE = Template.from_names(PROPERTY_SELECTOR_TEMPLATE_ID, [
    "selectorId", "selectorAlgorithm"], scope_count=1)

RANDOM_SELECTOR_TEMPLATE = Template.from_names(RANDOM_SELECTOR_TEMPLATE_ID, [
    "selectorId", "selectorAlgorithm", "samplingProbability"], scope_count=1)

SELECTION_STATS_TEMPLATE = Template.from_names(SELECTION_STATS_TEMPLATE_ID, [
    "selectionSequenceId", "selectorIdTotalPktsObserved", *["selectorIdTotalPktsSelected"] * len(SELECTORS)],
    scope_count=1)


def reliability_template(exporter_address: IPv4Address | IPv6Address | None = None) -> Template:
    """The exporting-process reliability template; the exporter address is a second scope field when known."""
    scope = ["exportingProcessId"]
    if exporter_address is not None:
        scope.append(f"exporterIPv{exporter_address.version}Address")
    return Template.from_names(RELIABILITY_TEMPLATE_ID, [
        *scope, "notSentFlowTotalCount", "notSentPacketTotalCount", "notSentOctetTotalCount",
        "observationTimeMilliseconds", "observationTimeMilliseconds"], scope_count=len(scope))


def exporter_ip(address: str | IPv4Address | IPv6Address | None) -> IPv4Address | IPv6Address | None:
    """Parse an exporter address; an IPv4-mapped IPv6 address is the IPv4 address it maps."""
    if address is None:
        return None
    ip = ip_address(address)
    if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@dataclass(frozen=True)
class Interface:
    """A metered interface as template 264 names it (description: the link's alias, may be empty)."""

    ifindex: int
    name: str
    description: str = ""

    def __post_init__(self) -> None:
        if not 0 <= self.ifindex <= U32_MAX:
            raise ValueError(f"ifindex {self.ifindex} is not an unsigned 32-bit value")
        # The kernel's own bounds (IFNAMSIZ 16, IFALIASZ 256), with room: a record always fits a message.
        if len(self.name.encode()) > 64:
            raise ValueError(f"interface name {self.name[:70]!r}... longer than 64 bytes")
        if len(self.description.encode()) > 256:
            raise ValueError(f"interface description of {self.name!r} longer than 256 bytes")


@dataclass(frozen=True, kw_only=True)
class ExporterState:
    """The values the options records carry: totals since start, plus metering settings.

    not_sent_*: flow records this collector session lost (send errors, queue
    overflow) and their packet/octet counters; not_sent_first_ms and
    not_sent_last_ms when the first and the latest were lost (0 while none
    was). exported_*: what this session delivered: IPFIX messages, flow
    records, message octets. observed_*: IP packets and octets the metering
    process metered (after selection); ignored_*: selected packets no flow
    record accounts for (malformed IP headers, no free slot), with the window
    they fall in (ignored_first_ms, ignored_last_ms). frames: every frame the
    hooks saw; selected: what was left after each of the three selectors
    (IP, filter rules, sampler), so frames >= selected[0] >= selected[1] >=
    selected[2]. sampling_probability: the sampler's exact probability
    (1.0 when not sampling). Timeouts are seconds, rounded to whole seconds on
    the wire; times are epoch milliseconds.
    """

    not_sent_flows: int
    not_sent_packets: int
    not_sent_octets: int
    exported_messages: int
    exported_flows: int
    exported_octets: int
    observed_packets: int
    observed_octets: int
    ignored_packets: int
    ignored_octets: int
    active_timeout_s: float
    idle_timeout_s: float
    system_init_ms: int
    sampling_interval: int = 1
    sampling_probability: float = 1.0
    ignored_first_ms: int = 0
    ignored_last_ms: int = 0
    not_sent_first_ms: int = 0
    not_sent_last_ms: int = 0
    frames: int = 0
    selected: tuple[int, int, int] = (0, 0, 0)
    interfaces: tuple[Interface, ...] = ()

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("_timeout_s"):
                if not 0 <= round(value) <= U16_MAX:
                    raise ValueError(f"{f.name} {value} does not fit flowActive/IdleTimeout (0..65535 s)")
                continue
            if f.name in ("interfaces", "selected", "sampling_probability"):
                continue
            _check_count(f.name, value, 1 if f.name == "sampling_interval" else 0,
                         U32_MAX if f.name == "sampling_interval" else U64_MAX)
        if not 0.0 < self.sampling_probability <= 1.0:
            raise ValueError(f"sampling_probability {self.sampling_probability} outside (0, 1]")
        if len(self.selected) != len(SELECTORS):
            raise ValueError(f"selected needs a count per selector ({len(SELECTORS)})")
        for i, n in enumerate(self.selected):
            _check_count(f"selected[{i}]", n, 0, U64_MAX)
        chain = [self.frames, *self.selected]
        if any(a < b for a, b in pairwise(chain)):
            raise ValueError(f"a selector cannot select more than it observed: {chain}")


def _check_count(name: str, value: Any, low: int, high: int) -> None:
    try:
        number = operator.index(value)  # ints and numpy integers; a float count is a caller bug
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None
    if not low <= number <= high:
        raise ValueError(f"{name} {value} outside {low}..{high}")


def _varlen(text: str) -> bytes:
    raw = text.encode()
    if len(raw) < _SHORT_STRING:
        return bytes([len(raw)]) + raw
    return struct.pack("!BH", _SHORT_STRING, len(raw)) + raw


def interface_record(iface: Interface) -> bytes:
    """One template-264 record: ingressInterface, then the name and description as variable-length strings."""
    return struct.pack("!I", iface.ifindex) + _varlen(iface.name) + _varlen(iface.description)


class OptionsEncoder:
    """Options templates and records for one encoder (one collector session, one observation domain)."""

    def __init__(
        self,
        data_templates: tuple[Template, ...],
        odid: int,
        exporting_process_id: int = 0,
        exporter_address: str | IPv4Address | IPv6Address | None = None,
    ) -> None:
        if not 0 <= exporting_process_id <= U32_MAX:
            raise ValueError(f"exporting process id {exporting_process_id} is not an unsigned 32-bit value")
        self.odid = odid
        self.exporting_process_id = exporting_process_id
        self.exporter_address = exporter_ip(exporter_address)
        self.reliability = reliability_template(self.exporter_address)
        keys = np.zeros(len(data_templates), dtype=FLOW_KEYS_TEMPLATE.wire_dtype)
        keys["templateId"] = [t.template_id for t in data_templates]
        keys["flowKeyIndicator"] = [t.flow_key_indicator for t in data_templates]
        self._flow_keys = keys.tobytes()
        self._flow_key_count = len(data_templates)
        self._selection = self._fixed(SELECTION_SEQUENCE_TEMPLATE, [SELECTION_SEQUENCE_ID, odid, *SELECTORS])
        self._property = self._fixed(PROPERTY_SELECTOR_TEMPLATE, [SELECTOR_IP, ALGORITHM_PROPERTY_MATCH],
                                     [SELECTOR_FILTER, ALGORITHM_PROPERTY_MATCH])

    @property
    def templates(self) -> tuple[Template, ...]:
        return (CONFIG_TEMPLATE, FLOW_KEYS_TEMPLATE, METERING_TEMPLATE, self.reliability, INTERFACES_TEMPLATE,
                SELECTION_SEQUENCE_TEMPLATE, PROPERTY_SELECTOR_TEMPLATE, RANDOM_SELECTOR_TEMPLATE,
                SELECTION_STATS_TEMPLATE)

    def set_exporter_address(self, address: str | IPv4Address | IPv6Address | None) -> bool:
        """Use another exporter address; True when template 261 changed shape (it must be sent again)."""
        ip = exporter_ip(address)
        if ip == self.exporter_address:
            return False
        old = self.reliability
        self.exporter_address = ip
        self.reliability = reliability_template(ip)
        return self.reliability != old

    @staticmethod
    def _fixed(template: Template, *rows: list[int | float | bytes]) -> RecordGroup:
        rec = np.zeros(len(rows), dtype=template.wire_dtype)
        for i, row in enumerate(rows):
            for key, value in zip(template.keys, row, strict=True):
                rec[i][key] = np.frombuffer(value, dtype=np.uint8) if isinstance(value, bytes) else value
        return fixed_group(template, rec.tobytes(), len(rows))

    def rows(self, state: ExporterState) -> dict[int, list[int | float | bytes]]:
        """The one record of each single-record options template, by template id, values in field order."""
        address = [] if self.exporter_address is None else [self.exporter_address.packed]
        return {
            CONFIG_TEMPLATE_ID: [self.odid, state.sampling_interval, state.sampling_interval,
                                 round(state.active_timeout_s), round(state.idle_timeout_s), state.system_init_ms],
            METERING_TEMPLATE_ID: [self.odid, state.exported_messages, state.exported_flows, state.exported_octets,
                                   state.observed_packets, state.observed_octets, state.ignored_packets,
                                   state.ignored_octets, state.ignored_first_ms, state.ignored_last_ms],
            RELIABILITY_TEMPLATE_ID: [self.exporting_process_id, *address, state.not_sent_flows,
                                      state.not_sent_packets, state.not_sent_octets, state.not_sent_first_ms,
                                      state.not_sent_last_ms],
            RANDOM_SELECTOR_TEMPLATE_ID: [SELECTOR_SAMPLER, ALGORITHM_UNIFORM_PROBABILISTIC,
                                          state.sampling_probability],
            SELECTION_STATS_TEMPLATE_ID: [SELECTION_SEQUENCE_ID, state.frames, *state.selected],
        }

    def groups(self, state: ExporterState, interfaces: bool = False) -> list[RecordGroup]:
        """The options records for `state`, in template order; the interface records only if `interfaces`."""
        rows = self.rows(state)
        out: list[RecordGroup] = []
        for template in self.templates:
            tid = template.template_id
            if tid == FLOW_KEYS_TEMPLATE_ID:
                out.append(fixed_group(template, self._flow_keys, self._flow_key_count))
            elif tid == INTERFACES_TEMPLATE_ID:
                if interfaces:
                    # Variable-length records: each is a run of its own length.
                    out.extend(RecordGroup(template, rec, 1, len(rec))
                               for rec in map(interface_record, state.interfaces))
            elif tid == SELECTION_SEQUENCE_TEMPLATE_ID:
                out.append(self._selection)
            elif tid == PROPERTY_SELECTOR_TEMPLATE_ID:
                out.append(self._property)
            else:
                out.append(self._fixed(template, rows[tid]))
        return out
