"""Serving settings, read from PUPPET_* environment variables and validated at start-up.

Architecture, class names, preprocessing and the depth table are not here: they travel in the checkpoint.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from model import SHIPPED_CHECKPOINT, CheckpointError, read_metadata  # the shipped model: model/checkpoint.py
from model.routers import RouterCatalog


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PUPPET_", extra="forbid")

    checkpoint: Path = Field(SHIPPED_CHECKPOINT, description="model checkpoint (.safetensors)")
    device: str = Field("auto", description="auto (CUDA when available, else CPU), cpu, cuda, cuda:N")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    grpc_port: int = Field(
        8001,
        ge=0,
        le=65535,
        description="the Open Inference Protocol's gRPC service (inference.GRPCInferenceService; 8001 as Triton's); 0 = off",
    )
    backend: Literal["auto", "torch", "onnx"] = Field(
        "auto",
        description="auto (onnx on the CPU, where it served more requests than torch, docs/benchmarks.md; torch on a "
        "GPU), torch, or onnx (onnxruntime, one graph per depth)",
    )
    onnx_dir: Path | None = Field(
        None, description="a pre-built export (puppet-cnn export-onnx); refused if stale or corrupt"
    )
    onnx_cache_dir: Path = Field(
        Path(tempfile.gettempdir()) / "puppet-cnn-onnx",
        description="where exports made at start-up are cached, per checkpoint hash",
    )
    onnx_providers: str = Field(
        "TensorrtExecutionProvider,CUDAExecutionProvider,CPUExecutionProvider",
        description="preference order; unavailable ones are skipped",
    )
    onnx_trt_fp16: bool = Field(False, description="TensorRT: build FP16 engines")
    onnx_trt_cache_dir: Path | None = Field(None, description="TensorRT: engine cache directory")
    max_batch_size: int = Field(32, ge=1, le=4096, description="images per model call")
    max_queue_delay_ms: float = Field(0.0, ge=0, le=1000, description="how long a partial batch may wait for more")
    max_queue: int = Field(256, ge=1, description="images waiting at most; more get 429")
    request_deadline_ms: float = Field(
        2000.0, gt=0, description="admitted only if it can finish by then (else 429); one that cannot even alone: 504"
    )
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    max_pixels: int = Field(
        16_000_000,
        ge=1,
        description=(
            "width x height of one image, read from its header before anything is decoded (413 over it). The "
            "model sees 28x28, so pixels beyond a photo's buy nothing: 16 M takes any 12 MP phone photo "
            "(4032x3024 = 12.2 M) or 16 MP camera's, and bounds one decode's time and memory in the worst shape "
            "and format (docs/operations.md)"
        ),
    )
    max_request_pixels: int = Field(
        25_000_000,
        ge=1,
        description=(
            "the sum of width x height over one request's images, checked from all their headers before any is "
            "decoded (413): two 12 MP photos, or 64 images of 600x600; one request's decoding stays well inside "
            "its deadline (docs/operations.md)"
        ),
    )
    max_concurrent_decodes: int = Field(
        2,
        ge=1,
        le=64,
        description=(
            "per worker process, images too large to decode on the event loop are decoded in this many threads "
            "(at a lower CPU priority); more wait their turn. Bounds decoding memory: this many decodes at "
            "the pixel limit at once (docs/operations.md)"
        ),
    )
    max_images_per_request: int = Field(64, ge=1)
    default_top_k: int = Field(5, ge=1)
    kernel_cache: bool = Field(True, description="generate kernels once; off regenerates them per batch")
    degrade_under_load: bool = Field(True, description="cap the depth instead of missing the deadline")
    degrade_depth: int = Field(1, ge=1, description="the depth cap applied under load")
    router: Literal["", "entropy", "learned", "cascade"] = Field(
        "",
        description="which router picks each image's depth: entropy (the complexity table), learned (a tiny net), or "
        "cascade (a shallow pass, then a deeper one for unsure images); empty: the checkpoint's default. It must be "
        "calibrated in the checkpoint",
    )
    router_budget: float | None = Field(
        None,
        gt=0,
        le=1,
        description="the router's operating point: the most accurate one whose validation cost is at most this "
        "fraction of max depth's MACs, in (0, 1]; unset or empty: the checkpoint's default",
    )
    workers: int = Field(
        0, ge=0, le=64, description="serving processes; 0 = auto: one per CPU core on the CPU, one on a GPU"
    )
    torch_threads: int = Field(1, ge=1, description="intra-op threads of each inference worker")
    worker_restart_backoff_s: float = Field(
        1.0,
        ge=0,
        le=30,
        description="a crashed inference worker restarts after this (doubling while it keeps crashing)",
    )
    drain_timeout_s: float = Field(20.0, ge=0, description="SIGTERM: how long in-flight requests may finish")
    read_timeout_s: float = Field(
        10.0,
        gt=0,
        le=300,
        description="a request's head must arrive within this, and its body may pause no longer than this between "
        "two reads (else 408 and the connection closes); a body that takes longer than this must also keep "
        "min_upload_rate",
    )
    min_upload_rate: float = Field(
        16384.0,
        ge=0,
        description="bytes/s that a body taking longer than read_timeout_s must average over the last "
        "upload_rate_window_s (else 408 upload_too_slow); 0: no minimum, only the pause limit",
    )
    upload_rate_window_s: float = Field(
        10.0, gt=0, le=300, description="the window over which min_upload_rate is averaged"
    )
    api_keys_file: Path | None = Field(
        None,
        description="a file of API keys, one per line with an optional name after it: when set, every inference "
        "route (HTTP and gRPC) requires one of them; read again when it changes or on SIGHUP (docs/operations.md, "
        "Security)",
    )
    metrics_require_key: bool = Field(
        False, description="with API keys on, /metrics requires a key too (default: open, for Prometheus to scrape)"
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "text"] = Field("json", description="json: one object per line; text: for a terminal")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v != "auto" and v != "cpu" and not v.startswith("cuda"):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {v!r}")
        return v

    @field_validator("router_budget", "api_keys_file", mode="before")
    @classmethod
    def _empty_is_unset(cls, v):
        return None if isinstance(v, str) and not v.strip() else v

    @model_validator(mode="after")
    def _pixel_limits(self) -> Settings:
        if self.max_request_pixels < self.max_pixels:
            raise ValueError(
                f"max_request_pixels ({self.max_request_pixels:,}) must be at least max_pixels ({self.max_pixels:,})"
            )
        return self

    @model_validator(mode="after")
    def _kernel_cache_is_torchs(self) -> Settings:
        if not self.kernel_cache and self.backend == "onnx":
            raise ValueError(
                "kernel_cache=false regenerates torch's kernels per batch; the onnx backend has them folded in its graphs"
            )
        return self

    @model_validator(mode="after")
    def _a_port_each(self) -> Settings:
        if self.grpc_port and self.grpc_port == self.port:
            raise ValueError(f"port and grpc_port are both {self.port}: HTTP and gRPC need one each (grpc_port 0: off)")
        return self

    @model_validator(mode="after")
    def _checkpoint_exists(self) -> Settings:
        if not self.checkpoint.is_file():
            raise ValueError(f"checkpoint {self.checkpoint} does not exist (PUPPET_CHECKPOINT)")
        self._router_is_calibrated()
        if self.max_queue < self.max_batch_size:
            raise ValueError(f"max_queue ({self.max_queue}) must be at least max_batch_size ({self.max_batch_size})")
        return self

    def _router_is_calibrated(self) -> None:
        """A router the checkpoint does not offer is refused here, from its header alone (no weights loaded). A
        checkpoint without calibrated routers offers the entropy router on its depth table."""
        if not self.router:
            return
        try:
            meta = read_metadata(self.checkpoint)
            names = RouterCatalog.from_dict(meta["routers"]).names if "routers" in meta else ("entropy",)
        except (CheckpointError, KeyError, TypeError, ValueError):
            return  # an unreadable checkpoint is refused when it is loaded, with the reason
        if self.router not in names:
            raise ValueError(
                f"router {self.router!r} (PUPPET_ROUTER) is not calibrated in checkpoint {self.checkpoint}; it offers "
                f"{', '.join(names)} (empty: its default)"
            )
