"""Sans-IO IPFIX (RFC 7011) message decoder.

Theory of operation. :class:`Decoder` never touches a socket: the caller hands it the bytes of a
datagram (or any buffer of back-to-back messages) together with a string naming the exporter, and
gets back a :class:`FeedResult` with the data records, sequence gaps and malformed-input events
found in it. State lives in sessions keyed by ``(exporter, observation domain id)``; each session
holds its templates and the sequence number it expects next.

Parsing is defensive and bounded by the input size: every length is checked before it is used, a
set must be at least its 4-byte header, a template's field list must fit in its set, every fixed
field is at least one octet and every variable-length field consumes at least its length octet,
so the work done is linear in the bytes received whatever they contain. A problem that makes the
rest of a message untrustworthy (bad header, set overrunning the message) abandons that message;
a problem confined to one set abandons that set. Either way it is counted as malformed, with a
reason, and never raised.

Templates (set 2) and options templates (set 3) are installed on arrival, replaced by a later
definition with the same id, withdrawn by a record with field count 0 (template id 2 or 3 withdraws
all of that kind). RFC 7011 section 8 says Template Withdrawals MUST NOT be sent over UDP (there
templates expire instead), so a UDP collector passes ``withdrawals=False``: a withdrawal is then
ignored and counted (``withdrawals_ignored``), as a forged one should be. Each template field is
resolved once, at definition time, against an element registry (IANA and RFC 5103 from the
``ipfix`` package, plus caller extras): the element's name and abstract type choose a converter.
A template without variable-length fields compiles to one ``struct`` format (natural-size integers
and floats unpack directly, anything else as octets plus its converter), so a data set is decoded
by ``iter_unpack``; otherwise fields are walked one by one.

Values: unsigned/signed integers of any reduced size become ``int``; addresses strings (RFC 5952,
IPv4-mapped as ``::ffff:a.b.c.d``); MACs ``aa:bb:..``; dateTimeSeconds/Milliseconds stay the raw
epoch number; dateTimeMicro/Nanoseconds (NTP format) become an epoch count in micro/nanoseconds;
float32/64 ``float``; boolean ``True`` for 1 and ``False`` for 2 (other octets stay ``int``);
strings are UTF-8 with replacement, trailing NULs (padding) dropped; octet arrays and anything
unknown (including RFC 6313 lists) are lowercase hex. Unknown elements are named
``_ipfix_<pen>_<id>``, the ``ipfix`` package's own convention (ntop's tunnel elements, which xdpflow
sends, are named as nProbe names them); a repeated element in one template gets keys ``name``,
``name#2``, ...

Bounded state. Parsing is linear in the input, but templates are kept, and a template field held
costs ~300 octets of Python objects for the 4 (or 8) it took on the wire: unbounded, 20 datagrams
of 64 KB made the decoder hold ~95 MB. So what is kept is bounded, each bound a constructor
parameter, and whatever a bound refuses or drops is counted in :class:`DecoderStats` and reported
as a :class:`LimitHit` in the :class:`FeedResult` (its ``limit`` is the parameter's name):

- ``max_sessions`` (4096): a new session beyond it evicts the least recently used one, templates
  and all (``sessions_evicted``).
- ``max_templates_per_session`` (4096): a new template id beyond it is refused, a redefinition of
  an id held is not (``templates_refused_session``). Ids run 256..65535; real exporters use a few.
- ``max_template_fields`` (512): a template with more fields is refused and the set goes on with
  its next record (``templates_refused_fields``); a 64 KB set could carry ~16,000.
- ``max_template_bytes`` (16 MiB), the bound on memory: every template held is charged
  :func:`template_cost`, an estimate from its field count alone, so it is known from the record
  header before anything is built (a refused template costs no allocation); one that would take
  the decoder-wide total past the budget is refused (``templates_refused_budget``). Withdrawal,
  replacement, expiry and eviction give the charge back. ``TEMPLATE_COST`` plus ``FIELD_COST``
  per field (1024 + 384 octets) are upper bounds of what CPython 3.11 holds, measured with
  tracemalloc: ~330 octets per field at worst (unknown elements, each with its own name string, in
  octet fields, each with a converter entry) and ~600 per template, bookkeeping included; the
  flood test in the unit tests keeps them honest. The budget is shared, so a flood can starve
  newcomers, but it cannot evict what others hold, and over UDP what it holds expires.
- ``template_lifetime`` (None, never: right for streams and tests): over UDP, RFC 7011 section 8
  has the exporter re-send templates periodically and the collector expire those not refreshed,
  with a lifetime of some multiple (3 is usual) of the exporter's refresh interval. The decoder
  has no clock: ``feed(..., now=...)`` takes the caller's (monotonic seconds; a step back counts
  as standing still, a call without ``now`` as no time passing), and at the start of each feed
  templates not refreshed for longer than the lifetime are dropped, in any session
  (``templates_expired``); their data sets then count as unknown-template sets.

A refused redefinition removes the earlier definition too: the exporter's data now follows a layout
the decoder does not hold, and decoding it with the stale one would produce wrong records. What the
decoder holds is thus bounded by the budget plus ``max_sessions`` small session objects, whatever
it is sent; a :class:`FeedResult` belongs to the caller and is as big as the records it carries.

Sequence numbers (RFC 7011 3.1): the header carries the number of data records sent in the
session before this message, mod 2^32. The session expects ``previous + records in previous``;
a mismatch is reported as a :class:`SequenceGap` with the signed distance (positive: records
lost; negative: reordering, duplication or exporter restart) and the session resynchronises on
the received number. When a message held records the decoder could not count (a data set whose
template is unknown, or a set abandoned as malformed) the next expectation is unknown and no gap
is reported for it. Whether options data records count is ``count_options`` (RFC: yes; nfcapd:
no).
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from types import MappingProxyType
from typing import Any

Value = int | float | bool | str
Converter = Callable[[bytes], Value]

IPFIX_VERSION = 10
HEADER_LEN = 16
SET_HEADER_LEN = 4
TEMPLATE_SET_ID = 2
OPTIONS_TEMPLATE_SET_ID = 3
MIN_DATA_SET_ID = 256
VARLEN = 0xFFFF
SEQ_MOD = 1 << 32
_NTP_UNIX_OFFSET = 2_208_988_800
TEMPLATE_COST = 1024
FIELD_COST = 384

_HEADER = struct.Struct("!HHIII")
_U16X2 = struct.Struct("!HH")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_F32 = struct.Struct("!f")
_F64 = struct.Struct("!d")


@dataclass(frozen=True, slots=True)
class ElementInfo:
    """Name and abstract data type (RFC 7012 names, e.g. ``unsigned64``) of an information element."""

    name: str
    type_name: str


# ntop's elements (PEN 35632) for a tunnel's outer header and id, as nProbe documents them; xdpflow's
# tunnel templates carry them (docs/operations.md). Stated here, not taken from the exporter: this
# decoder is the independent one the exporter's tests are held to.
NTOP_PEN = 35632
NTOP_ELEMENTS = {
    (NTOP_PEN, 106): ElementInfo("UPSTREAM_TUNNEL_ID", "unsigned32"),
    (NTOP_PEN, 114): ElementInfo("UNTUNNELED_IPV4_SRC_ADDR", "ipv4Address"),
    (NTOP_PEN, 116): ElementInfo("UNTUNNELED_IPV4_DST_ADDR", "ipv4Address"),
    (NTOP_PEN, 396): ElementInfo("UNTUNNELED_IPV6_SRC_ADDR", "ipv6Address"),
    (NTOP_PEN, 397): ElementInfo("UNTUNNELED_IPV6_DST_ADDR", "ipv6Address"),
}


@cache
def default_registry() -> Mapping[tuple[int, int], ElementInfo]:
    """IANA and RFC 5103 elements known to the ``ipfix`` package, and NTOP_ELEMENTS, keyed by
    (enterprise, element id)."""
    import ipfix.ie

    ipfix.ie.use_iana_default()
    ipfix.ie.use_5103_default()
    known = {(ie.pen, ie.num): ElementInfo(ie.name, ie.type.name) for ie in ipfix.ie.dump_infomodel()}
    return MappingProxyType({**known, **NTOP_ELEMENTS})


def _uint(b: bytes) -> Value:
    return int.from_bytes(b, "big")


def _sint(b: bytes) -> Value:
    return int.from_bytes(b, "big", signed=True)


def _hex(b: bytes) -> Value:
    return b.hex()


def _string(b: bytes) -> Value:
    # A fixed-length string field is NUL-padded (xdpflow's tunnelTechnology; nfdump and Wireshark
    # stop at the first NUL too): the padding is not part of the value.
    return b.rstrip(b"\0").decode("utf-8", "replace")


def _float(b: bytes) -> Value:
    if len(b) == 8:
        return float(_F64.unpack(b)[0])
    if len(b) == 4:
        return float(_F32.unpack(b)[0])
    return b.hex()


def _boolean(b: bytes) -> Value:
    v = int.from_bytes(b, "big")
    return True if v == 1 else False if v == 2 else v


def _boolean_int(v: int) -> Value:
    return True if v == 1 else False if v == 2 else v


def _mac(b: bytes) -> Value:
    return b.hex(":")


def _ipv4(b: bytes) -> Value:
    return socket.inet_ntop(socket.AF_INET, b) if len(b) == 4 else b.hex()


def _ipv6(b: bytes) -> Value:
    if len(b) != 16:
        return b.hex()
    text = socket.inet_ntop(socket.AF_INET6, b)
    if "." in text and not text.startswith("::ffff:"):
        return str(ipaddress.IPv6Address(b))
    return text


def _ntp(scale: int) -> Converter:
    def convert(b: bytes) -> Value:
        if len(b) != 8:
            return int.from_bytes(b, "big")
        v = int.from_bytes(b, "big")
        return ((v >> 32) - _NTP_UNIX_OFFSET) * scale + (((v & 0xFFFFFFFF) * scale) >> 32)

    return convert


_CONVERTERS: dict[str, Converter] = {
    **dict.fromkeys(("unsigned8", "unsigned16", "unsigned32", "unsigned64"), _uint),
    **dict.fromkeys(("signed8", "signed16", "signed32", "signed64"), _sint),
    "dateTimeSeconds": _uint,
    "dateTimeMilliseconds": _uint,
    "dateTimeMicroseconds": _ntp(1_000_000),
    "dateTimeNanoseconds": _ntp(1_000_000_000),
    "float32": _float,
    "float64": _float,
    "boolean": _boolean,
    "macAddress": _mac,
    "ipv4Address": _ipv4,
    "ipv6Address": _ipv6,
    "string": _string,
    "octetArray": _hex,
}


_UNSIGNED_CODES = {1: "B", 2: "H", 4: "I", 8: "Q"}
_SIGNED_CODES = {1: "b", 2: "h", 4: "i", 8: "q"}
_UNSIGNED_TYPES = {"unsigned8", "unsigned16", "unsigned32", "unsigned64", "dateTimeSeconds", "dateTimeMilliseconds"}


def _struct_code(type_name: str, length: int) -> str | None:
    """A struct code that unpacks the field to its final value (booleans aside), or None."""
    if type_name in _UNSIGNED_TYPES or type_name == "boolean":
        return _UNSIGNED_CODES.get(length)
    if type_name.startswith("signed"):
        return _SIGNED_CODES.get(length)
    if type_name in ("float32", "float64"):
        return {4: "f", 8: "d"}.get(length)
    return None


def template_cost(field_count: int) -> int:
    """Octets a template of ``field_count`` fields is charged against ``max_template_bytes``."""
    return TEMPLATE_COST + FIELD_COST * field_count


def converter_for(type_name: str) -> Converter:
    """The function turning a field's octets into a value, for an abstract data type name."""
    return _CONVERTERS.get(type_name, _hex)


