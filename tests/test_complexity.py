"""H(x) = 1/2 E(x) + 1/2 E(Sobel magnitude) against images whose entropy is known."""

import math

import pytest
import torch

from model.complexity import complexity, histogram_entropy, sobel_levels


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


def test_sobel_of_a_ramp_is_exact_inside():
    """A ramp of 10 levels a column: inside, gx = (1 + 2 + 1) * 20 = 80 and gy = 0, so the magnitude is 80 levels,
    80 / 255 in intensity, and its bin round(80 / 255 / (4 sqrt 2) * 255) = round(14.14) = 14."""
    ramp = (torch.arange(10, dtype=torch.uint8) * 10).repeat(10, 1).view(1, 1, 10, 10)
    bins = sobel_levels(ramp.numpy())[0, 0]
    assert (bins[1:-1, 1:-1] == 14).all()
    assert (bins[:, 0] == round(4 * 10 / (4 * math.sqrt(2)))).all()  # replicate padding: half the step at the edge


def test_a_tie_between_two_bins_goes_to_the_even_one():
    """gx = gy = 2 (a smooth region) puts the magnitude exactly half-way between bins 0 and 1: sqrt(8) / (4 sqrt 2)
    = 0.5. Exact integer arithmetic sends it to 0 every time, as round-half-even does (floating-point
    convolutions sent it either way, depending on the order of summation)."""
    img = torch.zeros(1, 1, 3, 3, dtype=torch.uint8)
    img[0, 0, 2, 2] = 2  # at the centre: gx = gy = 2
    assert sobel_levels(img.numpy())[0, 0, 1, 1] == 0
    img[0, 0, 2, 2] = 6  # gx = gy = 6: sqrt(72) / (4 sqrt 2) = 1.5, half-way between 1 and 2: the even one
    assert sobel_levels(img.numpy())[0, 0, 1, 1] == 2


def test_the_same_image_has_the_same_complexity_alone_or_in_a_batch():
    g = torch.Generator().manual_seed(2)
    u8 = torch.randint(0, 256, (7, 3, 20, 20), generator=g, dtype=torch.uint8)
    h = complexity(u8)
    assert h.dtype == torch.float32 and h.shape == (7,)
    for i in range(7):
        assert complexity(u8[i : i + 1]).item() == h[i].item()  # bit for bit


def test_rejects_a_non_batch():
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        complexity(torch.zeros(28, 28))
