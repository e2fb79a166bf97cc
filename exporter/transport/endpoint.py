"""Collector addresses: the endpoint grammar and the default ports.

A collector is HOST:PORT, [V6]:PORT, HOST, or SCHEME://HOST[:PORT] with scheme udp, tcp or tls;
without a scheme it is udp. exporter/address.py reads it: the one HOST:PORT grammar of xdpflow.

Default ports: 4739 for udp and tcp, 4740 for tls: RFC 7011 section 10 has the collector listen
on 4739, and on 4740 for secure connections (IANA "ipfix" and "ipfixs").
"""

from __future__ import annotations

from dataclasses import dataclass

from exporter.address import Address, AddressError, parse_address

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


def endpoint_address(text: str, default_port: int | None = None) -> Address:
    """A collector address as the grammar reads it; AddressError (PortRangeError) saying what is wrong."""
    return parse_address(text, schemes=SCHEMES, default_scheme="udp",
                         default_port=DEFAULT_PORTS if default_port is None else default_port)


def parse_endpoint(text: str, default_port: int | None = None) -> Endpoint:
    """HOST:PORT, [V6]:PORT, HOST, or SCHEME://HOST[:PORT] with scheme udp, tcp or tls (bare = udp)."""
    if not text.strip():
        raise EndpointError("empty collector address")
    try:
        a = endpoint_address(text, default_port)
    except AddressError as e:
        raise EndpointError(f"collector {text!r}: {e}") from None
    host, zone, name = a.host.partition("%")   # host names are case-insensitive, interface names are not
    return Endpoint(a.scheme, host.lower() + zone + name, a.port)
