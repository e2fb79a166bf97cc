"""Filter rules: a small readable syntax, parsed here and compiled to the XDP program's tables.

One rule per string; words are separated by spaces, keywords are case-insensitive:

    RULE      := ACTION [all] SELECTOR...
    ACTION    := include | exclude
    SELECTOR  := src CIDRS | dst CIDRS | net CIDRS     net: source or destination
               | proto PROTOS                          tcp udp sctp icmp icmpv6 gre esp ah igmp, or 0..255
               | sport PORTS | dport PORTS | port PORTS   N or LO-HI; port: source or destination
               | vlan VLANS                            N or LO-HI, 0..4095 (outer tag; 0: untagged)
               | iface IFACES                          name, glob (veth*) or ifindex
    a list    := VALUE[,VALUE...]                      any one of them

    exclude dst 10.0.0.0/8
    include proto tcp dport 443
    exclude src fd00::/8 vlan 100
    exclude iface eth1
    include sport 1000-2000
    exclude net 192.0.2.0/24,2001:db8::/32 port 22,53

Semantics:
- A rule matches a packet when every selector it has matches (a selector with a list matches any
  value in it). A rule without selectors (`exclude all`) matches every IP packet.
- Rules are tried in order; the first that matches decides: include meters the packet, exclude
  passes it on unmetered. When none matches, the packet is included, unless the list has an
  include rule: then it is excluded (a list of includes says what to meter, nothing else).
- Addresses: an IPv4 CIDR matches IPv4 packets only; an IPv6 CIDR matches IPv6 packets and, when
  it covers the IPv4-mapped range ::ffff:0:0/96 the program keys IPv4 addresses in, IPv4 ones too
  (::/0 matches every packet, 0.0.0.0/0 every IPv4 packet). A bare address is a /32 or /128.
  Longest-prefix tables (LPM tries) keep thousands of CIDRs cheap: list them in one rule.
- Ports: sport/dport/port match only TCP, UDP and SCTP packets that carry ports (not ICMP, not
  non-first fragments). ICMP type/code are not ports here.
- vlan: the outer tag's VID; vlan 0 matches untagged (and priority-tagged) frames.
- iface: the ingress interface. Names and globs are looked up in xdpflow's network namespace when
  rules are applied (at start, on SIGHUP, and again whenever interfaces come or go); a name that
  does not exist then matches nothing.
- Filters apply to IP packets; frames that are not IP or do not parse are counted as before.
  Excluded packets are counted per rule and in the kernel's `filtered` counter, never in a flow.

Compilation. Each rule becomes one match slot (a bit of a 64-bit mask), a rule with `net` or `port`
two (source / destination), with both four. Every selector dimension gets a table from a packet's
value to the slots that accept it (a slot without a constraint there accepts every value): LPM tries
for source and destination addresses (each prefix carries its own slots and those of every shorter
prefix containing it, so the longest match alone gives the answer), arrays for protocol, ports and
VLAN, a hash for interfaces. The kernel ANDs the masks of the dimensions in use; the lowest set
bit is the first matching rule. See xdp/flow.h.
"""

from __future__ import annotations

import difflib
import fnmatch
import ipaddress
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Address, IPv6Network

import numpy as np
import numpy.typing as npt

# Mirrors of xdp/flow.h (tests/unit/test_filter_rules.py holds them equal).
MAX_SLOTS = 64
COUNTER_SLOTS = 65
NO_MATCH_SLOT = 64
MAX_PREFIXES = 16384
PORT_SLOTS = 65537
NO_PORT = 65536
VLAN_SLOTS = 4096
PROTO_SLOTS = 256
IFINDEX_SLOTS = 4096
MAX_IFACES = 1024

SEL_SRC = 1 << 0
SEL_DST = 1 << 1
SEL_PROTO = 1 << 2
SEL_SPORT = 1 << 3
SEL_DPORT = 1 << 4
SEL_VLAN = 1 << 5
SEL_IFACE = 1 << 6
FILTER = 1 << 8
SAMPLE = 1 << 9

ACTIONS = ("include", "exclude")
SELECTORS = ("src", "dst", "net", "proto", "sport", "dport", "port", "vlan", "iface")
PROTOCOLS = {"icmp": 1, "igmp": 2, "tcp": 6, "udp": 17, "gre": 47, "esp": 50, "ah": 51, "icmpv6": 58,
             "ipv6-icmp": 58, "sctp": 132}
