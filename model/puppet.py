"""The puppet CNN, its static twin, and the architecture config that the checkpoint carries.

Layout (read top-down): building blocks, the config, the shared backbone, then the two networks.

    stem (3x3 conv, BN, ReLU)
    stage s (width C_s): [transition C_{s-1} -> C_s, stride 2] then d residual blocks
        block j: x <- relu(x + BN_jb(conv(relu(BN_ja(conv(x, W_ja))), W_jb)))
    head: global average pool -> linear (shared by every depth)

`depth` d means d blocks in every stage, d in 1..max_depth. In the puppet the block kernels W_j come
from the stage's puppeteer; in the static twin they are stored parameters. Everything else (stem,
transitions, batch norms, head) is an ordinary stored parameter in both, and counted as stored.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.puppeteer import StagePuppeteer

POSITIONS = 2  # convolutions per residual block


class Transition(nn.Module):
    """Stride-2 change of width: depthwise 3x3 (stride 2), BN, pointwise 1x1, BN, ReLU."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.depthwise = nn.Conv2d(c_in, c_in, 3, stride=2, padding=1, groups=c_in, bias=False)
        self.bn1 = nn.BatchNorm2d(c_in)
        self.pointwise = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn2(self.pointwise(self.bn1(self.depthwise(x)))))


