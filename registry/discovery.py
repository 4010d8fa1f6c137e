"""Reading the live teachers of a service, and the list of services.

One read is three round trips, none of them ``KEYS``: ``TIME``; a pipeline of
``ZRANGEBYSCORE members now +inf`` and ``ZREMRANGEBYSCORE members -inf (now``
(opportunistic cleanup of expired members; skipped for read-only ACL users);
``MGET`` of the live members' record keys. See :mod:`registry.keys`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import redis
from redis import exceptions as redis_exc

from registry import keys
from registry.connection import server_time_ms
from registry.errors import BadRecordError
from registry.record import TeacherRecord, decode_record

__all__ = ["ServiceView", "fetch_service", "fetch_views", "list_services"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServiceView:
    """What one read of a service found.

    Attributes:
        service: the service name.
        server_time_s: the Redis server's clock at the read (unix seconds).
        teachers: live teachers by endpoint. If two live teachers claim one
            endpoint, the most recently started wins.
        bad: teacher id -> why its record was skipped (malformed, wrong schema,
            oversized, or not matching its key).
        next_expiry_s: the earliest expiry time (server clock) among the live
            members, or None if there are none: a teacher whose heartbeat
            stopped leaves at that moment without any event, so a watcher
            re-reads then instead of waiting for its next poll.
    """

    service: str
    server_time_s: float
    teachers: dict[str, TeacherRecord] = field(default_factory=dict)
    bad: dict[str, BadRecordError] = field(default_factory=dict)
    next_expiry_s: float | None = None


def fetch_service(client: redis.Redis, service: str, *, prune: bool = True) -> ServiceView:
    """Read the live teachers of ``service``.

    Args:
        client: from :func:`registry.connect`.
        service: service name.
        prune: also remove expired members (needs write permission; a
            NOPERM answer is ignored).

    Raises:
        redis.RedisError: callers map it with :func:`registry.connection.map_redis_error`.
    """
    members_key = keys.members_key(service)
    now_ms = server_time_ms(client)
    pipe = client.pipeline(transaction=False)
    pipe.zrangebyscore(members_key, now_ms, "+inf", withscores=True)
    if prune:
        pipe.zremrangebyscore(members_key, "-inf", f"({now_ms}")
    results = pipe.execute(raise_on_error=False)
    if isinstance(results[0], Exception):
        raise results[0]
    if prune and isinstance(results[1], redis_exc.ResponseError):
        logger.debug("cannot prune expired members of %s: %s", service, results[1])
    ids = [raw.decode(errors="replace") for raw, _ in results[0]]
    view = ServiceView(service=service, server_time_s=now_ms / 1000.0,
                       next_expiry_s=min(score for _, score in results[0]) / 1000.0 if ids else None)
    if not ids:
        return view
    blobs = client.mget([keys.record_key(service, teacher_id) for teacher_id in ids])
    for teacher_id, blob in zip(ids, blobs):
        if blob is None:
            continue  # record expired a moment before its score: gone
        try:
            record = decode_record(blob)
            if record.teacher_id != teacher_id or record.service != service:
                raise BadRecordError(
                    f"record names teacher {record.teacher_id!r} of service {record.service!r} "
                    f"but is stored as {teacher_id!r} of {service!r}"
                )
        except BadRecordError as exc:
            view.bad[teacher_id] = exc
            continue
        current = view.teachers.get(record.endpoint)
        if current is None or record.started_at > current.started_at:
            view.teachers[record.endpoint] = record
    return view


def list_services(client: redis.Redis, *, include_idle: bool = False) -> list[str]:
    """Names of services that have (or, with ``include_idle``, recently had) live teachers.

    Services whose last heartbeat is more than a day old are pruned.
    """
    now_ms = server_time_ms(client)
    pipe = client.pipeline(transaction=False)
    pipe.zrangebyscore(keys.SERVICES_KEY, "-inf" if include_idle else now_ms, "+inf")
    pipe.zremrangebyscore(keys.SERVICES_KEY, "-inf", f"({now_ms - keys.HOUSEKEEPING_TTL_MS}")
    results = pipe.execute(raise_on_error=False)
    if isinstance(results[0], Exception):
        raise results[0]
    return sorted(raw.decode(errors="replace") for raw in results[0])


def fetch_views(client: redis.Redis, service: str | None) -> list[ServiceView]:
    """One read of ``service`` (or of every service with live teachers), without pruning.

    Raises:
        RegistryConfigError: ``service`` is not a valid name (named as ``--service``).
    """
    names = [keys.validate_name(service, "--service")] if service else list_services(client)
    return [fetch_service(client, name, prune=False) for name in names]
