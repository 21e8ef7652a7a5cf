"""The Open Inference Protocol (KServe v2) whatever the transport: what the HTTP routes (service/oip.py) and the gRPC
service (service/grpc_server.py) share.

The model: one input, either FP32 [N, C, H, W] already normalised with the checkpoint's mean/std, or BYTES [N] of
encoded images; an optional `depth` parameter (request or input level: `auto` or 1..D_max). Outputs, all or those
requested, in the order requested: `probabilities` FP32 [N, K], `depth` INT64 [N], `label` BYTES [N], `escalated`
BOOL [N] (the cascade router ran a second, deeper pass: `depth` and `probabilities` are that pass's).

A tensor's elements come as values (JSON, or protobuf `contents`) or raw: little-endian, row-major, and for BYTES
each element a 4-byte little-endian length then its bytes (Triton's serialization; the binary tensor data extension
over HTTP, `raw_input_contents` / `raw_output_contents` over gRPC). A BYTES element is an encoded image: its bytes
when raw or in protobuf, a base64 string in JSON.
"""

from __future__ import annotations

import importlib.metadata
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from service import pipeline
from service.errors import ApiError
from service.state import ServiceState, model_info
from service.uploads import check_image_count, decode_base64, parse_depth

MODEL_NAME = "puppet-cnn"
OUTPUT_NAMES = ("probabilities", "depth", "label", "escalated")
EXTENSIONS = ["binary_tensor_data"]
# Triton's extensions that this server does not offer: refused rather than silently ignored
UNSUPPORTED_PARAMETERS = {
    "shared_memory_region": "the shared memory extension is not supported; send the tensor in the request",
    "classification": "the classification extension is not supported; request the 'probabilities' output",
}


@dataclass
class InputTensor:
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] = field(default_factory=dict)
    data: list | None = None  # the elements as values: JSON (possibly nested) or protobuf contents
    raw: bytes | None = None  # or raw (see the module's docstring)


@dataclass
class OutputTensor:
    name: str
    datatype: str
    shape: list[int]
    values: np.ndarray | list[str]

    def data(self) -> list:
        """The elements as JSON values, flattened."""
        return self.values if isinstance(self.values, list) else self.values.reshape(-1).tolist()

    def raw(self) -> bytes:
        if isinstance(self.values, list):
            return serialize_bytes([v.encode() for v in self.values])
        return self.values.astype(self.values.dtype.newbyteorder("<"), copy=False).tobytes()


def check_model(name: str) -> None:
    if name != MODEL_NAME:
        raise ApiError(404, "model_not_found", f"model {name!r} is not served here; this server serves {MODEL_NAME!r}")


def check_version(state: ServiceState, version: str) -> None:
    """An empty version is the server's choice; any other must be the one loaded."""
    if version and version != state.ckpt.version:
        raise ApiError(
            404, "model_not_found", f"version {version!r} of {MODEL_NAME!r} is not served; {state.ckpt.version!r} is"
        )


def server_metadata() -> dict:
    return {
        "name": "puppet-cnn-serve",
        "version": importlib.metadata.version("puppet-cnn-serve"),
        "extensions": EXTENSIONS,
    }


def model_metadata(state: ServiceState) -> dict:
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
            {"name": "escalated", "datatype": "BOOL", "shape": [-1]},
        ],
        "parameters": {
            "depth": f"auto or 1..{info['max_depth']}",
            "classes": info["classes"],
            "router": info["router"]["name"],
        },
    }


def check_parameters(parameters: dict[str, Any], where: str) -> None:
    for key, why in UNSUPPORTED_PARAMETERS.items():
        if key in parameters:
            raise ApiError(400, "unsupported_parameter", f"{where}: parameter {key!r}: {why}")


async def infer_outputs(
    state: ServiceState,
    inputs: list[InputTensor],
    parameters: dict[str, Any],
    requested: list[tuple[str, dict[str, Any]]] | None,
) -> list[OutputTensor]:
    """Run the request's one input through the worker: the outputs requested (by name, with their parameters;
    None: all), in that order. Every refusal is an ApiError with the status HTTP answers."""
    if len(inputs) != 1:
        raise ApiError(400, "invalid_input", f"send exactly one input tensor, got {len(inputs)}")
    tensor = inputs[0]
    check_parameters(parameters, "the request")
    check_parameters(tensor.parameters, f"input {tensor.name!r}")
    names = _output_names(requested)
    depth = parse_depth({**parameters, **tensor.parameters}.get("depth"), state.ckpt.config.max_depth)
    results = (await pipeline.classify(state, _images(state, tensor), depth=depth, max_depth=None)).results
    n, classes = len(results), state.ckpt.classes
    probs = torch.stack([r.probabilities for r in results]).float().cpu().numpy()
    outputs = {
        "probabilities": OutputTensor("probabilities", "FP32", [n, probs.shape[1]], probs),
        "depth": OutputTensor("depth", "INT64", [n], np.array([r.depth for r in results], dtype=np.int64)),
        "label": OutputTensor("label", "BYTES", [n], [classes[int(i)] for i in probs.argmax(axis=1)]),
        "escalated": OutputTensor("escalated", "BOOL", [n], np.array([r.escalated for r in results], dtype=np.bool_)),
    }
    return [outputs[name] for name in names]


