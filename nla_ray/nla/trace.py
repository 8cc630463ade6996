"""Per-token trace: for every token of a text, the AV's explanation and the AR's score.

Like the release's worked examples: extract the pair's layer-K residual at each token, verbalize it,
read it back, and report NMSE / cos / FVE. One text rarely has enough tokens for a stable own-set
variance, so FVE uses the pair's recorded training-set Var when the sidecar has one
(`eval.var_train`), else `--var`, else the own-set Var of the traced tokens — the summary says which.
"""

from __future__ import annotations

import shutil
import textwrap
from dataclasses import dataclass

import numpy as np

from nla_ray.core import metrics
from nla_ray.nla.extract import Extractor


@dataclass
class TraceRow:
    position: int
    token: str
    explanation: str | None
    status: str
    nmse: float
    cos: float
    fve: float


def trace_text(av, ar, text: str, *, positions: list[int] | None = None, min_position: int = 0,
               temperature: float = 0.0, seed: int = 0, var: float | None = None,
               batch_size: int = 16) -> tuple[list[TraceRow], dict]:
    layer = ar.meta.layer
    ex = Extractor(av.model, av.tok, [layer], model_id="trace", min_position=min_position,
                   positions_per_doc=10**9)
    ids, _ = ex.tokenize(text)
    special = ex.special
    wanted = positions if positions is not None else [i for i, t in enumerate(ids)
                                                      if i >= min_position and t not in special]
    bad = [p for p in wanted if not 0 <= p < len(ids)]
    if bad:
        raise ValueError(f"positions {bad} outside the text's {len(ids)} tokens")
    if not wanted:
        raise ValueError(f"no traceable tokens (text has {len(ids)} tokens, min_position={min_position})")
    hs = ex.hidden([ids])[0][layer]
    gold = hs[wanted].cpu().numpy().astype(np.float32)
    expls, stats = [], []
    from nla_ray.nla.av import sample_seed

    for i in range(0, len(wanted), batch_size):
        chunk = wanted[i:i + batch_size]
        seeds = [sample_seed(seed, "trace", p) for p in chunk] if temperature > 0 else None
        for s in av.generate(gold[i:i + len(chunk)], temperature=temperature, seeds=seeds):
            expls.append(s.explanation if s.explanation is not None else s.text)
            stats.append(s)
    rec = ar.reconstruct(expls, batch_size=batch_size)
    scale = ar.meta.mse_scale
    nm = metrics.nmse(rec, gold, scale)
    cs = metrics.cosine(rec, gold)
    var_train = (ar.meta.raw.get("eval") or {}).get("var_train")
    if var is not None:
        denom, name = float(var), "given (--var)"
    elif var_train is not None:
        denom, name = float(var_train), "train_set (sidecar eval.var_train)"
    elif len(wanted) >= 2:
        denom, name = metrics.variance_baseline(gold, scale), "own_set (traced tokens)"
    else:
        denom, name = float("nan"), "none (one token, no variance)"
    rows = [TraceRow(p, av.tok.decode([ids[p]]), s.explanation, s.status, float(n), float(c),
                     float(1 - n / denom) if np.isfinite(denom) else float("nan"))
            for p, s, n, c in zip(wanted, stats, nm, cs)]
    summary = {"n_tokens": len(rows), "nmse_mean": float(nm.mean()), "cos_mean": float(cs.mean()),
               "fve": float(1 - nm.mean() / denom) if np.isfinite(denom) else None,
               "fve_denominator": name, "var": denom, "layer": layer,
               "tag_failures": sum(s.status != "ok" for s in stats)}
    return rows, summary


def format_trace(rows: list[TraceRow], summary: dict, width: int | None = None) -> str:
    """The trace as a table, one token per row. Explanations are never cut: they wrap onto
    continuation lines under the explanation column so each line fits `width` columns (default: the
    terminal's width, else 100; 0 or anything past an explanation's length: one line per token)."""
    if width is None:
        width = shutil.get_terminal_size((100, 24)).columns
    head = f"{'pos':>4} {'token':<12} {'nmse':>7} {'cos':>7} {'fve':>7}  "
    indent = " " * len(head)
    # Never squeeze the explanation column below 24 characters, however narrow the terminal.
    room = max(24, width - len(head)) if width > 0 else 0
    lines = [head + "explanation"]
    for r in rows:
        tok = repr(r.token)[1:-1][:12]
        ex = (r.explanation or f"<{r.status}>").replace("\n", " ")
        first = f"{r.position:>4} {tok:<12} {r.nmse:7.4f} {r.cos:7.4f} {r.fve:7.3f}  "
        fits = not room or len(ex) <= room
        parts = [ex] if fits else textwrap.wrap(ex, room, break_long_words=True, break_on_hyphens=False)
        lines.append(first + (parts[0] if parts else ""))
        lines.extend(indent + p for p in parts[1:])
    s = summary
    fve = "n/a" if s["fve"] is None else f"{s['fve']:.3f}"
    lines.append(f"-- {s['n_tokens']} tokens, layer {s['layer']}: NMSE {s['nmse_mean']:.4f}, cos {s['cos_mean']:.4f}, "
                 f"FVE {fve} (denominator: {s['fve_denominator']}, Var {s['var']:.4g}), "
                 f"tag failures {s['tag_failures']}")
    return "\n".join(lines)
