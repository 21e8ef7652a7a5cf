"""Container tooling for the image tests (tests/test_image.py), all from Debian's packages, as root.

No public base image can be pulled here (no Docker Hub), so the base is a Debian 12 root made with debootstrap and
imported into buildah's store; buildah builds the real Dockerfile from it; a Docker engine started for the test
runs what was built. A package mirror on loopback stands in for a company's: the CPU torch wheel that pip's own
configuration finds on this machine, every other project redirected to PyPI.
"""

from __future__ import annotations

import contextlib
import hashlib
import html
import http.server
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

from benchmarks.server_process import free_port

# The Debian packages the tests install when missing: debootstrap makes the base, buildah builds, podman imports and
# saves images, docker.io is the engine (dockerd; /usr/local/bin/docker may be a client only).
DEB_PACKAGES = ("debootstrap", "buildah", "podman", "docker.io")
DOCKER = "/usr/bin/docker"  # docker.io's client, of the engine's version
DEBIAN_MIRROR = os.environ.get("PUPPET_DEBIAN_MIRROR", "http://deb.debian.org/debian")
# Made once and kept: the Debian root (a tarball) and the engine's image store. Outside the checkout.
CACHE = Path(os.environ.get("PUPPET_IMAGE_CACHE", Path.home() / ".cache" / "puppet-cnn-serve" / "image"))
PYPI_SIMPLE = "https://pypi.org/simple"
MIRROR_PORT = int(os.environ.get("PUPPET_IMAGE_MIRROR_PORT", "38641"))


class Unavailable(Exception):
    """What the machine lacks to run the image tests (the tests skip with it as the reason)."""


def run(cmd: list[str], *, timeout: float = 600, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """A command at the lowest CPU and I/O priority (the machine is shared), its output captured."""
    r = subprocess.run(
        ["nice", "-n", "19", "ionice", "-c3", *cmd], capture_output=True, text=True, timeout=timeout, **kwargs
    )
    if check and r.returncode != 0:
        raise AssertionError(f"`{' '.join(cmd)[:300]}` failed ({r.returncode}):\n{(r.stdout + r.stderr)[-4000:]}")
    return r


def ensure_debian_packages(packages=DEB_PACKAGES) -> None:
    """Install what is missing, as the Makefile's system-deps does; raise Unavailable where that cannot be done."""
    missing = [
        p
        for p in packages
        if "install ok installed"
        not in subprocess.run(["dpkg-query", "-W", "-f=${Status}", p], capture_output=True, text=True).stdout
    ]
    if not missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise Unavailable(f"missing Debian packages {', '.join(missing)}: run as root on Debian, or install them")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update", "-qq"], env=env)
    run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], env=env, timeout=1800)


# -- the base image ------------------------------------------------------------------------------------------------
def local_base(name: str, packages: tuple[str, ...]) -> str:
    """A Debian 12 (bookworm) minbase root with `packages`, imported into buildah's store as localhost/<name>:<tag>,
    the tag a digest of the packages and mirror; made by debootstrap once and kept as a tarball under CACHE."""
    tag = hashlib.sha256(" ".join((DEBIAN_MIRROR, *sorted(packages))).encode()).hexdigest()[:12]
    ref = f"localhost/{name}:{tag}"
    if run(["podman", "image", "exists", ref], check=False).returncode == 0:
        return ref
    tarball = CACHE / f"{name}-{tag}.tar"
    if not tarball.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            root = Path(tmp) / "root"
            run(["debootstrap", "--variant=minbase", "bookworm", str(root), DEBIAN_MIRROR], timeout=1800)
            # apt, not debootstrap's --include, resolves the packages' dependencies (it left python3.11-venv's out)
            env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive", "LANG": "C.UTF-8"}
            if packages:
                run(["chroot", str(root), "apt-get", "update", "-qq"], env=env, timeout=600)
                run(
                    ["chroot", str(root), "apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages],
                    env=env,
                    timeout=1800,
                )
                run(["chroot", str(root), "apt-get", "clean"], env=env)
            # no apt lists or package cache in the base, as in Debian's own images
            for leftover in (root / "var/lib/apt/lists", root / "var/cache/apt/archives"):
                for path in leftover.glob("*"):
                    if path.is_file():
                        path.unlink()
            run(["tar", "-C", str(root), "-cf", str(tarball) + ".tmp", "."], timeout=600)
            os.replace(str(tarball) + ".tmp", tarball)
    run(["podman", "import", str(tarball), ref], timeout=600)
    return ref


@contextlib.contextmanager
def mounted(ref: str) -> Iterator[Path]:
    """The root file system of an image in buildah's store, mounted for reading (`buildah run` needs rlimits that
    this machine refuses)."""
    container = run(["buildah", "from", "--pull-never", ref]).stdout.strip().splitlines()[-1]
    try:
        yield Path(run(["buildah", "mount", container]).stdout.strip())
    finally:
        run(["buildah", "rm", container], check=False)


def image_file(ref: str, path: str) -> str:
    with mounted(ref) as root:
        return (root / path.lstrip("/")).read_text()


def extra_ca_certs(base_ref: str) -> str:
    """The certificates this machine trusts that the base's own bundle lacks (a TLS-intercepting proxy's CA), as PEM:
    what a build behind that proxy passes as EXTRA_CA_CERTS."""
    pem = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)
    host = Path(os.environ.get("SSL_CERT_FILE") or "/etc/ssl/certs/ca-certificates.crt").read_text()
    known = set(pem.findall(image_file(base_ref, "/etc/ssl/certs/ca-certificates.crt")))
    return "\n".join(c for c in pem.findall(host) if c not in known)


