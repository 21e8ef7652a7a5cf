"""A formed batch through the model: depths, the cascade's second pass, and each image's ranked answer.

No thread, no queue, no metric: `first_pass` takes the batch's requests and the backend, and what it returns
answers the requests with nothing to run again (`answers`) before `second_pass` runs the rest.

Depths come from the checkpoint's router (model/routers.py): `router.first` gives every image's depth before any
pass, and `DepthPolicy.choose` applies the request's depth, the degrade depth and the caller's cap. An image
whose depth the router chose (its reason is the router's name) is then offered to `router.escalate` with its
first pass's probabilities; a second depth, capped by the same rule, that is deeper than the first runs in one
second model call for all such images of the batch, and its probabilities are the answer (only the cascade
escalates).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from model import AUTO, DepthPolicy, Preprocessing
from model.routers import Router
from service.backends import Backend


@dataclass(frozen=True)
class Rules:
    """How the batch's depths are chosen."""

    policy: DepthPolicy
    router: Router
    preprocessing: Preprocessing
    degrade_depth: int = 1

    def reason(self, reason: str) -> str:
        """DepthPolicy.choose's reason, with the automatic one named by the router that decided."""
        return self.router.name if reason == AUTO else reason


@dataclass(frozen=True)
class Request:
    """What answering needs of one request: its images and the limits on their depth."""

    images: torch.Tensor  # (n, C, H, W): uint8 levels, or float32 normalised (the OIP's FP32 input)
    depth: int | None = None  # requested
    max_depth: int | None = None  # the caller's cap
    degraded: bool = False  # admitted at the degrade depth


@dataclass
class ImageResult:
    probabilities: torch.Tensor  # (K,)
    ranked: list[tuple[int, float]]  # (class id, probability), most probable first
    depth: int  # the depth of the answer: the second pass's when the image escalated
    reason: str  # why `depth`: the router's name, requested, capped or degraded
    complexity: float
    first_depth: int  # the first pass's depth (== depth unless escalated)
    escalated: bool = False

    @property
    def depths_run(self) -> list[int]:
        return [self.first_depth, self.depth] if self.escalated else [self.depth]


@dataclass
class Routing:
    """A batch's depths, image by image: the first pass's depth and reason, the second pass's (0: none)."""

    first: list[int]
    first_reasons: list[str]
    second: list[int]
    second_reasons: list[str]

    @property
    def escalated(self) -> list[int]:
        return [i for i, d in enumerate(self.second) if d]

    def final(self, i: int) -> tuple[int, str]:
        return (self.second[i], self.second_reasons[i]) if self.second[i] else (self.first[i], self.first_reasons[i])


@dataclass
class BatchRun:
    """One batch through the model: `first_pass` makes it, `second_pass` completes it."""

    requests: list[Request]
    backend: Backend
    images: torch.Tensor  # the model's input, all requests' images in order
    routing: Routing
    complexities: list[float]
    probabilities: torch.Tensor  # the answers' so far: the second pass replaces its images' rows
    first_s: float  # complexity, routing and the first model call
    model_s: dict[int, float]  # the first model call's seconds by depth (the backend's measure)
    second_s: float = 0.0  # the second model call (0: none ran)
    second_model_s: dict[int, float] = field(default_factory=dict)

    @property
    def offsets(self) -> list[int]:
        out = [0]
        for r in self.requests:
            out.append(out[-1] + len(r.images))
        return out

    def waits_for_second_pass(self) -> list[bool]:
        """Per request: whether any of its images runs a second pass."""
        o = self.offsets
        return [any(self.routing.second[o[k] : o[k + 1]]) for k in range(len(self.requests))]

    def answers(self, chosen: list[bool]) -> dict[int, list[ImageResult]]:
        """The chosen requests' results, by request index, from the probabilities as they stand."""
        o = self.offsets
        rows = [r for k, c in enumerate(chosen) if c for r in range(o[k], o[k + 1])]
        if not rows:
            return {}
        values, classes = self.probabilities[rows].sort(dim=1, descending=True)  # once for all chosen requests
        ranked = {
            row: list(zip(c, v, strict=True)) for row, c, v in zip(rows, classes.tolist(), values.tolist(), strict=True)
        }
        return {k: [self._result(i, ranked[i]) for i in range(o[k], o[k + 1])] for k, c in enumerate(chosen) if c}

    def _result(self, i: int, ranked: list) -> ImageResult:
        depth, reason = self.routing.final(i)
        first, escalated = self.routing.first[i], bool(self.routing.second[i])
        return ImageResult(self.probabilities[i], ranked, depth, reason, self.complexities[i], first, escalated)

    def second_pass(self) -> None:
        """One model call for every escalated image of the batch; their probabilities replace the first pass's."""
        escalated = self.routing.escalated
        if not escalated:
            return
        t0 = time.perf_counter()
        index = torch.tensor(escalated)
        depths = torch.tensor([self.routing.second[i] for i in escalated])
        second, self.second_model_s = self.backend.predict(self.images[index], depths)
        self.probabilities = self.probabilities.index_copy(0, index, second)
        self.second_s = time.perf_counter() - t0


