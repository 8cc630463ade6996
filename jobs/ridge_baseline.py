"""§7b: does the text route beat a map fit directly on paired activations?

Paired vectors: family A and family B at the same character position (A's positions, B aligned by
character offset, as in cross_family). Maps: linear ridge and RBF kernel ridge (Nystroem) on
unit-normalised rows, both directions, for several training sizes drawn from the corpus's *train*
slice. Each (direction, map, size, setting) cell is one Ray Tune trial scoring a document-grouped
k-fold CV; all trials run in parallel over the cluster's CPUs. The best setting per (direction,
map, size) is refit and scored on cross_family's held-out positions with the AR side's Var, so the
numbers sit beside the text route's cells (seed: ridge 0.422 / 0.240 at 19,995 pairs against the
text route's 0.592 / 0.528).

  python jobs/ridge_baseline.py --preset mini
  ray job submit --working-dir . -- python jobs/ridge_baseline.py --preset paper-gemma27b-L41
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `ray job submit` working dirs

from nla_ray.analysis import ridge  # noqa: E402
from nla_ray.core.table import vectors  # noqa: E402
from nla_ray.jobkit import Context, Job, Result, Table, UserError, ci_str, default_out, repo_root  # noqa: E402
from nla_ray.nla.corpora import train_slice  # noqa: E402
from nla_ray.runtime import tune  # noqa: E402


def _args(p):
    p.add_argument("--train-docs", type=int, default=2000, help="train-slice documents to pair (default 2000)")
    p.add_argument("--train-positions", type=int, default=10, help="positions per train document (default 10)")
    p.add_argument("--n-trains", default="1000,5000,20000",
                   help="training sizes, comma-separated; a size above the pairs available uses them all")
    p.add_argument("--kinds", default="linear,rbf", help="maps to fit (linear, rbf)")
    p.add_argument("--folds", type=int, default=5, help="CV folds, grouped by document (default 5)")
    p.add_argument("--alphas", help="relative ridge penalties to sweep, comma-separated (default: a log grid per map)")
    p.add_argument("--gammas", help="RBF widths relative to the median squared distance (default 0.25,0.5,1,2)")
    p.add_argument("--landmarks", type=int, default=ridge.DEFAULT_N_COMPONENTS, help="Nystroem landmarks for rbf")
    p.add_argument("--cpus-per-trial", type=int, default=1, help="CPUs Tune reserves per trial (default 1)")
    p.add_argument("--max-concurrent", type=int, default=None, help="cap on simultaneous trials (default: CPUs)")
    p.add_argument("--text-route", help="cross_family output dir whose FVEs are drawn as levels "
                   "(default: runs/cross_family/<preset>, else results/cross_family/<preset>)")
    p.add_argument("--replot", action="store_true", help="recompute nothing: redraw the tables and figure of "
                   "the finished run in --out (e.g. against a newer --text-route); its provenance is kept as computed_by")


JOB = Job("ridge_baseline", __doc__, add_args=_args)
VEC = {"a_to_b": ("vector", "b_vector"), "b_to_a": ("b_vector", "vector")}


def text_route(ctx: Context) -> dict | None:
    """cross_family's cross cells for the same presets, when that job has run."""
    dirs = [Path(ctx.args.text_route)] if ctx.args.text_route else [
        default_out("cross_family", ctx.cfg.name), repo_root() / "results" / "cross_family" / ctx.cfg.name]
    for d in dirs:
        f = d / "summary.json"
        if f.is_file():
            fve = json.loads(f.read_text())["headline"]["fve"]
            return {"a_to_b": fve.get("ab"), "b_to_a": fve.get("ba"), "from": str(d)}
    return None


