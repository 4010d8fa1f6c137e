"""Typed configuration of a teacher server, validated at construction."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field

from teacher_server.errors import ConfigError

__all__ = ["DEFAULT_MAX_MESSAGE_BYTES", "LOCAL_SOCKET_OFF", "MAX_UNIX_PATH_BYTES", "PRECISIONS", "TeacherConfig"]

#: gRPC message limit set explicitly on servers and channels. The gRPC default
#: of 4 MiB holds only ~5 ImageNet images at float32; 256 MiB holds a batch of
#: 256 x 3x224x224 float32 inputs with room to spare.
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024

#: ``precision`` values: fp32 runs as is; fp16/bf16 run under torch.autocast.
PRECISIONS = ("fp32", "fp16", "bf16")

#: ``local_socket`` values that turn the same-host transport off.
LOCAL_SOCKET_OFF = ("off", "none", "")

#: Longest filesystem path an AF_UNIX socket can bind on Linux (``sun_path``
#: holds 108 bytes including the terminating NUL).
MAX_UNIX_PATH_BYTES = 107

_DEVICE_RE = re.compile(r"^(cpu|cuda(:\d+)?)$")


@dataclass
class TeacherConfig:
    """Everything a teacher server needs besides the model itself.

    Raises:
        ConfigError: at construction, naming the field and the bad value.
    """

    # Reported in Describe and every PredictResponse, so students can tell
    # which model produced a soft label.
    model_name: str = "model"
    model_version: str = "0"
    # Bind address. 127.0.0.1 by default: a teacher accepts tensors from the
    # network, so exposing it (0.0.0.0) is an explicit choice.
    host: str = "127.0.0.1"
    # 0 asks the OS for a free port (tests, demo, several teachers per host).
    port: int = 0
    # Address announced to lifecycle hooks (e.g. the registry) and printed on
    # the ready line: "HOST" or "HOST:PORT" (containers behind NAT, published
    # ports). None derives it from host; a wildcard host (0.0.0.0) is not
    # dialable, so then the machine's own address is announced (in a
    # container: the container's IP, which is what `--scale` replicas need).
    advertise: str | None = None
    # "cpu" or "cuda:N".
    device: str = "cpu"
    # fp32 | fp16 | bf16 (autocast). bf16 is the safe choice on CPU.
    precision: str = "fp32"
    # Samples per forward pass. A single request larger than this is rejected
    # (requests are never split, so a student's batch stays one unit).
    max_batch_size: int = 64
    # Sequence models (Hugging Face directories): tokens per forward pass,
    # counted padded (rows x the batch's longest length), so the logits
    # (tokens x vocabulary floats) stay bounded whatever the lengths. None:
    # only max_batch_size limits. A request with more tokens is refused.
    max_batch_tokens: int | None = None
    # How long the first request of a batch may wait for others to join.
    # A few ms buys large batches under load and costs little when idle.
    max_queue_delay_ms: float = 2.0
    # Requests waiting for a batch slot; beyond it RESOURCE_EXHAUSTED, so a
    # flood cannot grow memory without bound.
    max_queue_size: int = 256
    # Explicit gRPC send/receive limit (the default 4 MiB is too small).
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    # Seconds SIGTERM waits for in-flight requests before cancelling them.
    grace_s: float = 10.0
    # torch intra-op threads for the forward pass; None keeps torch's default
    # (all cores). Lower it when other processes share the CPU.
    torch_threads: int | None = None
    # Prometheus metrics over HTTP at HOST:PORT/metrics, bound to the same
    # host as gRPC. None: no metrics endpoint (and no per-request metric
    # overhead); 0: a free port, logged at startup.
    metrics_port: int | None = None
    # --- security (SECURITY.md) ---
    # Bearer tokens accepted on Teacher RPCs: a file with one token per line,
    # re-read when it changes and on SIGHUP (rotation without restart), and/or
    # fixed tokens (from EDISTILL_AUTH_TOKEN). Neither: no authentication.
    # repr=False: tokens never end up in a log line that prints the config.
    auth_token_file: str | None = None
    auth_tokens: tuple[str, ...] = field(default=(), repr=False)
    # TLS: PEM certificate (chain) and key; both or neither. tls_ca (PEM CA
    # bundle) additionally requires every client to present a certificate
    # signed by it (mutual TLS).
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    # Elements per input tensor. Bounds the work and memory one request can
    # ask for (a huge declared shape is refused before any byte is read).
    # 2^26 = 256 MiB of float32, the default message limit.
    max_tensor_elements: int = 1 << 26
    # Requests one client connection may have queued or computing at once;
    # beyond it RESOURCE_EXHAUSTED, so one flooding client cannot fill the
    # whole queue. 64 is 16x what a student pool sends by default (4).
    max_queued_per_peer: int = 64
    # --- same-host transport (protos/edistill/v1/local.proto, teacher_server/local.py) ---
    # Unix socket a student on this machine may use instead of gRPC (tensor
    # bytes passed as shared-memory descriptors, no copy through the socket).
    # "auto": <runtime dir>/teacher-<teacher_id>.sock, in a 0700 directory of
    # this user ($EDISTILL_RUNTIME_DIR, else $XDG_RUNTIME_DIR/edistill, else
    # <tmp>/edistill-<uid>); on by default because only this user's processes
    # can connect, and when that directory is unusable the teacher serves gRPC
    # only (with a warning). A path: exactly there (errors stop the server).
    # "off" (or "none", ""): no local socket.
    local_socket: str = "auto"

    def __post_init__(self) -> None:
        if not self.model_name:
            raise ConfigError("model_name must not be empty")
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be an integer in 0..65535, got {self.port!r}")
        if not self.host:
            raise ConfigError("host must not be empty (use 127.0.0.1 or 0.0.0.0)")
        if self.advertise is not None:
            host, _, port = self.advertise.rpartition(":") if _has_port(self.advertise) else (self.advertise, "", "")
            if not host or host.strip("[]") in ("0.0.0.0", "::", ""):
                raise ConfigError(f"advertise must be a dialable HOST or HOST:PORT, got {self.advertise!r}")
            if port and not (port.isdigit() and 0 < int(port) <= 65535):
                raise ConfigError(f"advertise port must be in 1..65535, got {self.advertise!r}")
        if not _DEVICE_RE.match(self.device):
            raise ConfigError(f"device must be 'cpu' or 'cuda:N', got {self.device!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not isinstance(self.max_batch_size, int) or self.max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be an integer >= 1, got {self.max_batch_size!r}")
        if self.max_batch_tokens is not None and (isinstance(self.max_batch_tokens, bool) or not isinstance(
                self.max_batch_tokens, int) or self.max_batch_tokens < 1):
            raise ConfigError(f"max_batch_tokens must be an integer >= 1 or None, got {self.max_batch_tokens!r}")
        if not (math.isfinite(self.max_queue_delay_ms) and self.max_queue_delay_ms >= 0):
            raise ConfigError(f"max_queue_delay_ms must be a finite number >= 0, got {self.max_queue_delay_ms!r}")
        if not isinstance(self.max_queue_size, int) or self.max_queue_size < 1:
            raise ConfigError(f"max_queue_size must be an integer >= 1, got {self.max_queue_size!r}")
        if not isinstance(self.max_message_bytes, int) or self.max_message_bytes < 1024:
            raise ConfigError(f"max_message_bytes must be an integer >= 1024, got {self.max_message_bytes!r}")
        if not (math.isfinite(self.grace_s) and self.grace_s >= 0):
            raise ConfigError(f"grace_s must be a finite number >= 0, got {self.grace_s!r}")
        if self.torch_threads is not None and (not isinstance(self.torch_threads, int) or self.torch_threads < 1):
            raise ConfigError(f"torch_threads must be an integer >= 1 or None, got {self.torch_threads!r}")
        if self.metrics_port is not None and (isinstance(self.metrics_port, bool) or not isinstance(
                self.metrics_port, int) or not 0 <= self.metrics_port <= 65535):
            raise ConfigError(f"metrics_port must be an integer in 0..65535 or None, got {self.metrics_port!r}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls_cert and tls_key go together (--tls-cert FILE --tls-key FILE); "
                              f"got only {'tls_cert' if self.tls_key is None else 'tls_key'}")
        if self.tls_ca is not None and self.tls_cert is None:
            raise ConfigError("tls_ca (client certificate check) needs TLS: also pass --tls-cert and --tls-key")
        if isinstance(self.auth_tokens, str):
            raise ConfigError("auth_tokens must be a tuple of tokens, not one string")
        self.auth_tokens = tuple(self.auth_tokens)
        for name in ("max_tensor_elements", "max_queued_per_peer"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {v!r}")
        if not isinstance(self.local_socket, str):
            raise ConfigError(f"local_socket must be 'auto', 'off' or a path, got {self.local_socket!r}")
        keyword = self.local_socket.strip().lower()
        if keyword in LOCAL_SOCKET_OFF:
            self.local_socket = "off"
        elif keyword == "auto":
            self.local_socket = "auto"
        else:
            if "\0" in self.local_socket:
                raise ConfigError(f"local_socket path must not contain NUL characters, got {self.local_socket!r}")
            n = len(os.fsencode(os.path.abspath(self.local_socket)))
            if n > MAX_UNIX_PATH_BYTES:
                raise ConfigError(f"local_socket path {self.local_socket!r} is {n} bytes as an absolute path, over "
                                  f"the {MAX_UNIX_PATH_BYTES}-byte limit of Unix socket paths; choose a shorter "
                                  "path, 'auto' or 'off'")

    @property
    def auth_enabled(self) -> bool:
        """True when Teacher RPCs require a bearer token."""
        return bool(self.auth_token_file or self.auth_tokens)

    @property
    def local_socket_enabled(self) -> bool:
        """False when ``local_socket`` is ``"off"`` (the same-host transport is not offered)."""
        return self.local_socket != "off"

    @property
    def bind_address(self) -> str:
        """``host:port`` to bind (IPv6 hosts bracketed)."""
        return f"{_bracket(self.host)}:{self.port}"


def _has_port(address: str) -> bool:
    """'h:1' / '[::1]:1' have a port; 'h', '::1' and '[::1]' do not."""
    if address.startswith("["):
        return "]:" in address
    return address.count(":") == 1


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
