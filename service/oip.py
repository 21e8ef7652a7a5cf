"""The KServe Open Inference Protocol (v2) subset, so standard clients work unchanged.

Inputs: one tensor, either FP32 [N, C, H, W] already normalised with the model's mean/std, or BYTES [N]
of encoded images (base64 strings in JSON). An optional `depth` parameter (request or input level).
Outputs: `probabilities` FP32 [N, K], `depth` INT64 [N], `label` BYTES [N].
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
from fastapi import APIRouter, Path
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from service.errors import ApiError
from service.routes import ReadyState, State, admission_check, decode_all, infer, model_info
from service.schemas import (
    EXAMPLE_PNG_BASE64,
    OipError,
    OipInferResponse,
    OipLive,
    OipModelMetadata,
    OipModelReady,
    OipReady,
)
from service.uploads import decode_base64, parse_depth

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol v2"])
MODEL_NAME = "puppet-cnn"
ModelName = Annotated[str, Path(description="the served model's name", examples=[MODEL_NAME])]


class InferInput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[Any]
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
    outputs: list[dict[str, Any]] | None = None


def _check_name(name: str) -> None:
    if name != MODEL_NAME:
        raise ApiError(404, "model_not_found", f"model {name!r} is not served here; this server serves {MODEL_NAME!r}")


def _flatten(data: list) -> list:
    out = []
    stack = [data]
    while stack:  # iterative, so a deeply nested list cannot blow the recursion limit
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            out.append(item)
    return out


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
async def v2_metadata(name: ModelName, state: ReadyState) -> dict:
    _check_name(name)
    info = model_info(state)
    c, (h, w) = info["preprocessing"]["channels"], info["preprocessing"]["input_size"]
    return {
        "name": MODEL_NAME,
        "versions": [info["version"]],
        "platform": f"pytorch_{info['provider']}",
        "inputs": [
            {"name": "input", "datatype": "FP32", "shape": [-1, c, h, w]},
            {"name": "image_bytes", "datatype": "BYTES", "shape": [-1]},
        ],
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(info["classes"])]},
            {"name": "depth", "datatype": "INT64", "shape": [-1]},
            {"name": "label", "datatype": "BYTES", "shape": [-1]},
        ],
        "parameters": {"depth": f"auto or 1..{info['max_depth']}", "classes": info["classes"]},
    }


@router.get(
    "/models/{name}/ready",
    response_model=OipModelReady,
    responses={404: {"model": OipError}, 503: {"model": OipModelReady}},
)
async def v2_model_ready(name: ModelName, state: State) -> JSONResponse:
    _check_name(name)
    ok = state.serving
    return JSONResponse({"name": MODEL_NAME, "ready": ok}, status_code=200 if ok else 503)


@router.post(
    "/models/{name}/infer",
    response_model=None,  # documented below; the answer is built as a dict and not re-validated on the hot path
    responses={
        200: {"model": OipInferResponse},
        **{
            status: {"model": OipError}
            for status in (400, 404, 413, 422, 429, 500, 503, 504)  # 422: a bad `depth` parameter
        },
    },
)
async def v2_infer(name: ModelName, request: InferRequest, state: ReadyState) -> dict:
    _check_name(name)
    if len(request.inputs) != 1:
        raise ApiError(400, "invalid_input", f"send exactly one input tensor, got {len(request.inputs)}")
    tensor = request.inputs[0]
    params = {**(request.parameters or {}), **(tensor.parameters or {})}
    ckpt = state.ckpt
    depth = parse_depth(params.get("depth"), ckpt.config.max_depth)
    images = _input_images(state, tensor)
    if isinstance(images, list):  # encoded images
        admission_check(state, len(images), depth=depth, max_depth=None)
        images = await decode_all(state, images)
    results, _ = await infer(state, images, depth=depth, max_depth=None)
    n = len(results)
    probs = torch.stack([r.probabilities for r in results])
    return {
        "model_name": MODEL_NAME,
        "model_version": ckpt.version,
        "id": request.id or "",
        "outputs": [
            {
                "name": "probabilities",
                "datatype": "FP32",
                "shape": [n, probs.shape[1]],
                "data": probs.flatten().tolist(),
            },
            {"name": "depth", "datatype": "INT64", "shape": [n], "data": [r.depth for r in results]},
            {
                "name": "label",
                "datatype": "BYTES",
                "shape": [n],
                "data": [ckpt.classes[int(r.probabilities.argmax())] for r in results],
            },
        ],
    }


def _input_images(state, tensor: InferInput) -> torch.Tensor | list[bytes]:
    """FP32 normalised [N, C, H, W] back to intensities in [0, 1]; BYTES are decoded like /classify's."""
    pre = state.ckpt.preprocessing
    data = _flatten(tensor.data)
    if tensor.datatype == "FP32":
        expected = [pre.channels, pre.image_size, pre.image_size]
        if len(tensor.shape) != 4 or tensor.shape[1:] != expected or tensor.shape[0] < 1:
            raise ApiError(
                400,
                "invalid_shape",
                f"FP32 input must have shape [N, {', '.join(map(str, expected))}], got {tensor.shape}",
            )
        n = tensor.shape[0]
        if n > state.settings.max_images_per_request:
            raise ApiError(
                413,
                "too_many_images",
                f"{n} images in one request; the limit is {state.settings.max_images_per_request}",
            )
        if len(data) != n * pre.channels * pre.image_size**2:
            raise ApiError(
                400,
                "invalid_shape",
                f"shape {tensor.shape} needs {n * pre.channels * pre.image_size**2} values, got {len(data)}",
            )
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in data):
            raise ApiError(400, "invalid_datatype", "FP32 data must be numbers")
        x = torch.tensor(data, dtype=torch.float32).view(n, *expected)
        if not torch.isfinite(x).all():
            raise ApiError(400, "invalid_datatype", "FP32 data must be finite")
        mean = torch.tensor(pre.mean).view(1, -1, 1, 1)
        std = torch.tensor(pre.std).view(1, -1, 1, 1)
        return (x * std + mean).clamp(0, 1)
    if tensor.datatype == "BYTES":
        if len(tensor.shape) != 1 or tensor.shape[0] != len(data) or not data:
            raise ApiError(
                400,
                "invalid_shape",
                f"BYTES input must have shape [N] matching its {len(data)} items, got {tensor.shape}",
            )
        if len(data) > state.settings.max_images_per_request:
            raise ApiError(
                413,
                "too_many_images",
                f"{len(data)} images in one request; the limit is {state.settings.max_images_per_request}",
            )
        blobs = []
        for i, item in enumerate(data):
            if not isinstance(item, str):
                raise ApiError(400, "invalid_datatype", f"BYTES item {i} must be a base64 string")
            blobs.append(decode_base64(item, i))
        return blobs  # decoded by the caller (async)
    raise ApiError(
        400, "invalid_datatype", f"datatype {tensor.datatype} is not supported; send FP32 [N, C, H, W] or BYTES [N]"
    )
