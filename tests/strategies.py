"""Hypothesis strategies shared by tests of more than one tier."""

from __future__ import annotations

from hypothesis import strategies as st

NETS4 = ["10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "10.1.2.3", "192.0.2.0/24", "0.0.0.0/0", "10.128.0.0/9"]
NETS6 = ["fd00::/8", "fd00:1::/32", "fd00:1::1", "::/0", "2001:db8::/32", "::ffff:0:0/96"]
PORTS = st.one_of(st.integers(0, 65535).map(str),
                  st.tuples(st.integers(0, 70), st.integers(0, 70)).map(lambda t: f"{min(t)}-{max(t)}"))


@st.composite
def rules_st(draw: st.DrawFn) -> str:
    """A filter rule in the documented grammar (docs/operations.md): any selectors, values of both families."""
    parts = [draw(st.sampled_from(["include", "exclude"]))]
    sels = draw(st.lists(st.sampled_from(["src", "dst", "net", "proto", "sport", "dport", "port", "vlan",
                                          "iface"]), unique=True, max_size=3))
    if "net" in sels:
        sels = [s for s in sels if s not in ("src", "dst")] + ["net"]
    if "port" in sels:
        sels = [s for s in sels if s not in ("sport", "dport")] + ["port"]
    fam = draw(st.sampled_from([NETS4, NETS6, NETS4 + NETS6]))
    for s in sels:
        if s in ("src", "dst", "net"):
            vals = draw(st.lists(st.sampled_from(fam), min_size=1, max_size=3))
        elif s == "proto":
            vals = draw(st.lists(st.sampled_from(["tcp", "udp", "icmp", "sctp", "47"]), min_size=1, max_size=2))
            if any(p in sels for p in ("sport", "dport", "port")):
                vals.append("tcp")
        elif s in ("sport", "dport", "port"):
            vals = draw(st.lists(PORTS, min_size=1, max_size=3))
        elif s == "vlan":
            vals = draw(st.lists(st.sampled_from(["0", "1", "5-9", "4095"]), min_size=1, max_size=2))
        else:
            vals = draw(st.lists(st.sampled_from(["lo", "eth*", "7", "gone0"]), min_size=1, max_size=2))
        parts += [s, ",".join(vals)]
    return " ".join(parts)