@dataclass(frozen=True)
class PuppetConfig:
    """Architecture of a puppet (and of its static twin). Stored in every checkpoint."""

    in_channels: int = 1
    num_classes: int = 10
    image_size: int = 28
    widths: tuple[int, ...] = (16, 32, 64)
    ranks: tuple[int, ...] = (8, 12, 16)
    max_depth: int = 4
    solver: str = "euler"
    tied: bool = False  # ablation: G = 0, one kernel shared by every layer of a stage

    def __post_init__(self):
        if len(self.widths) != len(self.ranks):
            raise ValueError(f"widths {self.widths} and ranks {self.ranks} must have one entry per stage")
        if self.max_depth < 1:
            raise ValueError(f"max_depth must be at least 1, got {self.max_depth}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PuppetConfig:
        d = dict(d)
        for key in ("widths", "ranks"):
            if key in d:
                d[key] = tuple(d[key])
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown architecture fields {sorted(unknown)}")
        return cls(**d)


class Backbone(nn.Module):
    """Stem, transitions, per-layer batch norms and head; the block kernels come from a subclass."""

    def __init__(self, config: PuppetConfig):
        super().__init__()
        self.config = config
        c0 = config.widths[0]
        self.stem = nn.Sequential(
            nn.Conv2d(config.in_channels, c0, 3, padding=1, bias=False), nn.BatchNorm2d(c0), nn.ReLU()
        )
        self.transitions = nn.ModuleList(
            Transition(c_in, c_out) for c_in, c_out in zip(config.widths[:-1], config.widths[1:], strict=True)
        )
        # norms[s][j * POSITIONS + p]: batch norm after conv p of block j of stage s.
        self.norms = nn.ModuleList(
            nn.ModuleList(nn.BatchNorm2d(c) for _ in range(config.max_depth * POSITIONS)) for c in config.widths
        )
        for stage_norms in self.norms:  # residual branches start near identity
            for j in range(config.max_depth):
                nn.init.zeros_(stage_norms[j * POSITIONS + POSITIONS - 1].weight)
        self.head = nn.Linear(config.widths[-1], config.num_classes)
        self._kernel_cache: list[torch.Tensor] | None = None

    # -- kernels -------------------------------------------------------------------------------
    def generate_kernels(self, depth: int | None = None) -> list[torch.Tensor]:
        """Block kernels per stage, each (depth, POSITIONS, C, C, 3, 3)."""
        raise NotImplementedError

    def cache_kernels(self) -> list[torch.Tensor]:
        """Generate every depth's kernels once (no grad) and use them until `clear_kernel_cache`."""
        with torch.no_grad():
            self._kernel_cache = [k.detach() for k in self.generate_kernels()]
        return self._kernel_cache

    def clear_kernel_cache(self) -> None:
        self._kernel_cache = None

    def train(self, mode: bool = True):
        if mode:  # weights are about to change: cached kernels would go stale
            self.clear_kernel_cache()
        return super().train(mode)

    def kernels(self, depth: int) -> list[torch.Tensor]:
        if self._kernel_cache is not None:
            return [k[:depth] for k in self._kernel_cache]
        return self.generate_kernels(depth)

    # -- forward -------------------------------------------------------------------------------
    def _block(self, x: torch.Tensor, s: int, j: int, kernels: torch.Tensor) -> torch.Tensor:
        norms = self.norms[s]
        h = F.relu(norms[j * POSITIONS](F.conv2d(x, kernels[j, 0], padding=1)))
        h = norms[j * POSITIONS + 1](F.conv2d(h, kernels[j, 1], padding=1))
        return F.relu(x + h)

    def features(self, x: torch.Tensor, depth: int | torch.Tensor) -> torch.Tensor:
        """Pooled features, (B, C_last). `depth` is an int or a per-sample LongTensor (B,)."""
        if isinstance(depth, int) or (isinstance(depth, torch.Tensor) and depth.ndim == 0):
            return self._features_uniform(x, int(depth))
        return self._features_per_sample(x, depth)

    def _check_depth(self, d: int) -> None:
        if not 1 <= d <= self.config.max_depth:
            raise ValueError(f"depth must be in 1..{self.config.max_depth}, got {d}")

    def _features_uniform(self, x: torch.Tensor, depth: int) -> torch.Tensor:
        self._check_depth(depth)
        kernels = self.kernels(depth)
        x = self.stem(x)
        for s, stage_kernels in enumerate(kernels):
            if s > 0:
                x = self.transitions[s - 1](x)
            for j in range(depth):
                x = self._block(x, s, j, stage_kernels)
        return x.mean(dim=(2, 3))

    def _features_per_sample(self, x: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
        if depth.shape != (x.shape[0],):
            raise ValueError(f"per-sample depth must have shape ({x.shape[0]},), got {tuple(depth.shape)}")
        d_max = int(depth.max())
        self._check_depth(int(depth.min()))
        self._check_depth(d_max)
        # Deepest first, so the samples still running at block j are always a prefix of the batch:
        # a sample leaves once it reached its depth, and a mixed batch costs the sum of its depths.
        order = torch.argsort(depth, descending=True, stable=True)
        x, depth = x[order], depth[order]
        active = [int((depth > j).sum()) for j in range(d_max)]
        kernels = self.kernels(d_max)
        x = self.stem(x)
        for s, stage_kernels in enumerate(kernels):
            if s > 0:
                x = self.transitions[s - 1](x)
            for j in range(d_max):
                n = active[j]
                if n == x.shape[0]:
                    x = self._block(x, s, j, stage_kernels)
                elif torch.is_grad_enabled():  # training: autograd needs a new tensor
                    x = torch.cat([self._block(x[:n], s, j, stage_kernels), x[n:]])
                else:  # inference: overwrite the running prefix in place, no copy of the rest
                    x[:n] = self._block(x[:n], s, j, stage_kernels)
        feats = x.mean(dim=(2, 3))
        return feats[torch.argsort(order)]

    def forward(self, x: torch.Tensor, depth: int | torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, num_classes); depth defaults to max_depth."""
        depth = self.config.max_depth if depth is None else depth
        return self.head(self.features(x, depth))

    # -- accounting ----------------------------------------------------------------------------
    def stored_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def stored_numbers(self) -> int:
        """Every number the checkpoint stores: parameters plus batch-norm running statistics and counters."""
        return sum(t.numel() for t in self.state_dict().values())

    def macs(self, depth: int) -> int:
        """Multiply-accumulates of one image's forward pass at `depth` (kernel generation excluded)."""
        cfg = self.config
        side = cfg.image_size
        total = side * side * cfg.in_channels * cfg.widths[0] * 9
        for s, c in enumerate(cfg.widths):
            if s > 0:
                side = (side + 1) // 2
                total += side * side * (cfg.widths[s - 1] * 9 + cfg.widths[s - 1] * c)
            total += depth * POSITIONS * side * side * c * c * 9
        return total + cfg.widths[-1] * cfg.num_classes


class PuppetCNN(Backbone):
    """Puppet-CNN: block kernels generated by one puppeteer ODE per stage."""

    def __init__(self, config: PuppetConfig):
        super().__init__(config)
        self.puppeteers = nn.ModuleList(
            StagePuppeteer(c, r, config.max_depth, positions=POSITIONS, method=config.solver, tied=config.tied)
            for c, r in zip(config.widths, config.ranks, strict=True)
        )

    def generate_kernels(self, depth: int | None = None) -> list[torch.Tensor]:
        return [p(depth) for p in self.puppeteers]


class StaticTwin(Backbone):
    """The 'traditional CNN': the puppet at max depth with every block kernel stored."""

    def __init__(self, config: PuppetConfig):
        super().__init__(config)
        self.block_kernels = nn.ParameterList()
        for c in config.widths:
            w = torch.empty(config.max_depth, POSITIONS, c, c, 3, 3)
            for j in range(config.max_depth):
                for p in range(POSITIONS):
                    nn.init.kaiming_normal_(w[j, p], nonlinearity="relu")
            self.block_kernels.append(nn.Parameter(w))

    def generate_kernels(self, depth: int | None = None) -> list[torch.Tensor]:
        depth = self.config.max_depth if depth is None else depth
        return [k[:depth] for k in self.block_kernels]


ARCHITECTURES = {"puppet": PuppetCNN, "twin": StaticTwin}


def build_model(kind: str, config: PuppetConfig) -> Backbone:
    """Build a "puppet" or a "twin" from its config."""
    if kind not in ARCHITECTURES:
        raise ValueError(f"unknown model kind {kind!r}; choose one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[kind](config)
