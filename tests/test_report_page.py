"""The generated report (nla_ray/report_page.py) on a small fake results tree: verdict branches, missing
sections, and a self-contained HTML page. No models, no Ray, no network."""

from __future__ import annotations

import base64
import json
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from nla_ray import report_page as R

REPO = Path(__file__).resolve().parent.parent
PAIRS = {"mini": "mini:smollm2-L20", "mini-gemma": "mini:gemma3-L12"}


def tiny_png(w: int = 3, h: int = 2) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    rows = b"".join(b"\x00" + b"\x40\x80\xc0" * w for _ in range(h))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def summary(job: str, headline: dict, preset: str = "mini", **extra) -> dict:
    return {"job": job,
            "config": {"name": preset, "pair": PAIRS.get(preset, "x"), "partner": "mini-gemma", "var_train": None},
            "headline": headline,
            "provenance": {"command": f"python jobs/{job}.py --preset {preset}", "git_commit": "c0ffee1",
                           "preset": preset, "machine": "CPU (2 cores)", "date": "2026-12-01T00:00:00+00:00"},
            **extra}


# ---- builders with the real key layout of each job's summary.json ---------------------------------------
def reproduce(fve=0.50, ci=(0.46, 0.54), null=-0.8, bit=True, preset="mini"):
    s = summary("reproduce_fve", {
        "n": 120, "n_docs": 24, "nmse": 0.23, "cos": 0.88, "var_own": 0.47,
        "fve_own": {"value": fve, "denominator": "own_set", "var": 0.47, "ci95_doc_clustered": list(ci)},
        "tag_failures": 0, "shuffled_null_fve_own": null}, preset)
    if bit is not None:
        s["verify_against"] = {"bit_identical": bit}
    return s


def quotes(switch=250, free=0.50, hatch_free=0.40):
    c = {"free": {"n": 250, "fve": free, "fve_ci95": [free - 0.03, free + 0.03], "decodes_with_single": 5},
         "no_double": {"n": 250, "fve": free - 0.05, "decodes_with_single": switch},
         "no_quotes": {"n": 250, "fve": hatch_free + 0.01, "hatch_share": 0.2, "leaked_banned_chars": 0},
         "no_quotes / hatch-free": {"n": 200, "fve": hatch_free},
         "no_quotes / hatch-using": {"n": 50, "fve": hatch_free + 0.05}}
    return summary("quote_ablation", {"conditions": c, "tag_failures": {"free": 0, "no_double": 1, "no_quotes": 3},
                                      "ban_sizes": {"double": 213, "double+single": 432}, "var_own": 0.467})


def verbatim(ge6_free=0.0, ge6_banned=0.0):
    def arm(share):
        return {"runs": {"n": 250, "median": 2.0, "p90": 3.0, "share_ge_6": share},
                "null": {"n": 250, "median": 2.0, "p90": 2.0, "share_ge_6": 0.0}, "decodes": 250}
    return summary("verbatim_runs", {"quoting freely": arm(ge6_free), "quote-banned, hatch-free": arm(ge6_banned)})


def redaction(spans=0.13, prose=-0.2, unmarked=-0.13, fills=(-0.1, -0.3, -0.5, -0.6, -0.7)):
    fve = {"identity": 0.5, "spans_only": spans, "spans_unmarked": unmarked, "prose_only": prose, "no_marks": 0.25,
           **{f: v for f, v in zip(R.FILLERS, fills)}}
    return summary("redaction", {"fve": fve, "redaction_stats": {"n": 250, "spans_per_decode": 5.0,
                                                                 "share_of_chars": 0.24}, "var_own": 0.467})