@dataclass(frozen=True, slots=True)
class TemplateField:
    """One field specifier of a template, resolved against the registry."""

    element_id: int
    length: int
    enterprise: int
    name: str
    type_name: str

    @property
    def variable(self) -> bool:
        return self.length == VARLEN


@dataclass(frozen=True, slots=True, eq=False)
class Template:
    """A (possibly options) template; ``keys`` are the record dict keys, duplicates suffixed ``#2``..."""

    template_id: int
    fields: tuple[TemplateField, ...]
    scope_count: int
    keys: tuple[str, ...]
    converters: tuple[Converter, ...]
    min_record_length: int
    record_struct: struct.Struct | None
    posts: tuple[tuple[int, Callable[[Any], Value]], ...]

    @property
    def is_options(self) -> bool:
        return self.scope_count > 0

    @property
    def scope_keys(self) -> tuple[str, ...]:
        return self.keys[: self.scope_count]

    def same_as(self, other: Template) -> bool:
        return self.fields == other.fields and self.scope_count == other.scope_count

    @classmethod
    def build(cls, template_id: int, fields: tuple[TemplateField, ...], scope_count: int = 0) -> Template:
        seen: Counter[str] = Counter()
        keys: list[str] = []
        for f in fields:
            seen[f.name] += 1
            keys.append(f.name if seen[f.name] == 1 else f"{f.name}#{seen[f.name]}")
        converters = tuple(converter_for(f.type_name) for f in fields)
        min_len = sum(1 if f.variable else f.length for f in fields)
        record_struct: struct.Struct | None = None
        posts: list[tuple[int, Callable[[Any], Value]]] = []
        if not any(f.variable for f in fields):
            codes = []
            for i, (f, conv) in enumerate(zip(fields, converters, strict=True)):
                code = _struct_code(f.type_name, f.length)
                if code is None:
                    code = f"{f.length}s"
                    posts.append((i, conv))
                elif f.type_name == "boolean":
                    posts.append((i, _boolean_int))
                codes.append(code)
            record_struct = struct.Struct("!" + "".join(codes))
        return cls(template_id, fields, scope_count, tuple(keys), converters, min_len, record_struct, tuple(posts))

    def finish(self, values: tuple[Any, ...]) -> dict[str, Value]:
        """A fixed-layout record's dict from the values its ``record_struct`` unpacked."""
        if self.posts:
            vals = list(values)
            for i, post in self.posts:
                vals[i] = post(vals[i])
            return dict(zip(self.keys, vals, strict=True))
        return dict(zip(self.keys, values, strict=True))

    def decode_record(self, data: bytes, offset: int, end: int) -> tuple[dict[str, Value], int] | None:
        """Decode one record at ``offset``; ``None`` when it would run past ``end``."""
        if self.record_struct is not None:
            if offset + self.min_record_length > end:
                return None
            return self.finish(self.record_struct.unpack_from(data, offset)), offset + self.min_record_length
        out: dict[str, Value] = {}
        for key, f, conv in zip(self.keys, self.fields, self.converters, strict=True):
            length = f.length
            if length == VARLEN:
                if offset >= end:
                    return None
                length = data[offset]
                offset += 1
                if length == 255:
                    if offset + 2 > end:
                        return None
                    length = _U16.unpack_from(data, offset)[0]
                    offset += 2
            if offset + length > end:
                return None
            out[key] = conv(data[offset : offset + length])
            offset += length
        return out, offset


