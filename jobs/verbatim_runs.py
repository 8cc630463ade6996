"""§3: are the AV's quotes verbatim, or reconstructions?

The AV never sees the text, only one vector. For each explanation: the longest contiguous word run it
shares with the true source context (the document up to and including the explained token), against
a null that pairs it with another document's context. Median, p90 and share of runs >= 6 words, for
the unconstrained decodes and the quote-banned, hatch-free ones (§2's arms: reused from
quote_ablation's output when it has them, else decoded here).

  python jobs/verbatim_runs.py --preset mini          # after (or without) jobs/quote_ablation.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `ray job submit` working dirs

from nla_ray.analysis import quotes as Q  # noqa: E402
from nla_ray.analysis import verbatim as V  # noqa: E402
from nla_ray.core.table import scored  # noqa: E402
from nla_ray.jobkit import Context, Job, Result, Table  # noqa: E402

JOB = Job("verbatim_runs", __doc__, add_args=lambda p: p.add_argument(
    "--decodes", help="quote_ablation output dir to reuse (default runs/quote_ablation/<preset> when it exists)"))
SETS = {"quoting freely": ("free", False), "quote-banned, hatch-free": ("no_quotes", True)}


@JOB.main
def run(ctx: Context) -> Result:
    cfg, root = ctx.cfg, ctx.decodes_root("quote_ablation")
    out, stats = [], {}
    for name, (arm, hatch_free) in SETS.items():
        t = scored(ctx.round_trip(cfg, arm=arm, banned_chars=list(Q.CONDITIONS[arm]), root=root))
        expl, ctxs, docs = (t.column(c).to_pylist() for c in ("explanation", "prefix_text", "doc_id"))
        keep = [i for i, e in enumerate(expl) if e and not (hatch_free and Q.uses_hatch(e))]
        expl, ctxs, docs = ([x[i] for i in keep] for x in (expl, ctxs, docs))
        real = V.run_stats(V.run_lengths(expl, ctxs))
        # a null needs explanations from at least two documents (tag failures have no explanation)
        null = V.run_stats(V.shuffled_context_null(expl, ctxs, docs, seed=cfg.seed) if len(set(docs)) > 1 else [])
        stats[name] = {"arm": arm, "runs": real, "null": null, "decodes": t.num_rows}
        out.append({"decode set": name, "n": real["n"], "median run": real["median"], "p90": real["p90"],
                    "≥6-word run": real["share_ge_6"], "null median": null["median"], "null p90": null["p90"],
                    "null ≥6": null["share_ge_6"]})
    return Result(
        headline=stats, extra={"decodes_from": str(root) if root else "this run"},
        tables=[Table("Longest word run shared with the source context vs a shuffled-context null "
                      "(seed: median 0, p90 4, ≥6 2% free / 1% banned; null ≥6 0%)", out, list(out[0]))],
        legend="A run is the longest sequence of consecutive words (lowercased, NFKC, apostrophes folded) found in "
               "both the explanation and the text up to the explained token. The null scores each explanation "
               "against another document's context: equal numbers mean no copied text beyond common phrasing.")


if __name__ == "__main__":
    JOB.run_cli()
