"""`ray job submit` works: a local head (loopback only), one submitted job, the head stopped after."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.ray, pytest.mark.integration]


def _ray_bin() -> str:
    return str(Path(sys.executable).parent / "ray")


@pytest.fixture
def ray_head(tmp_path):
    # Put this interpreter's bin first: `make test` runs .venv/bin/python without activating the venv,
    # and the job's entrypoint must find the same environment's packages.
    env = dict(os.environ, RAY_AUTH_MODE="token",
               PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    port, dash = "6391", "8273"
    start = [_ray_bin(), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", port,
             "--dashboard-host", "127.0.0.1", "--dashboard-port", dash, "--num-cpus", "6",
             "--disable-usage-stats"]
    r = subprocess.run(start, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    try:
        yield f"http://127.0.0.1:{dash}", env
    finally:
        subprocess.run([_ray_bin(), "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_submit_cross_family(ray_head, tmp_path):
    """The README's headline command, submitted to a local head: both families, six pools."""
    address, env = ray_head
    out = tmp_path / "submitted"
    cmd = [_ray_bin(), "job", "submit", "--address", address, "--working-dir", str(REPO),
           "--runtime-env-json", json.dumps({"env_vars": {"NLA_RAY_GIT_COMMIT": "test-commit"}}),
           "--", sys.executable, "jobs/cross_family.py", "--preset", "mini", "--n", "4", "--out", str(out),
           "--store", str(tmp_path / "store"), "--set", "av.max_new_tokens=12"]
    t0 = time.time()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    if r.returncode != 0:
        # Surface the job's own traceback, not just the CLI's one-line verdict.
        print("---- job stdout tail ----\n" + r.stdout[-6000:] + "\n---- stderr tail ----\n" + r.stderr[-3000:])
    assert r.returncode == 0, "ray job submit failed; the job's output is printed above"
    assert "succeeded" in (r.stdout + r.stderr)
    s = json.loads((out / "summary.json").read_text())
    assert set(s["headline"]["fve"]) == {"aa", "ab", "ba", "bb"}
    assert s["cells"]["ab"]["n"] >= 3  # 4 activations, an unaligned one at most dropped
    assert s["provenance"]["git_commit"] == "test-commit"
    assert time.time() - t0 < 600
