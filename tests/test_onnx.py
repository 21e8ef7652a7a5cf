"""ONNX Runtime backend: parity with torch at every depth, manifests that refuse stale or corrupt exports."""

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from model import load_checkpoint, load_dataset
from model.data import encode_png
from model.onnx_export import MANIFEST, OnnxExportError, ensure_export, export_onnx, verified_export
from support.live_server import SHIPPED, LiveServer


@pytest.fixture(scope="module")
def ckpt():
    return load_checkpoint(SHIPPED)


@pytest.fixture(scope="module")
def export_dir(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx")
    export_onnx(ckpt, out)
    return out


def _session(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def test_every_depth_matches_torch_within_1e_4(ckpt, export_dir):
    files = verified_export(ckpt, export_dir)
    real = load_dataset("fashion-mnist", "test").subset(slice(0, 64))
    g = torch.Generator().manual_seed(0)
    inputs = {
        "real": ckpt.preprocessing.normalise(real.images),
        "random": torch.randn(7, 1, 28, 28, generator=g),
        "one": torch.randn(1, 1, 28, 28, generator=g),
    }
    ckpt.model.cache_kernels()
    for d, path in files.items():
        session = _session(path)
        for name, x in inputs.items():
            ours = session.run(None, {"input": x.numpy()})[0]
            with torch.no_grad():
                reference = ckpt.model(x, d).numpy()
            err = float(np.abs(ours - reference).max())
            assert err < 1e-4, f"depth {d}, {name}: max abs difference {err}"
            assert (ours.argmax(1) == reference.argmax(1)).all()


def test_graphs_carry_their_metadata(ckpt, export_dir):
    graph = onnx.load(str(export_dir / "depth-3.onnx"))
    meta = {p.key: p.value for p in graph.metadata_props}
    assert meta["depth"] == "3" and meta["checkpoint_sha256"] == ckpt.sha256 and meta["model_version"] == ckpt.version
    assert json.loads(meta["classes"]) == list(ckpt.classes)
    assert json.loads(meta["mean"]) == list(ckpt.preprocessing.mean)
    # the puppeteer is gone: no ODE in the graph, the kernels are constants
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert not any("puppeteer" in init.name for init in graph.graph.initializer)


def _stale_copy(export_dir, dst, sha="0" * 64):
    """A copy of a valid export whose manifest names another checkpoint."""
    dst.mkdir()
    for f in export_dir.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    manifest = json.loads((dst / MANIFEST).read_text())
    manifest["checkpoint_sha256"] = sha
    (dst / MANIFEST).write_text(json.dumps(manifest))
    return dst


def test_stale_export_is_refused(ckpt, export_dir, tmp_path):
    stale = _stale_copy(export_dir, tmp_path / "stale")
    with pytest.raises(OnnxExportError, match="stale"):
        verified_export(ckpt, stale)


def test_corrupt_file_is_refused(ckpt, export_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in export_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    data = bytearray((bad / "depth-2.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / "depth-2.onnx").write_bytes(bytes(data))
    with pytest.raises(OnnxExportError, match=r"depth-2\.onnx does not match its manifest"):
        verified_export(ckpt, bad)
    with pytest.raises(OnnxExportError, match="manifest.json is missing"):
        verified_export(ckpt, tmp_path / "nothing")


def test_ensure_export_reuses_a_valid_export_and_replaces_a_stale_one(ckpt, tmp_path):
    out = tmp_path / "cache"
    ensure_export(ckpt, out)
    stamp = os.stat(out / "depth-1.onnx").st_mtime_ns
    ensure_export(ckpt, out)
    assert os.stat(out / "depth-1.onnx").st_mtime_ns == stamp, "a valid export is reused"
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["checkpoint_sha256"] = "f" * 64
    (out / MANIFEST).write_text(json.dumps(manifest))
    ensure_export(ckpt, out)
    assert json.loads((out / MANIFEST).read_text())["checkpoint_sha256"] == ckpt.sha256


@pytest.mark.integration
def test_service_answers_the_same_through_both_backends(tmp_path):
    data = load_dataset("fashion-mnist", "test").subset(slice(100, 132))
    pngs = [encode_png(img) for img in data.images]
    import httpx

    answers = {}
    for backend in ("torch", "onnx"):
        s = LiveServer(backend=backend, onnx_cache_dir=tmp_path)
        try:
            answers[backend] = []
            for png in pngs:
                r = httpx.post(s.url + "/classify", content=png, headers={"Content-Type": "image/png"}, timeout=30)
                assert r.status_code == 200, r.text
                answers[backend].append(r.json())
            info = httpx.get(s.url + "/v1/model").json()
            assert info["backend"] == backend
        finally:
            s.stop()
    for a, b in zip(answers["torch"], answers["onnx"], strict=True):
        assert a["backend"]["name"] == "torch" and b["backend"] == {"name": "onnx", "provider": "CPUExecutionProvider"}
        ra, rb = a["results"][0], b["results"][0]
        assert ra["depth"] == rb["depth"]
        assert ra["predictions"][0]["class_id"] == rb["predictions"][0]["class_id"]
        assert ra["predictions"][0]["probability"] == pytest.approx(rb["predictions"][0]["probability"], abs=1e-4)


@pytest.mark.integration
def test_service_refuses_a_stale_prebuilt_export(ckpt, export_dir, tmp_path):
    stale = _stale_copy(export_dir, tmp_path / "prebuilt")
    with pytest.raises(RuntimeError, match="stale"):
        LiveServer(backend="onnx", onnx_dir=stale)
