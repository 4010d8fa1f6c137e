"""Building redis-py clients from URLs, and mapping redis errors at the boundary.

:func:`connect` understands every URL that redis-py's ``from_url`` does:
``redis://[[user]:password@]host[:port][/db]``, ``rediss://`` (TLS; options
such as ``?ssl_cert_reqs=required&ssl_ca_certs=/path`` in the query string)
and ``unix:///path/to.sock``. One option is edistill's own:
``?password_file=/path`` reads the password from that file (its first line),
so a URL can be printed, logged and put on a command line without the
secret (``edistill registry serve`` prints such a URL). For ``rediss://`` the CA that signed the Redis
server's certificate comes from the URL (``?ssl_ca_certs=/path/ca.pem``) or,
when the URL names none, from ``$EDISTILL_REDIS_CA`` (:data:`REDIS_CA_ENV`),
so one URL works on machines that keep the CA in different places; without
either, the system's root CAs are trusted. The server certificate is always
verified (redis-py's default ``ssl_cert_reqs=required`` and host name check).
Clients never retry on their own: the
registration and the watcher own the retry policy (they retry every
heartbeat/poll), and redis-py's default exponential backoff would otherwise
stall a heartbeat for seconds while Redis is down.
"""

from __future__ import annotations

import os
import ssl
from urllib.parse import parse_qs, parse_qsl, quote, urlencode, urlsplit

import redis
from redis import exceptions as redis_exc
from redis.backoff import NoBackoff
from redis.retry import Retry

from registry.errors import (
    RegistryAuthError,
    RegistryConfigError,
    RegistryError,
    RegistryUnavailableError,
)
from registry.urls import _ambiguous_userinfo, redact_url, scrub, url_password

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT_S",
    "DEFAULT_SOCKET_TIMEOUT_S",
    "PASSWORD_FILE_OPTION",
    "REDIS_CA_ENV",
    "REGISTRY_URL_ENV",
    "connect",
    "map_redis_error",
    "server_time_ms",
]

# A URL with a password on a command line is visible in `ps`; CLIs read the
# registry URL from this environment variable when no --registry is given.
REGISTRY_URL_ENV = "EDISTILL_REGISTRY"
# PEM CA bundle for rediss:// URLs that carry no ?ssl_ca_certs= of their own.
REDIS_CA_ENV = "EDISTILL_REDIS_CA"
# URL query option (ours, removed before redis-py sees the URL): read the password from this file.
PASSWORD_FILE_OPTION = "password_file"

# Long enough for a busy Redis across a datacenter, short enough that a
# heartbeat (1 s default) notices an outage within a couple of beats.
DEFAULT_SOCKET_TIMEOUT_S = 2.0
DEFAULT_CONNECT_TIMEOUT_S = 2.0
# Pooled connections idle longer than this are PINGed before use, so a Redis
# restart is detected on the first command instead of failing it.
DEFAULT_HEALTH_CHECK_INTERVAL_S = 10

_LOCAL_HINT = (
    "'local' means an embedded Redis started by this process (e.g. `edistill teacher "
    "serve --registry local`); here give the URL of a running Redis, e.g. redis://HOST:6379/0, or the "
    "URL that `edistill registry serve` prints"
)


def connect(
    url: str,
    *,
    socket_timeout_s: float = DEFAULT_SOCKET_TIMEOUT_S,
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
    health_check_interval_s: int = DEFAULT_HEALTH_CHECK_INTERVAL_S,
) -> redis.Redis:
    """A redis-py client for ``url`` (no I/O happens until the first command).

    Args:
        url: ``redis://``, ``rediss://`` or ``unix://`` URL, as redis-py's
            ``Redis.from_url`` understands it (password, ACL user, db, TLS options).
        socket_timeout_s: per-command read/write timeout.
        connect_timeout_s: TCP (and TLS) connect timeout.
        health_check_interval_s: idle time after which a pooled connection is
            PINGed before reuse.

    Raises:
        RegistryConfigError: the URL is not a Redis URL (the message shows it
            with its password redacted).
    """
    if not isinstance(url, str) or not url:
        raise RegistryConfigError(f"a Redis URL is required (e.g. redis://HOST:6379/0 or ${REGISTRY_URL_ENV}), got {url!r}")
    if url == "local":
        raise RegistryConfigError(_LOCAL_HINT)
    if _ambiguous_userinfo(url):
        # redis-py would dial a "host" made of part of the password and echo it in its error.
        raise RegistryConfigError(
            f"the Redis URL {redact_url(url)!r} has an '@' after its host part: a password (or user) "
            "containing '/', '?' or '#' must be percent-escaped, e.g. urllib.parse.quote(password, safe='')")
    url, extra = _password_file_option(url)
    extra.update(_tls_options(url))
    try:
        return redis.Redis.from_url(
            url,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=connect_timeout_s,
            health_check_interval=health_check_interval_s,
            retry=Retry(NoBackoff(), 0),
            **extra,
        )
    except (ValueError, TypeError) as exc:
        raise RegistryConfigError(
            f"invalid Redis URL {redact_url(url)!r}: {scrub(str(exc), url)}; expected "
            "redis://[[user]:password@]host[:port][/db], rediss://... or unix:///path"
        ) from exc


