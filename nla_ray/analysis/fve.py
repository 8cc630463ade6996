"""§1 arithmetic: a row table's FVE block, every FVE with its denominator named."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from nla_ray.core import metrics
from nla_ray.core.table import scored, vectors


def fve_block(table: pa.Table, scale: float, var_train: float | None, *, n_boot: int = 1000,
              seed: int = 0, recon_col: str = "recon", gold_col: str = "vector",
              status_col: str = "status") -> dict:
    """FVE with both denominators named, NMSE, cos, Var, clustered CI, shuffled null, tag failures."""
    t = scored(table)
    gold, rec = vectors(t, gold_col), vectors(t, recon_col)
    docs = np.asarray(t.column("doc_id").to_pylist())
    nm = metrics.nmse(rec, gold, scale)
    summ = metrics.fve_summary(rec, gold, scale, var_train=var_train)
    lo, hi, _ = metrics.fve_ci(nm, docs, summ.var_own, n_boot=n_boot, seed=seed)
    status = t.column(status_col).to_pylist()
    out = {
        "n": int(t.num_rows), "n_docs": int(len(set(docs.tolist()))),
        "nmse": float(nm.mean()), "cos": float(metrics.cosine(rec, gold).mean()),
        "var_own": float(summ.var_own),
        "fve_own": {"value": float(summ.fve_own.value), "denominator": "own_set", "var": float(summ.var_own),
                    "ci95_doc_clustered": [float(lo), float(hi)]},
        "tag_failures": int(sum(s != "ok" for s in status)),
        "status_counts": {s: status.count(s) for s in sorted(set(status))},
        "shuffled_null_fve_own": float(metrics.shuffled_null(rec, gold, scale, summ.var_own, seed=seed,
                                                             clusters=docs)) if t.num_rows > 2 else None,
    }
    if var_train is not None:
        lo2, hi2, _ = metrics.fve_ci(nm, docs, var_train, n_boot=n_boot, seed=seed)
        out["fve_train"] = {"value": float(1 - nm.mean() / var_train), "denominator": "train_set",
                            "var": float(var_train), "ci95_doc_clustered": [float(lo2), float(hi2)]}
    ok = np.asarray([s == "ok" for s in status])
    if ok.any() and not ok.all():
        out["fve_own_ok_rows_only"] = float(1 - nm[ok].mean() / summ.var_own)
    return out
