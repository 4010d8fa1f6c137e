"""Teacher server lifecycle: build, start, announce, drain, stop.

:class:`TeacherServer` owns the grpc.aio server, the batcher and the
standard health service. Its seam for integrations is two lists of hooks,
each called with the advertised ``host:port``:

* ``on_ready`` -- after the server is SERVING (e.g. register in the registry,
  print the ready line);
* ``on_drain`` -- when shutdown starts, after health turns NOT_SERVING and
  before in-flight requests are drained (e.g. deregister).

Hooks may be plain or async callables. A failing ready hook aborts startup;
a failing drain hook is logged and draining continues.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import signal
import socket
import uuid
from typing import Awaitable, Callable, Iterable

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos.edistill.v1 import teacher_pb2 as pb
from protos.edistill.v1 import teacher_pb2_grpc as pb_grpc
from teacher_server.batcher import DynamicBatcher
from teacher_server.config import TeacherConfig
from teacher_server.auth import AuthInterceptor, TokenSet
from teacher_server.errors import ConfigError
from teacher_server.health import HealthServicer
from teacher_server.local import LocalListener, resolve_socket_path
from teacher_server.metrics import TeacherMetrics
from teacher_server.model import LoadedModel
from teacher_server.ports import WILDCARD_HOSTS as _WILDCARD_HOSTS, check_port_free
from teacher_server.security import DecodeGuardInterceptor
from teacher_server.servicer import SERVER_VERSION, TeacherServicer
from teacher_server.tls import server_credentials

__all__ = ["Hook", "SERVICE_NAME", "TeacherServer", "advertised_address", "create_server", "run", "serve"]

log = logging.getLogger(__name__)

#: Full name of the teacher service (also its health-check service name).
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Teacher"].full_name

#: A lifecycle hook: called with the advertised ``host:port``.
Hook = Callable[[str], "Awaitable[None] | None"]



def _server_options(config: TeacherConfig) -> list[tuple[str, int]]:
    return [
        # Explicit limits: gRPC's 4 MiB default is too small for real batches.
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_receive_message_length", config.max_message_bytes),
        # Off, so a second teacher on a taken fixed port fails loudly instead
        # of silently sharing it (Linux SO_REUSEPORT is gRPC's default).
        ("grpc.so_reuseport", 0),
        # Let students keep idle channels alive with pings every >= 10 s
        # without being sent GOAWAY "too_many_pings".
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


class TeacherServer:
    """A teacher: gRPC Teacher + health + reflection services over a dynamic batcher.

    Create it inside a running event loop (grpc.aio binds to it), then
    ``await start()`` and eventually ``await stop()``.
    """

    def __init__(self, config: TeacherConfig, model: LoadedModel, *, teacher_id: str | None = None) -> None:
        self.config = config
        self.model = model
        # Stable for the process lifetime; lets students tell replicas apart.
        self.teacher_id = teacher_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.on_ready: list[Hook] = []
        self.on_drain: list[Hook] = []
        # grpc.aio server interceptors, outermost first; add before start()
        # (e.g. authentication). With config.metrics_port set, the metrics
        # interceptor goes in front of them, so rejected calls are counted too.
        self.interceptors: list[grpc.aio.ServerInterceptor] = []
        # Prometheus metrics (teacher_server.metrics), when config.metrics_port is set.
        self.metrics: TeacherMetrics | None = None
        self.port: int | None = None
        self.batcher: DynamicBatcher | None = None
        self.health = HealthServicer()  # grpc's, with Watch streams that end at shutdown
        # The same-host transport's socket (teacher_server.local), when offered.
        self.local: LocalListener | None = None
        # The Teacher servicer, once started (teacher_server.swap replaces its model).
        self.servicer: TeacherServicer | None = None
        self._server: grpc.aio.Server | None = None
        self._stopping: asyncio.Task | None = None

    @property
    def address(self) -> str:
        """The advertised ``host:port`` (what clients and the registry should use)."""
        if self.port is None:
            raise RuntimeError("server not started")
        return advertised_address(self.config, self.port)

    @property
    def local_socket(self) -> str | None:
        """Absolute path of the same-host transport's Unix socket; None when not offered."""
        return None if self.local is None else self.local.path

    async def start(self) -> int:
        """Bind, start serving (gRPC and the local socket), mark SERVING, run ``on_ready`` hooks; return the port."""
        cfg = self.config
        if cfg.torch_threads is not None:
            torch.set_num_threads(cfg.torch_threads)
        self.batcher = DynamicBatcher(self.model, max_batch_size=cfg.max_batch_size,
                                      max_queue_delay_ms=cfg.max_queue_delay_ms, max_queue_size=cfg.max_queue_size,
                                      max_batch_tokens=cfg.max_batch_tokens)
        interceptors = list(self.interceptors) + self._security_interceptors()
        if cfg.metrics_port is not None:
            self.metrics = TeacherMetrics(model_name=cfg.model_name, model_version=cfg.model_version,
                                          device=str(self.model.device), precision=cfg.precision,
                                          version=SERVER_VERSION, model_load_s=self.model.load_s)
            self.metrics.attach(self.batcher)
            interceptors.insert(0, self.metrics.interceptor())
        server = grpc.aio.server(options=_server_options(cfg), interceptors=interceptors or None)
        servicer = self.servicer = TeacherServicer(cfg, self.model, self.batcher, self.teacher_id)
        pb_grpc.add_TeacherServicer_to_server(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            server)
        creds = server_credentials(cfg.tls_cert, cfg.tls_key, cfg.tls_ca) if cfg.tls_cert else None
        check_port_free(cfg.host, cfg.port, cfg.bind_address)  # one clear line instead of gRPC's bind error log
        try:
            port = (server.add_secure_port(cfg.bind_address, creds) if creds is not None
                    else server.add_insecure_port(cfg.bind_address))
        except RuntimeError as exc:
            raise ConfigError(f"cannot listen on {cfg.bind_address} ({exc}); is the port in use? "
                              "choose another --port, or --port 0 for a free one") from None
        if port == 0:  # older grpc signals failure this way
            raise ConfigError(f"cannot listen on {cfg.bind_address}; choose another --port, or --port 0")
        self._server = server
        self.port = port
        self.batcher.start()
        try:
            # Before gRPC starts, so every Describe answer names the socket.
            self._start_local(servicer)
        except BaseException:
            await self.stop(grace_s=0)
            raise
        await server.start()
        if self.metrics is not None:
            try:
                metrics_port = self.metrics.serve(cfg.host, cfg.metrics_port)
            except OSError as exc:
                await self.stop(grace_s=0)
                raise ConfigError(f"cannot serve metrics on {cfg.host}:{cfg.metrics_port} ({exc}); choose "
                                  "another --metrics-port, or 0 for a free one") from None
            log.info("teacher %s metrics on http://%s:%d/metrics", self.teacher_id,
                     self.address.rsplit(":", 1)[0], metrics_port)
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("teacher %s serving %s (%s) on %s, device %s, precision %s, max batch %d",
                 self.teacher_id, cfg.model_name, self.model.source, self.address, self.model.device,
                 cfg.precision, cfg.max_batch_size)
        try:
            for hook in self.on_ready:
                await _call(hook, self.address)
        except BaseException:
            await self.stop(grace_s=0)
            raise
        return port

    def _start_local(self, servicer: TeacherServicer) -> None:
        """Open the same-host transport's socket (``config.local_socket``) and tell Describe about it.

        With ``"auto"`` a socket that cannot be opened is logged and skipped
        (gRPC still serves); an explicit path that cannot be used is a
        ConfigError.
        """
        path = resolve_socket_path(self.config.local_socket, self.teacher_id)
        if path is None:
            return
        auth = getattr(self, "auth", None)
        listener = LocalListener(path, servicer, tokens=None if auth is None else auth.tokens, metrics=self.metrics)
        try:
            listener.start()
        except ConfigError as exc:
            if self.config.local_socket != "auto":
                raise
            log.warning("same-host transport off: %s (students on this machine use gRPC)", exc)
            return
        self.local = listener
        servicer.local_socket = path
        log.info("teacher %s local socket %s", self.teacher_id, path)

    def _security_interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """The bearer-token check, then the decode guard (SECURITY.md); innermost, after metrics."""
        self.auth = None
        if self.config.auth_enabled:
            self.auth = AuthInterceptor(TokenSet(self.config.auth_token_file, self.config.auth_tokens))
            return [self.auth, DecodeGuardInterceptor()]
        return [DecodeGuardInterceptor()]

    def reload_auth_tokens(self) -> None:
        """Re-read ``auth_token_file`` now (SIGHUP); the file is also re-read when it changes."""
        if getattr(self, "auth", None) is not None:
            self.auth.tokens.reload()

    async def stop(self, grace_s: float | None = None) -> None:
        """NOT_SERVING, ``on_drain`` hooks, stop accepting, drain in-flight work (up to ``grace_s``).

        Idempotent: a second call waits for the first to finish.
        """
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop(self.config.grace_s if grace_s is None else grace_s))
        await asyncio.shield(self._stopping)

    async def _stop(self, grace_s: float) -> None:
        # A server that never bound (port in use, bad TLS files) has nothing to drain: say nothing
        # at INFO, so the startup error is the one line a user sees.
        (log.info if self._server is not None else log.debug)("teacher %s draining (grace %.1fs)",
                                                              self.teacher_id, grace_s)
        # Load balancers and health probes see NOT_SERVING before we stop accepting.
        await self.health.enter_graceful_shutdown()
        if self.local is not None:
            # Same moment for the local socket: no new connections. Like gRPC,
            # open connections are served until the drain below starts.
            self.local.stop_accepting()
        if self.port is not None:
            for hook in self.on_drain:
                try:
                    await _call(hook, self.address)
                except Exception:
                    log.exception("drain hook %r failed; draining anyway", hook)
        # gRPC refuses new RPCs at once; in-flight handlers (gRPC and local)
        # finish while the batcher keeps running, or are cancelled after
        # grace_s. Both drain side by side, so grace_s bounds the pair.
        drains = []
        if self._server is not None:
            drains.append(self._server.stop(grace_s))
        if self.local is not None:
            drains.append(self.local.drain(grace_s))
        await asyncio.gather(*drains)
        if self.batcher is not None:
            await self.batcher.close()
        if self.metrics is not None:
            self.metrics.close()
        (log.info if self._server is not None else log.debug)("teacher %s stopped", self.teacher_id)

    async def wait_for_termination(self) -> None:
        """Wait until the gRPC server has terminated."""
        if self._server is not None:
            await self._server.wait_for_termination()


