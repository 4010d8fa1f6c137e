"""Regenerate the checked-in Python code from ``protos/edistill/v1/*.proto``.

Run ``python -m protos.generate`` after editing a ``.proto`` file; the test
suite fails while the checked-in code is stale. ``--check`` only compares.
"""

from __future__ import annotations

import argparse
import difflib
import pathlib
import sys
import tempfile

PROTO_ROOT = pathlib.Path(__file__).resolve().parent
PROTO_FILES = sorted((PROTO_ROOT / "edistill").rglob("*.proto"))


def _rewrite_imports(text: str) -> str:
    # grpc_tools emits absolute imports ("from edistill.v1 import ..."); the
    # generated modules live inside the ``protos`` package.
    return text.replace("from edistill.v1 import", "from protos.edistill.v1 import")


def generate(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Compile every proto into ``out_dir``; return the generated files."""
    from grpc_tools import protoc
    import grpc_tools

    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(p.relative_to(PROTO_ROOT)) for p in PROTO_FILES],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed; see the messages above")
    produced = []
    for path in sorted(out_dir.rglob("*_pb2*.py*")):
        path.write_text(_rewrite_imports(path.read_text()))
        produced.append(path)
    return produced


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the checked-in code is stale")
    opts = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp)
        stale = []
        for path in generate(out):
            rel = path.relative_to(out)
            dest = PROTO_ROOT / rel
            new = path.read_text()
            old = dest.read_text() if dest.exists() else ""
            if new == old:
                continue
            stale.append(str(rel))
            if opts.check:
                sys.stdout.writelines(difflib.unified_diff(
                    old.splitlines(True), new.splitlines(True), f"checked-in/{rel}", f"generated/{rel}"))
            else:
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_text(new)
    if opts.check and stale:
        print(f"stale generated code: {', '.join(stale)}; run: python -m protos.generate", file=sys.stderr)
        return 1
    if not opts.check:
        print(f"regenerated {len(stale)} file(s)" if stale else "generated code is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
