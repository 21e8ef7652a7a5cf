"""The puppet network: per-sample depth, kernel cache, its static twin, MAC accounting."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from model import PuppetCNN, StaticTwin


def _images(n, cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)


def test_per_sample_depth_equals_each_sample_alone(small_puppet, small_config):
    x = _images(7, small_config)
    depth = torch.tensor([3, 1, 2, 3, 1, 2, 2])
    with torch.no_grad():
        batched = small_puppet(x, depth)
        for i in range(7):
            alone = small_puppet(x[i : i + 1], int(depth[i]))
            torch.testing.assert_close(batched[i : i + 1], alone, rtol=1e-5, atol=1e-6)
        # and depth matters, so the comparison above is not vacuous
        assert not torch.allclose(small_puppet(x[:1], 1), small_puppet(x[:1], 3), atol=1e-3)


def test_uniform_depth_tensor_equals_int_depth(small_puppet, small_config):
    x = _images(4, small_config)
    with torch.no_grad():
        torch.testing.assert_close(small_puppet(x, torch.full((4,), 2)), small_puppet(x, 2), rtol=1e-5, atol=1e-6)


def test_per_sample_depth_costs_the_sum_of_depths(small_puppet, small_config):
    """A mixed batch runs each block only on the samples that reach it: count conv FLOPs."""
    x = _images(4, small_config)
    small_puppet.cache_kernels()  # count the puppet, not the puppeteer

    def flops(depth):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            small_puppet(x, depth)
        return counter.get_total_flops()

    mixed = flops(torch.tensor([1, 1, 1, 3]))
    all_max = flops(3)
    all_min = flops(1)
    per_block = (all_max - all_min) / 2  # FLOPs of one extra block in every stage, for 4 samples
    expected = all_min + per_block * (2 / 4)  # one sample of four goes two blocks further
    assert mixed == pytest.approx(expected, rel=1e-9)


def test_kernel_cache_gives_identical_outputs(small_puppet, small_config):
    x = _images(3, small_config)
    with torch.no_grad():
        fresh = small_puppet(x, 3)
        small_puppet.cache_kernels()
        cached = small_puppet(x, 3)
    torch.testing.assert_close(fresh, cached, rtol=0, atol=0)
    small_puppet.train()
    assert small_puppet._kernel_cache is None, "training must drop cached kernels"


def test_twin_with_the_puppets_kernels_is_the_same_network(small_puppet, small_config):
    twin = StaticTwin(small_config).eval()
    state = {k: v for k, v in small_puppet.state_dict().items() if not k.startswith("puppeteers.")}
    with torch.no_grad():
        for s, k in enumerate(small_puppet.generate_kernels()):
            state[f"block_kernels.{s}"] = k
    twin.load_state_dict(state)
    x = _images(5, small_config)
    with torch.no_grad():
        for d in (1, 2, 3):
            torch.testing.assert_close(twin(x, d), small_puppet(x, d), rtol=1e-5, atol=1e-6)


def test_macs_match_a_flop_counter(small_puppet, small_config):
    x = _images(1, small_config)
    small_puppet.cache_kernels()  # MACs exclude kernel generation
    for d in (1, 3):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            small_puppet(x, d)
        # FlopCounterMode counts convolutions and matmuls as 2 FLOPs per multiply-accumulate
        assert counter.get_total_flops() == 2 * small_puppet.macs(d)


def test_default_shipped_shape_is_over_ten_times_smaller():
    from model import PuppetConfig

    cfg = PuppetConfig(ranks=(8, 16, 20))
    assert StaticTwin(cfg).stored_parameters() / PuppetCNN(cfg).stored_parameters() > 10


def test_output_shape_and_finite(small_puppet, small_config):
    out = small_puppet(_images(6, small_config), 2)
    assert out.shape == (6, small_config.num_classes)
    assert torch.isfinite(out).all()


def test_invalid_depths_are_rejected(small_puppet, small_config):
    x = _images(2, small_config)
    with pytest.raises(ValueError, match="depth must be in 1..3"):
        small_puppet(x, 4)
    with pytest.raises(ValueError, match="depth must be in 1..3"):
        small_puppet(x, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="per-sample depth must have shape"):
        small_puppet(x, torch.tensor([1, 2, 3]))
