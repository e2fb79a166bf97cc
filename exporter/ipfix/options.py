"""IPFIX options (RFC 7011 section 4): what the exporter says about itself.

Four options templates, each scope count 1, all sent with the data templates:

- 258 metering configuration, scope observationDomainId: samplingInterval and
  samplingPacketInterval (1 = every packet), flowActiveTimeout, flowIdleTimeout
  (seconds), systemInitTimeMilliseconds. Collectors read the sampling rate from
  here; goflow2 and Akvorado drop flows without one.
- 259 flow keys (RFC 7011 4.4), scope templateId: flowKeyIndicator, one record
  per data template.
- 260 metering process statistics (RFC 7011 4.1 and 4.2), scope
  observationDomainId: exportedMessageTotalCount, exportedFlowRecordTotalCount,
  exportedOctetTotalCount as 4.1 lists them; packetTotalCount and
  octetTotalCount for the traffic the metering process observed (the IANA
  total counters; YAF reports its process totals the same way); and
  ignoredPacketTotalCount, ignoredOctetTotalCount (4.2).
- 261 exporting process reliability (RFC 7011 4.3), scope exportingProcessId,
  the scope 4.3 names (an Exporting Process is not an Observation Domain, and
  each collector session is its own Exporting Process, RFC 7011 10):
  notSentFlowTotalCount, notSentPacketTotalCount, notSentOctetTotalCount, then
  exporterIPv4Address or exporterIPv6Address when the address is known.

Every counter is a total since the process started, never a per-interval delta.
RFC 7011 4.2 and 4.3 also suggest first/last-loss times as a pair of
observationTime* fields; they are left out (a template here never repeats an
element).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, fields
from ipaddress import IPv4Address, IPv6Address, ip_address

import numpy as np

from exporter.ipfix.templates import Template

CONFIG_TEMPLATE_ID = 258
FLOW_KEYS_TEMPLATE_ID = 259
METERING_TEMPLATE_ID = 260
RELIABILITY_TEMPLATE_ID = 261

U16_MAX = (1 << 16) - 1
U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1

RecordGroup = tuple[Template, bytes | memoryview, int]
"""(template, its records back to back, record count): one run of records for the encoder to cut into sets."""

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
], scope_count=1)

_RELIABILITY_NAMES = ["exportingProcessId", "notSentFlowTotalCount", "notSentPacketTotalCount",
                      "notSentOctetTotalCount"]


def reliability_template(exporter_address: IPv4Address | IPv6Address | None = None) -> Template:
    """The exporting-process reliability template, with the exporter address field when it is known."""
    names = list(_RELIABILITY_NAMES)
    if exporter_address is not None:
        names.append(f"exporterIPv{exporter_address.version}Address")
    return Template.from_names(RELIABILITY_TEMPLATE_ID, names, scope_count=1)


def exporter_ip(address: str | IPv4Address | IPv6Address | None) -> IPv4Address | IPv6Address | None:
    """Parse an exporter address; an IPv4-mapped IPv6 address is the IPv4 address it maps."""
    if address is None:
        return None
    ip = ip_address(address)
    if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@dataclass(frozen=True, kw_only=True)
class ExporterState:
    """The values the options records carry: totals since start, plus metering settings.

    not_sent_*: flow records this collector session lost (send errors, queue
    overflow) and their packet/octet counters. exported_*: what this session
    delivered: IPFIX messages, flow records, message octets. observed_*: packets
    and octets the metering process (the XDP program) saw; ignored_* is the part
    of them that no flow record accounts for, so exported traffic + ignored =
    observed once the flow table has drained. Timeouts are seconds, rounded to
    whole seconds on the wire; system_init_ms is epoch milliseconds.
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

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("_timeout_s"):
                if not 0 <= round(value) <= U16_MAX:
                    raise ValueError(f"{f.name} {value} does not fit flowActive/IdleTimeout (0..65535 s)")
                continue
            try:
                number = operator.index(value)  # ints and numpy integers; a float count is a caller bug
            except TypeError:
                raise TypeError(f"{f.name} must be an integer, got {value!r}") from None
            low, high = (1, U32_MAX) if f.name == "sampling_interval" else (0, U64_MAX)
            if not low <= number <= high:
                raise ValueError(f"{f.name} {value} outside {low}..{high}")


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
        self.templates: tuple[Template, ...] = (CONFIG_TEMPLATE, FLOW_KEYS_TEMPLATE, METERING_TEMPLATE,
                                                reliability_template(self.exporter_address))
        keys = np.zeros(len(data_templates), dtype=FLOW_KEYS_TEMPLATE.wire_dtype)
        keys["templateId"] = [t.template_id for t in data_templates]
        keys["flowKeyIndicator"] = [t.flow_key_indicator for t in data_templates]
        self._flow_keys = keys.tobytes()
        self._flow_key_count = len(data_templates)

    def values(self, state: ExporterState) -> dict[str, int | bytes]:
        """Every options field by IANA name (addresses as packed bytes)."""
        out: dict[str, int | bytes] = {
            "observationDomainId": self.odid,
            "exportingProcessId": self.exporting_process_id,
            "samplingInterval": state.sampling_interval,
            "samplingPacketInterval": state.sampling_interval,
            "flowActiveTimeout": round(state.active_timeout_s),
            "flowIdleTimeout": round(state.idle_timeout_s),
            "systemInitTimeMilliseconds": state.system_init_ms,
            "exportedMessageTotalCount": state.exported_messages,
            "exportedFlowRecordTotalCount": state.exported_flows,
            "exportedOctetTotalCount": state.exported_octets,
            "packetTotalCount": state.observed_packets,
            "octetTotalCount": state.observed_octets,
            "ignoredPacketTotalCount": state.ignored_packets,
            "ignoredOctetTotalCount": state.ignored_octets,
            "notSentFlowTotalCount": state.not_sent_flows,
            "notSentPacketTotalCount": state.not_sent_packets,
            "notSentOctetTotalCount": state.not_sent_octets,
        }
        if self.exporter_address is not None:
            out[f"exporterIPv{self.exporter_address.version}Address"] = self.exporter_address.packed
        return out

    def groups(self, state: ExporterState) -> list[RecordGroup]:
        """The options records for `state`, one group per options template, in template id order."""
        values = self.values(state)
        out: list[RecordGroup] = []
        for template in self.templates:
            if template is FLOW_KEYS_TEMPLATE:
                out.append((template, self._flow_keys, self._flow_key_count))
                continue
            rec = np.zeros(1, dtype=template.wire_dtype)
            for name in template.names:
                value = values[name]
                rec[name] = np.frombuffer(value, dtype=np.uint8) if isinstance(value, bytes) else value
            out.append((template, rec.tobytes(), 1))
        return out
