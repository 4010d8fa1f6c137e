"""Ask teachers what they serve: their ``Describe`` answers (model name and version, outputs, limits)."""

from __future__ import annotations

import logging
from typing import Any, Mapping

from protos.edistill.v1 import teacher_pb2 as pb

from .status import code_and_details

__all__ = ["describe_call", "describe_channels"]

logger = logging.getLogger(__name__)


def describe_call(channel: Any, timeout_s: float):
    """Start ``Describe`` on ``channel``; a ``grpc.Future`` of the ``DescribeResponse``."""
    method = channel.unary_unary("/edistill.v1.Teacher/Describe",
                                 request_serializer=pb.DescribeRequest.SerializeToString,
                                 response_deserializer=pb.DescribeResponse.FromString)
    return method.future(pb.DescribeRequest(), timeout=timeout_s)


def describe_channels(channels: Mapping[str, Any], timeout_s: float) -> dict[str, "pb.DescribeResponse"]:
    """``{endpoint: DescribeResponse}`` for the channels that answer within ``timeout_s`` (calls in parallel).

    A teacher that fails (gone, refusing) is left out and logged at WARNING.
    """
    calls = {endpoint: describe_call(channel, timeout_s) for endpoint, channel in channels.items()}
    out = {}
    for endpoint, call in calls.items():
        try:
            out[endpoint] = call.result()
        except Exception as exc:  # grpc.RpcError / FutureTimeoutError: that teacher cannot say
            logger.warning("teacher %s: Describe failed (%s: %s)", endpoint, *code_and_details(exc))
    return out
