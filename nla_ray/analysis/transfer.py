"""Checkpoint transfer: residual drift of a variant from its base, and transfer of the pair against it.

Pure arithmetic and the figure; the job (jobs/checkpoint_transfer.py) extracts and round-trips.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from nla_ray.core import metrics


def drift(base: np.ndarray, variant: np.ndarray, docs: Sequence, scale: float, *, n_boot: int = 1000,
          seed: int = 0) -> dict:
    """NMSE and cos between the base's and the variant's vectors at the same positions (rows aligned),
    with a document-clustered 95% CI on the NMSE. A model against itself is exactly 0 / 1."""
    nm = metrics.nmse(variant, base, scale)
    lo, hi, _ = metrics.clustered_bootstrap_ci(nm, np.asarray(docs), np.mean, n_boot=n_boot, seed=seed)
    return {"nmse": float(nm.mean()), "nmse_ci95": [float(lo), float(hi)],
            "cos": float(metrics.cosine(variant, base).mean())}


def degradation(fve_variant: float, fve_base: float) -> dict:
    """How much of the base's FVE survives on the variant (ratio) and how much is lost (difference)."""
    return {"fve_lost": fve_base - fve_variant, "fve_retained": fve_variant / fve_base if fve_base else float("nan")}


def figure(rows: Sequence[dict], path, title: str):
    """Drift to the base (x) against the pair's FVE on the variant's activations (y), CI bars."""
    from nla_ray.report import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for r in rows:
        lo, hi = r["fve_ci95"]
        ax.errorbar(r["drift_nmse"], r["fve"], yerr=[[r["fve"] - lo], [hi - r["fve"]]], fmt="o", capsize=3,
                    color="#3b6ea5" if r["variant"] != "base" else "k")
        ax.annotate(r["variant"], (r["drift_nmse"], r["fve"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.axhline(0, color="#aa3333", lw=1)
    ax.set_xlabel("drift: NMSE(variant, base) at the same positions")
    ax.set_ylabel("pair's FVE on the variant (own Var)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)
