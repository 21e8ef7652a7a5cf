"""The Open Inference Protocol over gRPC (`inference.GRPCInferenceService`, service/oip_proto/), served by grpc.aio
in each worker process on `grpc_port`, beside the HTTP API and on its event loop.

It is the HTTP path by another transport: the same model and tensors (service/oip_tensors.py), batcher, limits
(the message size is `max_upload_bytes`), admission and errors, with the HTTP status mapped to a gRPC code and the
same message. Every call counts in `puppet_requests_total` and `puppet_request_duration_seconds` under its method
(`/inference.GRPCInferenceService/ModelInfer`) and the HTTP status it stands for, writes one access-log line, and
counts in the in-flight requests that a SIGTERM drain waits for. While draining or not ready, ModelInfer and
ModelMetadata answer UNAVAILABLE. Outputs go back in `raw_output_contents`, as Triton sends them; inputs come in
`contents` or `raw_input_contents`.

Imported only when the gRPC service starts (service/app.py): its messages take the `inference.*` names in
protobuf's default pool, as tritonclient's and kserve's own do, and one process cannot hold two of them.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import struct
import time
import uuid

from google.protobuf import unknown_fields

from service import metrics
from service.api_keys import ApiKeys, Refusal, check_credentials
from service.errors import DRAINING_MESSAGE, ApiError
from service.logs import REQUEST_FIELDS, access_line
from service.oip_tensors import (
    MODEL_NAME,
    InputTensor,
    check_model,
    check_version,
    infer_outputs,
    model_metadata,
    server_metadata,
)
from service.request_context import CLIENT_CLOSED, REQUEST_CLOCK, RequestClock, new_request_id, sane_request_id
from service.state import ServiceState, StartupFailed
from service.supervisor import worker_count

# gRPC's C core writes plain-text lines to stderr, where every line is one JSON object (service/logs.py); what fails
# is logged here instead. Read once, when grpc is imported; GRPC_VERBOSITY=debug still shows them.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")
import grpc

from service.oip_proto import grpc_predict_v2_pb2 as pb
from service.oip_proto import grpc_predict_v2_pb2_grpc as pb_grpc

log = logging.getLogger("puppet.grpc")
SERVICE = "/inference.GRPCInferenceService/"
HEALTH_RPCS = ("ServerLive", "ServerReady", "ModelReady")  # logged at debug level, like HTTP health checks
CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def grpc_code(status: int) -> grpc.StatusCode:
    return CODES.get(status, grpc.StatusCode.INVALID_ARGUMENT if status < 500 else grpc.StatusCode.INTERNAL)


def _rpc(method):
    """One call's bookkeeping, as the HTTP middleware does it for a request: request id (the caller's
    `x-request-id` metadata when sane, else a fresh one; sent back in the trailing metadata), its start for the
    deadline, in-flight count, errors as gRPC status, metrics and the access-log line."""
    name = method.__name__
    route = SERVICE + name

    @functools.wraps(method)
    async def handler(self: InferenceService, request, context: grpc.aio.ServicerContext):
        start = time.perf_counter()
        # the message is in when the call begins; it waited about the loop's lag before that
        clock_token = REQUEST_CLOCK.set(RequestClock(start - self.state.loop_lag.current()))
        request_id = _request_id(context)
        fields = {"request_id": request_id, "method": "gRPC", "path": route}
        fields_token = REQUEST_FIELDS.set(fields)
        status = 200
        self.state.in_flight += 1
        metrics.IN_FLIGHT.inc()
        trailing = (("x-request-id", request_id),)
        context.set_trailing_metadata(trailing)
        try:
            if self.state.api_keys is not None and name not in HEALTH_RPCS:
                fields["key_name"] = _key_name(self.state.api_keys, context)
            return await method(self, request, context)
        except ApiError as e:
            status = e.status
            fields["error"] = e.code
            if "X-Error-Id" in e.headers:
                fields["error_id"] = e.headers["X-Error-Id"]
            trailing += tuple((k.lower(), v) for k, v in e.headers.items())  # retry-after, x-error-id
            await context.abort(grpc_code(e.status), e.message, trailing_metadata=trailing)
        except asyncio.CancelledError:
            status, fields["error"] = CLIENT_CLOSED, "client_closed"
            raise
        except Exception as exc:  # a bug, not bad input: logged under an id the caller can quote
            status = 500
            fields.update(error="internal", error_id=uuid.uuid4().hex[:12])
            log.error("unhandled error in %s (error id %s)", route, fields["error_id"], exc_info=exc)
            await context.abort(
                grpc.StatusCode.INTERNAL,
                f"internal error (error id {fields['error_id']}); it is logged",
                trailing_metadata=(*trailing, ("x-error-id", fields["error_id"])),
            )
        finally:
            self.state.in_flight -= 1
            metrics.IN_FLIGHT.dec()
            REQUEST_FIELDS.reset(fields_token)
            REQUEST_CLOCK.reset(clock_token)
            duration = time.perf_counter() - start
            metrics.REQUESTS.labels(route, str(status)).inc()
            metrics.REQUEST_DURATION.labels(route).observe(duration)
            code = "CANCELLED" if status == CLIENT_CLOSED else "OK" if status == 200 else grpc_code(status).name
            fields.update(route=route, status=status, grpc_code=code, duration_ms=round(duration * 1000, 3))
            if peer := context.peer():  # ipv4:127.0.0.1:5432, ipv6:[::1]:5432
                fields["client"] = peer.partition(":")[2].rpartition(":")[0].strip("[]")
            access_line(fields, quiet=name in HEALTH_RPCS)

    return handler


def _key_name(keys: ApiKeys, context: grpc.aio.ServicerContext) -> str:
    """The name of the call's API key (`authorization` metadata: Bearer <key>), or ApiError 401 (UNAUTHENTICATED)."""
    authorization = next((v for k, v in context.invocation_metadata() or () if k == "authorization"), None)
    outcome = check_credentials(keys, authorization if isinstance(authorization, str) else None, None)
    if isinstance(outcome, Refusal):
        metrics.AUTH_FAILURES.labels(outcome.reason).inc()
        raise ApiError(401, "unauthorized", outcome.message)
    return outcome


