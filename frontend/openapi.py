"""The OpenAPI of image request bodies, derived from the models (no hand-written parameter schemas)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from frontend.params import form_properties, query_parameters
from frontend.schemas import ErrorResponse

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 408, 413, 415, 422, 503, 504)
}
_BINARY = {"type": "string", "format": "binary"}


def inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """A model's JSON schema with its ``$defs`` inlined, so it can sit inside ``openapi_extra``."""
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return walk(defs[ref.removeprefix("#/$defs/")])
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    out: dict[str, Any] = walk(schema)
    return out


def image_body(
    files: str, json_model: type[BaseModel], *, max_files: int = 1, raw_types: tuple[str, ...] = ()
) -> dict[str, Any]:
    """``openapi_extra`` of a route taking images as multipart field ``files``, JSON or a raw body.

    The shared parameters are also accepted in the query string (a raw body has no other place).
    """
    image: dict[str, Any] = dict(_BINARY)
    if max_files > 1:
        image = {
            "type": "array",
            "items": _BINARY,
            "minItems": 1,
            "maxItems": max_files,
            "description": "repeat the field once per image",
        }
    content: dict[str, Any] = {
        "multipart/form-data": {
            "schema": {"type": "object", "required": [files], "properties": {files: image, **form_properties()}}
        },
        "application/json": {"schema": inline_refs(json_model.model_json_schema())},
        **{t: {"schema": dict(_BINARY)} for t in raw_types},
    }
    return {"parameters": query_parameters(), "requestBody": {"required": True, "content": content}}