def read_password_file(path: str, what: str, *, read_hint: str = "", empty_hint: str = "") -> str:
    """The first line of the password file ``path``, without its line end.

    Args:
        what: the file as messages name it (e.g. ``"--password-file '/etc/pw'"``).
        read_hint, empty_hint: appended to the unreadable / empty file's message.

    Raises:
        RegistryConfigError: the file cannot be read, or its first line is empty.
    """
    try:
        with open(path, encoding="utf-8") as f:
            password = f.readline().rstrip("\r\n")
    except OSError as exc:
        raise RegistryConfigError(f"cannot read {what}: {exc.strerror}{read_hint}") from None
    if not password:
        raise RegistryConfigError(f"{what} is empty; its first line is the password{empty_hint}")
    return password


def _password_file_option(url: str) -> tuple[str, dict]:
    """``url`` without ``?password_file=PATH`` and ``{"password": <its first line>}`` (else ``url, {}``)."""
    try:
        parts = urlsplit(url)
        pairs = parse_qsl(parts.query, keep_blank_values=True)
    except ValueError:
        return url, {}  # from_url reports the bad URL
    paths = [v for k, v in pairs if k == PASSWORD_FILE_OPTION]
    if not paths:
        return url, {}
    shown = redact_url(url)
    if len(paths) > 1 or not paths[0]:
        raise RegistryConfigError(f"the Redis URL {shown!r} needs exactly one non-empty ?{PASSWORD_FILE_OPTION}=PATH")
    if url_password(url):
        raise RegistryConfigError(f"the Redis URL {shown!r} has both a password and ?{PASSWORD_FILE_OPTION}=; "
                                  "keep one of them")
    password = read_password_file(paths[0], f"the Redis password file {paths[0]!r} (?{PASSWORD_FILE_OPTION}= in "
                                  f"{shown!r})", read_hint="; check the path and that this user may read it")
    rest = urlencode([(k, v) for k, v in pairs if k != PASSWORD_FILE_OPTION], quote_via=quote)
    # By hand: urlunsplit drops the empty authority of unix:///path.
    base = f"{parts.scheme}://{parts.netloc}{parts.path}" + (f"?{rest}" if rest else "")
    return base + (f"#{parts.fragment}" if parts.fragment else ""), {"password": password}


def _tls_options(url: str) -> dict:
    """``ssl_ca_certs`` from ``$EDISTILL_REDIS_CA`` for a rediss:// URL without one; checks the CA file exists."""
    if not url.startswith("rediss://"):
        return {}
    try:
        query = parse_qs(urlsplit(url).query)
    except ValueError:
        return {}  # from_url reports the bad URL
    given = query.get("ssl_ca_certs", [None])[0]
    env = os.environ.get(REDIS_CA_ENV) or None
    path, source = (given, "ssl_ca_certs in the registry URL") if given else (env, f"${REDIS_CA_ENV}")
    if path is None:
        return {}
    if not os.path.isfile(path):
        raise RegistryConfigError(
            f"the Redis CA file {path!r} ({source}) is not a readable file; give the PEM file of the CA "
            f"that signed the Redis server's certificate")
    return {} if given else {"ssl_ca_certs": path}


def map_redis_error(exc: BaseException, url: str, action: str) -> RegistryError:
    """The registry error for a redis-py (or socket) error raised while doing ``action``.

    Use as ``raise map_redis_error(exc, url, "registering") from exc``. The
    message names the action and the redacted URL and never the password.
    """
    where = redact_url(url)
    detail = scrub(str(exc) or type(exc).__name__, url)
    if isinstance(exc, (redis_exc.AuthenticationError, redis_exc.AuthorizationError, redis_exc.NoPermissionError)) or (
        isinstance(exc, redis_exc.ResponseError) and str(exc).startswith(("NOAUTH", "WRONGPASS", "NOPERM"))
    ):
        return RegistryAuthError(
            f"Redis at {where} refused {action}: {detail}; check the user/password in the "
            "registry URL and the ACL permissions of that user"
        )
    if isinstance(exc, ssl.SSLError) or "CERTIFICATE_VERIFY_FAILED" in detail or "SSL:" in detail:
        return RegistryUnavailableError(
            f"Redis at {where} failed while {action}: {detail}; the Redis server's TLS certificate was not "
            f"accepted: give the CA that signed it (?ssl_ca_certs=/path/ca.pem in the URL or ${REDIS_CA_ENV}) "
            "and make sure the certificate names the host in the URL")
    return RegistryUnavailableError(f"Redis at {where} failed while {action}: {detail}")


def server_time_ms(client: redis.Redis) -> int:
    """The Redis server's clock (``TIME``) in unix milliseconds.

    All registry timestamps use the server clock, so the clocks of teacher
    and student machines never need to agree.
    """
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000
