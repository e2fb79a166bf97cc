"""notSent* accounting without a kernel or a collector: the encoder gives each message its flow
totals, the scan hands them to the sender as the messages' tags, and the sender reports the tags
of what it did not deliver back to the export, which adds them up; no message is decoded again."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from structlog.testing import capture_logs

from exporter.ipfix.encoder import Encoder, FlowTotals
from exporter.service import Export
from exporter.transport import StreamOptions, TcpSender, UdpSender, parse_endpoint
from tools.synthetic import random_records

NOW = 1_700_000_000.0


@pytest.fixture(autouse=True)
def _quiet_logs() -> Iterator[None]:
    with capture_logs():
        yield


@pytest.mark.parametrize("scheme", ["udp", "tcp"])
@pytest.mark.parametrize("compiled", [False, None])
def test_what_is_not_delivered_is_accounted_by_its_totals(scheme: str, compiled: bool | None) -> None:
    recs = random_records(3000, seed=5, ipv6_share=0.3)

    async def go() -> Export:
        export = Export(Encoder(mtu=1400, compiled=compiled))
        endpoint = parse_endpoint(f"{scheme}://127.0.0.1:9")
        # Never opened: UDP fails every message at once; TCP queues 10 and drops the rest, then
        # close() fails what is left.
        export.sender = (UdpSender(endpoint, on_not_sent=export.lost) if scheme == "udp" else
                         TcpSender(endpoint, on_not_sent=export.lost, options=StreamOptions(queue_messages=10)))
        export.sender.send([export.encoder.templates_message(NOW)], [0])   # untagged: counted, not reported
        msgs = export.encoder.encode(recs, NOW)
        export.sender.send(msgs, msgs.flows, msgs.totals)
        await export.sender.close(timeout=0)
        return export

    export = asyncio.run(go())
    assert export.not_sent == FlowTotals(len(recs), int(recs["packets"].sum()), int(recs["octets"].sum()))
    assert export.sender.stats.records_not_sent == len(recs)
    assert 0 < export.not_sent_first_ms <= export.not_sent_last_ms
