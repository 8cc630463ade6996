"""§7b baseline: how much of family B's residual at a position is linearly (or smoothly) predictable
from family A's residual at the aligned position, with no text in between.

Rows are paired vectors (A's residual, B's residual) at the same aligned document position. A map
A -> B is fitted on a training slice and scored on held-out positions with the FVE of
:mod:`nla_ray.core.metrics` (rows rescaled to norm ``scale`` = sqrt(d), NMSE = 2(1 - cos), Var =
the "rawvar" baseline), so the numbers sit beside the NLA cells of §7 with the same denominators.
The seed's reference: n_train 1000 / 5000 / 19995 -> ridge gemma->qwen 0.095 / 0.300 / 0.422,
qwen->gemma 0.085 / 0.172 / 0.240.

Two models share one closed-form solver on a feature matrix ``F``:

* ``linear``: ``F`` = the unit-normalised inputs; ridge with an intercept.
* ``rbf``: kernel ridge with ``k(x, y) = exp(-gamma * |x - y|^2)`` on unit rows, solved in the
  Nystroem feature space of ``m`` landmark rows (``n_components``, default 2000): ``F = k(X, L)
  K_LL^{-1/2}``. With ``m >= n_train`` the landmarks are every training row and this *is* exact
  kernel ridge; above that it is the standard low-rank approximation. Why not the exact solve: a
  float32 Cholesky of a 20k x 20k Gram is 1.6 GB and ~3e12 flops per fit, and a 5-fold CV over a
  grid repeats it dozens of times; Nystroem at m = 2000 keeps two n x m float32 blocks (0.32 GB at
  n = 20k) and is linear in n. :func:`solve_memory_bytes` states the peak of either solve; fits
  record it.

Choices that matter for the numbers:

* Inputs *and* targets are unit-normalised before fitting. FVE only sees directions (predictions
  are rescaled to norm sqrt(d) before the MSE), while raw residual norms vary by orders of
  magnitude (attention-sink positions); least squares on raw targets would spend the fit on
  matching those norms. Unit targets make every position weigh the same, as in the metric.
  ``unit_targets=False`` keeps raw targets (used to check that a known linear map is recovered).
* ``alpha`` is relative: the penalty is ``alpha * tr(Fc' Fc) / p`` (the mean eigenvalue of the
  centred Gram), so one log grid means the same amount of shrinkage at n = 1000 and n = 20000
  and for d = 640 or 5376.
* ``gamma = gamma_rel / median |x_i - x_j|^2`` over training pairs (median heuristic), so
  ``gamma_rel = 1`` gives ``k = 1/e`` at the typical distance whatever the layer's geometry.
* Folds and training subsets are document-grouped when ``groups`` is given: positions of one
  document are correlated, and splitting one across train and test would flatter the score.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import scipy.linalg
from sklearn.model_selection import GroupKFold, KFold

from nla_ray.core import metrics

__all__ = [
    "KINDS",
    "DEFAULT_N_COMPONENTS",
    "RidgeModel",
    "unit",
    "median_sq_dist",
    "rbf_kernel",
    "solve_memory_bytes",
    "fit",
    "predict",
    "train_subset",
    "fold_indices",
    "cv_fold_scores",
    "kfold_cv_score",
    "score_predictions",
    "fit_and_eval",
    "param_grid",
    "learning_curve_rows",
]

KINDS = ("linear", "rbf")
DEFAULT_N_COMPONENTS = 2000
# Rows per block when accumulating Grams: bounds the temporaries at a few tens of MB for any n.
_CHUNK = 4096
# Relative diagonal jitters tried, in order, when factorising the landmark kernel.
_JITTERS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)
_MEDIAN_PAIRS = 4000

Scale = Union[None, str, float, int]


@dataclass(frozen=True)
class RidgeModel:
    """A fitted map: ``predict(X) = (features(unit(X)) - feat_mean) @ coef + target_mean``.

    ``landmarks`` / ``whiten`` / ``gamma`` are set for ``rbf`` only. ``lam`` is the absolute
    penalty that ``alpha`` resolved to; ``rank`` the number of features (d_in, or m landmarks);
    ``mem_bytes`` the estimated peak of the solve (:func:`solve_memory_bytes`).
    """

    kind: str
    coef: np.ndarray
    feat_mean: np.ndarray
    target_mean: np.ndarray
    lam: float
    rank: int
    mem_bytes: int
    landmarks: Optional[np.ndarray] = None
    whiten: Optional[np.ndarray] = None
    gamma: Optional[float] = None


# ---------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------

def _matrix(x: Any, name: str) -> np.ndarray:
    """``x`` as a finite float32 2-D numpy array (numpy, torch or nested lists)."""
    try:
        arr = metrics.normalize(x, None)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from exc
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise ValueError(f"{name}: expected a non-empty 2-D array, got shape {arr.shape}")
    return arr


def unit(X: Any) -> np.ndarray:
    """Rows of ``X`` rescaled to L2 norm 1, float32 (zero rows stay zero; NaN/inf raise)."""
    return metrics.normalize(_matrix(X, "X"), 1.0)


def median_sq_dist(U: np.ndarray, n_pairs: int = _MEDIAN_PAIRS, seed: int = 0) -> float:
    """Median squared distance between random distinct pairs of the unit rows ``U``."""
    n = U.shape[0]
    if n < 2:
        raise ValueError("median_sq_dist needs at least 2 rows")
    rng = np.random.default_rng(seed)
    i = rng.integers(0, n, size=n_pairs)
    # Shift by 1..n-1 so j != i without rejection sampling.
    j = (i + rng.integers(1, n, size=n_pairs)) % n
    d2 = np.sum((U[i] - U[j]) ** 2, axis=1, dtype=np.float64)
    med = float(np.median(d2))
    # All-identical inputs: any positive width gives the same (constant) kernel.
    return med if med > 0 else 1.0


def rbf_kernel(U: np.ndarray, L: np.ndarray, gamma: float) -> np.ndarray:
    """``exp(-gamma |u - l|^2)`` for unit rows, float32 ``(len(U), len(L))``."""
    # For unit rows |u - l|^2 = 2 - 2 u.l: one GEMM, no norms; clamp the rounding below zero.
    K = U @ L.T
    K *= np.float32(-2.0)
    K += np.float32(2.0)
    np.maximum(K, 0.0, out=K)
    K *= np.float32(-gamma)
    np.exp(K, out=K)
    return K


# ---------------------------------------------------------------------------
# Solver
# ---------------------------------------------------------------------------

def solve_memory_bytes(kind: str, n: int, d_in: int, d_out: int,
                       n_components: int = DEFAULT_N_COMPONENTS) -> int:
    """Estimated peak bytes of one fit, beyond the caller's own input arrays.

    Counts the unit copies of inputs and targets (float32), the feature matrix, the float64
    Gram (twice: the solver factors a copy) and right-hand side / solution, and the float32
    coefficients. For ``rbf`` also the landmark kernel, its float64 factor and inverse, and the
    ``n x m`` kernel block alive together with the features. Examples at n = 20000,
    m = 2000: d = 640 -> 0.80 GB rbf, 0.16 GB linear; d = 5376 -> 1.9 GB rbf, 2.3 GB linear
    (there the d x d float64 Gram and the unit copies of X and Y dominate).
    """
    _check_kind(kind)
    f32, f64 = 4, 8
    base = n * d_in * f32 + n * d_out * f32  # unit(X), unit(Y)
    if kind == "linear":
        p = d_in
        extra = 0
    else:
        m = min(int(n_components), n)
        p = m
        extra = n * m * f32 * 2 + m * d_in * f32 + 5 * m * m * f64 + 2 * m * m * f32
    solve = 2 * p * p * f64 + 2 * p * d_out * f64 + p * d_out * f32
    chunks = 2 * _CHUNK * (p + d_out) * f32
    return int(base + extra + solve + chunks)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {KINDS}")


def _centred_normal_equations(F: np.ndarray, T: np.ndarray, f_mu: np.ndarray,
                              t_mu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(Fc' Fc, Fc' Tc)`` in float64, centring block by block so no centred copy of ``F``
    exists. Each block's product is float32 (fast GEMM); the sum over blocks is float64 so
    20k rows do not accumulate float32 rounding."""
    p, q = F.shape[1], T.shape[1]
    G = np.zeros((p, p), dtype=np.float64)
    B = np.zeros((p, q), dtype=np.float64)
    for s in range(0, F.shape[0], _CHUNK):
        Fb = F[s:s + _CHUNK] - f_mu
        Tb = T[s:s + _CHUNK] - t_mu
        G += Fb.T @ Fb
        B += Fb.T @ Tb
    return G, B


