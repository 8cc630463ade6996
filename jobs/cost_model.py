"""What would it take to run NLAs on production traffic? GPU-seconds per explained activation,
GPU-hours and dollars per million activations, and the fleet needed to explain every k-th token of
a service emitting T tokens/s — all derived from one measured bench summary.

The headline is the preset's architecture (mini -> smollm2-135m, paper-gemma27b-L41 -> gemma3-27b,
...); the tables cover every model the bench file measured. `--n` prices explaining that many
activations with the preset's model.

  python jobs/cost_model.py --bench results/perf/h200/summary.json --preset paper-gemma27b-L41
  python jobs/cost_model.py --bench results/perf/h200/summary.json --usd-per-gpu-hour 2.0 --n 1000000

Writes summary.json (every number, the parameters, the bench file's path and sha256, provenance),
table.md and figure.png (default dir: runs/cost_model/<preset>/).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `ray job submit` working dirs

from nla_ray.jobkit import Context, Job, Result, UserError  # noqa: E402
from nla_ray.perf import bench, costmodel  # noqa: E402

ARITHMETIC = "the cost model is arithmetic on a bench file"


def _args(p) -> None:
    p.add_argument("--bench", required=True, help="a summary.json written by jobs/bench.py")
    p.add_argument("--usd-per-gpu-hour", type=float, default=costmodel.DEFAULT_USD_PER_GPU_HOUR,
                   help="price of one GPU-hour of the benchmarked GPU (a parameter, stated in every output)")
    p.add_argument("--av-backend", default="auto", choices=["auto", "fused", "fast", "hf"],
                   help="which AV timing to cost (auto: the faster of fused and fast)")


JOB = Job("cost_model", __doc__, add_args=_args,
          unused={"ray_address": ARITHMETIC, "store": ARITHMETIC, "verify_against": ARITHMETIC,
                  "fresh": ARITHMETIC + " (it always recomputes)"})


@JOB.main
def run(ctx: Context) -> Result:
    bench_path = Path(ctx.args.bench)
    if not bench_path.is_file():
        raise UserError(f"--bench {bench_path}: no such file (a summary.json written by jobs/bench.py)")
    rep = costmodel.run(bench_path, ctx.out, usd_per_gpu_hour=ctx.args.usd_per_gpu_hour, av_backend=ctx.args.av_backend)
    ctx.log((ctx.out / "table.md").read_text())
    if not rep["models"]:
        raise UserError(f"no model in {bench_path} has all three stages measured: {rep['skipped']}")
    mine = [m for m in bench.models_for_preset(ctx.cfg.name) if m in rep["models"]]
    headline: dict = {"models": sorted(rep["models"]), "usd_per_gpu_hour": ctx.args.usd_per_gpu_hour}
    if mine:
        m = rep["models"][mine[0]]
        per = m["per_activation"]
        headline.update(model=mine[0], gpu_s_per_activation_hooked=per["total_hooked_s"],
                        gpu_s_per_activation_recompute=per["total_recompute_s"],
                        per_million_activations=m["per_million_activations"])
        if ctx.cfg.n:
            hours = per["total_recompute_s"] * ctx.cfg.n / 3600
            headline["for_n"] = {"n": ctx.cfg.n, "gpu_hours_recompute": hours,
                                 "usd_recompute": hours * ctx.args.usd_per_gpu_hour}
            ctx.log(f"[cost_model] {ctx.cfg.n} activations with {mine[0]}: {hours:.3g} GPU-h, "
                    f"${hours * ctx.args.usd_per_gpu_hour:.3g} (extraction recomputed)")
    else:
        ctx.log(f"[cost_model] {bench_path} has no model of preset {ctx.cfg.name!r}; headline lists the models only")
    return Result(headline=headline, figures=[ctx.out / "figure.png"], own_files=True)


if __name__ == "__main__":
    JOB.run_cli()
