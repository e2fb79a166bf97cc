"""The sweep's control probe: `python -m tools.sweep xdp-empty IFNAME [native|generic]` attaches a
program that only returns XDP_PASS, and holds it until SIGTERM.

The `xdp_empty` phase measures what native XDP on the interface costs before any metering: on
veth, attaching any XDP program moves the receive path to NAPI and copies frames that lack XDP
headroom. xdpflow's own overhead is what it costs beyond that.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Sequence

EMPTY_XDP = "int empty(struct xdp_md *ctx) { return XDP_PASS; }\n"


def xdp_empty_main(argv: Sequence[str]) -> int:
    """Attach the XDP_PASS-only program to IFNAME (argv: IFNAME [native|generic]), hold it until SIGTERM."""
    import socket

    from bcc import BPF

    from exporter import logs
    from xdp import bpfsys
    from xdp.headers import find

    logs.configure("warning")
    ifname, mode = (argv[0], argv[1] if len(argv) > 1 else "native")
    flags = 1 << 1 if mode == "generic" else 1 << 2   # XDP_FLAGS_SKB_MODE / XDP_FLAGS_DRV_MODE
    found = find()
    with found.applied():
        prog = BPF(text=EMPTY_XDP.encode(), cflags=["-w", *found.cflags])
    link = -1
    try:
        fd = prog.load_func(b"empty", BPF.XDP).fd
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        link = bpfsys.xdp_link_create(fd, socket.if_nametoindex(ifname), flags)
        print(json.dumps({"event": "attached", "interface": ifname, "mode": mode}), flush=True)
        signal.sigwait({signal.SIGTERM, signal.SIGINT})
    finally:
        if link >= 0:
            os.close(link)   # closing the bpf_link detaches the program
        prog.cleanup()
    return 0
