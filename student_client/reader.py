"""DistillReader: the user's data loader with teacher outputs attached.

::

    with DistillReader(loader, teachers=["10.0.0.5:50051", "10.0.0.6:50051"],
                       outputs=[OutputSpec("logits", "log_probs", temperature=4.0)]) as reader:
        for epoch in range(epochs):
            for (images, labels), teacher in reader:   # batch exactly as the loader yields it
                loss = kd_loss(student(images), teacher["logits"], labels=labels, temperature=4.0,
                               teacher_transform="log_probs", ce_weight=0.5)

The reader keeps a bounded window of batches in flight: while the training
loop works on batch i, batches i+1 .. i+window-1 are already with the
teachers. Batches are delivered in loader order, each exactly once (the
knowledge source resolves each request once; retries and failover happen
there). Each ``iter(reader)`` starts a new epoch over ``iter(loader)``.
Leaving a loop early (``break``, an exception) or calling :meth:`close`
cancels the batches still in flight.

Threading: a reader is used from one thread (the training loop). It starts no
thread of its own: batches are pulled from the loader and submitted in the
caller's thread between steps, and teacher answers arrive through futures.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
import weakref
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

from .config import PoolConfig
from .errors import ConfigError, NoTeacherAvailableError
from .inputs import batch_rows, make_input_fn
from .outputs import OutputSpec, TeacherValue, normalize_outputs
from .sources import KnowledgeSource
from .stats import ReaderStats
from .transfer import move_outputs, should_pin

if TYPE_CHECKING:
    import torch

__all__ = ["DistillReader"]

logger = logging.getLogger(__name__)


def _avoid_fork_with_grpc(loader: Any) -> None:
    """Start a DataLoader's workers with ``forkserver`` instead of ``fork``.

    The reader keeps gRPC threads busy (calls in flight, health checks) while
    the loader forks its workers at every ``iter()``; a child forked while one
    of those threads holds an internal gRPC/abseil lock can abort
    ("Mutex::Fer with pending CondVar queueing": the worker dies with SIGABRT
    and the DataLoader raises "worker exited unexpectedly"). It is rare but
    real (seen once in five runs of the test suite). ``forkserver`` workers
    start from a clean server process that never ran gRPC. A loader with an
    explicit ``multiprocessing_context`` is left alone; pass one (e.g.
    ``"spawn"``) to choose yourself. The dataset must then be picklable, as
    it must be on macOS and Windows anyway.
    """
    try:
        from torch.utils.data import DataLoader
    except ImportError:  # pragma: no cover - torch is a dependency
        return
    if not isinstance(loader, DataLoader) or loader.num_workers == 0 or loader.multiprocessing_context is not None:
        return
    import multiprocessing

    if multiprocessing.get_start_method(allow_none=True) not in (None, "fork"):
        return  # the process default is already spawn/forkserver
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return
    loader.multiprocessing_context = "forkserver"
    logger.info("DataLoader workers will start with 'forkserver' instead of 'fork': forking a process with "
                "live gRPC threads can crash workers; pass multiprocessing_context= to the DataLoader to choose")


class DistillReader:
    """Iterate ``(batch, teacher_outputs)`` over a data loader.

    Exactly one of ``teachers``, ``registry`` (with ``service``) or ``source``
    says where teacher outputs come from.

    Args:
        loader: any iterable of batches (typically a ``torch.utils.data.DataLoader``,
            with or without workers, any batch structure); iterated once per epoch.
        teachers: ``["host:port", ...]`` teacher servers (a :class:`TeacherPool` is
            created and closed with the reader).
        registry: Redis URL of the teacher registry; the reader follows the
            live teachers of ``service``.
        service: the registry service name (required with ``registry``).
        source: any :class:`KnowledgeSource`; the caller keeps ownership
            (the reader does not close it).
        outputs: teacher outputs to request: names or :class:`OutputSpec`
            (default ``("logits",)``); with ``source``, the source decides.
        window: batches in flight at once (submitted, not yet delivered). 8
            hides a teacher latency of up to ~7 training steps; raise it with
            many teachers (about 2 x teachers x max_in_flight_per_teacher / 4).
        timeout_s: deadline of each teacher call (overrides ``pool_config``).
        wait_timeout_s: give up with NoTeacherAvailableError when no teacher
            has answered for this long (overrides ``pool_config``).
        teacher_input: ``batch -> tensor | dict[name, tensor]`` picking what is
            sent; default: first element of a tuple/list, ``"input"`` of a dict,
            or the tensor batch itself.
        device: move teacher outputs there (pinned memory + ``non_blocking``
            for CUDA); default: leave them on the CPU.
        pool_config: full :class:`PoolConfig` for ``teachers``/``registry``.
        registry_poll_s: registry polling interval (the watcher's default if None).
        channel_factory, stub_factory: passed to the :class:`TeacherPool`.
        credentials: token and TLS settings for teacher channels
            (:class:`~student_client.credentials.TeacherCredentials`).
        auth_token, auth_token_file, tls_ca, tls_cert, tls_key, tls_server_name:
            shorthand for the same fields; unset ones come from
            ``EDISTILL_AUTH_TOKEN[_FILE]``/``EDISTILL_TLS_*`` (see SECURITY.md).
        progress: show a tqdm bar per epoch on stderr with samples/s, live
            teachers and the share of time spent waiting on teachers.
        log_every: log the same numbers (:meth:`ReaderStats.summary`) at INFO
            every N delivered batches; None: never.

    Raises:
        ConfigError: conflicting or invalid arguments.
    """

    def __init__(self, loader: Iterable[Any], *, teachers: Sequence[str] | None = None,
                 registry: str | None = None, service: str | None = None,
                 source: KnowledgeSource | None = None,
                 outputs: Sequence[str | OutputSpec] | str | OutputSpec | None = None,
                 window: int = 8, timeout_s: float | None = None, wait_timeout_s: float | None = None,
                 teacher_input: Callable[[Any], Any] | None = None,
                 device: "str | torch.device | None" = None, pool_config: PoolConfig | None = None,
                 registry_poll_s: float | None = None, channel_factory=None, stub_factory=None,
                 credentials=None, auth_token: str | None = None, auth_token_file: str | None = None,
                 tls_ca: str | None = None, tls_cert: str | None = None, tls_key: str | None = None,
                 tls_server_name: str | None = None,
                 progress: bool = False, log_every: int | None = None) -> None:
        if not hasattr(loader, "__iter__"):
            raise ConfigError(f"loader must be iterable (e.g. a DataLoader), got {type(loader).__name__}")
        chosen = [n for n, v in (("teachers", teachers), ("registry", registry), ("source", source)) if v is not None]
        if len(chosen) != 1:
            raise ConfigError(
                "DistillReader needs exactly one of teachers=['host:port', ...], registry='redis://...' "
                f"(with service=...) or source=KnowledgeSource; got {', '.join(chosen) or 'none'}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ConfigError(f"window must be an int >= 1, got {window!r}")
        if registry is None and service is not None:
            raise ConfigError("service= only makes sense with registry=; pass registry='redis://host:6379/0'")
        self._loader = loader
        _avoid_fork_with_grpc(loader)
        self._window = window
        self._inputs_of = make_input_fn(teacher_input)
        self._device = None
        self._pin = False
        if device is not None:
            import torch

            try:
                self._device = torch.device(device)
            except (RuntimeError, TypeError) as exc:
                raise ConfigError(f"invalid device {device!r}: {exc}") from exc
            if self._device.type == "cuda":  # else torch fails deep inside after the first answer
                if not torch.cuda.is_available():
                    raise ConfigError(f"device {device!r}: CUDA is not available to this torch "
                                      "(torch.cuda.is_available() is False); use device='cpu' or a CUDA build")
                if self._device.index is not None and self._device.index >= torch.cuda.device_count():
                    raise ConfigError(f"device {device!r}: there are only {torch.cuda.device_count()} CUDA "
                                      f"device(s) (indices 0-{torch.cuda.device_count() - 1})")
            self._pin = should_pin(self._device)
        self._watcher = None
        self._registry_where: tuple[str, str] | None = None  # (url, service) for error messages
        self._owns_source = source is None
        self._closed = False
        self._epoch_ref: Callable[[], Any] | None = None
        self._epochs = 0
        self._batches = 0
        self._wait_s = 0.0
        self._samples = 0
        self._wall_s = 0.0  # finished epochs' time; the running one adds since _epoch_t0
        self._epoch_t0: float | None = None
        if log_every is not None and (isinstance(log_every, bool) or not isinstance(log_every, int)
                                      or log_every < 1):
            raise ConfigError(f"log_every must be an int >= 1 or None, got {log_every!r}")
        self._progress = None
        if progress or log_every:
            from .progress import ReaderProgress

            self._progress = ReaderProgress(self.stats, logger, bar=bool(progress), log_every=log_every)

        if source is not None:
            if not isinstance(source, KnowledgeSource):
                raise ConfigError(f"source must be a KnowledgeSource, got {type(source).__name__}")
            if outputs is not None:
                raise ConfigError("outputs= is configured on the source itself when source= is given")
            if timeout_s is not None or wait_timeout_s is not None or pool_config is not None:
                raise ConfigError("timeout_s/wait_timeout_s/pool_config configure a teacher pool; "
                                  "with source= configure the source instead")
            self._source = source
            return

        specs = normalize_outputs(outputs if outputs is not None else ("logits",))
        cfg = pool_config if pool_config is not None else PoolConfig()
        overrides = {k: v for k, v in (("timeout_s", timeout_s), ("wait_timeout_s", wait_timeout_s)) if v is not None}
        if overrides:
            cfg = dataclasses.replace(cfg, **overrides)
        if registry is not None:
            from registry import TeacherWatcher as watcher_cls
            if not service:
                raise ConfigError("registry= needs service='name' (the teachers' service in the registry)")
        elif isinstance(teachers, str) or not list(teachers):
            raise ConfigError(f"teachers must be a non-empty list of 'host:port' strings, got {teachers!r}")
        from .pool import TeacherPool  # grpc is imported only when remote teachers are used

        shorthand = [k for k, v in (("auth_token", auth_token), ("auth_token_file", auth_token_file),
                                    ("tls_ca", tls_ca), ("tls_cert", tls_cert), ("tls_key", tls_key),
                                    ("tls_server_name", tls_server_name)) if v is not None]
        if shorthand and (credentials is not None or channel_factory is not None):
            raise ConfigError(f"{', '.join(shorthand)} cannot be combined with credentials= or channel_factory=; "
                              "put them in the TeacherCredentials")
        if credentials is None and channel_factory is None:
            from .credentials import TeacherCredentials

            credentials = TeacherCredentials.from_env(
                auth_token=auth_token, auth_token_file=auth_token_file, tls_ca=tls_ca, tls_cert=tls_cert,
                tls_key=tls_key, tls_server_name=tls_server_name)
        pool = TeacherPool(teachers or (), specs, config=cfg, channel_factory=channel_factory,
                           stub_factory=stub_factory, credentials=credentials)
        self._source = pool
        if registry is not None:
            kwargs = {} if registry_poll_s is None else {"poll_s": registry_poll_s}
            try:
                self._watcher = watcher_cls(registry, service, on_change=self._on_registry_change, **kwargs)
                self._registry_where = (registry, service)
                self._watcher.start()
            except BaseException as exc:
                pool.close()
                from registry.errors import RegistryError  # loaded already, with the watcher class

                if isinstance(exc, RegistryError):  # bad URL ('local'), refused credentials: keep one tree
                    raise ConfigError(f"DistillReader cannot use the registry: {exc}") from exc
                raise

    # --------------------------------------------------------------- public

    @property
    def source(self) -> KnowledgeSource:
        """The knowledge source feeding this reader (a TeacherPool for teachers/registry)."""
        return self._source

    def __iter__(self) -> Iterator[tuple[Any, dict[str, TeacherValue]]]:
        """Start a new epoch (closing an unfinished previous one)."""
        if self._closed:
            raise ConfigError("this DistillReader is closed; create a new one")
        self._close_epoch()
        self._epochs += 1
        gen = self._run_epoch(self._epochs)
        self._epoch_ref = weakref.ref(gen)
        return gen

    def __len__(self) -> int:
        """Batches per epoch, if the loader knows it."""
        return len(self._loader)  # type: ignore[arg-type]

    def stats(self) -> ReaderStats:
        """Batches delivered, time spent waiting on teachers, and the source's counters."""
        wall_s = self._wall_s
        if self._epoch_t0 is not None:
            wall_s += time.perf_counter() - self._epoch_t0
        return ReaderStats(batches=self._batches, epochs=self._epochs, wait_s=self._wait_s,
                           source=self._source.stats(), samples=self._samples, wall_s=wall_s)

    def close(self) -> None:
        """Cancel in-flight batches, stop registry discovery, close the source if the reader made it."""
        if self._closed:
            return
        self._closed = True
        self._close_epoch()
        if self._watcher is not None:
            try:
                self._watcher.close()
            except Exception:  # closing must not mask the training loop's own error
                logger.warning("closing the registry watcher failed", exc_info=True)
        if self._owns_source:
            self._source.close()

    def __enter__(self) -> "DistillReader":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -------------------------------------------------------------- private

    def _on_registry_change(self, snapshot) -> None:
        """Watcher thread: the live teacher set changed."""
        endpoints = list(snapshot)
        logger.info("registry: %d live teacher(s): %s", len(endpoints), ", ".join(endpoints) or "none")
        try:
            self._source.set_endpoints(endpoints)  # type: ignore[attr-defined]
        except Exception:  # a closed pool during shutdown, or a bad record: keep the watcher alive
            logger.warning("could not apply the registry's teacher set %s", endpoints, exc_info=True)

    def _explain_no_teacher(self, exc: NoTeacherAvailableError) -> NoTeacherAvailableError:
        """Add what the registry knows: the pool alone cannot tell a wrong URL or service name."""
        if self._watcher is None or self._registry_where is None:
            return exc
        from registry import redact_url

        url, service = self._registry_where
        cause = getattr(self._watcher, "last_error", None)
        if cause is not None:
            extra = (f"The teacher registry {redact_url(url)} is unreachable, so no teacher could be discovered: "
                     f"{str(cause).rstrip('.')}. Check the registry URL and that Redis is running.")
        elif not exc.endpoints:
            extra = (f"The registry {redact_url(url)} lists no live teacher for service {service!r}; check the "
                     "service name (`edistill registry ls` lists them) and that teachers were started with "
                     f"--registry and --service {service}.")
        else:
            return exc
        return NoTeacherAvailableError(f"{exc} {extra}", endpoints=exc.endpoints, wait_timeout_s=exc.wait_timeout_s)

    def _close_epoch(self) -> None:
        gen = self._epoch_ref() if self._epoch_ref is not None else None
        self._epoch_ref = None
        if gen is not None:
            try:
                gen.close()  # runs the epoch's finally: cancels its in-flight batches
            except ValueError:  # being iterated in another thread right now
                logger.warning("DistillReader epoch is running in another thread; not closed")

    def _run_epoch(self, epoch: int) -> Iterator[tuple[Any, dict[str, TeacherValue]]]:
        source = self._source
        window = self._window
        pending: collections.deque = collections.deque()  # (batch, future, inputs), loader order
        progress = self._progress
        if progress is not None:
            progress.start_epoch(epoch, _len_or_none(self._loader))
        self._epoch_t0 = time.perf_counter()
        it = iter(self._loader)
        index = 0
        exhausted = False
        try:
            while True:
                # Top the window up first, so the teachers work while we wait.
                while not exhausted and len(pending) < window:
                    try:
                        batch = next(it)
                    except StopIteration:
                        exhausted = True
                        break
                    inputs = self._inputs_of(batch)
                    fut = source.submit(inputs, batch_id=f"{epoch}:{index}")
                    pending.append((batch, fut, inputs))
                    index += 1
                if not pending:
                    return
                batch, fut, inputs = pending.popleft()
                try:
                    if fut.done():
                        out = fut.result()
                    else:
                        t0 = time.perf_counter()
                        try:
                            out = fut.result()  # the source guarantees it resolves (wait_timeout_s)
                        finally:
                            self._wait_s += time.perf_counter() - t0
                except NoTeacherAvailableError as exc:
                    explained = self._explain_no_teacher(exc)
                    if explained is exc:
                        raise
                    raise explained from exc
                if self._device is not None:
                    out = move_outputs(out, self._device, pin=self._pin)
                self._batches += 1
                self._samples += batch_rows(inputs) or 0
                if progress is not None:
                    progress.batch_delivered(self._batches)
                yield batch, out
        finally:
            for _, f, _ in pending:
                f.cancel()
            pending.clear()
            if self._epoch_t0 is not None:
                self._wall_s += time.perf_counter() - self._epoch_t0
                self._epoch_t0 = None
            if progress is not None:
                progress.close()


def _len_or_none(loader: Any) -> int | None:
    try:
        return len(loader)
    except TypeError:  # an iterable without a length (e.g. an IterableDataset's loader)
        return None