@dataclass(slots=True)
class DataRecord:
    """One decoded data record (``fields`` in template order, IANA names as keys)."""

    exporter: str
    odid: int
    template_id: int
    is_options: bool
    export_time: int
    sequence: int
    fields: dict[str, Value]
    scope: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class SequenceGap:
    """Header sequence ``received`` where ``expected`` was due; ``delta`` > 0 is records lost."""

    exporter: str
    odid: int
    expected: int
    received: int
    delta: int


@dataclass(frozen=True, slots=True)
class Malformed:
    """Input the decoder rejected: a stable ``reason`` and a human ``detail``."""

    exporter: str
    odid: int | None
    reason: str
    detail: str


@dataclass(frozen=True, slots=True)
class UnknownTemplateSet:
    """A data set that arrived with no template for its set id in its session."""

    exporter: str
    odid: int
    template_id: int
    length: int


@dataclass(frozen=True, slots=True)
class LimitHit:
    """State refused or dropped to stay within a bound.

    ``limit`` names the :class:`Decoder` parameter, ``counter`` the :class:`DecoderStats` field that
    counts it, ``dropped`` says what went, for people.
    """

    exporter: str
    odid: int
    limit: str
    counter: str
    dropped: str


@dataclass(slots=True)
class FeedResult:
    """Everything one :meth:`Decoder.feed` call produced, in input order per kind."""

    records: list[DataRecord] = field(default_factory=list)
    gaps: list[SequenceGap] = field(default_factory=list)
    malformed: list[Malformed] = field(default_factory=list)
    unknown_sets: list[UnknownTemplateSet] = field(default_factory=list)
    limits: list[LimitHit] = field(default_factory=list)
    messages: int = 0


