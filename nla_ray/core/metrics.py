"""Reconstruction metrics for Natural Language Autoencoders.

An NLA maps an activation vector to text (AV) and back to a vector (AR); these
functions score the reconstructed vectors ``pred`` against the original ones
``gold``. Conventions, matching the NLA release:

* Inputs are 2-D ``(rows, d_model)`` numpy arrays or torch tensors; outputs are
  numpy arrays (per-row values) or Python floats (summaries).
* Vector arithmetic runs in float32, because that is what the released numbers
  were produced with; reproducing them bit-for-bit-ish matters more than the
  last digit of accuracy. Only the final scalar (e.g. ``1 - m / var``) is done
  in Python float.
* Before comparison each row is rescaled to a common L2 norm ``scale``
  (``sqrt(d_model)`` in the release, so that an element has unit RMS and NMSE
  equals ``2 * (1 - cos)``). ``scale=None`` compares raw vectors.
* An all-zero row is allowed: its norm is clamped to 1e-12, so it stays zero
  after normalization (cosine with it is 0, its NMSE is the other row's mean
  square). That is a defined, if degenerate, answer rather than a NaN that
  would silently poison a mean over thousands of rows.
* NaN/inf rows, wrong ranks and mismatched shapes are rejected with a
  ValueError naming the problem and the first offending row indices.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional, Union

import numpy as np

__all__ = [
    "resolve_scale",
    "normalize",
    "nmse",
    "cosine",
    "variance_baseline",
    "meannorm_baseline",
    "fve",
    "FVEValue",
    "FVESummary",
    "fve_summary",
    "clustered_bootstrap_ci",
    "fve_ci",
    "derangement_indices",
    "shuffled_null",
    "tokenize_words",
    "longest_common_word_run",
]

ArrayLike = Any  # numpy array, torch tensor, or nested sequence of numbers
Scale = Optional[float]

_NORM_EPS = 1e-12
_MAX_LISTED_ROWS = 5
_RAW_SPECS = {"raw", "none"}


# ---------------------------------------------------------------------------
# Input handling
# ---------------------------------------------------------------------------

def _as_float32(x: ArrayLike, name: str) -> np.ndarray:
    # Duck-typed so torch stays an optional import for callers that only use numpy.
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        # .float() first: numpy has no bfloat16, which is how activations are
        # usually stored.
        x = x.detach().cpu().float().numpy()
    try:
        arr = np.asarray(x, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: cannot convert to a float32 array ({exc})") from exc
    return arr


def _row_list(rows: np.ndarray) -> str:
    shown = ", ".join(str(int(r)) for r in rows[:_MAX_LISTED_ROWS])
    more = f", ... ({len(rows)} rows in total)" if len(rows) > _MAX_LISTED_ROWS else ""
    return f"[{shown}{more}]"


def _check_finite(arr: np.ndarray, name: str) -> None:
    finite = np.isfinite(arr)
    if finite.all():
        return
    if arr.ndim == 0:
        raise ValueError(f"{name}: value is NaN or infinite")
    bad_rows = np.flatnonzero(~finite.reshape(-1, arr.shape[-1]).all(axis=1))
    raise ValueError(
        f"{name}: non-finite values (NaN/inf) in row(s) {_row_list(bad_rows)}"
    )


def _matrix(x: ArrayLike, name: str) -> np.ndarray:
    arr = _as_float32(x, name)
    if arr.ndim != 2:
        raise ValueError(
            f"{name}: expected a 2-D array (rows, d_model), got shape {tuple(arr.shape)}"
        )
    if arr.shape[0] == 0:
        raise ValueError(f"{name}: has no rows")
    if arr.shape[1] == 0:
        raise ValueError(f"{name}: has zero columns (d_model == 0)")
    _check_finite(arr, name)
    return arr


def _pair(pred: ArrayLike, gold: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    p = _matrix(pred, "pred")
    g = _matrix(gold, "gold")
    if p.shape != g.shape:
        raise ValueError(
            f"shape mismatch: pred has shape {tuple(p.shape)}, gold has shape {tuple(g.shape)}"
        )
    return p, g


def _vector(x: ArrayLike, name: str) -> np.ndarray:
    arr = _as_float32(x, name)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array of per-row values, got shape {tuple(arr.shape)}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name}: is empty")
    _check_finite(arr, name)
    return arr


def _check_var(var: float, name: str = "var") -> float:
    try:
        v = float(var)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: must be a number, got {var!r}") from exc
    if not math.isfinite(v) or v <= 0.0:
        # A zero denominator arises from a single-row or all-identical gold set;
        # an FVE against it is meaningless, not infinite.
        raise ValueError(f"{name}: FVE denominator must be finite and > 0, got {v!r}")
    return v


def _check_scale(scale: Any) -> float:
    try:
        s = float(scale)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"scale: must be None or a number, got {scale!r}") from exc
    if not math.isfinite(s) or s <= 0.0:
        raise ValueError(f"scale: must be finite and > 0, got {s!r}")
    return s


# ---------------------------------------------------------------------------
# Normalization
# ---------------------------------------------------------------------------

def resolve_scale(spec: Union[None, str, float, int], d_model: Optional[int] = None) -> Scale:
    """Turn a config value into a row norm for :func:`normalize`.

    ``None``, ``"raw"``, ``"none"`` -> ``None`` (no rescaling);
    ``"sqrt_d_model"`` -> ``sqrt(d_model)``; a positive number or numeric
    string -> that float. Anything else raises ValueError naming the value.
    """
    if spec is None:
        return None
    # bool is an int subclass; a stray True in a config must not become scale 1.
    if isinstance(spec, bool):
        raise ValueError(f"invalid scale spec {spec!r}: booleans are not scales")
    if isinstance(spec, str):
        key = spec.strip().lower()
        if key in _RAW_SPECS:
            return None
        if key == "sqrt_d_model":
            if d_model is None:
                raise ValueError(f"invalid scale spec {spec!r}: 'sqrt_d_model' needs d_model")
            if int(d_model) <= 0:
                raise ValueError(f"invalid d_model {d_model!r} for scale spec {spec!r}")
            return float(math.sqrt(int(d_model)))
        try:
            value = float(key)
        except ValueError:
            raise ValueError(
                f"invalid scale spec {spec!r}: expected None, 'raw', 'none', "
                f"'sqrt_d_model' or a positive number"
            ) from None
    elif isinstance(spec, (int, float, np.integer, np.floating)):
        value = float(spec)
    else:
        raise ValueError(
            f"invalid scale spec {spec!r}: expected None, 'raw', 'none', "
            f"'sqrt_d_model' or a positive number"
        )
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"invalid scale spec {spec!r}: scale must be finite and > 0")
    return value


def _normalize_f32(v: np.ndarray, scale: Scale) -> np.ndarray:
    if scale is None:
        return v
    norm = np.linalg.norm(v, axis=-1, keepdims=True).astype(np.float32, copy=False)
    # Same operation order as the release (v / norm * scale) to match its rounding.
    return (v / np.maximum(norm, np.float32(_NORM_EPS))) * np.float32(scale)


def normalize(v: ArrayLike, scale: Scale) -> np.ndarray:
    """Rescale each row (last axis) of ``v`` to L2 norm ``scale``, in float32.

    ``scale=None`` returns the raw values (as float32 numpy). Zero rows stay
    zero because the norm is clamped at 1e-12. Non-finite values raise.
    """
    arr = _as_float32(v, "v")
    if arr.ndim == 0:
        raise ValueError("v: expected at least a 1-D array, got a scalar")
    _check_finite(arr, "v")
    if scale is not None:
        scale = _check_scale(scale)
    return _normalize_f32(arr, scale)


# ---------------------------------------------------------------------------
# Per-row metrics
# ---------------------------------------------------------------------------

def _nmse_f32(p: np.ndarray, g: np.ndarray, scale: Scale) -> np.ndarray:
    diff = _normalize_f32(p, scale) - _normalize_f32(g, scale)
    return np.mean(diff * diff, axis=1, dtype=np.float32)


def nmse(pred: ArrayLike, gold: ArrayLike, scale: Scale) -> np.ndarray:
    """Per-row mean squared error between the normalized rows, shape ``(rows,)``.

    At ``scale = sqrt(d_model)`` this equals ``2 * (1 - cosine)``.
    """
    p, g = _pair(pred, gold)
    return _nmse_f32(p, g, scale)


def cosine(pred: ArrayLike, gold: ArrayLike) -> np.ndarray:
    """Per-row cosine similarity, shape ``(rows,)``; 0 where either row is zero."""
    p, g = _pair(pred, gold)
    pu = _normalize_f32(p, 1.0)
    gu = _normalize_f32(g, 1.0)
    return np.sum(pu * gu, axis=1, dtype=np.float32)


# ---------------------------------------------------------------------------
# Baselines (FVE denominators)
# ---------------------------------------------------------------------------

def variance_baseline(gold: ArrayLike, scale: Scale) -> float:
    """The "rawvar" baseline: mean over all elements of ``(normalize(v) - mu) ** 2``.

    ``mu`` is the mean of the normalized rows and is deliberately *not*
    renormalized, so this is the mean squared error of the best constant
    vector, and FVE against it reads as a true fraction of variance explained.
    A constant *prediction* still gets normalized by :func:`nmse`, so it
    cannot reach this floor; see :func:`meannorm_baseline`.
    """
    g = _matrix(gold, "gold")
    gn = _normalize_f32(g, scale)
    mu = gn.mean(axis=0, dtype=np.float32)
    centered = gn - mu
    return float(np.mean(centered * centered, dtype=np.float32))


def meannorm_baseline(gold: ArrayLike, scale: Scale) -> float:
    """Older baseline: mean NMSE of predicting ``normalize(mu)`` for every row.

    Unlike :func:`variance_baseline`, the mean direction is rescaled to the
    common norm ``s``, which adds ``(s - |mu|) ** 2 / d_model`` to rawvar; FVEs
    against it look better and are kept only for comparison with earlier
    reports. With ``scale=None`` the two baselines coincide.
    """
    g = _matrix(gold, "gold")
    gn = _normalize_f32(g, scale)
    mu = gn.mean(axis=0, dtype=np.float32)
    constant = np.broadcast_to(mu, g.shape)
    return float(np.mean(_nmse_f32(constant, g, scale), dtype=np.float32))


# ---------------------------------------------------------------------------
# FVE
# ---------------------------------------------------------------------------

def fve(nmse_values: ArrayLike, var: float) -> float:
    """Fraction of variance explained: ``1 - mean(nmse_values) / var``."""
    values = _vector(nmse_values, "nmse_values")
    v = _check_var(var)
    return 1.0 - float(np.mean(values, dtype=np.float32)) / v


@dataclass(frozen=True)
class FVEValue:
    """An FVE together with the denominator it was computed against.

    Keeping the denominator attached stops own-set and train-set FVEs from
    being compared as if they were the same quantity.
    """

    value: float
    denominator: str  # "own_set" or "train_set"
    denominator_value: float


@dataclass(frozen=True)
class FVESummary:
    n: int
    scale: Scale
    nmse_mean: float
    cos_mean: float
    var_own: float
    fve_own: FVEValue
    fve_train: Optional[FVEValue] = None

    def as_dict(self) -> dict:
        return asdict(self)


def fve_summary(
    pred: ArrayLike,
    gold: ArrayLike,
    scale: Scale,
    var_train: Optional[float] = None,
) -> FVESummary:
    """NMSE, cosine and FVE for one evaluation set.

    ``fve_own`` uses the rawvar of ``gold`` itself; ``fve_train`` (only when
    ``var_train`` is given) uses a denominator measured on the training set,
    which is the comparable number across evaluation sets of different
    diversity.
    """
    p, g = _pair(pred, gold)
    per_row = _nmse_f32(p, g, scale)
    var_own = variance_baseline(g, scale)
    nmse_mean = float(np.mean(per_row, dtype=np.float32))
    fve_own = FVEValue(fve(per_row, var_own), "own_set", var_own)
    fve_train = None
    if var_train is not None:
        vt = _check_var(var_train, "var_train")
        fve_train = FVEValue(fve(per_row, vt), "train_set", vt)
    return FVESummary(
        n=int(p.shape[0]),
        scale=scale,
        nmse_mean=nmse_mean,
        cos_mean=float(np.mean(cosine(p, g), dtype=np.float32)),
        var_own=var_own,
        fve_own=fve_own,
        fve_train=fve_train,
    )


# ---------------------------------------------------------------------------
# Clustered bootstrap
# ---------------------------------------------------------------------------

def _cluster_codes(clusters: Optional[ArrayLike], n: int) -> np.ndarray:
    if clusters is None:
        return np.arange(n)
    if hasattr(clusters, "detach") and hasattr(clusters, "cpu"):
        clusters = clusters.detach().cpu().numpy()
    labels = np.asarray(clusters)
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(
            f"clusters: expected one label per row ({n} rows), got shape {tuple(labels.shape)}"
        )
    _, codes = np.unique(labels, return_inverse=True)
    return codes.reshape(-1)


def clustered_bootstrap_ci(
    values_or_pairs: Union[ArrayLike, tuple],
    clusters: Optional[ArrayLike],
    stat_fn: Callable[..., float],
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Percentile bootstrap CI that resamples whole clusters (documents).

    Rows from one document are correlated, so resampling rows independently
    would give intervals that are too narrow; instead each replicate draws as
    many clusters as there are, with replacement, and keeps all their rows.

    ``values_or_pairs`` is either one array whose first axis is rows (e.g.
    per-row NMSE, or an ``(n, 2)`` array of pairs), passed to ``stat_fn`` as
    is, or a *tuple* of such arrays, resampled jointly and passed to
    ``stat_fn`` unpacked. ``clusters`` gives one label per row; ``None``
    treats every row as its own cluster.

    Returns ``(lo, hi, point)``, where ``point = stat_fn(full data)``.
    Replicates whose statistic is not finite are dropped with a warning.
    """
    if isinstance(values_or_pairs, tuple):
        arrays = tuple(_as_float32(a, f"values_or_pairs[{i}]")
                       for i, a in enumerate(values_or_pairs))
        unpack = True
    else:
        arrays = (_as_float32(values_or_pairs, "values_or_pairs"),)
        unpack = False
    if not arrays:
        raise ValueError("values_or_pairs: empty tuple")
    for i, a in enumerate(arrays):
        if a.ndim == 0:
            raise ValueError(f"values_or_pairs[{i}]: expected per-row values, got a scalar")
    n = arrays[0].shape[0]
    if n == 0:
        raise ValueError("values_or_pairs: has no rows")
    for i, a in enumerate(arrays):
        if a.shape[0] != n:
            raise ValueError(
                f"values_or_pairs: arrays disagree on row count ({n} vs {a.shape[0]} in item {i})"
            )
    if int(n_boot) != n_boot or n_boot < 1:
        raise ValueError(f"n_boot: must be a positive integer, got {n_boot!r}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha: must be in (0, 1), got {alpha!r}")

    def call(idx: Optional[np.ndarray]) -> float:
        parts = arrays if idx is None else tuple(a[idx] for a in arrays)
        return float(stat_fn(*parts) if unpack else stat_fn(parts[0]))

    codes = _cluster_codes(clusters, n)
    k = int(codes.max()) + 1
    # Rows sorted by cluster, so cluster c is the slice order[start[c]:start[c]+size[c]].
    order = np.argsort(codes, kind="stable")
    size = np.bincount(codes, minlength=k)
    start = np.concatenate(([0], np.cumsum(size)[:-1]))

    rng = np.random.default_rng(seed)
    stats = np.empty(int(n_boot), dtype=np.float64)
    for b in range(int(n_boot)):
        drawn = rng.integers(0, k, size=k)
        sizes = size[drawn]
        # Offsets 0..size-1 within each drawn cluster, built without a Python loop.
        within = np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        idx = order[np.repeat(start[drawn], sizes) + within]
        stats[b] = call(idx)

    finite = np.isfinite(stats)
    if not finite.any():
        raise ValueError("stat_fn returned a non-finite value on every bootstrap replicate")
    if not finite.all():
        warnings.warn(
            f"clustered_bootstrap_ci: dropped {int((~finite).sum())} of {len(stats)} "
            f"replicates with a non-finite statistic",
            RuntimeWarning,
            stacklevel=2,
        )
    lo, hi = np.quantile(stats[finite], [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(lo), float(hi), call(None)


def fve_ci(
    nmse_values: ArrayLike,
    clusters: Optional[ArrayLike],
    var: float,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Clustered bootstrap CI for ``fve(nmse_values, var)``: ``(lo, hi, point)``.

    The denominator ``var`` is held fixed; only the mean NMSE is resampled.
    That is exact for a train-set denominator (a constant of the model, not of
    this sample) and slightly understates the uncertainty of an own-set FVE,
    whose denominator also varies with the sample. To propagate both, call
    :func:`clustered_bootstrap_ci` with a ``(pred, gold)`` tuple and a
    ``stat_fn`` that recomputes the variance per replicate.
    """
    values = _vector(nmse_values, "nmse_values")
    v = _check_var(var)
    return clustered_bootstrap_ci(
        values,
        clusters,
        lambda x: 1.0 - float(np.mean(x, dtype=np.float32)) / v,
        n_boot=n_boot,
        alpha=alpha,
        seed=seed,
    )


# ---------------------------------------------------------------------------
# Shuffled null
# ---------------------------------------------------------------------------

def derangement_indices(
    n: int, clusters: Optional[ArrayLike] = None, seed: int = 0
) -> np.ndarray:
    """A permutation ``perm`` with ``perm[i] != i`` for every row.

    With ``clusters``, ``clusters[perm[i]] != clusters[i]`` for every row when
    the largest cluster holds at most half the rows; otherwise as many rows as
    possible (``2 * (n - largest)``) cross clusters and the rest are paired
    within the largest cluster, still never with themselves.

    Construction: lay rows out cluster by cluster (random cluster order,
    random order inside each cluster) on a circle and pair each position with
    the one ``s`` steps ahead, for a random ``s`` in ``[m, n - m]`` (``m`` the
    largest cluster size). A block of length <= m cannot reach itself with such
    a shift. Without clusters this is a random n-cycle: not uniform over all
    derangements, which does not matter for a null baseline.
    """
    n = int(n)
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 rows, got {n}")
    codes = _cluster_codes(clusters, n)
    rng = np.random.default_rng(seed)
    size = np.bincount(codes)
    m = int(size.max())
    if m == n:
        # One cluster: no cross-cluster pairing exists, fall back to a plain derangement.
        codes = np.arange(n)
        size = np.ones(n, dtype=np.int64)
        m = 1
    cluster_rank = rng.permutation(len(size))[codes]
    tiebreak = rng.random(n)
    layout = np.lexsort((tiebreak, cluster_rank))
    shift = int(rng.integers(m, n - m + 1)) if m <= n - m else m
    perm = np.empty(n, dtype=np.int64)
    perm[layout] = layout[(np.arange(n) + shift) % n]
    return perm


def shuffled_null(
    pred: ArrayLike,
    gold: ArrayLike,
    scale: Scale,
    var: float,
    seed: int = 0,
    clusters: Optional[ArrayLike] = None,
) -> float:
    """FVE when each prediction is scored against a *different* row's gold.

    The pairing is a derangement (:func:`derangement_indices`), across
    clusters when ``clusters`` is given and possible, so that a prediction is
    not credited for matching its own document's typical direction. This
    estimates how much FVE a reconstruction gets from the shared structure of
    the activation distribution alone.
    """
    p, g = _pair(pred, gold)
    perm = derangement_indices(p.shape[0], clusters=clusters, seed=seed)
    return fve(_nmse_f32(p, g[perm], scale), var)


# ---------------------------------------------------------------------------
# Verbatim runs
# ---------------------------------------------------------------------------

_WORD_RE = re.compile(r"\w+(?:'\w+)?")


def tokenize_words(text: str) -> list[str]:
    """Lowercased words as used by :func:`longest_common_word_run`."""
    return _WORD_RE.findall(text.lower())


def longest_common_word_run(a_text: str, b_text: str) -> int:
    """Length in words of the longest contiguous word sequence in both texts.

    Words are lowercased matches of ``\\w+(?:'\\w+)?``. Longest-common-substring
    dynamic programming over words, O(len(a) * len(b)) time and O(len(b))
    memory; each DP row is one vectorized numpy step.
    """
    a = tokenize_words(a_text)
    b = tokenize_words(b_text)
    if not a or not b:
        return 0
    vocab: dict[str, int] = {}
    a_ids = np.array([vocab.setdefault(w, len(vocab)) for w in a], dtype=np.int64)
    b_ids = np.array([vocab.setdefault(w, len(vocab)) for w in b], dtype=np.int64)
    # prev[j] = length of the common run ending at a[i-1] and b[j-1].
    prev = np.zeros(len(b) + 1, dtype=np.int64)
    best = 0
    for token in a_ids:
        cur = np.zeros_like(prev)
        cur[1:] = np.where(b_ids == token, prev[:-1] + 1, 0)
        row_best = int(cur.max())
        if row_best > best:
            best = row_best
        prev = cur
    return best
