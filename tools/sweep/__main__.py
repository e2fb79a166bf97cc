"""`python -m tools.sweep sink|xdp-empty ...`: the sweep's own children, started by tools.sweep.phase."""

from __future__ import annotations

import sys

from tools.sweep.sink import sink_main
from tools.sweep.xdp_empty import xdp_empty_main

if sys.argv[1:2] == ["sink"]:
    sys.exit(sink_main(sys.argv[2:]))
if sys.argv[1:2] == ["xdp-empty"]:
    sys.exit(xdp_empty_main(sys.argv[2:]))
print("usage: python -m tools.sweep sink [--port N] | xdp-empty IFNAME  (the sweep: xdpflow bench sweep)",
      file=sys.stderr)
sys.exit(2)
