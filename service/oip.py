"""The KServe Open Inference Protocol (v2) over HTTP, so standard clients (tritonclient.http, kserve) work unchanged.

The model, its tensors and parameters are in service/oip_tensors.py (shared with gRPC, service/grpc_server.py).
Here: the routes, and the infer body: JSON (with any Content-Type or none: tritonclient sends none), or Triton's
binary tensor data extension, where an `Inference-Header-Content-Length` header says how much of the body is the
JSON header and the raw tensors follow it (an input's `parameters.binary_data_size` says how many bytes are its).
An output goes back raw when its `parameters.binary_data` is true, or by default when the request's
`binary_data_output` is; the answer is then `application/octet-stream` with the same header. A gzip or deflate
body (`Content-Encoding`) is accepted. The body is read up to `max_upload_bytes` (413 past it, before any parsing).
"""

from __future__ import annotations

import json
import zlib
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from service import pipeline
from service.deps import Loaded, State
from service.errors import ApiError
from service.oip_tensors import (
    MODEL_NAME,
    InputTensor,
    OutputTensor,
    check_model,
    infer_outputs,
    model_metadata,
    server_metadata,
)
from service.schemas import (
    EXAMPLE_PNG_BASE64,
    OipError,
    OipInferResponse,
    OipLive,
    OipModelMetadata,
    OipModelReady,
    OipReady,
    OipServerMetadata,
)
from service.uploads import read_body, validated_json

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol v2"])
ModelName = Annotated[str, Path(description="the served model's name", examples=[MODEL_NAME])]
HeaderLength = Annotated[
    int | None,
    Header(
        ge=0,
        description="binary tensor data extension: the length of the JSON header that starts the body; the raw "
        "tensors follow it",
    ),
]
BINARY = {"type": "string", "format": "binary"}


class InferInput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[Any] | None = None  # absent when the tensor is raw (parameters.binary_data_size)
    parameters: dict[str, Any] | None = None


class RequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class InferRequest(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "example",
                    "inputs": [
                        {"name": "image_bytes", "shape": [1], "datatype": "BYTES", "data": [EXAMPLE_PNG_BASE64]}
                    ],
                    "parameters": {"depth": "auto"},
                }
            ]
        }
    )

    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[InferInput] = Field(min_length=1)
    outputs: list[RequestedOutput] | None = None


