"""IPFIX export (RFC 7011): templates and the sans-IO message encoder."""

from exporter.ipfix.encoder import Encoder, benchmark_encode, encode_records
from exporter.ipfix.templates import FLOW_V4, FLOW_V6, Field, Template, ie, template_sets

__all__ = [
    "FLOW_V4",
    "FLOW_V6",
    "Encoder",
    "Field",
    "Template",
    "benchmark_encode",
    "encode_records",
    "ie",
    "template_sets",
]