def best_of_n(greedy=0.50, one=0.49, slope=0.01):
    sampled = {"arm": "T1.0", "temperature": 1.0, "k": 5, "fve_N1": one, "fve_N2": one + slope,
               "fve_N3": one + 1.6 * slope, "fve_N5": one + 2.3 * slope, "fve_N5_ci95": [one, one + 0.1],
               "slope_per_doubling": slope, "tag_failure_share": 0.0}
    return summary("best_of_n", {"results": [{"arm": "greedy", "temperature": 0.0, "k": 1, "fve_N1": greedy},
                                             sampled], "var_own": 0.465, "n_activations": 40})


def adjacent(below=0.45, trained=0.50, above=0.46, bound=True):
    def layer(off, fve):
        return {"layer": 20 + off, "offset": off, "cos_to_ref": 1.0 if off == 0 else 0.95, "mutual_nmse": 0.1,
                "nmse": 0.25, "fve": fve, "var": 0.44, "additive_bound": 0.33,
                "within_bound": True if off == 0 else bound, "fve_ci95": [fve - 0.04, fve + 0.04]}
    return summary("adjacent_layers", {"layers": [layer(-1, below), layer(0, trained), layer(1, above)],
                                       "pair_layer": 20, "n": 200})


def cross(fve=None, null=-0.7, low_ab=0.08):
    fve = fve or {"aa": 0.52, "ab": 0.40, "ba": 0.45, "bb": 0.50}

    def cell(k):
        var = 0.48 if k[1] == "a" else 0.2
        lo = low_ab if k == "ab" else fve[k] - 0.03
        return {"n": 978, "fve_own": {"value": fve[k], "denominator": "own_set", "var": var,
                                      "ci95_doc_clustered": [lo, fve[k] + 0.03]},
                "shuffled_null_fve_own": null if k == "ab" else -0.7,
                "fve_train": {"value": fve[k], "denominator": "train_set", "var": var + 0.004}}
    headline = {"fve": fve, "ratios": {"a_to_b": fve["ab"] / fve["bb"], "b_to_a": fve["ba"] / fve["aa"]},
                "alignment": {"positions": 999, "aligned": 978, "mean_abs_err_chars": 0.035},
                "var_own": {"a": 0.48, "b": 0.2},
                "families": {"a": {"preset": "mini"}, "b": {"preset": "mini-gemma"}}}
    return summary("cross_family", headline, cells={k: cell(k) for k in fve})


def ridge(text_ab=0.3, text_ba=0.5, ridge_ab=0.2, ridge_ba=0.4):
    rows = [{"key": d, "kind": kind, "n_train_used": n, "fve_own": top * n / 19606 - (0.01 if kind == "rbf" else 0),
             "fve_train": top, "params": {"alpha": 0.1}}
            for d, top in (("a_to_b", ridge_ab), ("b_to_a", ridge_ba)) for n in (1000, 5000, 19606)
            for kind in ("linear", "rbf")]
    return summary("ridge_baseline", {"ridge": rows, "text_route": {"a_to_b": text_ab, "b_to_a": text_ba},
                                      "pairs_train": 19606, "pairs_heldout": 978, "trials": 156})


def drift(av=0.05, ar=0.015, nla=0.013):
    return summary("self_drift", {"drift": {"AV": {"nmse": av, "nmse_ci95": [av * 0.9, av * 1.1], "cos": 0.97},
                                            "AR": {"nmse": ar, "nmse_ci95": [ar * 0.9, ar * 1.1], "cos": 0.99}},
                                  "nla_reconstruction_nmse": nla, "n": 200})


def position(fves=(0.3, 0.5, 0.45), ends=9):
    bins = [{"bin": label, "first_position": i, "n": 20, "n_docs": 8, "nmse": 0.3, "fve": f,
             "fve_ci95": [f - 0.05, f + 0.05], "cos": 0.9} for i, (label, f) in enumerate(zip(("0", "1", "2"), fves))]
    return summary("position_trace", {"layer": 20, "n_docs": 8, "n_positions": 60, "bins": bins,
                                      "fve_denominator": {"name": "train_set (sidecar)", "var": 0.484},
                                      "plateau": {"fve": max(fves), "fve_ci95": [0.4, 0.6], "from_position": 50},
                                      "noise_ends_at_position": ends})