def _ridge_solve(F: np.ndarray, T: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray,
                                                                       np.ndarray, float]:
    """Ridge with intercept on features ``F``: ``(coef f32, feat_mean, target_mean, lam)``."""
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha!r}")
    f_mu = F.mean(axis=0, dtype=np.float64).astype(np.float32)
    t_mu = T.mean(axis=0, dtype=np.float64).astype(np.float32)
    G, B = _centred_normal_equations(F, T, f_mu, t_mu)
    p = G.shape[0]
    mean_eig = float(np.trace(G)) / p
    lam = float(alpha) * (mean_eig if mean_eig > 0 else 1.0)
    G[np.diag_indices_from(G)] += lam
    # G + lam I is symmetric positive definite: Cholesky, in float64 so small alphas stay stable.
    coef = scipy.linalg.solve(G, B, assume_a="pos", overwrite_a=True, overwrite_b=True)
    return coef.astype(np.float32), f_mu, t_mu, lam


def _nystroem_whitener(K_LL: np.ndarray) -> np.ndarray:
    """``R^{-1}`` for the Cholesky factor ``K_LL + eps I = R' R``, so that the rows of
    ``k(X, L) @ R^{-1}`` are features whose inner products reproduce the Nystroem kernel.

    Cholesky rather than an eigendecomposition: ~25x fewer flops at m = 2000. ``eps`` starts at
    1e-6 of the mean diagonal, because K_LL of near-duplicate landmarks is numerically singular
    (and float32 rounding can push its smallest eigenvalues below zero); it grows tenfold until
    the factorisation succeeds, which only ever adds a negligible extra ridge.
    """
    K = K_LL.astype(np.float64)
    base = float(np.mean(np.diag(K))) or 1.0
    eye = np.eye(K.shape[0])
    for eps in _JITTERS:
        try:
            R = scipy.linalg.cholesky(K + (eps * base) * eye, lower=False)
        except np.linalg.LinAlgError:
            continue
        return scipy.linalg.solve_triangular(R, eye, lower=False).astype(np.float32)
    raise np.linalg.LinAlgError(f"landmark kernel not positive definite even with jitter {eps}")


