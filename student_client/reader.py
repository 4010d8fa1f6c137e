"""DistillReader: the user's data loader with teacher outputs attached.

::

    with DistillReader(loader, teachers=["10.0.0.5:50051", "10.0.0.6:50051"],
                       outputs=[OutputSpec("logits", "log_probs", temperature=4.0)]) as reader:
        for epoch in range(epochs):
            for (images, labels), teacher in reader:   # batch exactly as the loader yields it
                # the answer carries its transform and temperature (T=4 here)
                loss = kd_loss(student(images), teacher["logits"], labels=labels, ce_weight=0.5)

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
import inspect
import logging
import time
import weakref
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

from .errors import ConfigError
from .inputs import batch_rows, make_input_fn
from .keys import make_key_tracker
from .outputs import TeacherValue
from .sources import KnowledgeSource, SourceRequest
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


# Keyword arguments that moved out of DistillReader, and where they went.
_POOL = "TeacherPool(teachers, outputs, config=PoolConfig({0}=...)) (or TeacherPool.from_registry(url, service, ...))"
_CREDS = "TeacherPool(..., credentials=TeacherCredentials({0}=...)), or the EDISTILL_* variables (student_client.env)"
_MOVED = {
    "timeout_s": _POOL, "wait_timeout_s": _POOL,
    "pool_config": "TeacherPool(teachers, outputs, config=PoolConfig(...))",
    "registry_poll_s": "TeacherPool.from_registry(url, service, outputs, poll_s=...)",
    "channel_factory": "TeacherPool(teachers, outputs, channel_factory=...)",
    "stub_factory": "TeacherPool(teachers, outputs, stub_factory=...)",
    "credentials": "TeacherPool(teachers, outputs, credentials=TeacherCredentials(...))",
    **{k: _CREDS for k in ("auth_token", "auth_token_file", "tls_ca", "tls_cert", "tls_key", "tls_server_name")},
}


class DistillReader:
    """Iterate ``(batch, teacher_outputs)`` over a data loader.

    Exactly one of ``source``, ``teachers`` or ``registry`` (with
    ``service``) says where teacher outputs come from.

    Args:
        loader: any iterable of batches (typically a ``torch.utils.data.DataLoader``,
            with or without workers, any batch structure); iterated once per epoch.
        source: any :class:`KnowledgeSource` (a :class:`TeacherPool` you
            configured, an :class:`InProcessTeacher`, a composite...); the
            caller keeps ownership (the reader does not close it).
        teachers: ``["host:port", ...]`` teacher servers: the reader makes a
            :class:`TeacherPool` with the default :class:`PoolConfig` (and the
            environment's settings, :mod:`student_client.env`) and closes it.
        registry: Redis URL of the teacher registry; the reader makes
            ``TeacherPool.from_registry(registry, service, outputs)``.
        service: the registry service name (required with ``registry``).
        outputs: teacher outputs to request with ``teachers``/``registry``:
            names, :class:`OutputSpec`, or a loss that says what it needs
            (default ``("logits",)``); a ``source`` decides its own.
        window: batches in flight at once (submitted, not yet delivered). 8
            hides a teacher latency of up to ~7 training steps; raise it with
            many teachers (about 2 x teachers x max_in_flight_per_teacher / 4).
        teacher_input: ``batch -> tensor | dict[name, tensor]`` picking what is
            sent; default: first element of a tuple/list, ``"input"`` of a dict,
            or the tensor batch itself.
        sample_keys: ``batch -> keys`` (one per sample, stable under
            shuffling); default: the dataset indices of a DataLoader over a
            map-style dataset, else none (:mod:`student_client.keys`).
        device: move teacher outputs there (pinned memory + ``non_blocking``
            for CUDA); default: leave them on the CPU.
        progress: show a tqdm bar per epoch on stderr with samples/s, live
            teachers and the share of time spent waiting on teachers.
        log_every: log the same numbers (:meth:`ReaderStats.summary`) at INFO
            every N delivered batches; None: never.

    Timeouts, credentials and the other pool settings belong to the pool:
    build it yourself and pass it as ``source`` (a moved keyword argument is
    a ConfigError that says where it went).

    Raises:
        ConfigError: conflicting or invalid arguments.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> "DistillReader":
        moved = [k for k in kwargs if k in _MOVED]
        if moved:
            raise ConfigError("DistillReader no longer takes " + "; ".join(
                f"{k}= (it moved to {_MOVED[k].format(k)})" for k in moved)
                + "; then pass the pool as DistillReader(loader, pool)")
        return super().__new__(cls)

    def __init__(self, loader: Iterable[Any], source: KnowledgeSource | None = None, *,
                 teachers: Sequence[str] | None = None, registry: str | None = None, service: str | None = None,
                 outputs: Any = None, window: int = 8, teacher_input: Callable[[Any], Any] | None = None,
                 sample_keys: Callable[[Any], Any] | None = None, device: "str | torch.device | None" = None,
                 progress: bool = False, log_every: int | None = None) -> None:
        if not hasattr(loader, "__iter__"):
            raise ConfigError(f"loader must be iterable (e.g. a DataLoader), got {type(loader).__name__}")
        chosen = [n for n, v in (("source", source), ("teachers", teachers), ("registry", registry)) if v is not None]
        if len(chosen) != 1:
            raise ConfigError(
                "DistillReader needs exactly one of a source (DistillReader(loader, source)), "
                "teachers=['host:port', ...] or registry='redis://...' (with service=...); "
                f"got {', '.join(chosen) or 'none'}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ConfigError(f"window must be an int >= 1, got {window!r}")
        if registry is None and service is not None:
            raise ConfigError("service= only makes sense with registry=; pass registry='redis://host:6379/0'")
        if log_every is not None and (isinstance(log_every, bool) or not isinstance(log_every, int)
                                      or log_every < 1):
            raise ConfigError(f"log_every must be an int >= 1 or None, got {log_every!r}")
        self._loader = loader
        self._window = window
        self._inputs_of = make_input_fn(teacher_input)
        self._keys = make_key_tracker(loader, sample_keys)
        self._device, self._pin = _resolve_device(device)
        _avoid_fork_with_grpc(loader)
        self._owns_source = source is None
        self._closed = False
        self._epoch_ref: Callable[[], Any] | None = None
        self._epochs = 0
        self._batches = 0
        self._wait_s = 0.0
        self._cpu_s = 0.0  # this thread's CPU inside the reader, the loader's own time excluded
        self._samples = 0
        self._wall_s = 0.0  # finished epochs' time; the running one adds since _epoch_t0
        self._epoch_t0: float | None = None
        self._current_keys: list | None = None
        self._progress = None
        if progress or log_every:
            from .progress import ReaderProgress

            self._progress = ReaderProgress(self.stats, logger, bar=bool(progress), log_every=log_every)
        if source is not None:
            if not isinstance(source, KnowledgeSource):
                raise ConfigError(f"source must be a KnowledgeSource, got {type(source).__name__}")
            if outputs is not None:
                raise ConfigError("outputs= goes to the source itself when a source is given "
                                  "(e.g. TeacherPool(teachers, outputs))")
            self._source = source
            return
        from .pool import TeacherPool  # grpc is imported only when remote teachers are used

        outputs = outputs if outputs is not None else ("logits",)
        if registry is not None:
            if not service:
                raise ConfigError("registry= needs service='name' (the teachers' service in the registry)")
            self._source = TeacherPool.from_registry(registry, service, outputs)
        else:
            if isinstance(teachers, str) or not list(teachers):
                raise ConfigError(f"teachers must be a non-empty list of 'host:port' strings, got {teachers!r}")
            self._source = TeacherPool(teachers, outputs)

    # --------------------------------------------------------------- public

    @property
    def source(self) -> KnowledgeSource:
        """The knowledge source feeding this reader (a TeacherPool for teachers/registry)."""
        return self._source

    @property
    def current_keys(self) -> list | None:
        """The sample keys of the batch delivered last (None if the loader gives none)."""
        return self._current_keys

    def observe(self, student_outputs: Any) -> None:
        """Hand the student's predictions for the batch delivered last to the source (``observe()``).

        Raises:
            ConfigError: the loader gives no sample keys (pass ``sample_keys=``).
        """
        if self._current_keys is None:
            raise ConfigError("observe() needs the sample keys of the batch, and this loader gives none; "
                              "pass sample_keys=callable(batch) -> keys (see student_client.keys)")
        self._source.observe(self._current_keys, student_outputs)

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
                           source=self._source.stats(), samples=self._samples, wall_s=wall_s, cpu_s=self._cpu_s)

    def close(self) -> None:
        """Cancel in-flight batches; close the source if the reader made it (teachers=/registry=)."""
        if self._closed:
            return
        self._closed = True
        self._close_epoch()
        if self._owns_source:
            self._source.close()

    def __enter__(self) -> "DistillReader":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -------------------------------------------------------------- private

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
        keys_of = self._keys
        pending: collections.deque = collections.deque()  # (batch, future, rows, keys), loader order
        progress = self._progress
        if progress is not None:
            progress.start_epoch(epoch, _len_or_none(self._loader))
        self._epoch_t0 = time.perf_counter()
        keys_of.start_epoch()
        it = iter(self._loader)
        index = 0
        exhausted = False
        # The reader's own CPU (ReaderStats.cpu_s): this thread's CPU time from resuming until the
        # next yield, minus the loader's next() (its cost is the same with or without teachers).
        # thread_time() is a system call (~0.2 us); two per batch plus two per loader call.
        cpu = time.thread_time
        spent = self._cpu_s
        try:
            while True:
                c0 = cpu()
                # Top the window up first, so the teachers work while we wait.
                while not exhausted and len(pending) < window:
                    spent += cpu() - c0
                    try:
                        batch = next(it)
                    except StopIteration:
                        exhausted = True
                        c0 = cpu()
                        break
                    c0 = cpu()
                    inputs = self._inputs_of(batch)
                    rows = batch_rows(inputs)
                    keys = keys_of.keys(batch, rows) if keys_of.available else None
                    fut = source.submit(SourceRequest(inputs, f"{epoch}:{index}", keys))
                    pending.append((batch, fut, rows, keys))
                    index += 1
                if not pending:
                    return
                batch, fut, rows, keys = pending.popleft()
                if fut.done():
                    out = fut.result()
                else:
                    t0 = time.perf_counter()
                    try:
                        out = fut.result()  # the source guarantees it resolves (wait_timeout_s)
                    finally:
                        self._wait_s += time.perf_counter() - t0
                if self._device is not None:
                    out = move_outputs(out, self._device, pin=self._pin)
                self._batches += 1
                self._samples += rows or 0
                self._current_keys = keys
                if progress is not None:
                    progress.batch_delivered(self._batches)
                spent += cpu() - c0
                self._cpu_s = spent
                yield batch, out
        finally:
            for _, f, _, _ in pending:
                f.cancel()
            pending.clear()
            if self._epoch_t0 is not None:
                self._wall_s += time.perf_counter() - self._epoch_t0
                self._epoch_t0 = None
            if progress is not None:
                progress.close()


# __new__ takes **kwargs only to name moved arguments; the real signature is __init__'s.
DistillReader.__signature__ = inspect.signature(DistillReader.__init__).replace(  # type: ignore[attr-defined]
    parameters=list(inspect.signature(DistillReader.__init__).parameters.values())[1:])


def _resolve_device(device: Any) -> "tuple[torch.device | None, bool]":
    """``(torch.device or None, pin host memory)``; a clear error for a device torch cannot use."""
    if device is None:
        return None, False
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"invalid device {device!r}: {exc}") from exc
    if dev.type == "cuda":  # else torch fails deep inside after the first answer
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r}: CUDA is not available to this torch "
                              "(torch.cuda.is_available() is False); use device='cpu' or a CUDA build")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r}: there are only {torch.cuda.device_count()} CUDA "
                              f"device(s) (indices 0-{torch.cuda.device_count() - 1})")
    return dev, should_pin(dev)


def _len_or_none(loader: Any) -> int | None:
    try:
        return len(loader)
    except TypeError:  # an iterable without a length (e.g. an IterableDataset's loader)
        return None
