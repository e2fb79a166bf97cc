"""The sweep's traffic: one trafgen packet whose UDP ports make `flows` distinct 5-tuples.

trafgen's dinc counters step the source and the destination port on every packet. Their cycle
lengths a and b are coprime, so the port pair repeats only after a x b packets: `flows` distinct
flows, round robin, at whatever rate trafgen is given. One port cycles through at most
MAX_PORT_CYCLE values, so large counts take b > 1 (and may come out a little above `flows`:
profile_flows says how many). The labels (1K, 500K, max) name counts and rates in logs and plots.
"""

from __future__ import annotations

import math

MAX_PORT_CYCLE = 60_000           # longest dinc cycle used for one port


def flow_grid(flows: int) -> tuple[int, int]:
    """Two coprime cycle lengths a x b == flows (or just above) for trafgen's dinc counters."""
    if flows < 1:
        raise ValueError(f"flows must be >= 1, got {flows}")
    if flows <= MAX_PORT_CYCLE:
        return flows, 1
    b = 2
    while True:
        a = -(-flows // b)
        if math.gcd(a, b) == 1 and a <= MAX_PORT_CYCLE:
            return a, b
        b += 1


def _counter(n: int, fixed: int) -> str:
    return f"dinc(1, {n})" if n > 1 else str(fixed)


def trafgen_profile(flows: int, payload: int = 18) -> str:
    """One trafgen packet whose UDP ports step through `flows` distinct pairs (dinc counters).

    Both counters advance on every packet; their cycle lengths are coprime, so
    the (source, destination) port pair repeats only after a x b packets.
    """
    a, b = flow_grid(flows)
    return ("{ eth(da=02:00:00:00:00:02, sa=02:00:00:00:00:01), ipv4(saddr=198.18.0.1, daddr=198.19.0.1), "
            f"udp(sp={_counter(a, 1)}, dp={_counter(b, 53)}), fill(0, {payload}) }}\n")


def profile_flows(flows: int) -> int:
    """How many distinct flows trafgen_profile(flows) really produces."""
    a, b = flow_grid(flows)
    return a * b


def human_count(n: float) -> str:
    """1 -> '1', 1000 -> '1K', 500000 -> '500K', 1000000 -> '1M' (for labels)."""
    for div, unit in ((1_000_000, "M"), (1_000, "K")):
        if n >= div:
            return f"{n / div:g}{unit}"
    return f"{n:g}"


def rate_label(pps: int) -> str:
    return "max" if pps == 0 else f"{human_count(pps)}pps"