def checkpoints(ref=0.8, dpo=0.78, sft=0.6):
    return summary("checkpoint_transfer", {"checkpoints": {
        "base": {"fve": ref, "cos": 0.99, "drift_nmse": 0.0},
        "dpo": {"fve": dpo, "cos": 0.99, "drift_nmse": 0.01},
        "sft-short": {"fve": (ref + sft) / 2, "cos": 0.98, "drift_nmse": 0.02},
        "sft-long": {"fve": sft, "cos": 0.97, "drift_nmse": 0.05}}})


def answer(before=0.3, names=0.6, other=0.2):
    def rate(r):
        return {"rate": r, "ci95": [None, None], "n": 12}
    per_offset = [{"offset": o, "n": 12, "token": "\\n", "nmse": 0.3, "cos": 0.98, "fve": before + 0.05 * o,
                   "fve_ci95": [before - 0.1, before + 0.1], "names_answer_form": rate(names if o == 0 else 0.0),
                   "names_true_form": rate(0.3), "names_any_form": rate(0.9), "tag_failures": 0} for o in (2, 0, 1)]
    base = [{"form": f, "answers of this form": 2, "named when the answer is it": rate(0.5),
             "named when the answer is another form": rate(other if f != "cos" else None)}
            for f in ("linear", "product", "cos")]
    return summary("answer_decode", {"n_prompts": 12, "offsets": [0, 1, 2], "per_offset": per_offset,
                                     "fve_denominator": {"name": "own_set (every row of this run)", "var": 0.5},
                                     "answer_right_form": rate(0.25), "keyword_base_rates": base})


