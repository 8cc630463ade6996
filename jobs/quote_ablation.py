"""§2: what does banning quote characters at generation time cost, and how does the AV route around it?

Three AV conditions on the same stored activations: unconstrained; every token that could write a
double-quote-like character banned (logit -inf, including byte fragments that complete one); both the
double and the single quote families banned. Per condition: NMSE, cos, FVE (own-set Var of the
activations, document-clustered 95% CI), tag failures and banned characters that leaked; the
both-banned decodes split into hatch-free and hatch-using subsets, and the escape hatches counted
(corner brackets, *italic*, parenthesised verbatim, em-dash pairs, ...) as Fig. 1. The character
sets are spelled out in nla_ray/analysis/quotes.py; each family's size on this tokenizer is reported.

  python jobs/quote_ablation.py --preset mini
  ray job submit --working-dir . -- python jobs/quote_ablation.py --preset paper-gemma27b-L41

The arms' rows stay in <out>/rows/<arm>; verbatim_runs and redaction reuse them.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `ray job submit` working dirs

from nla_ray import report  # noqa: E402
from nla_ray.analysis import quotes as Q  # noqa: E402
from nla_ray.analysis.fve import fve_block  # noqa: E402
from nla_ray.core.table import scored  # noqa: E402
from nla_ray.jobkit import FVE_LEGEND, Context, Job, Result, Table, ci_str  # noqa: E402

JOB = Job("quote_ablation", __doc__)


@JOB.main
def run(ctx: Context) -> Result:
    cfg = ctx.cfg
    rows = {arm: scored(ctx.round_trip(cfg, arm=arm, banned_chars=list(chars))) for arm, chars in Q.CONDITIONS.items()}
    free = fve_block(rows["free"], ctx.meta(cfg).mse_scale, ctx.var_train(cfg), n_boot=cfg.bootstrap, seed=cfg.seed)
    col = lambda t, c: t.column(c).to_pylist()  # noqa: E731
    table = Q.condition_table({arm: {"nmse": col(t, "nmse"), "cos": col(t, "cos"), "texts": col(t, "explanation"),
                                     "doc_ids": col(t, "doc_id")} for arm, t in rows.items()},
                              free["var_own"], n_boot=cfg.bootstrap, seed=cfg.seed,
                              banned={a: c for a, c in Q.CONDITIONS.items() if c}, split_hatches=["no_quotes"])
    fails = {arm: sum(s != "ok" for s in col(t, "status")) for arm, t in rows.items()}
    sizes = Q.family_sizes(ctx.tokenizer(cfg))
    shown = [{"condition": r["condition"], "n": r["n"], "NMSE": r["nmse"], "cos": r["cos"], "FVE": r["fve"],
              "95% CI": ci_str(r["fve_ci95"]) if r.get("fve_ci95") else "",
              "hatch share": r.get("hatch_share", ""), "with \" / ' marks": (f"{r['decodes_with_double']} / "
                                                                      f"{r['decodes_with_single']}" if "decodes_with_single" in r else ""),
              "leaked banned chars": r.get("leaked_banned_chars", ""),
              "tag failures": fails.get(r["condition"], "")} for r in table]
    fig = Q.hatch_figure(table, ctx.figure("escape_hatches.png"),
                         f"{cfg.name}: delimiters per condition (seed, both banned: corner 77, italic 92, paren 43, em-dash 6)")
    return Result(
        headline={"conditions": {r["condition"]: {k: r.get(k) for k in ("n", "nmse", "cos", "fve", "fve_ci95",
                                                                         "hatch_share", "leaked_banned_chars",
                                                                         "decodes_with_double", "decodes_with_single",
                                                                         "hatch_counts")}
                                 for r in table},
                  "tag_failures": fails, "ban_sizes": sizes, "var_own": free["var_own"]},
        extra={"table": table}, figures=[fig],
        tables=[Table("Quote ablation at generation time (seed: 0.775 free, 0.757 no \", 0.616 no \"+'; "
                      "hatch-free 0.603, hatch-using 0.664)", shown, list(shown[0])),
                Table("Banned ids per tokenizer (mask = decoded text holds a banned char, or a byte fragment "
                      "that can complete one)", [{"family": k, "ids": v} for k, v in sizes.items()], ["family", "ids"])],
        legend=FVE_LEGEND + " All conditions share one denominator: the own-set Var of these activations.",
        examples=report.pick_examples(rows["no_quotes"]))


if __name__ == "__main__":
    JOB.run_cli()
