"""Who may call the receiver: the AE title (and host) allow-list, and the TLS server side.

A caller is checked when it requests an association (daemon.receiver); over TLS its
client certificate is verified against the configured CAs here.
"""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


class CallerLike(Protocol):
    """Anything with an AE title and an optional host (daemon.config.AllowedCaller fits)."""

    ae_title: str
    host: str | None


CallerEntry = CallerLike | tuple[str, str | None] | str


@dataclass(frozen=True)
class AllowedCaller:
    ae_title: str
    host: str | None = None


@dataclass(frozen=True)
class TlsServerConfig:
    """DICOM over TLS on a second port (PS3.15 B.1); paths are PEM files."""

    cert: Path
    key: Path
    # CAs whose client certificates are trusted; without one no client certificate is asked for.
    ca: Path | None = None
    require_client_cert: bool = False
    # (calling AE title, client certificate subject CN) pairs; when given, a TLS caller
    # must present the certificate mapped to the AE title it calls with.
    caller_certificates: Sequence[tuple[str, str]] = ()
    port: int = 2762


def _no_passphrase() -> bytes:
    # OpenSSL would otherwise prompt on the terminal for an encrypted key and hang.
    raise ValueError("the TLS private key is encrypted; use an unencrypted key readable only by the service user")


def server_ssl_context(tls: TlsServerConfig) -> ssl.SSLContext:
    """The TLS context of the SCP: TLS 1.2 or later, client certificates verified against `ca`."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(tls.cert), str(tls.key), password=_no_passphrase)
    if tls.ca is not None:
        context.load_verify_locations(cafile=str(tls.ca))
        # Optional: a certificate sent is still verified; only its absence is tolerated.
        context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    elif tls.require_client_cert or tls.caller_certificates:
        raise ValueError("TlsServerConfig: client certificates need a 'ca' to verify them against")
    return context


class CallerPolicy:
    """Decides whether a (calling AE title, host) may open an association."""

    def __init__(self, allowed: Sequence[CallerEntry], allow_any: bool) -> None:
        self.allow_any = allow_any
        self._allowed = [_caller_key(entry) for entry in allowed]

    def refusal(self, calling_ae: str, host: str | None) -> str | None:
        """None if the caller is allowed, else the reason for refusing it."""
        if self.allow_any:
            return None
        peer = normalise_host(host)
        title = calling_ae.strip()
        known_title = False
        for allowed_title, allowed_host in self._allowed:
            if allowed_title != title:
                continue
            known_title = True
            if allowed_host is None or allowed_host == peer:
                return None
        if known_title:
            return "calling AE title not allowed from this host"
        return "calling AE title not in the allow-list"


def _caller_key(entry: CallerEntry) -> tuple[str, str | None]:
    """(AE title, host) from an AllowedCaller-like object, an (ae_title, host) pair or a bare title."""
    if isinstance(entry, str):
        title, host = entry, None
    elif isinstance(entry, tuple | list):
        title, host = entry[0], (entry[1] if len(entry) > 1 else None)
    else:
        title, host = entry.ae_title, entry.host
    if not isinstance(title, str) or not title.strip():
        raise ValueError(f"allowed_callers: {entry!r} has no AE title")
    return title.strip(), normalise_host(host)


def normalise_host(host: str | None) -> str | None:
    if host is None:
        return None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address)
