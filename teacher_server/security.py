"""Request hardening that sits in front of the Teacher servicer.

:class:`DecodeGuardInterceptor` answers INVALID_ARGUMENT, with what went
wrong, to bytes that do not parse as the RPC's request message. Without it
grpc.aio answers UNKNOWN ("Unexpected DecodeError"), which clients treat as
a teacher fault and retry elsewhere; a malformed request is the sender's
fault and must not be retried (tests/test_security_fuzz.py).
"""

from __future__ import annotations

import grpc

__all__ = ["DecodeGuardInterceptor"]

_GUARDED_PREFIX = "/edistill.v1."


class _Undecodable:
    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


def _guard(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    decode = handler.request_deserializer
    behavior = handler.unary_unary
    kind = method.rsplit("/", 1)[-1]

    def safe_decode(data: bytes):
        try:
            return decode(data)
        except Exception as exc:  # DecodeError, or anything a hostile payload provokes
            return _Undecodable(f"the {kind} request is not a valid protobuf message "
                                f"({type(exc).__name__}: {str(exc)[:200]}); send a serialized {kind}Request")

    async def guarded(request, context: grpc.aio.ServicerContext):
        if isinstance(request, _Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return await behavior(request, context)

    return grpc.unary_unary_rpc_method_handler(guarded, request_deserializer=safe_decode,
                                               response_serializer=handler.response_serializer)


class DecodeGuardInterceptor(grpc.aio.ServerInterceptor):
    """Undecodable unary ``edistill.v1`` requests -> INVALID_ARGUMENT instead of UNKNOWN."""

    def __init__(self) -> None:
        # method -> (original handler, guarded handler); built once per method.
        self._cache: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(self, continuation, handler_call_details):
        """Return the handler with a deserializer that turns bad bytes into INVALID_ARGUMENT.

        Only unary ``edistill.v1`` methods are guarded; the guarded handler is
        built once per method and reused.
        """
        handler = await continuation(handler_call_details)
        method = handler_call_details.method or ""
        if (handler is None or not method.startswith(_GUARDED_PREFIX) or handler.unary_unary is None
                or handler.request_deserializer is None):
            return handler
        cached = self._cache.get(method)
        if cached is None or cached[0] is not handler:
            cached = (handler, _guard(handler, method))
            self._cache[method] = cached
        return cached[1]
