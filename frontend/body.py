"""Reading request bodies under a byte limit and a deadline.

413 before the whole body has been read (the declared ``Content-Length`` first, then the bytes as
they come); 408 when the body has not arrived within ``body_timeout_s`` — a client that trickles its
body (slowloris) holds a connection for a bounded time only. The middleware closes the connection
of any response sent before the body was read to its end, so the client stops sending.
"""

from __future__ import annotations

import asyncio

from starlette.requests import Request

from frontend.params import ascii_int
from ipc.errors import PayloadTooLarge, RingserveError


class BodyTimeout(RingserveError):
    """The client did not send its whole body in time (408). Frontend-only: the engine never sees it."""

    reason = "body_timeout"


async def read_limited(request: Request, limit: int, timeout: float | None = None) -> bytes:
    """The body, at most ``limit`` bytes, received within ``timeout`` seconds.

    ``timeout`` defaults to the app's ``settings.body_timeout_s``, so every route that reads its
    body here is bounded without passing it.
    """
    declared = ascii_int(request.headers.get("content-length"))  # a malformed one: the server's 400
    if declared is not None and declared > limit:
        raise PayloadTooLarge(f"body is {declared} bytes; the limit is {limit}")
    if timeout is None:
        timeout = request.app.state.settings.body_timeout_s
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise BodyTimeout(f"the body did not arrive within {timeout:g}s ({size} bytes received)") from None
    return b"".join(chunks)
