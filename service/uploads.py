"""Turning a POST /classify request into images and options: body forms, limits, validation."""

from __future__ import annotations

import binascii
import json
import re

from fastapi import Request
from pydantic import BaseModel, ValidationError

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


def validated_json(model: type[BaseModel], body: bytes, *, status: int, code: str) -> BaseModel:
    """A JSON body validated against `model`: 400 `invalid_json` if it is not JSON (or not UTF-8, or nested too
    deep to parse); `status`/`code` naming the first field that does not fit."""
    try:
        return model.model_validate(json.loads(body or b"null"))
    except ValidationError as e:
        first = e.errors()[0]
        raise ApiError(status, code, f"{'.'.join(map(str, first['loc'])) or 'body'}: {first['msg']}") from None
    except (ValueError, RecursionError) as e:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {e}") from None


def check_image_count(n: int, limit: int) -> None:
    if n > limit:
        raise ApiError(413, "too_many_images", f"{n} images in one request; the limit is {limit}")


def parse_depth(value: object, max_depth: int, name: str = "depth") -> int | None:
    """`auto` (None) or a depth in 1..max_depth, from a JSON integer or a string of ASCII digits; 422 otherwise
    (a float, a bool, '2.0', '+2', ' 2', a non-ASCII digit such as '２')."""
    if value is None or value == "auto":
        return None
    return _option_int(value, name, max_depth, f"'auto' or an integer in 1..{max_depth}")


def parse_top_k(value: object, default: int, num_classes: int) -> int:
    """top_k in 1..num_classes, from a JSON integer or a string of ASCII digits; 422 otherwise."""
    if value is None:
        return min(default, num_classes)
    return _option_int(value, "top_k", num_classes, f"an integer in 1..{num_classes}")


def _option_int(value: object, name: str, top: int, accepted: str) -> int:
    """An option's integer value: an int (not a bool), or a string of ASCII digits only."""
    if isinstance(value, str) and value.isascii() and value.isdigit():
        if len(value) > 18:  # int() of thousands of digits is slow, and it is out of range anyway
            raise ApiError(422, "invalid_option", f"{name} must be in 1..{top}, got {_shown(value)}")
        value = int(value)
    elif isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(
            422,
            "invalid_option",
            f"{name} must be {accepted}, as a JSON integer or a string of ASCII digits 0-9, got {_shown(value)}",
        )
    if not 1 <= value <= top:
        raise ApiError(422, "invalid_option", f"{name} must be in 1..{top}, got {value}")
    return value


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


_WHITESPACE = b" \t\n\r\v\f"
_URL_SAFE = bytes.maketrans(b"-_", b"+/")
_DATA_URL = re.compile(r"data:([^,]*);base64,", re.IGNORECASE)
_NOT_BASE64 = re.compile(rb"[^A-Za-z0-9+/=]")


def decode_base64(text: str, i: int) -> bytes:
    """One base64-encoded image (the i-th of the request) to its bytes; 400 invalid_base64 otherwise.

    Accepts what people's tools write: line breaks and other ASCII whitespace anywhere (coreutils `base64`
    wraps at 76 columns), the URL-safe alphabet (- and _), missing `=` padding, and a `data:<type>;base64,`
    prefix (a browser's readAsDataURL). Anything else outside the alphabet is refused."""
    try:  # the common case, strict and fast
        return binascii.a2b_base64(text, strict_mode=True)
    except (binascii.Error, ValueError, TypeError):
        pass
    if not isinstance(text, str):
        raise ApiError(400, "invalid_base64", f"image {i} must be a base64 string")
    body = text.strip()
    if body[:5].lower() == "data:":
        url = _DATA_URL.match(body)
        if url is None:
            raise ApiError(
                400, "invalid_base64", f"image {i} is a data URL without ';base64,': send the image base64-encoded"
            )
        body = body[url.end() :]
    try:
        data = body.encode("ascii")
    except UnicodeEncodeError as e:
        raise ApiError(
            400, "invalid_base64", f"image {i} is not valid base64: {body[e.start]!r} is not a base64 character"
        ) from None
    data = data.translate(None, _WHITESPACE)
    if b"-" in data or b"_" in data:
        if b"+" in data or b"/" in data:
            raise ApiError(
                400,
                "invalid_base64",
                f"image {i} is not valid base64: it mixes the standard (+/) and URL-safe (-_) alphabets",
            )
        data = data.translate(_URL_SAFE)
    if bad := _NOT_BASE64.search(data):
        raise ApiError(
            400, "invalid_base64", f"image {i} is not valid base64: {chr(bad[0][0])!r} is not a base64 character"
        )
    if not data.endswith(b"="):
        data += b"=" * (-len(data) % 4)
    try:
        return binascii.a2b_base64(data, strict_mode=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, "invalid_base64", f"image {i} is not valid base64: {e}") from None


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
        payload = validated_json(ClassifyJSON, body, status=422, code="invalid_option")
        texts = ([payload.image] if payload.image is not None else []) + (payload.images or [])
        if not texts:
            raise ApiError(400, "no_image", "the JSON body needs 'image' (base64) or 'images' (a list of base64)")
        check_image_count(len(texts), max_images)  # before decoding them
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
    check_image_count(len(images), max_images)
    return images, options
