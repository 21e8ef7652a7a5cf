"""One error shape for the whole API: {"error": {"code", "message"}}, with the right status."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.logs import note

# The refusal at the door while draining (HTTP middleware, gRPC): the request was never taken. A request already
# taken that the drain could not finish says "the service is shutting down" alone (service/pipeline.py).
DRAINING_MESSAGE = "the service is shutting down; retry on another instance"


def oip_path(path: str) -> bool:
    """Whether a path is the Open Inference Protocol's, whose errors are {"error": "<message>"}."""
    return path == "/v2" or path.startswith("/v2/")


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        note(error=exc.code, **({"error_id": exc.headers["X-Error-Id"]} if "X-Error-Id" in exc.headers else {}))
        if oip_path(request.url.path):  # the Open Inference Protocol's error shape
            return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        note(error="invalid_option")
        if oip_path(request.url.path):
            return JSONResponse({"error": f"{where}: {first['msg']}"}, status_code=400)
        return error_response(422, "invalid_option", f"{where}: {first['msg']}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        note(error=code)
        if oip_path(request.url.path):  # e.g. a body FastAPI cannot parse: the OIP shape too
            return JSONResponse(
                {"error": str(exc.detail)}, status_code=exc.status_code, headers=getattr(exc, "headers", None)
            )
        return error_response(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))
