"""``edistill teacher serve | describe | health`` (also ``python -m teacher_server ...``).

Thin: parse arguments, build the config and model with the library's own
functions, run. Errors from the library propagate as :class:`TeacherError`
and are printed as one line by the caller (``student_client.cli.main`` or
:func:`main` here). The ready line printed by ``serve`` is a contract
(docs/internals.md; written from :data:`teacher_server.process.READY_PREFIX`,
which :class:`teacher_server.process.TeacherProcess` reads)::

    edistill teacher ready address=HOST:PORT

Flag defaults from ``EDISTILL_*`` variables are applied to the whole command
tree by :mod:`teacher_server.envflags` (re-exported here for older importers).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from typing import Sequence

import grpc
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.edistill.v1 import teacher_pb2 as pb
from protos.edistill.v1 import teacher_pb2_grpc as pb_grpc
from teacher_server.config import DEFAULT_MAX_MESSAGE_BYTES, PRECISIONS, TeacherConfig
from teacher_server.envflags import ENV_LIST_SEP, SERVE_ENV_NAMES, apply_env_defaults, apply_env_tree, env_var_name
from teacher_server.errors import ConfigError, TeacherError, TeacherUnreachable
from teacher_server.process import READY_PREFIX

__all__ = ["ENV_LIST_SEP", "READY_PREFIX", "SERVE_ENV_NAMES", "add_commands", "add_teacher_commands",
           "apply_env_defaults", "build_parser", "default_service", "env_var_name", "main"]

_defaults = TeacherConfig()


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``teacher {serve,describe,health}`` to the umbrella ``edistill`` CLI."""
    teacher = subparsers.add_parser("teacher", help="serve a teacher model, or query one")
    add_teacher_commands(teacher.add_subparsers(dest="teacher_command", required=True, metavar="COMMAND"))


