"""Prometheus metrics, created once at import (base units, `_total` counters, bounded labels).

Label values are bounded: routes are templates, depths 1..D_max, reasons from a fixed set. With several worker
processes, values live in PROMETHEUS_MULTIPROC_DIR and gauges say how workers combine (sum, min, max).
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

# request latencies: from a lone request's milliseconds to the seconds of overload (docs/benchmarks.md)
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
FAST_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
COMPLEXITY_BUCKETS = (0.0, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5, 6.0, 6.5, 7.0, 7.5, 8.0)

REQUESTS = Counter(
    "puppet_requests_total",
    "requests by route (HTTP route template or gRPC method) and HTTP status (for gRPC, the one its code stands for)",
    ["route", "status"],
)
REQUEST_DURATION = Histogram(
    "puppet_request_duration_seconds", "request duration (HTTP and gRPC)", ["route"], buckets=LATENCY_BUCKETS
)
QUEUE_WAIT = Histogram("puppet_queue_wait_seconds", "time an image waited for the worker", buckets=LATENCY_BUCKETS)
PREPROCESS = Histogram(
    "puppet_preprocess_seconds", "decode, convert and resize of one request's images", buckets=FAST_BUCKETS
)
INFERENCE = Histogram(
    "puppet_inference_seconds",
    "one model call: torch runs a batch at once (labelled by its deepest depth), onnx one call per depth",
    ["depth"],
    buckets=LATENCY_BUCKETS,
)
DEPTH_CHOSEN = Counter(
    "puppet_depth_chosen_total",
    "model passes, by depth, why that depth (the router's name, requested, capped, degraded) and which pass: first, "
    "or second (an image the cascade router escalated, counted at both of its depths)",
    ["depth", "reason", "pass"],
)
ESCALATIONS = Counter(
    "puppet_escalations_total", "images that ran a second, deeper pass (the cascade router)", ["from_depth", "to_depth"]
)
IMAGE_DEPTH = Histogram(
    "puppet_image_depth",
    "depth run for each image, both passes of an escalated image summed: its compute in blocks per stage (mean "
    "depth = rate of _sum / rate of _count)",
    buckets=(1, 2, 3, 4, 5, 6, 7, 8),
)
MAX_DEPTH = Gauge("puppet_max_depth", "deepest depth the loaded model offers", multiprocess_mode="livemax")
COMPLEXITY = Histogram(
    "puppet_complexity_bits", "input complexity H(x) of classified images", buckets=COMPLEXITY_BUCKETS
)
BATCH_SIZE = Histogram("puppet_batch_size_images", "images per worker batch", buckets=BATCH_BUCKETS)
QUEUE_LENGTH = Gauge("puppet_queue_length_images", "images waiting for the worker", multiprocess_mode="livesum")
IN_FLIGHT = Gauge("puppet_in_flight_requests", "requests being handled (HTTP and gRPC)", multiprocess_mode="livesum")
REJECTIONS = Counter("puppet_rejections_total", "requests refused before inference, by reason", ["reason"])
KERNEL_GENERATION = Histogram(
    "puppet_kernel_generation_seconds", "generating every depth's kernels", buckets=FAST_BUCKETS
)
MODEL_INFO = Gauge(
    "puppet_model_info",
    "the loaded model (value 1)",
    ["version", "backend", "provider", "device", "max_depth", "sha256"],
    multiprocess_mode="livemax",
)
ROUTER_INFO = Gauge(
    "puppet_router_info",
    "the depth router serving (value 1): its name and budget (a fraction of max depth's MACs)",
    ["router", "budget"],
    multiprocess_mode="livemax",
)
READY = Gauge("puppet_ready", "1 when loaded, warm and not draining", multiprocess_mode="livemin")
LOAD_SECONDS = Gauge("puppet_model_load_seconds", "checkpoint load time at start-up", multiprocess_mode="livemax")
WARMUP_SECONDS = Gauge("puppet_warmup_seconds", "warm-up time of every depth at start-up", multiprocess_mode="livemax")
DEVICE_MEMORY = Gauge(
    "puppet_device_memory_bytes",
    "GPU memory allocated by the worker (CUDA only)",
    ["device"],
    multiprocess_mode="livesum",
)
WORKER_RESTARTS = Counter("puppet_worker_restarts_total", "inference worker restarts after a crash")
AUTH_FAILURES = Counter(
    "puppet_auth_failures_total",
    "requests and calls refused for their API key (missing, malformed, invalid)",
    ["reason"],
)


def exposition() -> bytes:
    """The text format: this process's metrics, or every worker's summed when several serve (supervisor.py)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest()
