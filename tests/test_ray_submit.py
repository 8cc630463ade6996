"""`ray job submit` works: a local head (loopback only), one submitted job, the head stopped after."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
from nla_ray.runtime.local_head import free_ports, stop_processes_with  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.integration]


def _ray_bin() -> str:
    return str(Path(sys.executable).parent / "ray")


def _stop_head(session: str, port: str) -> None:
    """Stop only the head this test started. `ray stop` would kill every Ray process on the machine,
    including a user's own cluster or job running beside the tests."""
    stop_processes_with(session, timeout=5)  # Ray processes that ignore SIGTERM get SIGKILL after 5 s
    # `ray stop` also forgets the head; without this, a later ray.init() would try to join it.
    current = Path("/tmp/ray/ray_current_cluster")
    if current.is_file() and current.read_text().strip().endswith(f":{port}"):  # Ray writes the host's IP
        current.unlink()


@pytest.fixture
def ray_head(tmp_path):
    # Put this interpreter's bin first: `make test` runs .venv/bin/python without activating the venv,
    # and the job's entrypoint must find the same environment's packages.
    env = dict(os.environ, RAY_AUTH_MODE="token",
               PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    port, dash = "6391", "8273"
    # The agents' default ports are fixed (52365, ...): another Ray instance on this machine (a job
    # running beside the tests) holds them and this head's job agent never comes up. Free ones instead.
    agent, grpc, renv, metrics = free_ports(4)
    start = [_ray_bin(), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", port,
             "--dashboard-host", "127.0.0.1", "--dashboard-port", dash, "--num-cpus", "6",
             "--dashboard-agent-listen-port", agent, "--dashboard-agent-grpc-port", grpc,
             "--runtime-env-agent-port", renv, "--metrics-export-port", metrics, "--disable-usage-stats"]
    r = subprocess.run(start, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    # This head's session directory: its processes carry it on their command lines, which is how
    # teardown finds them again (and only them).
    session = Path(os.path.realpath("/tmp/ray/session_latest")).name
    try:
        yield f"http://127.0.0.1:{dash}", env
    finally:
        _stop_head(session, port)


def test_submit_cross_family(ray_head, tmp_path):
    """The README's headline command, submitted to a local head: both families, six pools."""
    address, env = ray_head
    out = tmp_path / "submitted"
    cmd = [_ray_bin(), "job", "submit", "--address", address, "--working-dir", str(REPO),
           "--runtime-env-json", json.dumps({"env_vars": {"NLA_RAY_GIT_COMMIT": "test-commit"}}),
           "--", sys.executable, "jobs/cross_family.py", "--preset", "mini", "--n", "4", "--out", str(out),
           "--store", str(tmp_path / "store"), "--set", "av.max_new_tokens=12"]
    t0 = time.time()
    for _ in range(6):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
        # A fresh head's job agent registers a few seconds after `ray start` returns (longer on a busy box).
        if "No available agent" not in r.stdout + r.stderr:
            break
        time.sleep(10)
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
