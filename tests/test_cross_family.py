"""Cross-family transfer (§7): alignment on the real tokenizers, the 2x2 wiring, store reuse, resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nla_ray.analysis import cross_family as X
from nla_ray.core import metrics
from nla_ray.core.table import vectors

REPO = Path(__file__).resolve().parent.parent


def test_alignment_error_on_real_text_and_tokenizers(smollm_tok, gemma_tok):
    """SmolLM2 positions mapped onto Gemma-3 tokens by character offset: small error in characters."""
    from nla_ray.nla.corpora import PackagedBBCNews
    from nla_ray.nla.extract import align_position, sample_positions

    errs = []
    for doc in list(PackagedBBCNews(split="heldout").iter_documents())[:8]:
        a = smollm_tok(doc.text, add_special_tokens=True, return_offsets_mapping=True)
        b = gemma_tok(doc.text, add_special_tokens=True, return_offsets_mapping=True)
        for p in sample_positions(a["input_ids"], smollm_tok.all_special_ids, doc.doc_id, 42, 5):
            j, err = align_position(a["offset_mapping"][p][1], b["offset_mapping"])
            errs.append(err)
            assert b["offset_mapping"][j][1] - a["offset_mapping"][p][1] == err
    s = X.alignment_stats(np.array(errs), np.abs(errs) <= 2, tolerance=2)
    assert s["positions"] == 40 and s["aligned"] >= 36
    assert s["mean_abs_err_chars"] < 1.0 and s["share_exact"] > 0.6, s


def test_anchors_and_join_drop_unaligned_and_recount():
    a = pa.table({"doc_id": ["d1", "d1", "d2", "d3"], "sample_rank": [0, 1, 0, 0], "position": [60, 70, 55, -1],
                  "char_end": [300, 350, 280, -1], "layer": [3, 3, 3, 3], "positions_in_doc": [2, 2, 1, 0],
                  "sample_idx": [0, 0, 0, 0], "vector": pa.FixedSizeListArray.from_arrays(pa.array(np.arange(8.0, dtype=np.float32)), 2)})
    assert X.anchors_from(a, 3) == {"d1": [[60, 300], [70, 350]], "d2": [[55, 280]], "d3": []}
    b = pa.table({"doc_id": ["d1", "d1", "d2"], "sample_rank": [0, 1, 0], "position": [40, -2, 38],
                  "align_err": [0, 7, 1], "layer": [2, 2, 2], "positions_in_doc": [2, 2, 1], "sample_idx": [0, 0, 0],
                  "vector": pa.FixedSizeListArray.from_arrays(pa.array(np.arange(6.0, dtype=np.float32)), 2)})
    j, stats = X.join_families(a, b, tolerance=2)
    assert j.column("doc_id").to_pylist() == ["d1", "d2"]
    assert j.column("b_position").to_pylist() == [40, 38]
    assert j.column("positions_in_doc").to_pylist() == [1, 1]  # recounted: d1 lost its unaligned rank
    assert stats["dropped_beyond_tolerance"] == 1 and stats["aligned"] == 2 and stats["share_exact"] == 0.5


def test_transfer_ratios():
    r = X.transfer_ratios({"aa": 0.5, "ab": 0.3, "ba": 0.2, "bb": 0.6})
    assert r == pytest.approx({"a_to_b": 0.5, "b_to_a": 0.4})


# ---------------------------------------------------------------------------------------------
# the job end to end on tiny random pairs (real tokenizers), CPU actors on a local Ray


@pytest.mark.ray
def test_cross_family_job_wiring_store_and_resume(tiny_families):
    import ray

    from nla_ray.runtime.rows import RowParts

    tmp, preset = tiny_families
    sys_path = str(REPO / "jobs")
    import sys
    sys.path.insert(0, sys_path)
    try:
        import cross_family as job
    finally:
        sys.path.remove(sys_path)
    out, store = tmp / "out", tmp / "store"
    args = ["--preset", str(preset), "--out", str(out), "--store", str(store)]
    try:
        assert job.JOB.entry(args) == 0
        s1 = json.loads((out / "summary.json").read_text())
        rows = pq.read_table(out / "rows.parquet")
        assert rows.num_rows > 0 and set(s1["cells"]) == {"aa", "ab", "ba", "bb"}
        # Each cell is scored against the AR side's gold with the AR side's Var.
        import yaml

        from nla_ray.nla.sidecar import read_sidecar

        for cell, gold_col in (("aa", "vector"), ("ba", "vector"), ("ab", "b_vector"), ("bb", "b_vector")):
            ar_dir = yaml.safe_load((tmp / ("tl.yaml" if cell[1] == "a" else "tg.yaml")).read_text())["pair"].split(",")[1]
            scale = read_sidecar(ar_dir).mse_scale
            gold, rec = vectors(rows, gold_col), vectors(rows, f"recon_{cell}")
            nm = metrics.nmse(rec, gold, scale)
            np.testing.assert_allclose(rows.column(f"nmse_{cell}").to_numpy(), nm, rtol=1e-5, atol=1e-6)
            var = metrics.variance_baseline(gold, scale)
            assert s1["cells"][cell]["var_own"] == pytest.approx(var, rel=1e-6)
            assert s1["cells"][cell]["fve_own"]["value"] == pytest.approx(1 - nm.mean() / var, rel=1e-5, abs=1e-6)
        assert set(s1["timeline"]["stages"]) == {"av_a", "av_b", "ar_a", "ar_b"}
        assert s1["headline"]["alignment"]["aligned"] == rows.num_rows
        # A half-finished run resumes to the same tables; the store is reused (no new extraction).
        parts = RowParts(out / "rows").files()
        for f in parts[len(parts) // 2:]:
            f.unlink()
        n_store = len(list(store.rglob("part-*.parquet")))
        assert job.JOB.entry(args) == 0
        s2 = json.loads((out / "summary.json").read_text())
        assert len(list(store.rglob("part-*.parquet"))) == n_store
        # redone documents may land in other AR batches: equal up to float32 rounding of padded batches
        assert s2["headline"]["fve"] == pytest.approx(s1["headline"]["fve"], abs=1e-5)
        # The within-family cell equals reproduce_fve's round trip on the same stored activations.
        sys.path.insert(0, sys_path)
        try:
            import reproduce_fve
        finally:
            sys.path.remove(sys_path)
        out2 = tmp / "fve"
        assert reproduce_fve.JOB.entry(args[:2] + ["--out", str(out2), "--store", str(store)]) == 0
        r2 = pq.read_table(out2 / "rows.parquet")
        k2 = {(d, p): n for d, p, n in zip(r2.column("doc_id").to_pylist(), r2.column("position").to_pylist(),
                                          r2.column("nmse").to_pylist())}
        for d, p, n in zip(rows.column("doc_id").to_pylist(), rows.column("position").to_pylist(),
                           rows.column("nmse_aa").to_pylist()):
            assert k2[(d, p)] == pytest.approx(n, rel=1e-4, abs=1e-6)
    finally:
        ray.shutdown()
        shutil.rmtree(store, ignore_errors=True)


@pytest.mark.ray
def test_ridge_baseline_job_tune_trials_and_refit(tiny_families, load_job):
    """§7b on the tiny families: Tune trials per (direction, map, size, setting), best refit on held-out."""
    import ray

    tmp, preset = tiny_families
    route = tmp / "route"
    route.mkdir()
    (route / "summary.json").write_text(json.dumps({"headline": {"fve": {"ab": 0.11, "ba": 0.22}}}))
    out = tmp / "ridge"
    args = ["--preset", str(preset), "--out", str(out), "--store", str(tmp / "store_ridge"), "--train-docs", "8",
            "--train-positions", "3", "--n-trains", "12,1000", "--folds", "2", "--alphas", "0.001,30",
            "--gammas", "1", "--landmarks", "8", "--text-route", str(route)]
    try:
        assert load_job("ridge_baseline").JOB.entry(args) == 0
    finally:
        ray.shutdown()
    s = json.loads((out / "summary.json").read_text())
    trials = s["trials"]
    # 2 directions x (linear: 2 alphas + rbf: 2 alphas x 1 gamma) x 2 sizes, every one a finished trial
    assert len(trials) == 16 and all(t["error"] is None and np.isfinite(t["cv_fve"]) for t in trials)
    assert {(t["direction"], t["kind"]) for t in trials} == {(d, k) for d in ("a_to_b", "b_to_a")
                                                             for k in ("linear", "rbf")}
    rows = s["rows"]
    assert len(rows) == 8 and s["headline"]["text_route"]["a_to_b"] == 0.11
    pairs = s["headline"]["pairs_train"]
    assert pairs <= 24 and {r["n_train_used"] for r in rows} == {12, pairs}
    for r in rows:  # the refit uses the setting with the best CV score in its (direction, map, size)
        cell = [t for t in trials if (t["direction"], t["kind"], t["n_train"]) == (r["key"], r["kind"], r["n_train"])]
        assert r["params"] == max(cell, key=lambda t: t["cv_fve"])["params"]
        assert np.isfinite(r["fve_own"]) and r["n_test"] == s["headline"]["pairs_heldout"]
    assert (out / "ridge_curve.png").stat().st_size > 0
    assert "Ray Tune trials" in (out / "table.md").read_text()

    # --replot redraws against another text route without recomputing, keeping who computed it
    (route / "summary.json").write_text(json.dumps({"headline": {"fve": {"ab": 0.33, "ba": 0.44}}}))
    assert load_job("ridge_baseline").JOB.entry(["--preset", str(preset), "--out", str(out), "--replot",
                                             "--text-route", str(route)]) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["headline"]["text_route"]["a_to_b"] == 0.33 and again["rows"] == rows
    assert again["computed_by"] == s["provenance"] and again["trials"] == trials
    assert load_job("ridge_baseline").JOB.entry(["--preset", str(preset), "--out", str(tmp / "nothing"),
                                             "--replot"]) == 2
