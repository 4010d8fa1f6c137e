"""Fill a cache directory with shards: the recorder's and the write-back's writer."""

from __future__ import annotations

import logging
import pathlib
import threading
from typing import Any, Callable, Mapping, Sequence

from ..errors import CacheError, ConfigError
from ..outputs import OutputSpec
from ._layout import ColumnBuffer
from ._manifest import TeacherInfo
from ._shards import Shard, new_writer_id, parse_shard, write_shard

__all__ = ["CacheWriter", "check_keys"]

logger = logging.getLogger(__name__)


def check_keys(keys: Sequence[Any]) -> list:
    """Keys as plain ints or strs (numpy/torch ints become ints); a clear error for anything else."""
    out = []
    for k in keys:
        if isinstance(k, bool):
            raise ConfigError(f"sample keys must be ints or strings, got a bool ({k!r})")
        if isinstance(k, str):
            out.append(k)
        elif hasattr(k, "__index__"):
            out.append(int(k))
        else:
            raise ConfigError(f"sample keys must be ints or strings to be stored, got {type(k).__name__} ({k!r})")
    return out


class CacheWriter:
    """Buffers answers and writes them as shards of ``shard_rows`` rows (thread-safe).

    Args:
        directory: the cache directory (the manifest is the caller's business).
        specs: the outputs each batch must carry.
        teacher: written into every shard's metadata.
        rank: part of the writer id (torchrun's RANK), so ranks' files never collide.
        shard_rows: rows per shard; a smaller shard loses less to a kill, a larger one has
            less per-file overhead.
        on_shard: called with ``(Shard, meta, tensors)`` after each shard is on disk.
        token_codec: ``"exact"`` or ``"compact"`` for per-token answers (:mod:`._tokens`).
        before_shard: called before each shard is written; an exception it raises
            stops the writer (the buffered rows are dropped) and propagates.
    """

    def __init__(self, directory: pathlib.Path, specs: Sequence[OutputSpec], teacher: TeacherInfo, *,
                 rank: int = 0, shard_rows: int = 4096,
                 on_shard: Callable[[Shard, dict, dict], None] | None = None,
                 before_shard: Callable[[], None] | None = None, token_codec: str = "exact") -> None:
        if isinstance(shard_rows, bool) or not isinstance(shard_rows, int) or shard_rows < 1:
            raise ConfigError(f"shard_rows must be an int >= 1, got {shard_rows!r}")
        self.directory = pathlib.Path(directory)
        self.writer_id = new_writer_id(rank)
        self.teacher = teacher
        self.shard_rows = shard_rows
        self.on_shard = on_shard
        self.before_shard = before_shard
        self.shards: list[pathlib.Path] = []
        self.rows_written = 0
        self._buf = ColumnBuffer(specs, token_codec)
        self._key_type: type | None = None
        self._seq = 0
        self._lock = threading.Lock()  # write-back adds from pool threads
        self._closed = False

    def add(self, keys: Sequence[Any], answers: Mapping[str, Any],
            prepared: Mapping[str, tuple[dict, dict[str, Any]]] | None = None) -> None:
        """Buffer one batch; writes a shard whenever ``shard_rows`` rows are buffered.

        ``prepared``: ``name -> (layout, columns)`` already built (see :meth:`ColumnBuffer.add`).
        """
        keys = check_keys(keys)
        with self._lock:
            if self._closed:
                raise CacheError("this cache writer is closed")
            for k in keys:
                if self._key_type is None:
                    self._key_type = type(k)
                elif type(k) is not self._key_type:
                    raise ConfigError(f"sample keys mix {self._key_type.__name__} and {type(k).__name__} "
                                      f"({k!r}); a cache holds one key type")
            self._buf.add(keys, answers, prepared)
            if len(self._buf) >= self.shard_rows:
                self._flush_locked()

    def flush(self) -> None:
        """Write the buffered rows as a shard now (nothing if none)."""
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        if not len(self._buf):
            return
        if self.before_shard is not None:
            try:
                self.before_shard()
            except BaseException:
                self._closed = True
                self._buf.take()
                raise
        keys, layouts, tensors = self._buf.take()
        meta = {"keys": keys, "rows": len(keys), "teacher": {"model_name": self.teacher.model_name,
                                                             "model_version": self.teacher.model_version},
                "outputs": layouts}
        path = write_shard(self.directory, self.writer_id, self._seq, tensors, meta)
        self._seq += 1
        self.shards.append(path)
        self.rows_written += len(keys)
        logger.debug("cache shard %s: %d rows", path.name, len(keys))
        if self.on_shard is not None:
            self.on_shard(parse_shard(path), meta, tensors)

    def abandon(self) -> None:
        """Drop what is buffered and refuse more (after an error); idempotent."""
        with self._lock:
            self._closed = True
            self._buf.take()

    def close(self) -> None:
        """Write what is buffered; idempotent."""
        with self._lock:
            if self._closed:
                return
            try:
                self._flush_locked()
            finally:
                self._closed = True
