"""The recorded cache of teacher answers: written by :func:`student_client.record`, read by :class:`CachedTeacher`.

Directory layout::

    manifest.json                                  what was recorded (_manifest.py)
    r0-1a2b3c4d-000000-<blake2b>.safetensors       shards: rows of answers by sample key (_shards.py)
    r1-9f8e7d6c-000000-<blake2b>.safetensors       another recorder's (torchrun rank 1)

Modules: :mod:`._shards` (file format, checksums, atomic writes),
:mod:`._layout` (how an output's answers are stored: dense rows, top-k with
compact indices), :mod:`._manifest`, :mod:`._index` (key -> shard and row),
:mod:`._writer` (shards from batches), :mod:`.teacher` (the source).
"""

from __future__ import annotations

from ._manifest import TeacherInfo
from .teacher import CachedTeacher

__all__ = ["CachedTeacher", "TeacherInfo"]
