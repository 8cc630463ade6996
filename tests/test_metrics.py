"""Tests for nla_ray.core.metrics against independent float64 numpy references."""

import math

import numpy as np
import pytest

from nla_ray.core import metrics as M

D = 64


# ---------------------------------------------------------------------------
# float64 references, written from the definitions rather than the module
# ---------------------------------------------------------------------------

def ref_normalize(v, scale):
    v = np.asarray(v, dtype=np.float64)
    if scale is None:
        return v
    out = np.zeros_like(v)
    for i, row in enumerate(v.reshape(-1, v.shape[-1])):
        n = math.sqrt(sum(float(x) ** 2 for x in row))
        out.reshape(-1, v.shape[-1])[i] = row / max(n, 1e-12) * scale
    return out


def ref_nmse(pred, gold, scale):
    a, b = ref_normalize(pred, scale), ref_normalize(gold, scale)
    return ((a - b) ** 2).mean(axis=1)


def ref_cosine(pred, gold):
    a = np.asarray(pred, dtype=np.float64)
    b = np.asarray(gold, dtype=np.float64)
    return np.array([x @ y / (np.linalg.norm(x) * np.linalg.norm(y)) for x, y in zip(a, b)])


def ref_rawvar(gold, scale):
    g = ref_normalize(gold, scale)
    mu = g.mean(axis=0)
    return float(((g - mu) ** 2).mean())


def ref_meannorm(gold, scale):
    g = ref_normalize(gold, scale)
    mu = g.mean(axis=0)
    c = ref_normalize(mu[None, :], scale)[0]
    return float(((g - c) ** 2).mean())


def ref_lcs_words(a, b):
    import re

    wa = re.findall(r"\w+(?:'\w+)?", a.lower())
    wb = re.findall(r"\w+(?:'\w+)?", b.lower())
    best = 0
    # Brute force over all start pairs: independent of the DP in the module.
    for i in range(len(wa)):
        for j in range(len(wb)):
            k = 0
            while i + k < len(wa) and j + k < len(wb) and wa[i + k] == wb[j + k]:
                k += 1
            best = max(best, k)
    return best


@pytest.fixture
def data():
    rng = np.random.default_rng(1)
    # Shared offset makes the rows non-isotropic, like real activations.
    gold = (rng.normal(size=(200, D)) + 0.7 * rng.normal(size=(1, D))) * rng.uniform(0.5, 5, size=(200, 1))
    pred = gold + 0.6 * rng.normal(size=gold.shape) * np.abs(gold).mean()
    clusters = np.repeat(np.arange(40), 5)
    return pred.astype(np.float32), gold.astype(np.float32), clusters


SCALES = [None, 1.0, math.sqrt(D)]


# ---------------------------------------------------------------------------
# resolve_scale / normalize
# ---------------------------------------------------------------------------

def test_resolve_scale():
    assert M.resolve_scale(None, D) is None
    assert M.resolve_scale("raw", D) is None
    assert M.resolve_scale("none", D) is None
    assert M.resolve_scale("NONE", D) is None
    assert M.resolve_scale("sqrt_d_model", 4096) == 64.0
    assert M.resolve_scale(3, D) == 3.0
    assert M.resolve_scale(2.5, D) == 2.5
    assert M.resolve_scale("12.5", D) == 12.5
    assert isinstance(M.resolve_scale(3, D), float)


@pytest.mark.parametrize("bad", ["sqrt_dmodel", "unit", [1.0], -1.0, 0, "nan", True])
def test_resolve_scale_rejects(bad):
    with pytest.raises(ValueError, match=repr(bad).replace("[", r"\[").replace("]", r"\]")):
        M.resolve_scale(bad, D)


def test_resolve_scale_sqrt_needs_d_model():
    with pytest.raises(ValueError, match="d_model"):
        M.resolve_scale("sqrt_d_model", None)


@pytest.mark.parametrize("scale", SCALES)
def test_normalize_matches_reference(data, scale):
    _, gold, _ = data
    out = M.normalize(gold, scale)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, ref_normalize(gold, scale), rtol=1e-5, atol=1e-6)
    if scale is not None:
        np.testing.assert_allclose(np.linalg.norm(out.astype(np.float64), axis=1), scale, rtol=1e-5)


def test_normalize_zero_row_stays_zero():
    v = np.zeros((2, 5), dtype=np.float32)
    v[1] = 3.0
    out = M.normalize(v, 2.0)
    assert np.all(out[0] == 0)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(np.linalg.norm(out[1]), 2.0, rtol=1e-6)


