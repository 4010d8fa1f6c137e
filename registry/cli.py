"""``edistill registry ls|watch|serve``: tables of the live teachers in a registry, and a registry to run.

Thin: argument parsing and printing only; the reads are
:func:`registry.discovery.fetch_views` and :func:`registry.discovery.list_services`,
``serve`` is :func:`registry.standalone.serve_registry`.

Exit codes: 0 success; 1 ``ls --service NAME`` found no live teacher of
NAME (like grep finding nothing; the line names the services that have
some) and ``watch`` never reached Redis; 2 an error (bad URL, Redis
unreachable for ``ls``), printed as one line by the umbrella CLI.
The registry URL comes from ``--registry`` or, so that a password need not
appear on a command line (and in ``ps``), from ``$EDISTILL_REGISTRY``: the
umbrella CLI sets that default, like every flag default from the environment,
in one place (``teacher_server.envflags``, rule ``REGISTRY_ENV``; this
package does not import it).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import TextIO

from redis import exceptions as redis_exc

from registry.connection import REGISTRY_URL_ENV, connect, map_redis_error
from registry.discovery import ServiceView, fetch_views, list_services
from registry.errors import RegistryConfigError
from registry.urls import redact_url

__all__ = ["add_commands", "cmd_ls", "cmd_serve", "cmd_watch", "fetch_views", "format_table"]

_COLUMNS = ("SERVICE", "ENDPOINT", "MODEL", "VERSION", "DEVICE", "LOAD", "REQ/S", "AGE")
_CLEAR = "\x1b[H\x1b[2J"  # cursor home + clear screen (ANSI; any terminal emulator)
_NUMERIC = {"LOAD", "REQ/S", "AGE"}  # right-aligned, so magnitudes line up
_LEGEND = ("columns: LOAD = requests in flight + queued at the teacher (as of its last heartbeat); "
           "REQ/S = requests per second between two refreshes (- until the second one); "
           "AGE = time since the teacher started")


def add_commands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``registry ls``, ``registry watch`` and ``registry serve`` to the umbrella CLI."""
    parser = subparsers.add_parser("registry", help="inspect the teacher registry (Redis)")
    sub = parser.add_subparsers(dest="registry_command", required=True, metavar="SUBCOMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--registry",
            default=None,  # $EDISTILL_REGISTRY through the umbrella CLI (see the module docstring)
            metavar="URL",
            help=f"Redis URL, e.g. redis://HOST:6379/0 or rediss://user:pass@HOST:6380/0 "
            f"(default: ${REGISTRY_URL_ENV}; prefer it for URLs with a password)",
        )
        p.add_argument("--service", default=None, metavar="NAME", help="only this service (default: all)")

    ls = sub.add_parser("ls", help="print a table of live teachers and exit")
    common(ls)
    ls.set_defaults(func=cmd_ls)

    watch = sub.add_parser("watch", help="a live-updating table of teachers (Ctrl-C to quit)", epilog=_LEGEND)
    common(watch)
    watch.add_argument("--interval-s", type=float, default=1.0, help="seconds between refreshes (default: 1)")
    watch.add_argument("--count", type=int, default=0, help="stop after this many refreshes (default: 0 = forever)")
    watch.set_defaults(func=cmd_watch)

    serve = sub.add_parser(
        "serve", help="run a registry (an embedded Redis) until SIGTERM or Ctrl-C; prints its URL on stdout",
        description="Run an embedded Redis, with a password, as the registry of teachers that come and go "
                    "(a `teacher serve --registry local` registry dies with its teacher). The URL printed on "
                    "stdout reads the password from a 0600 file (?password_file=PATH), so it is safe on "
                    "command lines and in logs.")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=0, help="port; 0 picks a free one (default: 0)")
    serve.add_argument("--password-file", default=None, metavar="PATH",
                       help="the password's file: an existing file's first line, or a new random one written "
                            "there (0600) and kept; default: a fresh private file removed on exit")
    serve.set_defaults(func=cmd_serve)


def _url(args: argparse.Namespace) -> str:
    url = args.registry
    if not url:
        raise RegistryConfigError(f"no registry given: pass --registry redis://HOST:6379/0 or set ${REGISTRY_URL_ENV}")
    if url == "local":
        raise RegistryConfigError(
            "--registry local starts a private embedded Redis inside a teacher or the demo, which "
            "this command cannot see; pass that Redis's URL (the teacher logs it) instead, or run "
            "`edistill registry serve` for a registry of its own and use the URL it prints"
        )
    return url


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def format_table(views: Sequence[ServiceView], rates: dict[str, float] | None = None) -> str:
    """The teachers of ``views`` as an aligned plain-text table (one header line).

    Args:
        rates: teacher_id -> requests/s (``registry watch``); "-" where unknown.
    """
    rows = []
    for view in views:
        for endpoint, record in sorted(view.teachers.items()):
            rate = (rates or {}).get(record.teacher_id)
            rows.append(
                (
                    view.service,
                    endpoint,
                    record.model_name,
                    record.model_version or "-",
                    record.device,
                    f"{record.load} ({record.in_flight}+{record.queued})",
                    "-" if rate is None else f"{rate:.1f}",
                    _age(view.server_time_s - record.started_at),
                )
            )
    widths = [max(len(str(cell)) for cell in column) for column in zip(_COLUMNS, *rows)]
    lines = [
        "  ".join(str(cell).rjust(width) if name in _NUMERIC else str(cell).ljust(width)
                  for cell, width, name in zip(row, widths, _COLUMNS)).rstrip()
        for row in [_COLUMNS, *rows]
    ]
    return "\n".join(lines)


