"""Redis URL helpers that keep secrets out of logs and error messages.

Every place in ``registry`` that puts a URL into a log line or an exception
message passes it through :func:`redact_url`; text that may echo a URL or a
password back (e.g. a redis-py error message) goes through :func:`scrub`.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

__all__ = ["REDACTED", "redact_url", "scrub", "url_password"]

REDACTED = "***"

# Query parameters that redis-py's from_url() accepts and that carry secrets.
_SECRET_QUERY_KEYS = frozenset({"password", "ssl_password"})


def url_password(url: str) -> str | None:
    """The password carried by a Redis URL (userinfo or ``?password=``), or None."""
    try:
        scheme, sep, rest = url.partition("://")
        if sep and _ambiguous_userinfo(url):  # unescaped "/?#" in the password: see redact_url
            _, colon, password = rest.rpartition("@")[0].partition(":")
            return unquote(password) if colon and password else None
        parts = urlsplit(url)
        if parts.password:
            return unquote(parts.password)
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key in _SECRET_QUERY_KEYS and value:
                return value
    except ValueError:
        return None
    return None


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (the user name is kept).

    >>> redact_url("redis://alice:s3cret@redis:6379/0")
    'redis://alice:***@redis:6379/0'
    >>> redact_url("rediss://:s3cret@redis:6380/0?password=x")
    'rediss://:***@redis:6380/0?password=%2A%2A%2A'

    A password that was not percent-escaped (``redis://:p@ss/w:rd#1@host/0``)
    makes the URL ambiguous: ``/``, ``?`` or ``#`` in it end the authority
    early, and the rest of the password lands in the path, query or
    fragment. When an ``@`` shows up there, everything up to the last ``@``
    is taken as user info and redacted (over-redacting rather than leaking).
    A string that cannot be parsed as a URL is not echoed at all.
    """
    try:
        scheme, sep, rest = url.partition("://")
        if sep and _ambiguous_userinfo(url):
            userinfo, _, tail = rest.rpartition("@")
            user, colon, _ = userinfo.partition(":")
            # Keep the user name only if it is unambiguous; a password never survives.
            shown = f"{user}:{REDACTED}" if colon and not any(c in user for c in "/?#") else REDACTED
            tail = redact_url(f"{scheme}://{tail}").partition("://")[2]  # ?password= in the tail
            return f"{scheme}://{shown}@{tail}"
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, hostport = netloc.rpartition("@")
            user, sep, _password = userinfo.partition(":")
            netloc = f"{user}:{REDACTED}@{hostport}" if sep else f"{userinfo}@{hostport}"
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            if any(key in _SECRET_QUERY_KEYS for key, _ in pairs):
                query = urlencode(
                    [(k, REDACTED if k in _SECRET_QUERY_KEYS else v) for k, v in pairs],
                    quote_via=quote,
                )
        if netloc == parts.netloc and query == parts.query:
            return url
        # Built by hand: urlunsplit drops the empty authority of unix:///path.
        text = f"{parts.scheme}://{netloc}{parts.path}" if parts.scheme else f"{netloc}{parts.path}"
        return text + (f"?{query}" if query else "") + (f"#{parts.fragment}" if parts.fragment else "")
    except ValueError:
        return "<unparseable Redis URL>"


# redis-py URL options whose values may legitimately contain "@" (file paths, names).
_AT_OK_QUERY_KEYS = frozenset({"password_file", "ssl_ca_certs", "ssl_ca_path", "ssl_certfile", "ssl_keyfile", "client_name"})


def _ambiguous_userinfo(url: str) -> bool:
    """Whether an "@" appears after the parsed authority (an unescaped ``/?#`` in user info)."""
    parts = urlsplit(url)
    if "@" in parts.fragment:
        return True
    if "@" in parts.path and not (parts.scheme == "unix" and not parts.netloc):  # unix:///a@b/sock is a path
        return True
    if "@" not in parts.query:
        return False
    for piece in parts.query.split("&"):
        key, eq, _ = piece.partition("=")
        if "@" in piece and (not eq or "@" in key or key not in _AT_OK_QUERY_KEYS):
            return True
    return False


def scrub(text: str, url: str) -> str:
    """``text`` with ``url`` and its password replaced by redacted forms."""
    if url and url in text:
        text = text.replace(url, redact_url(url))
    password = url_password(url)
    if password:
        text = text.replace(password, REDACTED)
        quoted = quote(password, safe="")
        if quoted != password:
            text = text.replace(quoted, REDACTED)
    return text