def add_teacher_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``serve``, ``describe`` and ``health`` to ``sub``."""
    p = sub.add_parser("serve", help="load a model and serve it over gRPC until SIGTERM")
    p.add_argument("--model", required=True, metavar="SPEC",
                   help="TorchScript file, torch.export .pt2 archive, or package.module:factory")
    p.add_argument("--host", default=_defaults.host, help=f"bind address (default: {_defaults.host})")
    p.add_argument("--port", type=int, default=_defaults.port, help="port; 0 picks a free one (default: 0)")
    p.add_argument("--advertise", default=None, metavar="HOST[:PORT]",
                   help="address announced on the ready line and to the registry, for containers and NAT "
                        "(default: --host, or this machine's own IP when --host is 0.0.0.0)")
    p.add_argument("--device", default=_defaults.device, help="cpu or cuda:N (default: cpu)")
    p.add_argument("--precision", choices=PRECISIONS, default=_defaults.precision,
                   help="fp32, or fp16/bf16 autocast (default: fp32)")
    p.add_argument("--max-batch-size", type=int, default=_defaults.max_batch_size, metavar="N",
                   help=f"samples per forward pass (default: {_defaults.max_batch_size})")
    p.add_argument("--max-batch-tokens", type=int, default=None, metavar="N",
                   help="sequence models: padded tokens (rows x longest length) per forward pass "
                        "(default: no limit besides --max-batch-size)")
    p.add_argument("--max-queue-delay-ms", type=float, default=_defaults.max_queue_delay_ms, metavar="MS",
                   help=f"how long a batch waits to fill (default: {_defaults.max_queue_delay_ms})")
    p.add_argument("--max-queue-size", type=int, default=_defaults.max_queue_size, metavar="N",
                   help=f"queued requests before RESOURCE_EXHAUSTED (default: {_defaults.max_queue_size})")
    p.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES, metavar="BYTES",
                   help="gRPC send/receive limit (default: 256 MiB)")
    p.add_argument("--grace-s", type=float, default=_defaults.grace_s,
                   help=f"seconds to drain in-flight requests on SIGTERM (default: {_defaults.grace_s})")
    p.add_argument("--torch-threads", type=int, default=None, metavar="N",
                   help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--metrics-port", type=_metrics_port, default=None, metavar="PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (same host as --host); "
                        "0 picks a free port (logged); 'none' or unset: no metrics endpoint")
    p.add_argument("--checkpoint", default=None, metavar="FILE",
                   help="state dict for a factory model, loaded with weights_only=True")
    p.add_argument("--model-kwargs", default=None, metavar="JSON",
                   help='keyword arguments for a factory model, e.g. \'{"num_classes": 100}\'')
    p.add_argument("--input-spec", action="append", default=None, metavar="NAME:DTYPE:D1,D2,...",
                   help="input signature, repeatable, per sample (no batch dim), -1 = free dim; "
                        "overrides what the model file declares (env EDISTILL_INPUT_SPEC: specs separated "
                        "by ';'; any --input-spec on the command line replaces them all)")
    p.add_argument("--features", default=None, metavar="PATH,PATH",
                   help="also answer these submodules' activations as outputs, by module path "
                        "(e.g. layer3,layer4; factory models only)")
    p.add_argument("--name", default=None, help="model name reported to students (default: from --model)")
    p.add_argument("--version", default=_defaults.model_version, help="model version reported to students")
    p.add_argument("--registry", default=None, metavar="URL",
                   help="Redis URL to register in (redis://[user:password@]host:6379/0, rediss://...), or "
                        "'local' to start an embedded Redis; prefer EDISTILL_REGISTRY for URLs with passwords")
    p.add_argument("--service", default=None, metavar="NAME",
                   help="service name students look up: letters, digits, '.', '_', '-' (default: the model "
                        "name, other characters replaced by '-')")
    p.add_argument("--heartbeat-s", type=float, default=1.0, help="registry heartbeat period (default: 1.0)")
    p.add_argument("--ttl-s", type=float, default=3.0,
                   help="seconds without heartbeat before the registry drops this teacher (default: 3.0)")
    p.add_argument("--local-socket", default=_defaults.local_socket, metavar="auto|off|PATH",
                   help="same-host fast path: a Unix socket students on this machine use instead of gRPC, "
                        "tensor bytes passed as shared memory; only this user's processes may connect. "
                        "'auto' (default): teacher-<id>.sock in $EDISTILL_RUNTIME_DIR, else "
                        "$XDG_RUNTIME_DIR/edistill, else <tmp>/edistill-<uid> (a 0700 directory), skipped "
                        "with a warning when unusable; a PATH: exactly there; 'off': gRPC only")
    _add_security_flags(p)
    p.set_defaults(func=cmd_serve)  # flag defaults from EDISTILL_*: teacher_server.envflags.ENV_COMMANDS

    p = sub.add_parser("describe", help="print a teacher's Describe answer as JSON")
    p.add_argument("address", help="HOST:PORT")
    p.add_argument("--timeout-s", type=float, default=5.0)
    _add_client_security_flags(p)
    p.set_defaults(func=cmd_describe)

    p = sub.add_parser("health", help="standard gRPC health check; exit 0 only when SERVING")
    p.add_argument("address", help="HOST:PORT")
    p.add_argument("--timeout-s", type=float, default=5.0)
    p.add_argument("--health-service", default="", metavar="GRPC_SERVICE",
                   help="gRPC health-check service to ask about, e.g. edistill.v1.Teacher (default: '', the whole "
                        "server); not the registry service (`registry ls --service`)")
    # Deprecated alias (kept so existing probes keep working): it read like the registry service.
    p.add_argument("--service", dest="deprecated_service", default=None, help=argparse.SUPPRESS)
    _add_client_security_flags(p)
    p.set_defaults(func=cmd_health)


def _add_security_flags(p: argparse.ArgumentParser) -> None:
    """``serve`` flags from SECURITY.md. No flag takes a secret itself: tokens come from a file or the env."""
    d = _defaults
    p.add_argument("--auth-token-file", default=None, metavar="PATH",
                   help="require 'authorization: Bearer <token>' on Teacher RPCs; one accepted token per line, "
                        "re-read on change and on SIGHUP (tokens may also come from $EDISTILL_AUTH_TOKEN, "
                        "comma-separated); health checks stay open (env EDISTILL_TEACHER_AUTH_TOKEN_FILE; "
                        "EDISTILL_AUTH_TOKEN_FILE is the student's and is ignored here)")
    p.add_argument("--tls-cert", default=None, metavar="PEM",
                   help="serve TLS with this certificate (chain) (env EDISTILL_TEACHER_TLS_CERT; "
                        "the student's EDISTILL_TLS_* variables are ignored here)")
    p.add_argument("--tls-key", default=None, metavar="PEM",
                   help="private key of --tls-cert (env EDISTILL_TEACHER_TLS_KEY)")
    p.add_argument("--tls-ca", default=None, metavar="PEM",
                   help="mutual TLS: require client certificates signed by these CA(s) "
                        "(env EDISTILL_TEACHER_TLS_CA)")
    p.add_argument("--max-tensor-elements", type=int, default=d.max_tensor_elements, metavar="N",
                   help=f"largest input tensor accepted, in elements (default: {d.max_tensor_elements})")
    p.add_argument("--max-queued-per-peer", type=int, default=d.max_queued_per_peer, metavar="N",
                   help="requests one client connection may have queued or running before "
                        f"RESOURCE_EXHAUSTED (default: {d.max_queued_per_peer})")
    p.add_argument("--trust-model-file", action="store_true", default=False,
                   help="allow --model to be a pickled torch.save(model) file; unpickling runs arbitrary "
                        "code, so only for files you made yourself. Command line only: no environment "
                        "variable turns this on")
    p.add_argument("--trust-remote-code", action="store_true", default=False,
                   help="a Hugging Face model directory may run the model code it ships "
                        "(transformers' trust_remote_code). Command line only")


def _add_client_security_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls-ca", default=None, metavar="PEM", help="use TLS and verify the teacher against this CA")
    p.add_argument("--tls-cert", default=None, metavar="PEM", help="client certificate (mutual TLS)")
    p.add_argument("--tls-key", default=None, metavar="PEM", help="client key (mutual TLS)")
    p.add_argument("--tls-server-name", default=None, metavar="NAME",
                   help="name expected in the teacher's certificate (default: the host in ADDRESS)")
    p.add_argument("--auth-token-file", default=None, metavar="PATH",
                   help="bearer token to send (first line); default: $EDISTILL_AUTH_TOKEN if set")


def _metrics_port(value: str) -> int | None:
    """``--metrics-port``: a port number, or ``none``/``off`` (so EDISTILL_METRICS_PORT=none disables it)."""
    if value.strip().lower() in ("none", "off", ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number or 'none', got {value!r}") from None


def _default_name(spec: str) -> str:
    if ":" in spec and "/" not in spec:
        return spec.rsplit(":", 1)[1]
    base = spec.replace("\\", "/").rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[0] or base


def default_service(model_name: str) -> str:
    """A valid registry service name derived from ``model_name`` (``"My Model v2"`` -> ``"My-Model-v2"``).

    Characters other than letters, digits, ``.``, ``_`` and ``-`` become ``-``
    (runs collapsed), leading/trailing separators are dropped, 128 at most.

    Raises:
        ConfigError: nothing usable is left (say ``--service NAME``).
    """
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", model_name)
    name = re.sub(r"^[._-]+", "", name)[:128].rstrip("-")
    if not name:
        raise ConfigError(f"cannot derive a service name from the model name {model_name!r}; pass --service NAME")
    return name


def _preflight(args: argparse.Namespace, config: TeacherConfig) -> str | None:
    """Check what is cheap to check before the model loads (that can take minutes on a GPU).

    Returns the registry service name (None without ``--registry``). Raises
    ConfigError naming the flag: a taken ``--port``, a registry URL redis-py cannot parse (no I/O
    yet), a bad ``--service``, unreadable or mismatched TLS PEM files, an
    unreadable or empty token file.
    """
    from teacher_server.ports import check_port_free

    check_port_free(config.host, config.port, config.bind_address)  # before a model load that may take minutes
    service = None
    if args.registry:
        from registry.errors import RegistryConfigError
        from registry.keys import validate_name

        if args.registry != "local":
            from registry import connect

            try:
                connect(args.registry).close()  # parses the URL (and a rediss:// CA file); no connection yet
            except RegistryConfigError as exc:
                raise ConfigError(f"--registry: {exc}") from None
        if args.service:
            try:
                service = validate_name(args.service, "--service")
            except RegistryConfigError as exc:
                raise ConfigError(str(exc)) from None
        else:
            service = default_service(config.model_name)
    if config.tls_cert:
        from teacher_server.tls import server_credentials

        server_credentials(config.tls_cert, config.tls_key, config.tls_ca)  # reads and pairs the PEM files
    if config.auth_enabled:
        from teacher_server.auth import TokenSet

        TokenSet(config.auth_token_file, config.auth_tokens)  # reads the file: readable, holds a token
    return service


def cmd_serve(args: argparse.Namespace) -> int:
    """Check the cheap settings, load the model, serve until SIGTERM/SIGINT, drain, return 0."""
    config = TeacherConfig(
        model_name=args.name or _default_name(args.model),
        model_version=args.version,
        host=args.host,
        port=args.port,
        advertise=args.advertise,
        device=args.device,
        precision=args.precision,
        max_batch_size=args.max_batch_size,
        max_batch_tokens=args.max_batch_tokens,
        max_queue_delay_ms=args.max_queue_delay_ms,
        max_queue_size=args.max_queue_size,
        max_message_bytes=args.max_message_bytes,
        grace_s=args.grace_s,
        torch_threads=args.torch_threads,
        metrics_port=args.metrics_port,
        auth_token_file=args.auth_token_file,
        auth_tokens=_env_tokens(),
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_ca=args.tls_ca,
        max_tensor_elements=args.max_tensor_elements,
        max_queued_per_peer=args.max_queued_per_peer,
        local_socket=args.local_socket,
    )
    service = _preflight(args, config)
    # Imported here so a bad flag is reported before torch is imported (~2 s).
    import torch

    from teacher_server._malloc import tune_malloc
    from teacher_server.features import parse_features
    from teacher_server.model import load_model
    from teacher_server.server import run

    tune_malloc()  # before the model and the first messages are allocated
    if config.torch_threads is not None:
        torch.set_num_threads(config.torch_threads)  # before the warm-up pass
    model = load_model(args.model, device=config.device, precision=config.precision,
                       checkpoint=args.checkpoint, model_kwargs=args.model_kwargs, input_specs=args.input_spec,
                       trust_model_file=args.trust_model_file, trust_remote_code=args.trust_remote_code,
                       features=parse_features(args.features))

    def _ready(address: str) -> None:
        print(f"{READY_PREFIX}{address}", flush=True)

    configure = None
    if args.registry:
        from teacher_server.registration import RegistryHook

        def configure(server) -> None:
            # Registration is a ready hook too; the ready line comes after it,
            # so "ready" means "serving and discoverable".
            hook = RegistryHook(server, args.registry, service,
                                heartbeat_s=args.heartbeat_s, ttl_s=args.ttl_s)
            server.on_ready.remove(_ready)
            server.on_ready.append(_ready)
            del hook  # lives on through the server's hook lists

    return run(config, model, on_ready=[_ready], configure=configure)


def _env_tokens() -> tuple[str, ...]:
    """Accepted tokens from $EDISTILL_AUTH_TOKEN (comma-separated), never from argv."""
    from teacher_server.auth import AUTH_TOKEN_ENV, parse_tokens

    return tuple(parse_tokens(os.environ.get(AUTH_TOKEN_ENV, ""), where=AUTH_TOKEN_ENV, sep=","))


def _channel(args: argparse.Namespace) -> grpc.Channel:
    options = [
        ("grpc.max_receive_message_length", DEFAULT_MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", DEFAULT_MAX_MESSAGE_BYTES),
    ]
    if (args.tls_cert is None) != (args.tls_key is None):
        # Checked before choosing plaintext: --tls-key alone must not silently mean "no TLS".
        raise ConfigError("--tls-cert and --tls-key go together (the client certificate and its key); "
                          f"got only {'--tls-cert' if args.tls_key is None else '--tls-key'}")
    if args.tls_ca or args.tls_cert or args.tls_server_name:
        from teacher_server.tls import channel_credentials

        if args.tls_server_name:
            options.append(("grpc.ssl_target_name_override", args.tls_server_name))
        creds = channel_credentials(args.tls_ca, args.tls_cert, args.tls_key,
                                    names=("--tls-ca", "--tls-cert", "--tls-key"))
        return grpc.secure_channel(args.address, creds, options=options)
    return grpc.insecure_channel(args.address, options=options)


def _call_metadata(args: argparse.Namespace) -> tuple[tuple[str, str], ...] | None:
    from teacher_server.auth import AUTH_TOKEN_ENV, parse_tokens

    if args.auth_token_file:
        try:
            with open(args.auth_token_file, encoding="utf-8") as f:
                tokens = parse_tokens(f.read(), where=f"--auth-token-file {args.auth_token_file!r}")
        except OSError as exc:
            raise ConfigError(f"cannot read --auth-token-file {args.auth_token_file!r}: {exc.strerror}") from None
    else:
        tokens = parse_tokens(os.environ.get(AUTH_TOKEN_ENV, ""), where=AUTH_TOKEN_ENV, sep=",")
    return (("authorization", f"Bearer {tokens[0]}"),) if tokens else None


def cmd_describe(args: argparse.Namespace) -> int:
    """Print the teacher's Describe answer as JSON."""
    with _channel(args) as channel:
        try:
            resp = pb_grpc.TeacherStub(channel).Describe(pb.DescribeRequest(), timeout=args.timeout_s,
                                                         metadata=_call_metadata(args))
        except grpc.RpcError as exc:
            raise TeacherUnreachable(f"no Describe answer from {args.address}: {exc.code().name}: "
                                     f"{exc.details()}") from exc
    print(json_format.MessageToJson(resp, always_print_fields_with_no_presence=True))
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    """Print the health status; 0 if SERVING, 1 otherwise (NOT_SERVING, NOT_FOUND, unreachable)."""
    service = args.health_service
    if args.deprecated_service is not None:
        print("edistill teacher health: warning: --service is deprecated here (it names a gRPC health service, "
              "not a registry service); use --health-service", file=sys.stderr)
        service = service or args.deprecated_service
    with _channel(args) as channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=args.timeout_s)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:  # the server answered: it is up
                print(f"NOT_FOUND {args.address}: the server is up but has no health status for gRPC service "
                      f"{service!r}; --health-service takes a gRPC service name (edistill.v1.Teacher, or omit it "
                      "for the whole server), not a registry service name")
            else:
                print(f"UNREACHABLE {args.address}: {exc.code().name}: {exc.details()}")
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    print(status)
    return 0 if resp.status == health_pb2.HealthCheckResponse.SERVING else 1


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m teacher_server`` (the environment is read now)."""
    parser = argparse.ArgumentParser(prog="python -m teacher_server", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    add_teacher_commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    apply_env_tree(parser, path=("teacher",))  # this parser stands where `edistill teacher` does
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m teacher_server``: the teacher commands without the umbrella CLI."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("teacher: interrupted", file=sys.stderr)
        return 130
    except TeacherError as exc:
        print(f"edistill teacher {args.command}: error: {exc}", file=sys.stderr)
        return 2