def _own_address() -> str:
    """This machine's address as others see it (a container's IP), else its hostname."""
    name = socket.gethostname()
    try:
        ip = socket.gethostbyname(name)
    except OSError:
        return name
    return name if ip.startswith("127.") else ip


def advertised_address(config: TeacherConfig, port: int) -> str:
    """``host:port`` to announce: ``config.advertise`` if set, else derived from the bind host."""
    adv = config.advertise
    if adv is not None:
        if adv.startswith("["):
            return adv if "]:" in adv else f"{adv}:{port}"
        if adv.count(":") == 1:
            return adv
        return f"[{adv}]:{port}" if ":" in adv else f"{adv}:{port}"
    host = config.host
    if host in _WILDCARD_HOSTS:
        host = _own_address()
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


async def _call(hook: Hook, address: str) -> None:
    result = hook(address)
    if inspect.isawaitable(result):
        await result


async def create_server(config: TeacherConfig, model: LoadedModel) -> tuple[TeacherServer, int]:
    """Build and start a :class:`TeacherServer` on the running loop; return it and its port."""
    server = TeacherServer(config, model)
    port = await server.start()
    return server, port


async def serve(
    config: TeacherConfig,
    model: LoadedModel,
    *,
    on_ready: Iterable[Hook] = (),
    on_drain: Iterable[Hook] = (),
    stop_signals: Iterable[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
    configure: Callable[[TeacherServer], None] | None = None,
) -> None:
    """Serve until one of ``stop_signals`` arrives, then drain and return.

    ``configure(server)`` runs before the server starts, for integrations
    that need the server object (e.g. :class:`teacher_server.registration.RegistryHook`).
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def _on_signal(sig: signal.Signals) -> None:
        if stop.is_set():
            log.warning("received %s again; still draining (at most grace_s=%.1fs)", sig.name, config.grace_s)
        else:
            log.info("received %s: shutting down", sig.name)
        stop.set()

    signals = list(stop_signals)
    for sig in signals:
        loop.add_signal_handler(sig, _on_signal, sig)
    server = TeacherServer(config, model)
    server.on_ready.extend(on_ready)
    server.on_drain.extend(on_drain)
    if configure is not None:
        configure(server)
    if config.auth_token_file:  # SIGHUP: re-read the token file (rotation without restart)
        loop.add_signal_handler(signal.SIGHUP, server.reload_auth_tokens)
        signals.append(signal.SIGHUP)
    try:
        await server.start()
        await stop.wait()
    finally:
        await server.stop()
        for sig in signals:
            loop.remove_signal_handler(sig)


def run(config: TeacherConfig, model: LoadedModel, **kwargs) -> int:
    """Blocking :func:`serve` for scripts and the CLI; returns exit code 0 after a clean drain."""
    asyncio.run(serve(config, model, **kwargs))
    return 0
