"""TLS and mutual TLS for teacher servers.

``--tls-cert FILE --tls-key FILE`` serve over TLS (PEM files; the certificate
may be a chain, leaf first). Adding ``--tls-ca FILE`` turns on mutual TLS:
every client must present a certificate signed by one of the CAs in that
file, or the handshake fails before any RPC runs (health probes included, so
probes need a client certificate too).

Certificates are read once at startup; to rotate them, restart the teacher
(students fail over to the other replicas meanwhile).
"""

from __future__ import annotations

import grpc

from teacher_server.errors import ConfigError

__all__ = ["channel_credentials", "read_pem", "server_credentials"]


def read_pem(path: str, flag: str, kind: str) -> bytes:
    """Read a PEM file for ``flag``; a clear ConfigError if it is missing or not PEM ``kind``.

    ``kind`` is ``"CERTIFICATE"`` or ``"PRIVATE KEY"`` (matches RSA/EC/PKCS#8 keys).
    The file's content never appears in a message.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read {flag} {path!r}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data or kind.encode() not in data:
        raise ConfigError(f"{flag} {path!r} is not a PEM {kind.lower()} file "
                          f"(expected a '-----BEGIN ...{kind}-----' block)")
    return data


def server_credentials(cert: str, key: str, ca: str | None = None) -> grpc.ServerCredentials:
    """gRPC server credentials: TLS with ``cert``/``key``; with ``ca``, client certificates are required."""
    cert_pem = read_pem(cert, "--tls-cert", "CERTIFICATE")
    key_pem = read_pem(key, "--tls-key", "PRIVATE KEY")
    ca_pem = read_pem(ca, "--tls-ca", "CERTIFICATE") if ca else None
    _check_pair(cert_pem, key_pem, cert, key)
    return grpc.ssl_server_credentials([(key_pem, cert_pem)], root_certificates=ca_pem,
                                       require_client_auth=ca_pem is not None)


def _check_pair(cert_pem: bytes, key_pem: bytes, cert: str, key: str) -> None:
    """Fail at startup (not at the first handshake) if the key does not belong to the certificate."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
    except ImportError:  # optional: gRPC reports a mismatch at handshake time instead
        return
    try:
        leaf = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise ConfigError(f"--tls-cert {cert!r} is not a valid PEM certificate") from None
    try:
        private = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise ConfigError(f"--tls-key {key!r} is not an unencrypted PEM private key "
                          "(encrypted keys are not supported)") from None
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    if leaf.public_key().public_bytes(enc, fmt) != private.public_key().public_bytes(enc, fmt):
        raise ConfigError(f"--tls-key {key!r} does not match the certificate in --tls-cert {cert!r}")


def channel_credentials(ca: str | None = None, cert: str | None = None,
                        key: str | None = None, *,
                        names: tuple[str, str, str] = ("tls_ca", "tls_cert", "tls_key")) -> grpc.ChannelCredentials:
    """Client side: trust ``ca`` (None: the system roots); present ``cert``/``key`` for mutual TLS.

    ``names`` are how messages call the three settings: the keyword names for
    the library, ``("--tls-ca", "--tls-cert", "--tls-key")`` for a CLI.
    """
    ca_name, cert_name, key_name = names
    if (cert is None) != (key is None):
        raise ConfigError(f"{cert_name} and {key_name} go together (the client certificate and its key); "
                          f"got only {cert_name if key is None else key_name}")
    ca_pem = read_pem(ca, ca_name, "CERTIFICATE") if ca else None
    cert_pem = read_pem(cert, cert_name, "CERTIFICATE") if cert else None
    key_pem = read_pem(key, key_name, "PRIVATE KEY") if key else None
    return grpc.ssl_channel_credentials(root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem)