CASES = [
    ("reproduce_fve", lambda: reproduce(fve=0.50), "reproduced"),
    ("reproduce_fve", lambda: reproduce(fve=0.52, bit=False), "partly"),
    ("reproduce_fve", lambda: reproduce(fve=0.40, null=0.1, bit=None), "partly"),
    ("reproduce_fve", lambda: reproduce(fve=0.30, ci=(0.25, 0.35)), "not reproduced"),
    ("reproduce_fve", lambda: reproduce(fve=0.30) | {"config": {"name": "mini", "pair": "mini:unshipped"}}, "missing"),
    ("quote_ablation", lambda: quotes(switch=245, hatch_free=0.35), "reproduced"),
    ("quote_ablation", lambda: quotes(switch=250, hatch_free=-0.18), "partly"),
    ("quote_ablation", lambda: quotes(switch=100, hatch_free=0.40), "partly"),
    ("quote_ablation", lambda: quotes(switch=50, hatch_free=-0.2), "not reproduced"),
    ("verbatim_runs", lambda: verbatim(0.02, 0.01), "reproduced"),
    ("verbatim_runs", lambda: verbatim(0.20, 0.01), "partly"),
    ("verbatim_runs", lambda: verbatim(0.20, 0.30), "not reproduced"),
    ("redaction", lambda: redaction(), "reproduced"),
    ("redaction", lambda: redaction(fills=(-0.9, -0.5, -0.7, -0.7, -0.7)), "partly"),
    ("redaction", lambda: redaction(spans=0.13, unmarked=0.10), "partly"),
    ("redaction", lambda: redaction(spans=0.45), "not reproduced"),
    ("best_of_n", lambda: best_of_n(0.50, 0.49, 0.01), "reproduced"),
    ("best_of_n", lambda: best_of_n(0.50, 0.485, 0.043), "partly"),
    ("best_of_n", lambda: best_of_n(0.50, 0.40, 0.01), "partly"),
    ("best_of_n", lambda: best_of_n(0.50, 0.40, 0.05), "not reproduced"),
    ("adjacent_layers", lambda: adjacent(0.45, 0.50, 0.46), "reproduced"),
    ("adjacent_layers", lambda: adjacent(0.35, 0.50, 0.32), "partly"),
    ("adjacent_layers", lambda: adjacent(0.45, 0.50, 0.46, bound=False), "not reproduced"),
    ("cross_family", lambda: cross(), "reproduced"),
    ("cross_family", lambda: cross({"aa": 0.52, "ab": 0.135, "ba": 0.39, "bb": 0.43}), "partly"),
    ("cross_family", lambda: cross({"aa": 0.52, "ab": 0.45, "ba": 0.33, "bb": 0.50}), "partly"),
    ("cross_family", lambda: cross(null=0.05), "not reproduced"),
    ("cross_family", lambda: cross(low_ab=-0.02), "not reproduced"),
    ("ridge_baseline", lambda: ridge(0.3, 0.5, 0.2, 0.4), "reproduced"),
    ("ridge_baseline", lambda: ridge(0.3, 0.39, 0.2, 0.6), "partly"),
    ("ridge_baseline", lambda: ridge(0.135, 0.39, 0.318, 0.595), "not reproduced"),
    ("self_drift", lambda: drift(0.05, 0.015, 0.013), "reproduced"),
    ("self_drift", lambda: drift(0.118, 0.051, 0.23), "partly"),
    ("self_drift", lambda: drift(0.05, 0.045, 0.013), "partly"),
    ("self_drift", lambda: drift(0.05, 0.045, 0.2), "not reproduced"),
    ("position_trace", lambda: position((0.3, 0.5, 0.45)), "reproduced"),
    ("position_trace", lambda: position((0.42, 0.5, 0.45)), "partly"),
    ("position_trace", lambda: position((0.49, 0.5, 0.48), ends=None), "not reproduced"),
    ("checkpoint_transfer", lambda: checkpoints(0.8, 0.78, 0.6), "reproduced"),
    ("checkpoint_transfer", lambda: checkpoints(0.8, 0.6, 0.6), "partly"),
    ("checkpoint_transfer", lambda: checkpoints(0.8, 0.79, 0.77), "partly"),
    ("checkpoint_transfer", lambda: checkpoints(0.8, 0.6, 0.79), "not reproduced"),
    ("answer_decode", lambda: answer(0.278, 0.6, 0.2), "reproduced"),        # published FVE 0.517
    ("answer_decode", lambda: answer(0.278, 0.2, 0.2), "partly"),
    ("answer_decode", lambda: answer(0.50, 0.6, 0.2), "partly"),
    ("answer_decode", lambda: answer(0.50, 0.25, 0.2), "not reproduced"),
]


def write_train_refs(results: Path) -> None:
    for fam, fve in (("smollm2-L20", 0.517), ("gemma3-L12", 0.413)):
        d = results / "train_mini_nla" / fam
        d.mkdir(parents=True, exist_ok=True)
        (d / "summary.json").write_text(json.dumps({"job": "train_mini_nla", "heldout": {"fve_own": fve}}))


@pytest.mark.parametrize("job,make,expected", CASES, ids=[f"{c[0]}-{c[2]}-{i}" for i, c in enumerate(CASES)])
def test_verdict_branches(tmp_path, job, make, expected):
    write_train_refs(tmp_path)
    status, sentence = R.judge(R.SPECS_BY_JOB[job], make(), tmp_path, "mini")
    assert (status, bool(sentence)) == (expected, True), sentence
    assert status in R.STATUSES


def test_cases_cover_every_verdict_function():
    seen = {(job, st) for job, _, st in CASES}
    for spec in R.SPECS:
        assert {(spec.job, st) for st in ("reproduced", "partly", "not reproduced")} <= seen, spec.job
    assert ("reproduce_fve", "missing") in seen


def test_absent_key_is_missing_with_the_command(tmp_path):
    s = cross()
    del s["cells"]["ab"]["shuffled_null_fve_own"]
    status, sentence = R.judge(R.SPECS_BY_JOB["cross_family"], s, tmp_path, "mini")
    assert status == "missing"
    assert "cells.ab.shuffled_null_fve_own" in sentence
    assert "python jobs/cross_family.py --preset mini --out results/cross_family/mini" in sentence