@JOB.main
def run(ctx: Context) -> Result:
    if ctx.args.replot:
        return replot(ctx)
    a = ctx.args
    cfg = {"a": ctx.cfg, "b": ctx.partner()}
    train = {}
    for f in ("a", "b"):  # same families on the corpus's training slice
        c = train[f] = copy.deepcopy(cfg[f])
        c.corpus, c.n_docs, c.positions_per_doc, c.n = train_slice(c.corpus), a.train_docs, a.train_positions, None
    tr, align_tr = ctx.paired(train["a"], train["b"])
    te, align_te = ctx.paired(cfg["a"], cfg["b"])
    te = ctx.limit(te)
    if tr.num_rows < a.folds * 2:
        raise UserError(f"only {tr.num_rows} aligned training pairs: raise --train-docs/--train-positions")
    kinds = [k.strip() for k in a.kinds.split(",") if k.strip()]
    n_trains = sorted({int(n) for n in a.n_trains.split(",")})
    floats = lambda v: [float(x) for x in v.split(",")] if v else None  # noqa: E731
    grid = {k: ridge.param_grid(k, floats(a.alphas), floats(a.gammas), a.landmarks) for k in kinds}
    groups = tr.column("doc_id").to_pylist()
    X, Y = vectors(tr, "vector"), vectors(tr, "b_vector")
    with ctx.timer("tune"):
        trials, best = tune.ridge_sweep(X, Y, groups, grid, kinds=kinds, n_trains=n_trains, directions=tune.DIRECTIONS,
                                        k=a.folds, seed=ctx.cfg.seed, cpus_per_trial=a.cpus_per_trial,
                                        max_concurrent=a.max_concurrent, storage_path=str(ctx.out / "tune"),
                                        address=a.ray_address)
    rows = []
    with ctx.timer("refit"):
        for key, (src, dst) in VEC.items():
            ar = cfg["b"] if key == "a_to_b" else cfg["a"]
            found = [(k, n) for (d, k, n) in best if d == key]
            rows += [dict(r, key=key) for r in ridge.learning_curve_rows(
                vectors(tr, src), vectors(tr, dst), vectors(te, src), vectors(te, dst),
                kinds=sorted({k for k, _ in found}), n_trains=sorted({n for _, n in found}),
                params_for=lambda kind, n, key=key: best[(key, kind, n)]["params"],
                groups_tr=groups, groups_te=te.column("doc_id").to_pylist(),
                scale=ctx.meta(ar).mse_scale, label=key, seed=ctx.cfg.seed, n_boot=ctx.cfg.bootstrap)]
    counts = {"pairs_train": tr.num_rows, "pairs_heldout": te.num_rows,
              "alignment_train": align_tr, "alignment_heldout": align_te}
    return summarize(ctx, rows, trials, counts)


def replot(ctx: Context) -> Result:
    """The finished run in --out, redrawn (tables, figure, text-route levels) without recomputing."""
    f = ctx.out / "summary.json"
    if not f.is_file():
        raise UserError(f"--replot: no finished run in {ctx.out} (summary.json not found)")
    s = json.loads(f.read_text())
    counts = {k: s["headline"][k] for k in ("pairs_train", "pairs_heldout", "alignment_train", "alignment_heldout")}
    return summarize(ctx, s["rows"], s["trials"], counts, computed_by=s.get("computed_by") or s["provenance"])


def summarize(ctx: Context, rows: list, trials: list, counts: dict, computed_by: dict | None = None) -> Result:
    a = ctx.args
    names = {"a": ctx.cfg.name, "b": ctx.cfg.partner}
    route = text_route(ctx)
    fig = ridge.curve_figure(rows, route, names, ctx.figure("ridge_curve.png"))
    table = [{"direction": f"{names[r['key'][0]]} → {names[r['key'][-1]]}", "map": r["kind"],
              "pairs": r["n_train_used"], "FVE held-out": r["fve_own"], "95% CI": ci_str(r["fve_own_ci"]) if r.get("fve_own_ci") else "",
              "null": r.get("fve_null_own"), "setting": r["params"],
              "text route": (route or {}).get(r["key"])} for r in rows]
    trial_cols = ["direction", "kind", "n_train", "params", "cv_fve", "cv_fve_std", "pid", "error"]
    return Result(
        headline={"ridge": [{k: r[k] for k in ("key", "kind", "n_train_used", "fve_own", "fve_train", "params")}
                            for r in rows],
                  "text_route": route, **counts, "trials": len(trials)},
        extra={"rows": rows, "trials": trials, **({"computed_by": computed_by} if computed_by else {})},
        figures=[fig],
        tables=[Table("Held-out FVE of the best CV setting per direction, map and size "
                      "(seed at 19,995 pairs: ridge 0.422 / 0.240, text route 0.592 / 0.528)", table, list(table[0])),
                Table(f"Ray Tune trials ({a.folds}-fold CV grouped by document)", trials, trial_cols)],
        legend="FVE on cross_family's held-out positions with the target family's own-set Var (the text route's "
               "denominator); the null scores each prediction against another document's gold.")


if __name__ == "__main__":
    JOB.run_cli()
