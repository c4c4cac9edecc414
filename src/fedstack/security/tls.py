"""TLS for fedstack: server and client ``ssl.SSLContext``\\ s and a self-signed test PKI.

- :func:`server_context`: the aggregator's side (and any future operator endpoint):
  certificate + key, optionally a CA that client certificates must chain to (mutual TLS).
- :func:`client_context`: an agent's side: verifies the server's certificate *and* host name
  against a CA file (or the system's trust store), optionally presents a client certificate.
- :func:`make_test_pki`: a CA, a server certificate for given host names / IP addresses and
  client certificates for given agents, for test deployments (``fedstack certs``).

Both contexts accept TLS 1.2 and newer only. Errors loading files are
:class:`~fedstack.errors.TLSError`\\ s that name the file.

:func:`is_fatal_tls_error` tells the errors that retrying cannot fix (a certificate that does
not verify, the peer refusing our certificate) from transient ones (a connection dropped
mid-handshake); :func:`describe_tls_failure` turns the former into a message that says what
to check.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import re
import socket
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from fedstack.errors import ConnectionClosed, TLSError

MIN_VERSION = ssl.TLSVersion.TLSv1_2

StrPath = str | os.PathLike[str]


# ---------------------------------------------------------------------- contexts
def _load_chain(ctx: ssl.SSLContext, cert: StrPath, key: StrPath | None, what: str) -> None:
    for path in (cert, key):
        if path is not None and not Path(path).is_file():
            raise TLSError(f"{what}: file {os.fspath(path)!r} not found")
    try:
        ctx.load_cert_chain(os.fspath(cert), os.fspath(key) if key is not None else None)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise TLSError(
            f"{what}: cannot load certificate {os.fspath(cert)!r}"
            f"{f' with key {os.fspath(key)!r}' if key is not None else ''}: {exc} "
            "(both must be PEM, and the key must belong to the certificate)"
        ) from exc


def _load_ca(ctx: ssl.SSLContext, ca: StrPath, what: str) -> None:
    if not Path(ca).is_file():
        raise TLSError(f"{what}: CA file {os.fspath(ca)!r} not found")
    try:
        ctx.load_verify_locations(cafile=os.fspath(ca))
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise TLSError(f"{what}: cannot load CA file {os.fspath(ca)!r}: {exc}") from exc


def server_context(
    cert: StrPath, key: StrPath | None = None, client_ca: StrPath | None = None
) -> ssl.SSLContext:
    """A server-side context (TLS >= 1.2) presenting ``cert`` (PEM; ``key`` may be in it).

    With ``client_ca``, clients must present a certificate that chains to it (mutual TLS).

    Raises:
        TLSError: a file is missing or does not load.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = MIN_VERSION
    _load_chain(ctx, cert, key, "TLS server certificate")
    if client_ca is not None:
        _load_ca(ctx, client_ca, "TLS client CA")
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(
    ca: StrPath | None = None,
    cert: StrPath | None = None,
    key: StrPath | None = None,
    *,
    check_hostname: bool = True,
) -> ssl.SSLContext:
    """A client-side context (TLS >= 1.2) that verifies the server's certificate.

    ``ca``: PEM file of the CA(s) to trust (without it: the system's trust store).
    ``cert``/``key``: a client certificate for servers that require one (mutual TLS).
    Host-name checking is on unless ``check_hostname=False``.

    Raises:
        TLSError: a file is missing or does not load.
    """
    if key is not None and cert is None:
        raise TLSError("a client key was given without a client certificate (--cert)")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
    ctx.minimum_version = MIN_VERSION
    ctx.check_hostname = check_hostname
    if ca is not None:
        _load_ca(ctx, ca, "TLS CA")
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if cert is not None:
        _load_chain(ctx, cert, key, "TLS client certificate")
    return ctx