def test_combine_presets():
    assert R.combine([("mini", "reproduced", "a"), ("mini-gemma", "reproduced", "b")])[0] == "reproduced"
    assert R.combine([("mini", "reproduced", "a"), ("mini-gemma", "not reproduced", "b")])[0] == "partly"
    assert R.combine([("mini", "missing", "a"), ("mini-gemma", "not reproduced", "b")]) == \
        ("not reproduced", "on mini-gemma: b")
    assert R.combine([("mini", "missing", "a")])[0] == "missing"


def fake_tree(results: Path) -> dict[Path, bytes]:
    """reproduce_fve (mini only, + an extra preset), cross_family and a stale summary from another job."""
    write_train_refs(results)
    pngs = {}
    for job, preset, s in (("reproduce_fve", "mini", reproduce()),
                           ("reproduce_fve", "paper-gemma27b-L41", reproduce(fve=0.77, ci=(0.76, 0.78),
                                                                               preset="paper-gemma27b-L41")),
                           ("cross_family", "mini", cross()),
                           ("answer_decode", "mini", answer()),
                           ("position_trace", "mini", position()),
                           ("self_drift", "mini", quotes())):       # a summary.json of the wrong job
        d = results / job / preset
        d.mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps(s))
        png = tiny_png(3 + len(pngs), 2)
        (d / "figure.png").write_bytes(png)
        pngs[d / "figure.png"] = png
    return pngs


def test_report_from_fake_tree(tmp_path):
    results, out = tmp_path / "results", tmp_path / "out"
    pngs = fake_tree(results)
    md_path, html_path = R.write_report(results, out)
    md, page = md_path.read_text(), html_path.read_text()

    # missing analyses and presets: a "missing — run: <command>" block, and no table in their section
    for job, preset in (("checkpoint_transfer", "mini"),
                        ("reproduce_fve", "mini-gemma"), ("quote_ablation", "mini"), ("self_drift", "mini")):
        cmd = R.SPECS_BY_JOB[job].command(preset)
        assert f"**missing — run:** `{cmd}`" in md, job
        assert f"<b>missing — run:</b> <code>{cmd}</code>" in page, job
    assert "python jobs/verbatim_runs.py --preset mini --decodes results/quote_ablation/mini " \
           "--out results/verbatim_runs/mini" in md
    assert "summary.json is from job 'quote_ablation'" in md
    sections = {m.group(1): m.group(0) for m in re.finditer(r'<section id="([^"]+)">.*?</section>', page, re.S)}
    assert len(sections) == len(R.SPECS)
    assert "<table" not in sections["checkpoint-transfer"] and "missing" in sections["checkpoint-transfer"]
    assert "0.500 [0.400, 0.600]" in sections["position-trace"]
    assert "<table" not in sections["self-drift"]
    assert "0.500 [0.460, 0.540]" in sections["reproduce-fve"]              # ours, from the headline
    assert "paper-gemma27b-L41" in sections["reproduce-fve"]                  # a preset beyond mini/mini-gemma
    assert "own-set Var: 0.480, 0.200" in sections["cross-family"]
    assert "training-set Var: 0.484, 0.204" in sections["cross-family"]
    assert "c0ffee1" in sections["cross-family"] and "CPU (2 cores)" in sections["cross-family"]
    assert "own-set Var: 0.500" in sections["answer-decode"] and "badge reproduced" in sections["answer-decode"]

    assert "{'" not in md and "{&#x27;" not in page                          # no raw dicts in a cell

    # the headline strip: one row per analysis, computed statuses
    strip = page.split('<table class="strip">', 1)[1].split("</table>", 1)[0]
    assert strip.count("<tr>") == len(R.SPECS) + 1
    assert re.search(r"fine-tuned checkpoints</a></td><td>[^<]*</td><td>missing</td>", strip)
    assert re.search(r"Cross-family transfer</a>.*?badge reproduced", strip)
    assert ("| §1 | [FVE reproduction](#reproduce-fve) | FVE · the pair's published FVE | "
            "0.500 · 0.517 (mini) · 0.770 · 0.763 (paper-gemma27b-L41) · mini-gemma: missing | "
            "0.752 · 0.752 (Qwen2.5-7B L20) · 0.775 · 0.763 (Gemma-3-27B L41) | **reproduced** |") in md

    # self-contained: no external references; every image an embedded PNG data URI of a job's figure
    assert "http://" not in page and "https://" not in page
    assert "<link" not in page and "<script" not in page and 'src="file' not in page
    srcs = re.findall(r'src="([^"]*)"', page)
    assert len(srcs) == len(pngs) - 1 and all(s.startswith("data:image/png;base64,") for s in srcs)
    embedded = {base64.b64decode(s.split(",", 1)[1]) for s in srcs}
    assert embedded == {b for p, b in pngs.items() if "self_drift" not in str(p)}
    # markdown links the figures relative to the report
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (out / link).resolve().read_bytes() in pngs.values()


