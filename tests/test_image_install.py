"""The image's install serves: the project installed the way the Dockerfile installs it, and nothing else.

Issue 10: `pip install .` followed by `python -m service.cli serve` died with ModuleNotFoundError: httpx, because
runtime code imported a dev-only package. Every other test runs in the dev environment, where httpx is installed;
tests/test_architecture.py reads the import statements, this test runs the install itself. The project is built
as a wheel and installed into a fresh virtual environment with its runtime dependencies only (no extras), then run
from outside the checkout with the image's environment, parsed from the Dockerfile itself: every module of `model`
and `service` must import from that install, and the image's entrypoint must start, classify the real sample
images correctly, and stop cleanly on SIGTERM. Where a Docker engine is present, the CPU image itself is built
and checked the same way.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path, PurePosixPath

import httpx
import pytest

from benchmarks.server_process import ServerProcess, free_port, wait_ready
from conftest import REPO

pytestmark = pytest.mark.integration  # every test here starts a server or another process

ROOT = Path(REPO)
DOCKERFILE = ROOT / "Dockerfile"
TORCH_PIN = re.search(r"torch==[0-9.]+", (ROOT / "pyproject.toml").read_text())[0]  # pyproject.toml's pin
SAMPLES = sorted((ROOT / "samples" / "fashion-mnist").glob("*.png"))
# What the Dockerfile's `wheel` stage copies to build the project's wheel (its build context for the project).
PROJECT_FILES = ("pyproject.toml", "README.md", "model", "service")
IMAGE_VENV_BIN = "/opt/venv/bin"
IMAGE_WORKDIR = PurePosixPath("/app")
READY_TIMEOUT_S = 180.0  # generous: a failure, never a speed check
PIP_TIMEOUT_S = 1800  # a guard against a hung download, not a speed check


# -- the Dockerfile, read as Docker reads it ------------------------------------------------------------------------
def _instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; comment lines dropped, `\\` continuations joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        if line.strip().startswith("#") or not (pending or line.strip()):
            continue  # Docker drops comment lines, within continuations too
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        text = (pending + line).strip()
        pending = ""
        if text:
            keyword, _, args = text.partition(" ")
            out.append((keyword.upper(), args.strip()))
    return out


def _env_pairs(args: str) -> list[tuple[str, str]]:
    """`ENV K=v K2="v 2"` (or the legacy `ENV K v`) as (key, value) pairs."""
    words = shlex.split(args)
    if "=" not in words[0]:
        return [(words[0], args.strip()[len(words[0]) :].strip())]
    return [tuple(w.split("=", 1)) for w in words]


def dockerfile_runtime_env() -> dict[str, str]:
    """The ENV of the final stage, with what it inherits from earlier stages it is built FROM."""
    stages: dict[str, tuple[str, dict[str, str]]] = {}
    order: list[str] = []
    for keyword, args in _instructions():
        if keyword == "FROM":
            words = args.split()
            words = [w for w in words if not w.startswith("--")]  # --platform=...
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else f"#{len(order)}"
            stages[name] = (words[0], {})
            order.append(name)
        elif keyword == "ENV":
            stages[order[-1]][1].update(_env_pairs(args))

    def resolve(name: str) -> dict[str, str]:
        parent, env = stages[name]
        return {**(resolve(parent) if parent in stages else {}), **env}

    return resolve(order[-1])


def dockerfile_entrypoint() -> list[str]:
    entrypoints = [args for keyword, args in _instructions() if keyword == "ENTRYPOINT"]
    assert entrypoints, "the Dockerfile has no ENTRYPOINT"
    return json.loads(entrypoints[-1])


def image_like_env(venv_bin: Path, app_dir: Path) -> dict[str, str]:
    """A clean environment (not this process's): PATH, HOME, LANG, and the image's ENV, pointed at this machine."""
    env = dockerfile_runtime_env()
    image_path = env.pop("PATH", "").split(":")
    assert image_path[0] == IMAGE_VENV_BIN, f"the image's PATH should start with its venv: {image_path}"
    env.pop("PYTHONPATH", None)  # the image runs what pip installed, never a source tree
    for key, value in env.items():
        assert "$" not in value, f"ENV {key}={value}: substitute the variable here too"
    # The image's checkpoint lies in its WORKDIR; here in app_dir, at the same place.
    image_ckpt = PurePosixPath(env["PUPPET_CHECKPOINT"])
    local_ckpt = app_dir / image_ckpt.relative_to(IMAGE_WORKDIR)
    local_ckpt.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ROOT / "checkpoints" / image_ckpt.name, local_ckpt)
    env.update(PUPPET_HOST="127.0.0.1", PUPPET_CHECKPOINT=str(local_ckpt))
    # PUPPET_PORT: ServerProcess sets a free loopback port of its own.
    # The image's PATH is /opt/venv/bin:$PATH; here the fresh venv's bin, then the system's, and nothing else.
    env["PATH"] = os.pathsep.join([str(venv_bin), os.defpath])
    env.update({k: os.environ[k] for k in ("HOME", "LANG") if k in os.environ})
    return env


# -- the check both tests share ------------------------------------------------------------------------------------
def _normalise(label: str) -> str:
    return re.sub(r"[^a-z0-9]", "", label.lower())


def classify_samples(url: str) -> list[str]:
    """POST every sample image; return what went wrong (empty: every answer 200 with the file name's class on top).

    samples/fashion-mnist/test-00019-t-shirt-top.png is a "T-shirt/top": compared as lowercase alphanumerics.
    """
    assert SAMPLES, "no images in samples/fashion-mnist/"
    wrong = []
    with httpx.Client(base_url=url, timeout=60) as client:
        for path in SAMPLES:
            expected = re.sub(r"^test-\d+-", "", path.stem)
            r = client.post("/classify", content=path.read_bytes(), headers={"Content-Type": "image/png"})
            if r.status_code != 200:
                wrong.append(f"{path.name}: HTTP {r.status_code} {r.text[:300]}")
                continue
            top = r.json()["results"][0]["predictions"][0]
            if _normalise(top["label"]) != _normalise(expected):
                wrong.append(f"{path.name}: {top['label']!r} ({top['probability']:.3f})")
    return wrong


# -- the install, as the Dockerfile does it ------------------------------------------------------------------------
def _pip(python: Path, *args: str) -> None:
    # pip needs this machine's index configuration (PIP_* variables, pip.conf), so it runs in this environment,
    # less what would point it at another Python.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    cmd = [str(python), "-m", "pip", *args, "--quiet"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    assert r.returncode == 0, f"`{shlex.join(cmd)}` failed ({r.returncode}):\n{(r.stdout + r.stderr)[-3000:]}"


def install_like_the_image(tmp: Path) -> Path:
    """A fresh venv with torch, then the project's wheel and its runtime dependencies; returns the venv's bin."""
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=300)
    python = venv / "bin" / "python"
    # The CPU image installs pyproject.toml's torch pin from the CPU index; here pip's configured find-links hold the
    # same CPU wheel, so the plain pin gets it.
    _pip(python, "install", TORCH_PIN)
    # The wheel is built from a copy of what the Dockerfile copies, as in the image (and no build/ or *.egg-info
    # is left in the checkout: setuptools' build/lib would put modules deleted since into later wheels).
    src = tmp / "src"
    src.mkdir()
    for name in PROJECT_FILES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, src / name)
    _pip(python, "wheel", "--no-deps", "--wheel-dir", str(tmp / "wheels"), str(src))
    (wheel,) = (tmp / "wheels").glob("puppet_cnn_serve-*.whl")
    _pip(python, "install", str(wheel))  # the runtime dependencies, resolved from pyproject.toml: no dev extra
    return venv / "bin"


IMPORT_EVERY_MODULE = r"""
import importlib, json, os, pkgutil, sys, sysconfig, traceback

errors, files = [], {}

def record(name):
    error = sys.exc_info()[1]
    if not isinstance(error, ModuleNotFoundError):
        raise error
    frames = [f for f in traceback.extract_tb(error.__traceback__) if "/model/" in f.filename or "/service/" in f.filename]
    purelib = sysconfig.get_path("purelib")
    where = f"{os.path.relpath(frames[-1].filename, purelib)}:{frames[-1].lineno}" if frames else "?"
    errors.append({"module": name, "missing": error.name, "where": where})

for package in ("model", "service"):
    try:
        files[package] = importlib.import_module(package).__file__
    except ImportError:
        record(package)
        continue
    prefix = package + "."
    for info in pkgutil.walk_packages(sys.modules[package].__path__, prefix, onerror=record):
        try:
            files[info.name] = importlib.import_module(info.name).__file__
        except ImportError:
            record(info.name)

print(json.dumps({"purelib": sysconfig.get_path("purelib"), "files": files, "errors": errors}))
"""


def check_every_module_imports(python: Path, env: dict[str, str], cwd: Path) -> int:
    r = subprocess.run(
        [str(python), "-c", IMPORT_EVERY_MODULE], env=env, cwd=cwd, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, f"importing the installed modules failed:\n{(r.stdout + r.stderr)[-3000:]}"
    report = json.loads(r.stdout.strip().splitlines()[-1])
    missing = [
        f"{e['module']} imports {e['missing']} (at {e['where']}), which `pip install .` does not install: "
        "not a runtime dependency"
        for e in report["errors"]
    ]
    assert not missing, (
        "add it to [project] dependencies in pyproject.toml, or move the code to tests/ or benchmarks/:\n"
        + "\n".join(missing)
    )
    purelib = Path(report["purelib"]).resolve()
    elsewhere = [f"{m}: {f}" for m, f in report["files"].items() if not Path(f).resolve().is_relative_to(purelib)]
    assert not elsewhere, f"imported from outside the venv's site-packages ({purelib}):\n" + "\n".join(elsewhere)
    assert {"service.cli", "service.server", "model.puppet"} <= report["files"].keys(), sorted(report["files"])
    return len(report["files"])


@pytest.mark.slow  # a fresh venv with torch: about a minute of pip, the image's tier (make test-slow)
def test_the_image_install_imports_and_serves(tmp_path):
    t0 = time.monotonic()
    venv_bin = install_like_the_image(tmp_path)
    pip_s = time.monotonic() - t0

    app_dir = tmp_path / "app"  # the image's WORKDIR: no source here, only the checkpoint
    env = image_like_env(venv_bin, app_dir)
    n_modules = check_every_module_imports(venv_bin / "python3", env, app_dir)

    entrypoint = dockerfile_entrypoint()  # python3 -m service.cli serve, found on the clean PATH as in the image
    assert shutil.which(entrypoint[0], path=env["PATH"]) == str(venv_bin / entrypoint[0]), entrypoint
    t0 = time.monotonic()
    server = ServerProcess({}, command=entrypoint, base_env=env, cwd=app_dir, timeout=READY_TIMEOUT_S)
    startup_s = time.monotonic() - t0
    try:
        wrong = classify_samples(server.url)
        assert not wrong, f"{len(wrong)} of {len(SAMPLES)} sample images misclassified:\n" + "\n".join(wrong)
    finally:
        output = server.stop()  # SIGTERM, then the drain
    assert server.proc.returncode == 0, f"exit status {server.proc.returncode} after SIGTERM:\n{output[-3000:]}"
    print(
        f"image install: pip {pip_s:.0f} s, {n_modules} modules import from site-packages, ready in {startup_s:.1f} s, "
        f"{len(SAMPLES)}/{len(SAMPLES)} samples right, exit 0 on SIGTERM"
    )


# -- the image itself, where a Docker engine is present -------------------------------------------------------------
def _docker() -> str:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no Docker engine here (docker is not installed)")
    try:
        r = subprocess.run([docker, "info"], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.skip("no Docker engine here (docker info did not answer in 60 s)")
    if r.returncode != 0:
        reason = (r.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"no Docker engine here (docker info: {reason})")
    return docker


def test_the_cpu_image_serves(tmp_path):
    docker = _docker()
    tag = "puppet-cnn-serve:test"
    build = [
        docker,
        "build",
        "--build-arg",
        "BASE_IMAGE=python:3.11-slim-bookworm",
        "--build-arg",
        "VARIANT=cpu",
        "-t",
        tag,
        str(ROOT),
    ]
    t0 = time.monotonic()
    # BuildKit: the runtime stage mounts the wheel stage's output (RUN --mount); the default builder since Docker 23.
    r = subprocess.run(build, capture_output=True, text=True, env={**os.environ, "DOCKER_BUILDKIT": "1"}, timeout=3600)
    assert r.returncode == 0, f"`{shlex.join(build)}` failed:\n{(r.stdout + r.stderr)[-5000:]}"
    build_s = time.monotonic() - t0

    port = free_port()
    name = f"puppet-cnn-serve-test-{uuid.uuid4().hex[:8]}"
    run = [docker, "run", "--detach", "--name", name, "-p", f"127.0.0.1:{port}:8000", tag]
    r = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"`{shlex.join(run)}` failed:\n{r.stdout + r.stderr}"

    def logs() -> str:
        out = subprocess.run([docker, "logs", name], capture_output=True, text=True, timeout=60)
        return (out.stdout + out.stderr)[-3000:]

    def state(field: str) -> str:
        out = subprocess.run([docker, "inspect", "-f", f"{{{{.State.{field}}}}}", name], capture_output=True, text=True)
        return out.stdout.strip()

    def running() -> bool:
        return state("Running") == "true"

    try:
        url = f"http://127.0.0.1:{port}"
        t0 = time.monotonic()
        if not wait_ready(url + "/health/ready", READY_TIMEOUT_S, running=running, interval=0.5, request_timeout=2):
            assert running(), f"the container exited ({state('ExitCode')}):\n{logs()}"
            pytest.fail(f"not ready in {READY_TIMEOUT_S:.0f} s:\n{logs()}")
        startup_s = time.monotonic() - t0
        wrong = classify_samples(url)
        assert not wrong, f"{len(wrong)} of {len(SAMPLES)} sample images misclassified:\n" + "\n".join(wrong)
        subprocess.run([docker, "stop", "--time", "30", name], capture_output=True, timeout=120)  # STOPSIGNAL SIGTERM
        assert state("ExitCode") == "0", f"exit status {state('ExitCode')} after SIGTERM:\n{logs()}"
    finally:
        subprocess.run([docker, "rm", "--force", name], capture_output=True, timeout=120)
    print(
        f"CPU image: built in {build_s:.0f} s, ready in {startup_s:.1f} s, {len(SAMPLES)}/{len(SAMPLES)} samples right"
    )
