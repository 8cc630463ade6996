"""§4: where in an explanation does the signal live? Post-hoc surgery before the AR reads it.

The same unconstrained decodes (§2's free arm: reused from quote_ablation's output when it has them,
else decoded here) are edited and read again by the AR only: spans only, spans without their marks,
prose only, quote marks stripped with the text kept, and each span's content replaced by fillers in
increasing junkiness (placeholder, redacted, common words, random tokens, random characters). FVE per
edit on one denominator (the activations' own-set Var), document-clustered CI; redaction statistics
(spans per decode, share of characters); Fig. 2. Edited rows are out of the AR's training
distribution: read them as lower bounds.

  python jobs/redaction.py --preset mini
"""

from __future__ import annotations

import sys
from pathlib import Path

import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `ray job submit` working dirs

from nla_ray.analysis import redaction as R  # noqa: E402
from nla_ray.analysis.fve import fve_block  # noqa: E402
from nla_ray.core.table import scored  # noqa: E402
from nla_ray.jobkit import FVE_LEGEND, Context, Job, Result, Table, ci_str  # noqa: E402
from nla_ray.runtime.stages import apply_spec, ar_input_texts, ar_spec  # noqa: E402

JOB = Job("redaction", __doc__, add_args=lambda p: p.add_argument(
    "--decodes", help="quote_ablation output dir to reuse (default runs/quote_ablation/<preset> when it exists)"))
# edit name -> (label, edit, edit kwargs), in the order Fig. 2 draws them
EDITS = {"identity": ("unedited", "identity", {}), "spans_only": ("spans only", "spans_only", {}),
         "spans_unmarked": ("spans, no marks", "spans_only_unmarked", {}), "prose_only": ("prose only", "prose_only", {}),
         "no_marks": ("marks stripped", "strip_quote_marks", {}),
         **{f"fill_{f}": (f"spans → {f}", "replace_spans", {"filler": f}) for f in R.FILLERS}}


@JOB.main
def run(ctx: Context) -> Result:
    cfg = ctx.cfg
    free = scored(ctx.round_trip(cfg, arm="free", banned_chars=[], root=ctx.decodes_root("quote_ablation")))
    # edit what the AR read: the explanation, or a tag failure's raw text (so "unedited" = the AR's own score)
    col = lambda c: free.column(c).to_pylist()  # noqa: E731
    free = free.append_column("ar_text", pa.array(ar_input_texts(col("explanation"), col("status"), col("av_text"))))
    edits = apply_spec(R.apply_edits, name="edit", src="ar_text", edits={f"explanation_{k}": (e, dict(kw, **({"seed": cfg.seed} if
                       e == "replace_spans" else {}))) for k, (_, e, kw) in EDITS.items()})
    ar = ar_spec(cfg, ctx.pair(cfg).ar, name="ar_edited",
                 reads=[(f"explanation_{k}", "vector", "position", f"_{k}") for k in EDITS])
    rows = ctx.run("edited", [edits, ar], free, extra_fp={"source": "free decodes"})
    scale, out = ctx.meta(cfg).mse_scale, []
    for k, (label, _, _) in EDITS.items():
        b = fve_block(rows, scale, None, n_boot=cfg.bootstrap, seed=cfg.seed, recon_col=f"recon_{k}")
        out.append({"edit": k, "label": label, "fve": b["fve_own"]["value"], "ci": b["fve_own"]["ci95_doc_clustered"],
                    "nmse": b["nmse"], "cos": b["cos"]})
    var = b["var_own"]  # the gold vectors' Var: the same for every edit
    stats = R.redaction_stats(rows.column("ar_text").to_pylist())
    fig = R.fve_figure(out, ctx.figure("redaction.png"), f"{cfg.name}: FVE after post-hoc surgery "
                       f"({stats['spans_per_decode'] or 0:.1f} spans/decode, {stats['share_of_chars'] or 0:.0%} of chars)")
    shown = [{"edit": r["label"], "FVE": r["fve"], "95% CI": ci_str(r["ci"]), "NMSE": r["nmse"], "cos": r["cos"]}
             for r in out]
    return Result(
        headline={"fve": {r["edit"]: r["fve"] for r in out}, "redaction_stats": stats, "var_own": var},
        extra={"edits": out}, figures=[fig], rows=rows,
        tables=[Table("AR input surgery on the unconstrained decodes (seed: unedited 0.775, spans only 0.506, "
                      "spans without marks 0.196, prose only ≈ 0, fillers −0.09 → −0.76)", shown, list(shown[0])),
                Table("Redaction statistics (seed: 9.4 spans/decode, 23% of characters)",
                      [{"metric": k, "value": v} for k, v in stats.items()], ["metric", "value"])],
        legend=FVE_LEGEND + " Every edit is scored on the same activations and the same Var.")


if __name__ == "__main__":
    JOB.run_cli()
