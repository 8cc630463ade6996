"""§1: does an NLA pair's FVE reproduce on held-out documents?

Stored activations (extracted once per base model, layer and position rule) stream through the AV
pool and the AR pool; the job reports FVE against both denominators (own-set Var, and the training
set's Var from the preset or the pair's sidecar), NMSE, cos, a document-clustered 95% CI, a
shuffled-pair null and tag failures.

  python jobs/reproduce_fve.py --preset mini                 # embedded default, CPU
  python jobs/reproduce_fve.py --preset paper-gemma27b-L41   # released checkpoints, GPUs
  ray job submit --working-dir . -- python jobs/reproduce_fve.py --preset paper-qwen7b-L20

Rerunning the same command resumes (finished documents are skipped). `--verify-against DIR` compares
this run's rows to another run's, bit for bit (explanations and reconstructions).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `ray job submit` working dirs

from nla_ray import report  # noqa: E402
from nla_ray.analysis.fve import fve_block  # noqa: E402
from nla_ray.jobkit import FVE_LEGEND, Context, Job, Result, Table, ci_str  # noqa: E402
from nla_ray.runtime.pipeline import stage_timeline  # noqa: E402

JOB = Job("reproduce_fve", __doc__)


def fve_rows(b: dict) -> list[dict]:
    rows = [{"metric": "FVE (own-set Var)", "value": b["fve_own"]["value"]},
            {"metric": "  95% CI (doc-clustered)", "value": ci_str(b["fve_own"]["ci95_doc_clustered"])}]
    if "fve_train" in b:
        rows += [{"metric": f"FVE (train-set Var {b['fve_train']['var']:.4g})", "value": b["fve_train"]["value"]}]
    return rows + [{"metric": "NMSE", "value": b["nmse"]}, {"metric": "cos", "value": b["cos"]},
                   {"metric": "Var (own set)", "value": b["var_own"]},
                   {"metric": "shuffled-pair null FVE", "value": b["shuffled_null_fve_own"]},
                   {"metric": "tag failures", "value": f"{b['tag_failures']}/{b['n']}"},
                   {"metric": "activations / documents", "value": f"{b['n']} / {b['n_docs']}"}]


@JOB.main
def run(ctx: Context) -> Result:
    cfg = ctx.cfg
    rows = ctx.round_trip(cfg)
    b = fve_block(rows, ctx.meta(cfg).mse_scale, ctx.var_train(cfg), n_boot=cfg.bootstrap, seed=cfg.seed)
    short = sorted({d for d, p in zip(rows.column("doc_id").to_pylist(), rows.column("position").to_pylist()) if p < 0})
    fig = report.nmse_histogram(rows, b["var_own"], ctx.figure("fve_hist.png"),
                                f"{cfg.name}: per-activation FVE (own-set Var), n={b['n']}", b["shuffled_null_fve_own"])
    return Result(headline=b, rows=rows, figures=[fig], legend=FVE_LEGEND, examples=report.pick_examples(rows),
                  tables=[Table(f"FVE reproduction: pair `{cfg.pair}`, layer {cfg.layer}", fve_rows(b), ["metric", "value"])],
                  extra={"documents": {"requested": len(ctx.documents()), "short_skipped": len(short),
                                       "short_ids": short[:20]},
                         "timeline": stage_timeline(rows)})


if __name__ == "__main__":
    JOB.run_cli()