def _inlined(schema: dict) -> dict:
    """A pydantic JSON schema with its $defs inlined: in an OpenAPI document #/$defs/... would not resolve."""
    defs = schema.pop("$defs", {})

    def resolve(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(defs[node["$ref"].rsplit("/", 1)[1]])
            return {k: resolve(v) for k, v in node.items()}
        return [resolve(v) for v in node] if isinstance(node, list) else node

    return resolve(schema)


INFER_REQUEST_DOCS = {
    "requestBody": {
        "required": True,
        "description": "JSON (any Content-Type, or none); or, with Inference-Header-Content-Length, that many bytes "
        "of JSON followed by the raw tensors (the binary tensor data extension)",
        "content": {
            "application/json": {"schema": _inlined(InferRequest.model_json_schema())},
            "application/octet-stream": {"schema": BINARY},
        },
    }
}


@router.get("", response_model=OipServerMetadata, summary="Server metadata")
async def v2_server_metadata() -> dict:
    return server_metadata()


@router.get("/health/live", response_model=OipLive)
async def v2_live() -> dict:
    return {"live": True}


@router.get("/health/ready", response_model=OipReady, responses={503: {"model": OipReady}})
async def v2_ready(state: State) -> JSONResponse:
    ok = state.serving
    return JSONResponse({"ready": ok}, status_code=200 if ok else 503)


@router.get(
    "/models/{name}", response_model=OipModelMetadata, responses={404: {"model": OipError}, 503: {"model": OipError}}
)
async def v2_metadata(name: ModelName, state: Loaded) -> dict:
    check_model(name)
    return model_metadata(state)


@router.get(
    "/models/{name}/ready",
    response_model=OipModelReady,
    responses={404: {"model": OipError}, 503: {"model": OipModelReady}},
)
async def v2_model_ready(name: ModelName, state: State) -> JSONResponse:
    check_model(name)
    ok = state.serving
    return JSONResponse({"name": MODEL_NAME, "ready": ok}, status_code=200 if ok else 503)


@router.post(
    "/models/{name}/infer",
    response_model=None,  # documented below; the answer is built as a dict and not re-validated on the hot path
    responses={
        200: {
            "model": OipInferResponse,
            "content": {"application/octet-stream": {"schema": BINARY}},
            "headers": {
                "Inference-Header-Content-Length": {
                    "description": "with raw outputs: the length of the JSON header that starts the body",
                    "schema": {"type": "integer"},
                }
            },
        },
        # 415: a Content-Encoding other than gzip or deflate; 422: a bad `depth` parameter
        **{status: {"model": OipError} for status in (400, 404, 413, 415, 422, 429, 500, 503, 504)},
    },
    openapi_extra=INFER_REQUEST_DOCS,
    summary="Inference (JSON, or the binary tensor data extension)",
)
async def v2_infer(
    name: ModelName, request: Request, state: Loaded, inference_header_content_length: HeaderLength = None
) -> Response:
    check_model(name)
    pipeline.refuse_early(state)
    limit = state.settings.max_upload_bytes
    body = _decoded(await read_body(request, limit), request.headers.get("content-encoding", ""), limit)
    req, inputs = _parse(body, inference_header_content_length)
    binary, binary_default = _binary_outputs(req)
    outputs = await infer_outputs(
        state,
        inputs,
        req.parameters or {},
        [(o.name, o.parameters or {}) for o in req.outputs] if req.outputs else None,
    )
    return _answer(req.id or "", state.ckpt.version, outputs, [binary.get(o.name, binary_default) for o in outputs])


def _decoded(body: bytes, encoding: str, limit: int) -> bytes:
    """The body without its Content-Encoding (tritonclient's request compression), still within `limit` bytes."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise ApiError(
            415, "unsupported_encoding", f"Content-Encoding {encoding!r} is not supported; use gzip or deflate"
        )
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as e:
        raise ApiError(400, "invalid_encoding", f"the body is not valid {encoding}: {e}") from None
    if len(out) > limit:
        raise ApiError(413, "payload_too_large", f"the body decompresses to over the limit of {limit:,} bytes")
    if not inflater.eof:
        raise ApiError(400, "invalid_encoding", f"the {encoding} body is truncated")
    return out


def _parse(body: bytes, header_length: int | None) -> tuple[InferRequest, list[InputTensor]]:
    """The request's JSON, and its inputs with their raw bytes when they come after the JSON."""
    if header_length is not None and header_length > len(body):
        raise ApiError(
            400, "invalid_binary", f"Inference-Header-Content-Length is {header_length}; the body has {len(body)} bytes"
        )
    header, binary = (body, b"") if header_length is None else (body[:header_length], body[header_length:])
    req = validated_json(InferRequest, header, status=400, code="invalid_request")
    inputs, at = [], 0
    for t in req.inputs:
        parameters = t.parameters or {}
        size = parameters.get("binary_data_size")
        raw = None
        if size is not None:
            if header_length is None:
                raise ApiError(
                    400,
                    "invalid_binary",
                    f"input {t.name!r} has binary_data_size but no Inference-Header-Content-Length",
                )
            if t.data is not None:
                raise ApiError(400, "invalid_binary", f"input {t.name!r} has both data and binary_data_size")
            if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= len(binary) - at:
                raise ApiError(
                    400,
                    "invalid_binary",
                    f"input {t.name!r}: binary_data_size {size!r} is not a byte count within the "
                    f"{len(binary) - at} bytes of binary data left",
                )
            raw, at = binary[at : at + size], at + size
        elif t.data is None:
            raise ApiError(400, "invalid_input", f"input {t.name!r} has neither data nor binary_data_size")
        inputs.append(InputTensor(t.name, t.datatype, t.shape, parameters, t.data, raw))
    if at != len(binary):
        raise ApiError(400, "invalid_binary", f"{len(binary) - at} bytes of binary data belong to no input")
    return req, inputs


def _binary_outputs(req: InferRequest) -> tuple[dict[str, bool], bool]:
    """Which requested outputs go back raw, and whether the others do (`binary_data_output`, default false)."""

    def flag(parameters: dict | None, key: str, default: bool) -> bool:
        value = (parameters or {}).get(key, default)
        if not isinstance(value, bool):
            raise ApiError(400, "invalid_parameter", f"parameter {key!r} must be true or false, got {value!r}")
        return value

    default = flag(req.parameters, "binary_data_output", False)
    return {o.name: flag(o.parameters, "binary_data", default) for o in req.outputs or []}, default


def _answer(request_id: str, version: str, outputs: list[OutputTensor], binary: list[bool]) -> Response:
    body = {"model_name": MODEL_NAME, "model_version": version, "id": request_id, "outputs": []}
    raws = []
    for output, raw in zip(outputs, binary, strict=True):
        tensor = {"name": output.name, "datatype": output.datatype, "shape": output.shape}
        if raw:
            raws.append(output.raw())
            tensor["parameters"] = {"binary_data_size": len(raws[-1])}
        else:
            tensor["data"] = output.data()
        body["outputs"].append(tensor)
    if not raws:
        return JSONResponse(body)
    header = json.dumps(body, separators=(",", ":")).encode()
    return Response(
        header + b"".join(raws),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
