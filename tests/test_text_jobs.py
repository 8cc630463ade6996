"""The §2-§4 jobs end to end on the tiny families (random decoders, real tokenizers, local Ray):
arms decoded once by quote_ablation and reused by verbatim_runs and redaction."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from nla_ray.analysis import quotes as Q
from nla_ray.runtime.rows import RowParts

pytestmark = pytest.mark.ray


def run_job(load_job, name: str, args: list) -> int:
    """A job's exit status, with its local Ray shut down after (each job starts a fresh one)."""
    import ray

    try:
        return load_job(name).JOB.entry(args)
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def quote_run(tiny_families, load_job):
    tmp, preset = tiny_families
    out = tmp / "quotes"
    args = ["--preset", str(preset), "--out", str(out), "--store", str(tmp / "store_text")]
    assert run_job(load_job, "quote_ablation", args) == 0
    return tmp, preset, out


def test_quote_ablation_arms_masks_and_table(quote_run, smollm_tok):
    tmp, preset, out = quote_run
    s = json.loads((out / "summary.json").read_text())
    conds = s["headline"]["conditions"]
    assert {"free", "no_double", "no_quotes", "no_quotes / hatch-free", "no_quotes / hatch-using"} == set(conds)
    assert conds["free"]["n"] == conds["no_quotes"]["n"] == 6
    assert conds["no_quotes / hatch-free"]["n"] + conds["no_quotes / hatch-using"]["n"] == 6
    # the bans held: nothing from a banned family was written under its ban
    assert conds["no_double"]["leaked_banned_chars"] == 0 and conds["no_quotes"]["leaked_banned_chars"] == 0
    assert s["headline"]["ban_sizes"]["double"] == len(Q.banned_token_ids(smollm_tok, Q.DOUBLE_QUOTES))
    for arm in Q.CONDITIONS:  # each arm's rows kept for the jobs that reuse them
        assert (out / "rows" / arm / "RUN.json").is_file()
    assert (out / "escape_hatches.png").stat().st_size > 0
    for arm, chars in Q.CONDITIONS.items():
        texts = RowParts(out / "rows" / arm).read().column("av_text").to_pylist()
        assert not chars or not any(c in t for t in texts for c in chars), arm


def test_verbatim_and_redaction_reuse_the_decodes(quote_run, load_job):
    import ray

    tmp, preset, out = quote_run
    before = {p: p.stat().st_mtime for p in (out / "rows").rglob("part-*.parquet")}
    try:
        v = tmp / "verbatim"
        assert load_job("verbatim_runs").JOB.entry(["--preset", str(preset), "--out", str(v), "--decodes", str(out),
                                                   "--store", str(tmp / "store_text")]) == 0
        r = tmp / "redaction"
        assert load_job("redaction").JOB.entry(["--preset", str(preset), "--out", str(r), "--decodes", str(out),
                                               "--store", str(tmp / "store_text")]) == 0
    finally:
        ray.shutdown()
    # nothing was decoded again: quote_ablation's parts are untouched
    assert {p: p.stat().st_mtime for p in (out / "rows").rglob("part-*.parquet")} == before
    sv = json.loads((v / "summary.json").read_text())
    free_stats = sv["headline"]["quoting freely"]
    # random decoders rarely open the tag: runs are measured on the decodes that have an explanation
    assert free_stats["decodes"] == 6 and free_stats["runs"]["n"] <= 6
    assert sv["decodes_from"] == str(out)
    sr = json.loads((r / "summary.json").read_text())
    fve = sr["headline"]["fve"]
    assert set(fve) >= {"identity", "spans_only", "prose_only", "no_marks", "fill_random_chars"}
    # the unedited read equals the AR's own score of the same decodes
    free = RowParts(out / "rows" / "free").read()
    edited = pq.read_table(r / "rows.parquet")
    assert np.allclose(sorted(edited.column("nmse_identity").to_pylist()), sorted(free.column("nmse").to_pylist()),
                       atol=1e-5)
    assert (r / "redaction.png").stat().st_size > 0