PORT_PROTOCOLS = frozenset({6, 17, 132})
MAPPED = IPv6Network("::ffff:0:0/96")
ALL6 = IPv6Network("::/0")

Range = tuple[int, int]
Masks = npt.NDArray[np.uint64]


class FilterError(ValueError):
    """One operator-facing line: what is wrong with a rule (or with the list as a whole)."""

    def __init__(self, problem: str, index: int | None = None, rule: str | None = None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.index = index
        self.rule = rule

    def __str__(self) -> str:
        if self.index is None:
            return f"filters: {self.problem}"
        return f"filter rule {self.index + 1} {_q(self.rule or '', 80)}: {self.problem}"


def _q(text: str, limit: int = 40) -> str:
    """A word of a rule, quoted so that no control character or line break reaches an error line."""
    shown = text if len(text) <= limit else text[: limit - 3] + "..."
    return json.dumps(shown)


def _suggest(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word.lower(), choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


@dataclass(frozen=True)
class Rule:
    """One parsed rule. None: no constraint on that dimension."""

    text: str
    action: str
    src: tuple[IPv6Network, ...] | None = None
    dst: tuple[IPv6Network, ...] | None = None
    net: tuple[IPv6Network, ...] | None = None
    proto: frozenset[int] | None = None
    sport: tuple[Range, ...] | None = None
    dport: tuple[Range, ...] | None = None
    port: tuple[Range, ...] | None = None
    vlan: tuple[Range, ...] | None = None
    iface: tuple[str, ...] | None = None

    @property
    def exclude(self) -> bool:
        return self.action == "exclude"

    @property
    def slots(self) -> int:
        """Match slots (kernel mask bits) this rule takes."""
        return (2 if self.net is not None else 1) * (2 if self.port is not None else 1)


# -- parsing -----------------------------------------------------------------------------------------

def _cidr(word: str) -> IPv6Network:
    """A CIDR or bare address as the IPv6 network of the kernel's key space (IPv4 mapped)."""
    addr, sep, plen = word.partition("/")
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        raise FilterError(f"{_q(word)} is not an IPv4 or IPv6 address or CIDR") from None
    width = 32 if ip.version == 4 else 128
    if sep and not (re.fullmatch(r"[0-9]{1,3}", plen) and int(plen) <= width):
        raise FilterError(f"{_q(word)}: the prefix length must be 0..{width} for IPv{ip.version}")
    try:
        net = ipaddress.ip_network(word, strict=True)
    except ValueError:
        loose = ipaddress.ip_network(word, strict=False)
        raise FilterError(f"{_q(word)} has host bits set; the network is {loose}") from None
    if isinstance(net, IPv4Network):
        base = IPv6Address(int(MAPPED.network_address) | int(net.network_address))
        return IPv6Network((base, 96 + net.prefixlen))
    return IPv6Network((int(net.network_address), net.prefixlen))


def _number(word: str, lo: int, hi: int, what: str) -> int:
    if not re.fullmatch(r"[0-9]{1,10}", word):
        raise FilterError(f"{_q(word)} is not a {what} ({lo}..{hi})")
    n = int(word)
    if not lo <= n <= hi:
        raise FilterError(f"{what} {n} is out of range; allowed {lo}..{hi}")
    return n


def _range(word: str, hi: int, what: str) -> Range:
    a, sep, b = word.partition("-")
    if not sep:
        n = _number(word, 0, hi, what)
        return n, n
    if not a or not b:
        raise FilterError(f"{_q(word)} is not a {what} or a range LO-HI (0..{hi})")
    lo_n, hi_n = _number(a, 0, hi, what), _number(b, 0, hi, what)
    if lo_n > hi_n:
        raise FilterError(f"range {_q(word)} starts above its end")
    return lo_n, hi_n


def _proto(word: str) -> int:
    if word.isdigit():
        return _number(word, 0, 255, "protocol number")
    p = PROTOCOLS.get(word.lower())
    if p is None:
        names = ", ".join(n for n in PROTOCOLS if n != "ipv6-icmp")
        raise FilterError(f"unknown protocol {_q(word)}{_suggest(word, list(PROTOCOLS))}; names: {names}, "
                          "or a number 0..255")
    return p


_IFNAME = re.compile(r"[^\s/:,]{1,15}")
_IFGLOB = re.compile(r"[^\s/:,]{1,64}")


def is_glob(name: str) -> bool:
    """An interface name pattern (`veth*`, fnmatch syntax) rather than a name: the one definition,
    used by filter rules, the config and the interface watcher alike."""
    return any(c in "*?[" for c in name)


def _iface(word: str) -> str:
    if word.isdigit():
        return str(_number(word, 1, 0xFFFFFFFF, "interface index"))
    if not (_IFGLOB if is_glob(word) else _IFNAME).fullmatch(word):
        raise FilterError(f"{_q(word)} is not an interface name (1..15 characters, no spaces, '/' or ':'), "
                          "glob (veth*) or index")
    return word


_EXAMPLES = {"src": "src 10.0.0.0/8", "dst": "dst 2001:db8::/32", "net": "net 192.0.2.0/24",
             "proto": "proto tcp,udp", "sport": "sport 1000-2000", "dport": "dport 443", "port": "port 22,53",
             "vlan": "vlan 100", "iface": "iface eth1"}


def parse_rule(text: object) -> Rule:
    """Parse one rule; a FilterError (without index) says what is wrong."""
    if not isinstance(text, str):
        raise FilterError('a rule is a string such as "exclude dst 10.0.0.0/8"')
    words = re.sub(r"\s*,\s*", ",", text.strip()).split()
    if not words:
        raise FilterError("empty rule; write include or exclude, then selectors (e.g. exclude dst 10.0.0.0/8)")
    action = words[0].lower()
    if action not in ACTIONS:
        raise FilterError(f"starts with {_q(words[0])}{_suggest(words[0], ACTIONS)}; a rule starts with "
                          "include or exclude")
    rest = words[1:]
    if rest and rest[0].lower() == "all":
        rest = rest[1:]
        if rest:
            raise FilterError('"all" matches every packet and takes no selectors; drop it or the selectors')
    values: dict[str, object] = {}
    i = 0
    while i < len(rest):
        sel = rest[i].lower()
        if sel not in SELECTORS:
            raise FilterError(f"unknown selector {_q(rest[i])}{_suggest(rest[i], SELECTORS)}; "
                              f"selectors: {', '.join(SELECTORS)}")
        if sel in values:
            raise FilterError(f"{sel} given twice; list several values with commas ({sel} A,B)")
        if i + 1 >= len(rest) or rest[i + 1].lower() in SELECTORS:
            raise FilterError(f"{sel} needs a value, e.g. {_EXAMPLES[sel]}")
        items = rest[i + 1].split(",")
        if not all(items):
            raise FilterError(f"empty item in the {sel} list {_q(rest[i + 1])}")
        if sel in ("src", "dst", "net"):
            values[sel] = tuple(dict.fromkeys(_cidr(w) for w in items))
        elif sel == "proto":
            values[sel] = frozenset(_proto(w) for w in items)
        elif sel in ("sport", "dport", "port"):
            values[sel] = tuple(_range(w, 65535, "port") for w in items)
        elif sel == "vlan":
            values[sel] = tuple(_range(w, 4095, "VLAN id") for w in items)
        else:
            values[sel] = tuple(dict.fromkeys(_iface(w) for w in items))
        i += 2
    if "net" in values and ("src" in values or "dst" in values):
        raise FilterError("net means src or dst and cannot be combined with them in one rule; write two rules")
    if "port" in values and ("sport" in values or "dport" in values):
        raise FilterError("port means sport or dport and cannot be combined with them in one rule; "
                          "write two rules")
    proto = values.get("proto")
    ports = [s for s in ("sport", "dport", "port") if s in values]
    if ports and isinstance(proto, frozenset) and not proto & PORT_PROTOCOLS:
        raise FilterError(f"{ports[0]} matches TCP, UDP and SCTP packets only; with this proto no packet "
                          "can match")
    src, dst = values.get("src"), values.get("dst")
    if isinstance(src, tuple) and isinstance(dst, tuple):
        fs, fd = _families(src), _families(dst)
        if not fs & fd:
            raise FilterError(f"src is IPv{min(fs)} only and dst IPv{min(fd)} only: no packet can match")
    return Rule(text=" ".join(words), action=action, **values)  # type: ignore[arg-type]


def _families(nets: Sequence[IPv6Network]) -> set[int]:
    """IP versions the networks can match."""
    out: set[int] = set()
    for n in nets:
        if n.subnet_of(MAPPED):
            out.add(4)
        elif MAPPED.subnet_of(n):
            out |= {4, 6}
        else:
            out.add(6)
    return out


def check_rules(texts: Sequence[object]) -> tuple[list[Rule], list[FilterError]]:
    """Parse every rule: those that parse, and one error per problem (index and rule filled in)."""
    rules: list[Rule] = []
    errors: list[FilterError] = []
    for i, text in enumerate(texts):
        try:
            rules.append(parse_rule(text))
        except FilterError as e:
            errors.append(FilterError(e.problem, i, text if isinstance(text, str) else repr(text)))
    if errors:
        return rules, errors
    slots = sum(r.slots for r in rules)
    if slots > MAX_SLOTS:
        errors.append(FilterError(f"the rules need {slots} match slots, at most {MAX_SLOTS} (a rule takes one; "
                                  "with net or port two, with both four); merge rules by listing values "
                                  "(dst A,B,C)"))
    for direction in ("src", "dst"):
        n = len(_prefix_set(rules, direction)) - 1
        if n > MAX_PREFIXES - 1:
            errors.append(FilterError(f"the rules name {n} distinct {direction} prefixes, at most "
                                      f"{MAX_PREFIXES - 1} (net counts in both directions)"))
    return rules, errors


def parse_rules(texts: Sequence[object]) -> list[Rule]:
    """Parse a rule list; raise the first FilterError."""
    rules, errors = check_rules(texts)
    if errors:
        raise errors[0]
    return rules


def _prefix_set(rules: Sequence[Rule], direction: str) -> set[IPv6Network]:
    out = {ALL6}
    for r in rules:
        for nets in (getattr(r, direction), r.net):
            if nets is not None:
                out.update(nets)
    return out


# -- compilation ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Term:
    """One match slot: a conjunction with one value list per dimension (None: any)."""

    rule: int
    src: tuple[IPv6Network, ...] | None
    dst: tuple[IPv6Network, ...] | None
    proto: frozenset[int] | None
    sport: tuple[Range, ...] | None
    dport: tuple[Range, ...] | None
    vlan: tuple[Range, ...] | None
    iface: tuple[str, ...] | None


def _terms(index: int, r: Rule) -> list[_Term]:
    addrs = [(r.src, r.dst)] if r.net is None else [(r.net, None), (None, r.net)]
    ports = [(r.sport, r.dport)] if r.port is None else [(r.port, None), (None, r.port)]
    return [_Term(index, s, d, r.proto, sp, dp, r.vlan, r.iface) for s, d in addrs for sp, dp in ports]


@dataclass
class Tables:
    """A compiled rule list: what the kernel's rule set and its tables hold (xdp/flow.h)."""

    rules: tuple[Rule, ...] = ()
    slot_rule: tuple[int, ...] = ()            # match slot -> index of its rule
    flags: int = 0
    slots: int = 0                             # mask of the slots in use
    exclude: int = 0                           # mask of the slots of exclude rules
    default_exclude: bool = False
    src: dict[IPv6Network, int] = field(default_factory=dict)  # prefix -> slots, closed over shorter prefixes
    dst: dict[IPv6Network, int] = field(default_factory=dict)
    proto: Masks | None = None                 # (256,) slots by protocol
    sport: Masks | None = None                 # (65537,) slots by port; [NO_PORT]: a packet without ports
    dport: Masks | None = None
    vlan: Masks | None = None                  # (4096,)
    iface: dict[int, int] = field(default_factory=dict)  # ifindex -> slots
    iface_any: int = 0                         # slots accepting an interface no iface entry names
    src_any: int = 0                           # slots without a src constraint
    dst_any: int = 0                           # slots without a dst constraint
    iface_resolved: dict[str, tuple[int, ...]] = field(default_factory=dict)  # iface value -> ifindexes used
    unresolved: tuple[str, ...] = ()           # iface names that matched no interface

    def default_action(self) -> str:
        return "exclude" if self.default_exclude else "include"


def _closed(prefixes: Mapping[IPv6Network, int]) -> dict[IPv6Network, int]:
    """Give every prefix the slots of every shorter prefix containing it (the LPM trie returns the longest)."""
    lengths = sorted({n.prefixlen for n in prefixes})
    out: dict[IPv6Network, int] = {}
    for net, mask in prefixes.items():
        m = mask
        base = int(net.network_address)
        for plen in lengths:
            if plen >= net.prefixlen:
                break
            anc = IPv6Network(((base >> (128 - plen)) << (128 - plen), plen))
            m |= prefixes.get(anc, 0)
        out[net] = m
    return out


def _range_table(size: int, terms: Sequence[_Term], values: Callable[[_Term], tuple[Range, ...] | None],
                 none_index: int | None = None) -> Masks:
    table = np.zeros(size, dtype=np.uint64)
    for slot, t in enumerate(terms):
        bit = np.uint64(1 << slot)
        ranges = values(t)
        if ranges is None:
            table |= bit
            continue
        for lo, hi in ranges:
            table[lo:hi + 1] |= bit
    if none_index is not None:  # a packet without the value: only slots without a constraint accept it
        table[none_index] = np.uint64(sum(1 << s for s, t in enumerate(terms) if values(t) is None))
    return table


def interfaces_now() -> dict[str, int]:
    """name -> ifindex of the interfaces of this network namespace."""
    import socket

    return {name: index for index, name in socket.if_nameindex()}


def resolve_ifaces(rules: Sequence[Rule], links: Mapping[str, int]) -> tuple[dict[str, tuple[int, ...]], list[str]]:
    """Each iface value -> the ifindexes it names in `links`; and the names that match nothing."""
    out: dict[str, tuple[int, ...]] = {}
    missing: list[str] = []
    for r in rules:
        for v in r.iface or ():
            if v in out:
                continue
            if v.isdigit():
                out[v] = (int(v),)
            elif is_glob(v):
                out[v] = tuple(sorted(i for n, i in links.items() if fnmatch.fnmatchcase(n, v)))
            elif v in links:
                out[v] = (links[v],)
            else:
                out[v] = ()
                missing.append(v)
    return out, missing


def uses_iface_names(rules: Sequence[Rule]) -> bool:
    return any(not v.isdigit() for r in rules for v in r.iface or ())


def compile_rules(rules: Sequence[Rule], links: Mapping[str, int] | None = None) -> Tables:
    """The kernel tables for `rules`; `links` (name -> ifindex) resolves iface names (default: now)."""
    if not rules:
        return Tables()
    terms = [t for i, r in enumerate(rules) for t in _terms(i, r)]
    if len(terms) > MAX_SLOTS:
        raise FilterError(f"the rules need {len(terms)} match slots, at most {MAX_SLOTS}")
    tb = Tables(rules=tuple(rules), slot_rule=tuple(t.rule for t in terms), flags=FILTER)
    tb.slots = (1 << len(terms)) - 1
    tb.exclude = sum(1 << s for s, t in enumerate(terms) if rules[t.rule].exclude)
    tb.default_exclude = any(not r.exclude for r in rules)

    def used(attr: str) -> bool:
        return any(getattr(t, attr) is not None for t in terms)

    tb.src_any = sum(1 << s for s, t in enumerate(terms) if t.src is None)
    tb.dst_any = sum(1 << s for s, t in enumerate(terms) if t.dst is None)

    for attr, flag in (("src", SEL_SRC), ("dst", SEL_DST)):
        if not used(attr):
            continue
        tb.flags |= flag
        raw: dict[IPv6Network, int] = {ALL6: 0}
        for s, t in enumerate(terms):
            for n in getattr(t, attr) or (ALL6,):
                raw[n] = raw.get(n, 0) | 1 << s
        if len(raw) > MAX_PREFIXES:
            raise FilterError(f"the rules name {len(raw) - 1} distinct {attr} prefixes, at most {MAX_PREFIXES - 1}")
        setattr(tb, attr, _closed(raw))
    if used("proto"):
        tb.flags |= SEL_PROTO
        proto = np.zeros(PROTO_SLOTS, dtype=np.uint64)
        for s, t in enumerate(terms):
            for p in t.proto if t.proto is not None else range(PROTO_SLOTS):
                proto[p] |= np.uint64(1 << s)
        tb.proto = proto
    if used("sport"):
        tb.flags |= SEL_SPORT
        tb.sport = _range_table(PORT_SLOTS, terms, lambda t: t.sport, NO_PORT)
    if used("dport"):
        tb.flags |= SEL_DPORT
        tb.dport = _range_table(PORT_SLOTS, terms, lambda t: t.dport, NO_PORT)
    if used("vlan"):
        tb.flags |= SEL_VLAN
        tb.vlan = _range_table(VLAN_SLOTS, terms, lambda t: t.vlan)
    if used("iface"):
        tb.flags |= SEL_IFACE
        resolved, missing = resolve_ifaces(rules, interfaces_now() if links is None else links)
        tb.iface_any = sum(1 << s for s, t in enumerate(terms) if t.iface is None)
        for s, t in enumerate(terms):
            for v in t.iface or ():
                for ifindex in resolved[v]:
                    tb.iface[ifindex] = tb.iface.get(ifindex, tb.iface_any) | 1 << s
        high = sum(1 for i in tb.iface if i >= IFINDEX_SLOTS)
        if high > MAX_IFACES:
            raise FilterError(f"iface selectors name {high} interfaces with an index >= {IFINDEX_SLOTS}, "
                              f"at most {MAX_IFACES}")
        tb.iface_resolved = resolved
        tb.unresolved = tuple(missing)
    return tb


def sample_threshold(n: int) -> int:
    """Meter a packet when a uniform 32-bit random number is below this: probability 1/n (within 2^-33)."""
    if n < 1:
        raise ValueError(f"sampling interval must be >= 1, got {n}")
    return min((1 << 32) - 1, round((1 << 32) / n))


def sampling_probability(n: int) -> float:
    """The probability the kernel meters a packet with under 1-in-`n` sampling (samplingProbability)."""
    return 1.0 if n == 1 else sample_threshold(n) / (1 << 32)


# -- reference semantics (tests hold the compiled tables and the kernel to these) --------------------

@dataclass(frozen=True)
class Packet:
    """The fields rules look at. Addresses as the kernel keys them (IPv4 mapped, see `mapped`)."""

    src: IPv6Address
    dst: IPv6Address
    proto: int
    sport: int | None = None     # None: no ports (not TCP/UDP/SCTP, or a non-first fragment)
    dport: int | None = None
    vlan: int = 0
    ifindex: int = 1


def mapped(address: str) -> IPv6Address:
    ip = ipaddress.ip_address(address)
    if ip.version == 4:
        return IPv6Address(int(MAPPED.network_address) | int(ip))
    return IPv6Address(int(ip))


def _in(value: int | None, ranges: tuple[Range, ...] | None) -> bool:
    return ranges is None or (value is not None and any(lo <= value <= hi for lo, hi in ranges))


def rule_matches(r: Rule, pkt: Packet, ifindexes: Mapping[str, tuple[int, ...]]) -> bool:
    """The documented meaning of one rule, selector by selector."""
    def inside(addr: IPv6Address, nets: tuple[IPv6Network, ...] | None) -> bool:
        return nets is None or any(addr in n for n in nets)

    if not (inside(pkt.src, r.src) and inside(pkt.dst, r.dst)):
        return False
    if r.net is not None and not (inside(pkt.src, r.net) or inside(pkt.dst, r.net)):
        return False
    if r.proto is not None and pkt.proto not in r.proto:
        return False
    if not (_in(pkt.sport, r.sport) and _in(pkt.dport, r.dport)):
        return False
    if r.port is not None and not (_in(pkt.sport, r.port) or _in(pkt.dport, r.port)):
        return False
    if not _in(pkt.vlan, r.vlan):
        return False
    return r.iface is None or any(pkt.ifindex in ifindexes.get(v, ()) for v in r.iface)


def evaluate(rules: Sequence[Rule], pkt: Packet, links: Mapping[str, int] | None = None) -> tuple[int | None, bool]:
    """(index of the first matching rule or None, excluded?) by the documented semantics, rule by rule."""
    ifindexes, _ = resolve_ifaces(rules, links or {})
    for i, r in enumerate(rules):
        if rule_matches(r, pkt, ifindexes):
            return i, r.exclude
    return None, any(not r.exclude for r in rules)


def lookup(tb: Tables, pkt: Packet) -> tuple[int | None, bool]:
    """What the kernel computes from the tables (flow.c's select_packet, in Python)."""
    if not tb.flags & FILTER:
        return None, False
    m = tb.slots
    if tb.flags & SEL_IFACE:
        m &= tb.iface.get(pkt.ifindex, tb.iface_any)
    if tb.proto is not None:
        m &= int(tb.proto[pkt.proto])
    if tb.vlan is not None:
        m &= int(tb.vlan[pkt.vlan])
    if tb.sport is not None:
        m &= int(tb.sport[NO_PORT if pkt.sport is None else pkt.sport])
    if tb.dport is not None:
        m &= int(tb.dport[NO_PORT if pkt.dport is None else pkt.dport])
    if tb.src or tb.dst:
        sure = m & tb.src_any & tb.dst_any
        if sure:
            m &= ((sure & -sure) << 1) - 1
        for table, addr, any_ in ((tb.src, pkt.src, tb.src_any), (tb.dst, pkt.dst, tb.dst_any)):
            if m & ~any_ & tb.slots:
                best = max((n for n in table if addr in n), key=lambda n: n.prefixlen)
                m &= table[best]
    if not m:
        return None, tb.default_exclude
    first = m & -m
    return tb.slot_rule[first.bit_length() - 1], bool(first & tb.exclude)
