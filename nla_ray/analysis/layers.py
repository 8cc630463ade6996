"""§6 arithmetic: a layer-L pair fed its neighbours' activations.

For each layer l near L: the geometry between l and L at the same positions (cos, and the mutual
NMSE of the two direction-normalised vectors), the round trip's observed NMSE against layer l's own
gold, and the additive bound — L's own reconstruction NMSE plus the l-to-L offset. Observed at or
below the bound means the whole FVE drop is explained by where layer l sits, not by the AV misreading
a foreign input.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from nla_ray.core import metrics

__all__ = ["align_rows", "layer_row", "figure"]


def align_rows(keys: Sequence, keys_ref: Sequence) -> np.ndarray:
    """Index into ``keys_ref`` for each of ``keys`` (e.g. (doc_id, position) pairs); every key must
    be present: a layer whose positions differ from the reference cannot be compared."""
    where = {k: i for i, k in enumerate(keys_ref)}
    missing = [k for k in keys if k not in where]
    if missing:
        raise ValueError(f"{len(missing)} positions have no reference-layer row, e.g. {missing[:3]}")
    return np.array([where[k] for k in keys], dtype=np.int64)


def layer_row(layer: int, ref_layer: int, gold: np.ndarray, gold_ref: np.ndarray, recon: np.ndarray,
              intrinsic_nmse: float, scale) -> dict:
    """One layer's line of the §6 table; ``gold_ref`` is layer L's gold at the same positions."""
    observed = metrics.nmse(recon, gold, scale)
    mutual = metrics.nmse(gold, gold_ref, scale)
    var = metrics.variance_baseline(gold, scale)
    return {"layer": int(layer), "offset": int(layer - ref_layer),
            "cos_to_ref": float(metrics.cosine(gold, gold_ref).mean()),
            "mutual_nmse": float(mutual.mean()), "nmse": float(observed.mean()),
            "fve": metrics.fve(observed, var), "var": float(var),
            "additive_bound": float(intrinsic_nmse + mutual.mean()),
            "within_bound": bool(observed.mean() <= intrinsic_nmse + mutual.mean())}


def figure(rows: Sequence[dict], path, title: str):
    """FVE (each layer's own Var) against cos to layer L, one point per layer."""
    from nla_ray.report import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    xs, ys = [r["cos_to_ref"] for r in rows], [r["fve"] for r in rows]
    ax.plot(xs, ys, "o-")
    for r in rows:
        ax.annotate(f"L{r['layer']}", (r["cos_to_ref"], r["fve"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("cos to the pair's layer (same positions)")
    ax.set_ylabel("FVE (that layer's own Var)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)
