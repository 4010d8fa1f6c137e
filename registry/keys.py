"""The Redis layout of the registry: every key name is built here.

Layout (``{svc}`` is the service name; the braces are literal Redis Cluster
hash tags, so all keys of one service live in one slot)::

    edistill:services                      ZSET  member = service name,
                                                 score  = latest expiry (unix ms) of any
                                                          of its teachers.
                                                 Lets ``registry ls`` list services
                                                 without KEYS. Entries whose score is
                                                 more than a day old are pruned by readers.
    edistill:svc:{svc}:members             ZSET  member = teacher_id,
                                                 score  = expiry time (unix ms, Redis
                                                          server clock) = now + ttl,
                                                          refreshed by every heartbeat.
    edistill:svc:{svc}:teacher:<id>        STRING the teacher's JSON record
                                                 (:mod:`registry.record`, <= 4 KiB),
                                                 written with ``SET ... PX ttl`` on every
                                                 heartbeat, so it vanishes by itself one
                                                 TTL after the last heartbeat.
    edistill:svc:{svc}:events              pub/sub channel: JSON ``{"event": "join" |
                                                 "leave", "teacher_id", "endpoint"}``.
                                                 Only a hint to re-read: readers never
                                                 trust the payload, the keys above are the
                                                 truth, and polling covers lost messages.

A teacher is *live* when its member score is >= the Redis server's ``TIME``
and its record key exists. Readers take ``TIME``, then ``ZRANGEBYSCORE
members now +inf`` and ``MGET`` of the record keys, and remove expired members
with ``ZREMRANGEBYSCORE members -inf (now`` on the way. So a SIGKILLed teacher
disappears within one TTL even if nobody cleans up, and ``KEYS``/``SCAN`` are
never used.

Clocks: every timestamp (scores, ``started_at``, ``updated_at``) comes from
the Redis server's ``TIME``, never from the local clock, so clock skew between
teachers and students does not matter. The members ZSET and the services ZSET
get a one-day ``PEXPIRE`` on every heartbeat so an abandoned service leaves
nothing behind.

Teachers are keyed by ``teacher_id`` rather than by endpoint, so a teacher
restarted on the same ``host:port`` can never delete its successor's entry.
"""

from __future__ import annotations

import re

from registry.errors import RegistryConfigError

__all__ = [
    "KEY_PREFIX",
    "SERVICES_KEY",
    "channel",
    "members_key",
    "record_key",
    "validate_name",
]

KEY_PREFIX = "edistill"
SERVICES_KEY = f"{KEY_PREFIX}:services"

# Housekeeping TTL of the two ZSETs (renewed by every heartbeat): long enough
# that no live deployment ever sees it, short enough that a forgotten service
# does not linger forever.
HOUSEKEEPING_TTL_MS = 24 * 3600 * 1000

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def validate_name(value: object, what: str) -> str:
    """Return ``value`` if it is a valid service name or teacher id, else raise.

    Names are 1-128 characters of letters, digits, ``.``, ``_`` and ``-``,
    starting with a letter or digit, so they are safe inside key names.

    Raises:
        RegistryConfigError: naming the bad value.
    """
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise RegistryConfigError(
            f"{what} must be 1-128 characters of letters, digits, '.', '_' or '-' "
            f"starting with a letter or digit, got {value!r}"
        )
    return value


def members_key(service: str) -> str:
    """ZSET of the service's teacher ids scored by expiry time (unix ms)."""
    return f"{KEY_PREFIX}:svc:{{{service}}}:members"


def record_key(service: str, teacher_id: str) -> str:
    """STRING holding one teacher's JSON record, with a TTL."""
    return f"{KEY_PREFIX}:svc:{{{service}}}:teacher:{teacher_id}"


def channel(service: str) -> str:
    """Pub/sub channel of the service's join/leave events."""
    return f"{KEY_PREFIX}:svc:{{{service}}}:events"
