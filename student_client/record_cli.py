"""``edistill record``: record teacher answers for a dataset into a cache directory.

::

    edistill record --data mypkg.data:train_set --out cache/r101 \\
        --registry redis://redis:6379/0 --service r101 \\
        --output logits,transform=log_probs,temperature=4 --batch-size 256

``--data`` names a function returning a map-style dataset (it is wrapped in a
DataLoader of ``--batch-size``, keys = dataset indices) or a loader. Run it
again after a crash to finish the recording; run one per torchrun rank
(``$RANK``) to split the work. Thin: the work is :func:`student_client.record`.
"""

from __future__ import annotations

import argparse
import importlib
import typing
import sys
from typing import Any

from .errors import ConfigError

__all__ = ["add_commands", "parse_output", "load_data"]


def parse_output(text: str):
    """``NAME[,FIELD=VALUE...]`` -> :class:`OutputSpec`, FIELD any field of OutputSpec but its name
    (``transform``, ``temperature``, ``top_k``, ``dtype``, ``sample``, ``seed``, ``tail``, ``mask``), each
    value parsed as that field's type (``tail=true``)."""
    from .cache._manifest import _SPEC_FIELDS
    from .outputs import OutputSpec

    types = typing.get_type_hints(OutputSpec)
    name, *pairs = [p.strip() for p in text.split(",")]
    fields: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in _SPEC_FIELDS:
            raise ConfigError(f"--output {text!r}: expected NAME[,transform=...,temperature=...,top_k=...,dtype=...], "
                              f"got {pair!r}; the fields are {', '.join(_SPEC_FIELDS)}")
        fields[key] = _parse_value(text, key, value, types[key])
    return OutputSpec(name, **fields)


def _parse_value(text: str, key: str, value: str, kind: type) -> Any:
    if kind is bool:
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigError(f"--output {text!r}: {key} must be true or false, got {value!r}")
        return value.lower() in ("true", "1", "yes")
    if kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            raise ConfigError(f"--output {text!r}: {key} must be a number, got {value!r}") from None
    return value


def load_data(spec: str, batch_size: int, num_workers: int) -> Any:
    """The loader named by ``package.module:function`` (a dataset is wrapped in a DataLoader)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"--data must be package.module:function, got {spec!r}")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"--data {spec}: cannot import it ({exc})") from exc
    data = fn() if callable(fn) else fn
    from torch.utils.data import DataLoader, Dataset

    if isinstance(data, Dataset):
        return DataLoader(data, batch_size=batch_size, num_workers=num_workers)
    if not hasattr(data, "__iter__"):
        raise ConfigError(f"--data {spec} returned a {type(data).__name__}; return a dataset or a DataLoader")
    return data


def _cmd_record(args: argparse.Namespace) -> int:
    from .pool import TeacherPool
    from .recording import record

    outputs = [parse_output(o) for o in args.output] or ["logits"]
    if bool(args.teachers) == bool(args.registry):
        raise ConfigError("give the teachers with --teachers HOST:PORT ... or --registry URL --service NAME")
    if args.registry and not args.service:
        raise ConfigError("--registry needs --service NAME (the teachers' service in the registry)")
    loader = load_data(args.data, args.batch_size, args.num_workers)
    pool = (TeacherPool(args.teachers, outputs) if args.teachers
            else TeacherPool.from_registry(args.registry, args.service, outputs))
    with pool:
        names = [n.strip() for n in args.inputs.split(",")] if args.inputs else None
        pick = (lambda batch: {n: batch[n] for n in names}) if names else None
        result = record(loader, pool, args.out, shard_rows=args.shard_rows, window=args.window, rank=args.rank,
                        progress=args.progress, teacher_input=pick, token_codec=args.token_codec)
    of = f" of {result.dataset_size}" if result.dataset_size is not None else ""
    print(f"edistill record: {result.recorded} samples recorded, {result.skipped} already there; {result.directory} "
          f"holds {result.cached}{of} samples from {result.teacher}", file=sys.stdout, flush=True)
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``edistill record`` to the umbrella CLI."""
    p = subparsers.add_parser("record", help="record teacher answers for a dataset into a cache directory",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="package.module:function returning a dataset or a DataLoader")
    p.add_argument("--out", required=True, help="the cache directory (created; a rerun resumes)")
    p.add_argument("--teachers", nargs="+", default=None, metavar="HOST:PORT", help="teacher endpoints")
    p.add_argument("--registry", default=None, help="Redis URL of the registry")
    p.add_argument("--service", default=None, help="the teachers' service in the registry")
    p.add_argument("--output", action="append", default=[], metavar="SPEC",
                   help="output to record, NAME[,transform=raw|probs|log_probs,temperature=T,top_k=K,"
                        "dtype=float32|float16|bfloat16,sample=S,seed=N,tail=true|false,mask=INPUT]; "
                        "repeatable (default: logits)")
    p.add_argument("--batch-size", type=int, default=256, help="DataLoader batch size for a dataset (default 256)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers for a dataset (default 0)")
    p.add_argument("--inputs", default=None, metavar="NAME,NAME",
                   help="dict batches: the keys sent as the model's named inputs (e.g. input_ids,attention_mask); "
                        "default: the first element of a tuple batch, or its 'input' key")
    p.add_argument("--token-codec", choices=("exact", "compact"), default="exact",
                   help="per-token answers of language models: as sent, or compact (log-probs in 1/16-nat steps)")
    p.add_argument("--shard-rows", type=int, default=4096, help="samples per shard (default 4096)")
    p.add_argument("--window", type=int, default=8, help="batches in flight (default 8)")
    p.add_argument("--rank", type=int, default=None, help="this recorder's rank (default $RANK, else 0)")
    p.add_argument("--progress", action="store_true", help="a progress bar on stderr")
    p.set_defaults(func=_cmd_record)
