import os

import pytest
import torch

# One torch thread, as in serving: tests are small and the second core runs the rest.
torch.set_num_threads(1)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def small_config():
    from model import PuppetConfig

    return PuppetConfig(widths=(4, 8), ranks=(2, 4), max_depth=3, image_size=12, num_classes=5)


@pytest.fixture
def small_puppet(small_config):
    from model import PuppetCNN

    torch.manual_seed(0)
    model = PuppetCNN(small_config)
    _randomise_norms(model)
    return model.eval()


def _randomise_norms(model):
    """Fresh batch norms are identities with zeroed residual branches; give them real statistics."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data = torch.rand(m.num_features, generator=g) + 0.5
            m.bias.data = torch.randn(m.num_features, generator=g) * 0.1
            m.running_mean = torch.randn(m.num_features, generator=g) * 0.1
            m.running_var = torch.rand(m.num_features, generator=g) + 0.5