@dataclass(slots=True)
class DecoderStats:
    """Running totals over the decoder's lifetime.

    ``records`` counts all data records, ``options_records`` the options ones among them;
    ``templates`` / ``options_templates`` count template records accepted (refreshes included);
    ``templates_refused`` is the sum of the three ``templates_refused_*`` reasons.
    """

    messages: int = 0
    records: int = 0
    options_records: int = 0
    malformed: int = 0
    malformed_reasons: Counter[str] = field(default_factory=Counter)
    gaps: int = 0
    lost_records: int = 0
    unknown_template_sets: int = 0
    templates: int = 0
    options_templates: int = 0
    templates_redefined: int = 0
    templates_withdrawn: int = 0
    nonzero_padding: int = 0
    sessions_evicted: int = 0
    templates_refused: int = 0
    templates_refused_session: int = 0
    templates_refused_fields: int = 0
    templates_refused_budget: int = 0
    templates_expired: int = 0
    withdrawals_ignored: int = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__ if name != "malformed_reasons"}


@dataclass(slots=True)
class _Session:
    templates: dict[int, Template] = field(default_factory=dict)
    expected: int | None = None


def _skip_specs(buf: bytes, pos: int, end: int, count: int) -> int | None:
    """Where ``count`` field specifiers from ``pos`` end (8 octets with an enterprise number, else 4).

    None when they overrun ``end``. Reads one octet per field: refusing a template stays cheap.
    """
    for _ in range(count):
        if end - pos < 4:
            return None
        pos += 8 if buf[pos] & 0x80 else 4
    return pos if pos <= end else None


