"""Model listing and details."""

from __future__ import annotations

from fastapi import APIRouter, Request

from frontend.client import EngineClient
from frontend.schemas import ErrorResponse, ModelList, ModelSummary, ModelVersionInfo, TensorSpec
from ipc.errors import ModelNotFound
from ipc.messages import ModelInfo

router = APIRouter(tags=["models"])


def _version(x: ModelInfo) -> ModelVersionInfo:
    return ModelVersionInfo(
        name=x.name,
        version=x.version,
        task=x.task,
        input_width=x.input.width,
        input_height=x.input.height,
        resize=x.input.resize,
        labels_count=x.labels_count,
        max_batch_size=x.max_batch_size,
        max_queue_delay_ms=x.max_queue_delay_ms,
        queue_limit=x.queue_limit,
        default_confidence=x.confidence,
        inputs=[TensorSpec(name=n, datatype=t, shape=s) for n, t, s in x.inputs],
        outputs=[TensorSpec(name=n, datatype=t, shape=s) for n, t, s in x.outputs],
    )


def summaries(client: EngineClient) -> list[ModelSummary]:
    providers = client.ready.providers if client.ready else []
    out = []
    for name in sorted(client.latest):
        infos = sorted((x for x in client.models.values() if x.name == name), key=lambda x: x.version)
        out.append(
            ModelSummary(
                name=name,
                versions=[x.version for x in infos],
                latest=client.latest[name],
                task=infos[-1].task,
                details=[_version(x) for x in infos],
                providers=providers,
            )
        )
    return out


@router.get("/api/v1/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    client: EngineClient = request.app.state.client
    failed = client.ready.failed if client.ready else {}
    return ModelList(models=summaries(client), failed=failed)


@router.get("/api/v1/models/{name}", response_model=ModelSummary, responses={404: {"model": ErrorResponse}})
async def get_model(request: Request, name: str) -> ModelSummary:
    for summary in summaries(request.app.state.client):
        if summary.name == name:
            return summary
    raise ModelNotFound(f"model {name!r} is not served")
