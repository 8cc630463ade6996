"""Markdown tables, provenance lines and figures a job writes (headless matplotlib)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from nla_ray.core.table import scored


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


def nmse_histogram(table: pa.Table, var: float, path: Path, title: str, null_fve: float | None = None) -> Path:
    plt = pyplot()
    t = scored(table)
    nm = np.asarray(t.column("nmse").to_numpy(), dtype=float)
    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.hist(1 - nm / var, bins=40, color="#3b6ea5")
    ax.axvline(1 - nm.mean() / var, color="k", ls="--", label=f"FVE = {1 - nm.mean() / var:.3f}")
    ax.axvline(0, color="#aa3333", lw=1, label="predict-the-mean")
    if null_fve is not None:
        ax.axvline(null_fve, color="#888888", lw=1, ls=":", label=f"shuffled-pair null = {null_fve:.2f}")
    ax.set_xlabel("per-activation FVE (1 - NMSE / Var)")
    ax.set_ylabel("activations")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def examples_md(examples: list[dict], width: int = 160) -> str:
    """A few rows a person can read: context tail -> explanation -> NMSE (and whatever else is given)."""
    lines = []
    for e in examples:
        ctx = " ".join(str(e.get("context", "")).split())[-width:]
        expl = " ".join(str(e.get("explanation", "")).split())
        extra = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in e.items()
                          if k not in ("context", "explanation"))
        lines.append(f"- …{ctx!r}\n  → {expl}\n  ({extra})")
    return "\n".join(lines) + "\n"


def pick_examples(table, n: int = 4, *, explanation: str = "explanation", nmse: str = "nmse", seed: int = 0) -> list[dict]:
    """n rows spread over the NMSE range (best, median-ish, worst), for a table's Examples section."""
    t = scored(table)
    if t.num_rows == 0:
        return []
    nm = np.asarray(t.column(nmse).to_numpy(), dtype=float)
    order = np.argsort(nm, kind="stable")
    picks = sorted(set(order[np.linspace(0, len(order) - 1, min(n, len(order))).round().astype(int)].tolist()))
    ctx, ex = t.column("prefix_text").to_pylist(), t.column(explanation).to_pylist()
    return [{"context": ctx[i], "explanation": ex[i], "nmse": float(nm[i])} for i in picks]
