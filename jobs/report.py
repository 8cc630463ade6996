"""The generated report: REPORT.md and a self-contained report.html from results/ (same as
`python -m nla_ray report`).

  python jobs/report.py [--results results] [--out results]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `ray job submit` working dirs

from nla_ray.report_page import write_report  # noqa: E402

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=str(ROOT / "results"))
    p.add_argument("--out", help="default: --results")
    a = p.parse_args()
    for path in write_report(a.results, a.out):
        print(f"wrote {path}")
