"""`--sequence-mode rfc|nfdump` end to end: which collector reads which dialect.

RFC 7011 counts every data record in the header's sequence number, options data records
included (`rfc`, the default); nfcapd counts only flow records and reports "sequence failures"
otherwise (`nfdump`). One exporter per mode sends the same traffic, at once, to nfcapd and to two
built-in collectors (`xdpflow collect`): one counting options records (its default, the RFC's
reading), one with `--no-count-options` (nfcapd's). The collector whose reading matches the mode
sees no gap; the other sees gaps of exactly the options records each message carries. Every
collector stores every flow either way: the dialect only changes the loss report.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

import pytest

from exporter.ipfix.options import INTERFACES_TEMPLATE_ID, METERING_TEMPLATE_ID
from tests.interop.collecting import (
    expected_totals,
    key_totals,
    nfcapd_sequence_errors,
    nfcapd_totals,
    send_batches,
)
from tools.external import Nfcapd
from tools.netns import VethPair
from tools.packets import standard_mix

NFCAPD_PORT = 9995
COUNTING_PORT = 4739      # xdpflow collect: options records count (RFC 7011)
NOT_COUNTING_PORT = 4740  # xdpflow collect --no-count-options (nfcapd's reading)


def collected(stdout: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(flow records, options records) from `xdpflow collect --json` output."""
    recs = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return [r for r in recs if not r["_options"]], [r for r in recs if r["_options"]]


@pytest.mark.kernel
@pytest.mark.interop
@pytest.mark.parametrize("mode", ["rfc", "nfdump"])
def test_sequence_mode_dialects(veth: VethPair, xdpflow_proc: Any, mode: str) -> None:
    batches = [standard_mix(), standard_mix()]
    want = expected_totals(batches)
    n_flows = sum(len(b) for b in batches)

    with Nfcapd(NFCAPD_PORT, netns=veth.obs) as nf:
        counting = xdpflow_proc(veth.obs, "collect", "--listen", f"127.0.0.1:{COUNTING_PORT}", "--json")
        not_counting = xdpflow_proc(veth.obs, "collect", "--listen", f"127.0.0.1:{NOT_COUNTING_PORT}", "--json",
                                    "--no-count-options")
        counting.wait_for("listening")
        not_counting.wait_for("listening")
        p = xdpflow_proc(veth.obs, "run", "--interface", veth.obs_if, "--sequence-mode", mode,
                         "--collector", f"udp://127.0.0.1:{NFCAPD_PORT}",
                         "--collector", f"udp://127.0.0.1:{COUNTING_PORT}",
                         "--collector", f"udp://127.0.0.1:{NOT_COUNTING_PORT}",
                         "--scan-interval", "0.5", "--idle-timeout", "1", "--active-timeout", "60",
                         "--max-entries", "4096", "--log-level", "debug")
        p.wait_ready()
        # Two batches exported by two different scans: flow records in several messages, each
        # message after the first preceded by one carrying options records.
        send_batches(veth, p, batches)
        rc, _ = p.stop()
        assert rc == 0, p.logs
        time.sleep(0.5)  # let the collectors read what is still in their socket buffers
        outputs = {}
        for name, c in (("counting", counting), ("not_counting", not_counting)):
            crc, out = c.stop()
            assert crc == 0, c.logs
            outputs[name] = (out, c.events("summary")[0], c.events("sequence gap"))
        nf_log = nf.stop()
        nf_flows = nf.flows()
        nf_stat = nf.stat_text()

    stopped = p.events("stopped")[0]
    assert stopped["records_exported"] == n_flows
    assert all(st["records"] == n_flows and st["not_sent_flows"] == 0 for st in stopped["sent"].values()), stopped

    # nfcapd stores every flow, exactly, in both modes; only the nfdump dialect keeps its
    # sequence check quiet ("Sequence Errors" when it exits, "Sequence failures" in the file).
    assert len(nf_flows) == n_flows
    assert nfcapd_totals(nf_flows) == want
    at_exit, in_file = nfcapd_sequence_errors(nf_log, nf_stat)
    if mode == "nfdump":
        assert (at_exit, in_file) == (0, 0), nf_log
    else:
        assert at_exit > 0 and in_file > 0, (nf_log, nf_stat)
        assert at_exit == in_file

    # The built-in collector, both readings: every flow exactly, nothing malformed or unknown.
    matching = "counting" if mode == "rfc" else "not_counting"
    for name, (out, summary, gaps) in outputs.items():
        flows, options = collected(out)
        assert len(flows) == n_flows, name
        assert key_totals(flows) == want, name
        assert summary["records"] == len(flows) + len(options) and summary["options_records"] == len(options)
        assert summary["malformed"] == 0 and summary["unknown_template_sets"] == 0, (name, summary)
        if name == matching:
            assert summary["gaps"] == 0 and gaps == [], (name, mode, summary, gaps)
        else:
            # Off by exactly the options records of the message before: +k when the exporter
            # counts them and the collector does not, -k the other way round.
            assert summary["gaps"] > 0 and len(gaps) == summary["gaps"], (name, mode, summary)
            sign = 1 if mode == "rfc" else -1
            per_message = Counter(r["_sequence"] for r in options)
            if mode == "rfc":
                # Options counted: every message's sequence is its own, so the one before is known.
                for g in gaps:
                    before = max(seq for seq in per_message if seq < g["received"])
                    assert g["delta"] == sign * per_message[before], (g, per_message)
            else:
                # Options not counted: an options-only message shares its sequence with the next
                # one, so messages cannot be told apart by it. Every message carries one metering
                # record and the same scan options; the templates' messages add the name of the one interface.
                messages = sum(r["_template_id"] == METERING_TEMPLATE_ID for r in options)
                names = sum(r["_template_id"] == INTERFACES_TEMPLATE_ID for r in options)
                scan, rest = divmod(len(options) - names, messages)
                assert rest == 0 and names > 0, (len(options), names, messages)
                assert {-g["delta"] for g in gaps} <= {scan, scan + 1}, (gaps, scan)
