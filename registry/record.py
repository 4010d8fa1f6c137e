"""``TeacherRecord``: what a teacher tells students about itself, and its JSON form.

A record is small (at most :data:`MAX_RECORD_BYTES` encoded) and versioned
(:data:`SCHEMA_VERSION`). :func:`decode_record` checks size, JSON, schema
version and every field's type and range, and raises :class:`BadRecordError`
with a message naming what was wrong; discovery skips such records with a
warning. Unknown extra fields are ignored, so a newer teacher can add fields
without breaking older students; a different schema version is rejected.
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from registry.errors import BadRecordError, RegistryConfigError
from registry.keys import validate_name

__all__ = [
    "MAX_RECORD_BYTES",
    "SCHEMA_VERSION",
    "TeacherRecord",
    "decode_record",
    "encode_record",
    "new_teacher_id",
    "validate_endpoint",
]

SCHEMA_VERSION = 1
# A record is a handful of short strings and ints (~300 bytes); 4 KiB leaves
# room for growth while bounding what a hostile or buggy writer can make
# every student download and parse once per poll.
MAX_RECORD_BYTES = 4096
_MAX_TEXT_CHARS = 256

# host:port where host is a DNS name / IPv4 address, or [IPv6]:port.
_ENDPOINT_RE = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9._-]+)):(?P<port>\d{1,5})")


def new_teacher_id() -> str:
    """A fresh random teacher id (32 hex characters)."""
    return uuid.uuid4().hex


def validate_endpoint(endpoint: object) -> str:
    """Return ``endpoint`` if it is ``host:port`` or ``[ipv6]:port``, else raise.

    Wildcard hosts (``0.0.0.0``, ``[::]``) are refused: they are bind
    addresses, not addresses a student can dial; advertise a reachable one.

    Raises:
        BadRecordError: naming the bad value.
    """
    if not isinstance(endpoint, str):
        raise BadRecordError(f"endpoint must be a 'host:port' string, got {endpoint!r}")
    match = _ENDPOINT_RE.fullmatch(endpoint)
    if match is None or not 1 <= int(match["port"]) <= 65535:
        raise BadRecordError(f"endpoint must be 'host:port' with a port in 1-65535, got {endpoint!r}")
    host = match["v6"] or match["host"]
    if host in ("0.0.0.0", "::", "0:0:0:0:0:0:0:0"):
        raise BadRecordError(
            f"endpoint {endpoint!r} is a wildcard bind address; advertise an address "
            "that students can reach (e.g. the host's IP or DNS name)"
        )
    return endpoint


@dataclass(frozen=True)
class TeacherRecord:
    """One teacher's registry entry: where to reach it and what it serves.

    Frozen; derive changed copies with :meth:`replace`. Construction
    validates every field and raises :class:`BadRecordError` (a ValueError)
    naming the bad one. Times are unix seconds on the Redis server's clock
    and are filled in by :class:`registry.TeacherRegistration`.
    """

    endpoint: str  # "host:port" students dial; never a wildcard address
    service: str  # service name the teacher registers under
    model_name: str  # e.g. "resnet101"
    model_version: str = ""  # free-form, e.g. a checkpoint hash; "" if unknown
    max_batch_size: int = 1  # largest batch the teacher accepts in one request
    device: str = "cpu"  # e.g. "cuda:1"; informative only
    teacher_id: str = dataclasses.field(default_factory=new_teacher_id)  # unique per process
    in_flight: int = 0  # requests being computed now
    queued: int = 0  # requests waiting in the batcher's queue
    requests_total: int = 0  # requests served since start (lets `registry watch` show req/s)
    started_at: float = 0.0  # first registration; 0.0 = not registered yet
    updated_at: float = 0.0  # last heartbeat
    schema: int = SCHEMA_VERSION  # record format version

    def __post_init__(self) -> None:
        validate_endpoint(self.endpoint)
        try:
            validate_name(self.service, "service")
            validate_name(self.teacher_id, "teacher_id")
        except RegistryConfigError as exc:
            raise BadRecordError(str(exc)) from None
        for name in ("model_name", "model_version", "device"):
            value = getattr(self, name)
            if not isinstance(value, str) or len(value) > _MAX_TEXT_CHARS:
                raise BadRecordError(f"{name} must be a string of at most {_MAX_TEXT_CHARS} characters, got {value!r:.80}")
        if not self.model_name:
            raise BadRecordError("model_name must not be empty")
        for name, low in (("max_batch_size", 1), ("in_flight", 0), ("queued", 0), ("requests_total", 0)):
            value = getattr(self, name)
            if type(value) is not int or value < low:  # bool is not a count
                raise BadRecordError(f"{name} must be an integer >= {low}, got {value!r}")
        for name in ("started_at", "updated_at"):
            value = getattr(self, name)
            if type(value) not in (int, float) or not 0.0 <= value < 1e11:
                raise BadRecordError(f"{name} must be unix seconds >= 0, got {value!r}")
        if type(self.schema) is not int or self.schema != SCHEMA_VERSION:
            raise BadRecordError(
                f"record schema version {self.schema!r} is not supported (this edistill "
                f"reads version {SCHEMA_VERSION}); run the same edistill version on teachers and students"
            )

    @property
    def load(self) -> int:
        """Requests in flight plus queued: the teacher's current load."""
        return self.in_flight + self.queued

    def replace(self, **changes: Any) -> "TeacherRecord":
        """A validated copy with ``changes`` applied (field names as keywords)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise BadRecordError(f"unknown TeacherRecord field(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)


def encode_record(record: TeacherRecord) -> bytes:
    """Compact UTF-8 JSON of ``record``.

    Raises:
        BadRecordError: if the encoded record exceeds :data:`MAX_RECORD_BYTES`.
    """
    data = json.dumps(dataclasses.asdict(record), separators=(",", ":"), sort_keys=True).encode()
    if len(data) > MAX_RECORD_BYTES:
        raise BadRecordError(f"encoded record is {len(data)} bytes, over the {MAX_RECORD_BYTES}-byte limit")
    return data


_FIELDS = {f.name for f in dataclasses.fields(TeacherRecord)}
_REQUIRED = {"endpoint", "service", "model_name", "teacher_id", "schema"}


def decode_record(data: bytes | str) -> TeacherRecord:
    """Parse and validate a record written by :func:`encode_record`.

    Raises:
        BadRecordError: oversized, not UTF-8 JSON, nested too deeply, not an
            object, wrong schema version, a missing required field, or a field
            of the wrong type.
    """
    if len(data) > MAX_RECORD_BYTES:
        raise BadRecordError(f"record is {len(data)} bytes, over the {MAX_RECORD_BYTES}-byte limit")
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRecordError(f"record is not valid UTF-8 JSON: {exc}") from None
    except RecursionError:
        # 4 KiB of "[" nests deeper than the json module's recursion limit;
        # anyone who can write to Redis could otherwise crash `registry ls`
        # and freeze every student's discovery.
        raise BadRecordError("record is not a valid teacher record: JSON nested too deeply") from None
    if not isinstance(obj, dict):
        raise BadRecordError(f"record must be a JSON object, got {type(obj).__name__}")
    schema = obj.get("schema")
    if type(schema) is not int or schema != SCHEMA_VERSION:
        raise BadRecordError(
            f"record schema version {obj.get('schema')!r} is not supported (this edistill reads "
            f"version {SCHEMA_VERSION}); run the same edistill version on teachers and students"
        )
    missing = _REQUIRED - obj.keys()
    if missing:
        raise BadRecordError(f"record lacks required field(s): {', '.join(sorted(missing))}")
    # Unknown keys are ignored on purpose (forward compatibility within a schema version).
    return TeacherRecord(**{key: value for key, value in obj.items() if key in _FIELDS})