# -- a package mirror --------------------------------------------------------------------------------------------
def find_cpu_torch_wheel(pin: str, into: Path) -> Path:
    """The CPU torch wheel at `pin`, fetched by pip with this machine's own configuration (its find-links here)."""
    into.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    pip = [str(Path(os.sys.executable).parent / "python"), "-m", "pip"]
    run([*pip, "download", pin, "--no-deps", "--only-binary=:all:", "-d", str(into), "-q"], env=env, timeout=1800)
    wheels = [w for w in into.glob("torch-*.whl") if "+cpu" in w.name]
    if not wheels:
        raise Unavailable(f"pip finds no CPU wheel for {pin} here (found {[w.name for w in into.iterdir()]})")
    return wheels[0]


class _MirrorHandler(http.server.BaseHTTPRequestHandler):
    wheels: ClassVar[dict[str, list[Path]]] = {}  # set per server: normalised project name -> local files

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):
        path = urllib.parse.unquote(self.path.split("?")[0])
        m = re.fullmatch(r"/simple/([^/]+)/?", path)
        if m:
            project = re.sub(r"[-_.]+", "-", m[1]).lower()
            files = self.wheels.get(project)
            if files is None:  # not held here: the upstream index, as a caching mirror answers
                self.send_response(302)
                self.send_header("Location", f"{PYPI_SIMPLE}/{project}/")
                self.end_headers()
                return
            links = "".join(f'<a href="/files/{urllib.parse.quote(f.name)}">{html.escape(f.name)}</a>\n' for f in files)
            body = f"<!DOCTYPE html><html><body>\n{links}</body></html>\n".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        held = {f.name: f for files in self.wheels.values() for f in files}
        if path.startswith("/files/") and path[len("/files/") :] in held:
            f = held[path[len("/files/") :]]
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(f.stat().st_size))
            self.end_headers()
            with f.open("rb") as src:
                shutil.copyfileobj(src, self.wfile)
            return
        self.send_error(404)


@contextlib.contextmanager
def package_mirror(wheels: list[Path]) -> Iterator[str]:
    """A PEP 503 index on loopback holding `wheels`, every other project redirected to PyPI; yields its URL."""
    handler = type("Handler", (_MirrorHandler,), {"wheels": {}})
    for w in wheels:
        handler.wheels.setdefault(re.sub(r"[-_.]+", "-", w.name.split("-")[0]).lower(), []).append(w)
    try:  # a steady address keeps buildah's layer cache (the URL is a build argument); any free one otherwise
        server = http.server.ThreadingHTTPServer(("127.0.0.1", MIRROR_PORT), handler)
    except OSError:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/simple"
    finally:
        server.shutdown()
        server.server_close()


# -- the engine ----------------------------------------------------------------------------------------------------
class Engine:
    """A Docker engine of its own (dockerd on a private socket, data root under CACHE), stopped by `stop()`.

    --iptables=false: the machine's firewall rules are left alone; published ports go through docker-proxy instead.
    """

    def __init__(self, work: Path):
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.sock = work / "docker.sock"
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{self.sock}"}
        self.log_path = work / "dockerd.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90) -> Engine:
        exec_root = Path(tempfile.mkdtemp(prefix="dockerd-exec-", dir="/run" if os.access("/run", os.W_OK) else None))
        self.exec_root = exec_root
        cmd = [
            "nice", "-n", "19", "ionice", "-c3",
            "dockerd", "--iptables=false", "--host", f"unix://{self.sock}",
            "--data-root", str(CACHE / "docker"), "--exec-root", str(exec_root),
            "--pidfile", str(self.work / "dockerd.pid"),
        ]  # fmt: skip
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise Unavailable(f"dockerd exited ({self.proc.returncode}): {self.log_tail()}")
            if self.sock.exists() and self.docker("info", check=False, timeout=30).returncode == 0:
                return self
            time.sleep(0.5)
        self.stop()
        raise Unavailable(f"dockerd did not answer in {timeout:.0f} s: {self.log_tail()}")

    def log_tail(self, n: int = 1500) -> str:
        return self.log_path.read_text()[-n:] if self.log_path.exists() else ""

    def docker(self, *args: str, check: bool = True, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
        r = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout, env=self.env, **kwargs)
        if check and r.returncode != 0:
            raise AssertionError(
                f"`docker {' '.join(args)[:300]}` failed ({r.returncode}):\n{(r.stdout + r.stderr)[-4000:]}"
            )
        return r

    def load_from_buildah(self, ref: str, tag: str) -> None:
        """Hand an image from buildah's store to the engine (as a docker archive), under `tag`."""
        save = subprocess.Popen(
            ["nice", "-n", "19", "podman", "save", "--format", "docker-archive", ref],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        load = subprocess.run(
            [DOCKER, "load"], stdin=save.stdout, capture_output=True, text=True, env=self.env, timeout=1800
        )
        save.stdout.close()
        save_err = save.stderr.read().decode()
        assert save.wait(timeout=600) == 0, f"podman save {ref} failed: {save_err[-2000:]}"
        assert load.returncode == 0, f"docker load failed: {load.stderr[-2000:]}"
        loaded = re.findall(r"Loaded image(?: ID)?: (\S+)", load.stdout)
        assert loaded, load.stdout
        self.docker("tag", loaded[-1], tag)

    def stop(self) -> None:
        """Remove what runs on the engine, then stop it (SIGTERM; SIGKILL after 60 s) and its containerd."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            ids = self.docker("ps", "-aq", check=False, timeout=60).stdout.split()
            if ids:
                self.docker("rm", "--force", *ids, check=False, timeout=300)
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(timeout=30)
        self.proc = None
        shutil.rmtree(self.exec_root, ignore_errors=True)
