"""Requests that do not decode are the client's mistake: INVALID_ARGUMENT naming the field.

gRPC decodes a request before any servicer code runs; a message that does not parse (most often
a ``string`` field holding bytes that are not UTF-8, which proto3 forbids) would otherwise
surface as UNKNOWN/INTERNAL with no field. ``DecodeErrorInterceptor`` wraps the deserializer of
every ``p2r.v1`` method: a message that fails to parse is walked on the wire to find the field
(``requests[3].question``), and the call is refused with that name.

It also holds the single-item methods to one item's worth (``ServeConfig.max_unary_receive_bytes``):
gRPC has one receive limit per server, which must fit a full batch, and buffers a whole message
before any handler sees it, so a larger single-item message is buffered (up to that server-wide
limit; only after the API key was checked, ``security.BearerAuthInterceptor``) and then refused
on its serialized length, before it is parsed. The memory it took is handed back to the OS
(``release_memory_soon``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError

from p2r.services import metrics
from p2r.services.allocator import trim_heap
from p2r.services.errors import InvalidArgument, status_of

SERVICE_PREFIX = "/p2r.v1."
BATCH_SUFFIX = "Batch"
"""Methods whose name ends so (PerceiveBatch, ReasonBatch, VerifyBatch) carry many items: the
server-wide receive limit (``max_receive_bytes``); every other ``p2r.v1`` method carries one."""


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _repeated(field: FieldDescriptor) -> bool:
    flag = getattr(field, "is_repeated", None)
    return bool(flag) if flag is not None else field.label == FieldDescriptor.LABEL_REPEATED


def invalid_utf8_field(descriptor: Descriptor, data: bytes, prefix: str = "") -> str | None:
    """Path of the first string field of ``data`` (a serialized ``descriptor`` message) whose
    bytes are not UTF-8, e.g. ``requests[2].question``; None when there is none or the bytes are
    not a well-formed message at all."""
    counts: dict[int, int] = {}
    pos = 0
    try:
        while pos < len(data):
            key, pos = _varint(data, pos)
            number, wire_type = key >> 3, key & 7
            if wire_type == 0:
                _, pos = _varint(data, pos)
                continue
            if wire_type in (1, 5):
                pos += 8 if wire_type == 1 else 4
                continue
            if wire_type != 2:
                return None
            length, pos = _varint(data, pos)
            chunk, pos = data[pos:pos + length], pos + length
            field = descriptor.fields_by_number.get(number)
            if field is None:
                continue
            name = field.name
            if _repeated(field):
                counts[number] = counts.get(number, -1) + 1
                name = f"{name}[{counts[number]}]"
            if field.type == FieldDescriptor.TYPE_STRING:
                try:
                    chunk.decode("utf-8")
                except UnicodeDecodeError:
                    return prefix + name
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                found = invalid_utf8_field(field.message_type, chunk, f"{prefix}{name}.")
                if found is not None:
                    return found
    except (IndexError, ValueError):
        return None
    return None


class Undecodable:
    """What the wrapped deserializer returns for bytes that do not parse."""

    def __init__(self, message: str) -> None:
        self.message = message


class TooLong(Undecodable):
    """A message over its method's receive limit (refused before parsing)."""


def safe_deserializer(deserialize: Callable[[bytes], Any], limit: int | None = None,
                      method: str = "") -> Callable[[bytes], Any]:
    descriptor: Descriptor | None = getattr(getattr(deserialize, "__self__", None), "DESCRIPTOR", None)

    def load(data: bytes) -> Any:
        if limit is not None and len(data) > limit:
            return TooLong(f"request: {len(data)} bytes, over the limit of {limit} bytes for {method} "
                           "(max_unary_receive_bytes: one item - an image at max_image_bytes and its text); "
                           f"send many items with {method}{BATCH_SUFFIX} (up to max_receive_bytes) instead")
        try:
            return deserialize(data)
        except DecodeError as e:
            if descriptor is None:
                return Undecodable(f"request: cannot decode: {e}")
            field = invalid_utf8_field(descriptor, data)
            if field is not None:
                return Undecodable(f"{field}: not valid UTF-8 (string fields must be UTF-8 text)")
            return Undecodable(f"request: not a valid {descriptor.full_name} message: {e}")

    return load


_TRIM_EVERY_S = 1.0
_trim = {"last": 0.0, "pending": False}


def release_memory_soon() -> None:
    """Schedule ``release_memory`` on the running loop: once for a burst of refusals, at most once
    a second, and always after the last one of a burst (so what it left is handed back too)."""
    if _trim["pending"]:
        return
    _trim["pending"] = True
    delay = max(0.1, _trim["last"] + _TRIM_EVERY_S - time.monotonic())
    asyncio.get_running_loop().call_later(delay, release_memory)


def release_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc ``malloc_trim``): a refused large message
    leaves gRPC's many small receive slices free but resident in the heaps (allocator.py maps only
    blocks of 1 MiB and more on their own). Measured: four refused 300 MB messages left 214 MB
    resident without it, 3 MB with it."""
    _trim["pending"], _trim["last"] = False, time.monotonic()
    trim_heap()


class DecodeErrorInterceptor(grpc.aio.ServerInterceptor):
    """Turns an undecodable ``p2r.v1`` request into INVALID_ARGUMENT naming the field, and one
    over its method's receive limit (``unary_limit`` for single-item methods) into
    INVALID_ARGUMENT naming the limit: the same request can never pass, so it is not retried."""

    def __init__(self, unary_limit: int | None = None) -> None:
        self.unary_limit = unary_limit

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(SERVICE_PREFIX) or handler.request_deserializer is None:
            return handler
        method = details.method.rsplit("/", 1)[-1]
        limit = None if method.endswith(BATCH_SUFFIX) else self.unary_limit

        async def refuse(request: Undecodable, context: grpc.aio.ServicerContext) -> None:
            status = status_of(InvalidArgument(request.message), method)
            metrics.REQUESTS.labels(method, status.code.name).inc()
            if isinstance(request, TooLong):
                release_memory_soon()
            await context.abort(status.code, status.message)

        kwargs = {"request_deserializer": safe_deserializer(handler.request_deserializer, limit, method),
                  "response_serializer": handler.response_serializer}
        if handler.unary_unary is not None:
            behaviour = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if isinstance(request, Undecodable):
                    await refuse(request, context)
                return await behaviour(request, context)

            return grpc.unary_unary_rpc_method_handler(unary, **kwargs)
        if handler.unary_stream is not None:
            stream_behaviour = handler.unary_stream

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if isinstance(request, Undecodable):
                    await refuse(request, context)
                async for item in stream_behaviour(request, context):
                    yield item

            return grpc.unary_stream_rpc_method_handler(stream, **kwargs)
        return handler
