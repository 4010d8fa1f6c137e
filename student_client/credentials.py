"""How a student proves who it is to teachers, and checks who the teachers are.

::

    creds = TeacherCredentials(auth_token_file="/run/secrets/edistill-token",
                               tls_ca="ca.pem", tls_cert="student.pem", tls_key="student.key")
    pool = TeacherPool(teachers, outputs, credentials=creds)
    DistillReader(loader, pool)

or, the same from the environment (what containers do; no secret on a command line)::

    EDISTILL_AUTH_TOKEN=...            # or EDISTILL_AUTH_TOKEN_FILE=/path (one token; first line used)
    EDISTILL_TLS_CA=ca.pem             # turns TLS on; verify teachers against this CA
    EDISTILL_TLS_CERT=student.pem      # mutual TLS: the student's own certificate...
    EDISTILL_TLS_KEY=student.key       # ...and key
    EDISTILL_TLS_SERVER_NAME=teacher   # expected name in teacher certificates (IP endpoints)

With none of them set, channels are plaintext without a token (the default
for loopback and trusted networks). The token travels in the
``authorization: Bearer <token>`` metadata of every call; a token file is
re-read when it changes, so a rotated token is picked up without a restart.
Secrets never appear in ``repr`` or in error messages.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from ._tls import channel_credentials
from .errors import ConfigError

__all__ = ["TeacherCredentials"]

# How often (at most) a token file is checked for changes.
_TOKEN_RECHECK_S = 1.0


@dataclass(frozen=True)
class TeacherCredentials:
    """Token and TLS settings for teacher channels.

    Attributes:
        auth_token: bearer token sent on every call (repr hides it).
        auth_token_file: file whose first non-comment line is the token;
            re-read when it changes (rotation without restart).
        tls: use TLS. Implied by any tls_* field; ``tls=True`` alone trusts
            the system's root CAs.
        tls_ca: PEM CA bundle the teachers' certificates must chain to.
        tls_cert, tls_key: the student's certificate and key (mutual TLS).
        tls_server_name: name expected in every teacher's certificate instead
            of the endpoint's host (for IP endpoints from a registry).
    """

    auth_token: str | None = field(default=None, repr=False)
    auth_token_file: str | None = None
    tls: bool = False
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_server_name: str | None = None

    def __post_init__(self) -> None:
        if self.auth_token is not None and self.auth_token_file is not None:
            raise ConfigError("give auth_token or auth_token_file, not both")
        if self.auth_token is not None:
            tok = self.auth_token.strip()
            if not tok or any(c.isspace() for c in tok):
                raise ConfigError("auth_token must be a non-empty token without whitespace")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls_cert and tls_key go together (the student's certificate and its key)")
        for name in ("auth_token_file", "tls_ca", "tls_cert", "tls_key"):
            path = getattr(self, name)
            if path is not None and not os.path.isfile(path):
                raise ConfigError(f"{name} {path!r} is not a readable file")
        if any((self.tls_ca, self.tls_cert, self.tls_server_name)):
            object.__setattr__(self, "tls", True)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> "TeacherCredentials | None":
        """Credentials from ``EDISTILL_*`` variables, with explicit ``overrides`` winning; None if nothing is set."""
        from .env import credential_fields

        values: dict[str, Any] = credential_fields(environ)
        given = {k: v for k, v in overrides.items() if v is not None}
        if "auth_token" in given or "auth_token_file" in given:  # an explicit token replaces the env's
            values.pop("auth_token", None), values.pop("auth_token_file", None)
        values.update(given)
        return cls(**values) if values else None

    @property
    def has_token(self) -> bool:
        """True if a token or token file is configured."""
        return self.auth_token is not None or self.auth_token_file is not None

    def token_getter(self) -> Callable[[], str | None]:
        """``() -> the current token`` (a token file is re-read when it changes), or None without one."""
        if not self.has_token:
            return lambda: None
        source = _TokenSource(self.auth_token, self.auth_token_file)

        def current() -> str | None:
            meta = source.metadata()
            return meta[0][1].removeprefix("Bearer ") if meta else None

        return current

    def channel_factory(self):
        """``(endpoint, options) -> channel`` for :class:`~student_client.pool.TeacherPool`."""
        token = _TokenSource(self.auth_token, self.auth_token_file) if self.has_token else None
        creds = None
        if self.tls:
            creds = channel_credentials(self.tls_ca, self.tls_cert, self.tls_key)  # ConfigError on bad PEM
        server_name = self.tls_server_name

        def factory(endpoint: str, options: Sequence[tuple[str, Any]]):
            import grpc

            opts = list(options)
            if creds is not None:
                if server_name:
                    # Check teachers' certificates against this name, not the dialled host.
                    opts.append(("grpc.ssl_target_name_override", server_name))
                channel = grpc.secure_channel(endpoint, creds, options=opts)
            else:
                channel = grpc.insecure_channel(endpoint, options=opts)
            if token is not None:
                channel = grpc.intercept_channel(channel, _BearerInterceptor(token))
            return channel

        return factory


class _TokenSource:
    """The current token: fixed, or the first token line of a file (re-read when it changes)."""

    def __init__(self, token: str | None, path: str | None) -> None:
        self._fixed = token.strip() if token else None
        self._path = path
        self._lock = threading.Lock()
        self._stamp: tuple | None = None
        self._value: tuple[tuple[str, str], ...] = ()
        self._next_check = 0.0
        if path is not None:
            self._read()

    def _read(self) -> None:
        try:
            st = os.stat(self._path)
            with open(self._path, encoding="utf-8") as f:
                lines = [ln.strip() for ln in f.read().splitlines()]
        except (OSError, UnicodeDecodeError) as exc:
            if self._stamp is None:
                raise ConfigError(f"cannot read auth_token_file {self._path!r}: {exc}") from None
            return  # keep the last good token
        toks = [ln for ln in lines if ln and not ln.startswith("#")]
        if not toks:
            if self._stamp is None:
                raise ConfigError(f"auth_token_file {self._path!r} holds no token")
            return
        self._stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        self._value = (("authorization", f"Bearer {toks[0]}"),)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        if self._fixed is not None:
            return (("authorization", f"Bearer {self._fixed}"),)
        now = time.monotonic()
        if now >= self._next_check:
            with self._lock:
                if now >= self._next_check:
                    self._next_check = now + _TOKEN_RECHECK_S
                    try:
                        st = os.stat(self._path)
                        if (st.st_mtime_ns, st.st_size, st.st_ino) != self._stamp:
                            self._read()
                    except OSError:
                        pass
        return self._value


def _bearer_interceptor_base():
    import grpc

    return grpc.UnaryUnaryClientInterceptor


class _BearerInterceptor(_bearer_interceptor_base()):
    """Adds ``authorization: Bearer <token>`` to every unary call."""

    def __init__(self, token: _TokenSource) -> None:
        self._token = token

    def intercept_unary_unary(self, continuation, client_call_details, request):
        details = client_call_details._replace(
            metadata=tuple(client_call_details.metadata or ()) + self._token.metadata())
        return continuation(details, request)
