"""IPFIX over TLS over TCP (RFC 7011 section 11): the TCP sender whose connections are TLS.

TLS 1.2 or later, the server certificate verified against `cafile` (the system store when none)
and its name checked (`server_name`, else the endpoint's host), an optional client certificate.
A handshake failure is counted and retried like a refused connection; nothing is ever written
outside TLS. Unusable files are a one-line TransportSettingsError at `open()`. Under TLS 1.3 a
collector refuses the exporter's certificate only after the exporter's side of the handshake is
done: that shows as connections the collector closes at once, and what was written to them is lost.
"""

from __future__ import annotations

import random
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from exporter.transport.endpoint import Endpoint, TransportSettingsError
from exporter.transport.sender import OnConnect, OnNotSent, Tag, describe_error
from exporter.transport.stream import StreamOptions, TcpSender


@dataclass(frozen=True)
class TlsOptions:
    cafile: str | None = None  # None: the system's trusted CAs
    certfile: str | None = None  # client certificate (PEM), for collectors that authenticate exporters
    keyfile: str | None = None  # its key, unless it is in certfile; unencrypted
    server_name: str | None = None  # name expected in the collector's certificate; default: the host


def _readable(path: str, what: str, where: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise TransportSettingsError(f"{where}: {what} {path}: {e.strerror or e}") from None


def _no_passphrase() -> bytes:
    raise TransportSettingsError("the key is encrypted; give an unencrypted key")


def make_tls_context(tls: TlsOptions, where: str = "tls") -> ssl.SSLContext:
    """A client context: TLS 1.2+, certificate and name verified. TransportSettingsError on unusable files."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname and CERT_REQUIRED by default
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.cafile is not None:
        _readable(tls.cafile, "CA file", where)
        try:
            ctx.load_verify_locations(cafile=tls.cafile)
        except (ssl.SSLError, OSError) as e:
            raise TransportSettingsError(f"{where}: CA file {tls.cafile}: {describe_error(e)}") from None
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if tls.keyfile is not None and tls.certfile is None:
        raise TransportSettingsError(f"{where}: a client key needs a client certificate")
    if tls.certfile is not None:
        _readable(tls.certfile, "client certificate", where)
        if tls.keyfile is not None:
            _readable(tls.keyfile, "client key", where)
        try:
            ctx.load_cert_chain(tls.certfile, tls.keyfile, password=_no_passphrase)
        except TransportSettingsError as e:
            raise TransportSettingsError(f"{where}: client key {tls.keyfile or tls.certfile}: {e}") from None
        except (ssl.SSLError, OSError) as e:
            raise TransportSettingsError(f"{where}: client certificate {tls.certfile}: {describe_error(e)}") from None
    return ctx


class TlsSender(TcpSender[Tag]):
    """IPFIX over TLS over TCP (RFC 7011 section 11): TcpSender whose connections are TLS."""

    def __init__(self, endpoint: Endpoint, *, tls: TlsOptions | None = None, on_connect: OnConnect | None = None,
                 on_not_sent: OnNotSent[Tag] | None = None, options: StreamOptions | None = None,
                 rng: Callable[[], float] = random.random) -> None:
        super().__init__(endpoint, on_connect=on_connect, on_not_sent=on_not_sent, options=options, rng=rng)
        self.tls = tls if tls is not None else TlsOptions()
        self._context: ssl.SSLContext | None = None

    def prepare(self) -> None:
        self._context = make_tls_context(self.tls, f"collector {self.endpoint}")

    def tls_client(self) -> tuple[ssl.SSLContext, str] | None:
        assert self._context is not None
        return self._context, self.tls.server_name or self.endpoint.host
