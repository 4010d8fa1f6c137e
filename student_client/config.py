"""Typed configuration of the teacher pool and the reader's channels."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from .backoff import ExponentialBackoff
from .errors import ConfigError

__all__ = ["DEFAULT_MAX_MESSAGE_BYTES", "PoolConfig"]

#: 256 MiB, the same default as the teacher server (teacher_server.config):
#: gRPC's 4 MiB default is smaller than one 64x3x224x224 float32 batch.
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024


def _positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name} must be a finite number {'>=' if allow_zero else '>'} 0, got {value!r}")


@dataclass(frozen=True)
class PoolConfig:
    """How a :class:`~student_client.pool.TeacherPool` talks to its teachers.

    Attributes:
        timeout_s: deadline of every Predict call. A hung teacher costs at most
            this long before its batch is re-sent elsewhere; 30 s leaves room for
            a big teacher on a busy GPU.
        wait_timeout_s: with batches waiting and no teacher answering anything
            for this long, every waiting batch fails with
            NoTeacherAvailableError. 60 s rides out a teacher restart or a
            registry hiccup; keep it >= timeout_s so a slow but alive teacher is
            not mistaken for none.
        max_in_flight_per_teacher: requests one teacher holds at a time. 4 keeps
            a batching server's queue fed while limiting what a dying teacher
            strands (those requests are re-sent anyway).
        max_server_error_attempts: how many INTERNAL/UNKNOWN answers one batch
            may get (each from a different teacher where possible) before the
            pool gives up with TeacherRequestError: a batch that crashes three
            teachers is a bug to report, not to retry forever.
        backoff: circuit-breaker backoff for a failing teacher.
        latency_ewma_alpha: weight of the newest latency sample in the
            load-balancing estimate.
        latency_samples: per-teacher latency samples kept for percentiles.
        max_message_bytes: max send and receive message size on every channel.
        keepalive_time_s: HTTP/2 keepalive ping interval, or None (default) for
            none: gRPC servers by default answer pings more frequent than every
            5 minutes with GOAWAY (too_many_pings), and every call already
            carries a deadline that catches a silent teacher.
        reconnect_backoff_max_s: cap on gRPC's own reconnect backoff, so a
            teacher restarted at the same address is reconnected within ~2 s
            (gRPC's default cap is 120 s).
        probe_timeout_s: deadline of the health check every new teacher
            (from a registry or from ``teachers=[...]``) must pass, answering
            SERVING over its real channel (TLS and token included), before it
            gets any batch (:mod:`.probe`). 2 s covers a TLS handshake across a
            datacenter; an endpoint that never answers (a blackholed address,
            a port that is not a teacher) costs at most this long per probe,
            and failed probes are repeated after ``backoff``. The first probe
            starts at once, so a healthy teacher is used after one round trip.
            None turns the check off (teachers are used as soon as they are
            added), e.g. for a custom transport without a health service.
        hedge_after_s: a request outstanding this long is also sent to a
            second teacher; the first answer wins and the other call is
            cancelled (each batch is still delivered once). It catches a
            teacher that is frozen without its connection breaking (SIGSTOP,
            a hung GPU driver, a blackholed host), which otherwise costs
            ``timeout_s``. ``"auto"`` (default): max(``hedge_min_s``, 4 x the
            teacher's p99 latency), once 8 answers give a p99 (a teacher
            without them is compared with the others; with no answers at
            all nothing is hedged); 4 x p99 keeps hedges to stuck teachers.
            A number: that many seconds. None: never hedge.
        hedge_min_s: lower bound of the auto threshold, so fast teachers are
            not hedged on scheduling hiccups (0.5 s is far above a GC pause
            or a loaded box's jitter, far below ``timeout_s``).
        local_transport: ``"auto"`` (default): a teacher on this machine that
            offers a local socket (and runs as the same user) is sent batches
            over it, as shared memory, once it has passed its health check
            over gRPC (:mod:`.local`); it costs the student far less CPU per
            batch than gRPC. ``"off"``: gRPC only. :meth:`from_env` (what a
            pool uses when it is given no config) reads it from
            ``EDISTILL_LOCAL_TRANSPORT``. Local answers are read by the thread
            that waits in a batch future's ``result()`` (what DistillReader
            does), or, for a future with a done-callback (a composite
            source), by the pool's dispatcher as soon as they arrive; code
            that only polls ``done()`` gets them within the dispatcher's
            0.1 s tick.
    """

    timeout_s: float = 30.0
    wait_timeout_s: float = 60.0
    max_in_flight_per_teacher: int = 4
    max_server_error_attempts: int = 3
    backoff: ExponentialBackoff = field(default_factory=ExponentialBackoff)
    latency_ewma_alpha: float = 0.2
    latency_samples: int = 1024
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    keepalive_time_s: float | None = None
    reconnect_backoff_max_s: float = 2.0
    probe_timeout_s: float | None = 2.0
    hedge_after_s: float | str | None = "auto"
    hedge_min_s: float = 0.5
    local_transport: str = "auto"

    def __post_init__(self) -> None:
        _positive("timeout_s", self.timeout_s)
        _positive("wait_timeout_s", self.wait_timeout_s)
        for name in ("max_in_flight_per_teacher", "max_server_error_attempts", "latency_samples",
                     "max_message_bytes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {v!r}")
        if not 0.0 < self.latency_ewma_alpha <= 1.0:
            raise ConfigError(f"latency_ewma_alpha must be in (0, 1], got {self.latency_ewma_alpha!r}")
        if self.keepalive_time_s is not None:
            _positive("keepalive_time_s", self.keepalive_time_s)
        _positive("reconnect_backoff_max_s", self.reconnect_backoff_max_s)
        if self.probe_timeout_s is not None:
            _positive("probe_timeout_s", self.probe_timeout_s)
        if self.hedge_after_s is not None and self.hedge_after_s != "auto":
            _positive("hedge_after_s (a number of seconds, \"auto\" or None)", self.hedge_after_s)
        _positive("hedge_min_s", self.hedge_min_s)
        if self.local_transport not in ("auto", "off"):
            raise ConfigError(f"local_transport must be 'auto' or 'off' (EDISTILL_LOCAL_TRANSPORT), "
                              f"got {self.local_transport!r}")
        if not isinstance(self.backoff, ExponentialBackoff):
            raise ConfigError(f"backoff must be an ExponentialBackoff, got {type(self.backoff).__name__}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **fields: Any) -> "PoolConfig":
        """The defaults, with what the environment sets (:mod:`student_client.env`), then ``fields``."""
        from .env import pool_config_fields

        return cls(**{**pool_config_fields(environ), **fields})

    def replace(self, **fields: Any) -> "PoolConfig":
        """A copy with ``fields`` changed (validated again)."""
        return replace(self, **fields)

    def channel_options(self) -> list[tuple[str, int]]:
        """gRPC channel options for one teacher channel (documented inline)."""
        opts = [
            # Batches and soft labels are far above gRPC's 4 MiB default; the
            # teacher sets the same limit on its side.
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            # Reconnect quickly to a teacher that restarts at the same address;
            # the pool's circuit breaker already spaces out our own probes.
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", int(self.reconnect_backoff_max_s * 1000)),
            # No retry policy (service config) is set: the pool retries and
            # fails over itself, counting every attempt. gRPC's transparent
            # retries (a request that never left this process) remain on.
        ]
        if self.keepalive_time_s is not None:
            # Ping only while calls are in flight; the teacher must allow this
            # interval (grpc.http2.min_ping_interval_without_data_ms) or it
            # will close the connection with too_many_pings.
            opts += [
                ("grpc.keepalive_time_ms", int(self.keepalive_time_s * 1000)),
                ("grpc.keepalive_timeout_ms", 10_000),
                ("grpc.keepalive_permit_without_calls", 0),
            ]
        return opts