def _features(model: RidgeModel, U: np.ndarray) -> np.ndarray:
    if model.kind == "linear":
        return U
    return rbf_kernel(U, model.landmarks, model.gamma) @ model.whiten


def fit(X: Any, Y: Any, kind: str, params: Mapping[str, Any], *, unit_targets: bool = True,
        seed: int = 0) -> RidgeModel:
    """Fit ``kind`` ("linear" or "rbf") mapping the rows of ``X`` to the rows of ``Y``.

    ``params``: ``alpha`` (relative penalty, both kinds); for rbf also ``gamma_rel`` (kernel
    width relative to the median heuristic, default 1) and ``n_components`` (Nystroem landmarks,
    default :data:`DEFAULT_N_COMPONENTS`; capped at the number of rows). ``seed`` picks the
    landmarks and the pairs of the median heuristic.
    """
    _check_kind(kind)
    U = unit(X)
    T = unit(Y) if unit_targets else _matrix(Y, "Y")
    if U.shape[0] != T.shape[0]:
        raise ValueError(f"X has {U.shape[0]} rows but Y has {T.shape[0]}")
    n, d_in = U.shape
    alpha = float(params["alpha"])
    if kind == "linear":
        coef, f_mu, t_mu, lam = _ridge_solve(U, T, alpha)
        mem = solve_memory_bytes(kind, n, d_in, T.shape[1])
        return RidgeModel(kind, coef, f_mu, t_mu, lam, rank=d_in, mem_bytes=mem)
    m = min(int(params.get("n_components", DEFAULT_N_COMPONENTS)), n)
    rng = np.random.default_rng(seed)
    L = U[np.sort(rng.choice(n, size=m, replace=False))]
    gamma = float(params.get("gamma_rel", 1.0)) / median_sq_dist(U, seed=seed)
    whiten = _nystroem_whitener(rbf_kernel(L, L, gamma))
    F = rbf_kernel(U, L, gamma) @ whiten
    coef, f_mu, t_mu, lam = _ridge_solve(F, T, alpha)
    mem = solve_memory_bytes(kind, n, d_in, T.shape[1], m)
    return RidgeModel(kind, coef, f_mu, t_mu, lam, rank=m, mem_bytes=mem,
                      landmarks=L, whiten=whiten, gamma=gamma)


