"""Bearer-token authentication for the Teacher service.

A student sends ``authorization: Bearer <token>`` in the call metadata (the
common gRPC convention, see :mod:`student_client.credentials`); the
:class:`AuthInterceptor` checks it on every ``edistill.v1.Teacher`` RPC and
answers UNAUTHENTICATED otherwise. The standard health service and server
reflection stay open, so load balancers and probes need no token.

Tokens come from a file (``--auth-token-file``, one token per line, ``#``
comments and blank lines ignored) and/or the ``EDISTILL_AUTH_TOKEN``
environment variable (one token, or several separated by commas). Several
tokens are accepted at once, so rotation is: add the new token to the file,
roll the students over, remove the old one. The file is re-read when it
changes (checked at most once per :data:`RELOAD_CHECK_S` seconds on the RPC
path) and on SIGHUP, so rotation needs no restart.

Tokens are never logged, never put in an exception message and never shown
in ``repr``; comparisons are constant time (``hmac.compare_digest`` over
SHA-256 digests, every accepted token checked, no early exit).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
import time
from typing import Iterable

import grpc

from teacher_server.errors import ConfigError

__all__ = ["AUTH_TOKEN_ENV", "AuthInterceptor", "RELOAD_CHECK_S", "TokenSet", "parse_tokens"]

log = logging.getLogger(__name__)

#: Environment variable with the accepted token(s) (comma-separated), read by
#: teachers and students alike, so secrets need not be on a command line.
AUTH_TOKEN_ENV = "EDISTILL_AUTH_TOKEN"

#: How often (at most) the RPC path stats the token file for changes.
RELOAD_CHECK_S = 1.0

#: RPCs that stay open without a token: health probes and server reflection.
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

# Tokens are opaque strings; this only keeps whitespace and separators out,
# so a line from a file means the same as the same token in the environment.
_MAX_TOKEN_CHARS = 4096


def parse_tokens(text: str, *, where: str, sep: str | None = None) -> list[str]:
    """Tokens in ``text``: one per line (or per ``sep``), ``#`` comments and blanks skipped.

    Raises:
        ConfigError: a token contains whitespace or is too long (never echoing the token).
    """
    parts = text.split(sep) if sep else text.splitlines()
    tokens = []
    for n, raw in enumerate(parts, 1):
        tok = raw.strip()
        if not tok or tok.startswith("#"):
            continue
        if any(c.isspace() for c in tok) or len(tok) > _MAX_TOKEN_CHARS:
            raise ConfigError(f"{where}: token #{n} contains whitespace or is longer than {_MAX_TOKEN_CHARS} "
                              "characters; put one token per line")
        tokens.append(tok)
    return tokens


def _digest(token: str | bytes) -> bytes:
    return hashlib.sha256(token.encode() if isinstance(token, str) else token).digest()


class TokenSet:
    """The accepted bearer tokens: from a file (re-read when it changes) and/or fixed ones.

    Args:
        token_file: path of the token file (one per line), or None.
        tokens: fixed tokens (e.g. from ``EDISTILL_AUTH_TOKEN``).

    Raises:
        ConfigError: the file cannot be read, or no token is configured at all
            (an empty token set would lock everyone out silently).
    """

    def __init__(self, token_file: str | None = None, tokens: Iterable[str] = ()) -> None:
        self.token_file = token_file
        self._fixed = [_digest(t) for t in tokens]
        self._file_digests: list[bytes] = []
        self._file_stamp: tuple | None = None
        self._next_check = 0.0
        self._lock = threading.Lock()
        if token_file is not None:
            self._load_file(initial=True)
        if not self._fixed and not self._file_digests:
            where = f"--auth-token-file {token_file!r}" if token_file else AUTH_TOKEN_ENV
            raise ConfigError(f"{where} holds no token; add at least one token (one per line)")

    def __repr__(self) -> str:  # never the tokens themselves
        return f"TokenSet(file={self.token_file!r}, tokens={len(self)})"

    def __len__(self) -> int:
        return len(self._fixed) + len(self._file_digests)

    def _stamp(self) -> tuple:
        st = os.stat(self.token_file)
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _load_file(self, *, initial: bool = False) -> None:
        path = self.token_file
        try:
            stamp = self._stamp()
            with open(path, encoding="utf-8") as f:
                text = f.read()
            digests = [_digest(t) for t in parse_tokens(text, where=f"--auth-token-file {path!r}")]
        except (OSError, UnicodeDecodeError, ConfigError) as exc:
            msg = exc if isinstance(exc, ConfigError) else f"cannot read --auth-token-file {path!r}: {exc}"
            if initial:
                raise ConfigError(str(msg)) from None
            # Keep serving with the tokens we have: a half-written file must not lock everyone out.
            log.warning("%s; keeping the %d token(s) loaded before", msg, len(self._file_digests))
            return
        if not digests and not self._fixed:
            if initial:
                raise ConfigError(f"--auth-token-file {path!r} holds no token; add at least one (one per line)")
            log.warning("--auth-token-file %r is now empty; keeping the %d token(s) loaded before",
                        path, len(self._file_digests))
            return
        changed = digests != self._file_digests
        self._file_digests = digests
        self._file_stamp = stamp
        if changed and not initial:
            log.info("reloaded %d token(s) from %s", len(digests), path)

    def reload(self) -> None:
        """Re-read the token file now (SIGHUP)."""
        if self.token_file is not None:
            with self._lock:
                self._load_file()

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if self.token_file is None or now < self._next_check:
            return
        with self._lock:
            if now < self._next_check:
                return
            self._next_check = now + RELOAD_CHECK_S
            try:
                stamp = self._stamp()
            except OSError:
                stamp = None
            if stamp != self._file_stamp:
                self._load_file()

    def check(self, token: str | bytes) -> bool:
        """True if ``token`` is accepted. Constant time in the token's content."""
        self._maybe_reload()
        got = _digest(token)
        ok = False
        for want in (*self._fixed, *self._file_digests):
            ok |= hmac.compare_digest(got, want)
        return ok

    def check_metadata(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
        """None if the metadata carries an accepted bearer token, else why not (no secret in it)."""
        values = [v for k, v in (metadata or ()) if k == "authorization"]
        if not values:
            return ("missing 'authorization: Bearer <token>' metadata; this teacher requires a token: "
                    f"set {AUTH_TOKEN_ENV} or pass auth_token=/auth_token_file= to the student")
        value = values[0].decode("latin-1") if isinstance(values[0], bytes) else values[0]
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return "the 'authorization' metadata must be 'Bearer <token>'"
        if not self.check(token.strip()):
            return "the bearer token is not accepted by this teacher; check the student's token"
        return None


def _reject_handler(message: str) -> grpc.RpcMethodHandler:
    async def reject(request, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    # No deserializer: a rejected request is never parsed.
    return grpc.unary_unary_rpc_method_handler(reject)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Answers UNAUTHENTICATED to Teacher RPCs without an accepted bearer token."""

    def __init__(self, tokens: TokenSet) -> None:
        self.tokens = tokens
        self.rejected = 0  # counter for tests and metrics (event-loop thread only)

    async def intercept_service(self, continuation, handler_call_details):
        """Let a call through if it carries an accepted bearer token or is a probe; reject it otherwise.

        Health and reflection stay open; every other method (``edistill.v1``
        RPCs and unknown ones) without an accepted ``authorization: Bearer``
        token gets a handler that answers UNAUTHENTICATED before the request
        is parsed.
        """
        method = handler_call_details.method or ""
        # Everything but the probe services needs a token (unknown methods too,
        # so an unauthenticated caller cannot even enumerate what exists).
        if not method.startswith(OPEN_PREFIXES):
            why = self.tokens.check_metadata(handler_call_details.invocation_metadata)
            if why is not None:
                self.rejected += 1
                log.debug("rejected %s: %s", method, why)
                return _reject_handler(why)
        return await continuation(handler_call_details)
