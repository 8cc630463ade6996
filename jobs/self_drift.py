"""§7c: is the AV (or the AR) still the base model? Residual drift from NLA training.

On identical inputs and positions, the layer-L residual of the base model against the AV's own and
the AR's own (fine-tuned: base + the pair's adapter) layer-L residuals: NMSE (direction-normalised,
as everywhere) and cos, with document-clustered 95% CIs, against the NLA's own reconstruction NMSE on
the same activations as the reference line (Fig. 4). All three extractions go through the store.

  python jobs/self_drift.py --preset mini
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `ray job submit` working dirs

import numpy as np  # noqa: E402

from nla_ray.analysis import drift as D  # noqa: E402
from nla_ray.analysis import layers as LY  # noqa: E402
from nla_ray.core import metrics  # noqa: E402
from nla_ray.core.table import position_keys, scored, vectors  # noqa: E402
from nla_ray.jobkit import Context, Job, Result, Table, ci_str  # noqa: E402

JOB = Job("self_drift", __doc__)


@JOB.main
def run(ctx: Context) -> Result:
    cfg, dirs = ctx.cfg, ctx.pair(ctx.cfg)
    scale, L = ctx.meta(cfg).mse_scale, [cfg.layer]
    base = scored(ctx.limit(ctx.activations(cfg, layers=L)[1]))
    docs = np.asarray(base.column("doc_id").to_pylist())
    out = {}
    for role, d in (("AV", dirs.av), ("AR", dirs.ar)):
        own = scored(ctx.activations(cfg, layers=L, adapter=d)[1])
        i = LY.align_rows(position_keys(base), position_keys(own))
        nm = metrics.nmse(vectors(own, "vector")[i], vectors(base, "vector"), scale)
        lo, hi, _ = metrics.clustered_bootstrap_ci(nm, docs, np.mean, n_boot=cfg.bootstrap, seed=cfg.seed)
        out[role] = {"nmse": float(nm.mean()), "nmse_ci95": [float(lo), float(hi)],
                     "cos": float(metrics.cosine(vectors(own, "vector")[i], vectors(base, "vector")).mean())}
    recon = scored(ctx.round_trip(cfg))  # the NLA's own error on the same activations: the reference
    ref = float(metrics.nmse(vectors(recon, "recon"), vectors(recon, "vector"), scale).mean())
    fig = D.figure(out, ref, ctx.figure("self_drift.png"), f"{cfg.name}: layer-{cfg.layer} drift from the base")
    shown = [{"model": f"{role} (base + its adapter)", "NMSE to base": r["nmse"], "95% CI": ci_str(r["nmse_ci95"]),
              "cos to base": r["cos"], "× NLA error": r["nmse"] / ref if ref else None} for role, r in out.items()]
    return Result(
        headline={"drift": out, "nla_reconstruction_nmse": ref, "n": int(base.num_rows)}, figures=[fig],
        tables=[Table("Self-drift on identical inputs (seed, Gemma L41: AV cos 0.975 NMSE 0.050, AR cos 0.992 "
                      "NMSE 0.015, NLA error 0.013)", shown, list(shown[0]))],
        legend="NMSE between the base model's and the fine-tuned model's layer-L vectors at the same positions "
        "(direction-normalised, √d scale: NMSE = 2(1 − cos)). The reference is the NLA's own round-trip NMSE "
        "on these activations. CIs resample documents.")


if __name__ == "__main__":
    JOB.run_cli()
