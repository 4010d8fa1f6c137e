"""Asyncio dynamic batcher: merge concurrent requests into one forward pass.

Shaped like ray's ``@serve.batch``: ``submit`` is a non-blocking put onto a
bounded deque plus an event; one background task waits for the first
request, then for at most what is left of ``max_queue_delay_ms`` (measured
from that request's arrival), takes whole requests in arrival order while
they fit in ``max_batch_size``, and runs ONE forward pass in a worker thread.
Outputs are split back per request and each request's own transforms are
applied, so requests with different output wishes share a batch.

Concurrency notes:

* All queue state is touched only from the event loop thread; the worker
  thread receives an immutable list of items and returns results.
* Batches run one at a time (the loop awaits the forward pass). Requests
  arriving meanwhile queue up and form the next batch as soon as the
  current one finishes, which is what a CPU (all cores busy) or a single
  GPU stream wants.
* Every future is resolved: with a result, the request's own error, or the
  batch's error; a request whose client went away (future cancelled) is
  skipped before its batch is formed.

One request never fails its batch-mates:

* Only requests whose per-sample input shapes equal the first request's are
  merged (models with free dimensions, ``-1`` in the input spec, take
  different lengths per request). Arrival order is kept: the first request
  that does not match ends the batch and leads the next one.
* Sequence models (``LoadedModel.sequence``, e.g. Hugging Face causal LMs)
  are the exception: requests of different lengths L share one forward pass,
  every input right-padded with 0 to the batch's longest (the attention mask
  is 0 there, so causal attention and position ids of the real tokens do not
  change; each request's answer equals its own unpadded forward within fp
  tolerance, tests/test_hf_teacher.py). ``max_batch_tokens`` bounds the
  padded pass (rows x longest L); :class:`BatchRecord` reports the padding
  (``padded_tokens / tokens``), which the metrics export as padding waste.
* When a forward pass over several requests raises (an input that passed
  validation but breaks the model, e.g. an embedding index out of range),
  each request is run again on its own, so only the culprit gets INTERNAL.
  The failed merged pass is recorded as one failed batch; the re-runs are
  not separate batches in the stats, and each re-run request's
  ``batch_size`` is its own size.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from teacher_server.errors import InferenceFailed, QueueFull, RequestError, ServerClosing
from teacher_server.model import LoadedModel
from teacher_server.transforms import OutputPlan, apply_plan, apply_token_plan

__all__ = ["BatchRecord", "BatcherStats", "DynamicBatcher", "ItemResult", "OutputValue"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OutputValue:
    """One transformed output of one request, on the host."""

    plan: OutputPlan
    values: torch.Tensor | None  # (n, ..., C) or (n, ..., k); per-token: (P, k), None when sampled
    indices: torch.Tensor | None  # (n, ..., k) int64 (or compact) for top-k; per-token (P, k | sample)
    dense_shape: tuple[int, ...]  # (n, ..., C)
    tail: torch.Tensor | None = None  # (P,) log of the mass outside the top-k
    positions: torch.Tensor | None = None  # (n, L) bool: which positions P are (plan.mask)


@dataclass(frozen=True)
class ItemResult:
    """What a request gets back from :meth:`DynamicBatcher.submit`."""

    outputs: list[OutputValue]
    batch_size: int  # samples in the forward pass that served this request
    queue_ms: float
    compute_ms: float


@dataclass(frozen=True)
class BatchRecord:
    """One executed batch, passed to listeners (metrics, tests)."""

    batch_size: int
    num_requests: int
    queue_ms: tuple[float, ...]
    compute_ms: float
    failed: bool
    tokens: int = 0  # sequence models: rows x longest length in the pass (0 otherwise)
    padded_tokens: int = 0  # of those, padding added to merge different lengths


@dataclass
class BatcherStats:
    """Counters since start; ``batch_sizes`` maps samples-per-forward -> count."""

    batches: int = 0
    requests: int = 0
    samples: int = 0
    rejected_full: int = 0
    failed_batches: int = 0
    batch_sizes: dict[int, int] = field(default_factory=dict)

    @property
    def max_batch_size_seen(self) -> int:
        """Largest forward-pass batch (samples) so far; 0 before the first batch."""
        return max(self.batch_sizes, default=0)


@dataclass
class _Item:
    inputs: Sequence[torch.Tensor]  # one (n, ...) tensor per model input, signature order
    plans: Sequence[OutputPlan]
    size: int  # n
    future: asyncio.Future
    enqueued: float  # time.perf_counter()

    @property
    def sample_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Per-sample shape of each input (batch dim dropped): what must match to share a batch."""
        return tuple(tuple(t.shape[1:]) for t in self.inputs)

    @property
    def length(self) -> int:
        """Sequence length L (dim 1 of the first input) of a sequence model's request."""
        return int(self.inputs[0].shape[1])


