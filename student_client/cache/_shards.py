"""Cache shards on disk: one safetensors file per shard, checksummed, written atomically.

A shard holds the teacher answers of a set of samples, one row per sample:

* the file is a plain `safetensors <https://github.com/huggingface/safetensors>`_
  file (any safetensors reader opens it). Its ``__metadata__["edistill"]`` is
  a JSON object with the format tag, the rows' sample **keys** (in row order),
  the teacher that answered and the layout of each output (see
  :mod:`student_client.cache._layout`);
* a tensor whose zstd-compressed bytes are at least 10 % smaller is stored
  compressed, as a ``uint8`` tensor, with its dtype and shape in the
  metadata ("compressed where it pays": fp32 logits barely compress, sparse
  or low-entropy columns do);
* the file name carries the BLAKE2b-128 digest of the whole file,
  ``<writer>-<seq>-<digest>.safetensors``, checked whenever the shard is read:
  a flipped byte anywhere (header included, where a changed key digit could
  otherwise pass as a valid file) is a :class:`CacheCorruptError` naming the
  file, never a wrong answer;
* it is written to a temporary file in the same directory, fsynced, renamed
  to its final name and the directory fsynced: a recorder killed at any point
  leaves either the complete shard or none (and a ``.tmp-*`` file that
  readers ignore and the next recorder on this host removes).

``<writer>`` is ``r<rank>-<8 hex digits>``, unique per recorder, so several
recorders (torchrun ranks) fill one directory with disjoint files and no
shared index.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import socket
import struct
import uuid
from typing import Any

from ..errors import CacheCorruptError
from ._tensors import dtype_name

__all__ = ["FORMAT", "Shard", "list_shards", "new_writer_id", "parse_shard", "read_meta", "read_shard", "remove_stale_temps",
           "write_shard"]

FORMAT = "edistill-cache/1"
_META_KEY = "edistill"
_NAME = re.compile(r"^(?P<writer>r\d+-[0-9a-f]{8})-(?P<seq>\d{6,})-(?P<digest>[0-9a-f]{32})\.safetensors$")
_TMP_PREFIX = ".tmp-"
_MIN_SAVING = 0.10  # compress a tensor only if zstd saves at least this share of its bytes
_ZSTD_LEVEL = 3  # zstd's default: ~300 MB/s to write, >1 GB/s to read on one core
_MAX_HEADER = 1 << 30  # a header claiming more than this is damage, not a shard


class Shard:
    """A shard file found in a cache directory (name parts parsed, not yet read)."""

    __slots__ = ("path", "writer", "seq", "digest")

    def __init__(self, path: pathlib.Path, writer: str, seq: int, digest: str) -> None:
        self.path, self.writer, self.seq, self.digest = path, writer, seq, digest

    def __repr__(self) -> str:
        return f"Shard({self.path.name})"


def new_writer_id(rank: int) -> str:
    """A writer id unique to one recorder: ``r<rank>-<8 random hex digits>``."""
    return f"r{int(rank)}-{uuid.uuid4().hex[:8]}"


def parse_shard(path: pathlib.Path) -> Shard | None:
    """The shard named by ``path``, or None when the name is not a shard's."""
    m = _NAME.match(path.name)
    return None if m is None else Shard(path, m["writer"], int(m["seq"]), m["digest"])


def list_shards(directory: pathlib.Path) -> list[Shard]:
    """The shards in ``directory``, sorted by name (temporary and foreign files are ignored)."""
    return [s for s in map(parse_shard, sorted(directory.iterdir())) if s is not None]


def _digest(data: bytes | memoryview) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _zstd():
    import zstandard

    return zstandard


