"""CachedTeacher: teacher answers recorded on disk, served by sample key ("the recorded lecture")."""

from __future__ import annotations

import collections
import logging
import pathlib
import threading
from concurrent.futures import Future
from typing import Any

import numpy as np

from ..errors import AnswerMissingError, CacheError, ConfigError, SourceClosedError, StudentError
from ..futures import settle
from ..outputs import OutputSpec, TeacherValue, normalize_outputs
from ..sources import KnowledgeSource, SourceRequest, check_request, require_keys
from ..stats import SourceStats
from ._index import KeyIndex
from ._layout import columns, gather, layout_of
from ._manifest import TeacherInfo, check_outputs, load_manifest, specs_of
from ._shards import Shard, list_shards, read_meta, read_shard
from ._tensors import take_rows
from ._writer import CacheWriter

__all__ = ["CachedTeacher"]

logger = logging.getLogger(__name__)


class CachedTeacher(KnowledgeSource):
    """Answers recorded by :func:`student_client.record` (or ``edistill record``), by sample key.

    No teacher needs to run. ``submit`` looks the batch's keys up and returns
    an already-resolved future with the same answer types a live source gives
    (:class:`~student_client.outputs.Dense`, :class:`~student_client.outputs.TopK`,
    equal bit for bit to what the teacher sent). Keys come from the reader
    (``sample_keys=``, by default the dataset indices), so any shuffling works.

    ::

        source = CachedTeacher("cache/r101", outputs=criterion)   # raises if recorded differently
        with DistillReader(loader, source) as reader: ...
        # samples not recorded: ask the live teachers (only for those rows) and keep their answers
        source = CachedTeacher("cache/r101", fallback=TeacherPool(...), write_back=True)

    Args:
        directory: the cache directory (``manifest.json`` and shards).
        outputs: what the student asks for (names, :class:`OutputSpec`, or a
            loss); each must have been recorded with the same transform,
            temperature, top-k and dtype, else a :class:`CacheMismatchError`
            lists every difference. Default: everything recorded.
        model_version: the teacher version the student expects (checked
            against the manifest); None: any.
        fallback: a source for samples the cache does not hold (asked only
            for those rows; owned, closed with this source). Without one, a
            miss fails the batch with :class:`AnswerMissingError` (``keys=``
            the missing keys), which a :class:`~student_client.FallbackSource`
            answers from its next source.
        write_back: also store the fallback's answers in the cache (new
            shards of this process; the next epoch finds them).
        max_memory_bytes: decoded shards kept in memory (least recently used
            ones are dropped beyond this). A batch reads whole shards, so give
            it room for the shards a shuffled epoch touches (the whole cache
            if it fits; that is also what keeps reading as fast as training).
        shard_rows: rows per shard written back.

    Raises:
        CacheError: no manifest; CacheMismatchError: recorded differently;
        CacheCorruptError: a damaged file (names it), when it is read.
    """

    def __init__(self, directory: str | pathlib.Path, outputs: Any = None, *, model_version: Any = None,
                 fallback: KnowledgeSource | None = None, write_back: bool = False,
                 max_memory_bytes: int = 8 << 30, shard_rows: int = 4096) -> None:
        self.directory = pathlib.Path(directory)
        if not self.directory.is_dir():
            raise CacheError(f"cache directory {self.directory} does not exist; record one with "
                             "student_client.record(...) or edistill record --out DIR")
        if fallback is not None and not isinstance(fallback, KnowledgeSource):
            raise ConfigError(f"fallback must be a KnowledgeSource, got {type(fallback).__name__}")
        if write_back and fallback is None:
            raise ConfigError("write_back=True stores the fallback's answers; pass fallback=<a live source>")
        self.manifest = load_manifest(self.directory)
        recorded = specs_of(self.manifest)
        self._specs = recorded if outputs is None else normalize_outputs(outputs)
        check_outputs(self.directory, self.manifest, self._specs, model_version)
        self.teacher = TeacherInfo(**self.manifest["teacher"])
        self._fallback = fallback
        self._max_bytes = max_memory_bytes
        self._lock = threading.Lock()
        self._shards: list[Shard] = []
        self._layouts: dict[str, dict] = {}
        self._loaded: collections.OrderedDict[int, tuple[dict, int]] = collections.OrderedDict()
        self._loaded_bytes = 0
        self._index = KeyIndex()
        self._n = {"submitted": 0, "completed": 0, "failed": 0, "cancelled": 0}
        self.hits = self.misses = 0
        self._closed = False
        for shard in list_shards(self.directory):
            self._register(shard, read_meta(shard))
        # how written-back per-token answers are stored: as the recording did
        self._token_codec = next((la["codec"] for la in self._layouts.values() if la["kind"] == "tokens"), "exact")
        self._writer = None
        if write_back:
            if {s.name for s in self._specs} != {s.name for s in recorded}:
                raise ConfigError("write_back=True writes every recorded output, so ask for all of them "
                                  f"(outputs=None or {[s.name for s in recorded]}), got {[s.name for s in self._specs]}")
            self._writer = CacheWriter(self.directory, recorded, self.teacher, shard_rows=shard_rows,
                                       token_codec=self._token_codec,
                                       on_shard=self._written)

    # ------------------------------------------------------------------ info

    @property
    def outputs(self) -> tuple[OutputSpec, ...]:
        """The outputs this source answers with."""
        return self._specs

    @property
    def dataset_size(self) -> int | None:
        """The dataset's size when it was recorded (None if the loader had no length)."""
        return self.manifest["dataset_size"]

    def __len__(self) -> int:
        """Sample keys recorded."""
        return self._index.count

    def __contains__(self, key: Any) -> bool:
        return key in self._index

    @property
    def duplicates(self) -> int:
        """Rows whose key an earlier shard already held (answered from the first)."""
        return self._index.duplicates

    def verify(self) -> int:
        """Read every shard and check its checksum; returns how many (raises CacheCorruptError)."""
        for shard in list(self._shards):
            read_shard(shard)
        return len(self._shards)

    # ------------------------------------------------------------ the source

    def submit(self, request: SourceRequest) -> "Future[dict[str, TeacherValue]]":
        """The recorded answers of the batch's samples (a resolved future, unless a fallback is asked)."""
        inputs, batch_id, keys = check_request(request)
        require_keys(keys, "CachedTeacher answers by sample key")
        if self._closed:
            raise SourceClosedError("CachedTeacher is closed; create a new one to submit more batches")
        out: Future = Future()
        out.set_running_or_notify_cancel()
        self._count("submitted")
        shard_no, rows = self._index.lookup(keys)
        hit = shard_no >= 0
        try:
            parts = self._parts(shard_no, rows, hit, len(keys))
            if hit.all():
                self._count("completed", hits=len(keys))
                out.set_result({s.name: gather(s.name, self._layouts[s.name], parts, len(keys), (s, inputs, keys))
                                for s in self._specs})
                return out
            missing = np.flatnonzero(~hit)
            missing_keys = [keys[i] for i in missing]
            if self._fallback is None:
                raise AnswerMissingError(
                    f"{len(missing)} of {len(keys)} samples of batch {batch_id} are not in the cache "
                    f"{self.directory} (first keys: {missing_keys[:5]}); record them (edistill record resumes "
                    "where it stopped) or pass fallback=<a live source>", keys=missing_keys)
            self._ask_fallback(out, inputs, batch_id, keys, missing, missing_keys, parts)
        except StudentError as exc:
            self._count("failed", misses=int((~hit).sum()))
            settle(out, None, exc)
        return out

    def _parts(self, shard_no: np.ndarray, rows: np.ndarray, hit: np.ndarray, batch: int) -> list:
        """``(shard tensors, rows, positions)`` per shard holding some of the batch (see ``gather``)."""
        import torch

        used = np.unique(shard_no[hit])
        if len(used) == 1 and hit.all():
            return [(self._tensors(int(used[0])), torch.from_numpy(rows), None)]
        parts = []
        for s in used:
            where = np.flatnonzero(shard_no == s)
            parts.append((self._tensors(int(s)), torch.from_numpy(rows[where]), torch.from_numpy(where)))
        return parts

    def _ask_fallback(self, out: Future, inputs, batch_id, keys, missing, missing_keys, parts) -> None:
        import torch

        idx = torch.from_numpy(missing)
        sub = {name: take_rows(v, idx) for name, v in inputs.items()}
        fut = self._fallback.submit(SourceRequest(sub, batch_id, missing_keys))
        n_hits = len(keys) - len(missing)

        def done(f: Future) -> None:
            try:
                if f.cancelled():
                    raise StudentError(f"the fallback source cancelled batch {batch_id}")
                answers = f.result()
                merged, prepared = {}, {}
                for spec in self._specs:
                    a = answers[spec.name]
                    theirs = layout_of(spec.name, a, spec, self._token_codec)
                    layout = self._layouts.setdefault(spec.name, theirs)
                    if theirs != layout:
                        raise CacheError(f"the fallback answered output {spec.name!r} as {theirs}, "
                                         f"the cache holds {layout}; give it the recorded OutputSpec")
                    prepared[spec.name] = (layout, columns(spec.name, a, layout))
                    own = (prepared[spec.name][1], torch.arange(len(missing)), idx)
                    merged[spec.name] = gather(spec.name, layout, [*parts, own], len(keys), (spec, inputs, keys))
                if self._writer is not None:
                    self._writer.add(missing_keys, answers, prepared)  # the columns just merged, not rebuilt
            except BaseException as exc:  # the future must resolve whatever happened
                self._count("failed", hits=n_hits, misses=len(missing))
                settle(out, None, exc if isinstance(exc, StudentError) else
                       CacheError(f"batch {batch_id}: merging the fallback's answer failed: {exc!r}"))
                return
            self._count("completed", hits=n_hits, misses=len(missing))
            settle(out, merged)

        fut.add_done_callback(done)

    def stats(self) -> SourceStats:
        """Batches answered (from disk, or with the fallback's help) and failed."""
        with self._lock:
            n = dict(self._n)
        parts = {"fallback": self._fallback.stats()} if self._fallback is not None else {}
        teachers = dict(parts["fallback"].teachers) if parts else {}
        return SourceStats(kind="cache", parts=parts, teachers=teachers, **n)

    def close(self) -> None:
        """Write back what is buffered, close the fallback; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._fallback is not None:
                self._fallback.close()
        finally:
            if self._writer is not None:
                self._writer.close()

    # --------------------------------------------------------------- private

    def _count(self, what: str, hits: int = 0, misses: int = 0) -> None:
        with self._lock:
            self._n[what] += 1
            self.hits += hits
            self.misses += misses

    def _register(self, shard: Shard, meta: dict) -> int:
        """Add a shard's keys to the index (its layouts must match the others'); returns its number."""
        for name, layout in meta.get("outputs", {}).items():
            seen = self._layouts.setdefault(name, layout)
            if seen != layout:
                raise CacheError(f"cache shard {shard.path} stores output {name!r} as {layout}, other shards as "
                                 f"{seen}; the directory mixes recordings")
        with self._lock:
            self._shards.append(shard)
            number = len(self._shards) - 1
        self._index.add(number, meta["keys"])
        return number

    def _written(self, shard: Shard, meta: dict, tensors: dict) -> None:
        number = self._register(shard, meta)
        self._keep(number, tensors)

    def _tensors(self, number: int) -> dict:
        with self._lock:
            hit = self._loaded.get(number)
            if hit is not None:
                self._loaded.move_to_end(number)
                return hit[0]
            shard = self._shards[number]
        _, tensors = read_shard(shard)  # outside the lock: it reads and hashes the file
        self._keep(number, tensors)
        return tensors

    def _keep(self, number: int, tensors: dict) -> None:
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        with self._lock:
            if number in self._loaded:
                return
            self._loaded[number] = (tensors, size)
            self._loaded_bytes += size
            while self._loaded_bytes > self._max_bytes and len(self._loaded) > 1:
                _, (_, dropped) = self._loaded.popitem(last=False)
                self._loaded_bytes -= dropped