class _Abandon(Exception):
    """Internal: stop parsing the current set or message (already counted)."""


class Decoder:
    """Stateful RFC 7011 decoder; feed it messages, read records, gaps and counters.

    The ``max_*`` limits and ``template_lifetime`` bound what it keeps (see the module docstring);
    ``withdrawals=False`` ignores template withdrawals, as a UDP collector should.
    """

    def __init__(
        self,
        *,
        count_options: bool = True,
        extra_elements: Mapping[tuple[int, int], ElementInfo] | None = None,
        max_sessions: int = 4096,
        max_templates_per_session: int = 4096,
        max_template_fields: int = 512,
        max_template_bytes: int = 16 << 20,
        template_lifetime: float | None = None,
        withdrawals: bool = True,
    ) -> None:
        if min(max_sessions, max_templates_per_session, max_template_fields, max_template_bytes) < 1:
            raise ValueError("decoder limits must be at least 1")
        if template_lifetime is not None and not 0 < template_lifetime < float("inf"):
            raise ValueError(f"template_lifetime must be a positive number of seconds or None, not {template_lifetime}")
        self.count_options = count_options
        self.max_sessions = max_sessions
        self.max_templates_per_session = max_templates_per_session
        self.max_template_fields = max_template_fields
        self.max_template_bytes = max_template_bytes
        self.template_lifetime = template_lifetime
        self.withdrawals = withdrawals
        self.stats = DecoderStats()
        self._registry: Mapping[tuple[int, int], ElementInfo] = (
            {**default_registry(), **extra_elements} if extra_elements else default_registry()
        )
        self._sessions: dict[tuple[str, int], _Session] = {}
        self._template_bytes = 0
        self._now = 0.0
        self._refreshed: OrderedDict[tuple[str, int, int], float] = OrderedDict()  # oldest refresh first

    @property
    def template_bytes(self) -> int:
        """What the templates held are charged, all sessions together (at most ``max_template_bytes``)."""
        return self._template_bytes

    def element(self, enterprise: int, element_id: int) -> ElementInfo:
        """Registry entry for an element, or the ``_ipfix_<pen>_<id>`` octetArray stand-in."""
        info = self._registry.get((enterprise, element_id))
        return info if info is not None else ElementInfo(f"_ipfix_{enterprise}_{element_id}", "octetArray")

    def templates(self, exporter: str, odid: int) -> dict[int, Template]:
        """A copy of the templates currently known for a session."""
        sess = self._sessions.get((exporter, odid))
        return dict(sess.templates) if sess else {}

    def sessions(self) -> list[tuple[str, int]]:
        return list(self._sessions)

    def feed(self, data: bytes | bytearray | memoryview, exporter: str = "-", now: float | None = None) -> FeedResult:
        """Decode every message in ``data`` (one datagram, or back-to-back messages).

        ``now`` (seconds on the caller's monotonic clock) matters only with a ``template_lifetime``.
        """
        buf = bytes(data)
        res = FeedResult()
        if now is not None and now > self._now:
            self._now = now
        if self.template_lifetime is not None:
            self._expire(res)
        off = 0
        if not buf:
            self._malformed(res, exporter, None, "truncated header", "empty datagram")
        while off < len(buf):
            length = self._message(buf, off, exporter, res)
            if length is None:
                break
            off += length
        return res

    def _malformed(self, res: FeedResult, exporter: str, odid: int | None, reason: str, detail: str) -> None:
        self.stats.malformed += 1
        self.stats.malformed_reasons[reason] += 1
        res.malformed.append(Malformed(exporter, odid, reason, detail))

    def _session(self, key: tuple[str, int], res: FeedResult) -> _Session:
        sess = self._sessions.pop(key, None)
        if sess is None:
            sess = _Session()
            while len(self._sessions) >= self.max_sessions:
                old_key = next(iter(self._sessions))
                old = self._sessions.pop(old_key)
                held = len(old.templates)
                freed = self._drop_all(old_key, old)
                self.stats.sessions_evicted += 1
                res.limits.append(
                    LimitHit(
                        *old_key, "max_sessions", "sessions_evicted", f"session with {held} templates ({freed} octets)"
                    )
                )
        self._sessions[key] = sess
        return sess

    def _drop(self, key: tuple[str, int], sess: _Session, tid: int) -> int:
        """Forget one template, giving its charge back; returns the charge."""
        cost = template_cost(len(sess.templates.pop(tid).fields))
        del self._refreshed[(*key, tid)]
        self._template_bytes -= cost
        return cost

    def _drop_all(self, key: tuple[str, int], sess: _Session) -> int:
        return sum(self._drop(key, sess, tid) for tid in list(sess.templates))

    def _expire(self, res: FeedResult) -> None:
        assert self.template_lifetime is not None
        horizon = self._now - self.template_lifetime
        while self._refreshed:
            (exporter, odid, tid), stamp = next(iter(self._refreshed.items()))
            if stamp >= horizon:
                return
            self._drop((exporter, odid), self._sessions[(exporter, odid)], tid)
            self.stats.templates_expired += 1
            res.limits.append(
                LimitHit(
                    exporter,
                    odid,
                    "template_lifetime",
                    "templates_expired",
                    f"template {tid}, not refreshed for {self._now - stamp:.0f} s",
                )
            )

    def _message(self, buf: bytes, off: int, exporter: str, res: FeedResult) -> int | None:
        avail = len(buf) - off
        if avail < HEADER_LEN:
            self._malformed(res, exporter, None, "truncated header", f"{avail} octets, header needs {HEADER_LEN}")
            return None
        version, length, export_time, seq, odid = _HEADER.unpack_from(buf, off)
        if version != IPFIX_VERSION:
            self._malformed(res, exporter, None, "bad version", f"version {version}, expected 10")
            return None
        if length < HEADER_LEN or length > avail:
            self._malformed(res, exporter, odid, "bad message length", f"length field {length}, {avail} octets")
            return None

        self.stats.messages += 1
        res.messages += 1
        sess = self._session((exporter, odid), res)
        if sess.expected is not None and seq != sess.expected:
            delta = (seq - sess.expected) % SEQ_MOD
            if delta >= SEQ_MOD // 2:
                delta -= SEQ_MOD
            self.stats.gaps += 1
            self.stats.lost_records += max(delta, 0)
            res.gaps.append(SequenceGap(exporter, odid, sess.expected, seq, delta))

        counted: int | None = 0
        pos, end = off + HEADER_LEN, off + length
        try:
            while end - pos >= SET_HEADER_LEN:
                set_id, set_len = _U16X2.unpack_from(buf, pos)
                if set_len < SET_HEADER_LEN:
                    self._malformed(res, exporter, odid, "set length < 4", f"set {set_id} length {set_len}")
                    raise _Abandon
                if pos + set_len > end:
                    self._malformed(
                        res, exporter, odid, "set overruns message", f"set {set_id} length {set_len}, {end - pos} left"
                    )
                    raise _Abandon
                body, set_end = pos + SET_HEADER_LEN, pos + set_len
                pos = set_end
                if set_len == SET_HEADER_LEN:
                    self._malformed(res, exporter, odid, "empty set", f"set {set_id} has no records")
                elif set_id in (TEMPLATE_SET_ID, OPTIONS_TEMPLATE_SET_ID):
                    self._template_set(sess, exporter, odid, set_id, buf, body, set_end, res)
                elif set_id >= MIN_DATA_SET_ID:
                    n = self._data_set(sess, exporter, odid, set_id, export_time, seq, buf, body, set_end, res)
                    counted = None if n is None or counted is None else counted + n
                else:
                    self._malformed(res, exporter, odid, "reserved set id", f"set id {set_id}")
            if pos != end:
                self._malformed(res, exporter, odid, "trailing octets", f"{end - pos} octets after last set")
        except _Abandon:
            counted = None
        sess.expected = None if counted is None else (seq + counted) % SEQ_MOD
        return length

    def _template_set(
        self, sess: _Session, exporter: str, odid: int, set_id: int, buf: bytes, pos: int, end: int, res: FeedResult
    ) -> None:
        options = set_id == OPTIONS_TEMPLATE_SET_ID
        while end - pos >= 4:
            tid, count = _U16X2.unpack_from(buf, pos)
            if tid == 0 and count == 0 and not any(buf[pos:end]):
                return
            if count == 0:
                pos += 4
                if options and end - pos >= 2 and buf[pos : pos + 2] == b"\0\0":
                    pos += 2
                if not self._withdraw(sess, exporter, odid, set_id, tid, res):
                    return
                continue
            if tid < MIN_DATA_SET_ID:
                self._malformed(res, exporter, odid, "bad template id", f"template id {tid} in set {set_id}")
                return
            scope = 0
            pos += 4
            if options:
                if end - pos < 2:
                    self._malformed(res, exporter, odid, "truncated template", f"options template {tid}")
                    return
                scope = _U16.unpack_from(buf, pos)[0]
                pos += 2
            if count * 4 > end - pos:
                self._malformed(
                    res, exporter, odid, "template overruns set", f"template {tid}: {count} fields, {end - pos} octets"
                )
                return
            refused = self._refusal(sess, tid, count)
            if refused is not None:
                after = _skip_specs(buf, pos, end, count)
                if after is None:
                    self._malformed(res, exporter, odid, "template overruns set", f"template {tid} field list")
                    return
                pos = after
                self._refuse(sess, exporter, odid, tid, res, *refused, count)
                continue
            specs: list[tuple[int, int, int]] = []
            for _ in range(count):
                if end - pos < 4:
                    self._malformed(res, exporter, odid, "template overruns set", f"template {tid} field list")
                    return
                eid, flen = _U16X2.unpack_from(buf, pos)
                pos += 4
                pen = 0
                if eid & 0x8000:
                    if end - pos < 4:
                        self._malformed(res, exporter, odid, "template overruns set", f"template {tid} enterprise")
                        return
                    pen = _U32.unpack_from(buf, pos)[0]
                    pos += 4
                    eid &= 0x7FFF
                specs.append((eid, flen, pen))
            if options and not 1 <= scope <= count:
                self._malformed(res, exporter, odid, "bad scope count", f"template {tid}: scope {scope} of {count}")
                continue
            if any(flen == 0 for _, flen, _ in specs):
                self._malformed(res, exporter, odid, "zero field length", f"template {tid}")
                continue
            self._define(sess, exporter, odid, tid, scope, specs)
            if options:
                self.stats.options_templates += 1
            else:
                self.stats.templates += 1
        if pos < end and any(buf[pos:end]):
            self.stats.nonzero_padding += 1

    def _refusal(self, sess: _Session, tid: int, count: int) -> tuple[str, str] | None:
        """The limit a template of ``count`` fields would break and its counter, or None.

        Decided from the record header, so a refused template costs no allocation.
        """
        if count > self.max_template_fields:
            return "max_template_fields", "templates_refused_fields"
        old = sess.templates.get(tid)
        if old is None and len(sess.templates) >= self.max_templates_per_session:
            return "max_templates_per_session", "templates_refused_session"
        held = template_cost(len(old.fields)) if old is not None else 0
        if self._template_bytes - held + template_cost(count) > self.max_template_bytes:
            return "max_template_bytes", "templates_refused_budget"
        return None

    def _define(
        self, sess: _Session, exporter: str, odid: int, tid: int, scope: int, specs: list[tuple[int, int, int]]
    ) -> None:
        """Install or refresh a template the limits allow."""
        fields = []
        for eid, flen, pen in specs:
            info = self.element(pen, eid)
            fields.append(TemplateField(eid, flen, pen, info.name, info.type_name))
        key = (exporter, odid, tid)
        old = sess.templates.get(tid)
        if old is not None and old.fields == tuple(fields) and old.scope_count == scope:
            self._refreshed[key] = self._now
            self._refreshed.move_to_end(key)
            return
        if old is not None:
            self._drop((exporter, odid), sess, tid)
            self.stats.templates_redefined += 1
        sess.templates[tid] = Template.build(tid, tuple(fields), scope)
        self._refreshed[key] = self._now
        self._template_bytes += template_cost(len(fields))

    def _refuse(
        self, sess: _Session, exporter: str, odid: int, tid: int, res: FeedResult, limit: str, counter: str, count: int
    ) -> None:
        what = f"template {tid} ({count} fields)"
        if tid in sess.templates:
            self._drop((exporter, odid), sess, tid)
            what += ", and its earlier definition"
        self.stats.templates_refused += 1
        setattr(self.stats, counter, getattr(self.stats, counter) + 1)
        res.limits.append(LimitHit(exporter, odid, limit, counter, what))

    def _withdraw(self, sess: _Session, exporter: str, odid: int, set_id: int, tid: int, res: FeedResult) -> bool:
        options = set_id == OPTIONS_TEMPLATE_SET_ID
        if tid == set_id:
            doomed = [t for t, tm in sess.templates.items() if tm.is_options == options]
        elif tid >= MIN_DATA_SET_ID:
            doomed = [tid] if tid in sess.templates else []
        else:
            self._malformed(res, exporter, odid, "bad template id", f"withdrawal of template id {tid}")
            return False
        if not self.withdrawals:
            self.stats.withdrawals_ignored += 1
            what = f"template {tid}" if tid != set_id else "all options templates" if options else "all templates"
            res.limits.append(LimitHit(exporter, odid, "withdrawals", "withdrawals_ignored", f"{what} not withdrawn"))
            return True
        for t in doomed:
            self._drop((exporter, odid), sess, t)
        self.stats.templates_withdrawn += len(doomed)
        return True

    def _data_set(
        self,
        sess: _Session,
        exporter: str,
        odid: int,
        tid: int,
        export_time: int,
        seq: int,
        buf: bytes,
        pos: int,
        end: int,
        res: FeedResult,
    ) -> int | None:
        tmpl = sess.templates.get(tid)
        if tmpl is None:
            self.stats.unknown_template_sets += 1
            res.unknown_sets.append(UnknownTemplateSet(exporter, odid, tid, end - pos))
            return None
        n = 0
        is_options = tmpl.is_options
        scope = tmpl.scope_keys
        if tmpl.record_struct is not None:
            n = (end - pos) // tmpl.min_record_length
            stop = pos + n * tmpl.min_record_length
            finish = tmpl.finish
            res.records.extend(
                DataRecord(exporter, odid, tid, is_options, export_time, seq, finish(vals), scope)
                for vals in tmpl.record_struct.iter_unpack(memoryview(buf)[pos:stop])
            )
            pos = stop
        while end - pos >= tmpl.min_record_length:
            got = tmpl.decode_record(buf, pos, end)
            if got is None:
                self._malformed(res, exporter, odid, "record overruns set", f"template {tid}, record {n + 1}")
                self._count(n, is_options)
                return None
            rec, pos = got
            res.records.append(DataRecord(exporter, odid, tid, is_options, export_time, seq, rec, scope))
            n += 1
        if pos < end and any(buf[pos:end]):
            self.stats.nonzero_padding += 1
        self._count(n, is_options)
        return n if self.count_options or not is_options else 0

    def _count(self, n: int, is_options: bool) -> None:
        self.stats.records += n
        if is_options:
            self.stats.options_records += n
