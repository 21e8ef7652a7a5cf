"""Turning a POST /classify request into images and options: body forms, limits, validation."""

from __future__ import annotations

import base64
import binascii
import json

from fastapi import Request
from pydantic import ValidationError

from service.errors import ApiError
from service.imaging import SUPPORTED_TYPES
from service.schemas import ClassifyJSON


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refusing (413) as soon as it passes `limit` bytes: never read a huge upload in full."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "payload_too_large", f"the body is {int(declared):,} bytes; the limit is {limit:,}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "payload_too_large", f"the body is over the limit of {limit:,} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # starlette's form parser reads the cached body
    return body


def parse_depth(value: str | int | None, max_depth: int, name: str = "depth") -> int | None:
    if value is None or value == "auto":
        return None
    try:
        d = int(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: a JSON Infinity
        raise ApiError(
            422, "invalid_option", f"{name} must be 'auto' or an integer in 1..{max_depth}, got {value!r}"
        ) from None
    if not 1 <= d <= max_depth:
        raise ApiError(422, "invalid_option", f"{name} must be in 1..{max_depth}, got {d}")
    return d


def parse_top_k(value: str | int | None, default: int, num_classes: int) -> int:
    if value is None:
        return min(default, num_classes)
    try:
        k = int(value)
    except (TypeError, ValueError, OverflowError):
        raise ApiError(422, "invalid_option", f"top_k must be an integer in 1..{num_classes}, got {value!r}") from None
    if not 1 <= k <= num_classes:
        raise ApiError(422, "invalid_option", f"top_k must be in 1..{num_classes}, got {k}")
    return k


def decode_base64(text: str, i: int) -> bytes:
    """One base64-encoded image (the i-th of the request) to its bytes; 400 invalid_base64 otherwise."""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise ApiError(400, "invalid_base64", f"image {i} is not valid base64") from None


async def images_and_options(request: Request, limit: int, max_images: int) -> tuple[list[bytes], dict]:
    """Image byte strings in request order, and the options (query string, overridden by a JSON body)."""
    options: dict = {k: request.query_params.get(k) for k in ("top_k", "depth", "max_depth")}
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await read_body(request, limit)
    if content_type == "multipart/form-data":
        try:
            form = await request.form(max_files=max_images, max_fields=16, max_part_size=limit)
        except Exception as e:
            raise ApiError(400, "invalid_multipart", f"the multipart body could not be parsed: {e}") from None
        uploads = [v for k, v in form.multi_items() if k in ("file", "files") and hasattr(v, "read")]
        if not uploads:
            raise ApiError(400, "no_image", "the multipart body has no 'file' or 'files' part")
        images = [await u.read() for u in uploads]
        for k in ("top_k", "depth", "max_depth"):
            if isinstance(form.get(k), str):
                options[k] = form.get(k)
    elif content_type == "application/json":
        try:
            payload = ClassifyJSON.model_validate(json.loads(body or b"null"))
        except ValidationError as e:
            first = e.errors()[0]
            raise ApiError(
                422, "invalid_option", f"{'.'.join(map(str, first['loc'])) or 'body'}: {first['msg']}"
            ) from None
        except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, or nested too deep to parse
            raise ApiError(400, "invalid_json", f"the body is not valid JSON: {e}") from None
        texts = ([payload.image] if payload.image is not None else []) + (payload.images or [])
        if not texts:
            raise ApiError(400, "no_image", "the JSON body needs 'image' (base64) or 'images' (a list of base64)")
        if len(texts) > max_images:
            raise ApiError(413, "too_many_images", f"{len(texts)} images in one request; the limit is {max_images}")
        images = [decode_base64(t, i) for i, t in enumerate(texts)]
        for k in ("top_k", "depth", "max_depth"):
            if getattr(payload, k) is not None:
                options[k] = getattr(payload, k)
    elif content_type in SUPPORTED_TYPES or content_type == "application/octet-stream":
        images = [body]
    elif not content_type:
        raise ApiError(
            415, "unsupported_media_type", "set Content-Type: an image type, multipart/form-data or application/json"
        )
    else:
        raise ApiError(
            415,
            "unsupported_media_type",
            f"Content-Type {content_type} is not accepted; send {', '.join(sorted(SUPPORTED_TYPES))}, multipart/form-data or application/json",
        )
    if len(images) > max_images:
        raise ApiError(413, "too_many_images", f"{len(images)} images in one request; the limit is {max_images}")
    return images, options