def test_accepts_torch_tensors(data):
    torch = pytest.importorskip("torch")
    pred, gold, _ = data
    pt = torch.from_numpy(pred).to(torch.bfloat16).requires_grad_(False)
    gt = torch.from_numpy(gold).to(torch.float64)
    out = M.nmse(pt, gt, math.sqrt(D))
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    expected = ref_nmse(pt.float().numpy(), gold, math.sqrt(D))
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-6)
    assert isinstance(M.variance_baseline(gt, None), float)


# ---------------------------------------------------------------------------
# nmse / cosine
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("scale", SCALES)
def test_nmse_matches_reference(data, scale):
    pred, gold, _ = data
    out = M.nmse(pred, gold, scale)
    assert out.shape == (len(gold),) and out.dtype == np.float32
    np.testing.assert_allclose(out, ref_nmse(pred, gold, scale), rtol=1e-4, atol=1e-6)


def test_cosine_matches_reference(data):
    pred, gold, _ = data
    np.testing.assert_allclose(M.cosine(pred, gold), ref_cosine(pred, gold), rtol=1e-5, atol=1e-6)


def test_nmse_is_two_one_minus_cos_at_sqrt_d(data):
    pred, gold, _ = data
    scale = M.resolve_scale("sqrt_d_model", D)
    np.testing.assert_allclose(
        M.nmse(pred, gold, scale), 2.0 * (1.0 - M.cosine(pred, gold)), rtol=1e-4, atol=1e-5
    )


# ---------------------------------------------------------------------------
# Baselines and FVE
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("scale", SCALES)
def test_rawvar_matches_reference(data, scale):
    _, gold, _ = data
    v = M.variance_baseline(gold, scale)
    assert isinstance(v, float)
    assert v == pytest.approx(ref_rawvar(gold, scale), rel=1e-5)


@pytest.mark.parametrize("scale", SCALES)
def test_meannorm_matches_reference(data, scale):
    _, gold, _ = data
    v = M.meannorm_baseline(gold, scale)
    assert v == pytest.approx(ref_meannorm(gold, scale), rel=1e-5)
    # Rescaling the mean to the common norm can only move it away from the optimum.
    assert v >= M.variance_baseline(gold, scale) - 1e-6


def test_meannorm_minus_rawvar_closed_form(data):
    _, gold, _ = data
    s = math.sqrt(D)
    mu = ref_normalize(gold, s).mean(axis=0)
    gap = (s - np.linalg.norm(mu)) ** 2 / D
    assert M.meannorm_baseline(gold, s) - M.variance_baseline(gold, s) == pytest.approx(gap, rel=1e-3)


def test_fve_perfect_prediction_is_one(data):
    _, gold, _ = data
    s = math.sqrt(D)
    var = M.variance_baseline(gold, s)
    assert M.fve(M.nmse(gold, gold, s), var) == pytest.approx(1.0, abs=1e-6)
    # Predicting the same direction at a different norm is also perfect after normalization.
    assert M.fve(M.nmse(3.0 * gold, gold, s), var) == pytest.approx(1.0, abs=1e-6)


def test_fve_of_mean_prediction_is_zero_when_unnormalized(data):
    # With scale=None nothing renormalizes the constant, so the mean is exactly
    # the rawvar-optimal predictor and must score FVE 0.
    _, gold, _ = data
    var = M.variance_baseline(gold, None)
    mean_pred = np.broadcast_to(gold.astype(np.float64).mean(axis=0), gold.shape)
    assert M.fve(M.nmse(mean_pred, gold, None), var) == pytest.approx(0.0, abs=1e-5)


def test_fve_matches_reference(data):
    pred, gold, _ = data
    s = math.sqrt(D)
    var = ref_rawvar(gold, s)
    expected = 1.0 - ref_nmse(pred, gold, s).mean() / var
    assert M.fve(M.nmse(pred, gold, s), var) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_fve_rejects_bad_denominator(bad):
    with pytest.raises(ValueError, match="denominator"):
        M.fve(np.ones(3), bad)


def test_fve_summary(data):
    pred, gold, _ = data
    s = math.sqrt(D)
    summ = M.fve_summary(pred, gold, s, var_train=0.9)
    assert summ.n == len(gold)
    assert summ.nmse_mean == pytest.approx(ref_nmse(pred, gold, s).mean(), rel=1e-4)
    assert summ.cos_mean == pytest.approx(ref_cosine(pred, gold).mean(), rel=1e-4)
    assert summ.var_own == pytest.approx(ref_rawvar(gold, s), rel=1e-5)
    assert summ.fve_own.denominator == "own_set"
    assert summ.fve_own.denominator_value == summ.var_own
    assert summ.fve_own.value == pytest.approx(1 - summ.nmse_mean / summ.var_own, rel=1e-5)
    assert summ.fve_train.denominator == "train_set"
    assert summ.fve_train.denominator_value == 0.9
    assert summ.fve_train.value == pytest.approx(1 - summ.nmse_mean / 0.9, rel=1e-5)
    d = summ.as_dict()
    assert d["fve_own"]["denominator"] == "own_set" and d["n"] == len(gold)
    assert M.fve_summary(pred, gold, s).fve_train is None


