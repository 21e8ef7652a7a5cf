"""Response and request bodies of the HTTP API (pydantic), shown in the OpenAPI docs."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class ErrorDetail(BaseModel):
    code: str = Field(examples=["invalid_image"])
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Prediction(BaseModel):
    label: str
    class_id: int
    probability: float


class ImageClassification(BaseModel):
    predictions: list[Prediction] = Field(description="top-k classes, most probable first")
    depth: int = Field(description="blocks per stage the puppet ran for this image")
    depth_reason: Literal["auto", "requested", "capped", "degraded"]
    complexity: float = Field(description="H(x) in bits, the input to the depth table")
    max_depth: int


class Timings(BaseModel):
    queue: float
    preprocess: float
    inference: float
    total: float


class BackendInfo(BaseModel):
    name: Literal["torch", "onnx"]
    provider: str = Field(examples=["torch-cpu", "CPUExecutionProvider", "CUDAExecutionProvider"])


class ClassifyResponse(BaseModel):
    results: list[ImageClassification] = Field(description="one entry per image, in request order")
    model_version: str
    backend: BackendInfo
    timings_ms: Timings


class ClassifyJSON(BaseModel):
    """JSON body of POST /classify: one base64 image or several."""

    image: str | None = Field(None, description="base64-encoded image bytes")
    images: list[str] | None = Field(None, description="several base64-encoded images")
    top_k: int | None = Field(None, ge=1)
    depth: int | Literal["auto"] | None = None
    max_depth: int | None = Field(None, ge=1)


class DepthTable(BaseModel):
    edges: list[float]
    depths: list[int]
    tolerance: float


class PreprocessingInfo(BaseModel):
    input_size: list[int]
    channels: int
    mean: list[float]
    std: list[float]


class ModelInfo(BaseModel):
    name: str
    version: str
    classes: list[str]
    preprocessing: PreprocessingInfo
    depths: list[int]
    max_depth: int
    depth_table: DepthTable
    stored_parameters: int
    backend: str
    provider: str
    device: str
    checkpoint_sha256: str
    dataset: str
