"""The puppeteer ODE against closed-form solutions, gradients, and the prefix property."""

import math

import pytest
import torch
from torch import nn

from model.puppeteer import StagePuppeteer


class LinearField(nn.Module):
    """dP/dt = A P on the flattened state: P(t) = expm(A t) P0."""

    def __init__(self, a: torch.Tensor):
        super().__init__()
        self.a = a

    def forward(self, t, p):
        return (self.a @ p.reshape(-1)).reshape(p.shape)


def _with_linear_field(method: str, lam: float | None = None, dtype=torch.float64):
    torch.manual_seed(0)
    p = StagePuppeteer(4, 2, max_depth=5, method=method).to(dtype)
    n = p.p0.numel()
    a = lam * torch.eye(n, dtype=dtype) if lam is not None else torch.randn(n, n, dtype=dtype) / math.sqrt(n)
    p.field = LinearField(a)
    return p, a


def test_euler_matches_the_discrete_closed_form():
    # dP/dt = lam P with Euler steps of dt: P_j = (1 + lam dt)^j P0 exactly, the paper's update rule.
    p, _ = _with_linear_field("euler", lam=-0.7)
    states = p.states()
    for j in range(5):
        expected = (1 - 0.7 * p.dt) ** j * p.p0
        torch.testing.assert_close(states[j], expected, rtol=1e-12, atol=1e-12)


def test_rk4_matches_the_matrix_exponential():
    p, a = _with_linear_field("rk4")
    states = p.states()
    z = a * p.dt
    step = torch.eye(len(a), dtype=a.dtype) + z + z @ z / 2 + z @ z @ z / 6 + z @ z @ z @ z / 24  # RK4 on a linear ODE
    for j, t in enumerate(p.times(5)):
        discrete = (torch.linalg.matrix_power(step, j) @ p.p0.reshape(-1)).reshape(p.p0.shape)
        torch.testing.assert_close(states[j], discrete, rtol=1e-10, atol=1e-12)
        expected = (torch.linalg.matrix_exp(a * t) @ p.p0.reshape(-1)).reshape(p.p0.shape)
        torch.testing.assert_close(states[j], expected, rtol=1e-3, atol=1e-4)
    # and it is not trivially true: Euler misses the same solution by far more
    pe, _ = _with_linear_field("euler")
    t_end = p.times(5)[-1]
    exact = (torch.linalg.matrix_exp(a * t_end) @ p.p0.reshape(-1)).reshape(p.p0.shape)
    assert (pe.states()[-1] - exact).abs().max() > 100 * (states[-1] - exact).abs().max()


def test_scalar_decay_rk4():
    # Any 4-stage 4th-order Runge-Kutta step multiplies y' = lam y by R(z) = 1 + z + z^2/2 + z^3/6 + z^4/24,
    # z = lam dt: the discrete solution is exact, and within RK4's error of exp(lam t).
    p, _ = _with_linear_field("rk4", lam=-1.3)
    z = -1.3 * p.dt
    r = 1 + z + z**2 / 2 + z**3 / 6 + z**4 / 24
    states = p.states()
    for j, t in enumerate(p.times(5)):
        torch.testing.assert_close(states[j], r**j * p.p0, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(states[j], math.exp(-1.3 * float(t)) * p.p0, rtol=5e-5, atol=1e-8)


@pytest.mark.parametrize("method", ["euler", "rk4"])
def test_prefix_property(method):
    torch.manual_seed(0)
    p = StagePuppeteer(8, 3, max_depth=4, method=method)
    full = p()
    assert full.shape == (4, 2, 8, 8, 3, 3)
    for d in range(1, 5):
        torch.testing.assert_close(p(d), full[:d], rtol=0, atol=0)
    # the layers differ: the ODE moves the kernels
    assert (full[3] - full[0]).abs().max() > 1e-3


def test_tied_kernels_are_the_same_in_every_layer():
    p = StagePuppeteer(8, 3, max_depth=4, tied=True)
    k = p()
    for j in range(1, 4):
        torch.testing.assert_close(k[j], k[0], rtol=0, atol=0)
    assert p.field is None


def test_gradcheck_through_the_puppeteer():
    torch.manual_seed(0)
    p = StagePuppeteer(3, 2, max_depth=3, method="rk4").double()
    params = [p.p0, p.u_out, p.field.a, p.field.bias]

    def kernels(p0, u_out, a, bias):
        return torch.func.functional_call(p, {"p0": p0, "u_out": u_out, "field.a": a, "field.bias": bias}, ())

    inputs = tuple(x.detach().clone().requires_grad_(True) for x in params)
    assert torch.autograd.gradcheck(kernels, inputs, eps=1e-6, atol=1e-5)


def test_bad_arguments_are_rejected_with_a_message():
    with pytest.raises(ValueError, match="unknown ODE solver"):
        StagePuppeteer(4, 2, 3, method="dopri8x")
    with pytest.raises(ValueError, match="rank"):
        StagePuppeteer(4, 5, 3)
    with pytest.raises(ValueError, match="depth must be in 1..3"):
        StagePuppeteer(4, 2, 3)(4)
