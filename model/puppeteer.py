"""The puppeteer: a neural ODE whose trajectory is the kernels of one stage of the puppet.

Each stage (constant width C) evolves a compact state P(t): for every conv position of a residual
block (two per block) and every 3x3 tap, an r x r core of a Tucker-2 factorisation. Layer j's kernel
is decoded from P(t_j), t_j = j * dt, through factors U_out, U_in stored once per stage:

    W_j[o, i, k] = sum_ab U_out[o, a] P_k(t_j)[a, b] U_in[i, b]

dP/dt = G(P) is autonomous, so layer j's kernel depends only on j (the prefix property): every depth
that reaches layer j uses the same kernel, and generating depth d's kernels is a prefix of D_max's.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torchdiffeq import odeint

TAPS = 9  # 3x3 kernels
SOLVERS = {"euler": "euler", "rk4": "rk4", "midpoint": "midpoint"}


class KernelField(nn.Module):
    """G(P): the vector field of the kernel state.

    For each conv position p: dP_k/dt = A_p (sum_k' M_p[k, k'] tanh(P_k')) B_p + bias_p,
    a bilinear map of r x r cores with mixing across the nine taps. 3 r^2 + 81 parameters a position.
    """

    def __init__(self, positions: int, rank: int, *, drift: float = 0.5):
        super().__init__()
        self.a = nn.Parameter(torch.randn(positions, rank, rank) * drift / math.sqrt(rank))
        self.b = nn.Parameter(torch.randn(positions, rank, rank) / math.sqrt(rank))
        self.mix = nn.Parameter(torch.eye(TAPS).repeat(positions, 1, 1) + 0.05 * torch.randn(positions, TAPS, TAPS))
        self.bias = nn.Parameter(torch.zeros(positions, rank, rank))

    def forward(self, t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        h = torch.einsum("pkl,plij->pkij", self.mix, torch.tanh(p))  # (P, 9, r, r)
        return self.a.unsqueeze(1) @ h @ self.b.unsqueeze(1) + self.bias.unsqueeze(1)


class StagePuppeteer(nn.Module):
    """Generates the kernels of one stage: max_depth blocks of `positions` C x C 3x3 convolutions.

    Args:
        channels: stage width C.
        rank: Tucker-2 rank r of every kernel.
        max_depth: number of blocks at maximum depth (the integration horizon in steps).
        positions: convolutions per residual block.
        method: fixed-grid torchdiffeq solver, "euler" (the paper's) or "rk4".
        tied: if true, G is identically zero and every layer gets the same kernel (ablation).
    """

    def __init__(
        self,
        channels: int,
        rank: int,
        max_depth: int,
        *,
        positions: int = 2,
        method: str = "euler",
        tied: bool = False,
    ):
        super().__init__()
        if method not in SOLVERS:
            raise ValueError(f"unknown ODE solver {method!r}; choose one of {sorted(SOLVERS)}")
        if not 1 <= rank <= channels:
            raise ValueError(f"rank must be in 1..{channels} for a stage of width {channels}, got {rank}")
        self.channels, self.rank, self.max_depth = channels, rank, max_depth
        self.positions, self.method, self.tied = positions, method, tied
        self.dt = 1.0 / max_depth  # depth normalised to [0, 1)
        u_out = torch.stack([nn.init.orthogonal_(torch.empty(channels, rank)) for _ in range(positions)])
        u_in = torch.stack([nn.init.orthogonal_(torch.empty(channels, rank)) for _ in range(positions)])
        self.u_out = nn.Parameter(u_out)  # (P, C, r)
        self.u_in = nn.Parameter(u_in)  # (P, C, r)
        # With orthonormal U the decoded kernel has variance ~ r^2 var(P) / C^2; aim at He's 2 / (9 C).
        std = math.sqrt(2.0 * channels / TAPS) / rank
        self.p0 = nn.Parameter(torch.randn(positions, TAPS, rank, rank) * std)  # (P, 9, r, r)
        self.field = None if tied else KernelField(positions, rank)

    def times(self, depth: int) -> torch.Tensor:
        """The grid t_j = j * dt, j = 0..depth-1."""
        return torch.arange(depth, dtype=self.p0.dtype, device=self.p0.device) * self.dt

    def states(self, depth: int | None = None) -> torch.Tensor:
        """P(t_j) for j < depth, shape (depth, P, 9, r, r)."""
        depth = self.max_depth if depth is None else depth
        if not 1 <= depth <= self.max_depth:
            raise ValueError(f"depth must be in 1..{self.max_depth}, got {depth}")
        if self.field is None:
            return self.p0.unsqueeze(0).expand(depth, *self.p0.shape)
        if depth == 1:
            return self.p0.unsqueeze(0)
        return odeint(self.field, self.p0, self.times(depth), method=SOLVERS[self.method])

    def decode(self, states: torch.Tensor) -> torch.Tensor:
        """Kernels from states: (D, P, 9, r, r) -> (D, P, C_out, C_in, 3, 3)."""
        w = torch.einsum("por,dpkrs,pis->dpoik", self.u_out, states, self.u_in)  # (D, P, C, C, 9)
        return w.reshape(*w.shape[:4], 3, 3)

    def forward(self, depth: int | None = None) -> torch.Tensor:
        """Kernels of the first `depth` blocks, shape (depth, P, C, C, 3, 3)."""
        return self.decode(self.states(depth))
