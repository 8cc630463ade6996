"""§1 of the assessment: reproduce an NLA pair's FVE on held-out documents.

Streams documents through the three Ray pools (extract -> AV -> AR), then reports FVE against both
denominators (own-set Var and, when the preset has one, the release's training-set Var), NMSE, cos,
Var, a document-clustered 95% CI, a shuffled-pair null and tag failures.

  python jobs/reproduce_fve.py --preset mini                 # embedded default, CPU
  python jobs/reproduce_fve.py --preset paper-gemma27b-L41   # released checkpoints, GPUs
  ray job submit --working-dir . -- python jobs/reproduce_fve.py --preset paper-qwen7b-L20

Rerunning the same command resumes (finished documents are skipped). `--verify-against DIR` compares
this run's rows to another run's, bit for bit (explanations and reconstructions).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `ray job submit` working dirs

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from nla_ray import pipeline, report  # noqa: E402
from nla_ray.config import add_job_args, config_from_args  # noqa: E402
from nla_ray.jobkit import Timer, documents, out_dir_for  # noqa: E402
from nla_ray.provenance import provenance  # noqa: E402

JOB = "reproduce_fve"


def compare_runs(a, b) -> dict:
    ka = {tuple(r[k] for k in pipeline.KEY): r for r in a.select(pipeline.KEY + ["explanation"]).to_pylist()}
    kb = {tuple(r[k] for k in pipeline.KEY): r for r in b.select(pipeline.KEY + ["explanation"]).to_pylist()}
    common = sorted(set(ka) & set(kb), key=str)
    same_text = sum(ka[k]["explanation"] == kb[k]["explanation"] for k in common)
    ia = {k: i for i, k in enumerate(tuple(r[k] for k in pipeline.KEY) for r in a.select(pipeline.KEY).to_pylist())}
    ib = {k: i for i, k in enumerate(tuple(r[k] for k in pipeline.KEY) for r in b.select(pipeline.KEY).to_pylist())}
    ra, rb = pipeline.vectors(a, "recon"), pipeline.vectors(b, "recon")
    same_vec = sum(np.array_equal(ra[ia[k]], rb[ib[k]]) for k in common)
    return {"rows_compared": len(common), "identical_explanations": int(same_text),
            "bit_identical_reconstructions": int(same_vec),
            "bit_identical": len(common) > 0 and same_text == same_vec == len(common)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_job_args(p, JOB)
    p.add_argument("--verify-against", help="another run's output dir: report bit-identity of rows")
    a = p.parse_args(argv)
    cfg = config_from_args(a)
    out = out_dir_for(JOB, cfg, a.out)
    timer = Timer()
    with timer("load_documents"):
        docs = documents(cfg)
    print(f"[{JOB}] preset {cfg.name}: {len(docs)} documents, pair {cfg.pair}, layer {cfg.layer} -> {out}")
    with timer("pipeline"):
        info = pipeline.run(cfg, docs, out, address=a.ray_address, fresh=a.fresh)
    with timer("summarize"):
        table = pipeline.final_table(pipeline.read_parts(out / "rows"))
        wanted = {d.doc_id for d in docs}
        table = table.filter(np.isin(np.asarray(table.column("doc_id").to_pylist()), list(wanted)))
        from nla_ray import pairs
        from nla_ray.sidecar import read_sidecar

        meta = read_sidecar(pairs.resolve_pair(cfg.pair).ar)
        block = report.fve_block(table, meta.mse_scale, cfg.var_train, n_boot=cfg.bootstrap, seed=cfg.seed)
        short = sorted({r for r, pos in zip(table.column("doc_id").to_pylist(),
                                            table.column("position").to_pylist()) if pos < 0})
        timeline = pipeline.stage_timeline(report.scored(table))
        pq.write_table(table, out / "rows.parquet")
    summary = {
        "job": JOB, "config": cfg.to_dict(), "headline": block,
        "documents": {"requested": len(docs), "short_skipped": len(short), "short_ids": short[:20]},
        "run": {**info.__dict__, "wall_s_by_phase": timer.t}, "timeline": timeline,
        "provenance": provenance(cfg.name),
    }
    if a.verify_against:
        other = pq.read_table(Path(a.verify_against) / "rows.parquet")
        summary["verify_against"] = {"dir": a.verify_against, **compare_runs(table, other)}
    pipeline.write_json(out / "summary.json", summary)
    rows = [{"metric": "FVE (own-set Var)", "value": block["fve_own"]["value"]},
            {"metric": "  95% CI (doc-clustered)", "value": str([round(x, 4) for x in block["fve_own"]["ci95_doc_clustered"]])}]
    if "fve_train" in block:
        rows.append({"metric": f"FVE (train-set Var {cfg.var_train})", "value": block["fve_train"]["value"]})
    rows += [{"metric": "NMSE", "value": block["nmse"]}, {"metric": "cos", "value": block["cos"]},
             {"metric": "Var (own set)", "value": block["var_own"]},
             {"metric": "shuffled-pair null FVE", "value": block["shuffled_null_fve_own"]},
             {"metric": "tag failures", "value": f"{block['tag_failures']}/{block['n']}"},
             {"metric": "activations / documents", "value": f"{block['n']} / {block['n_docs']}"}]
    md = (f"# FVE reproduction — {cfg.name}\n\npair `{cfg.pair}`, layer {cfg.layer}, corpus `{cfg.corpus}`\n\n"
          + report.markdown_table(rows, ["metric", "value"]) + "\n" + report.provenance_md(summary["provenance"]))
    (out / "table.md").write_text(md)
    report.nmse_histogram(table, block["var_own"], out / "fve_hist.png",
                          f"{cfg.name}: per-activation FVE (own-set Var), n={block['n']}")
    print(md)
    if "verify_against" in summary:
        print("verify:", summary["verify_against"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