# ---------------------------------------------------------------------------
# Bootstrap
# ---------------------------------------------------------------------------

def test_bootstrap_contains_point_and_is_deterministic(data):
    pred, gold, clusters = data
    s = math.sqrt(D)
    values = M.nmse(pred, gold, s)
    var = M.variance_baseline(gold, s)
    lo, hi, point = M.fve_ci(values, clusters, var, n_boot=300, seed=7)
    assert lo <= point <= hi
    assert lo < hi
    assert point == pytest.approx(M.fve(values, var), abs=1e-12)
    assert M.fve_ci(values, clusters, var, n_boot=300, seed=7) == (lo, hi, point)
    assert M.fve_ci(values, clusters, var, n_boot=300, seed=8) != (lo, hi, point)


def test_bootstrap_resamples_whole_clusters():
    # Every row of a cluster carries the cluster id; a replicate that splits a
    # cluster would contain an id a number of times that is not a multiple of 4.
    clusters = np.repeat(np.array(["d0", "d1", "d2", "d3", "d4"]), 4)
    ids = np.repeat(np.arange(5), 4).astype(float)

    def stat(x):
        counts = np.bincount(x.astype(int), minlength=5)
        assert np.all(counts % 4 == 0) and counts.sum() == 20
        return float(x.mean())

    lo, hi, point = M.clustered_bootstrap_ci(ids, clusters, stat, n_boot=200, seed=0)
    assert point == pytest.approx(2.0)
    assert lo <= point <= hi


def test_bootstrap_clusters_widen_interval():
    # Strong within-document correlation: treating rows as independent must give
    # a narrower interval than resampling documents.
    rng = np.random.default_rng(3)
    clusters = np.repeat(np.arange(30), 20)
    values = rng.normal(size=30)[clusters] + 0.05 * rng.normal(size=600)
    lo_c, hi_c, _ = M.clustered_bootstrap_ci(values, clusters, np.mean, n_boot=400, seed=0)
    lo_i, hi_i, _ = M.clustered_bootstrap_ci(values, None, np.mean, n_boot=400, seed=0)
    assert (hi_c - lo_c) > 2 * (hi_i - lo_i)


def test_bootstrap_tuple_input(data):
    pred, gold, clusters = data
    s = math.sqrt(D)

    def own_fve(p, g):
        return M.fve(M.nmse(p, g, s), M.variance_baseline(g, s))

    lo, hi, point = M.clustered_bootstrap_ci((pred, gold), clusters, own_fve, n_boot=100, seed=0)
    assert point == pytest.approx(M.fve_summary(pred, gold, s).fve_own.value, rel=1e-6)
    assert lo <= point <= hi


def test_bootstrap_rejects_bad_clusters(data):
    pred, gold, _ = data
    with pytest.raises(ValueError, match="clusters"):
        M.fve_ci(M.nmse(pred, gold, None), np.arange(5), 1.0)


# ---------------------------------------------------------------------------
# Shuffled null
# ---------------------------------------------------------------------------

def test_derangement_has_no_fixed_points():
    for seed in range(20):
        for n in (2, 3, 7, 50):
            perm = M.derangement_indices(n, seed=seed)
            assert sorted(perm.tolist()) == list(range(n))
            assert np.all(perm != np.arange(n))


def test_derangement_crosses_clusters_when_possible():
    rng = np.random.default_rng(0)
    for seed in range(20):
        clusters = rng.integers(0, 6, size=60)
        clusters[:10] = 0  # keep every cluster at or below half the rows
        if np.bincount(clusters).max() > 30:
            continue
        perm = M.derangement_indices(60, clusters=clusters, seed=seed)
        assert sorted(perm.tolist()) == list(range(60))
        assert np.all(clusters[perm] != clusters)


def test_derangement_best_effort_with_dominant_cluster():
    clusters = np.array([0] * 8 + [1, 2])
    perm = M.derangement_indices(10, clusters=clusters, seed=0)
    assert sorted(perm.tolist()) == list(range(10))
    assert np.all(perm != np.arange(10))
    # Only 2 rows lie outside cluster 0, so at most 2 * 2 pairings can cross.
    assert int(np.sum(clusters[perm] != clusters)) == 4


def test_derangement_single_cluster_falls_back():
    perm = M.derangement_indices(5, clusters=np.zeros(5), seed=0)
    assert np.all(perm != np.arange(5))


