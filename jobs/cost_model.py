"""What would it take to run NLAs on production traffic? GPU-seconds per explained activation,
GPU-hours and dollars per million activations, and the fleet needed to explain every k-th token of
a service emitting T tokens/s — all derived from one measured bench summary.

  python jobs/cost_model.py --bench results/perf/<gpu>/summary.json
  python jobs/cost_model.py --bench results/perf/<gpu>/summary.json --usd-per-gpu-hour 2.0 --out DIR

Writes summary.json (every number, the parameters, the bench file's path and sha256, provenance),
table.md and figure.png (default dir: results/cost_model/<bench dir name>/).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `ray job submit` working dirs

from nla_ray.perf import costmodel  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", required=True, help="a summary.json written by jobs/bench.py")
    p.add_argument("--out", help="output dir (default results/cost_model/<bench dir name>/)")
    p.add_argument("--usd-per-gpu-hour", type=float, default=costmodel.DEFAULT_USD_PER_GPU_HOUR,
                   help="price of one GPU-hour of the benchmarked GPU (a parameter, stated in every output)")
    p.add_argument("--av-backend", default="auto", choices=["auto", "fused", "fast", "hf"],
                   help="which AV timing to cost (auto: the faster of fused and fast)")
    a = p.parse_args(argv)
    bench_path = Path(a.bench)
    out = a.out or str(Path(__file__).resolve().parent.parent / "results" / "cost_model" / bench_path.parent.name)
    report = costmodel.run(bench_path, out, usd_per_gpu_hour=a.usd_per_gpu_hour, av_backend=a.av_backend)
    print((Path(out) / "table.md").read_text())
    if not report["models"]:
        print(f"[cost_model] no model in {bench_path} has all three stages measured: {report['skipped']}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
