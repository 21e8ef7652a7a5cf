"""`python -m benchmarks.revision_ab BASE [HEAD]`: the service at two git revisions, side by side, under wrk.

For a change that is not meant to be faster but runs on every request (a deadline on reading, a wrapper on the
transport), the question is what it costs. Each revision is checked out into a temporary worktree and served
from there with this environment's packages and the benchmark's server environment (two workers, the
Makefile's glibc settings); both run at once (the idle one waits) and alternate run by run at each concurrency, after a warm-up, and the medians and their ratio
are printed. Default: the working tree's HEAD against BASE.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.server_process import SERVER_ENV, ServerProcess
from benchmarks.service_bench import REPO, WRK_SCRIPT, run_wrk, write_images
from model import SHIPPED_CHECKPOINT


def _worktree(revision: str, folder: Path) -> Path:
    path = folder / revision.replace("/", "_")
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), revision], check=True)
    return path


def _serve(tree: Path) -> ServerProcess:
    env = {
        **SERVER_ENV,
        "PYTHONPATH": str(tree),
        "PUPPET_CHECKPOINT": str(tree / SHIPPED_CHECKPOINT.relative_to(REPO)),
    }
    return ServerProcess({}, env=env, cwd=tree, command=[sys.executable, "-m", "service.cli", "serve"])


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.revision_ab", description=__doc__.splitlines()[0])
    p.add_argument("base")
    p.add_argument("head", nargs="?", default="HEAD")
    p.add_argument("--concurrency", type=lambda t: [int(x) for x in t.split(",")], default=[1, 32])
    p.add_argument("--seconds", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="revision-ab-") as tmp:
        folder = Path(tmp)
        trees = {rev: _worktree(rev, folder) for rev in (args.base, args.head)}
        images = write_images(64, Path(tempfile.mkdtemp(dir=tmp)))
        script = folder / "classify.lua"
        script.write_text(WRK_SCRIPT)
        results: dict[tuple[str, int], list[float]] = {}
        servers = {}
        try:
            servers = {rev: _serve(tree) for rev, tree in trees.items()}  # both up; the idle one waits
            for c in args.concurrency:
                for server in servers.values():  # warm at this concurrency, unmeasured
                    run_wrk(server.url + "/classify", c, 2, script, images)
                for _ in range(args.repeats):
                    for rev, server in servers.items():
                        r = run_wrk(server.url + "/classify", c, args.seconds, script, images)
                        results.setdefault((rev, c), []).append(r["rps"])
                        print(f"{rev:>12} c={c:<3} {r['rps']:8.1f} req/s  p99 {r['p99']:.1f} ms", flush=True)
        finally:
            for server in servers.values():
                server.stop()
            for tree in trees.values():
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)
    print("\nmedian req/s" + "".join(f"  {rev:>12}" for rev in trees) + "   head/base")
    for c in args.concurrency:
        medians = [statistics.median(results[(rev, c)]) for rev in trees]
        print(f"c={c:<10}" + "".join(f"  {m:12.1f}" for m in medians) + f"   {medians[1] / medians[0]:.3f}")
    return 0


if __name__ == "__main__":
    os.chdir(REPO)
    sys.exit(main())
