"""The loaded service: what one process serves (checkpoint, backend, batcher) and whether it is ready.

`load_service` fills a `ServiceState` in the app's lifespan (service/app.py): checkpoint onto the device, the depth
router chosen from its catalog, kernels generated and cached, every depth warmed, admission's costs measured, the
inference worker started.
"""

from __future__ import annotations

import gc
import logging
import math
import time
from dataclasses import dataclass, field

import torch

from model import Checkpoint, load_checkpoint, resolve_device
from model.onnx_export import ensure_export, verified_export
from model.routers import Router
from service import metrics
from service.api_keys import ApiKeys
from service.backends import Backend, OnnxBackend, TorchBackend
from service.batcher import Batcher
from service.loop_lag import LoopLag
from service.settings import Settings

log = logging.getLogger("puppet.service")


class StartupFailed(Exception):
    """The model could not be loaded; the process exits without ever reporting ready."""


@dataclass
class ServiceState:
    """What the routes need; lives on app.state.service once the lifespan has loaded the model."""

    settings: Settings
    ckpt: Checkpoint | None = None
    router: Router | None = None
    router_budget: float = 1.0  # the budget that chose the router's operating point
    backend: Backend | None = None
    batcher: Batcher | None = None
    ready: bool = False  # loaded and warm; false again once shutdown begins
    draining: bool = False
    worker_up: bool = True
    in_flight: int = 0
    loop_lag: LoopLag = field(default_factory=LoopLag)  # sampled on the serving event loop (service/app.py)
    api_keys: ApiKeys | None = None  # None: no key is required (service/api_keys.py)

    @property
    def serving(self) -> bool:
        """The one definition of ready, for every probe (/health/ready, /v2 readiness, gRPC) and the
        `puppet_ready` gauge: loaded and warm, the inference worker running, not draining."""
        return self.ready and self.worker_up and not self.draining and self.batcher is not None and self.batcher.alive

    @property
    def loaded(self) -> bool:
        """A route that needs the model can run (service/deps.py). Weaker than `serving` on purpose: while the
        inference worker restarts or the process drains, the batcher's own refusal says so, with a retry time."""
        return self.ready and self.batcher is not None

    def set_ready(self, value: bool) -> None:
        self.ready = value
        self._publish()

    def worker_changed(self, up: bool) -> None:
        """From the batcher's supervisor: the inference worker died (False) or runs again (True)."""
        self.worker_up = up
        self._publish()

    def _publish(self) -> None:
        metrics.READY.set(1 if self.serving else 0)


def backend_name(s: Settings, device: torch.device) -> str:
    """`auto` is onnxruntime on the CPU, where it measured faster (docs/benchmarks.md), and torch on a GPU, or
    where the kernel cache is off (a measurement of what regenerating torch's kernels per batch costs)."""
    if s.backend != "auto":
        return s.backend
    return "torch" if device.type == "cuda" or not s.kernel_cache else "onnx"


def make_backend(s: Settings, ckpt: Checkpoint, device: torch.device) -> Backend:
    if backend_name(s, device) == "torch":
        return TorchBackend(ckpt, device, kernel_cache=s.kernel_cache)
    if s.onnx_dir is not None:  # supplied pre-built: serve it only if it matches this checkpoint
        files = verified_export(ckpt, s.onnx_dir)
    else:  # made here on first start, reused while the checkpoint is unchanged
        files = ensure_export(ckpt, s.onnx_cache_dir / ckpt.sha256[:16])
    return OnnxBackend(
        ckpt,
        device,
        files,
        threads=s.torch_threads,
        providers=tuple(p.strip() for p in s.onnx_providers.split(",") if p.strip()),
        trt_fp16=s.onnx_trt_fp16,
        trt_cache_dir=str(s.onnx_trt_cache_dir) if s.onnx_trt_cache_dir else None,
    )


def make_router(s: Settings, ckpt: Checkpoint) -> tuple[Router, float]:
    """The router PUPPET_ROUTER names (empty: the catalog's default) at the operating point PUPPET_ROUTER_BUDGET
    picks (unset: the catalog's default budget), and that budget. A router the checkpoint does not offer fails
    the start-up, never a request."""
    catalog = ckpt.catalog
    name = s.router or catalog.default_router
    budget = catalog.default_budget if s.router_budget is None else s.router_budget
    if name not in catalog.names:
        raise StartupFailed(
            f"router {name!r} (PUPPET_ROUTER) is not calibrated in checkpoint {ckpt.path}; it offers "
            f"{', '.join(catalog.names)}"
        )
    point = catalog.point(name, budget)
    macs_max = catalog.macs_by_depth[-1]
    if point["val_macs"] > budget * macs_max * (1 + 1e-9):
        log.warning(
            "no %s point costs %g of max depth's MACs or less; serving its cheapest, %.3f on validation",
            name,
            budget,
            point["val_macs"] / macs_max,
        )
    router = catalog.build(name, point)
    if router.max_depth != ckpt.config.max_depth:
        raise StartupFailed(
            f"checkpoint {ckpt.path}: its {name} router routes to {router.max_depth} depths, the model has "
            f"{ckpt.config.max_depth}"
        )
    return router, budget


