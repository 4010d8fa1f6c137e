"""Prometheus metrics of one teacher server (``--metrics-port``).

Each :class:`TeacherMetrics` owns its own ``CollectorRegistry`` (never the
process-global one), so several servers in one process (tests, codistillation
peers) never clash, and serves it over HTTP at ``http://HOST:PORT/metrics``.

Metrics (names follow Prometheus conventions: base units, ``_total`` on
counters):

======================================  =========  ==============================================
name                                    type       what
======================================  =========  ==============================================
edistill_teacher_requests_total         counter    finished unary RPCs by ``method`` (``Predict``,
                                                   ``Describe``, ``Check``; ``LocalPredict`` for
                                                   requests over the same-host socket) and gRPC
                                                   ``code`` (``OK``, ``INVALID_ARGUMENT``,
                                                   ``RESOURCE_EXHAUSTED``, ...)
edistill_teacher_samples_total          counter    samples answered (rows of successful forward
                                                   passes)
edistill_teacher_batches_total          counter    forward passes, by ``outcome`` (ok/failed)
edistill_teacher_batch_size             histogram  samples per forward pass
edistill_teacher_queue_seconds          histogram  per request: time from arrival in the batcher
                                                   to the start of its forward pass
edistill_teacher_compute_seconds        histogram  per forward pass: concat, forward, split
edistill_teacher_in_flight_requests     gauge      unary RPCs and local requests being handled
                                                   right now
edistill_teacher_queue_depth            gauge      requests waiting for a batch slot
edistill_teacher_tokens_total           counter    sequence models: tokens in forward passes
                                                   (rows x longest length), by ``kind``
                                                   (``real`` or ``padding``)
edistill_teacher_padding_ratio          histogram  sequence models, per forward pass: padded
                                                   tokens / tokens in the pass (padding waste)
edistill_teacher_model_load_seconds     gauge      time to load and warm up the model
edistill_teacher_build_info             gauge      always 1; labels ``version``, ``model``,
                                                   ``model_version``, ``device``, ``precision``
======================================  =========  ==============================================

Requests are counted by a grpc.aio server interceptor
(:meth:`TeacherMetrics.interceptor`) that wraps unary handlers; streaming
RPCs (health ``Watch``, reflection) pass through uncounted. Requests over the
same-host socket are counted by :class:`teacher_server.local.LocalListener`
(a refused LocalHello is not a request and is not counted). Batches are
counted by a :class:`~teacher_server.batcher.DynamicBatcher` listener.

Concurrency: counters are updated on the server's event loop (interceptor
and batcher listener); the HTTP thread only reads them, and
``prometheus_client`` metrics are thread-safe.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest, start_http_server

from teacher_server.batcher import BatchRecord, DynamicBatcher

__all__ = ["MetricsInterceptor", "TeacherMetrics"]

log = logging.getLogger(__name__)

# Powers of two up to 4096: batch sizes are usually 2^k or sums of small
# requests, and max_batch_size rarely exceeds a few thousand samples.
_BATCH_SIZE_BUCKETS = tuple(float(2 ** i) for i in range(13))
# 100 us .. 30 s: queue time is ~max_queue_delay_ms when idle and grows with
# load; compute time spans tiny CPU MLPs to large GPU models.
_SECONDS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                    0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class TeacherMetrics:
    """The metric families of one teacher, in a private registry.

    Args:
        model_name, model_version, device, precision: ``build_info`` labels.
        version: the edistill server version (``build_info``).
        model_load_s: seconds the model took to load (``model_load_seconds``).
    """

    def __init__(self, *, model_name: str, model_version: str, device: str, precision: str,
                 version: str, model_load_s: float = 0.0) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("edistill_teacher_requests", "Finished unary RPCs by method and gRPC status code.",
                                ("method", "code"), registry=r)
        self.samples = Counter("edistill_teacher_samples", "Samples answered (rows of successful forward passes).",
                               registry=r)
        self.batches = Counter("edistill_teacher_batches", "Forward passes by outcome (ok or failed).",
                               ("outcome",), registry=r)
        self.batch_size = Histogram("edistill_teacher_batch_size", "Samples per forward pass.",
                                    buckets=_BATCH_SIZE_BUCKETS, registry=r)
        self.queue_seconds = Histogram("edistill_teacher_queue_seconds",
                                       "Per request: time waiting in the batcher before its forward pass.",
                                       buckets=_SECONDS_BUCKETS, registry=r)
        self.compute_seconds = Histogram("edistill_teacher_compute_seconds",
                                         "Per forward pass: concat, forward, split and transforms.",
                                         buckets=_SECONDS_BUCKETS, registry=r)
        self.in_flight = Gauge("edistill_teacher_in_flight_requests", "Unary RPCs being handled now.", registry=r)
        self.queue_depth = Gauge("edistill_teacher_queue_depth", "Requests waiting for a batch slot.", registry=r)
        self.tokens = Counter("edistill_teacher_tokens", "Sequence models: tokens in forward passes by kind "
                              "(real or padding added to merge lengths).", ("kind",), registry=r)
        self.padding_ratio = Histogram("edistill_teacher_padding_ratio",
                                       "Sequence models: padded tokens / tokens per forward pass.",
                                       buckets=(0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0), registry=r)
        self.model_load_seconds = Gauge("edistill_teacher_model_load_seconds",
                                        "Seconds the model took to load and warm up.", registry=r)
        self.model_load_seconds.set(model_load_s)
        self.build_info = Gauge("edistill_teacher_build_info", "Always 1; labels describe the server and model.",
                                ("version", "model", "model_version", "device", "precision"), registry=r)
        self.build_info.labels(version, model_name, model_version, device, precision).set(1)
        # Pre-create the common series so dashboards see zeros, not gaps.
        for method in ("Predict", "Describe", "LocalPredict"):
            self.requests.labels(method, "OK")
        for outcome in ("ok", "failed"):
            self.batches.labels(outcome)
        self._http = None
        self._http_thread = None

    # ---------------------------------------------------------------- hooks

    def observe_batch(self, record: BatchRecord) -> None:
        """Batcher listener: one executed forward pass."""
        self.batches.labels("failed" if record.failed else "ok").inc()
        self.batch_size.observe(record.batch_size)
        for q_ms in record.queue_ms:
            self.queue_seconds.observe(q_ms / 1000.0)
        if not record.failed:
            self.samples.inc(record.batch_size)
            self.compute_seconds.observe(record.compute_ms / 1000.0)
        if record.tokens:
            self.tokens.labels("real").inc(record.tokens - record.padded_tokens)
            self.tokens.labels("padding").inc(record.padded_tokens)
            self.padding_ratio.observe(record.padded_tokens / record.tokens)

    def attach(self, batcher: DynamicBatcher) -> None:
        """Listen to ``batcher``'s batches and report its queue depth."""
        batcher.add_listener(self.observe_batch)
        # Read at scrape time from the HTTP thread: len() of a deque is atomic.
        self.queue_depth.set_function(lambda: batcher.queue_depth)

    def interceptor(self) -> "MetricsInterceptor":
        """A grpc.aio server interceptor counting requests by method and code."""
        return MetricsInterceptor(self)

    # ----------------------------------------------------------------- HTTP

    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics`` on ``host:port`` (0 = a free port) in a daemon thread; return the port."""
        host = host.strip("[]") or "0.0.0.0"
        self._http, self._http_thread = start_http_server(port, addr=host, registry=self.registry)
        return int(self._http.server_port)

    @property
    def port(self) -> int | None:
        """The HTTP port, once :meth:`serve` ran."""
        return None if self._http is None else int(self._http.server_port)

    def text(self) -> str:
        """The current exposition text (what ``/metrics`` answers)."""
        return generate_latest(self.registry).decode()

    def close(self) -> None:
        """Stop the HTTP server (idempotent)."""
        http, self._http = self._http, None
        if http is not None:
            http.shutdown()
            http.server_close()
        if self._http_thread is not None:
            self._http_thread.join(timeout=5.0)
            self._http_thread = None


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts unary RPCs by method and final status code; tracks those in flight.

    Composable: pass it in the server's ``interceptors`` list next to others
    (e.g. authentication). Placed after an auth interceptor, it counts only
    authenticated calls; placed before, it also counts rejected ones.
    """

    def __init__(self, metrics: TeacherMetrics) -> None:
        self._m = metrics

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """Wrap unary-unary handlers to count each call and its status code (streaming ones pass through).

        Outermost interceptor, so calls that later interceptors reject (auth,
        undecodable bytes) are counted too.
        """
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.response_streaming \
                or handler.unary_unary is None:
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]
        inner = handler.unary_unary
        m = self._m

        async def counted(request: Any, context: grpc.aio.ServicerContext) -> Any:
            m.in_flight.inc()
            code = "UNKNOWN"
            try:
                result = await inner(request, context)
                code = _code_name(context, default="OK")
                return result
            except grpc.aio.AbortError:
                code = _code_name(context, default="UNKNOWN")  # abort() set the code
                raise
            except BaseException as exc:  # noqa: B036 -- counted, then re-raised
                code = "CANCELLED" if isinstance(exc, asyncio.CancelledError) else _code_name(context, "UNKNOWN")
                raise
            finally:
                m.in_flight.dec()
                m.requests.labels(method, code).inc()

        return grpc.unary_unary_rpc_method_handler(
            counted, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)


def _code_name(context: grpc.aio.ServicerContext, default: str) -> str:
    try:
        code = context.code()
    except Exception:  # older grpc: no code() on aio contexts
        return default
    if code is None:
        return default
    if isinstance(code, grpc.StatusCode):
        return code.name
    try:  # grpc may hand back the raw cygrpc integer
        return next(c.name for c in grpc.StatusCode if c.value[0] == int(code))
    except (StopIteration, TypeError, ValueError):
        return default