def predict(model: RidgeModel, X: Any) -> np.ndarray:
    """Predicted target rows for ``X`` (float32, un-normalised; the metrics rescale them)."""
    U = unit(X)
    out = np.empty((U.shape[0], model.coef.shape[1]), dtype=np.float32)
    # Block rows so an rbf prediction never holds the full n x m kernel of a large test set.
    for s in range(0, U.shape[0], _CHUNK):
        Fb = _features(model, U[s:s + _CHUNK]) - model.feat_mean
        out[s:s + _CHUNK] = Fb @ model.coef + model.target_mean
    return out


# ---------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------

def train_subset(n: int, n_train: int, groups: Optional[Any] = None, seed: int = 0) -> np.ndarray:
    """Sorted indices of ``min(n_train, n)`` rows drawn from ``n``.

    With ``groups``, whole documents are taken in a seeded random order until ``n_train`` rows
    are reached (only the last document may be cut short), so a small training set spans as
    few, complete documents as a larger one would, rather than a few positions of every one.
    """
    n_train = min(int(n_train), int(n))
    if n_train < 1:
        raise ValueError(f"n_train must be >= 1, got {n_train}")
    rng = np.random.default_rng(seed)
    if groups is None:
        return np.sort(rng.permutation(n)[:n_train])
    g = np.asarray(groups)
    if g.shape != (n,):
        raise ValueError(f"groups: expected {n} labels, got shape {g.shape}")
    _, codes = np.unique(g, return_inverse=True)
    order = rng.permutation(int(codes.max()) + 1)
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    # Stable sort by the document's random rank keeps each document's rows contiguous.
    rows = np.argsort(rank[codes], kind="stable")
    return np.sort(rows[:n_train])