def first_pass(requests: list[Request], backend: Backend, rules: Rules) -> BatchRun:
    """Complexity, each image's first depth, the first model call, and which images escalate."""
    start = time.perf_counter()
    images, intensities = _inputs(requests, rules.preprocessing)
    h = backend.complexity(intensities)
    limits = _limits(requests, rules)
    routing = _first_depths(rules, limits, intensities, h)
    probs, seconds = backend.predict(images, torch.tensor(routing.first))
    first_s = time.perf_counter() - start
    _escalate(rules, limits, probs, routing)
    return BatchRun(requests, backend, images, routing, h.tolist(), probs, first_s, seconds)


def _inputs(requests: list[Request], pre: Preprocessing) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch for the model, and the same images for the complexity score. Uploads (uint8 levels) serve as both;
    the backend normalises them on its device. With OIP FP32 tensors in the batch (already normalised, and given to
    the model as they are) the batch is normalised here, and complexity reads intensities recovered from it."""
    if all(r.images.dtype == torch.uint8 for r in requests):
        images = torch.cat([r.images for r in requests])
        return images, images
    x = torch.cat([pre.normalise(r.images) if r.images.dtype == torch.uint8 else r.images for r in requests])
    mean = torch.tensor(pre.mean).view(1, -1, 1, 1)
    std = torch.tensor(pre.std).view(1, -1, 1, 1)
    return x, (x * std + mean).clamp(0, 1)


def _limits(requests: list[Request], rules: Rules) -> list[tuple[int | None, int | None, int | None]]:
    """Per image: its requested depth, its caller's cap and, when its request was degraded, the degrade depth."""
    degrade = min(rules.degrade_depth, rules.policy.max_depth)
    return [(r.depth, r.max_depth, degrade if r.degraded else None) for r in requests for _ in range(len(r.images))]


def _first_depths(rules: Rules, limits: list, intensities: torch.Tensor, h: torch.Tensor) -> Routing:
    """Each image's first depth and its reason: the router's depth, then DepthPolicy.choose's precedence."""
    auto = rules.router.first(intensities, h).tolist()
    depths, reasons = [], []
    for a, (depth, max_depth, degrade_to) in zip(auto, limits, strict=True):
        d, reason = rules.policy.choose(int(a), depth=depth, max_depth=max_depth, degrade_to=degrade_to)
        depths.append(d)
        reasons.append(rules.reason(reason))
    return Routing(depths, reasons, [0] * len(depths), list(reasons))


def _escalate(rules: Rules, limits: list, probs: torch.Tensor, routing: Routing) -> None:
    """The second depth of each image the router routed (0: none): what the router asks, capped by the same
    precedence as the first (the caller's max_depth, the degrade depth), run only when deeper than the first."""
    routed = [i for i, r in enumerate(routing.first_reasons) if r == rules.router.name]
    if not routed:
        return
    index = torch.tensor(routed)
    wanted = rules.router.escalate(probs[index], torch.tensor([routing.first[i] for i in routed])).tolist()
    for i, w in zip(routed, wanted, strict=True):
        if w <= 0:
            continue
        _, max_depth, degrade_to = limits[i]
        d, reason = rules.policy.choose(int(w), max_depth=max_depth, degrade_to=degrade_to)
        if d > routing.first[i]:
            routing.second[i], routing.second_reasons[i] = d, rules.reason(reason)
