"""Does a pair trained on one checkpoint read other checkpoints of its base model, with no mapping?

For each variant (same architecture, other weights: the base plus a fine-tuning adapter, or a
directory of full weights) the layer-L activations at the same held-out positions go through the
pair unchanged. Per variant: FVE / NMSE / cos of the round trip against the variant's own vectors
(own-set and the pair's training-set Var, doc-clustered CIs), the FVE lost against the pair on its
own base, and the base-to-variant residual drift on the same inputs; a figure of FVE against drift.

`mini`'s variants ship in nla_ray/variants/smollm2-135m/ (made by jobs/train_variants.py; each
variant.json records how). Paper presets: `--variants DIR,DIR` (local snapshots of any checkpoints
of the base, e.g. the exploration's IT / SFT / DPO models).

  python jobs/checkpoint_transfer.py --preset mini --n 200
  python jobs/checkpoint_transfer.py --preset paper-gemma27b-L41 --variants /ckpt/gemma-sft,/ckpt/gemma-dpo
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `ray job submit` working dirs

import numpy as np  # noqa: E402

from nla_ray.analysis import layers as LY  # noqa: E402
from nla_ray.analysis import transfer as T  # noqa: E402
from nla_ray.analysis.fve import fve_block  # noqa: E402
from nla_ray.core.table import position_keys, scored, vectors  # noqa: E402
from nla_ray.jobkit import FVE_LEGEND, Context, Job, Result, Table, UserError, ci_str, repo_root  # noqa: E402

JOB = Job("checkpoint_transfer", __doc__, add_args=lambda p: p.add_argument(
    "--variants", help="comma list of variant dirs (adapter/ inside, or full weights); default: the shipped "
                       "variants of the preset's base (nla_ray/variants/<base>/*)"))


def variant_dirs(ctx: Context) -> dict[str, Path]:
    if ctx.args.variants:
        dirs = [Path(x.strip()) for x in ctx.args.variants.split(",") if x.strip()]
    else:
        root = repo_root() / "nla_ray" / "variants" / str(ctx.cfg.base).split(":", 1)[-1]
        dirs = sorted(p for p in root.glob("*") if (p / "adapter").is_dir() or (p / "config.json").is_file())
        if not dirs:
            raise UserError(f"no variants of {ctx.cfg.base} in {root}: make them (jobs/train_variants.py --ship) "
                            "or pass --variants DIR,DIR")
    missing = [str(d) for d in dirs if not ((d / "adapter").is_dir() or (d / "config.json").is_file())]
    if missing:
        raise UserError(f"--variants: {missing} hold neither adapter/ nor a config.json of full weights")
    return {d.name: d for d in dirs}


@JOB.main
def run(ctx: Context) -> Result:
    cfg, L = ctx.cfg, [ctx.cfg.layer]
    scale, var_train = ctx.meta(cfg).mse_scale, ctx.var_train(cfg)
    variants = variant_dirs(ctx)
    base_rows = scored(ctx.round_trip(cfg))  # the pair on its own base: the reference
    base_fve = fve_block(base_rows, scale, var_train, n_boot=cfg.bootstrap, seed=cfg.seed)
    out = [{"variant": "base", "drift_nmse": 0.0, "drift_cos": 1.0, "drift_ci95": [0.0, 0.0],
            "fve": base_fve["fve_own"]["value"], "fve_ci95": base_fve["fve_own"]["ci95_doc_clustered"],
            "fve_train": (base_fve.get("fve_train") or {}).get("value"), "nmse": base_fve["nmse"],
            "cos": base_fve["cos"], "n": base_fve["n"], "fve_lost": 0.0, "fve_retained": 1.0}]
    keys_base = position_keys(base_rows)
    for name, d in variants.items():
        acts = ctx.limit(ctx.activations(cfg, layers=L, adapter=str(d))[1])
        rows = scored(ctx.round_trip(cfg, arm=name, source=acts))
        i = LY.align_rows(position_keys(rows), keys_base)
        dr = T.drift(vectors(base_rows, "vector")[i], vectors(rows, "vector"), rows.column("doc_id").to_pylist(),
                     scale, n_boot=cfg.bootstrap, seed=cfg.seed)
        f = fve_block(rows, scale, var_train, n_boot=cfg.bootstrap, seed=cfg.seed)
        out.append({"variant": name, "drift_nmse": dr["nmse"], "drift_cos": dr["cos"], "drift_ci95": dr["nmse_ci95"],
                    "fve": f["fve_own"]["value"], "fve_ci95": f["fve_own"]["ci95_doc_clustered"],
                    "fve_train": (f.get("fve_train") or {}).get("value"), "nmse": f["nmse"], "cos": f["cos"],
                    "n": f["n"], **T.degradation(f["fve_own"]["value"], base_fve["fve_own"]["value"])})
    fig = T.figure(out, ctx.figure("checkpoint_transfer.png"), f"{cfg.name}: layer-{cfg.layer} pair on variants")
    shown = [{"checkpoint": r["variant"], "drift NMSE": r["drift_nmse"], "drift 95% CI": ci_str(r["drift_ci95"]),
              "drift cos": r["drift_cos"], "FVE (own Var)": r["fve"], "95% CI": ci_str(r["fve_ci95"]),
              "FVE (train Var)": r["fve_train"] if r["fve_train"] is not None else "n/a", "NMSE": r["nmse"],
              "cos": r["cos"], "FVE lost": r["fve_lost"], "n": r["n"]} for r in out]
    return Result(
        headline={"checkpoints": {r["variant"]: r for r in out}, "pair": cfg.pair, "base": cfg.base,
                  "variants": {k: str(v) for k, v in variants.items()}, "n": int(base_rows.num_rows)},
        figures=[fig], rows=base_rows,
        tables=[Table(f"The layer-{cfg.layer} pair on other checkpoints of its base (seed exploration: transfers "
                      "to a preference-tuned variant, degrades after SFT)", shown, list(shown[0]))],
        legend=FVE_LEGEND + " Each variant's FVE is against its own vectors at the same positions as the base's; "
        "drift is NMSE(variant, base) on those positions (a model against itself is 0). FVE lost = base FVE − "
        "variant FVE.")


if __name__ == "__main__":
    JOB.run_cli()
