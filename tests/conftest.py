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


# -- tiers: `make test-fast` runs what needs no other process (-m "not integration and not slow") -----------------
# Fixtures that start a server (or a namespace, a browser): a test that uses one is integration wherever it lives.
PROCESS_FIXTURES = {"server", "expected", "faulty", "host", "offline_host", "browser", "server_and_prometheus", "keyed"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if PROCESS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
        # schemathesis names each operation's test `name[METHOD /path]`, but pytest 9.2 builds the id from the bare
        # original name: the operations shared one id, and pytest-xdist, which schedules by id, ran only one
        if (
            getattr(item, "operation_label", None)
            and item.name != item.originalname
            and item.nodeid.endswith("::" + item.originalname)
        ):
            item._id = item.parent.id.child(item.name)
    seen: set[str] = set()
    twice = {item.nodeid for item in items if item.nodeid in seen or seen.add(item.nodeid)}
    if twice:  # make test runs on two processes (pytest-xdist): a test sharing another's id would not run
        raise pytest.UsageError(f"tests that share an id: {sorted(twice)}")


@pytest.fixture(autouse=True)
def _fast_tier_starts_no_process(request, monkeypatch):
    """In the fast tier (PUPPET_TEST_TIER=fast, set by `make test-fast`) a test that starts a Python process fails at
    once, saying to mark it: a misfiled test cannot slow the fast tier down unnoticed."""
    if os.environ.get("PUPPET_TEST_TIER") != "fast":
        return
    import subprocess
    import sys

    popen_init = subprocess.Popen.__init__

    def guarded(self, args, *rest, **kwargs):
        argv = [args] if isinstance(args, str | bytes) else list(args)
        if any(sys.executable in str(a) or "python" in os.path.basename(str(a)) for a in argv[:4]):
            pytest.fail(f"{request.node.nodeid} starts a Python process: mark it integration (tests/conftest.py)")
        popen_init(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", guarded)
