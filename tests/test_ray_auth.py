"""A driver that cannot authenticate to a token-auth Ray cluster gets one line and a non-zero exit at
once (issue #13 part 4), instead of Ray's ~20 s of a warning a second and a ConnectionError."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nla_ray.runtime import ray_auth
from nla_ray.runtime.local_head import free_ports, stop_processes_with

REPO = Path(__file__).resolve().parent.parent
SECRET = "nla-ray-test-token-5f0c2d9e1b7a"


def test_the_token_is_found_where_ray_looks(tmp_path):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    named = tmp_path / "tok"
    named.write_text("from-path\n")
    assert ray_auth.driver_token({"HOME": str(home)}) == (None, "")
    (home / ".ray" / "auth_token").write_text("from-home")
    assert ray_auth.driver_token({"HOME": str(home)}) == ("from-home", str(home / ".ray" / "auth_token"))
    assert ray_auth.driver_token({"HOME": str(home), "RAY_AUTH_TOKEN_PATH": str(named)}) == (
        "from-path", f"RAY_AUTH_TOKEN_PATH={named}")
    env = {"HOME": str(home), "RAY_AUTH_TOKEN_PATH": str(named), "RAY_AUTH_TOKEN": "from-env"}
    assert ray_auth.driver_token(env) == ("from-env", "RAY_AUTH_TOKEN")


def test_only_gcs_addresses_are_probed():
    assert ray_auth.gcs_address("10.0.0.5:6379") == "10.0.0.5:6379"
    for not_one in (None, "", "auto", "local", "ray://head:10001", "http://127.0.0.1:8265", "head"):
        assert ray_auth.gcs_address(not_one) is None
        assert ray_auth.token_problem(not_one, {"RAY_AUTH_MODE": "token"}) == ""


def test_token_mode_without_a_token_needs_no_cluster(tmp_path):
    msg = ray_auth.token_problem("127.0.0.1:1", {"RAY_AUTH_MODE": "token", "HOME": str(tmp_path)})
    assert "RAY_AUTH_MODE=token" in msg and "no token" in msg and "RAY_AUTH_TOKEN" in msg
    assert str(tmp_path / ".ray" / "auth_token") in msg and "\n" not in msg


@pytest.fixture(scope="module")
def auth_head(tmp_path_factory):
    """A Ray head of this module's own with token authentication (loopback, free ports, its own temp
    dir and HOME; its token comes from RAY_AUTH_TOKEN, so no token file is written anywhere)."""
    tmp = tmp_path_factory.mktemp("auth")
    home = tmp / "head_home"
    home.mkdir()
    temp_dir = Path(f"/tmp/nlauth{os.getpid()}")  # short: Ray's socket paths must stay < 108 bytes
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=SECRET, HOME=str(home),
               PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    gcs, agent, grpc, renv, metrics = free_ports(5)
    r = subprocess.run([str(Path(sys.executable).parent / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1",
                        "--port", gcs, "--num-cpus", "1", "--include-dashboard", "false",
                        "--dashboard-agent-listen-port", agent, "--dashboard-agent-grpc-port", grpc,
                        "--runtime-env-agent-port", renv, "--metrics-export-port", metrics,
                        "--temp-dir", str(temp_dir), "--disable-usage-stats"],
                       env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    try:
        yield f"127.0.0.1:{gcs}", tmp
    finally:
        # Only this head's processes (they carry its temp dir); some of Ray's ignore SIGTERM for a while.
        stop_processes_with(str(temp_dir), timeout=3)
        import shutil

        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.ray
def test_each_way_of_lacking_the_token_is_named(auth_head, tmp_path):
    address, _ = auth_head
    empty = str(tmp_path)  # a HOME without ~/.ray/auth_token
    cases = {
        "unset": ({"HOME": empty}, ["requires a token", "sends none", "RAY_AUTH_MODE is not set",
                                     "export RAY_AUTH_MODE=token", "RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token"]),
        "disabled": ({"HOME": empty, "RAY_AUTH_MODE": "disabled"}, ["RAY_AUTH_MODE is disabled here"]),
        "wrong": ({"HOME": empty, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "not-the-one"},
                  ["refused the token this driver sends (from RAY_AUTH_TOKEN)", "ray get-auth-token"]),
        "none": ({"HOME": empty, "RAY_AUTH_MODE": "token"}, ["has no token"]),
    }
    for name, (env, words) in cases.items():
        t0 = time.time()
        msg = ray_auth.token_problem(address, env)
        assert time.time() - t0 < 5, name
        assert all(w in msg for w in words) and "\n" not in msg, (name, msg)
    # a token at hand but the mode not set: says that only the mode is missing
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text(SECRET)
    assert "only RAY_AUTH_MODE=token is missing" in ray_auth.token_problem(address, {"HOME": empty})
    # the right token: nothing to say
    assert ray_auth.token_problem(address, {"HOME": empty, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": SECRET}) == ""
    assert ray_auth.token_problem(address, {"HOME": empty, "RAY_AUTH_MODE": "token"}) == ""


@pytest.mark.ray
def test_a_job_without_the_token_exits_with_one_line(auth_head, tmp_path, monkeypatch):
    address, _ = auth_head
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["HOME"] = str(tmp_path)
    t0 = time.time()
    r = subprocess.run([sys.executable, str(REPO / "jobs" / "reproduce_fve.py"), "--preset", "mini", "--n", "1",
                        "--out", str(tmp_path / "out"), "--ray-address", address],
                       env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    took = time.time() - t0
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: the Ray cluster at " + address), r.stderr
    assert "RAY_AUTH_MODE" in lines[0] and "RAY_AUTH_TOKEN" in lines[0]
    assert took < 15, took  # Ray alone: ~20 s of retries before its ConnectionError
    assert not (tmp_path / "out").exists()
    # the library path (tune sweeps, the store) stops at the same check, before ray.init
    import ray

    from nla_ray.runtime import pipeline

    ray.shutdown()
    for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ray_auth.RayTokenError, match="requires a token"):
        pipeline.init_ray(address)
    assert not ray.is_initialized()
