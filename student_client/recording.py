"""Record a teacher's answers to disk, keyed by sample: the offline mode ("the recorded lecture").

::

    from student_client import TeacherPool, record, CachedTeacher
    with TeacherPool.from_registry("redis://...", "r101", outputs=criterion) as pool:
        record(loader, pool, "cache/r101")                 # resumable; one call per torchrun rank
    source = CachedTeacher("cache/r101", outputs=criterion)  # later, with no teacher running

What ends up on disk (``out_dir``): ``manifest.json`` (teacher model name and
version from Describe, the output specs, the dataset size; see
:mod:`student_client.cache`) and shards of ``shard_rows`` samples each,
written atomically with a checksum. Resuming is by key: a rerun (after a
crash, a SIGKILL, a pre-empted job) scans the shards already there and sends
the teacher only the samples no shard holds, whatever order the loader
gives them in (a new seed, a new shuffle, other workers). A kill loses at
most the rows buffered for the shard being filled.

Several recorders (the ranks of a torchrun job, each with its
``DistributedSampler`` share) can fill one directory at the same time: each
writes its own files (``r<rank>-<random id>-...``) and none writes a shared
index, so no lock is needed; a sample given to two recorders is stored twice
and read from the first shard (harmless).

The teacher must not change while recording: before each shard is written
the recorder asks the pool's teachers (Describe) again and stops with a
:class:`~student_client.errors.CacheMismatchError` if the model name or version
is no longer the manifest's (or the teachers disagree), so one cache never
mixes two models. Answers computed between a swap and that check are in the
shard being filled, which is then not written.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
from concurrent.futures import Future
from typing import Any, Callable

from .cache._manifest import TeacherInfo, ensure_manifest, make_manifest
from .cache._shards import list_shards, read_meta, remove_stale_temps
from .cache._tensors import take_rows
from .cache._tokens import _CODECS
from .cache._writer import CacheWriter, check_keys
from .compose import _Chained
from .errors import CacheError, CacheMismatchError, ConfigError
from .outputs import normalize_outputs
from .reader import DistillReader
from .sources import KnowledgeSource, SourceRequest, check_request, require_keys

__all__ = ["RecordResult", "record", "teacher_info"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RecordResult:
    """What one :func:`record` call did.

    Attributes:
        directory: the cache directory.
        recorded: samples this call sent to the teacher and stored.
        skipped: samples already in the cache (or seen earlier in this call).
        shards: the shard files this call wrote.
        cached: samples the directory holds now (every recorder's).
        dataset_size: ``len(loader.dataset)`` (None if unknown).
        teacher: the teacher whose answers were recorded.
    """

    directory: pathlib.Path
    recorded: int
    skipped: int
    shards: tuple[pathlib.Path, ...]
    cached: int
    dataset_size: int | None
    teacher: TeacherInfo

    @property
    def complete(self) -> bool:
        """Every sample of the dataset is in the cache (False when the size is unknown)."""
        return self.dataset_size is not None and self.cached >= self.dataset_size


def teacher_info(source: KnowledgeSource, timeout_s: float = 30.0) -> TeacherInfo:
    """Which model ``source`` answers with: Describe for a pool, the class for an in-process teacher.

    Raises:
        CacheError: a pool whose teachers do not answer Describe, or serve different models.
    """
    from .pool import TeacherPool
    from .sources import InProcessTeacher

    if isinstance(source, TeacherPool):
        source.wait_for_teachers(1, timeout_s=timeout_s)
        seen = {(d.model_name, d.model_version) for d in source.describe(timeout_s=timeout_s).values()}
        if not seen:
            raise CacheError("no teacher of the pool answered Describe, so the recording cannot say which model "
                             "answered; check the teachers' logs, or pass teacher=TeacherInfo(name, version)")
        if len(seen) > 1:
            raise CacheMismatchError(f"the pool's teachers serve different models: "
                                     f"{', '.join(str(TeacherInfo(*s)) for s in sorted(seen))}; record from one "
                                     "model version at a time")
        return TeacherInfo(*seen.pop())
    if isinstance(source, InProcessTeacher):
        model = source._model  # noqa: SLF001 - the class of the user's model is all we name
        return TeacherInfo(type(model).__name__, str(getattr(model, "edistill_version", "")))
    return TeacherInfo(type(source).__name__)


class _Unrecorded(KnowledgeSource):
    """Sends the inner source only the rows whose key is not recorded yet; answers ``(keys, answers)``."""

    def __init__(self, inner: KnowledgeSource, done: set) -> None:
        self.inner, self.done = inner, done
        self.skipped = 0

    def submit(self, request: SourceRequest) -> Future:
        import torch

        inputs, batch_id, keys = check_request(request)
        keys = check_keys(require_keys(keys, "record() stores answers by sample key"))
        todo = [i for i, k in enumerate(keys) if k not in self.done]
        self.skipped += len(keys) - len(todo)
        out = _Chained()  # cancelling it cancels the inner source's future
        if not todo:
            out.set_result(None)
            return out
        picked = [keys[i] for i in todo]
        self.done.update(picked)
        if len(todo) < len(keys):
            idx = torch.tensor(todo)
            inputs = {n: take_rows(v, idx) for n, v in inputs.items()}
        inner = self.inner.submit(SourceRequest(inputs, batch_id, picked))
        out.parts.append(inner)
        inner.add_done_callback(lambda f: _chain(f, out, picked))
        return out

    def close(self) -> None:
        pass  # the caller owns the inner source


def _chain(f: Future, out: _Chained, keys: list) -> None:
    if f.cancelled():
        out.cancel()
    elif f.exception() is not None:
        out.settle(None, f.exception())
    else:
        out.settle((keys, f.result()))  # False (ignored) when the caller cancelled it meanwhile


def record(loader: Any, source: KnowledgeSource, out_dir: str | os.PathLike, *,
           sample_keys: Callable[[Any], Any] | None = None, outputs: Any = None,
           teacher_input: Callable[[Any], Any] | None = None, window: int = 8, shard_rows: int = 4096,
           rank: int | None = None, teacher: TeacherInfo | None = None, progress: bool = False,
           describe_timeout_s: float = 30.0, token_codec: str = "exact") -> RecordResult:
    """Record ``source``'s answers for every sample of ``loader`` into ``out_dir`` (resumable).

    Args:
        loader: the dataset's loader (one pass); a DataLoader over a map-style
            dataset gives the dataset indices as keys (see :mod:`student_client.keys`).
        source: where answers come from (a :class:`TeacherPool`, an
            :class:`InProcessTeacher`, ...); the caller keeps ownership.
        out_dir: the cache directory (created; a recording of something else there is refused).
        sample_keys: ``batch -> keys`` when the default keys do not fit.
        outputs: what to record; default: the source's own ``outputs``.
        teacher_input, window: as for :class:`DistillReader`.
        shard_rows: samples per shard (what a kill can lose at most).
        rank: this recorder's rank (default ``$RANK``, else 0); names its files.
        teacher: the model name/version to write into the manifest (default: :func:`teacher_info`).
        progress: a tqdm bar on stderr.
        token_codec: per-token answers of language models: ``"exact"`` (as sent) or
            ``"compact"`` (log-probs quantized to 1/16 nat, token ids gap-coded;
            about half the bytes, see :mod:`student_client.cache._tokens`).

    Raises:
        CacheMismatchError: ``out_dir`` holds another recording, or the teacher changed meanwhile.
        ConfigError: no sample keys, or bad arguments.
    """
    if token_codec not in _CODECS:  # before anything is written: a bad codec leaves no manifest behind
        raise ConfigError(f"token_codec must be {' or '.join(map(repr, _CODECS))}, got {token_codec!r}")
    own = getattr(source, "outputs", None)
    if outputs is None and own is None:
        raise ConfigError(f"record() needs outputs= for a {type(source).__name__} (it does not say what it answers)")
    specs = normalize_outputs(outputs if outputs is not None else own)
    if own is not None and outputs is not None and tuple(own) != specs:
        raise ConfigError(f"outputs={[str(s) for s in specs]} but the source answers {[str(s) for s in own]}; "
                          "build the source with the outputs to record")
    directory = pathlib.Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    info = teacher if teacher is not None else teacher_info(source, describe_timeout_s)
    dataset = getattr(loader, "dataset", None)
    size = len(dataset) if dataset is not None and hasattr(dataset, "__len__") else None
    keys_kind = "dataset indices" if sample_keys is None else f"sample_keys={getattr(sample_keys, '__qualname__', '?')}"
    ensure_manifest(directory, make_manifest(specs, info, size, keys_kind))
    remove_stale_temps(directory)
    done: set = set()
    for shard in list_shards(directory):
        done.update(read_meta(shard)["keys"])
    before = len(done)

    from .pool import TeacherPool

    def check_teacher() -> None:
        if teacher is None and isinstance(source, TeacherPool):
            now = teacher_info(source, describe_timeout_s)
            if now != info:
                raise CacheMismatchError(f"the teacher changed while recording into {directory}: it was {info}, "
                                         f"it is now {now}; the rows since the last shard were not written. Record "
                                         "the new model into a new directory")

    writer = CacheWriter(directory, specs, info, rank=rank, shard_rows=shard_rows, before_shard=check_teacher,
                         token_codec=token_codec)
    wrapped = _Unrecorded(source, done)
    try:
        with DistillReader(loader, wrapped, window=window, teacher_input=teacher_input, sample_keys=sample_keys,
                           progress=progress) as reader:
            for _batch, answer in reader:
                if answer is not None:
                    writer.add(*answer)
        writer.close()
    finally:
        writer.abandon()  # after an error: nothing more is written (the buffered rows are lost, by design)
    cached = len({k for s in list_shards(directory) for k in read_meta(s)["keys"]})
    result = RecordResult(directory, writer.rows_written, wrapped.skipped, tuple(writer.shards), cached, size, info)
    logger.info("recorded %d samples of %s into %s (%d shards; %d already there; the cache holds %d%s)",
                result.recorded, info, directory, len(result.shards), before, cached,
                f" of {size}" if size is not None else "")
    return result
