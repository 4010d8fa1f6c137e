"""Whether the teacher's TCP port can be bound, checked before gRPC tries (and before the model loads).

gRPC reports a taken port with a C-core log line (``add_port.cc ... Failed
to add port``) and a vague exception; this check fails first, with one line
that names the port and the fix.
"""

from __future__ import annotations

import errno
import socket

from teacher_server.errors import ConfigError

__all__ = ["WILDCARD_HOSTS", "check_port_free"]

#: --host values that mean "every address of this machine".
WILDCARD_HOSTS = {"0.0.0.0", "::", "[::]", ""}


def check_port_free(host: str, port: int, where: str) -> None:
    """ConfigError naming the fix when ``host:port`` cannot be bound (``port`` 0 is always free).

    Binds a throwaway socket with SO_REUSEADDR, as gRPC does, so a port
    only left in TIME_WAIT still counts as free. A race with another
    process remains; gRPC's own error covers it.
    """
    if port == 0:
        return
    bind_host = None if host in WILDCARD_HOSTS else host.strip("[]")
    try:
        infos = socket.getaddrinfo(bind_host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot listen on {where}: unknown host {host!r} ({exc.strerror}); pass --host with an "
                          "address of this machine, e.g. 127.0.0.1 or 0.0.0.0") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(f"cannot listen on {where}: port {port} is in use (another teacher or program "
                                  "listens there); choose another --port, or --port 0 for a free one") from None
            raise ConfigError(f"cannot listen on {where}: {exc.strerror}; pass --host with an address of this "
                              "machine (e.g. 127.0.0.1 or 0.0.0.0) and a free --port, or --port 0") from None
