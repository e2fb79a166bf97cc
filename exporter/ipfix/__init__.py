"""IPFIX export (RFC 7011): templates, options records and the sans-IO message encoder."""

from exporter.ipfix.encoder import (
    SEQUENCE_MODES,
    EncodedTotals,
    Encoder,
    FlowTotals,
    Messages,
    SequenceMode,
    encode_records,
)
from exporter.ipfix.options import (
    CONFIG_TEMPLATE_ID,
    FLOW_KEYS_TEMPLATE_ID,
    METERING_TEMPLATE_ID,
    RELIABILITY_TEMPLATE_ID,
    ExporterState,
)
from exporter.ipfix.templates import BIFLOW_V4, BIFLOW_V6, FLOW_V4, FLOW_V6, Field, Template, ie, template_sets

__all__ = [
    "BIFLOW_V4",
    "BIFLOW_V6",
    "CONFIG_TEMPLATE_ID",
    "FLOW_KEYS_TEMPLATE_ID",
    "FLOW_V4",
    "FLOW_V6",
    "METERING_TEMPLATE_ID",
    "RELIABILITY_TEMPLATE_ID",
    "SEQUENCE_MODES",
    "EncodedTotals",
    "Encoder",
    "ExporterState",
    "Field",
    "FlowTotals",
    "Messages",
    "SequenceMode",
    "Template",
    "encode_records",
    "ie",
    "template_sets",
]
