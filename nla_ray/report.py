"""Turning a finished row table into the numbers, tables and figures a job writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from . import metrics
from .pipeline import vectors


def scored(table: pa.Table) -> pa.Table:
    """Rows with a real activation (short-document markers removed)."""
    pos = np.asarray(table.column("position").to_numpy())
    return table.filter(pa.array(pos >= 0))


def fve_block(table: pa.Table, scale: float, var_train: float | None, *, n_boot: int = 1000,
              seed: int = 0) -> dict:
    """FVE with both denominators named, NMSE, cos, Var, clustered CI, shuffled null, tag failures."""
    t = scored(table)
    gold, rec = vectors(t, "vector"), vectors(t, "recon")
    docs = np.asarray(t.column("doc_id").to_pylist())
    nm = metrics.nmse(rec, gold, scale)
    summ = metrics.fve_summary(rec, gold, scale, var_train=var_train)
    lo, hi, _ = metrics.fve_ci(nm, docs, summ.var_own, n_boot=n_boot, seed=seed)
    status = t.column("status").to_pylist()
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


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4f}"
        return str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def provenance_md(prov: dict) -> str:
    return (f"_command_: `{prov['command']}`  \n_commit_: `{prov['git_commit']}`  \n_preset_: `{prov['preset']}`  \n"
            f"_machine_: {prov['machine']}  \n_date_: {prov['date']}\n")


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (jobs run headless on cluster nodes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    return path


def nmse_histogram(table: pa.Table, var: float, path: Path, title: str) -> Path:
    plt = pyplot()
    t = scored(table)
    nm = np.asarray(t.column("nmse").to_numpy(), dtype=float)
    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.hist(1 - nm / var, bins=40, color="#3b6ea5")
    ax.axvline(1 - nm.mean() / var, color="k", ls="--", label=f"FVE = {1 - nm.mean() / var:.3f}")
    ax.axvline(0, color="#aa3333", lw=1, label="predict-the-mean")
    ax.set_xlabel("per-activation FVE (1 - NMSE / Var)")
    ax.set_ylabel("activations")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