def _bad_lines(views: Sequence[ServiceView]) -> list[str]:
    return [f"skipped malformed record {teacher_id!r} in {view.service!r}: {error}" for view in views for teacher_id, error in view.bad.items()]


def cmd_ls(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """``registry ls``: print the table once, or a line saying there are no live teachers.

    Returns 0, or 1 when ``--service`` has no live teacher (the line then
    names the services that have some).
    """
    out = out or sys.stdout
    url = _url(args)
    client = connect(url)
    try:
        views = fetch_views(client, args.service)
        others = list_services(client) if args.service and not any(v.teachers for v in views) else []
    except (redis_exc.RedisError, OSError) as exc:
        raise map_redis_error(exc, url, "listing teachers") from exc
    finally:
        client.close()
    for line in _bad_lines(views):
        print(f"warning: {line}", file=sys.stderr)
    if not any(view.teachers for view in views):
        if not args.service:
            print(f"no live teachers in any service at {redact_url(url)}", file=out)
            return 0
        print(f"no live teachers in service {args.service!r} at {redact_url(url)}; "
              f"{services_line(others)}", file=out)
        return 1
    print(format_table(views), file=out)
    return 0


def services_line(services: Sequence[str]) -> str:
    """``"services with live teachers: a, b"`` (or that there are none)."""
    if not services:
        return "no service has live teachers there"
    return f"services with live teachers: {', '.join(services)}"


def cmd_serve(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """``registry serve``: an embedded Redis until SIGTERM/Ctrl-C; its URL is the first line on stdout."""
    from registry.standalone import serve_registry

    out = out or sys.stdout

    def ready(url: str) -> None:
        print(url, file=out, flush=True)

    return serve_registry(host=args.host, port=args.port, password_file=args.password_file, on_ready=ready)


def _watch_rc(reached: bool, url: str) -> int:
    if reached:
        return 0
    print(f"edistill registry watch: never reached Redis at {redact_url(url)}", file=sys.stderr)
    return 1


def cmd_watch(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """``registry watch``: redraw the table every ``--interval-s`` until Ctrl-C (or ``--count``)."""
    out = out or sys.stdout
    url = _url(args)
    if not args.interval_s > 0:
        raise RegistryConfigError(f"--interval-s must be > 0, got {args.interval_s}")
    redraw = out.isatty()
    client = connect(url)
    previous: dict[str, tuple[float, int]] = {}  # teacher_id -> (server time, requests_total)
    views: list[ServiceView] = []
    status = ""
    refreshes = 0
    reached = False  # Redis answered at least once
    try:
        while True:
            try:
                views = fetch_views(client, args.service)
                status, reached = "", True
            except (redis_exc.RedisError, OSError) as exc:
                shown = "showing the last known teachers" if reached else "no teachers known yet, retrying"
                status = f"registry unreachable, {shown}: {map_redis_error(exc, url, 'reading')}"
            rates: dict[str, float] = {}
            current: dict[str, tuple[float, int]] = {}
            for view in views:
                for record in view.teachers.values():
                    current[record.teacher_id] = (record.updated_at, record.requests_total)
                    before = previous.get(record.teacher_id)
                    if before and record.updated_at > before[0]:
                        rates[record.teacher_id] = (record.requests_total - before[1]) / (record.updated_at - before[0])
            if not status:
                previous = current
            count = sum(len(view.teachers) for view in views)
            load = sum(record.load for view in views for record in view.teachers.values())
            total = f"{sum(rates.values()):.1f} req/s" if rates else "- req/s"
            header = (f"edistill registry {redact_url(url)}  {count} live teacher(s)  load {load}  {total}  "
                      f"{time.strftime('%H:%M:%S')}")
            body = format_table(views, rates) if count else "(no live teachers)"
            text = "\n".join(line for line in (header, status, body, *_bad_lines(views)) if line)
            out.write((_CLEAR if redraw else "\n") + text + "\n")
            out.flush()
            refreshes += 1
            if args.count and refreshes >= args.count:
                return _watch_rc(reached, url)
            time.sleep(args.interval_s)
    except KeyboardInterrupt:
        out.write("\n")
        return _watch_rc(reached, url)
    finally:
        client.close()
