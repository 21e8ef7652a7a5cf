"""Response and request bodies of the HTTP API (pydantic), shown in the OpenAPI docs."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from service.imaging import SUPPORTED_TYPES

# A real 4x4 grey PNG: the examples the OpenAPI docs show (and schemathesis sends) classify successfully.
EXAMPLE_PNG_BASE64 = (
    "iVBORw0KGgoAAAANSUhEUgAAAAQAAAAECAAAAACMmsGiAAAAEElEQVR42mNsYGBgYGJAIQAJ5ACIuhfh0AAAAABJRU5ErkJggg=="
)


class ErrorDetail(BaseModel):
    code: str = Field(examples=["invalid_image"])
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Prediction(BaseModel):
    label: str
    class_id: int
    probability: float


DepthReason = Literal["entropy", "learned", "cascade", "requested", "capped", "degraded"]


class ImageClassification(BaseModel):
    predictions: list[Prediction] = Field(description="top-k classes, most probable first")
    depth: int = Field(description="blocks per stage of the pass that gave the predictions")
    depth_reason: DepthReason = Field(
        description="why that depth: the router that chose it (entropy, learned or cascade), requested, capped "
        "(max_depth) or degraded (load)"
    )
    escalated: bool = Field(description="the cascade router ran a second, deeper pass for this image")
    depths_run: list[int] = Field(description="the depth of each pass run, e.g. [1, 4] for an escalated image")
    complexity: float = Field(description="H(x) in bits, the input to the depth table")
    max_depth: int


class Timings(BaseModel):
    receive: float = Field(description="reading the request body: the client's upload, not part of the deadline")
    queue: float
    preprocess: float = Field(description="decoding the images, once the body is in")
    inference: float = Field(description="the first pass: complexity, routing and the model")
    escalation: float = Field(description="the batch's second pass (escalated images), 0 when there was none")
    total: float


class BackendInfo(BaseModel):
    name: Literal["torch", "onnx"]
    provider: str = Field(examples=["torch-cpu", "CPUExecutionProvider", "CUDAExecutionProvider"])


class ClassifyResponse(BaseModel):
    results: list[ImageClassification] = Field(description="one entry per image, in request order")
    model_version: str
    backend: BackendInfo
    timings_ms: Timings


def _option_schema(description: str, *, auto: bool = False) -> dict:
    """An integer option of the JSON body: a JSON integer, or a string of ASCII digits ('auto' too for depth)."""
    return {
        "anyOf": [
            {"type": "integer", "minimum": 1},
            {"type": "string", "pattern": "^([0-9]+|auto)$" if auto else "^[0-9]+$"},
            {"type": "null"},
        ],
        "default": None,
        "description": description,
    }


class ClassifyJSON(BaseModel):
    """JSON body of POST /classify: one base64 image or several."""

    image: str | None = Field(None, description="base64-encoded image bytes", examples=[EXAMPLE_PNG_BASE64])
    images: list[str] | None = Field(
        None, description="several base64-encoded images", examples=[[EXAMPLE_PNG_BASE64, EXAMPLE_PNG_BASE64]]
    )
    # Kept as sent and checked by service.uploads.parse_top_k / parse_depth, the same checks as the query string's:
    # a JSON integer or a string of ASCII digits. A float (2.0 or 2.7) or a bool is refused (422), never truncated.
    top_k: Annotated[Any, WithJsonSchema(_option_schema("classes to return, 1..number of classes"))] = None
    depth: Annotated[Any, WithJsonSchema(_option_schema("'auto' or a fixed depth in 1..D_max", auto=True))] = None
    max_depth: Annotated[Any, WithJsonSchema(_option_schema("cap on the automatic depth, 1..D_max"))] = None


class DepthTable(BaseModel):
    edges: list[float]
    depths: list[int]
    tolerance: float


class RouterInfo(BaseModel):
    name: Literal["entropy", "learned", "cascade"]
    budget: float = Field(description="a fraction of max depth's MACs: picks the router's operating point")
    settings: dict[str, Any] = Field(description="the operating point: table, penalty, or first/second/threshold")
    val_accuracy: float | None = Field(description="validation accuracy at that point; null when not calibrated")
    val_macs: float | None = Field(description="validation mean MACs an image at that point; null when not calibrated")
    available: list[str] = Field(description="the routers this checkpoint offers (PUPPET_ROUTER)")
    default: str = Field(description="the checkpoint's default router")


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
    depth_table: DepthTable = Field(
        description="the complexity table the checkpoint was trained with (the paper's H rule, as calibrated at the "
        "end of training); it routes only checkpoints without calibrated routers. What decides depth here is "
        "`router`, whose operating point (the entropy router's table, the learned router's penalty, the cascade's "
        "depths and threshold) is router.settings"
    )
    router: RouterInfo
    stored_parameters: int
    backend: str
    provider: str
    device: str
    checkpoint_sha256: str
    dataset: str


class HealthStatus(BaseModel):
    status: Literal["live", "ready"]


# The Open Inference Protocol (v2) answers: its own error shape, {"error": "<message>"}.


class OipError(BaseModel):
    error: str


class OipLive(BaseModel):
    live: bool


class OipReady(BaseModel):
    ready: bool


class OipModelReady(BaseModel):
    name: str
    ready: bool


class OipServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class OipTensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class OipModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[OipTensorMetadata]
    outputs: list[OipTensorMetadata]
    parameters: dict[str, Any]


class OipOutputTensor(BaseModel):
    name: Literal["probabilities", "depth", "label", "escalated"]
    datatype: Literal["FP32", "INT64", "BYTES", "BOOL"]
    shape: list[int]
    data: list[float] | list[int] | list[str] | list[bool]


class OipInferResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())  # model_name, model_version are the protocol's names

    model_name: str
    model_version: str
    id: str
    outputs: list[OipOutputTensor]


def _classify_request_docs() -> dict:
    """What POST /classify accepts, for its OpenAPI `openapi_extra` (the handler reads the raw request)."""
    depth = {"anyOf": [{"type": "integer", "minimum": 1}, {"type": "string", "enum": ["auto"]}]}
    options = {
        "top_k": {"type": "integer", "minimum": 1, "description": "classes to return, 1..number of classes"},
        "depth": {**depth, "description": "'auto' (the router decides) or a fixed depth in 1..D_max"},
        "max_depth": {"type": "integer", "minimum": 1, "description": "cap on the automatic depth, 1..D_max"},
    }
    binary = {"type": "string", "format": "binary"}
    raw = {t: {"schema": binary} for t in (*sorted(SUPPORTED_TYPES), "application/octet-stream")}
    multipart = {
        "type": "object",
        "properties": {"file": binary, "files": {"type": "array", "items": binary}, **options},
    }
    return {
        "parameters": [
            {"name": name, "in": "query", "required": False, "schema": schema} for name, schema in options.items()
        ],
        "requestBody": {
            "required": True,
            "content": {
                **raw,
                "multipart/form-data": {"schema": multipart},
                "application/json": {"schema": ClassifyJSON.model_json_schema()},
            },
        },
    }


CLASSIFY_REQUEST_DOCS = _classify_request_docs()
