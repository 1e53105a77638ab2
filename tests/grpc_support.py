"""A real gRPC server on loopback around test servicers (retry counting, broken remote roles)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import grpc


@contextmanager
def loopback_server(*servicers: tuple[Callable[[Any, grpc.Server], None], Any]) -> Iterator[str]:
    """Serve each ``(add_XServicer_to_server, servicer)`` on 127.0.0.1 (a free port); yields the target."""
    server = grpc.server(ThreadPoolExecutor(2))
    for add, servicer in servicers:
        add(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None)
