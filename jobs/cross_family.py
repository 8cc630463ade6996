"""§7: does the text bottleneck transfer across model families?

Both families' base models read the same documents: positions are sampled on family A's tokenizer and
family B reads the token ending at (or nearest) the same character. Every AV explanation is read by
both families' ARs; each cell of the 2x2 matrix is scored against the AR side's own gold vector with
the AR side's Var (own-set and training-set), a document-clustered 95% CI and a shuffled-pair null.

Six model pools: extraction A, extraction B (aligned to A), then AV A, AV B, AR A, AR B side by side.
The extractions land in the activation store and are reused by later runs and other jobs.

  python jobs/cross_family.py --preset mini                  # SmolLM2 L20 x Gemma-3-270M L12, CPU
  ray job submit --working-dir . -- python jobs/cross_family.py --preset paper-gemma27b-L41
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `ray job submit` working dirs

from nla_ray import report  # noqa: E402
from nla_ray.analysis import cross_family as X  # noqa: E402
from nla_ray.analysis.fve import fve_block  # noqa: E402
from nla_ray.jobkit import FVE_LEGEND, Context, Job, Result, Table, ci_str  # noqa: E402
from nla_ray.runtime.pipeline import stage_timeline  # noqa: E402
from nla_ray.runtime.stages import ar_spec, av_spec  # noqa: E402

JOB = Job("cross_family", __doc__, add_args=lambda p: p.add_argument(
    "--align-tolerance", type=int, default=2, help="drop positions whose aligned token ends more than this many "
    "characters from A's (default 2)"))
FAMS = ("a", "b")
# column prefix and gold/position columns of each family in the joined rows
COLS = {"a": ("", "vector", "position"), "b": ("b_", "b_vector", "b_position")}


@JOB.main
def run(ctx: Context) -> Result:
    cfg = {"a": ctx.cfg, "b": ctx.partner()}
    tol = ctx.args.align_tolerance
    joined, align = ctx.paired(cfg["a"], cfg["b"], tol)
    dirs = {f: ctx.pair(cfg[f]) for f in FAMS}
    stages = [av_spec(cfg[f], dirs[f].av, name=f"av_{f}", src=COLS[f][0], out=COLS[f][0],
                      pool=cfg[f].cross_pools.get("av") or cfg[f].pools["av"]) for f in FAMS]
    for ar in FAMS:  # each AR reads both families' explanations against its own gold
        reads = [(f"{COLS[av][0]}explanation", COLS[ar][1], COLS[ar][2], f"_{av}{ar}") for av in FAMS]
        stages.append(ar_spec(cfg[ar], dirs[ar].ar, name=f"ar_{ar}", reads=reads,
                              pool=cfg[ar].cross_pools.get("ar") or cfg[ar].pools["ar"]))
    rows = ctx.limit(ctx.run("", stages, joined, extra_fp={"align_tolerance": tol}))
    cells, fve = {}, {}
    for av in FAMS:
        for ar in FAMS:
            c = X.cell_name(av, ar)
            cells[c] = fve_block(rows, ctx.meta(cfg[ar]).mse_scale, ctx.var_train(cfg[ar]), n_boot=cfg["a"].bootstrap,
                                 seed=cfg["a"].seed, recon_col=f"recon_{c}", gold_col=COLS[ar][1],
                                 status_col=f"{COLS[av][0]}status")
            fve[c] = cells[c]["fve_own"]["value"]
    names = {f: cfg[f].name for f in FAMS}
    var_own = {f: cells[X.cell_name(f, f)]["var_own"] for f in FAMS}
    fig = X.heatmap(cells, names, var_own, ctx.figure("transfer_matrix.png"), "Cross-family transfer")
    table = [{"AV \\ AR": f"AV {names[av]}", **{f"→ AR {names[ar]}": (
        f"{cells[X.cell_name(av, ar)]['fve_own']['value']:.3f} {ci_str(cells[X.cell_name(av, ar)]['fve_own']['ci95_doc_clustered'])}"
        f" · null {cells[X.cell_name(av, ar)]['shuffled_null_fve_own']:.2f}") for ar in FAMS}} for av in FAMS]
    train_rows = [{"cell": f"AV {names[av]} → AR {names[ar]}", "FVE (train-set Var)":
                   cells[X.cell_name(av, ar)].get("fve_train", {}).get("value", "n/a"),
                   "NMSE": cells[X.cell_name(av, ar)]["nmse"], "cos": cells[X.cell_name(av, ar)]["cos"],
                   "tag failures": cells[X.cell_name(av, ar)]["tag_failures"]} for av in FAMS for ar in FAMS]
    ratios = X.transfer_ratios(fve)
    ratio_rows = [{"direction": f"AV {names[av]} → AR {names[ar]}", "cross / within (AR side)": r}
                  for (av, ar), r in zip((("a", "b"), ("b", "a")), ratios.values())]
    align_rows = [{"metric": k, "value": v} for k, v in align.items()]
    return Result(
        headline={"fve": fve, "ratios": ratios, "alignment": align, "var_own": var_own,
                  "families": {f: {"preset": cfg[f].name, "pair": cfg[f].pair, "base": cfg[f].base,
                                   "layer": cfg[f].layer} for f in FAMS}},
        extra={"cells": cells, "timeline": stage_timeline(rows)}, rows=rows, figures=[fig],
        tables=[Table("Transfer matrix: FVE (own-set Var of the AR side) [95% CI] · shuffled-pair null", table,
                      ["AV \\ AR"] + [f"→ AR {names[ar]}" for ar in FAMS]),
                Table("Per cell", train_rows, ["cell", "FVE (train-set Var)", "NMSE", "cos", "tag failures"]),
                Table("Transfer ratios (seed: 0.79 Gemma→Qwen, 0.68 Qwen→Gemma)", ratio_rows,
                      ["direction", "cross / within (AR side)"]),
                Table("Tokenizer alignment (characters)", align_rows, ["metric", "value"])],
        legend=FVE_LEGEND + " A cell (AV X → AR Y) scores X's explanation of X's activation against Y's activation "
        "at the same character position, with Y's Var.",
        examples=report.pick_examples(rows, nmse="nmse_ab"))


if __name__ == "__main__":
    JOB.run_cli()