def write_shard(directory: pathlib.Path, writer: str, seq: int, tensors: dict[str, Any], meta: dict) -> pathlib.Path:
    """Write one shard atomically; returns its final path.

    Args:
        tensors: name -> contiguous CPU tensor.
        meta: the shard's JSON metadata (keys, teacher, layouts); ``format``
            and the compressed tensors' descriptions are added here.
    """
    import torch
    from safetensors.torch import save

    stored: dict[str, torch.Tensor] = {}
    packed: dict[str, dict] = {}
    zstd = _zstd()
    for name, t in tensors.items():
        t = t.detach().contiguous().cpu()
        raw = t.view(torch.uint8).reshape(-1).numpy() if t.numel() else None
        if raw is not None and raw.nbytes >= 4096:
            small = zstd.ZstdCompressor(level=_ZSTD_LEVEL).compress(raw)
            if len(small) <= (1 - _MIN_SAVING) * raw.nbytes:
                stored[name] = torch.frombuffer(bytearray(small), dtype=torch.uint8)
                packed[name] = {"codec": "zstd", "dtype": dtype_name(t.dtype), "shape": list(t.shape)}
                continue
        stored[name] = t
    data = save(stored, metadata={_META_KEY: json.dumps({"format": FORMAT, **meta, "packed": packed},
                                                        separators=(",", ":"))})
    final = directory / f"{writer}-{seq:06d}-{_digest(data)}.safetensors"
    tmp = directory / f"{_TMP_PREFIX}{socket.gethostname()}-{os.getpid()}-{final.name}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    _fsync_dir(directory)
    return final


def _fsync_dir(directory: pathlib.Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself survives a power cut
    finally:
        os.close(fd)


def _corrupt(shard: Shard, why: str) -> CacheCorruptError:
    return CacheCorruptError(f"cache shard {shard.path} is damaged ({why}); delete the file and record again "
                             "(edistill record resumes: it records only the samples that file held)", path=shard.path)


def _parse_meta(shard: Shard, header: bytes) -> dict:
    try:
        meta = json.loads(json.loads(header)["__metadata__"][_META_KEY])
    except (ValueError, KeyError, TypeError) as exc:
        raise _corrupt(shard, f"unreadable header: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _corrupt(shard, f"not an {FORMAT} shard")
    return meta


def read_meta(shard: Shard) -> dict:
    """The shard's metadata from its header only (for the index and resuming; the digest is checked on read)."""
    try:
        with open(shard.path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > _MAX_HEADER:
                raise _corrupt(shard, f"header length {n}")
            header = f.read(n)
    except (OSError, struct.error) as exc:
        raise _corrupt(shard, f"cannot read its header: {exc}") from exc
    if len(header) != n:
        raise _corrupt(shard, "truncated header")
    return _parse_meta(shard, header)


def read_shard(shard: Shard) -> tuple[dict, dict[str, Any]]:
    """``(meta, tensors)`` of a shard, after checking the whole file against its digest."""
    import torch
    from safetensors.torch import load

    try:
        data = shard.path.read_bytes()
    except OSError as exc:
        raise _corrupt(shard, f"cannot read it: {exc}") from exc
    if _digest(data) != shard.digest:
        raise _corrupt(shard, "its BLAKE2b checksum does not match the one in its name")
    (n,) = struct.unpack("<Q", data[:8])
    meta = _parse_meta(shard, data[8:8 + n])
    try:
        tensors = load(data)
        for name, p in meta["packed"].items():
            raw = _zstd().ZstdDecompressor().decompress(tensors[name].numpy().tobytes())
            tensors[name] = torch.frombuffer(bytearray(raw), dtype=getattr(torch, p["dtype"])).reshape(p["shape"])
    except Exception as exc:  # the digest matched, so this is a writer bug or a foreign file
        raise _corrupt(shard, f"{type(exc).__name__}: {exc}") from exc
    return meta, tensors


def remove_stale_temps(directory: pathlib.Path) -> int:
    """Remove temporary files left by killed recorders on this host (their pid is gone); returns how many."""
    host, removed = socket.gethostname(), 0
    for path in directory.glob(f"{_TMP_PREFIX}*"):
        rest = path.name[len(_TMP_PREFIX):]
        if not rest.startswith(host + "-"):
            continue  # another machine's recorder on a shared filesystem: not ours to judge
        pid = rest[len(host) + 1:].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