def load_service(state: ServiceState) -> None:
    """Load the checkpoint onto the worker's device, cache kernels, warm every depth, start the worker."""
    s = state.settings
    torch.set_num_threads(s.torch_threads)
    t0 = time.perf_counter()
    device = resolve_device(s.device)
    ckpt = load_checkpoint(s.checkpoint, device)
    router, budget = make_router(s, ckpt)
    metrics.LOAD_SECONDS.set(time.perf_counter() - t0)
    backend = make_backend(s, ckpt, device)
    metrics.KERNEL_GENERATION.observe(backend.generate_kernels())
    metrics.WARMUP_SECONDS.set(backend.warmup(batch_sizes=(1, min(8, s.max_batch_size), s.max_batch_size)))
    metrics.MODEL_INFO.labels(
        ckpt.version, backend.name, backend.provider, str(device), str(ckpt.config.max_depth), ckpt.sha256[:12]
    ).set(1)
    metrics.MAX_DEPTH.set(ckpt.config.max_depth)
    metrics.ROUTER_INFO.labels(router.name, f"{budget:g}").set(1)
    if (mem := backend.device_memory_bytes()) is not None:
        metrics.DEVICE_MEMORY.labels(str(device)).set(mem)
    batcher = Batcher(
        backend,
        ckpt.policy,
        ckpt.preprocessing,
        router=router,
        max_batch_size=s.max_batch_size,
        max_queue=s.max_queue,
        deadline_s=s.request_deadline_ms / 1000,
        max_queue_delay_s=s.max_queue_delay_ms / 1000,
        degrade_under_load=s.degrade_under_load,
        degrade_depth=s.degrade_depth,
        restart_backoff_s=s.worker_restart_backoff_s,
        on_worker_change=state.worker_changed,
    )
    batcher.calibrate()
    batcher.start()
    state.ckpt, state.backend, state.batcher = ckpt, backend, batcher
    state.router, state.router_budget = router, budget
    gc.collect()
    gc.freeze()  # the model's objects never die: keep the collector from walking them on every pause
    log.info(
        "model %s loaded on %s in %.2f s, routing with %s at budget %g; ready",
        ckpt.version,
        device,
        time.perf_counter() - t0,
        router.name,
        budget,
    )


def model_info(state: ServiceState) -> dict:
    """The loaded model as /v1/model and the Open Inference Protocol's metadata describe it."""
    ckpt, backend = state.ckpt, state.backend
    pre, policy = ckpt.preprocessing, ckpt.policy
    return {
        "name": "puppet-cnn",
        "version": ckpt.version,
        "classes": list(ckpt.classes),
        "preprocessing": {
            "input_size": [pre.image_size, pre.image_size],
            "channels": pre.channels,
            "mean": list(pre.mean),
            "std": list(pre.std),
        },
        "depths": list(range(1, ckpt.config.max_depth + 1)),
        "max_depth": ckpt.config.max_depth,
        "depth_table": {"edges": list(policy.edges), "depths": list(policy.depths), "tolerance": policy.tolerance},
        "router": router_info(state),
        "stored_parameters": ckpt.model.stored_parameters(),
        "backend": backend.name,
        "provider": backend.provider,
        "device": str(backend.device),
        "checkpoint_sha256": ckpt.sha256,
        "dataset": ckpt.dataset,
    }


def router_info(state: ServiceState) -> dict:
    """The router serving, its operating point's settings and validation figures, and the routers on offer.
    Validation figures are null for a checkpoint without calibrated routers (its entropy table was not measured
    as an operating point)."""
    ckpt, router = state.ckpt, state.router
    catalog = ckpt.catalog
    point = catalog.point(router.name, state.router_budget)

    def measured(key: str) -> float | None:
        value = point.get(key)
        return None if ckpt.routers is None or value is None or not math.isfinite(value) else float(value)

    return {
        "name": router.name,
        "budget": state.router_budget,
        "settings": router.settings(),
        "val_accuracy": measured("val_accuracy"),
        "val_macs": measured("val_macs"),
        "available": list(catalog.names),
        "default": catalog.default_router,
    }
