"""Teacher registration, heartbeats and discovery in Redis; the embedded local Redis.

Teacher side: :class:`TeacherRegistration`. Student side: :class:`TeacherWatcher`
(or :func:`fetch_service` for a one-off read). Redis layout: :mod:`registry.keys`.
Errors: :mod:`registry.errors`. CLI: ``edistill registry ls|watch``
(:mod:`registry.cli`).
"""

from registry.connection import REDIS_CA_ENV, REGISTRY_URL_ENV, connect
from registry.discovery import ServiceView, fetch_service, list_services
from registry.embedded import EmbeddedRedis, find_redis_server
from registry.errors import (
    BadRecordError,
    EmbeddedRedisError,
    RegistryAuthError,
    RegistryConfigError,
    RegistryError,
    RegistryUnavailableError,
)
from registry.record import (
    MAX_RECORD_BYTES,
    SCHEMA_VERSION,
    TeacherRecord,
    decode_record,
    encode_record,
    new_teacher_id,
)
from registry.registration import TeacherRegistration
from registry.urls import redact_url
from registry.watcher import Snapshot, TeacherWatcher

__all__ = [
    "BadRecordError",
    "EmbeddedRedis",
    "EmbeddedRedisError",
    "MAX_RECORD_BYTES",
    "REDIS_CA_ENV",
    "REGISTRY_URL_ENV",
    "RegistryAuthError",
    "RegistryConfigError",
    "RegistryError",
    "RegistryUnavailableError",
    "SCHEMA_VERSION",
    "ServiceView",
    "Snapshot",
    "TeacherRecord",
    "TeacherRegistration",
    "TeacherWatcher",
    "connect",
    "decode_record",
    "encode_record",
    "fetch_service",
    "find_redis_server",
    "list_services",
    "new_teacher_id",
    "redact_url",
]
