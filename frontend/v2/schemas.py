"""The V2 inference request (JSON header) and the small typed views of its parameters."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from frontend.params import invalid
from frontend.v2.errors import bad


class _Frozen(BaseModel):
    # Unknown fields are ignored, as by tritonserver (clients send e.g. "model_name").
    model_config = ConfigDict(frozen=True, extra="ignore")


class RequestInput(_Frozen):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] = {}
    data: Any = None


class RequestOutput(_Frozen):
    name: str
    parameters: dict[str, Any] = {}


class InferRequest(_Frozen):
    id: str = ""
    parameters: dict[str, Any] = {}
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = None


class RegisterRequest(_Frozen):
    key: str = Field(min_length=1, max_length=256)
    offset: int = Field(0, ge=0)
    byte_size: int = Field(gt=0)


def parse(model: type[BaseModel], data: bytes, what: str) -> Any:
    try:
        return model.model_validate_json(data)
    except ValidationError as exc:  # the V2 error handler renders it as "<what>.<field>: <problem>"
        raise invalid([{**err, "loc": (what, *err["loc"])} for err in exc.errors()]) from None


def int_param(params: dict[str, Any], key: str, what: str, default: int | None = None) -> int | None:
    value = params.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise bad(f"{what}: parameter '{key}' must be a non-negative integer, got {value!r}")
    return value


def bool_param(params: dict[str, Any], key: str, default: bool) -> bool:
    value = params.get(key, default)
    if not isinstance(value, bool):
        raise bad(f"parameter '{key}' must be a boolean, got {value!r}")
    return value
