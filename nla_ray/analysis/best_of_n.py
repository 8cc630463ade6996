"""§5 arithmetic: best-of-N selection under the AR.

Each activation gets ``k`` sampled explanations (temperature 1.0); the AR scores each one (NMSE).
"Best of N" picks, per activation, the sample with the lowest NMSE among N of them — an oracle
selection that uses the gold vector, so it measures headroom in the AV's sampling distribution,
not a deployable method.

Estimator: for N < k we do not use the first N samples (one arbitrary subset) but the exact
expectation of min-of-N over *all* N-subsets of the k samples, from order statistics. With the
row sorted ascending, x_(1) <= ... <= x_(k), the i-th smallest is the minimum of exactly
C(k - i, N - 1) of the C(k, N) subsets, so

    E[min over a uniform N-subset] = sum_i C(k - i, N - 1) / C(k, N) * x_(i).

This is the unbiased (U-statistic) estimator of the expected best-of-N from k >= N draws, has
lower variance than any single subset, and needs no randomness; N = 1 gives the row mean, N = k
the row minimum. ``n_resamples > 0`` averages over random subsets instead (kept to cross-check).
"""

from __future__ import annotations

from math import comb
from typing import Optional, Sequence

import numpy as np

from nla_ray.core import metrics

__all__ = ["to_matrix", "subset_min_weights", "best_of_n", "best_index", "curve", "slope_per_doubling",
           "tag_failures", "sweep_metrics", "score_rows", "curve_figure"]