def test_cli_and_job_wrapper(tmp_path):
    from nla_ray import cli

    results = tmp_path / "results"
    fake_tree(results)
    assert cli.main(["report", "--results", str(results), "--out", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "report.html").is_file() and (tmp_path / "a" / "REPORT.md").is_file()
    r = subprocess.run([sys.executable, str(REPO / "jobs" / "report.py"), "--results", str(results),
                        "--out", str(tmp_path / "rec0")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert (results / "REPORT.md").read_text() == (tmp_path / "a" / "REPORT.md").read_text().replace(
        "../results/", "")
    # The job contract: --preset is a preset the report must cover (shown missing with its command);
    # arguments that mean nothing to a report are refused, naming why.
    r = subprocess.run([sys.executable, str(REPO / "jobs" / "report.py"), "--results", str(results),
                        "--report-dir", str(tmp_path / "b"), "--preset", "paper-qwen7b-L20",
                        "--out", str(tmp_path / "rec")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "--preset paper-qwen7b-L20" in (tmp_path / "b" / "REPORT.md").read_text()
    rec = json.loads((tmp_path / "rec" / "summary.json").read_text())
    assert rec["job"] == "report" and sum(rec["headline"]["verdicts"].values()) == 12
    r = subprocess.run([sys.executable, str(REPO / "jobs" / "report.py"), "--results", str(results),
                        "--set", "seed=1", "--out", str(tmp_path / "c")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--set does not apply to report" in r.stderr


def test_readme_strip_is_replaced_between_markers_only(tmp_path):
    from nla_ray.report_page import STRIP_END, STRIP_START, update_readme_strip

    readme = tmp_path / "README.md"
    readme.write_text(f"# x\nintro\n{STRIP_START}\nstale\n{STRIP_END}\n## Two commands\nkeep\n", encoding="utf-8")
    report = ("# r\n\n**2 analyses: 1 reproduced · 1 missing**\n\nprose\n\n| § | analysis |\n|---|---|\n"
              "| §1 | [FVE](#reproduce-fve) |\n\n## §1\n| not | strip |\n")
    assert update_readme_strip(readme, report)
    text = readme.read_text(encoding="utf-8")
    assert "stale" not in text and "## Two commands\nkeep\n" in text and text.startswith("# x\nintro\n")
    assert "**2 analyses: 1 reproduced · 1 missing**" in text
    assert "[FVE](results/REPORT.md#reproduce-fve)" in text and "| not | strip |" not in text
    readme.write_text("no markers\n", encoding="utf-8")
    assert not update_readme_strip(readme, report) and readme.read_text(encoding="utf-8") == "no markers\n"
