"""The three routes of an image endpoint: default model, a named model's latest, one version.

``/api/v1/{action}``, ``/api/v1/models/{name}/{action}`` and
``/api/v1/models/{name}/versions/{version}/{action}`` call ``handler(request, name, version)``
(version None: the latest), so single and batch predictions declare their routes once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from frontend.openapi import ERRORS
from ipc.errors import ModelNotFound

Handler = Callable[[Request, str, int | None], Awaitable[Response]]


def add_model_routes(
    router: APIRouter,
    action: str,
    handler: Handler,
    *,
    response_model: type[Any],
    openapi_extra: dict[str, Any],
    what: str,
    status_code: int = 200,
    responses: dict[int | str, dict[str, Any]] | None = None,
) -> None:
    """Register the three routes of ``action`` (e.g. "predict"); ``what`` is what they answer."""

    async def default(request: Request) -> Response:
        return await handler(request, request.app.state.settings.default_model, None)

    async def named(request: Request, name: str) -> Response:
        return await handler(request, name, None)

    async def versioned(request: Request, name: str, version: int) -> Response:
        if version < 1:
            raise ModelNotFound(f"model {name!r} has no version {version}")
        return await handler(request, name, version)

    base = action.replace("/", "_")
    routes: list[tuple[str, Callable[..., Awaitable[Response]], str, str]] = [
        (f"/api/v1/{action}", default, f"{base}_default", f"{what} with the default model."),
        (f"/api/v1/models/{{name}}/{action}", named, f"{base}_model", f"{what} with the latest version of a model."),
        (
            f"/api/v1/models/{{name}}/versions/{{version}}/{action}",
            versioned,
            f"{base}_version",
            f"{what} with one version of a model.",
        ),
    ]
    for path, endpoint, name, description in routes:
        router.add_api_route(
            path,
            endpoint,
            methods=["POST"],
            name=name,
            description=description,
            response_model=response_model,
            status_code=status_code,
            responses=ERRORS if responses is None else responses,
            openapi_extra=openapi_extra,
        )
