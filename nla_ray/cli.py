"""`python -m nla_ray <command>`: small tools around the library (jobs live in jobs/)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _cmd_trace(a) -> int:
    from nla_ray.nla import pairs
    from nla_ray.nla.trace import format_trace, trace_text

    text = a.text if a.text is not None else Path(a.text_file).read_text(encoding="utf-8")
    dirs = pairs.resolve_pair(a.pair)
    av = pairs.load_av(dirs.av, device=a.device, dtype=a.dtype, max_new_tokens=a.max_new_tokens)
    ar = pairs.load_ar(dirs.ar, device=a.device, dtype=a.dtype)
    positions = [int(x) for x in a.positions.split(",")] if a.positions else None
    rows, summary = trace_text(av, ar, text, positions=positions, min_position=a.min_position,
                               temperature=a.temperature, seed=a.seed, var=a.var, batch_size=a.batch_size)
    print(format_trace(rows, summary))
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r.__dict__, ensure_ascii=False) + "\n")
            f.write(json.dumps({"summary": summary, "pair": a.pair}) + "\n")
        print(f"wrote {out}")
    return 0


def _cmd_pairs(a) -> int:
    from nla_ray.nla import pairs

    for name, cfg in pairs.MINI_PAIRS.items():
        shipped = (pairs.SHIPPED_DIR / name / "av" / "nla_meta.yaml").is_file()
        print(f"mini:{name:<14} base {cfg['base']:<18} layer {cfg['layer']:<3} "
              f"{'trained (shipped)' if shipped else 'MISSING: train it, or use mini-untrained:' + name}")
    return 0


def _cmd_report(a) -> int:
    from nla_ray import report_page

    md, page = report_page.write_report(a.results, a.out)
    print(f"wrote {md}\nwrote {page}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nla_ray", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("trace", help="AV explanation + AR score for every token of a text",
                       description="For each token of a text: extract the pair's layer-K residual, "
                                   "verbalize it with the AV, reconstruct it with the AR, and print "
                                   "NMSE / cos / FVE per token.")
    t.add_argument("--pair", default="mini:smollm2-L20",
                   help="mini:smollm2-L20 | mini:gemma3-L12 | DIR with av/ and ar/ | 'AV,AR' (dirs or hub ids)")
    g = t.add_mutually_exclusive_group(required=True)
    g.add_argument("--text", help="the text to trace")
    g.add_argument("--text-file", help="read the text from this file")
    t.add_argument("--positions", help="comma-separated token indices (default: every non-special token)")
    t.add_argument("--min-position", type=int, default=0, help="skip tokens before this index")
    t.add_argument("--max-new-tokens", type=int, default=120)
    t.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (reproducible)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--var", type=float, help="FVE denominator (default: sidecar eval.var_train, else own set)")
    t.add_argument("--device", default="auto")
    t.add_argument("--dtype", default="auto")
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--out", help="also write rows as JSON lines here")
    t.set_defaults(fn=_cmd_trace)
    s = sub.add_parser("pairs", help="list the embedded-default NLA pairs")
    s.set_defaults(fn=_cmd_pairs)
    r = sub.add_parser("report", help="write REPORT.md and a self-contained report.html from results/",
                       description="One page for every analysis: our numbers beside the seed's, figures, "
                                   "provenance, and a verdict computed from the numbers.")
    r.add_argument("--results", default=str(Path(__file__).resolve().parent.parent / "results"),
                   help="the results tree (default: the repository's results/)")
    r.add_argument("--out", help="where to write REPORT.md and report.html (default: --results)")
    r.set_defaults(fn=_cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    return a.fn(a)


if __name__ == "__main__":
    sys.exit(main())