def _request_id(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id":
            if isinstance(value, str) and value.isascii() and sane_request_id(value.encode()):
                return value
            break
    return new_request_id()


def _value(parameter: pb.InferParameter):
    """A parameter's value. Triton's clients also send double_param (field 4) and uint64_param (5), which KServe's
    proto lacks: read from the unknown fields, `depth` 2.7 is refused as over HTTP rather than ignored."""
    kind = parameter.WhichOneof("parameter_choice")
    if kind is not None:
        return getattr(parameter, kind)
    for f in unknown_fields.UnknownFieldSet(parameter):
        if f.field_number == 4 and f.wire_type == 1:  # fixed64
            return struct.unpack("<d", f.data.to_bytes(8, "little"))[0]
        if f.field_number == 5 and f.wire_type == 0:  # varint
            return f.data
    return None


def _parameters(parameters) -> dict:
    return {key: _value(value) for key, value in parameters.items()}


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, state: ServiceState):
        self.state = state

    def _require_serving(self) -> None:
        """What the HTTP side refuses before a route runs: while draining (the middleware), or not loaded."""
        s = self.state
        if s.draining:
            metrics.REJECTIONS.labels("draining").inc()
            raise ApiError(503, "draining", DRAINING_MESSAGE, {"Retry-After": "1"})
        if not s.ready or s.batcher is None:
            message = "the model is still loading or the service is draining"
            raise ApiError(503, "not_ready", message, {"Retry-After": "1"})

    @_rpc
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    @_rpc
    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.state.serving)

    @_rpc
    async def ModelReady(self, request, context):
        check_model(request.name)
        return pb.ModelReadyResponse(ready=self.state.serving)

    @_rpc
    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(**server_metadata())

    @_rpc
    async def ModelMetadata(self, request, context):
        self._require_serving()
        check_model(request.name)
        check_version(self.state, request.version)
        meta = model_metadata(self.state)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta["name"],
            versions=meta["versions"],
            platform=meta["platform"],
            inputs=[tensor(**t) for t in meta["inputs"]],
            outputs=[tensor(**t) for t in meta["outputs"]],
        )

    @_rpc
    async def ModelInfer(self, request, context):
        self._require_serving()
        check_model(request.model_name)
        check_version(self.state, request.model_version)
        raw = request.raw_input_contents
        if raw and len(raw) != len(request.inputs):
            raise ApiError(
                400, "invalid_input", f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs"
            )
        inputs = []
        for i, t in enumerate(request.inputs):
            if raw and t.HasField("contents"):
                raise ApiError(400, "invalid_input", f"input {t.name!r} has both contents and raw_input_contents")
            contents = t.contents.fp32_contents if t.datatype == "FP32" else t.contents.bytes_contents
            inputs.append(
                InputTensor(
                    t.name,
                    t.datatype,
                    list(t.shape),
                    _parameters(t.parameters),
                    data=None if raw else list(contents),
                    raw=raw[i] if raw else None,
                )
            )
        requested = [(o.name, _parameters(o.parameters)) for o in request.outputs]
        outputs = await infer_outputs(self.state, inputs, _parameters(request.parameters), requested or None)
        return pb.ModelInferResponse(
            model_name=MODEL_NAME,
            model_version=self.state.ckpt.version,
            id=request.id,
            outputs=[
                pb.ModelInferResponse.InferOutputTensor(name=o.name, datatype=o.datatype, shape=o.shape)
                for o in outputs
            ],
            raw_output_contents=[o.raw() for o in outputs],
        )


async def start_grpc_server(state: ServiceState) -> grpc.aio.Server:
    """Listening once this returns; StartupFailed when the port cannot be had. With several worker processes each
    binds its own socket on the port (SO_REUSEPORT, as their HTTP sockets); alone, a port in use is an error."""
    s = state.settings
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", s.max_upload_bytes),
            ("grpc.so_reuseport", 1 if worker_count(s) > 1 else 0),
        ]
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(state), server)
    address = f"[{s.host}]:{s.grpc_port}" if ":" in s.host else f"{s.host}:{s.grpc_port}"
    try:
        server.add_insecure_port(address)
    except RuntimeError as e:
        log.critical("cannot start: cannot listen for gRPC on %s: %s", address, e)
        raise StartupFailed(f"cannot listen for gRPC on {address}") from None
    await server.start()
    log.info("Open Inference Protocol gRPC service on %s", address)
    return server
