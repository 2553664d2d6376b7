"""Triton's model repository extension: index, load, unload (the engine does the work).

Each call is one typed ``Control`` message to the engine on a DEALER socket of its own (a load
may take seconds; the worker's engine connection stays free for requests), answered with a
``ControlReply`` once the load or unload is done. Load and unload need
RINGSERVE_MODEL_CONTROL=explicit, as in Triton; the index works in every mode.
"""

from __future__ import annotations

import asyncio
import uuid

import orjson
import zmq
import zmq.asyncio
from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from frontend.body import read_limited
from frontend.client import EngineClient
from frontend.v2.errors import ERRORS, V2Error, V2Route, bad
from ipc import messages as m
from ipc.errors import EngineUnavailable
from ipc.sockets import make_socket

CONTROL_TIMEOUT_S = 300.0  # an uncached CUDA load of a big model takes minutes
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


async def _ask(client: EngineClient, action: str, model: str = "") -> m.ControlReply:
    if client.ready is None:
        raise EngineUnavailable("the engine is not connected")
    ctx = zmq.asyncio.Context.instance()
    sock = make_socket(ctx, client.address, zmq.DEALER, bind=False, immediate=False, hwm=4)
    req_id = uuid.uuid4().hex
    try:
        await sock.send(m.encode(m.Control(req_id, action, model)))
        while await sock.poll(timeout=int(CONTROL_TIMEOUT_S * 1000)):
            msg = m.decode(await sock.recv())
            if isinstance(msg, m.ControlReply) and msg.req_id == req_id:
                return msg
        raise V2Error(503, f"no answer from the engine to {action} within {CONTROL_TIMEOUT_S:.0f}s")
    finally:
        sock.close(linger=0)


async def _body(request: Request) -> dict[str, object]:
    raw = await read_limited(request, 64 * 1024)
    if not raw.strip():
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise bad(f"failed to parse the request JSON: {exc}") from None
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    return body


def _model_name(request: Request) -> str:
    return check_name(str(request.path_params["model"]))


def check_name(name: str) -> str:
    if not name or not set(name) <= _NAME_CHARS or name.startswith("."):
        raise bad(f"invalid model name {name!r}")
    return name


def _client(request: Request) -> EngineClient:
    client: EngineClient = request.app.state.client
    return client


async def index(request: Request) -> Response:
    body = await _body(request)
    ready_only = body.get("ready", False)
    if not isinstance(ready_only, bool):
        raise bad("'ready' must be a boolean")
    return Response(orjson.dumps(await index_rows(_client(request), ready_only)), media_type="application/json")


async def index_rows(client: EngineClient, ready_only: bool) -> list[dict[str, str]]:
    """The repository index of the V2 protocol (HTTP and gRPC): every version the engine knows of."""
    reply = await _ask(client, "index")
    rows = []
    for s in reply.states:
        if ready_only and s.state != "READY":
            continue
        row = {"name": s.name, "state": s.state}
        if s.version:
            row["version"] = str(s.version)
        if s.reason:
            row["reason"] = s.reason
        rows.append(row)
    return rows


async def _control(request: Request, action: str) -> Response:
    name = _model_name(request)
    await _body(request)  # parameters (config overrides, files) are not supported; a bad body is 400
    await control(_client(request), action, name)
    return Response(status_code=200)


async def control(client: EngineClient, action: str, name: str) -> None:
    """Load or unload a model (HTTP and gRPC), answered once done and this worker knows it."""
    reply = await _ask(client, action, check_name(name))
    if not reply.ok:
        raise bad(reply.detail)
    # The engine told every worker the new model set before it answered; let this worker's copy
    # arrive, so that a "ready?" right after the load, on this connection, says yes.
    served = {s.version for s in reply.states if s.state == "READY"}
    deadline = asyncio.get_running_loop().time() + 2.0
    while {v for n, v in client.models if n == name} != served and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.005)  # a poll with a deadline, not a wait for readiness


async def load(request: Request) -> Response:
    return await _control(request, "load")


async def unload(request: Request) -> Response:
    return await _control(request, "unload")


def make_router() -> APIRouter:
    router = APIRouter(route_class=V2Route, tags=["v2"])
    for path, endpoint in (
        ("/v2/repository/index", index),
        ("/v2/repository/models/{model}/load", load),
        ("/v2/repository/models/{model}/unload", unload),
    ):
        router.add_api_route(path, endpoint, methods=["POST"], response_class=Response, responses=ERRORS)
    return router