class DynamicBatcher:
    """Dynamic batching in front of a :class:`LoadedModel`.

    Use ``start()`` inside the running event loop, ``await submit(...)`` per
    request, and ``await close()`` to drain. Listeners added with
    :meth:`add_listener` get a :class:`BatchRecord` after every batch (on the
    event loop; keep them cheap).
    """

    def __init__(
        self,
        model: LoadedModel,
        *,
        max_batch_size: int,
        max_queue_delay_ms: float,
        max_queue_size: int,
        max_batch_tokens: int | None = None,
    ) -> None:
        self.model = model
        self.max_batch_size = max_batch_size
        # Sequence models: padded tokens (rows x longest L) per forward pass; None = no limit.
        self.max_batch_tokens = max_batch_tokens
        self._sequence = getattr(model, "sequence", None) is not None
        self._delay_s = max_queue_delay_ms / 1000.0
        self.max_queue_size = max_queue_size
        self._queue: collections.deque[_Item] = collections.deque()
        self._event = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task | None = None
        # One worker: a forward pass already uses every core (intra-op
        # threads) or the whole GPU stream.
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="edistill-forward")
        self._stats = BatcherStats()
        self._listeners: list[Callable[[BatchRecord], None]] = []
        self._computing = 0  # requests in the forward pass now (event-loop thread only)

    # -------------------------------------------------------------- public

    def start(self) -> None:
        """Start the background batching task on the running loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="edistill-batcher")
            self._task.add_done_callback(self._on_loop_done)

    def add_listener(self, fn: Callable[[BatchRecord], None]) -> None:
        """Call ``fn(record)`` after each batch (exceptions are logged, not raised)."""
        self._listeners.append(fn)

    @property
    def running(self) -> bool:
        """True while the batching task is alive and not closing."""
        return self._task is not None and not self._task.done() and not self._closing

    @property
    def in_flight(self) -> int:
        """Requests in the forward pass right now."""
        return self._computing

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a batch slot."""
        return len(self._queue)

    def stats(self) -> BatcherStats:
        """A snapshot copy of the counters."""
        s = self._stats
        return BatcherStats(s.batches, s.requests, s.samples, s.rejected_full, s.failed_batches, dict(s.batch_sizes))

    async def submit(self, inputs: Sequence[torch.Tensor], plans: Sequence[OutputPlan], size: int) -> ItemResult:
        """Queue one validated request of ``size`` samples and wait for its outputs.

        Raises:
            QueueFull: ``max_queue_size`` requests are already waiting.
            ServerClosing: :meth:`close` was called.
            RequestError: this request's transforms failed, or the batch failed.
        """
        if self._closing or self._task is None:
            raise ServerClosing("teacher is shutting down; send the request to another teacher")
        if len(self._queue) >= self.max_queue_size:
            self._stats.rejected_full += 1
            raise QueueFull(f"teacher queue is full ({self.max_queue_size} requests waiting); "
                            "retry later or send to another teacher")
        fut = asyncio.get_running_loop().create_future()
        self._queue.append(_Item(inputs, plans, size, fut, time.perf_counter()))
        self._event.set()
        return await fut

    async def close(self) -> None:
        """Refuse new requests, finish the queued ones, stop the worker."""
        self._closing = True
        self._event.set()
        if self._task is not None:
            await asyncio.shield(self._task)
        self._executor.shutdown(wait=False)

    # ------------------------------------------------------------ internals

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                if self._closing:
                    return
                self._event.clear()
                await self._event.wait()
            items, total, longest = await self._collect()
            if items:
                await self._run(loop, items, total, longest)

    async def _collect(self) -> tuple[list[_Item], int, int]:
        """Pop whole requests in order while they fit; wait until the first one's deadline.

        Returns ``(items, total, longest)``: the requests, their samples, and
        (sequence models; else 0) the longest L, i.e. the padded length of the pass.
        """
        items: list[_Item] = []
        total = 0
        longest = 0  # sequence models: the padded length of the pass
        deadline = None
        while total < self.max_batch_size:
            if self._queue:
                nxt = self._queue[0]
                if nxt.future.done():  # client cancelled or deadline passed: skip its work
                    self._queue.popleft()
                    continue
                if total + nxt.size > self.max_batch_size:
                    break  # never split a request; it leads the next batch
                if self._sequence:
                    padded = max(longest, nxt.length)
                    if items and self.max_batch_tokens and (total + nxt.size) * padded > self.max_batch_tokens:
                        break  # the padded pass would exceed the token budget; it leads the next batch
                    longest = padded
                elif items and nxt.sample_shapes != items[0].sample_shapes:
                    break  # free dims differ: torch.cat would fail; it leads the next batch (FIFO)
                self._queue.popleft()
                items.append(nxt)
                total += nxt.size
                if deadline is None:
                    deadline = nxt.enqueued + self._delay_s
                continue
            if deadline is None or self._closing:
                break
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            self._event.clear()
            try:
                await asyncio.wait_for(self._event.wait(), remaining)
            except asyncio.TimeoutError:
                break
        return items, total, longest

    async def _run(self, loop: asyncio.AbstractEventLoop, items: list[_Item], total: int, longest: int) -> None:
        started = time.perf_counter()
        failed = False
        self._computing = len(items)
        try:
            try:
                results, compute_ms = await loop.run_in_executor(self._executor, self._compute, items, total, longest)
            except Exception as exc:
                if len(items) == 1 or isinstance(exc, RequestError):
                    raise
                # One request may have broken the merged pass: run each alone
                # so only the culprit fails (its error is logged there).
                failed = True
                log.warning("batch of %d requests failed (%s: %s); running each request alone",
                            len(items), type(exc).__name__, exc)
                results, compute_ms = await loop.run_in_executor(self._executor, self._compute_each, items)
        except BaseException as exc:
            failed = True
            err = exc if isinstance(exc, RequestError) else InferenceFailed(
                f"teacher forward pass failed: {type(exc).__name__}: {exc}")
            for it in items:
                if not it.future.done():
                    it.future.set_exception(err)
            log.error("batch of %d request(s) failed: %s", len(items), err, exc_info=not isinstance(exc, RequestError))
            if isinstance(exc, asyncio.CancelledError):
                raise
            results, compute_ms = [], 0.0
        finally:
            self._computing = 0
        tokens = padded_tokens = 0
        if self._sequence:
            tokens = total * longest
            padded_tokens = tokens - sum(it.size * it.length for it in items)
        queue_ms = tuple((started - it.enqueued) * 1000.0 for it in items)
        for it, res, q_ms in zip(items, results, queue_ms):
            if it.future.done():
                continue
            if isinstance(res, BaseException):
                it.future.set_exception(res)
            else:
                # After a failed merged pass each request ran alone.
                it.future.set_result(ItemResult(res, it.size if failed else total, q_ms, compute_ms))
        s = self._stats
        s.batches += 1
        s.requests += len(items)
        s.samples += total
        s.failed_batches += failed
        s.batch_sizes[total] = s.batch_sizes.get(total, 0) + 1
        record = BatchRecord(total, len(items), queue_ms, compute_ms, failed, tokens, padded_tokens)
        for fn in self._listeners:
            try:
                fn(record)
            except Exception:
                log.exception("batch listener %r failed", fn)

    def _compute(self, items: list[_Item], total: int,
                 longest: int) -> tuple[list[list[OutputValue] | BaseException], float]:
        """Worker thread: concat, forward, split, transform. Touches no loop state.

        ``total`` is the items' samples, ``longest`` their longest L (sequence models).
        """
        t0 = time.perf_counter()
        n_inputs = len(self.model.inputs)
        if len(items) == 1 and self.model.device.type == "cuda":
            batch = list(items[0].inputs)  # run() copies to pinned memory / the GPU anyway
        elif len(items) == 1:
            # Decoded inputs are zero-copy views of the request's immutable
            # bytes (protos.codec.to_torch); a model writing into its input in
            # place would write into a Python bytes object. One memcpy of the
            # batch: measured 2.7 us for 64x64 float32 vs 1.6 ms for the zoo
            # MLP's forward pass on a 2-core VM (0.7 ms for 64x3x32x32).
            batch = [t.clone() for t in items[0].inputs]
        elif self._sequence:
            batch = _right_padded(items, n_inputs, total, longest)  # (total, longest, ...) each
        else:
            batch = [torch.cat([it.inputs[i] for it in items]) for i in range(n_inputs)]  # (sum n, ...)
        outs = self.model.run(batch)
        for name, t in outs.items():
            if t.dim() == 0 or t.shape[0] != total:
                raise InferenceFailed(f"model output {name!r} has shape {list(t.shape)} for a batch of {total}")
        results: list[list[OutputValue] | BaseException] = []
        offset = 0
        for it in items:
            try:
                per = []
                for plan in it.plans:
                    x = outs[plan.name][offset:offset + it.size]  # (n, ..., C) view
                    if self._sequence and x.dim() >= 2:
                        x = x[:, :it.length]  # (n, L, C): this request's own positions, padding dropped
                    if plan.token_level:
                        a = apply_token_plan(x, plan, it.inputs, self.model.input_names)
                        per.append(OutputValue(plan, _host(a.values), _host(a.indices), tuple(x.shape),
                                               _host(a.tail), _host(a.positions)))
                        continue
                    values, indices = apply_plan(x, plan)
                    per.append(OutputValue(plan, _host(values), _host(indices), tuple(x.shape)))
                results.append(per)
            except RequestError as exc:
                results.append(exc)
            except Exception as exc:
                results.append(InferenceFailed(f"output transform failed: {type(exc).__name__}: {exc}"))
            offset += it.size
        return results, (time.perf_counter() - t0) * 1000.0

    def _compute_each(self, items: list[_Item]) -> tuple[list[list[OutputValue] | BaseException], float]:
        """Worker thread: run each request alone after its merged batch failed."""
        t0 = time.perf_counter()
        results: list[list[OutputValue] | BaseException] = []
        for it in items:
            try:
                results.append(self._compute([it], it.size, it.length if self._sequence else 0)[0][0])
            except RequestError as exc:
                results.append(exc)
            except Exception as exc:
                log.error("request of %d sample(s) failed the forward pass on its own", it.size, exc_info=True)
                results.append(InferenceFailed(f"teacher forward pass failed: {type(exc).__name__}: {exc}"))
        return results, (time.perf_counter() - t0) * 1000.0

    def _on_loop_done(self, task: asyncio.Task) -> None:
        if task.cancelled():
            exc: BaseException | None = ServerClosing("teacher batcher was cancelled")
        else:
            exc = task.exception()
            if exc is not None:
                log.error("batcher task died", exc_info=exc)
        # Nothing may hang: fail whatever is still queued.
        while self._queue:
            it = self._queue.popleft()
            if not it.future.done():
                it.future.set_exception(exc if isinstance(exc, RequestError) else ServerClosing(
                    "teacher batcher stopped; send the request to another teacher"))
        self._closing = True


def _host(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.cpu()


def _right_padded(items: list[_Item], n_inputs: int, total: int, longest: int) -> list[torch.Tensor]:
    """Each input of a sequence model's requests, right-padded with 0 to ``longest``: (total, longest, ...)."""
    batch = []
    for i in range(n_inputs):
        first = items[0].inputs[i]
        out = first.new_zeros((total, longest, *first.shape[2:]))
        offset = 0
        for it in items:
            t = it.inputs[i]
            out[offset:offset + it.size, :t.shape[1]] = t
            offset += it.size
        batch.append(out)
    return batch
