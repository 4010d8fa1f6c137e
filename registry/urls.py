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

    A string that cannot be parsed as a URL is not echoed at all.
    """
    try:
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
