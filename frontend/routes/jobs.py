"""Async jobs over REST: the sync prediction routes' bodies, answered 202 + a job id at once.

``POST .../predict/async`` and ``.../predict/batch/async`` parse exactly as their sync routes
(same parsers, same 4xx for a bad body, same 404 for an unknown model) and store the images as a
job in the shared database; any worker runs it (frontend/state/runner.py) and any worker answers
``GET /api/v1/jobs/{id}``: status, progress and, once done, the sync route's body. With API keys
in use a job is visible only with the key that created it (another key gets a 404).
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict
from starlette.responses import Response

from frontend import predict
from frontend.errors import error_response, request_id
from frontend.jsonresp import JSONResponse
from frontend.openapi import ERRORS, image_body
from frontend.routes.batch import read_batch
from frontend.routes.model_routes import add_model_routes
from frontend.schemas import PredictJSON
from frontend.schemas_batch import MAX_BATCH_IMAGES, BatchJSON
from frontend.state import jobs
from frontend.state.db import StoreError
from frontend.state.gate import CLIENT
from ipc.errors import ModelNotFound, RingserveError

router = APIRouter(tags=["jobs"])
_SINGLE = image_body("image", PredictJSON, raw_types=predict.RAW_TYPES)
_BATCH = image_body("images", BatchJSON, max_files=MAX_BATCH_IMAGES)
_ERRORS: dict[int | str, dict[str, Any]] = ERRORS


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class JobAccepted(_Frozen):
    job_id: str
    status_url: str


class Progress(_Frozen):
    done: int
    total: int


class JobStatus(_Frozen):
    job_id: str
    status: Literal["pending", "running", "done", "failed", "cancelled"]
    progress: Progress
    result: Any = None  # the sync route's body (PredictResponse, BatchResponse or the error body)
    error: str | None = None


def _owner() -> str:
    client = CLIENT.get()
    return client.owner if client else ""


async def _submit(request: Request, kind: str, name: str, version: int | None) -> Response:
    state = request.app.state
    shared = state.shared
    if version is not None and version < 1:
        raise ModelNotFound(f"model {name!r} has no version {version}")
    info = state.service.model(name, version)  # an unknown model is a 404 now, not a failed job later
    if kind == "single":
        upload = await predict.read_upload(request, state.settings)
        items = [jobs.NewItem(upload.data, upload.params.model_dump(exclude_none=True))]
    else:
        items = [
            jobs.NewItem(None, {}, {"error": item.reason, "detail": item.detail})
            if isinstance(item, RingserveError)
            else jobs.NewItem(item[0], item[1].model_dump(exclude_none=True))
            for item in await read_batch(request, state.settings)
        ]
    client = CLIENT.get()
    try:
        job_id = await shared.submit(
            owner=_owner(),
            kind=kind,
            model=name,
            version=info.version,  # pinned now, as the sync routes do
            request_id=request_id(request),
            client=client.address if client else "-",
            items=items,
        )
    except jobs.JobsFull as exc:
        shared.count_job("refused")
        response = error_response(request, 503, "jobs_full", f"too many stored jobs: {exc}")
        response.headers["Retry-After"] = "30"
        return response
    except StoreError as exc:
        shared.count_job("refused")
        return _unavailable(request, exc)
    url = str(request.url_for("get_job", job_id=job_id).path)
    body = JobAccepted(job_id=job_id, status_url=url)
    return JSONResponse(body.model_dump(), status_code=202, headers={"Location": url})


_ACCEPTED: dict[int | str, dict[str, Any]] = {202: {"model": JobAccepted}, **_ERRORS}


async def _submit_single(request: Request, name: str, version: int | None) -> Response:
    return await _submit(request, "single", name, version)


async def _submit_batch(request: Request, name: str, version: int | None) -> Response:
    return await _submit(request, "batch", name, version)


# The async twins of the sync routes, declared as those are: default model, a model, one version.
add_model_routes(
    router,
    "predict/async",
    _submit_single,
    response_model=JobAccepted,
    openapi_extra=_SINGLE,
    what="As the sync predict route, as a job: 202 with its id; poll status_url. Predicts",
    status_code=202,
    responses=_ACCEPTED,
)
add_model_routes(
    router,
    "predict/batch/async",
    _submit_batch,
    response_model=JobAccepted,
    openapi_extra=_BATCH,
    what="As the sync batch route (up to 32 images), as one job; progress counts images. Predicts",
    status_code=202,
    responses=_ACCEPTED,
)


async def _visible(request: Request, job_id: str) -> jobs.JobView:
    view = await request.app.state.shared.view(job_id)
    if view is None or view.owner != _owner():
        raise ModelNotFound(f"no job {job_id!r} (finished jobs are kept for RINGSERVE_JOB_RETENTION_S)")
    return view


def _unavailable(request: Request, exc: StoreError) -> Response:
    response = error_response(request, 503, "jobs_unavailable", f"the jobs database failed: {exc}")
    response.headers["Retry-After"] = "5"
    return response


def _status(view: jobs.JobView) -> JobStatus:
    return JobStatus(
        job_id=view.id,
        status=view.status,
        progress=Progress(done=view.done, total=view.total),
        result=view.result,
        error=view.error if view.status in ("failed", "cancelled") else None,
    )


@router.get("/api/v1/jobs/{job_id}", name="get_job", response_model=JobStatus, responses=_ERRORS)
async def get_job(request: Request, job_id: str) -> Response:
    """A job's status, progress (images done of total) and, when done, the sync route's body."""
    try:
        view = await _visible(request, job_id)
    except StoreError as exc:
        return _unavailable(request, exc)
    return JSONResponse(_status(view).model_dump(mode="json"))


@router.delete("/api/v1/jobs/{job_id}", response_model=JobStatus, responses={409: ERRORS[404], **_ERRORS})
async def cancel_job(request: Request, job_id: str) -> Response:
    """Cancel a pending or running job (a running one stops within a third of the lease time)."""
    shared = request.app.state.shared
    try:
        await _visible(request, job_id)
        cancelled = await shared.cancel(job_id)
        view = await _visible(request, job_id)
    except StoreError as exc:
        return _unavailable(request, exc)
    if not cancelled:
        return error_response(request, 409, "job_finished", f"job {job_id!r} is already {view.status}")
    shared.count_job("cancelled")
    return JSONResponse(_status(view).model_dump(mode="json"))