def fold_indices(n: int, k: int = 5, seed: int = 0,
                 groups: Optional[Any] = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """``k`` (train, test) index pairs covering ``range(n)``; with ``groups``, no group is on
    both sides of any split (sklearn ``GroupKFold``, shuffled by ``seed``)."""
    if groups is None:
        splitter = KFold(n_splits=k, shuffle=True, random_state=seed)
        return [(tr, te) for tr, te in splitter.split(np.zeros((n, 1)))]
    g = np.asarray(groups)
    if g.shape != (n,):
        raise ValueError(f"groups: expected {n} labels, got shape {g.shape}")
    n_groups = len(np.unique(g))
    if n_groups < k:
        raise ValueError(f"{k}-fold CV needs at least {k} groups, got {n_groups}")
    splitter = GroupKFold(n_splits=k, shuffle=True, random_state=seed)
    return [(tr, te) for tr, te in splitter.split(np.zeros((n, 1)), groups=g)]


def _resolve(scale: Scale, d: int) -> metrics.Scale:
    return metrics.resolve_scale(scale, d)


def cv_fold_scores(X: Any, Y: Any, kind: str, params: Mapping[str, Any], k: int = 5,
                   seed: int = 0, groups: Optional[Any] = None,
                   scale: Scale = "sqrt_d_model", unit_targets: bool = True) -> list[float]:
    """Held-out FVE of each of ``k`` folds, each against its own fold's Var.

    The own-fold denominator is shared by every hyper-parameter setting scored on the same
    folds (same ``seed``), so it ranks settings exactly as a train-set denominator would.
    """
    X = _matrix(X, "X")
    Y = _matrix(Y, "Y")
    s = _resolve(scale, Y.shape[1])
    out = []
    for tr, te in fold_indices(X.shape[0], k, seed, groups):
        model = fit(X[tr], Y[tr], kind, params, unit_targets=unit_targets, seed=seed)
        per_row = metrics.nmse(predict(model, X[te]), Y[te], s)
        out.append(metrics.fve(per_row, metrics.variance_baseline(Y[te], s)))
    return out


def kfold_cv_score(X: Any, Y: Any, model_kind: str, params: Mapping[str, Any], k: int = 5,
                   seed: int = 0, groups: Optional[Any] = None,
                   scale: Scale = "sqrt_d_model", unit_targets: bool = True) -> float:
    """Mean held-out FVE over ``k`` folds (document-grouped when ``groups`` is given)."""
    return float(np.mean(cv_fold_scores(X, Y, model_kind, params, k, seed, groups, scale,
                                        unit_targets)))


# ---------------------------------------------------------------------------
# Held-out evaluation
# ---------------------------------------------------------------------------

def score_predictions(pred: Any, gold: Any, scale: metrics.Scale, var_own: Optional[float] = None,
                      var_train: Optional[float] = None, *, groups: Optional[Any] = None,
                      n_boot: int = 1000, seed: int = 0) -> dict:
    """NMSE, cos and FVE of predictions against gold rows, with the §7 denominators.

    ``var_own`` defaults to the Var of ``gold`` itself; ``fve_train`` is reported when
    ``var_train`` is given. ``fve_null_own`` is the shuffled-pairing null (predictions scored
    against other documents' gold). With ``groups`` (document ids) each FVE also gets a
    document-clustered bootstrap CI ``*_ci = (lo, hi)``.
    """
    per_row = metrics.nmse(pred, gold, scale)
    if var_own is None:
        var_own = metrics.variance_baseline(gold, scale)
    out = {
        "n_test": int(per_row.shape[0]),
        "nmse": float(np.mean(per_row, dtype=np.float32)),
        "cos": float(np.mean(metrics.cosine(pred, gold), dtype=np.float32)),
        "var_own": float(var_own),
        "fve_own": metrics.fve(per_row, var_own),
        "var_train": None if var_train is None else float(var_train),
        "fve_train": None if var_train is None else metrics.fve(per_row, var_train),
    }
    if per_row.shape[0] >= 2:
        out["fve_null_own"] = metrics.shuffled_null(pred, gold, scale, var_own, seed=seed,
                                                    clusters=groups)
    if groups is not None:
        lo, hi, _ = metrics.fve_ci(per_row, groups, var_own, n_boot=n_boot, seed=seed)
        out["fve_own_ci"] = (lo, hi)
        if var_train is not None:
            lo, hi, _ = metrics.fve_ci(per_row, groups, var_train, n_boot=n_boot, seed=seed)
            out["fve_train_ci"] = (lo, hi)
    return out


def fit_and_eval(X_tr: Any, Y_tr: Any, X_te: Any, Y_te: Any, kind: str,
                 params: Mapping[str, Any], scale: Scale, var_own: Optional[float] = None,
                 var_train: Optional[float] = None, *, groups_te: Optional[Any] = None,
                 unit_targets: bool = True, seed: int = 0, n_boot: int = 1000) -> dict:
    """Fit on the training pairs, score on the held-out pairs (:func:`score_predictions`).

    ``scale`` is a metrics scale spec (``"sqrt_d_model"`` resolves against the target width).
    Adds ``kind``, ``params``, ``n_train``, ``fit_s`` (wall seconds of the fit), ``lam``,
    ``rank``, ``gamma`` (rbf) and ``solve_mem_bytes`` (estimated peak of the solve).
    """
    Y_te = _matrix(Y_te, "Y_te")
    s = _resolve(scale, Y_te.shape[1])
    t0 = time.perf_counter()
    model = fit(X_tr, Y_tr, kind, params, unit_targets=unit_targets, seed=seed)
    fit_s = time.perf_counter() - t0
    out = {"kind": kind, "params": dict(params), "n_train": _rows(X_tr),
           "fit_s": fit_s, "lam": model.lam, "rank": model.rank, "gamma": model.gamma,
           "solve_mem_bytes": model.mem_bytes}
    out.update(score_predictions(predict(model, X_te), Y_te, s, var_own, var_train,
                                 groups=groups_te, n_boot=n_boot, seed=seed))
    return out


def _rows(X: Any) -> int:
    """Number of rows of a 2-D array-like (numpy, torch or nested lists)."""
    return int(X.shape[0]) if hasattr(X, "shape") else len(X)


# ---------------------------------------------------------------------------
# Grids and tables
# ---------------------------------------------------------------------------

def param_grid(kind: str, alphas: Optional[Sequence[float]] = None,
               gamma_rels: Optional[Sequence[float]] = None,
               n_components: int = DEFAULT_N_COMPONENTS) -> list[dict]:
    """Hyper-parameter settings to sweep for ``kind``.

    Defaults: relative ``alpha`` on a log grid 1e-4 .. 10 (linear) or 1e-4 .. 1 (rbf, whose
    features are already smoothed), and for rbf ``gamma_rel`` in {0.25, 0.5, 1, 2} around the
    median heuristic, each with ``n_components`` Nystroem landmarks.
    """
    _check_kind(kind)
    if kind == "linear":
        a = np.logspace(-4, 1, 6) if alphas is None else alphas
        return [{"alpha": float(x)} for x in a]
    a = np.logspace(-4, 0, 5) if alphas is None else alphas
    g = (0.25, 0.5, 1.0, 2.0) if gamma_rels is None else gamma_rels
    return [{"alpha": float(x), "gamma_rel": float(y), "n_components": int(n_components)}
            for y in g for x in a]


ParamsFor = Union[Mapping[tuple, Mapping[str, Any]], Callable[[str, int], Mapping[str, Any]]]


def _lookup_params(params_for: ParamsFor, kind: str, n_train: int) -> Mapping[str, Any]:
    if callable(params_for):
        return params_for(kind, n_train)
    return params_for[(kind, n_train)]


def learning_curve_rows(X_tr: Any, Y_tr: Any, X_te: Any, Y_te: Any, *, kinds: Sequence[str],
                        params_for: ParamsFor, n_trains: Sequence[int] = (1000, 5000, 20000),
                        groups_tr: Optional[Any] = None, groups_te: Optional[Any] = None,
                        scale: Scale = "sqrt_d_model", label: Optional[str] = None,
                        unit_targets: bool = True, seed: int = 0, n_boot: int = 1000) -> list[dict]:
    """One table row per (kind, n_train): fit on a (document-grouped) subset of the training
    slice, score on the whole held-out slice.

    ``params_for`` maps ``(kind, n_train)`` to the settings to use (e.g. from
    ``nla_ray.runtime.tune.best_configs``), as a mapping or a callable. An ``n_train`` above what
    the slice holds uses every training row; ``n_train_used`` says how many. ``var_train`` is the
    Var of the *whole* training slice, one constant for all rows, so ``fve_train`` is comparable
    down the table; ``fve_own`` uses the held-out slice's Var. ``label`` (e.g. "gemma->qwen")
    is copied into every row.
    """
    X_tr = _matrix(X_tr, "X_tr")
    Y_tr = _matrix(Y_tr, "Y_tr")
    s = _resolve(scale, Y_tr.shape[1])
    var_train = metrics.variance_baseline(Y_tr, s)
    rows = []
    for n_req in n_trains:
        idx = train_subset(X_tr.shape[0], n_req, groups_tr, seed)
        for kind in kinds:
            params = _lookup_params(params_for, kind, n_req)
            r = fit_and_eval(X_tr[idx], Y_tr[idx], X_te, Y_te, kind, params, scale,
                             var_train=var_train, groups_te=groups_te,
                             unit_targets=unit_targets, seed=seed, n_boot=n_boot)
            r.update({"label": label, "n_train": int(n_req), "n_train_used": int(len(idx))})
            rows.append(r)
    return rows


def curve_figure(rows: Sequence[Mapping[str, Any]], text_route: Optional[Mapping[str, float]],
                 names: Mapping[str, str], path) -> Any:
    """Held-out FVE against training pairs, one panel per direction: a line per map, the text
    route (cross_family's cell for the same direction) as a dashed level where it is known."""
    from nla_ray.report import pyplot, save_figure

    plt = pyplot()
    dirs = list(dict.fromkeys(r["key"] for r in rows))
    fig, axes = plt.subplots(1, len(dirs), figsize=(5.2 * len(dirs), 3.8), squeeze=False)
    for ax, key in zip(axes[0], dirs):
        for kind in KINDS:
            pts = sorted((r["n_train_used"], r["fve_own"]) for r in rows if r["key"] == key and r["kind"] == kind)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"{kind} ridge")
        if text_route and text_route.get(key) is not None:
            ax.axhline(text_route[key], ls="--", color="k", label=f"text route {text_route[key]:.3f}")
        src, dst = key.split("_to_")
        ax.set_xscale("log")
        ax.set_xlabel("training pairs")
        ax.set_ylabel("held-out FVE (own-set Var)")
        ax.set_title(f"{names[src]} → {names[dst]}", fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
