"""The ``edistill`` command line: ``teacher``, ``registry``, ``demo`` and ``record``.

Thin by design: each package contributes its own sub-commands through an
``add_commands(subparsers)`` function, and each command function returns an
exit code. Flag defaults from ``EDISTILL_*`` variables are applied once, to
the whole tree, by :func:`teacher_server.envflags.apply_env_tree` (the one
place where CLIs read the environment). Errors from the library are printed
as one line (no traceback) and exit non-zero.
"""

from __future__ import annotations

import argparse
import logging
import sys

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The full ``edistill`` argument parser."""
    from registry import cli as registry_cli
    from student_client import demo as demo_cli
    from student_client import record_cli
    from teacher_server import cli as teacher_cli
    from teacher_server.envflags import apply_env_tree

    parser = argparse.ArgumentParser(
        prog="edistill",
        description="Teacher-as-a-service knowledge distillation for PyTorch.",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO; env EDISTILL_LOG_LEVEL)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    teacher_cli.add_commands(sub)
    registry_cli.add_commands(sub)
    demo_cli.add_commands(sub)
    record_cli.add_commands(sub)
    apply_env_tree(parser)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    from registry.errors import RegistryError
    from student_client.errors import StudentError
    from teacher_server.errors import TeacherError

    return (RegistryError, StudentError, TeacherError)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``edistill`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("edistill: interrupted", file=sys.stderr)
        return 130
    except _user_errors() as exc:
        print(f"edistill {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
