"""Client-side TLS for teacher channels: PEM files -> ``grpc.ChannelCredentials``.

The student's own copy of what a teacher does on the server side
(``teacher_server/tls.py``), so ``student_client`` needs no ``teacher_server``
import (docs/internals.md: only a student that also serves imports it) and
raises student-side :class:`~student_client.errors.ConfigError`. File contents
never appear in a message.
"""

from __future__ import annotations

from .errors import ConfigError

__all__ = ["channel_credentials", "read_pem"]


def read_pem(path: str, name: str, kind: str) -> bytes:
    """The bytes of PEM file ``path`` (setting ``name``), which must hold a ``kind`` block.

    ``kind`` is ``"CERTIFICATE"`` or ``"PRIVATE KEY"`` (matches RSA/EC/PKCS#8 keys).

    Raises:
        ConfigError: unreadable, or not a PEM ``kind`` file.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read {name} {path!r}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data or kind.encode() not in data:
        raise ConfigError(f"{name} {path!r} is not a PEM {kind.lower()} file "
                          f"(expected a '-----BEGIN ...{kind}-----' block)")
    return data


def channel_credentials(ca: str | None = None, cert: str | None = None, key: str | None = None):
    """``grpc.ChannelCredentials`` trusting ``ca`` (None: the system roots), presenting ``cert``/``key`` (mutual TLS).

    Raises:
        ConfigError: only one of cert/key, or a file that is not the PEM it should be.
    """
    import grpc

    if (cert is None) != (key is None):
        raise ConfigError("tls_cert and tls_key go together (the student's certificate and its key); "
                          f"got only {'tls_cert' if key is None else 'tls_key'}")
    ca_pem = read_pem(ca, "tls_ca", "CERTIFICATE") if ca else None
    cert_pem = read_pem(cert, "tls_cert", "CERTIFICATE") if cert else None
    key_pem = read_pem(key, "tls_key", "PRIVATE KEY") if key else None
    return grpc.ssl_channel_credentials(root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem)
