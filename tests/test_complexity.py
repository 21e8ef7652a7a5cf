"""H(x) = 1/2 E(x) + 1/2 E(Sobel magnitude) against images whose entropy is known."""

import math

import pytest
import torch

from model.complexity import complexity, histogram_entropy, sobel_magnitude


def test_constant_image_has_zero_complexity():
    for value in (0, 77, 255):
        images = torch.full((3, 1, 28, 28), value, dtype=torch.uint8)
        torch.testing.assert_close(complexity(images), torch.zeros(3))


def test_uniform_noise_has_close_to_eight_bits_of_intensity_entropy():
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (2, 3, 256, 256), generator=g, dtype=torch.uint8)
    e = histogram_entropy(noise)
    assert e.min() > 7.99 and e.max() <= 8.0
    h = complexity(noise)
    assert (h > 6.5).all() and (h <= 8.0).all()


def test_two_level_image_has_exactly_one_bit():
    # half black, half white, split vertically: E(x) = 1 bit; the gradient lives on the boundary only
    img = torch.zeros(1, 1, 16, 16, dtype=torch.uint8)
    img[..., 8:] = 255
    assert histogram_entropy(img).item() == pytest.approx(1.0, abs=1e-6)
    # Sobel magnitude: 0 everywhere but the two boundary columns (value 4 each, 32 pixels of 256)
    p = 32 / 256
    expected_grad_entropy = -(p * math.log2(p) + (1 - p) * math.log2(1 - p))
    assert complexity(img).item() == pytest.approx(0.5 * 1.0 + 0.5 * expected_grad_entropy, abs=1e-5)


def test_entropy_is_averaged_over_channels():
    img = torch.zeros(1, 2, 16, 16, dtype=torch.uint8)
    img[0, 1, :, 8:] = 255  # channel 0 constant (0 bits), channel 1 two-level (1 bit)
    assert histogram_entropy(img).item() == pytest.approx(0.5, abs=1e-6)


def test_float_and_uint8_inputs_agree_and_batching_does_not_change_results():
    g = torch.Generator().manual_seed(1)
    u8 = torch.randint(0, 256, (5, 1, 28, 28), generator=g, dtype=torch.uint8)
    batched = complexity(u8)
    torch.testing.assert_close(complexity(u8.float() / 255), batched)
    for i in range(5):
        torch.testing.assert_close(complexity(u8[i : i + 1]), batched[i : i + 1])


def test_sobel_of_a_ramp_is_constant_inside():
    ramp = torch.linspace(0, 1, 10).repeat(10, 1).view(1, 1, 10, 10)
    mag = sobel_magnitude(ramp)[0, 0, 1:-1, 1:-1]
    torch.testing.assert_close(mag, torch.full_like(mag, 8 / 9), rtol=1e-5, atol=1e-6)


def test_rejects_a_non_batch():
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        complexity(torch.zeros(28, 28))
