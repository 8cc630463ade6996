"""The Ray pipeline end to end on the packaged SmolLM2 pair (CPU actors), plus resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from nla_ray import pipeline
from nla_ray.config import load_config

REPO = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.ray, pytest.mark.integration]


def _run_job(out: Path, *extra: str) -> dict:
    cmd = [sys.executable, str(REPO / "jobs" / "reproduce_fve.py"), "--preset", "mini", "--n", "6",
           "--out", str(out), "--set", "av.max_new_tokens=16", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


def test_reproduce_fve_runs_resumes_and_is_deterministic(tmp_path):
    out = tmp_path / "run"
    s1 = _run_job(out)
    h = s1["headline"]
    assert h["n"] + s1["documents"]["short_skipped"] * 0 >= 5
    assert h["fve_own"]["denominator"] == "own_set"
    assert np.isfinite(h["nmse"]) and 0 <= h["nmse"] <= 4
    # NMSE = 2(1 - cos) row by row at mse_scale = sqrt(d)
    t = pq.read_table(out / "rows.parquet")
    t = t.filter(np.asarray(t.column("position").to_numpy()) >= 0)
    np.testing.assert_allclose(t.column("nmse").to_numpy(), 2 * (1 - t.column("cos").to_numpy()), atol=1e-4)
    for col in ("doc_id", "n_raw_tokens", "layer", "vector", "recon", "explanation", "status", "model_id",
                "seed", "sample_idx", "av_worker", "ar_t1"):
        assert col in t.column_names
    assert s1["provenance"]["preset"] == "mini" and s1["provenance"]["git_commit"]
    assert set(s1["timeline"]["stages"]) == {"extract", "av", "ar"}
    # Same command again: every document is already finished, nothing is recomputed.
    s2 = _run_job(out)
    assert s2["run"]["docs_submitted"] == 0 and s2["run"]["docs_skipped_done"] == s1["run"]["docs_total"]
    assert s2["headline"]["fve_own"]["value"] == h["fve_own"]["value"]
    # A fresh second run with the same seed is bit-identical.
    s3 = _run_job(tmp_path / "run2", "--verify-against", str(out))
    assert s3["verify_against"]["bit_identical"], s3["verify_against"]


def test_partial_documents_are_redone(tmp_path):
    rows = tmp_path / "rows"
    rows.mkdir()
    batch = {"doc_id": np.array(["a", "a", "b"], dtype=object), "position": np.array([60, 70, -1]),
             "positions_in_doc": np.array([3, 3, 0]), "sample_idx": np.array([0, 0, 0]),
             "layer": np.array([1, 1, 1]), "vector": np.zeros((3, 4), np.float32)}
    pq.write_table(pipeline._to_arrow(batch), rows / "part-0.parquet")
    done = pipeline.completed_docs(pipeline.read_parts(rows), n_samples=1)
    assert done == {"b"}  # 'a' has 2 of 3 positions: redo it; 'b' is a short-document marker
    assert pipeline.completed_docs(pipeline.read_parts(rows), n_samples=2) == {"b"}


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="bogus"):
        load_config("mini", overrides=["bogus=1"])
    with pytest.raises(ValueError, match="unknown pool"):
        load_config("mini", overrides=["pools.nope.num_gpus=1"])
    with pytest.raises(ValueError, match="unknown preset"):
        load_config("nope")
    c = load_config("mini", overrides=["av.temperature=1.0", "pools.av.num_gpus=0.5"])
    assert c.av.temperature == 1.0 and c.pools["av"].num_gpus == 0.5


def test_resume_refuses_rows_of_another_run(tmp_path):
    """Rows made with another pair or row-shaping config must not be mixed into a resumed run."""
    from nla_ray.config import load_config

    cfg = load_config("mini")
    fp = pipeline.run_fingerprint(cfg)
    assert set(fp) >= {"pair", "av", "layer", "pair_files", "dtypes"}
    assert fp == pipeline.run_fingerprint(load_config("mini", overrides=["n_docs=3", "bootstrap=10"]))
    rows = tmp_path / "rows"
    rows.mkdir()
    pipeline._check_resume(rows, fp)  # empty dir: records the fingerprint
    assert json.loads((rows / "RUN.json").read_text()) == fp
    (rows / "part-0.parquet").write_bytes(b"")
    pipeline._check_resume(rows, fp)  # same run: fine
    other = pipeline.run_fingerprint(load_config("mini", overrides=["av.temperature=1.0"]))
    with pytest.raises(pipeline.RunMismatch, match="av:.*--fresh"):
        pipeline._check_resume(rows, other)
    (rows / "RUN.json").unlink()
    with pytest.raises(pipeline.RunMismatch, match="no RUN.json"):
        pipeline._check_resume(rows, fp)