# ---------------------------------------------------------------------- failures
# OpenSSL reasons that no retry will fix (besides certificate verification errors)
_FATAL_REASONS = {
    "WRONG_VERSION_NUMBER",  # wss:// to something that does not speak TLS
    "UNSUPPORTED_PROTOCOL",
    "NO_PROTOCOLS_AVAILABLE",
    "UNKNOWN_PROTOCOL",
    "NO_SHARED_CIPHER",
}


def is_fatal_tls_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a TLS failure that retrying the connection cannot fix.

    True for certificate verification failures and for TLS alerts from the peer (it
    refused our certificate or our protocol versions); False for connections that were
    merely cut (``SSLEOFError``, ``SSLZeroReturnError``) and for everything not TLS.
    """
    if isinstance(exc, ssl.SSLCertVerificationError):
        return True
    if isinstance(
        exc,
        ssl.SSLEOFError
        | ssl.SSLZeroReturnError
        | ssl.SSLSyscallError
        | ssl.SSLWantReadError
        | ssl.SSLWantWriteError,
    ):
        return False
    if isinstance(exc, ssl.SSLError):
        reason = str(exc.reason or "").upper()
        if "ALERT" in reason:
            return "INTERNAL_ERROR" not in reason
        return reason in _FATAL_REASONS
    return False


def describe_tls_failure(url: str, exc: BaseException, ca: StrPath | None = None) -> str:
    """A message for a fatal TLS failure connecting to ``url`` that says what to check."""
    where = (
        f"the CA file {os.fspath(ca)!r}"
        if ca is not None
        else "no CA file was given, so the system trust store was used"
    )
    hint_ca = f"check the CA file ({where}; set it with --ca or FEDSTACK_CA)"
    if isinstance(exc, ssl.SSLCertVerificationError):
        why = exc.verify_message or str(exc)
        if "hostname" in why.lower() or "ip address mismatch" in why.lower():
            return (
                f"TLS: the certificate of {url} is not valid for this host ({why}); "
                "connect with a host name or address the certificate names, or make a "
                f"certificate for it (fedstack certs --host ...); also {hint_ca}"
            )
        return (
            f"TLS: cannot verify the certificate of {url} ({why}): {hint_ca}; it must "
            "hold the CA that signed the aggregator's certificate"
        )
    reason = str(getattr(exc, "reason", "") or exc).upper()
    if "CERTIFICATE_REQUIRED" in reason or "HANDSHAKE_FAILURE" in reason:
        return (
            f"TLS: {url} refused the handshake ({reason.lower()}): it requires a client "
            "certificate signed by its client CA (--cert/--key)"
        )
    if "BAD_CERTIFICATE" in reason or "UNKNOWN_CA" in reason or "CERTIFICATE" in reason:
        return (
            f"TLS: {url} refused this agent's client certificate ({reason.lower()}): it "
            "must be signed by the CA the aggregator trusts (tls_client_ca)"
        )
    if "WRONG_VERSION_NUMBER" in reason or "UNKNOWN_PROTOCOL" in reason:
        return (
            f"TLS: {url} does not speak TLS ({reason.lower()}); use ws:// if the "
            "aggregator runs without TLS"
        )
    return f"TLS: handshake with {url} failed: {exc}"


@dataclass(frozen=True)
class TLSProbe:
    """What :func:`probe_tls` found."""

    speaks_tls: bool
    """The peer answered a TLS handshake (completed it, or sent a TLS alert)."""
    error: ssl.SSLError | None = None
    """The TLS error of the handshake or of the first read (e.g. the peer's alert)."""
    closed_after_handshake: bool = False
    """The handshake completed and the peer closed the connection at once, before we sent
    anything: what a server does that refused our client certificate (TLS 1.3 checks it
    after the handshake, and asyncio servers close without sending the alert)."""


def _probe(host: str, port: int, ctx: ssl.SSLContext, timeout: float) -> TLSProbe:
    try:
        with socket.create_connection((host, port), timeout) as raw:
            hostname = host if ctx.check_hostname else None
            with ctx.wrap_socket(raw, server_hostname=hostname) as conn:
                try:
                    # TLS 1.3 servers refuse a client certificate after the handshake: the
                    # alert arrives with the first read
                    conn.settimeout(min(timeout, 1.0))
                    if conn.recv(1) == b"":
                        return TLSProbe(True, closed_after_handshake=True)
                except ssl.SSLError as exc:
                    return TLSProbe(True, exc)
                except OSError:
                    pass
                return TLSProbe(True)
    except ssl.SSLError as exc:
        alert = "ALERT" in str(exc.reason or "").upper()
        return TLSProbe(alert or isinstance(exc, ssl.SSLCertVerificationError), exc)
    except (OSError, ValueError):
        return TLSProbe(False)


async def probe_tls(
    host: str, port: int, context: ssl.SSLContext | None = None, timeout: float = 2.0
) -> TLSProbe:
    """Try a TLS handshake with ``host:port`` (in a worker thread) and report what happened.

    Without ``context`` certificates are not checked: the question is only whether the
    peer speaks TLS (a port that speaks only TLS drops a plaintext ``ws://`` connection
    without a word). With the agent's ``context`` it recovers the TLS error that an event
    loop's transport does not report (e.g. the peer's "certificate required" alert).
    """
    if context is None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return await asyncio.to_thread(_probe, host, port, context, timeout)


async def diagnose(
    url: str,
    exc: BaseException,
    context: ssl.SSLContext | None,
    *,
    ca: StrPath | None = None,
    client_cert: bool = False,
    timeout: float = 2.0,
) -> TLSError | None:
    """A :class:`TLSError` if connecting to ``url`` failed with ``exc`` for a TLS reason that
    no retry fixes, else None (the failure may be transient: retry).

    ``context`` is the client's TLS context (None for ``ws://``). A certificate that does
    not verify is recognized from ``exc`` itself; a connection closed during the opening
    handshake is examined with one :func:`probe_tls`: a ``ws://`` URL whose port speaks
    TLS, or a ``wss://`` server that closes right after the TLS handshake (it refused our
    client certificate, or the lack of one).
    """
    if is_fatal_tls_error(exc):
        return TLSError(describe_tls_failure(url, exc, ca))
    parts = urlsplit(url)
    if (
        not isinstance(exc, ConnectionClosed)
        or parts.hostname is None
        or parts.scheme not in ("ws", "wss")
    ):
        return None
    if exc.reason.startswith("WebSocket handshake failed"):
        return None  # the peer answered in HTTP: not a TLS problem
    secure = parts.scheme == "wss"
    port = parts.port or (443 if secure else 80)
    probe = await probe_tls(parts.hostname, port, context if secure else None, timeout)
    if not secure:
        if probe.speaks_tls:
            wss = urlunsplit(("wss", *parts[1:]))
            return TLSError(
                f"TLS: {url} speaks only TLS (the aggregator requires it): connect to {wss} "
                "and name the CA of its certificate with --ca or FEDSTACK_CA"
            )
        return None
    if probe.error is not None and is_fatal_tls_error(probe.error):
        return TLSError(describe_tls_failure(url, probe.error, ca))
    if probe.closed_after_handshake:
        if client_cert:
            return TLSError(
                f"TLS: {url} closed the connection right after the TLS handshake: it refused "
                "this agent's client certificate (--cert/--key); it must be signed by the CA "
                "the aggregator trusts (tls_client_ca)"
            )
        return TLSError(
            f"TLS: {url} closed the connection right after the TLS handshake: it requires a "
            "client certificate (mutual TLS); give one with --cert/--key"
        )
    return None


# ---------------------------------------------------------------------- test PKI
@dataclass(frozen=True)
class PKIFiles:
    """Paths written by :func:`make_test_pki`."""

    directory: Path
    ca: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    clients: dict[str, tuple[Path, Path]] = field(default_factory=dict)
    """agent name -> (certificate, key)."""

    def all_files(self) -> list[Path]:
        files = [self.ca, self.ca_key, self.server_cert, self.server_key]
        for cert, key in self.clients.values():
            files += [cert, key]
        return files


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _write(path: Path, data: bytes, private: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(path, flags, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        if private:
            os.fchmod(f.fileno(), 0o600)  # also when the file existed with other modes
        f.write(data)


def make_test_pki(
    out_dir: StrPath,
    hosts: Sequence[str] = ("localhost", "127.0.0.1"),
    agents: Iterable[str] = (),
    *,
    days: int = 365,
    overwrite: bool = False,
) -> PKIFiles:
    """Write a self-signed CA and certificates signed by it into ``out_dir``.

    Files: ``ca.pem``/``ca.key``, ``server.pem``/``server.key`` (subject alternative names:
    ``hosts``, each a DNS name or an IP address) and, per agent name,
    ``agent-NAME.pem``/``agent-NAME.key`` (client certificates for mutual TLS). Keys are
    ECDSA P-256, unencrypted, written with mode 0600. Meant for tests and trial
    deployments; a production deployment should use its own CA.

    Raises:
        TLSError: a file exists (without ``overwrite``), a host/agent name is invalid, or
            the ``certs`` extra (cryptography) is not installed.
    """
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError:
        raise TLSError(
            "making certificates needs cryptography: pip install 'fedstack[certs]'"
        ) from None

    hosts = list(hosts)
    agent_names = list(agents)
    if not hosts:
        raise TLSError("make_test_pki: at least one host name or IP address is needed")
    if days < 1:
        raise TLSError("make_test_pki: days must be at least 1")
    for name in agent_names:
        if not _NAME_RE.match(name):
            raise TLSError(
                f"make_test_pki: agent name {name!r} cannot be a file name "
                "(letters, digits, '.', '_', '-')"
            )
    if len(set(agent_names)) != len(agent_names):
        raise TLSError("make_test_pki: agent names repeat")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = PKIFiles(
        directory=out,
        ca=out / "ca.pem",
        ca_key=out / "ca.key",
        server_cert=out / "server.pem",
        server_key=out / "server.key",
        clients={n: (out / f"agent-{n}.pem", out / f"agent-{n}.key") for n in agent_names},
    )
    if not overwrite:
        existing = [str(p) for p in files.all_files() if p.exists()]
        if existing:
            raise TLSError(
                f"make_test_pki: {', '.join(existing)} already exist(s); "
                "choose another directory or overwrite (--force)"
            )

    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            if not re.match(r"^[A-Za-z0-9*]([A-Za-z0-9.*-]*[A-Za-z0-9])?$", h):
                raise TLSError(
                    f"make_test_pki: {h!r} is neither a host name nor an IP address"
                ) from None
            sans.append(x509.DNSName(h))

    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=days)

    def new_key() -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    def key_pem(k: ec.EllipticCurvePrivateKey) -> bytes:
        return k.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    ca_key = new_key()
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedstack test PKI"),
            x509.NameAttribute(NameOID.COMMON_NAME, "fedstack test CA"),
        ]
    )
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)

    def leaf(
        common_name: str, usage: x509.ObjectIdentifier, alt: list[x509.GeneralName] | None
    ) -> tuple[bytes, bytes]:
        key = new_key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedstack test PKI"),
                        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                    ]
                )
            )
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(aki, critical=False)
        )
        if alt:
            builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), key_pem(key)

    _write(files.ca, ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(files.ca_key, key_pem(ca_key), private=True)
    cert_pem, k_pem = leaf(hosts[0], ExtendedKeyUsageOID.SERVER_AUTH, sans)
    _write(files.server_cert, cert_pem, private=False)
    _write(files.server_key, k_pem, private=True)
    for name, (cert_path, key_path) in files.clients.items():
        cert_pem, k_pem = leaf(name, ExtendedKeyUsageOID.CLIENT_AUTH, None)
        _write(cert_path, cert_pem, private=False)
        _write(key_path, k_pem, private=True)
    return files
