"""Throughput of extraction, AV sampling (HF generate vs fast_decode) and AR scoring on the real
architectures with random weights, with roofline fractions against ceilings measured in the same
process. See nla_ray/perf/bench.py for what is timed and how FLOPs and bytes are counted.

The preset picks the architecture (its base model: mini -> smollm2-135m, mini-gemma -> gemma3-270m,
paper-gemma27b-L41 -> gemma3-27b, paper-qwen7b-L20 -> qwen2.5-7b) and the AV budget and temperature;
--model overrides it (a comma list, or 'all').

  python jobs/bench.py --preset paper-gemma27b-L41 --out results/perf/h200/   # a GPU machine; merges
  python jobs/bench.py --model all --out results/perf/h200/                  # every architecture
  python jobs/bench.py --model all --tiny --out /tmp/bench-tiny/             # CPU, seconds (tests)

Writes summary.json (every number, the plan of each stage with where its sizes come from, and
provenance), table.md and figure.png. summary.json is rewritten after every stage, so a run cut
short by a time limit keeps what it measured; `--budget-s` skips what would start after the budget.
`--fresh` starts a new summary instead of merging into the one in --out.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `ray job submit` working dirs

from nla_ray.jobkit import Context, Job, Result, UserError  # noqa: E402
from nla_ray.perf import bench  # noqa: E402

NOT_HERE = "the bench times fixed batches of random-weight models in one process"


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _args(p) -> None:
    p.add_argument("--model", help=f"one of {', '.join(bench.MODELS)} or 'all' (comma list ok; default: the preset's)")
    p.add_argument("--tiny", action="store_true", help="scaled-down models and stages (runs on a CPU)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto = bf16 on a GPU, fp32 on a CPU")
    p.add_argument("--backends", default=",".join(bench.DEFAULT_BACKENDS),
                   help=f"AV backends to time, from {','.join(bench.BACKENDS)} (default: {','.join(bench.DEFAULT_BACKENDS)})")
    p.add_argument("--batch-sizes", type=_ints, help="AV batch sizes (default 32,64,128,256,512)")
    p.add_argument("--new-tokens", type=int, help="AV tokens per explanation (default: the preset's budget)")
    p.add_argument("--temperature", type=float, help="AV temperature (default: the preset's)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per measurement (median reported)")
    p.add_argument("--hf-reps", type=int, help="repetitions of the HF generate baseline (default: --reps); it is "
                                               "CPU-bound and noisy, so more reps narrow the speedup's range")
    p.add_argument("--sample-temperature", type=float,
                   help="also time the fast backends sampling at this temperature (per-row seeds), e.g. 1.0")
    p.add_argument("--profile", action="store_true",
                   help="GPU: a kernel-time breakdown of one fused generate at the largest batch")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--kv-bucket", type=int, default=64, help="fast decode: key-length bucket per graph (0 = one)")
    p.add_argument("--budget-s", type=float, help="start no measurement after this many seconds")
    p.add_argument("--merge", nargs="+", metavar="SUMMARY:MODEL[,MODEL]",
                   help="measure nothing: combine models from earlier runs' summary.json files into --out "
                        "(later ones win), e.g. --merge a/summary.json:gemma3-27b b/summary.json:qwen2.5-7b")


JOB = Job("bench", __doc__, add_args=_args,
          unused={"n": NOT_HERE + " (use --batch-sizes)", "ray_address": NOT_HERE, "store": NOT_HERE,
                  "verify_against": NOT_HERE})


def _merge(ctx: Context) -> dict:
    specs = []
    for item in ctx.args.merge:
        path, _, names = item.rpartition(":")
        if not path or not names:
            raise UserError(f"--merge {item!r}: expected SUMMARY.json:model[,model]")
        specs.append((path, [n.strip() for n in names.split(",") if n.strip()]))
    return bench.merge(specs, ctx.out)


@JOB.main
def run(ctx: Context) -> Result:
    a = ctx.args
    if a.merge:
        summary = _merge(ctx)
        models = list(summary["models"])
    else:
        models = (list(bench.MODELS) if a.model == "all" else [m.strip() for m in a.model.split(",")] if a.model
                  else bench.models_for_preset(ctx.cfg.name))
        if not models:
            raise UserError(f"preset {ctx.cfg.name!r} has no bench architecture; pass --model "
                            f"({', '.join(bench.MODELS)} or all)")
        # An explicit --preset's budget applies to the models it names; --model all keeps each model's own.
        own = models == bench.models_for_preset(ctx.cfg.name)
        summary = bench.run(models, ctx.out, tiny=a.tiny, device=a.device, dtype=a.dtype,
                            backends=[b.strip() for b in a.backends.split(",") if b.strip()], reps=a.reps,
                            warmup=a.warmup,
                            new_tokens=a.new_tokens or (ctx.cfg.av.max_new_tokens if own and not a.tiny else None),
                            batches=a.batch_sizes,
                            temperature=a.temperature if a.temperature is not None else
                            (ctx.cfg.av.temperature if own else None),
                            kv_bucket=a.kv_bucket, budget_s=a.budget_s, fresh=a.fresh, hf_reps=a.hf_reps,
                            sample_temperature=a.sample_temperature, profile=a.profile)
    ctx.log((ctx.out / "table.md").read_text())
    status = {n: summary["models"][n]["status"] for n in models}
    failed = [n for n, s in status.items() if s != "ok"]
    if failed:
        ctx.log(f"[bench] not completed: {failed}")
    return Result(headline={"models": status, "device": summary.get("device", {}).get("name")},
                  figures=[ctx.out / "figure.png"], own_files=True, clean=not failed)


if __name__ == "__main__":
    JOB.run_cli()