def _output_names(requested: list[tuple[str, dict[str, Any]]] | None) -> list[str]:
    if not requested:
        return list(OUTPUT_NAMES)
    names = []
    for name, parameters in requested:
        if name not in OUTPUT_NAMES:
            raise ApiError(
                400, "unknown_output", f"output {name!r} does not exist; this model's are {', '.join(OUTPUT_NAMES)}"
            )
        if name in names:
            raise ApiError(400, "unknown_output", f"output {name!r} is requested twice")
        check_parameters(parameters, f"output {name!r}")
        names.append(name)
    return names


def _images(state: ServiceState, tensor: InputTensor) -> torch.Tensor | list[bytes]:
    """FP32 [N, C, H, W], normalised by the client as the model's metadata says, goes to the model as it is; BYTES
    as encoded images, for the pipeline to decode (asynchronously) like /classify's."""
    pre, shape = state.ckpt.preprocessing, tensor.shape
    if tensor.datatype == "FP32":
        per_image = [pre.channels, pre.image_size, pre.image_size]
        if len(shape) != 4 or shape[1:] != per_image or shape[0] < 1:
            raise ApiError(
                400, "invalid_shape", f"FP32 input must have shape [N, {', '.join(map(str, per_image))}], got {shape}"
            )
        check_image_count(shape[0], state.settings.max_images_per_request)
        size = math.prod(shape)
        if tensor.raw is not None:
            if len(tensor.raw) != 4 * size:
                raise ApiError(
                    400, "invalid_shape", f"shape {shape} needs {4 * size} bytes of FP32, got {len(tensor.raw)}"
                )
            x = torch.from_numpy(np.frombuffer(tensor.raw, dtype="<f4").astype(np.float32))
        else:
            data = _flatten(tensor.data)
            if len(data) != size:
                raise ApiError(400, "invalid_shape", f"shape {shape} needs {size} values, got {len(data)}")
            if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in data):
                raise ApiError(400, "invalid_datatype", "FP32 data must be numbers")
            x = torch.tensor(data, dtype=torch.float32)
        x = x.view(shape)
        if not torch.isfinite(x).all():
            raise ApiError(400, "invalid_datatype", "FP32 data must be finite")
        return x
    if tensor.datatype == "BYTES":
        if len(shape) != 1 or shape[0] < 1:
            raise ApiError(400, "invalid_shape", f"BYTES input must have shape [N], N >= 1, got {shape}")
        n = shape[0]
        check_image_count(n, state.settings.max_images_per_request)
        if tensor.raw is not None:
            return deserialize_bytes(tensor.raw, n)
        data = _flatten(tensor.data)
        if len(data) != n:
            raise ApiError(400, "invalid_shape", f"BYTES input of shape {shape} needs {n} items, got {len(data)}")
        blobs = []
        for i, item in enumerate(data):
            if isinstance(item, str):
                item = decode_base64(item, i)
            elif not isinstance(item, bytes):
                raise ApiError(400, "invalid_datatype", f"BYTES item {i} must be a base64 string")
            blobs.append(item)
        return blobs
    raise ApiError(
        400, "invalid_datatype", f"datatype {tensor.datatype} is not supported; send FP32 [N, C, H, W] or BYTES [N]"
    )


def _flatten(data: list | None) -> list:
    out = []
    stack = [data or []]
    while stack:  # iterative, so a deeply nested list cannot blow the recursion limit
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            out.append(item)
    return out


def serialize_bytes(items: list[bytes]) -> bytes:
    """BYTES elements in Triton's raw form: each a 4-byte little-endian length, then its bytes."""
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def deserialize_bytes(raw: bytes, n: int) -> list[bytes]:
    """The `n` elements of a raw BYTES tensor; 400 unless `raw` holds exactly that many, whole."""
    items, at, view = [], 0, memoryview(raw)
    while at < len(raw) and len(items) < n:
        if at + 4 > len(raw):
            break
        size = int.from_bytes(view[at : at + 4], "little")
        at += 4
        if at + size > len(raw):
            raise ApiError(
                400,
                "invalid_shape",
                f"raw BYTES element {len(items)} claims {size} bytes; {len(raw) - at} remain in the tensor",
            )
        items.append(bytes(view[at : at + size]))
        at += size
    if len(items) != n or at != len(raw):
        raise ApiError(
            400,
            "invalid_shape",
            f"the raw BYTES tensor must hold exactly {n} elements (4-byte little-endian length, then the bytes); "
            f"{len(raw)} bytes do not",
        )
    return items
