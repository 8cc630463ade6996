"""§7b ridge baseline: recovery of known maps, grouped folds, FVE arithmetic, and the Tune sweep."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from nla_ray.analysis import ridge as R
from nla_ray.runtime import tune as T


@pytest.fixture(scope="module", autouse=True)
def single_blas_thread():
    """One BLAS thread for the in-process fits: on a busy 2-core box, competing OpenBLAS threads
    made these small solves several times slower than one thread alone."""
    with threadpool_limits(limits=1):
        yield


def _linear_data(n=3000, d=24, noise=0.01, seed=0):
    rng = np.random.default_rng(seed)
    X = R.unit(rng.standard_normal((n, d)))
    W = rng.standard_normal((d, d)) / np.sqrt(d)
    return X, W, X @ W + noise * rng.standard_normal((n, d))


def _reference_scores(pred, gold, scale, var_train):
    """NMSE / cos / FVE in float64 straight from the definitions in nla_ray.core.metrics."""
    p = pred.astype(np.float64)
    g = gold.astype(np.float64)
    pn = p / np.linalg.norm(p, axis=1, keepdims=True) * scale
    gn = g / np.linalg.norm(g, axis=1, keepdims=True) * scale
    nmse = np.mean((pn - gn) ** 2, axis=1)
    cos = np.sum(pn * gn, axis=1) / scale**2
    var = np.mean((gn - gn.mean(axis=0)) ** 2)
    return {"nmse": nmse.mean(), "cos": cos.mean(), "var_own": var,
            "fve_own": 1 - nmse.mean() / var, "fve_train": 1 - nmse.mean() / var_train}


def test_linear_ridge_recovers_a_known_linear_map():
    X, W, Y = _linear_data()
    tr, te = slice(0, 2400), slice(2400, None)
    r = R.fit_and_eval(X[tr], Y[tr], X[te], Y[te], "linear", {"alpha": 1e-4}, "sqrt_d_model",
                       n_boot=50)
    assert r["fve_own"] > 0.9 and r["cos"] > 0.95, r
    assert r["n_train"] == 2400 and r["n_test"] == 600 and r["solve_mem_bytes"] > 0

    # On raw targets the fitted map is W itself (inputs are already unit rows, so unit(X) = X).
    model = R.fit(X[tr], Y[tr], "linear", {"alpha": 1e-6}, unit_targets=False)
    pred, truth = R.predict(model, X[te]), X[te] @ W
    rel = np.linalg.norm(pred - truth) / np.linalg.norm(truth)
    assert rel < 0.02, rel
    assert np.abs(model.coef - W).max() < 0.02 and np.abs(model.target_mean).max() < 0.02


def test_kernel_ridge_fits_a_nonlinear_map_linear_ridge_cannot():
    rng = np.random.default_rng(1)
    d = 16
    U = R.unit(rng.standard_normal((2500, d)))
    A = rng.standard_normal((d, d))
    # Squares of projections: even in x, so no linear map explains any of the variation.
    Y = (U @ A) ** 2 + 0.01 * rng.standard_normal((2500, d))
    tr, te = slice(0, 2000), slice(2000, None)
    lin = R.fit_and_eval(U[tr], Y[tr], U[te], Y[te], "linear", {"alpha": 1e-3}, "sqrt_d_model",
                         n_boot=10)
    rbf = R.fit_and_eval(U[tr], Y[tr], U[te], Y[te], "rbf",
                         {"alpha": 1e-3, "gamma_rel": 1.0, "n_components": 300},
                         "sqrt_d_model", n_boot=10)
    assert rbf["fve_own"] > 0.8 and lin["fve_own"] < 0.1, (rbf["fve_own"], lin["fve_own"])
    assert rbf["rank"] == 300 and rbf["gamma"] > 0
    # With as many landmarks as rows the Nystroem solve is exact kernel ridge: fewer landmarks
    # can only approximate it, never beat it by much on the training distribution.
    exact = R.fit_and_eval(U[:600], Y[:600], U[te], Y[te], "rbf",
                           {"alpha": 1e-3, "gamma_rel": 1.0, "n_components": 10_000},
                           "sqrt_d_model", n_boot=10)
    assert exact["rank"] == 600 and exact["fve_own"] > 0.5


def test_grouped_folds_and_subsets_keep_documents_whole():
    rng = np.random.default_rng(2)
    sizes = rng.integers(1, 12, size=40)
    groups = np.repeat([f"doc{i}" for i in range(40)], sizes)
    n = len(groups)
    folds = R.fold_indices(n, k=5, seed=3, groups=groups)
    assert len(folds) == 5
    seen = np.zeros(n, dtype=int)
    for tr, te in folds:
        assert not set(groups[tr]) & set(groups[te])
        assert len(tr) + len(te) == n
        seen[te] += 1
    assert (seen == 1).all()  # every row is held out exactly once

    idx = R.train_subset(n, 100, groups, seed=4)
    assert len(idx) == 100 and (np.diff(idx) > 0).all()
    chosen, counts = np.unique(groups[idx], return_counts=True)
    whole = {g: s for g, s in zip([f"doc{i}" for i in range(40)], sizes)}
    partial = [g for g, c in zip(chosen, counts) if c != whole[g]]
    assert len(partial) <= 1  # whole documents, except the one that hit the limit

    # CV with groups runs end to end and is the mean of its folds.
    X, _, Y = _linear_data(n=n, d=8, seed=5)
    per_fold = R.cv_fold_scores(X, Y, "linear", {"alpha": 1e-3}, k=5, seed=3, groups=groups)
    mean = R.kfold_cv_score(X, Y, "linear", {"alpha": 1e-3}, k=5, seed=3, groups=groups)
    assert len(per_fold) == 5 and mean == pytest.approx(np.mean(per_fold)) and mean > 0.9
    with pytest.raises(ValueError, match="groups"):
        R.fold_indices(n, k=50, groups=groups)


def test_fve_arithmetic_matches_a_float64_reference():
    rng = np.random.default_rng(6)
    n, d = 500, 32
    gold = rng.standard_normal((n, d)).astype(np.float32) + 2.0  # a shared mean direction
    pred = (gold + rng.standard_normal((n, d)).astype(np.float32)) * rng.uniform(0.1, 10, (n, 1))
    scale = math.sqrt(d)
    var_train = 0.7
    docs = np.repeat(np.arange(50), 10)
    got = R.score_predictions(pred, gold, scale, var_train=var_train, groups=docs, n_boot=200)
    ref = _reference_scores(pred, gold, scale, var_train)
    for key, want in ref.items():
        assert got[key] == pytest.approx(want, rel=1e-5, abs=1e-6), key
    assert got["nmse"] == pytest.approx(2 * (1 - got["cos"]), rel=1e-5)
    lo, hi = got["fve_own_ci"]
    assert lo < got["fve_own"] < hi and got["fve_train_ci"][0] < got["fve_train"]
    assert got["fve_null_own"] < got["fve_own"]

    # fit_and_eval scores exactly the predictions of fit + predict.
    X, _, Y = _linear_data(n=800, d=d, noise=0.3, seed=7)
    r = R.fit_and_eval(X[:600], Y[:600], X[600:], Y[600:], "linear", {"alpha": 0.1}, scale,
                       var_train=var_train, n_boot=10)
    p = R.predict(R.fit(X[:600], Y[:600], "linear", {"alpha": 0.1}), X[600:])
    ref = _reference_scores(p, Y[600:], scale, var_train)
    assert r["fve_own"] == pytest.approx(ref["fve_own"], rel=1e-5)
    assert r["fve_train"] == pytest.approx(ref["fve_train"], rel=1e-5)


def test_grids_tables_and_best_configs():
    assert [p["alpha"] for p in R.param_grid("linear")] == pytest.approx(np.logspace(-4, 1, 6))
    rbf = R.param_grid("rbf", alphas=[0.1, 1.0], gamma_rels=[0.5, 1.0], n_components=64)
    assert len(rbf) == 4 and all(p["n_components"] == 64 for p in rbf)
    with pytest.raises(ValueError, match="kind"):
        R.param_grid("poly")
    assert R.solve_memory_bytes("rbf", 20000, 640, 640, 2000) < 1.5e9

    cells = T.sweep_cells(["linear"], [100, 200], ["a_to_b", "b_to_a"], {"linear": [{"alpha": 1}]})
    assert len(cells) == 4 and {c["direction"] for c in cells} == set(T.DIRECTIONS)
    rows = [{"direction": "a_to_b", "kind": "linear", "n_train": 100, "params": {"alpha": a},
             "cv_fve": f} for a, f in [(1, 0.2), (2, float("nan")), (3, 0.5), (4, 0.4)]]
    best = T.best_configs(rows)
    assert list(best) == [("a_to_b", "linear", 100)] and best[("a_to_b", "linear", 100)]["params"] == {"alpha": 3}

    X, _, Y = _linear_data(n=900, d=8, seed=8)
    docs = np.repeat(np.arange(90), 10)
    table = R.learning_curve_rows(X[:600], Y[:600], X[600:], Y[600:], kinds=["linear"],
                                  params_for=lambda kind, n: {"alpha": 1e-3},
                                  n_trains=[100, 5000], groups_tr=docs[:600],
                                  groups_te=docs[600:], label="a->b", n_boot=20)
    assert [(t["n_train"], t["n_train_used"]) for t in table] == [(100, 100), (5000, 600)]
    assert table[0]["var_train"] == table[1]["var_train"] and table[1]["label"] == "a->b"
    assert table[1]["fve_train"] > 0.9 and "fve_own_ci" in table[1]


@pytest.mark.ray
def test_tune_sweep_runs_trials_concurrently_and_picks_the_best(tmp_path):
    import ray

    X, _, Y = _linear_data(n=6000, d=32, noise=0.2, seed=9)
    docs = np.repeat(np.arange(600), 10)
    # Enough landmarks that an rbf trial on 5000 rows takes about two seconds: long enough for the
    # two such trials to be seen running at the same time on the two CPUs.
    grid = {"linear": [{"alpha": 1e-3}, {"alpha": 30.0}],
            "rbf": [{"alpha": a, "gamma_rel": 1.0, "n_components": 1800} for a in (1e-2, 1e-1)]}
    # address="local": a fresh 2-CPU instance even if a `ray start` head runs on this machine.
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20,
             log_to_driver=False)
    try:
        rows, best = T.ridge_sweep(X, Y, docs, grid, kinds=["linear", "rbf"], n_trains=[1000, 5000],
                                   k=3, seed=0, cpus_per_trial=1, max_concurrent=2,
                                   storage_path=str(tmp_path / "tune"), name="ridge_test")
        assert ray.is_initialized()  # the caller's cluster is left running for the caller
    finally:
        ray.shutdown()

    assert len(rows) == 8 and all(r["error"] is None for r in rows), rows
    cells = {(r["kind"], r["n_train"], tuple(sorted(r["params"].items()))) for r in rows}
    assert len(cells) == 8  # one row per trial, each a distinct cell
    assert all(math.isfinite(r["cv_fve"]) and "alpha" in r for r in rows)
    assert {r["n_train_used"] for r in rows} == {1000, 5000}

    windows = sorted((r["t_start"], r["t_end"]) for r in rows if r["kind"] == "rbf" and r["n_train"] == 5000)
    overlaps = [(a, b) for i, a in enumerate(windows) for b in windows[i + 1:] if b[0] < a[1]]
    assert overlaps, windows  # two 1-CPU trials on a 2-CPU node ran at the same time
    assert len({r["pid"] for r in rows}) >= 2

    assert len(best) == 4
    for key, row in best.items():
        same = [r for r in rows if (r["direction"], r["kind"], r["n_train"]) == key]
        assert row["cv_fve"] == max(r["cv_fve"] for r in same)
    # A near-linear map: a light ridge beats a heavy one.
    assert best[("a_to_b", "linear", 5000)]["params"] == {"alpha": 1e-3}
    assert (tmp_path / "tune" / "ridge_test").is_dir()
    assert not (Path.home() / "ray_results" / "ridge_test").exists()
