"""Where does the early-position noise end? FVE against token position, every position of held-out documents.

The release samples positions >= 50 only and warns that explanations of early tokens are noisy. This
job runs the pair on every position of `--n-docs` held-out documents (all of the first 16, then every
`--stride`-th up to `--max-position`), groups positions into doubling bins (0, 1, 2, 3-4, 5-8, ...,
65-128, ...) and reports FVE per bin against one denominator (the training-set Var when known) with a
document-clustered 95% CI, the plateau (every position >= 50, the stage-0 population), and the first
bin from which FVE stays within PLATEAU_TOLERANCE below the plateau. With `--text`/`--text-file` it
also writes every token's explanation and NMSE / cos / FVE of those texts in the `python -m nla_ray
trace` format (full explanations) to traces.txt.

  python jobs/position_trace.py --preset mini --n-docs 8 --max-position 128 --stride 8
  python jobs/position_trace.py --preset mini --text "The central bank raised rates on Thursday."
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `ray job submit` working dirs

import numpy as np  # noqa: E402

from nla_ray.analysis import positions as P  # noqa: E402
from nla_ray.core import metrics  # noqa: E402
from nla_ray.core.table import column, filter_rows, scored, vectors, write_text  # noqa: E402
from nla_ray.jobkit import FVE_LEGEND, Context, Job, Result, Table, UserError, ci_str  # noqa: E402
from nla_ray.nla.extract import DENSE_POSITIONS  # noqa: E402

DEFAULT_N_DOCS = 8
DEFAULT_MAX_POSITION = 128
DEFAULT_STRIDE = 8
EXAMPLE_POSITIONS = (0, 1, 2, 4, 8, 16, 64)


def add_args(p) -> None:
    p.add_argument("--text", action="append", default=[], help="a text to trace token by token (repeatable)")
    p.add_argument("--text-file", action="append", default=[], help="read a text to trace from this file (repeatable)")
    p.add_argument("--n-docs", type=int, default=None,
                   help=f"held-out documents for the position curve (default {DEFAULT_N_DOCS}; with --n, as many "
                        "as --n asks for); 0 = the texts only")
    p.add_argument("--max-position", type=int, default=DEFAULT_MAX_POSITION,
                   help=f"last token index traced in the documents (default {DEFAULT_MAX_POSITION}); -1 = all")
    p.add_argument("--stride", type=int, default=DEFAULT_STRIDE,
                   help=f"from position {DENSE_POSITIONS} on, every stride-th position (default {DEFAULT_STRIDE}; "
                        "1 = all)")
    p.add_argument("--tolerance", type=float, default=P.PLATEAU_TOLERANCE,
                   help=f"FVE below the plateau a bin may sit and count as on it (default {P.PLATEAU_TOLERANCE})")


JOB = Job("position_trace", __doc__, add_args=add_args)


def _texts(args) -> list[tuple[str, str]]:
    out = [(f"text-{i}", t) for i, t in enumerate(args.text)]
    for i, f in enumerate(args.text_file):
        path = Path(f)
        if not path.is_file():
            raise FileNotFoundError(f"--text-file {f}: no such file")
        out.append((f"file-{i}-{path.name}", path.read_text(encoding="utf-8")))
    for doc_id, t in out:
        if not t.strip():
            raise UserError(f"{doc_id}: the text is empty")
    return out


def _pipeline(ctx: Context, cfg, *, max_position, stride):
    from nla_ray.runtime.stages import ar_spec, av_spec, extract_spec

    dirs = ctx.pair(cfg)
    ext = extract_spec(cfg, layers=[cfg.layer], positions="every", max_position=max_position, stride=stride)
    return [ext, av_spec(cfg, dirs.av), ar_spec(cfg, dirs.ar)]


def _denominator(ctx: Context, cfg, rows, scale) -> tuple[float, str]:
    v = ctx.var_train(cfg)
    if v is not None:
        return float(v), "train_set (preset var_train, else the AR sidecar's eval.var_train)"
    pos = column(rows, "position")
    late = pos >= P.MIN_POSITION
    gold = vectors(rows, "vector")[late if late.sum() >= 2 else slice(None)]
    return metrics.variance_baseline(gold, scale), (f"own_set (positions >= {P.MIN_POSITION} of this run)"
                                                    if late.sum() >= 2 else "own_set (every position of this run)")


def _trace_file(rows, var: float, var_name: str, layer: int) -> str:
    """The `nla_ray trace` format, one block per text, explanations not cut."""
    from nla_ray.nla.trace import TraceRow, format_trace

    blocks = []
    for doc_id in dict.fromkeys(rows.column("doc_id").to_pylist()):
        t = filter_rows(rows, column(rows, "doc_id") == doc_id)
        nm, cs = column(t, "nmse").astype(float), column(t, "cos").astype(float)
        status = t.column("status").to_pylist()
        trs = [TraceRow(int(p), tok, None if s == "no_open_tag" else e, s, float(n), float(c), float(1 - n / var))
               for p, tok, e, s, n, c in zip(t.column("position").to_pylist(), t.column("token").to_pylist(),
                                             t.column("explanation").to_pylist(), status, nm, cs)]
        summary = {"n_tokens": len(trs), "nmse_mean": float(nm.mean()), "cos_mean": float(cs.mean()),
                   "fve": float(1 - nm.mean() / var), "fve_denominator": var_name, "var": var, "layer": layer,
                   "tag_failures": sum(s != "ok" for s in status)}
        blocks.append(f"== {doc_id}\n" + format_trace(trs, summary, width=10 ** 9))
    return "\n\n".join(blocks) + "\n"


@JOB.main
def run(ctx: Context) -> Result:
    from nla_ray.nla.corpora import Document

    a, cfg = ctx.args, copy.deepcopy(ctx.cfg)
    if a.stride < 1:
        raise UserError(f"--stride must be >= 1 (got {a.stride})")
    max_position = None if a.max_position is not None and a.max_position < 0 else a.max_position
    if max_position is not None and max_position < P.MIN_POSITION:
        raise UserError(f"--max-position {max_position} stops before the plateau (positions >= {P.MIN_POSITION})")
    n_docs = a.n_docs if a.n_docs is not None else (cfg.n_docs if a.n is not None else DEFAULT_N_DOCS)
    texts = _texts(a)
    if n_docs < 0 or (n_docs == 0 and not texts):
        raise UserError(f"--n-docs must be >= 1, or 0 with --text/--text-file (got {n_docs})")
    cfg.n_docs = max(n_docs, 1)
    scale, layer = ctx.meta(cfg).mse_scale, cfg.layer
    headline: dict = {"layer": layer, "max_position": max_position, "stride": a.stride,
                      "dense_below": DENSE_POSITIONS, "tolerance": a.tolerance}
    tables, figures, examples, rows = [], [], [], None
    var = var_name = None
    if n_docs > 0:
        docs = ctx.documents(cfg)
        rows = scored(ctx.limit(ctx.run("corpus", _pipeline(ctx, cfg, max_position=max_position, stride=a.stride),
                                        docs)))
        if rows.num_rows == 0:
            raise UserError("no positions were traced (documents empty?)")
        var, var_name = _denominator(ctx, cfg, rows, scale)
        pos, nm = column(rows, "position"), column(rows, "nmse").astype(float)
        dd = column(rows, "doc_id")
        ok = np.asarray([s == "ok" for s in rows.column("status").to_pylist()])
        curve = P.fve_curve(pos, nm, dd, var, cos=column(rows, "cos"), ok=ok, n_boot=cfg.bootstrap, seed=cfg.seed)
        plat = P.plateau(pos, nm, dd, var, n_boot=cfg.bootstrap, seed=cfg.seed)
        ends = P.noise_ends(curve, plat["fve"], a.tolerance)
        fig = P.figure(curve, plat, ends, ctx.figure("position_trace.png"),
                       f"{cfg.name}: layer-{layer} pair, FVE by token position ({len(set(dd.tolist()))} documents)",
                       tolerance=a.tolerance)
        figures.append(fig)
        headline.update({"n_docs": len(set(dd.tolist())), "n_positions": int(rows.num_rows),
                         "fve_denominator": {"name": var_name, "var": var}, "bins": curve, "plateau": plat,
                         "noise_ends": ends,
                         "noise_ends_at_position": ends["first_position"] if ends else None,
                         "stage0_min_position": P.MIN_POSITION})
        shown = [{"positions": c["bin"], "n": c["n"], "docs": c["n_docs"], "NMSE": c["nmse"], "cos": c["cos"],
                  "FVE": c["fve"], "95% CI": ci_str(c["fve_ci95"]), "below plateau": plat["fve"] - c["fve"],
                  "tag failures": c["tag_failures"]} for c in curve]
        verdict = (f"noise ends at bin {ends['bin']} (position {ends['first_position']}): from there on every bin "
                   f"is within {a.tolerance} below the plateau {plat['fve']:.3f}" if ends else
                   f"no bin reaches the plateau {plat['fve']:.3f} minus {a.tolerance} and stays there")
        tables.append(Table(f"FVE by token position (denominator: {var_name}, Var {var:.4g}); {verdict}", shown,
                            list(shown[0]),
                            note=f"Plateau: positions ≥ {P.MIN_POSITION}, FVE {plat['fve']:.3f} "
                                 f"{ci_str(plat['fve_ci95'])}, {plat['n']} positions of {plat['n_docs']} documents."))
        first = filter_rows(rows, dd == dd[0])
        fpos = column(first, "position").tolist()
        for p in EXAMPLE_POSITIONS:
            if p in fpos:
                i = fpos.index(p)
                expl = first.column("explanation")[i].as_py() or f"<{first.column('status')[i].as_py()}>"
                examples.append({"context": first.column("prefix_text")[i].as_py(), "explanation": expl,
                                 "position": p, "nmse": float(column(first, "nmse")[i]),
                                 "fve": float(1 - column(first, "nmse")[i] / var)})
    if texts:
        tdocs = [Document(doc_id=d, text=t, source="--text") for d, t in texts]
        trows = scored(ctx.run("texts", _pipeline(ctx, cfg, max_position=None, stride=1), tdocs))
        if var is None:
            var, var_name = _denominator(ctx, cfg, trows, scale)
            if var_name.startswith("own_set"):
                var_name = "own_set (the traced texts' tokens)"
        path = ctx.out / "traces.txt"
        write_text(path, _trace_file(trows, var, var_name, layer))
        rows = rows if rows is not None else trows
        headline["texts"] = {"file": path.name, "n_texts": len(texts), "n_tokens": int(trows.num_rows),
                             "fve_denominator": {"name": var_name, "var": var}}
        ctx.log(f"[position_trace] wrote {path}")
    return Result(
        headline=headline, tables=tables, figures=figures, rows=rows, examples=examples,
        legend=FVE_LEGEND + f" Here every bin uses the same denominator ({var_name}), so the curve reads as the "
        "share of a typical activation's variance recovered at each depth into a document; positions are token "
        "indices (Gemma's <bos> is index 0 and special tokens are skipped). Bins double in width; from position "
        f"{DENSE_POSITIONS} on only every {a.stride}-th position is traced, and late bins hold only documents that "
        "long. The plateau is "
        f"every traced position ≥ {P.MIN_POSITION} (the release's stage-0 minimum, the population the released FVEs "
        f"describe). Noise ends at the first bin from which every later bin's FVE is ≥ plateau − {a.tolerance} "
        "(point estimates; read the CIs beside them).")


if __name__ == "__main__":
    JOB.run_cli()
