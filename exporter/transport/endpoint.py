"""Collector addresses: the endpoint grammar and the default ports.

A collector is HOST:PORT, [V6]:PORT, HOST, or SCHEME://HOST[:PORT] with scheme udp, tcp or tls;
without a scheme it is udp. The scheme is taken off first, then `split_host_port` reads what
is left, so the HOST:PORT grammar lives in one place.

Default ports: 4739 for udp and tcp, 4740 for tls: RFC 7011 section 10 has the collector listen
on 4739, and on 4740 for secure connections (IANA "ipfix" and "ipfixs").
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

DEFAULT_PORT = 4739
DEFAULT_TLS_PORT = 4740
DEFAULT_PORTS = {"udp": DEFAULT_PORT, "tcp": DEFAULT_PORT, "tls": DEFAULT_TLS_PORT}
SCHEMES = tuple(DEFAULT_PORTS)


class EndpointError(ValueError):
    """A collector address that can't be used; the message says why."""


class TransportSettingsError(EndpointError):
    """Transport settings or TLS files that can't be used; the message says why, on one line."""


@dataclass(frozen=True)
class Endpoint:
    scheme: str
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def split_host_port(authority: str) -> tuple[str | None, int | None]:
    """HOST[:PORT] or [V6][:PORT] -> (host, port), either None when absent; ValueError on a bad port."""
    parts = urlsplit(f"//{authority}")
    return parts.hostname, parts.port


def parse_endpoint(text: str, default_port: int | None = None) -> Endpoint:
    """HOST:PORT, [V6]:PORT, HOST, or SCHEME://HOST[:PORT] with scheme udp, tcp or tls (bare = udp)."""
    raw = text.strip()
    if not raw:
        raise EndpointError("empty collector address")
    url = raw if "://" in raw else f"udp://{raw}"
    try:
        parts = urlsplit(url)
        host, port = split_host_port(parts.netloc)
    except ValueError as e:
        raise EndpointError(f"collector {text!r}: {e}") from None
    if parts.scheme not in SCHEMES:
        raise EndpointError(f"collector {text!r}: transport {parts.scheme!r} is not supported "
                            f"(use {', '.join(SCHEMES)})")
    if not host:
        raise EndpointError(f"collector {text!r}: no host")
    if parts.path not in ("", "/") or parts.query:
        raise EndpointError(f"collector {text!r}: unexpected path or query")
    if port is None:
        port = default_port if default_port is not None else DEFAULT_PORTS[parts.scheme]
    return Endpoint(parts.scheme, host, port)
