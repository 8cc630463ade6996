"""Token-position arithmetic: where does the early-position noise end?

Positions (token indices, the release's convention: Gemma's `<bos>` is index 0) are grouped into
bins that double in width: 0, 1, 2, 3-4, 5-8, 9-16, 17-32, 33-64, 65-128, ... Each bin's FVE uses
one fixed denominator for the whole curve (so bins are comparable), with a CI that resamples
documents. The plateau is the FVE of every position at or past the release's stage-0 minimum
(`MIN_POSITION`, the population the released numbers describe); noise ends at the first bin from
which every later bin stays within `PLATEAU_TOLERANCE` below the plateau.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from nla_ray.core import metrics
from nla_ray.nla.extract import MIN_POSITION

__all__ = ["PLATEAU_TOLERANCE", "MIN_POSITION", "bin_index", "bin_bounds", "bin_label", "fve_curve", "plateau",
           "noise_ends", "figure"]

# How far (in FVE) below the plateau a bin may sit and still count as "on the plateau".
PLATEAU_TOLERANCE = 0.05


def bin_index(position: int) -> int:
    """0, 1, 2 alone; then (2^(k-2), 2^(k-1)] is bin k: 3-4 -> 3, 5-8 -> 4, 9-16 -> 5, ..."""
    p = int(position)
    if p < 0:
        raise ValueError(f"position {p} is negative")
    return p if p <= 2 else (p - 1).bit_length() + 1


def bin_bounds(k: int) -> tuple[int, int]:
    """First and last position of bin k (inclusive)."""
    if k <= 2:
        return k, k
    return 2 ** (k - 2) + 1, 2 ** (k - 1)


def bin_label(k: int) -> str:
    lo, hi = bin_bounds(k)
    return str(lo) if lo == hi else f"{lo}-{hi}"


def _fve_with_ci(nm: np.ndarray, docs: np.ndarray, var: float, n_boot: int, seed: int) -> tuple[float, list]:
    point = metrics.fve(nm, var)
    if len(set(docs.tolist())) < 2:  # one document: nothing to resample
        return point, [float("nan"), float("nan")]
    lo, hi, _ = metrics.fve_ci(nm, docs, var, n_boot=n_boot, seed=seed)
    return point, [float(lo), float(hi)]


def fve_curve(positions: Sequence[int], nmse: Sequence[float], docs: Sequence, var: float, *,
              cos: Sequence[float] | None = None, ok: Sequence[bool] | None = None, n_boot: int = 1000,
              seed: int = 0) -> list[dict]:
    """One dict per non-empty bin, in position order: its bounds, rows, documents, mean position,
    NMSE, cos, FVE = 1 - mean NMSE / `var` with a document-clustered 95% CI, and tag failures
    (rows whose `ok` is False) when `ok` is given."""
    pos = np.asarray(positions, dtype=np.int64)
    nm = np.asarray(nmse, dtype=np.float64)
    dd = np.asarray(docs, dtype=object)
    if not (len(pos) == len(nm) == len(dd)):
        raise ValueError(f"positions, nmse and docs disagree in length ({len(pos)}, {len(nm)}, {len(dd)})")
    bins = np.array([bin_index(p) for p in pos], dtype=np.int64)
    out = []
    for k in sorted(set(bins.tolist())):
        m = bins == k
        lo, hi = bin_bounds(k)
        fve, ci = _fve_with_ci(nm[m], dd[m], var, n_boot, seed)
        row = {"bin": bin_label(k), "first_position": lo, "last_position": hi, "n": int(m.sum()),
               "n_docs": len(set(dd[m].tolist())), "mean_position": float(pos[m].mean()),
               "nmse": float(nm[m].mean()), "fve": float(fve), "fve_ci95": ci}
        if cos is not None:
            row["cos"] = float(np.asarray(cos, dtype=np.float64)[m].mean())
        if ok is not None:
            row["tag_failures"] = int((~np.asarray(ok, dtype=bool)[m]).sum())
        out.append(row)
    return out


def plateau(positions: Sequence[int], nmse: Sequence[float], docs: Sequence, var: float, *,
            from_position: int = MIN_POSITION, n_boot: int = 1000, seed: int = 0) -> dict:
    """FVE (doc-clustered CI) of every position >= `from_position`: the level the curve settles to."""
    pos = np.asarray(positions, dtype=np.int64)
    m = pos >= from_position
    if not m.any():
        raise ValueError(f"no position >= {from_position}: the plateau needs longer documents or a higher "
                         "--max-position")
    nm = np.asarray(nmse, dtype=np.float64)[m]
    dd = np.asarray(docs, dtype=object)[m]
    fve, ci = _fve_with_ci(nm, dd, var, n_boot, seed)
    return {"fve": float(fve), "fve_ci95": ci, "from_position": int(from_position), "n": int(m.sum()),
            "n_docs": len(set(dd.tolist()))}


def noise_ends(curve: Sequence[dict], plateau_fve: float, tolerance: float = PLATEAU_TOLERANCE) -> dict | None:
    """The first bin from which every later bin's FVE is >= plateau - tolerance (point estimates);
    None when even the last bin is below that."""
    first = None
    for i in range(len(curve) - 1, -1, -1):
        if curve[i]["fve"] >= plateau_fve - tolerance:
            first = i
        else:
            break
    if first is None:
        return None
    b = curve[first]
    return {"bin": b["bin"], "first_position": b["first_position"], "fve": b["fve"],
            "threshold": float(plateau_fve - tolerance), "tolerance": float(tolerance)}


def figure(curve: Sequence[dict], plat: dict, ends: dict | None, path, title: str, *,
           min_position: int = MIN_POSITION, tolerance: float = PLATEAU_TOLERANCE):
    """FVE per position bin (CI band) against tokens seen (position + 1, log axis), the plateau with
    its tolerance band, and the stage-0 rule's minimum position."""
    from nla_ray.report import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    x = np.array([c["mean_position"] + 1 for c in curve])
    y = np.array([c["fve"] for c in curve])
    lo = np.array([c["fve_ci95"][0] for c in curve], dtype=float)
    hi = np.array([c["fve_ci95"][1] for c in curve], dtype=float)
    ax.fill_between(x, lo, hi, color="#3b6ea5", alpha=0.25, lw=0, label="95% CI (documents resampled)")
    ax.plot(x, y, "o-", color="#3b6ea5", label="FVE per position bin")
    p = plat["fve"]
    ax.axhline(p, color="k", ls="--", lw=1, label=f"plateau (positions ≥ {plat['from_position']}) {p:.3f}")
    ax.axhspan(p - tolerance, p, color="gray", alpha=0.12, lw=0, label=f"within {tolerance} below the plateau")
    ax.axvline(min_position + 1, color="#aa3333", lw=1, ls=":", label=f"stage-0 minimum position {min_position}")
    if ends is not None:
        i = [c["bin"] for c in curve].index(ends["bin"])
        ax.plot([x[i]], [y[i]], "s", ms=10, mfc="none", mec="#aa3333",
                label=f"noise ends: bin {ends['bin']}")
    ax.set_xscale("log")
    ax.set_xticks(x)
    ax.set_xticklabels([c["bin"] for c in curve], rotation=45, fontsize=8)
    ax.minorticks_off()
    ax.set_xlabel("token position bin (log scale)")
    ax.set_ylabel("FVE (one denominator for all bins)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return save_figure(fig, path)
