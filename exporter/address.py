"""One grammar for socket addresses: HOST:PORT, [V6]:PORT, :PORT, PORT and SCHEME://HOST[:PORT][/].

    address = [scheme "://"] [host] [":" port] ["/" where schemes are taken]
    host    = name or IPv4 address (letters, digits, ".", "-", "_") | "[" IPv6 address "]"

Every HOST:PORT in xdpflow is read by `parse_address`. The readers differ only in what may be left
out, and that is a parameter rather than another parser: the scheme (`default_scheme`), the host
(`default_host`: the metrics endpoint's ":9477"), the port (`default_port`, one for all or one per
scheme; `bare_port`: "9477" alone is a port, not a host) and port 0 (`min_port`: a listener may let
the kernel choose). An IPv6 address is always bracketed: "::1:4739" is refused, not guessed at.

An error carries the problem alone (`AddressError`; `PortRangeError` for a well-formed port out of
range, which some callers word differently); the caller says which setting it was.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass

_HOST = re.compile(r"[\w.-]+")
_IPV6 = re.compile(r"[0-9A-Fa-f:.]+(?:%[\w.-]+)?")   # with an optional zone: [fe80::1%eth0]
MAX_PORT = 65535


@dataclass(frozen=True)
class Address:
    host: str          # without brackets
    port: int
    scheme: str = ""   # lower case; "" where the caller takes none

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}" if self.scheme else f"{host}:{self.port}"


class AddressError(ValueError):
    """An address that does not parse; the message is the problem, without the address."""


class PortRangeError(AddressError):
    """A port that is a number outside the range the caller allows."""


def ip_version(host: str) -> int | None:
    """4 or 6 when `host` is an IP address (an IPv6 one may carry a %zone), None for a name."""
    try:
        return ipaddress.ip_address(host).version
    except ValueError:
        return None


def _split(rest: str, bare_port: bool) -> tuple[str, str | None]:
    """(host, port text or None when there is no ":PORT")."""
    if any(c in rest for c in "/?#"):
        raise AddressError("unexpected path or query")
    if rest.startswith("["):
        host, close, tail = rest[1:].partition("]")
        if not close:
            raise AddressError("an IPv6 address needs its closing ']': [IPv6]:PORT")
        if not _IPV6.fullmatch(host) or ip_version(host) != 6:
            raise AddressError(f"not an IPv6 address in brackets: {host!r}")
        if tail and not tail.startswith(":"):
            raise AddressError("expected [IPv6]:PORT")
        return host, tail[1:] if tail else None
    if bare_port and rest.isascii() and rest.isdigit():
        return "", rest
    host, colon, port = rest.rpartition(":")
    if not colon:
        host, port_text = rest, None
    elif ":" in host:
        raise AddressError("write an IPv6 address in brackets: [IPv6]:PORT")
    else:
        port_text = port
    if host and not _HOST.fullmatch(host):
        raise AddressError(f"{host!r} is not a host name or address")
    return host, port_text


def parse_address(text: str, *, schemes: Collection[str] = (), default_scheme: str | None = None,
                  default_host: str | None = None, default_port: int | Mapping[str, int] | None = None,
                  bare_port: bool = False, min_port: int = 1) -> Address:
    """The address in `text`; AddressError saying what is wrong.

    schemes: those allowed in SCHEME://... (none: a scheme is an error); without one the scheme is
    default_scheme, and with schemes but no default_scheme a scheme must be given. A missing host is
    default_host, a missing port default_port (or default_port[scheme]); None: it must be given.
    """
    raw = text.strip()
    if not raw:
        raise AddressError("empty address")
    scheme, sep, rest = raw.partition("://")
    if not sep:
        scheme, rest = "", raw
    elif not schemes:
        raise AddressError("expected HOST:PORT, not a URL")
    if schemes and rest.endswith("/"):   # a URL may end with its root path, its scheme written or not
        rest = rest[:-1]
    scheme = scheme.lower()
    host, port_text = _split(rest, bare_port)
    # The port first: "port 70000 is out of range" says more than what else may be wrong.
    port: int | None = None
    if port_text:   # "HOST:" is HOST, as urlsplit reads it
        if not (port_text.isascii() and port_text.isdigit()):
            raise AddressError(f"port {port_text!r} is not a number")
        port = int(port_text)
        if not min_port <= port <= MAX_PORT:
            raise PortRangeError(f"port {port_text} is out of range; allowed {min_port}..{MAX_PORT}")
    if sep and scheme not in schemes:
        raise AddressError(f"transport {scheme!r} is not supported (use {', '.join(schemes)})")
    if not sep and schemes:
        if default_scheme is None:
            raise AddressError(f"no scheme: expected SCHEME://HOST:PORT ({', '.join(schemes)})")
        scheme = default_scheme
    if not host:
        if default_host is None:
            raise AddressError("no host")
        host = default_host
    if port is None:
        port = default_port.get(scheme) if isinstance(default_port, Mapping) else default_port
        if port is None:
            raise AddressError("expected HOST:PORT")
    return Address(host, port, scheme)
