"""One page for every analysis: REPORT.md and a self-contained report.html from the results tree,
our numbers beside the seed's, figures, provenance, and verdicts computed from the numbers
(thresholds named in nla_ray/report_page.py). Same as `nla-ray report`.

`--preset P` is a preset the report must cover: every analysis without results for P shows as
missing with the command that makes them (mini and mini-gemma are always covered; results of any
other preset present are shown too). The run record (verdict counts, provenance) goes to --out.

  python jobs/report.py                                   # results/ -> results/REPORT.md, report.html
  python jobs/report.py --preset paper-gemma27b-L41       # what is missing for the paper preset
  python jobs/report.py --results DIR --report-dir DIR2
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `ray job submit` working dirs

from nla_ray.jobkit import Context, Job, Result, Table, UserError, repo_root  # noqa: E402

READS_RESULTS = "the report reads finished results; it runs no pipeline"


def _args(p) -> None:
    p.add_argument("--results", default=str(repo_root() / "results"), help="the results tree (default: results/)")
    p.add_argument("--report-dir", help="where REPORT.md and report.html go (default: --results)")


JOB = Job("report", __doc__, add_args=_args,
          unused={"n": READS_RESULTS, "ray_address": READS_RESULTS, "store": READS_RESULTS,
                  "verify_against": READS_RESULTS, "fresh": READS_RESULTS + " (it always regenerates)",
                  "set": READS_RESULTS + " (no config field changes it)",
                  "config": READS_RESULTS + " (no config field changes it)"})


@JOB.main
def run(ctx: Context) -> Result:
    from nla_ray.report_page import STATUSES, write_report_sections

    results = Path(ctx.args.results)
    if not results.is_dir():
        raise UserError(f"--results {results}: no such directory (a results tree: results/<job>/<preset>/)")
    md, page, sections = write_report_sections(results, ctx.args.report_dir, required=(ctx.cfg.name,))
    ctx.log(f"wrote {md}\nwrote {page}")
    counts = {st: sum(s.status == st for s in sections) for st in STATUSES}
    shown = [{"section": s.spec.section, "analysis": s.spec.title, "verdict": s.status} for s in sections]
    return Result(headline={"verdicts": counts, "report": str(md), "html": str(page)},
                  tables=[Table("Verdicts", shown, list(shown[0]))],
                  legend="The verdicts and every number behind them are in the report itself; this record holds "
                         "the counts and the provenance of the run that wrote it.")


if __name__ == "__main__":
    JOB.run_cli()
