"""§7 arithmetic: reading two model families at the same place, and the AV-family x AR-family matrix.

Positions are sampled on family A's tokenizer; family B reads the token whose span ends at or nearest
A's token end (character offsets). Cells are named by (AV family, AR family) and each is scored
against the AR side's own gold vector with the AR side's Var: FVE normalises per column, so cells are
comparable where raw cos is not (the two layers' variances differ).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def anchors_from(rows: pa.Table, layer: int) -> dict:
    """{doc_id: [[position, char_end], ...] in sampled-rank order} from family A's stored rows; a short
    document maps to [] (nothing to align)."""
    out: dict[str, list] = {}
    cols = [rows.column(k).to_pylist() for k in ("doc_id", "position", "char_end", "sample_rank", "layer")]
    for d, p, e, r, L in sorted(zip(*cols), key=lambda x: (x[0], x[3])):
        out.setdefault(d, [])
        if p >= 0 and L == layer:
            out[d].append([int(p), int(e)])
    return out


def alignment_stats(align_err: np.ndarray, aligned: np.ndarray, tolerance: int) -> dict:
    """Character error of the aligned positions (mean |err|, p90, share exact) and what was dropped."""
    err = np.abs(np.asarray(align_err, dtype=float)[np.asarray(aligned, dtype=bool)])
    n_all = int(len(aligned))
    return {"positions": n_all, "aligned": int(len(err)), "dropped_beyond_tolerance": n_all - int(len(err)),
            "tolerance_chars": tolerance,
            "mean_abs_err_chars": float(err.mean()) if len(err) else float("nan"),
            "p90_abs_err_chars": float(np.percentile(err, 90)) if len(err) else float("nan"),
            "share_exact": float((err == 0).mean()) if len(err) else float("nan")}


def join_families(a: pa.Table, b: pa.Table, tolerance: int, prefix: str = "b_") -> tuple[pa.Table, dict]:
    """A's rows (real positions only) beside B's aligned rows, B's columns prefixed. Rows whose B
    position could not be aligned are dropped here, and `positions_in_doc` is recounted so resume
    knows when a document is finished."""
    a = a.filter(pa.array(np.asarray(a.column("position").to_numpy()) >= 0))
    bmap = {(d, r): i for i, (d, r) in enumerate(zip(b.column("doc_id").to_pylist(), b.column("sample_rank").to_pylist()))}
    ia, ib = [], []
    for i, (d, r) in enumerate(zip(a.column("doc_id").to_pylist(), a.column("sample_rank").to_pylist())):
        j = bmap.get((d, r))
        if j is not None:
            ia.append(i)
            ib.append(j)
    a, b = a.take(pa.array(ia, pa.int64())), b.take(pa.array(ib, pa.int64()))
    b_pos = np.asarray(b.column("position").to_numpy())
    stats = alignment_stats(np.asarray(b.column("align_err").to_numpy()), b_pos >= 0, tolerance)
    keep = pa.array(b_pos >= 0)
    a, b = a.filter(keep), b.filter(keep)
    drop = {"doc_id", "sample_idx"}
    joined = a
    for name in b.column_names:
        if name not in drop:
            joined = joined.append_column(f"{prefix}{name}", b.column(name))
    docs = joined.column("doc_id").to_pylist()
    counts = {d: docs.count(d) for d in set(docs)}
    joined = joined.set_column(joined.column_names.index("positions_in_doc"), "positions_in_doc",
                               pa.array([counts[d] for d in docs], pa.int64()))
    return joined, stats


def cell_name(av: str, ar: str) -> str:
    return f"{av}{ar}"


def transfer_ratios(fve: dict) -> dict:
    """cross / within per direction: cell (a->b) over B's within-family cell (b->b), and reverse —
    how much of the AR side's own ceiling a foreign AV's explanations reach."""
    out = {}
    for av, ar in (("a", "b"), ("b", "a")):
        within = fve[cell_name(ar, ar)]
        out[f"{av}_to_{ar}"] = float(fve[cell_name(av, ar)] / within) if within else float("nan")
    return out


def heatmap(cells: dict, names: dict, var_own: dict, path, title: str):
    """Fig. 3 analogue: FVE per (AV family, AR family), shuffled-pair null in each cell."""
    from nla_ray.report import pyplot, save_figure

    plt = pyplot()
    fams = ["a", "b"]
    M = np.array([[cells[cell_name(av, ar)]["fve_own"]["value"] for ar in fams] for av in fams])
    fig, ax = plt.subplots(figsize=(5.6, 4.4))
    im = ax.imshow(M, cmap="viridis", vmin=min(0.0, float(M.min())), vmax=max(1e-6, float(M.max())))
    for i, av in enumerate(fams):
        for j, ar in enumerate(fams):
            c = cells[cell_name(av, ar)]
            kind = "within" if av == ar else "cross"
            ax.text(j, i, f"{c['fve_own']['value']:.3f}\n{kind} · null {c['shuffled_null_fve_own']:.2f}",
                    ha="center", va="center", color="w" if M[i, j] < M.max() * 0.6 else "k", fontsize=9)
    ax.set_xticks([0, 1], [f"→ AR {names['a']}", f"→ AR {names['b']}"])
    ax.set_yticks([0, 1], [f"AV {names['a']}", f"AV {names['b']}"])
    ratio = var_own["b"] / var_own["a"] if var_own["a"] else float("nan")
    ax.set_title(f"{title}\nFVE (own-set Var of the AR side); Var {names['a']} {var_own['a']:.3f}, "
                 f"{names['b']} {var_own['b']:.3f} (×{ratio:.2f})", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return save_figure(fig, path)
