"""§6: does a pair trained at layer L read the layers next to it?

Layers L-band .. L+band are extracted in one forward pass (the store keeps them) and fed to the
layer-L pair as they are. Per layer: FVE with that layer's own Var (doc-clustered CI), NMSE, cos and
mutual NMSE to layer L at the same positions, and the additive bound (L's own NMSE + the l-to-L
offset) against the observed NMSE; a figure of FVE against cos-to-L.

  python jobs/adjacent_layers.py --preset mini --band 2
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `ray job submit` working dirs

from nla_ray.analysis import layers as LY  # noqa: E402
from nla_ray.analysis.fve import fve_block  # noqa: E402
from nla_ray.core import metrics  # noqa: E402
from nla_ray.core.table import filter_rows, position_keys, scored, vectors  # noqa: E402
from nla_ray.jobkit import FVE_LEGEND, Context, Job, Result, Table, UserError, ci_str  # noqa: E402

JOB = Job("adjacent_layers", __doc__, add_args=lambda p: p.add_argument(
    "--band", type=int, default=1, help="layers L-band..L+band are fed to the layer-L pair (default 1)"))


@JOB.main
def run(ctx: Context) -> Result:
    if ctx.args.band < 1:
        raise UserError(f"--band must be >= 1 (got {ctx.args.band})")
    cfg = copy.deepcopy(ctx.cfg)
    L = cfg.layer
    cfg.layers = [layer for layer in range(L - ctx.args.band, L + ctx.args.band + 1) if layer >= 0]
    rows = scored(ctx.round_trip(cfg))
    scale = ctx.meta(cfg).mse_scale
    by = {layer: filter_rows(rows, [x == layer for x in rows.column("layer").to_pylist()]) for layer in cfg.layers}
    ref = by[L]
    intrinsic = float(metrics.nmse(vectors(ref, "recon"), vectors(ref, "vector"), scale).mean())  # L on its own layer
    out = []
    for layer, t in by.items():
        i = LY.align_rows(position_keys(t), position_keys(ref))
        row = LY.layer_row(layer, L, vectors(t, "vector"), vectors(ref, "vector")[i], vectors(t, "recon"),
                           intrinsic, scale)
        row["fve_ci95"] = fve_block(t, scale, None, n_boot=cfg.bootstrap, seed=cfg.seed)["fve_own"]["ci95_doc_clustered"]
        out.append(row)
    fig = LY.figure(out, ctx.figure("adjacent_layers.png"), f"{cfg.name}: layer-{L} pair on layers "
                    f"{cfg.layers[0]}..{cfg.layers[-1]}")
    shown = [{"input": f"L{r['layer']}" + (" (trained)" if r["layer"] == L else ""), "cos to L": r["cos_to_ref"],
              "mutual NMSE": r["mutual_nmse"], "NMSE": r["nmse"], "FVE (own Var)": r["fve"],
              "95% CI": ci_str(r["fve_ci95"]), "additive bound": r["additive_bound"],
              "≤ bound": r["within_bound"]} for r in out]
    return Result(
        headline={"layers": out, "pair_layer": L, "n": int(ref.num_rows)}, figures=[fig], rows=rows,
        tables=[Table(f"Layer-{L} pair fed adjacent layers (seed, Gemma L41 pair: L40 cos 0.997 NMSE 0.0167 FVE "
                      "0.695; L42 0.997 / 0.0187 / 0.703; trained 0.013 / 0.774)", shown, list(shown[0]))],
        legend=FVE_LEGEND + " Each layer's FVE uses that layer's own Var. The additive bound is layer L's own "
        "round-trip NMSE plus the mutual NMSE between layer l and layer L at the same positions.")


if __name__ == "__main__":
    JOB.run_cli()
