"""Same work on 1 GPU and on G GPUs: throughput ratio of the whole three-pool pipeline.

Runs jobs/reproduce_fve.py twice (fresh output dirs, same preset, same n, same seeds): once with
CUDA_VISIBLE_DEVICES limited to one GPU, once with all of them and the AV/AR pools widened to one
actor per GPU. AV actors ask for 0.6 GPU so Ray cannot pack two onto one device; extraction and AR
actors ask for 0.2 and fill the gaps. Throughput is measured on the steady-state window (first
extraction batch start -> last AR batch end), which excludes Ray start-up and model loading, and
also as plain wall time. Writes summary.json, table.md and a per-stage timeline figure.

  python jobs/pipeline_scaling.py --gpus 2 --n 1000 --out results/perf/<gpu>/pipeline_scaling
  python jobs/pipeline_scaling.py --recompute results/perf/h200x2-pipeline-scaling/summary.json --samples 8 --out DIR
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nla_ray.jobkit import Context, Job, Result, Table  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def _run(gpus: int, a, work: Path) -> dict:
    out = work / f"gpus{gpus}"
    import shutil

    shutil.rmtree(out / "store", ignore_errors=True)  # an empty store: extraction streams with AV and AR
    sets = [f"av.n_samples={a.samples}", f"av.temperature={a.temperature}", f"av.max_new_tokens={a.max_new_tokens}",
            f"pools.extract.num_gpus=0.2", f"pools.extract.batch_size=16", f"pools.extract.concurrency=1",
            f"pools.av.num_gpus=0.6", f"pools.av.concurrency={gpus}", f"pools.av.batch_size={a.av_batch}",
            f"pools.ar.num_gpus=0.2", f"pools.ar.concurrency={gpus}", f"pools.ar.batch_size={a.av_batch}",
            f"pools.extract.dtype={a.dtype}", f"pools.av.dtype={a.dtype}", f"pools.ar.dtype={a.dtype}",
            "bootstrap=200"]
    cmd = [sys.executable, str(REPO / "jobs" / "reproduce_fve.py"), "--preset", a.preset, "--n", str(a.n),
           *(["--config", a.config] if a.config else []),
           "--out", str(out), "--fresh", "--store", str(out / "store")] + [x for s in sets + a.set for x in ("--set", s)]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=",".join(str(i) for i in range(gpus)))
    t0 = time.time()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if r.returncode != 0:
        raise SystemExit(f"run with {gpus} GPU(s) failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    s = json.loads((out / "summary.json").read_text())
    return _derive({"gpus": gpus, "wall_s": round(wall, 1), "timeline": s["timeline"],
                    "rows_scored": s["headline"]["n"], "fve_own": s["headline"]["fve_own"]["value"],
                    "cmd": " ".join(cmd)}, a.samples)


def _derive(run: dict, samples: int) -> dict:
    """Rates from a run's stored timeline. `rows_scored` counts (activation x sample) rows."""
    st = run["timeline"]["stages"]
    window = max(v["end"] for v in st.values()) - min(v["start"] for v in st.values())
    rows = run["rows_scored"]
    run.update(activations=rows // max(1, samples), steady_window_s=round(window, 2),
               rows_per_s_steady=rows / window, rows_per_s_wall=rows / run["wall_s"])
    return run


def _figure(runs: list[dict], path: Path) -> None:
    from nla_ray.report import pyplot, save_figure

    plt = pyplot()

    fig, axes = plt.subplots(len(runs), 1, figsize=(8, 1.6 + 1.3 * len(runs)), squeeze=False)
    colors = {"extract": "#7a9e3b", "av": "#3b6ea5", "ar": "#a5533b"}
    for ax, r in zip(axes[:, 0], runs):
        st = r["timeline"]["stages"]
        for i, (name, v) in enumerate(st.items()):
            ax.barh(i, v["end_rel_s"] - v["start_rel_s"], left=v["start_rel_s"], color=colors.get(name, "grey"))
            ax.text(v["end_rel_s"], i, f" busy {v['busy_s']:.0f}s, {len(v['workers'])} actor(s)", va="center", fontsize=7)
        ax.set_yticks(range(len(st)))
        ax.set_yticklabels(list(st))
        ax.set_title(f"{r['gpus']} GPU(s): {r['rows_per_s_steady']:.1f} rows/s steady", fontsize=9)
        ax.set_xlabel("seconds since first batch")
    fig.tight_layout()
    save_figure(fig, path)


def _args(p) -> None:
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--samples", type=int, default=4, help="AV samples per activation (best-of-N workload)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--av-batch", type=int, default=128)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--work", default="/tmp/nla_scaling", help="where the two runs write their rows")
    p.add_argument("--recompute", help="an earlier summary.json: re-derive rates/table/figure from its timelines")


OWN_RUNS = "each of the two runs starts its own local Ray, with a fresh output dir and an empty store"
JOB = Job("pipeline_scaling", __doc__, add_args=_args,
          unused={"ray_address": OWN_RUNS, "fresh": OWN_RUNS, "store": OWN_RUNS,
                  "verify_against": "the two runs are compared with each other (same_fve)"})


@JOB.main
def run(ctx: Context) -> Result:
    a = ctx.args
    a.n = ctx.cfg.n or 1000
    a.preset = ctx.cfg.name
    if a.recompute:
        # Re-derive every rate from the stored per-run timelines of an earlier summary.json.
        prev = json.loads(Path(a.recompute).read_text())
        runs = []
        for r in prev["runs"]:
            if prev.get("format") != 2:
                # The first version stored rows_scored = scored rows x samples (samples counted twice);
                # its `activations` field held the true scored-row count.
                r["rows_scored"] = r["activations"]
            runs.append(_derive(r, a.samples))
        prov_prev = prev.get("provenance")
    else:
        with ctx.timer("runs"):
            runs = [_run(1, a, Path(a.work)), _run(a.gpus, a, Path(a.work))]
        prov_prev = None
    ratio = runs[1]["rows_per_s_steady"] / runs[0]["rows_per_s_steady"]
    head = {"gpus": a.gpus, "throughput_ratio_steady": ratio,
            "throughput_ratio_wall": runs[1]["rows_per_s_wall"] / runs[0]["rows_per_s_wall"],
            "same_fve": runs[0]["fve_own"] == runs[1]["fve_own"]}
    extra = {"format": 2, "runs": runs, "args": {k: v for k, v in vars(a).items() if k != "set"} | {"set": a.set}}
    if prov_prev:
        extra["measured_provenance"] = prov_prev  # where the timelines were measured (GPU machine)
    fig = ctx.figure("timeline.png")
    _figure(runs, fig)
    shown = [{"GPUs": r["gpus"], "rows scored": r["rows_scored"], "steady window s": r["steady_window_s"],
              "rows/s steady": r["rows_per_s_steady"], "wall s": r["wall_s"], "rows/s wall": r["rows_per_s_wall"],
              "FVE own": r["fve_own"]} for r in runs]
    return Result(headline=head, extra=extra, figures=[fig],
                  tables=[Table(f"Same work on 1 and {a.gpus} GPU(s)", shown, list(shown[0]),
                                note=f"throughput ratio {a.gpus}/1 GPU: steady {ratio:.2f}x, wall "
                                     f"{head['throughput_ratio_wall']:.2f}x")])


if __name__ == "__main__":
    JOB.run_cli()
