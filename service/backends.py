"""Inference backends: tensors in, tensors out, no HTTP. The worker owns one and calls it from one thread."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from model import Checkpoint, complexity


@dataclass
class BatchOutput:
    probabilities: torch.Tensor  # (N, K) float32, CPU
    complexity: torch.Tensor  # (N,) float32
    seconds_by_depth: dict[int, float]  # model time of each depth group


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for, but CUDA is not available on this machine")
    return device


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
        """(Re)generate and cache every depth's kernels; returns the seconds it took."""
        t0 = time.perf_counter()
        self.model.cache_kernels()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    @torch.inference_mode()
    def complexity(self, images: torch.Tensor) -> torch.Tensor:
        return complexity(images)

    @torch.inference_mode()
    def predict(self, images: torch.Tensor, depths: torch.Tensor) -> tuple[torch.Tensor, dict[int, float]]:
        """Softmax probabilities for images (N, C, H, W) at per-image depths (N,), in one model call.

        Mixed depths run with per-sample exit (each block only on the images that reach it), which measured
        faster than one call per depth group (34 against 42 ms for 32 images of depths 1-4, 2-core CPU).
        The time is reported under the batch's deepest depth.
        """
        t0 = time.perf_counter()
        x = self.ckpt.preprocessing.normalise(images.to(self.device, non_blocking=True))
        d = depths.to(self.device)
        probs = torch.softmax(self.model(x, d).float(), dim=-1).cpu()
        return probs, {int(depths.max()): time.perf_counter() - t0}

    def warmup(self, batch_sizes: tuple[int, ...] = (1, 8)) -> float:
        """Run every depth once per batch size so the first request pays no one-off cost."""
        t0 = time.perf_counter()
        pre = self.ckpt.preprocessing
        for n in batch_sizes:
            images = torch.zeros(n, pre.channels, pre.image_size, pre.image_size, dtype=torch.uint8)
            for d in range(1, self.max_depth + 1):
                self.predict(images, torch.full((n,), d))
        return time.perf_counter() - t0

    def device_memory_bytes(self) -> int | None:
        if self.device.type != "cuda":
            return None
        return int(torch.cuda.memory_allocated(self.device))


PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def choose_providers(device: torch.device, wanted: tuple[str, ...] = PROVIDER_ORDER) -> list[str]:
    """onnxruntime providers in order of preference, kept to those this install has (CPU always last)."""
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    chosen = [p for p in wanted if p in available and (device.type == "cuda" or p == "CPUExecutionProvider")]
    return chosen or ["CPUExecutionProvider"]


class OnnxBackend(TorchBackend):
    """ONNX Runtime, one InferenceSession per depth with that depth's kernels folded in.

    Complexity and normalisation stay in torch (cheap, and identical across backends); only the puppet runs
    in onnxruntime. On CUDA, inputs and outputs are bound to device buffers (I/O binding).
    """

    name = "onnx"

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

        super().__init__(ckpt, torch.device("cpu") if device.type != "cuda" else device, kernel_cache=True)
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
            x = self.ckpt.preprocessing.normalise(images[idx])
            probs[idx] = torch.softmax(self._run(int(d), x).float(), dim=-1).cpu()
            seconds[int(d)] = time.perf_counter() - t0
        return probs, seconds