def test_decodes_dir_must_hold_rows(tiny_families, load_job, tmp_path):
    _, preset = tiny_families
    assert load_job("verbatim_runs").JOB.entry(["--preset", str(preset), "--out", str(tmp_path / "v"),
                                               "--decodes", str(tmp_path / "nowhere")]) == 2


def test_best_of_n_sweep_is_tune_trials_sharing_the_cluster(tiny_families, load_job, monkeypatch):
    tmp, preset = tiny_families
    out = tmp / "bon"
    monkeypatch.chdir(tmp)  # a relative --out, as users type it: rows must still land under it
    args = ["--preset", str(preset), "--out", "bon", "--store", str(tmp / "store_text"), "--k", "3",
            "--temperatures", "1.0,1.3", "--Ns", "1,2,3"]
    assert run_job(load_job, "best_of_n", args) == 0
    s = json.loads((out / "summary.json").read_text())
    res = {r["arm"]: r for r in s["headline"]["results"]}
    assert list(res) == ["greedy", "T1.0", "T1.3"] and all(r["error"] is None for r in res.values())
    assert res["greedy"]["k"] == 1 and "fve_N2" not in res["greedy"]
    for arm in ("T1.0", "T1.3"):
        r = res[arm]
        assert r["k"] == 3 and r["n_activations"] == 6 and len(r["fve_N3_ci95"]) == 2
        assert r["fve_N1"] <= r["fve_N2"] + 1e-9 <= r["fve_N3"] + 2e-9  # best-of-N never gets worse with N
        assert np.isfinite(r["slope_per_doubling"])
    # each trial ran its own pipeline into resumable parts; three trials ran in separate processes
    assert len({r["pid"] for r in res.values()}) >= 2
    for arm in res:
        assert (out / "rows" / arm / "RUN.json").is_file()
    assert (out / "best_of_n.png").stat().st_size > 0 and (out / "tune" / "best_of_n").is_dir()


def test_adjacent_layers_one_pass_and_bound(tiny_families, load_job):
    """§6 on the tiny family: three layers from one extraction, the pair's own layer at offset 0."""
    from nla_ray.analysis import layers as LY

    tmp, preset = tiny_families
    out = tmp / "adjacent"
    assert run_job(load_job, "adjacent_layers",
                   ["--preset", str(preset), "--out", str(out), "--store", str(tmp / "store_layers")]) == 0
    s = json.loads((out / "summary.json").read_text())
    rows = {r["layer"]: r for r in s["headline"]["layers"]}
    assert sorted(rows) == [1, 2, 3] and s["headline"]["pair_layer"] == 2
    own = rows[2]
    assert own["cos_to_ref"] == pytest.approx(1.0, abs=1e-5) and own["mutual_nmse"] == pytest.approx(0.0, abs=1e-5)
    assert own["additive_bound"] == pytest.approx(own["nmse"], rel=1e-5)
    assert all(r["cos_to_ref"] < 1.0 - 1e-4 for layer, r in rows.items() if layer != 2)
    # alignment is strict: a position missing from the reference layer is refused, not skipped
    with pytest.raises(ValueError):
        LY.align_rows([("d", 5)], [("d", 6)])


def test_self_drift_of_an_unchanged_model_is_zero(tiny_families, load_job):
    """§7c wiring: the tiny pair's AV and AR are copies of the base, so their own streams equal the
    base's exactly; the store keeps them as separate entries (the role's weights are in the key)."""
    tmp, preset = tiny_families
    out = tmp / "drift"
    assert run_job(load_job, "self_drift",
                   ["--preset", str(preset), "--out", str(out), "--store", str(tmp / "store_drift")]) == 0
    s = json.loads((out / "summary.json").read_text())
    for role in ("AV", "AR"):
        d = s["headline"]["drift"][role]
        assert d["nmse"] == pytest.approx(0.0, abs=1e-6) and d["cos"] == pytest.approx(1.0, abs=1e-6)
    assert s["headline"]["nla_reconstruction_nmse"] > 0
    assert len([p for p in (tmp / "store_drift").rglob("RUN.json")]) == 3  # base, AV's, AR's streams
    assert (out / "self_drift.png").stat().st_size > 0
