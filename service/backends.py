"""Inference backends: tensors in, tensors out, no HTTP. The worker owns one and calls it from one thread.

`Backend` is the interface the service holds; the torch and onnx backends are peers that implement it.
"""

from __future__ import annotations

import time
from typing import Protocol

import numpy as np
import torch

from model import Checkpoint, Preprocessing, complexity


class Backend(Protocol):
    """What the inference worker (service/batcher.py) and the loader (service/state.py) need of a backend.

    Images come as uint8 levels (decoded uploads), which the backend normalises on its device, or as float32
    already normalised with the checkpoint's mean and std (the Open Inference Protocol's FP32 input)."""

    name: str  # "torch" or "onnx"
    provider: str  # what actually runs: torch-cpu, torch-cuda, or the onnxruntime execution provider
    device: torch.device
    kernel_cache: bool  # false: `generate_kernels` must run before every batch

    def generate_kernels(self) -> float:
        """(Re)generate every depth's kernels; the seconds it took."""
        ...

    def complexity(self, images: torch.Tensor) -> torch.Tensor:
        """H per image (model/complexity.py), from uint8 levels or intensities in [0, 1]."""
        ...

    def predict(self, images: torch.Tensor, depths: torch.Tensor) -> tuple[torch.Tensor, dict[int, float]]:
        """Softmax probabilities (N, K), float32 on the CPU, at per-image depths (N,), and the model time by
        depth."""
        ...

    def warmup(self, batch_sizes: tuple[int, ...] = (1, 8)) -> float:
        """Run every depth once per batch size so the first request pays no one-off cost; the seconds it took."""
        ...

    def device_memory_bytes(self) -> int | None:
        """Memory held on the accelerator; None on the CPU."""
        ...


def model_input(pre: Preprocessing, images: torch.Tensor) -> torch.Tensor:
    """The model's input: uint8 levels normalised, float32 taken as already normalised."""
    return pre.normalise(images) if images.dtype == torch.uint8 else images.float()


def _warmup(backend: Backend, pre: Preprocessing, max_depth: int, batch_sizes: tuple[int, ...]) -> float:
    t0 = time.perf_counter()
    for n in batch_sizes:
        images = torch.zeros(n, pre.channels, pre.image_size, pre.image_size, dtype=torch.uint8)
        for d in range(1, max_depth + 1):
            backend.predict(images, torch.full((n,), d))
    return time.perf_counter() - t0


def _device_memory_bytes(device: torch.device) -> int | None:
    return int(torch.cuda.memory_allocated(device)) if device.type == "cuda" else None


class TorchBackend:
    """Runs the puppet with PyTorch on one device; images of one depth go through together.

    Args:
        ckpt: the loaded checkpoint (its model is moved to `device`).
        device: where the model runs.
        kernel_cache: generate every depth's kernels once; if false, the worker regenerates them for every
            batch (`generate_kernels`), which measures what the cache saves.
    """

    name = "torch"

    def __init__(self, ckpt: Checkpoint, device: torch.device, *, kernel_cache: bool = True):
        self.ckpt, self.device, self.kernel_cache = ckpt, device, kernel_cache
        self.model = ckpt.model.to(device).eval()
        self.max_depth = ckpt.config.max_depth
        self.provider = f"torch-{device.type}"

    def generate_kernels(self) -> float:
        t0 = time.perf_counter()
        self.model.cache_kernels()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    def complexity(self, images: torch.Tensor) -> torch.Tensor:
        return complexity(images)

    @torch.inference_mode()
    def predict(self, images: torch.Tensor, depths: torch.Tensor) -> tuple[torch.Tensor, dict[int, float]]:
        """In one model call: mixed depths run with per-sample exit (each block only on the images that reach
        it), which measured faster than one call per depth group (docs/benchmarks.md). The time is reported
        under the batch's deepest depth. uint8 images cross to the device before they are normalised (a quarter
        of the bytes)."""
        t0 = time.perf_counter()
        x = model_input(self.ckpt.preprocessing, images.to(self.device, non_blocking=True))
        d = depths.to(self.device)
        probs = torch.softmax(self.model(x, d).float(), dim=-1).cpu()
        return probs, {int(depths.max()): time.perf_counter() - t0}

    def warmup(self, batch_sizes: tuple[int, ...] = (1, 8)) -> float:
        return _warmup(self, self.ckpt.preprocessing, self.max_depth, batch_sizes)

    def device_memory_bytes(self) -> int | None:
        return _device_memory_bytes(self.device)


PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def choose_providers(device: torch.device, wanted: tuple[str, ...] = PROVIDER_ORDER) -> list[str]:
    """onnxruntime providers in order of preference, kept to those this install has (CPU always last)."""
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    chosen = [p for p in wanted if p in available and (device.type == "cuda" or p == "CPUExecutionProvider")]
    return chosen or ["CPUExecutionProvider"]


class OnnxBackend:
    """ONNX Runtime, one InferenceSession per depth with that depth's kernels folded in.

    Complexity and normalisation stay in torch (cheap, and identical across backends); only the puppet runs
    in onnxruntime. On CUDA, inputs and outputs are bound to device buffers (I/O binding).
    """

    name = "onnx"
    kernel_cache = True  # every depth's kernels are folded into its graph at export

    def __init__(
        self,
        ckpt: Checkpoint,
        device: torch.device,
        onnx_files: dict[int, object],
        *,
        threads: int = 1,
        providers: tuple[str, ...] = PROVIDER_ORDER,
        trt_fp16: bool = False,
        trt_cache_dir: str | None = None,
    ):
        import onnxruntime as ort

        self.ckpt = ckpt
        self.device = torch.device("cpu") if device.type != "cuda" else device
        self.max_depth = ckpt.config.max_depth
        self.providers = choose_providers(device, providers)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        provider_options = []
        for p in self.providers:
            if p == "TensorrtExecutionProvider":
                trt = {"device_id": device.index or 0, "trt_fp16_enable": trt_fp16}
                if trt_cache_dir:
                    trt |= {"trt_engine_cache_enable": True, "trt_engine_cache_path": trt_cache_dir}
                provider_options.append(trt)
            elif p == "CUDAExecutionProvider":
                provider_options.append({"device_id": device.index or 0})
            else:
                provider_options.append({})
        self.sessions = {
            d: ort.InferenceSession(str(path), options, providers=self.providers, provider_options=provider_options)
            for d, path in onnx_files.items()
        }
        # what actually runs: onnxruntime drops providers that fail to initialise
        self.provider = self.sessions[1].get_providers()[0]
        self.io_binding = self.provider != "CPUExecutionProvider"

    def _run(self, depth: int, x: torch.Tensor) -> torch.Tensor:
        session = self.sessions[depth]
        if not self.io_binding:
            return torch.from_numpy(session.run(None, {"input": x.cpu().numpy()})[0])
        # Device buffers shared with torch: no round trip through host memory between the two libraries.
        x = x.to(self.device).contiguous()
        out = torch.empty(x.shape[0], self.ckpt.config.num_classes, device=self.device)
        binding = session.io_binding()
        index = self.device.index or 0
        binding.bind_input("input", "cuda", index, np.float32, tuple(x.shape), x.data_ptr())
        binding.bind_output("logits", "cuda", index, np.float32, tuple(out.shape), out.data_ptr())
        session.run_with_iobinding(binding)
        return out

    @torch.inference_mode()
    def predict(self, images: torch.Tensor, depths: torch.Tensor) -> tuple[torch.Tensor, dict[int, float]]:
        probs = torch.empty(len(images), self.ckpt.config.num_classes)
        seconds: dict[int, float] = {}
        for d in torch.unique(depths).tolist():
            idx = (depths == d).nonzero().squeeze(1)
            t0 = time.perf_counter()
            x = model_input(self.ckpt.preprocessing, images[idx])
            probs[idx] = torch.softmax(self._run(int(d), x).float(), dim=-1).cpu()
            seconds[int(d)] = time.perf_counter() - t0
        return probs, seconds

    def generate_kernels(self) -> float:
        """Nothing to generate: the export folded every depth's kernels into its graph."""
        return 0.0

    def complexity(self, images: torch.Tensor) -> torch.Tensor:
        return complexity(images)

    def warmup(self, batch_sizes: tuple[int, ...] = (1, 8)) -> float:
        return _warmup(self, self.ckpt.preprocessing, self.max_depth, batch_sizes)

    def device_memory_bytes(self) -> int | None:
        return _device_memory_bytes(self.device)
