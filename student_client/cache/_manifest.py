"""The cache manifest: what was recorded, from which teacher, for which dataset.

``manifest.json`` in the cache directory::

    {"format": "edistill-cache/1",
     "teacher": {"model_name": "resnet101", "model_version": "3"},
     "outputs": [{"name": "logits", "transform": "log_probs", "temperature": 4.0, "top_k": 0, "dtype": "float32"}],
     "dataset_size": 50000, "keys": "dataset indices", "digest": "<blake2b of the rest>"}

The first recorder creates it with an exclusive link (a complete temporary
file hard-linked to the final name, which fails if it exists), so several
recorders starting at once agree on one manifest and none overwrites
another's; every later recorder and every reader compares what it is asked
for against it and says what differs (:class:`CacheMismatchError`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from typing import Any, Sequence

from ..errors import CacheCorruptError, CacheError, CacheMismatchError
from ..outputs import OutputSpec
from ._shards import FORMAT

__all__ = ["MANIFEST", "TeacherInfo", "check_outputs", "ensure_manifest", "load_manifest", "make_manifest"]

MANIFEST = "manifest.json"
#: Every field of OutputSpec but its name: what a recorded output must match (a new field is compared too).
_SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(OutputSpec) if f.name != "name")


@dataclasses.dataclass(frozen=True)
class TeacherInfo:
    """The teacher whose answers a cache holds (from Describe for served teachers)."""

    model_name: str
    model_version: str = ""

    def __str__(self) -> str:
        return f"{self.model_name} version {self.model_version or '(none)'}"


def _digest(body: dict) -> str:
    return hashlib.blake2b(json.dumps(body, sort_keys=True).encode(), digest_size=16).hexdigest()


def make_manifest(specs: Sequence[OutputSpec], teacher: TeacherInfo, dataset_size: int | None, keys: str) -> dict:
    """The manifest of a recording (without its digest)."""
    return {"format": FORMAT, "teacher": dataclasses.asdict(teacher),
            "outputs": [dataclasses.asdict(s) for s in specs], "dataset_size": dataset_size, "keys": keys}


def load_manifest(directory: pathlib.Path) -> dict:
    """The manifest of the cache in ``directory``; a clear error when there is none or it is damaged."""
    path = directory / MANIFEST
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise CacheError(f"{directory} holds no {MANIFEST}: it is not a cache written by record() / "
                         "edistill record (or the recording never started)") from None
    try:
        doc = json.loads(text)
        body = {k: v for k, v in doc.items() if k != "digest"}
        ok = doc.get("digest") == _digest(body)
    except (ValueError, AttributeError) as exc:
        raise CacheCorruptError(f"cache manifest {path} is damaged ({exc})", path=path) from exc
    if not ok:
        raise CacheCorruptError(f"cache manifest {path} is damaged (its digest does not match its content)", path=path)
    if body.get("format") != FORMAT:
        raise CacheError(f"{path} is format {body.get('format')!r}; this version reads {FORMAT}")
    return body


def specs_of(manifest: dict) -> tuple[OutputSpec, ...]:
    """The recorded output specs."""
    return tuple(OutputSpec(**o) for o in manifest["outputs"])


def _describe_differences(recorded: dict, wanted: dict) -> list[str]:
    diffs = []
    if recorded["teacher"] != wanted["teacher"]:
        diffs.append(f"teacher: recorded {TeacherInfo(**recorded['teacher'])}, now {TeacherInfo(**wanted['teacher'])}")
    if recorded["outputs"] != wanted["outputs"]:
        diffs.append(f"outputs: recorded {_specs_text(recorded['outputs'])}, now {_specs_text(wanted['outputs'])}")
    if recorded["dataset_size"] != wanted["dataset_size"]:
        diffs.append(f"dataset size: recorded {recorded['dataset_size']}, now {wanted['dataset_size']}")
    if recorded["keys"] != wanted["keys"]:
        diffs.append(f"sample keys: recorded {recorded['keys']}, now {wanted['keys']}")
    return diffs


def _specs_text(outputs: list[dict]) -> str:
    return "; ".join(f"{o['name']} ({', '.join(f'{f}={o[f]}' for f in _SPEC_FIELDS)})" for o in outputs)


def ensure_manifest(directory: pathlib.Path, manifest: dict) -> dict:
    """Create the manifest, or check that the existing one records the same thing.

    Raises:
        CacheMismatchError: the directory holds a recording of something else.
    """
    path = directory / MANIFEST
    doc = {**manifest, "digest": _digest(manifest)}
    if not path.exists():
        tmp = directory / f".tmp-manifest-{os.getpid()}-{os.urandom(4).hex()}"
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # exclusive: exactly one of several starting recorders creates it
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    recorded = load_manifest(directory)
    diffs = _describe_differences(recorded, manifest)
    if diffs:
        raise CacheMismatchError(f"the cache in {directory} was recorded differently: {'; '.join(diffs)}. "
                                 "Record into a new directory, or ask for what was recorded")
    return recorded


def check_outputs(directory: pathlib.Path, manifest: dict, asked: Sequence[OutputSpec],
                  model_version: Any = None) -> None:
    """Check a reader's request against the manifest; the error lists every difference.

    Raises:
        CacheMismatchError: an output not recorded, recorded with another
            field of its OutputSpec (transform, temperature, top-k, dtype,
            sample, seed, tail, mask), or another model version.
    """
    recorded = {s.name: s for s in specs_of(manifest)}
    diffs = []
    for spec in asked:
        have = recorded.get(spec.name)
        if have is None:
            diffs.append(f"output {spec.name!r} was not recorded (recorded: {', '.join(recorded)})")
            continue
        for f in _SPEC_FIELDS:
            if getattr(have, f) != getattr(spec, f):
                diffs.append(f"output {spec.name!r}: {f} recorded {getattr(have, f)!r}, asked {getattr(spec, f)!r}")
    version = manifest["teacher"]["model_version"]
    if model_version is not None and str(model_version) != version:
        diffs.append(f"model version: recorded {version!r} ({manifest['teacher']['model_name']}), "
                     f"asked {str(model_version)!r}")
    if diffs:
        raise CacheMismatchError(f"the cache in {directory} cannot answer this request: {'; '.join(diffs)}. "
                                 "Ask for what was recorded (CachedTeacher(dir).outputs) or record again")
