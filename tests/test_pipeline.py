"""The Ray pipeline end to end on the packaged SmolLM2 pair (CPU actors), plus resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from nla_ray.config import load_config
from nla_ray.core.table import to_arrow
from nla_ray.runtime import pipeline
from nla_ray.runtime.rows import RowParts, RunMismatch, completed_docs, read_parts

REPO = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.ray, pytest.mark.integration]


def _run_job(out: Path, *extra: str) -> dict:
    cmd = [sys.executable, str(REPO / "jobs" / "reproduce_fve.py"), "--preset", "mini", "--n", "6",
           "--out", str(out), "--store", str(out.parent / "store"), "--set", "av.max_new_tokens=16", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


def test_reproduce_fve_runs_resumes_and_is_deterministic(tmp_path):
    out = tmp_path / "run"
    s1 = _run_job(out)
    h = s1["headline"]
    assert h["n"] == 6  # --n means exactly that many activations
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
    # An empty store: documents streamed through the three pools side by side.
    assert set(s1["timeline"]["stages"]) == {"extract", "av", "ar"}
    # Same command again: every document is already finished, nothing is recomputed.
    s2 = _run_job(out)
    assert s2["run"]["arms"]["main"]["docs_submitted"] == 0
    assert s2["run"]["arms"]["main"]["docs_skipped_done"] == s1["run"]["arms"]["main"]["docs_total"]
    assert s2["headline"]["fve_own"]["value"] == h["fve_own"]["value"]
    # A second run into a new dir reads the stored activations (no extraction): the same explanations,
    # and reconstructions equal up to float32 rounding (its AR batches may be composed differently).
    s3 = _run_job(tmp_path / "run2", "--verify-against", str(out))
    assert set(s3["timeline"]["stages"]) == {"av", "ar"}
    v = s3["verify_against"]
    assert v["rows_compared"] == 6 and v["identical_explanations"] == 6, v
    assert v["max_abs_recon_diff"] < 1e-4, v


def test_partial_documents_are_redone(tmp_path):
    rows = tmp_path / "rows"
    rows.mkdir()
    batch = {"doc_id": np.array(["a", "a", "b"], dtype=object), "position": np.array([60, 70, -1]),
             "positions_in_doc": np.array([3, 3, 0]), "sample_idx": np.array([0, 0, 0]),
             "layer": np.array([1, 1, 1]), "vector": np.zeros((3, 4), np.float32)}
    pq.write_table(to_arrow(batch), rows / "part-0.parquet")
    done = completed_docs(read_parts(rows), per_position=1)
    assert done == {"b"}  # 'a' has 2 of 3 positions: redo it; 'b' is a short-document marker
    assert completed_docs(read_parts(rows), per_position=2) == {"b"}


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
    from nla_ray.nla import pairs
    from nla_ray.runtime.stages import ar_spec, av_spec

    def fp(cfg):
        d = pairs.resolve_pair(cfg.pair)
        return {"stages": pipeline.stages_fingerprint([av_spec(cfg, d.av), ar_spec(cfg, d.ar)])}

    cfg = load_config("mini")
    f = fp(cfg)
    assert f["stages"][0]["kwargs"]["av_dir"]["sha256"] and f["stages"][0]["device"] == "cpu"
    # sizes and batch sizes do not change what a row holds
    assert f == fp(load_config("mini", overrides=["n_docs=3", "bootstrap=10", "pools.av.batch_size=3"]))
    parts = RowParts(tmp_path / "rows")
    parts.check(f)  # empty dir: records the fingerprint
    assert json.loads((tmp_path / "rows" / "RUN.json").read_text()) == f
    (tmp_path / "rows" / "part-0.parquet").write_bytes(b"")
    parts.check(f)  # same run: fine
    with pytest.raises(RunMismatch, match="stages:.*--fresh"):
        parts.check(fp(load_config("mini", overrides=["av.temperature=1.0"])))
    (tmp_path / "rows" / "RUN.json").unlink()
    with pytest.raises(RunMismatch, match="no RUN.json"):
        parts.check(f)


def test_n_is_exact_and_refuses_nonsense():
    import argparse

    from nla_ray.config import add_job_args, config_from_args

    p = argparse.ArgumentParser()
    add_job_args(p, "x")
    cfg = config_from_args(p.parse_args(["--n", "12"]))
    assert cfg.n == 12 and cfg.n_docs == 3
    for bad in ("0", "-3"):
        with pytest.raises(ValueError, match="--n must be a positive"):
            config_from_args(p.parse_args(["--n", bad]))


_FULL_BATCHES = r"""
import sys, collections, numpy as np, ray, ray.data as rd
from nla_ray.runtime.pipeline import full_batches
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
class Expand:  # a pool that turns each document into 5 rows, like extraction at 5 positions
    def __call__(self, b):
        return {"id": np.repeat(b["id"], 5)}
class Count:
    def __call__(self, b):
        return {"n": np.full(len(b["id"]), len(b["id"]))}
for repartition in (False, True):
    ds = rd.from_items([{"id": i} for i in range(200)], override_num_blocks=25)
    ds = ds.map_batches(Expand, batch_size=8, compute=rd.ActorPoolStrategy(size=1))
    if repartition:
        ds = full_batches(ds, 256)
    ds = ds.map_batches(Count, batch_size=256, compute=rd.ActorPoolStrategy(size=1))
    sizes = collections.Counter(int(n) for n in ds.to_pandas()["n"])
    print(repartition, sorted((size, rows // size) for size, rows in sizes.items()))
"""


def test_a_pool_downstream_of_another_gets_full_batches(tmp_path):
    """1000 rows arriving in 40-row blocks before a 256-row pool: Ray Data alone cuts a remainder from
    every bundle (256 + 24 ...); full_batches gives 256, 256, 256 and one short last batch."""
    import os

    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-c", _FULL_BATCHES], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path, env=env)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith(("False", "True"))]
    assert r.returncode == 0 and len(lines) == 2, r.stdout[-2000:] + r.stderr[-3000:]
    plain, full = lines
    # (Ray 2.60 alone gives `plain` = 3 x 256, 3 x 24 and one 160: the remainders this guards against.)
    assert full == "True [(232, 1), (256, 3)]", (plain, full)