def to_matrix(act_ids: Sequence, sample_idx: Sequence[int], nmse: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Long per-(activation, sample) arrays -> ``(matrix [n_act, k], activation ids)``.

    Rows follow the sorted unique activation ids; column j is sample index j, so ``k`` is
    ``max(sample_idx) + 1``. A missing cell or a duplicated (activation, sample) pair raises: a
    silently absent sample would bias best-of-N for that row.
    """
    a = np.asarray(act_ids)
    s = np.asarray(sample_idx, dtype=np.int64)
    v = np.asarray(nmse, dtype=np.float64)
    if not (a.shape == s.shape == v.shape) or a.ndim != 1:
        raise ValueError(f"act_ids, sample_idx, nmse must be 1-D of one length, got {a.shape}, {s.shape}, {v.shape}")
    if a.size == 0:
        raise ValueError("no rows")
    if s.min() < 0:
        raise ValueError("sample_idx must be >= 0")
    ids, row = np.unique(a, return_inverse=True)
    k = int(s.max()) + 1
    m = np.full((len(ids), k), np.nan)
    seen = np.zeros((len(ids), k), dtype=np.int64)
    np.add.at(seen, (row, s), 1)
    if (seen > 1).any():
        r, c = np.argwhere(seen > 1)[0]
        raise ValueError(f"duplicate (activation, sample) pair: ({ids[r]!r}, {c})")
    if (seen == 0).any():
        r, c = np.argwhere(seen == 0)[0]
        raise ValueError(f"missing sample {c} for activation {ids[r]!r} ({int((seen == 0).sum())} cells missing)")
    m[row, s] = v
    return m, ids


def subset_min_weights(k: int, n: int) -> np.ndarray:
    """Weights w_i (i = 1..k) with E[min of a uniform n-subset] = sum_i w_i x_(i); they sum to 1."""
    if not 1 <= n <= k:
        raise ValueError(f"need 1 <= N <= k, got N={n}, k={k}")
    total = comb(k, n)
    # Exact integers, then one division: comb() of large k would overflow floats before dividing.
    return np.array([comb(k - i, n - 1) / total for i in range(1, k + 1)], dtype=np.float64)


def _check_matrix(nmse_matrix) -> np.ndarray:
    m = np.asarray(nmse_matrix, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] == 0 or m.shape[1] == 0:
        raise ValueError(f"nmse_matrix: expected a non-empty 2-D array [n_act, k], got shape {m.shape}")
    if not np.isfinite(m).all():
        raise ValueError("nmse_matrix: has non-finite values (score failed samples, or build it with to_matrix)")
    return m


def best_of_n(nmse_matrix, N: int, n_resamples: int = 0, seed: int = 0) -> np.ndarray:
    """Per-activation expected best-of-N NMSE, shape ``[n_act]``.

    ``n_resamples == 0`` (default): the exact all-subsets estimator (module docstring).
    ``n_resamples > 0``: mean over that many uniformly random N-subsets per activation.
    """
    m = _check_matrix(nmse_matrix)
    k = m.shape[1]
    N = int(N)
    if not 1 <= N <= k:
        raise ValueError(f"best-of-{N} needs 1 <= N <= k = {k} samples per activation")
    if n_resamples <= 0:
        return np.sort(m, axis=1) @ subset_min_weights(k, N)
    rng = np.random.default_rng(seed)
    # Random N-subsets as the first N columns of a random permutation per (row, resample).
    keys = rng.random((m.shape[0], int(n_resamples), k))
    cols = np.argsort(keys, axis=2)[:, :, :N]
    picked = np.take_along_axis(m[:, None, :].repeat(int(n_resamples), axis=1), cols, axis=2)
    return picked.min(axis=2).mean(axis=1)


def best_index(nmse_matrix, N: int) -> np.ndarray:
    """Index of the sample a best-of-N run over samples 0..N-1 would keep (ties: lowest index)."""
    m = _check_matrix(nmse_matrix)
    if not 1 <= int(N) <= m.shape[1]:
        raise ValueError(f"N={N} out of range for k={m.shape[1]}")
    return np.argmin(m[:, :int(N)], axis=1)


def curve(nmse_matrix, Ns: Sequence[int] = (1, 2, 3, 5, 10), var: float = 1.0, *,
          greedy: Optional[Sequence[float]] = None, doc_ids: Optional[Sequence] = None,
          n_boot: int = 1000, seed: int = 0) -> list[dict]:
    """Rows ``{selection, N, nmse, fve[, fve_ci95]}``: greedy first (if given), then each N.

    FVE is ``1 - mean(best-of-N NMSE) / var`` with ``var`` fixed (the eval set's denominator).
    ``doc_ids`` (one per activation) adds a document-clustered 95% bootstrap CI. N larger than the
    number of samples is skipped rather than extrapolated.
    """
    m = _check_matrix(nmse_matrix)
    docs = None if doc_ids is None else np.asarray(doc_ids)
    rows = []

    def row(name: str, n: Optional[int], per_act: np.ndarray) -> dict:
        r = {"selection": name, "N": n, "nmse": float(per_act.mean()), "fve": metrics.fve(per_act, var)}
        if docs is not None:
            lo, hi, _ = metrics.fve_ci(per_act, docs, var, n_boot=n_boot, seed=seed)
            r["fve_ci95"] = [float(lo), float(hi)]
        return r

    if greedy is not None:
        g = np.asarray(greedy, dtype=np.float64)
        if g.shape != (m.shape[0],):
            raise ValueError(f"greedy: expected shape ({m.shape[0]},), got {g.shape}")
        rows.append(row("greedy", None, g))
    for n in Ns:
        if int(n) > m.shape[1]:
            continue
        name = "1 sample" if int(n) == 1 else f"best of {int(n)}"
        rows.append(row(name, int(n), best_of_n(m, int(n))))
    return rows


def slope_per_doubling(Ns: Sequence[float], fves: Sequence[float]) -> float:
    """Least-squares slope of FVE against log2(N): the FVE gained per doubling of N."""
    x = np.log2(np.asarray(Ns, dtype=np.float64))
    y = np.asarray(fves, dtype=np.float64)
    if x.shape != y.shape or x.size < 2 or np.ptp(x) == 0:
        raise ValueError("need at least two distinct N values with one FVE each")
    return float(np.polyfit(x, y, 1)[0])


def tag_failures(status: Sequence[str], act_ids: Optional[Sequence] = None) -> dict:
    """Count decodes whose status is not ``"ok"`` (no closing / opening tag).

    With ``act_ids`` also counts activations with at least one failed sample, since a failed
    sample is still scored and can be the one best-of-N keeps.
    """
    st = np.asarray(["" if s is None else str(s) for s in status], dtype=object)
    bad = st != "ok"
    out = {"n": int(st.size), "failures": int(bad.sum()),
           "share": float(bad.mean()) if st.size else None,
           "counts": {str(k): int((st == k).sum()) for k in sorted(set(st.tolist()))}}
    if act_ids is not None:
        a = np.asarray(act_ids)
        if a.shape != st.shape:
            raise ValueError(f"act_ids: expected {st.shape[0]} entries, got {a.shape}")
        out["activations_with_failure"] = int(len(np.unique(a[bad])))
    return out


def sweep_metrics(act_ids: Sequence, sample_idx: Sequence[int], nmse: Sequence[float], status: Sequence[str],
                  var: float, Ns: Sequence[int] = (1, 2, 3, 5, 10), *, doc_of: Optional[dict] = None,
                  n_boot: int = 1000, seed: int = 0) -> dict:
    """What one best-of-N trial reports: ``fve_N<n>`` / ``nmse_N<n>`` for every N the samples allow
    (with ``doc_of``, activation id -> document, also ``fve_N<n>_ci95``: a document-clustered CI),
    the slope per doubling of N, and tag failures over all samples. k = 1 (greedy) reports N = 1."""
    m, ids = to_matrix(act_ids, sample_idx, nmse)
    docs = None if doc_of is None else [doc_of[a] for a in ids]
    rows = curve(m, [n for n in Ns if n <= m.shape[1]] or [1], var, doc_ids=docs, n_boot=n_boot, seed=seed)
    out: dict = {"k": int(m.shape[1]), "n_activations": int(m.shape[0])}
    for r in rows:
        out[f"fve_N{r['N']}"], out[f"nmse_N{r['N']}"] = r["fve"], r["nmse"]
        if "fve_ci95" in r:
            out[f"fve_N{r['N']}_ci95"] = r["fve_ci95"]
    if len(rows) > 1:
        out["slope_per_doubling"] = slope_per_doubling([r["N"] for r in rows], [r["fve"] for r in rows])
    fails = tag_failures(status)
    out["tag_failures"], out["tag_failure_share"] = fails["failures"], fails["share"]
    return out


def score_rows(rows, var: float, Ns: Sequence[int] = (1, 2, 3, 5, 10)) -> dict:
    """:func:`sweep_metrics` of a pipeline's rows (pyarrow): one activation = (doc_id, sample_rank)."""
    pos = np.asarray(rows.column("position").to_numpy())
    keep = np.nonzero(pos >= 0)[0]
    col = lambda c: [rows.column(c)[int(i)].as_py() for i in keep]  # noqa: E731
    docs = col("doc_id")
    acts = [f"{d}#{r}" for d, r in zip(docs, col("sample_rank"))]
    return sweep_metrics(acts, col("sample_idx"), col("nmse"), col("status"), var, Ns, doc_of=dict(zip(acts, docs)))


def curve_figure(results: Sequence[dict], Ns: Sequence[int], path, title: str):
    """FVE against N (log2 axis), one line per temperature; greedy as a dashed level."""
    from nla_ray.report import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    for r in results:
        xs = [n for n in Ns if r.get(f"fve_N{n}") is not None]
        if r.get("k", 0) <= 1:
            ax.axhline(r["fve_N1"], ls="--", color="gray", label=f"greedy ({r['fve_N1']:.3f})")
            continue
        ax.plot(xs, [r[f"fve_N{n}"] for n in xs], marker="o",
                label=f"T={r['temperature']} (slope {r.get('slope_per_doubling', float('nan')):+.3f}/doubling)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(Ns), [str(n) for n in Ns])
    ax.set_xlabel("N (samples, best under the AR)")
    ax.set_ylabel("FVE (own-set Var)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)