def test_shuffled_null_well_below_real(data):
    pred, gold, clusters = data
    s = math.sqrt(D)
    var = M.variance_baseline(gold, s)
    real = M.fve(M.nmse(pred, gold, s), var)
    null = M.shuffled_null(pred, gold, s, var, seed=0)
    null_c = M.shuffled_null(pred, gold, s, var, seed=0, clusters=clusters)
    assert real > 0.5
    assert null < real - 0.5 and null_c < real - 0.5
    assert M.shuffled_null(pred, gold, s, var, seed=0) == null


def test_shuffled_null_matches_manual_pairing(data):
    pred, gold, clusters = data
    s = math.sqrt(D)
    var = ref_rawvar(gold, s)
    perm = M.derangement_indices(len(gold), clusters=clusters, seed=4)
    expected = 1 - ref_nmse(pred, gold[perm], s).mean() / var
    assert M.shuffled_null(pred, gold, s, var, seed=4, clusters=clusters) == pytest.approx(expected, rel=1e-4)


# ---------------------------------------------------------------------------
# Input guards
# ---------------------------------------------------------------------------

def test_shape_mismatch_named():
    with pytest.raises(ValueError, match=r"shape mismatch.*\(3, 4\).*\(3, 5\)"):
        M.nmse(np.ones((3, 4)), np.ones((3, 5)), None)


def test_non_2d_named():
    with pytest.raises(ValueError, match="pred: expected a 2-D"):
        M.cosine(np.ones(4), np.ones(4))
    with pytest.raises(ValueError, match="gold: expected a 2-D"):
        M.variance_baseline(np.ones((2, 3, 4)), None)


def test_nan_rows_named():
    gold = np.ones((10, 4), dtype=np.float32)
    gold[2, 1] = np.nan
    gold[7, 0] = np.inf
    with pytest.raises(ValueError, match=r"gold: non-finite.*\[2, 7\]"):
        M.nmse(np.ones((10, 4)), gold, 1.0)
    with pytest.raises(ValueError, match=r"non-finite.*\[2, 7\]"):
        M.normalize(gold, 1.0)


def test_many_nan_rows_lists_first_few():
    pred = np.full((20, 3), np.nan)
    with pytest.raises(ValueError, match=r"pred: non-finite.*\[0, 1, 2, 3, 4, \.\.\. \(20 rows in total\)\]"):
        M.fve_summary(pred, np.ones((20, 3)), None)


def test_empty_rejected():
    with pytest.raises(ValueError, match="no rows"):
        M.variance_baseline(np.zeros((0, 4)), None)


def test_single_row_rawvar_zero_rejected_by_fve():
    gold = np.ones((1, 4))
    assert M.variance_baseline(gold, 2.0) == 0.0
    with pytest.raises(ValueError, match="denominator"):
        M.fve_summary(gold, gold, 2.0)


# ---------------------------------------------------------------------------
# Verbatim runs
# ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    "a,b,expected",
    [
        ("the cat sat on the mat", "a cat sat on a mat", 3),
        ("The Cat SAT", "the cat sat", 3),
        ("hello, world!", "Hello world", 2),
        ("don't stop", "do not stop", 1),
        ("don't stop me now", "Don't stop me", 3),
        ("alpha beta", "gamma delta", 0),
        ("", "anything", 0),
        ("a b a b a b", "b a b a", 4),
        ("x y z", "z y x", 1),
    ],
)
def test_longest_common_word_run_examples(a, b, expected):
    assert M.longest_common_word_run(a, b) == expected
    assert M.longest_common_word_run(b, a) == expected


def test_longest_common_word_run_random_against_bruteforce():
    rng = np.random.default_rng(0)
    vocab = ["a", "b", "c", "it's", "d"]
    for _ in range(50):
        a = " ".join(rng.choice(vocab, size=rng.integers(0, 15)))
        b = " ".join(rng.choice(vocab, size=rng.integers(0, 15)))
        assert M.longest_common_word_run(a, b) == ref_lcs_words(a, b)


def test_tokenize_words():
    assert M.tokenize_words("It's a Test-case, isn't it?") == ["it's", "a", "test", "case", "isn't", "it"]


def test_bootstrap_drops_nonfinite_replicates_with_warning():
    values = np.arange(10, dtype=float)
    clusters = np.arange(10)

    def stat(x):
        # Undefined whenever row 0 was not drawn, as a per-replicate ratio can be.
        return float(x.mean()) if np.any(x == 0) else float("nan")

    with pytest.warns(RuntimeWarning, match="dropped"):
        lo, hi, point = M.clustered_bootstrap_ci(values, clusters, stat, n_boot=200, seed=0)
    assert np.isfinite([lo, hi, point]).all()
