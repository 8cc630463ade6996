"""Throughput of extraction, AV sampling (HF generate vs fast_decode) and AR scoring on the real
architectures with random weights, with roofline fractions against ceilings measured in the same
process. See nla_ray/bench.py for what is timed and how FLOPs and bytes are counted.

  python jobs/bench.py --model all --out results/perf/h100/            # a GPU machine
  python jobs/bench.py --model gemma3-27b --out results/perf/h100/     # one model; merges into the dir
  python jobs/bench.py --model all --tiny --out /tmp/bench-tiny/       # CPU, seconds (tests)

Writes summary.json (every number, the plan of each stage with where its sizes come from, and
provenance), table.md and figure.png. summary.json is rewritten after every stage, so a run cut
short by a time limit keeps what it measured; `--budget-s` skips what would start after the budget.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `ray job submit` working dirs

from nla_ray.perf import bench  # noqa: E402
from nla_ray.core.provenance import machine_label  # noqa: E402


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="all", help=f"one of {', '.join(bench.MODELS)} or 'all' (comma list ok)")
    p.add_argument("--out", help="output dir (default results/perf/<machine label>[-tiny]/)")
    p.add_argument("--tiny", action="store_true", help="scaled-down models and stages (runs on a CPU)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto = bf16 on a GPU, fp32 on a CPU")
    p.add_argument("--backends", default=",".join(bench.DEFAULT_BACKENDS),
                   help=f"AV backends to time, from {','.join(bench.BACKENDS)} (default: {','.join(bench.DEFAULT_BACKENDS)})")
    p.add_argument("--batch-sizes", type=_ints, help="AV batch sizes (default 32,64,128,256,512)")
    p.add_argument("--new-tokens", type=int, help="AV tokens per explanation (default: the preset's budget)")
    p.add_argument("--temperature", type=float, help="AV temperature (default: the preset's)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--kv-bucket", type=int, default=64, help="fast decode: key-length bucket per graph (0 = one)")
    p.add_argument("--budget-s", type=float, help="start no measurement after this many seconds")
    p.add_argument("--fresh", action="store_true", help="do not merge into an existing summary.json")
    p.add_argument("--merge", nargs="+", metavar="SUMMARY:MODEL[,MODEL]",
                   help="measure nothing: combine models from earlier runs' summary.json files into --out "
                        "(later ones win), e.g. --merge a/summary.json:gemma3-27b b/summary.json:qwen2.5-7b")
    a = p.parse_args(argv)
    if a.merge:
        if not a.out:
            raise SystemExit("--merge needs --out")
        specs = []
        for item in a.merge:
            path, _, names = item.rpartition(":")
            if not path or not names:
                raise SystemExit(f"--merge {item!r}: expected SUMMARY.json:model[,model]")
            specs.append((path, [n.strip() for n in names.split(",") if n.strip()]))
        bench.merge(specs, a.out)
        print((Path(a.out) / "table.md").read_text())
        return 0
    models = list(bench.MODELS) if a.model == "all" else [m.strip() for m in a.model.split(",")]
    out = a.out or str(Path(__file__).resolve().parent.parent / "results" / "perf" /
                       (bench.slug(machine_label()) + ("-tiny" if a.tiny else "")))
    summary = bench.run(models, out, tiny=a.tiny, device=a.device, dtype=a.dtype,
                        backends=[b.strip() for b in a.backends.split(",") if b.strip()], reps=a.reps,
                        warmup=a.warmup, new_tokens=a.new_tokens, batches=a.batch_sizes, temperature=a.temperature,
                        kv_bucket=a.kv_bucket, budget_s=a.budget_s, fresh=a.fresh)
    print((Path(out) / "table.md").read_text())
    failed = [n for n in models if summary["models"][n]["status"] != "ok"]
    if failed:
        print(f"[bench] not completed: {failed}", file=sys.stderr)
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
