"""The seed exploration's jobs (issue #12): token-position traces and decoding before an answer.

Pure parts first (the seed's prompt character for character, the position bins against a hand-computed
curve, the form matchers, the every-position rule), then both jobs end to end on the tiny families
(random decoders, real tokenizers, local Ray), like tests/test_text_jobs.py.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest

from nla_ray.analysis import answer as A
from nla_ray.analysis import positions as P
from nla_ray.nla.extract import every_position

# The seed's table exactly as the seed shows it: mid-line minus signs are U+2212 there (typography; the
# prompt's `{x:+.4f}` writes ASCII '-', as the seed's line-start signs show).
SEED_TABLE = """\
+0.7294, \u22121.7847 \u2192 \u22120.498694
-1.1186, \u22121.2625 \u2192 +1.509737
-1.2964, +1.2484 \u2192 +1.972745
+1.6934, \u22120.8937 \u2192 +3.933863
+1.2790, +1.5596 \u2192 +1.163951
+0.0519, \u22121.0201 \u2192 +0.810805
+1.2970, \u22121.1449 \u2192 +2.214855
+0.9659, +0.5198 \u2192 +2.602746
+1.7096, \u22121.0724 \u2192 +3.617947
+1.1965, +0.0727 \u2192 +3.425017
-1.0738, \u22121.3364 \u2192 +1.233677
-0.0088, +0.3309 \u2192 +1.864455
-1.2626, \u22121.9404 \u2192 +0.191118
-0.1155, +0.9130 \u2192 +1.041822
+1.6744, +0.5021 \u2192 +4.495013
+1.6685, +1.4588 \u2192 +2.563363
-1.1274, +1.4645 \u2192 +1.036312
+0.9230, \u22120.8885 \u2192 +1.928310
+1.1882, +1.4609 \u2192 +1.185979
-0.8022, +0.1082 \u2192 +2.628991
-1.7141, +0.3330 \u2192 +4.800680
-1.0484, +1.0599 \u2192 +1.821586
-1.3055, \u22120.7490 \u2192 +3.035134
-1.9421, \u22121.8698 \u2192 +2.535358"""

# The seed's prompt_from_dataset around the table, its string pieces joined as Python joins them.
SEED_HEAD = ("A hidden equation generated these noiseless samples. Variables are x0 and x1.\n"
             "Infer the simplest symbolic equation for y. Use operators +, -, *, /, powers, and cos if useful.\n\n")
SEED_TAIL = "\n\nAnswer with exactly one line in this format:\ny = <expression using x0 and x1>"


def _seed_dataset() -> dict:
    xs, ys = [], []
    for line in SEED_TABLE.replace("\u2212", "-").splitlines():
        left, y = line.split(" \u2192 ")
        x0, x1 = left.split(", ")
        xs.append((float(x0), float(x1)))
        ys.append(float(y))
    return {"train_x": xs, "train_y": ys}


def test_prompt_reproduces_the_seed_character_for_character():
    ds = _seed_dataset()
    assert len(ds["train_x"]) == 24
    prompt = A.prompt_from_dataset(ds)
    assert prompt == SEED_HEAD + SEED_TABLE.replace("\u2212", "-") + SEED_TAIL
    lines = prompt.split("\n")
    assert lines[0] == "A hidden equation generated these noiseless samples. Variables are x0 and x1."
    assert lines[-2:] == ["Answer with exactly one line in this format:", "y = <expression using x0 and x1>"]
    assert all(" \u2192 " in ln for ln in lines[3:27]) and lines[2] == lines[27] == ""
    # n_rows cuts the table; more rows than given is the seed's strict zip
    assert A.prompt_from_dataset(ds, n_rows=2).count("\u2192") == 2
    with pytest.raises(ValueError):
        A.prompt_from_dataset({"train_x": ds["train_x"], "train_y": ds["train_y"][:3]})


def test_generated_datasets_follow_their_equation():
    for form in A.FORMS:
        ds = A.make_dataset(form, seed=42, index=3)
        assert ds == A.make_dataset(form, seed=42, index=3) and ds != A.make_dataset(form, seed=43, index=3)
        expr = ds["equation"].removeprefix("y = ")
        env = {"sin": math.sin, "cos": math.cos, "exp": math.exp}
        for (x0, x1), y in zip(ds["train_x"], ds["train_y"]):
            assert round(x0, 4) == x0 and -2 <= x0 <= 2
            assert eval(expr, env, {"x0": x0, "x1": x1}) == pytest.approx(y, abs=1e-12)
        assert A.answer_form(ds["equation"]) == form  # the matcher reads our own equations right
        assert A.prompt_from_dataset(ds).startswith(SEED_HEAD) and A.prompt_from_dataset(ds).endswith(SEED_TAIL)
    ps = A.prompt_set(8, seed=42)
    assert [p["form"] for p in ps] == list(A.FORMS) + list(A.FORMS[:2])
    assert len({p["prompt_id"] for p in ps}) == 8 and ps[0]["prompt_id"] == "p0000-linear"


@pytest.mark.parametrize("answer,form", [
    ("y = 2*x0 + 3*x1 - 1", "linear"), ("y = -x1", "linear"), ("y = 1.5*x0*x1 + 2", "product"),
    ("y=2x0x1+1", "product"), ("The answer is y = x0 * x1", "product"), ("y = x0**2 + x1", "quadratic"),
    ("y = x0^2 - x1", "quadratic"), ("y = x0\u00b2", "quadratic"), ("y = 3*sin(x0) + x1", "sin"),
    ("y = np.exp(x0) - 2", "exp"), ("y = e^x0", "exp"), ("y = 2*cos(x1) + x0", "cos"), ("y = x0/x1", "other"),
    ("y = sqrt(x0) + 1", "other"), ("y = 3.5", "none"), ("y = <expression using x0 and x1>", "echo"),
    ("y = x0 \u2212 x1", "linear"), ("y = x0**2 + sin(x1)", "sin"), ("x0 + 2*x1", "linear"),
    ("2*sin(x0)", "sin"), ("The function grows with x0", "none"), ("y = 1.2444 + 1.7975\n\nThe answer is: 1", "none"),
    ("A hidden equation generated these noiseless samples. Variables are x0 and x1.", "echo"),
])
def test_answer_form(answer, form):
    assert A.answer_form(answer) == form


def test_explanation_keyword_matcher():
    assert A.named_forms("a best-fit linear model with slope 1.5") == ["linear"]
    assert A.named_forms("the product of x0 and x1") == ["product"]
    assert A.named_forms("x0 squared plus a parabola") == ["quadratic"]
    assert A.named_forms("y = x0^2") == ["quadratic"]
    assert A.named_forms("A sine wave; SIN(x0)") == ["sin"]
    assert A.named_forms("exponential growth") == ["exp"]
    assert A.named_forms("a cosine term") == ["cos"]
    # words the prompt or generic regression talk bring in name no form
    assert A.named_forms("Answer with exactly one line; least squares; a polynomial; multiple data points; "
                         "using a single answer") == []
    assert A.named_forms(None) == []
    assert A.named_forms("linear or exponential") == ["linear", "exp"]


def test_position_bins_and_curve_by_hand():
    cases = {0: "0", 1: "1", 2: "2", 3: "3-4", 4: "3-4", 5: "5-8", 8: "5-8", 9: "9-16", 16: "9-16", 17: "17-32",
             32: "17-32", 33: "33-64", 64: "33-64", 65: "65-128", 128: "65-128", 129: "129-256", 512: "257-512"}
    for p, label in cases.items():
        assert P.bin_label(P.bin_index(p)) == label, p
    for k in range(12):  # bins tile the positions: each starts where the last ended
        assert P.bin_bounds(k + 1)[0] == P.bin_bounds(k)[1] + 1
    pos = [0, 0, 1, 3, 4, 50, 60]
    nm = [1.0, 0.5, 0.4, 0.2, 0.3, 0.1, 0.1]
    docs = ["a", "b", "a", "a", "b", "a", "b"]
    curve = P.fve_curve(pos, nm, docs, 0.5, ok=[True, False, True, True, True, True, True], n_boot=200)
    assert [c["bin"] for c in curve] == ["0", "1", "3-4", "33-64"]
    assert [c["n"] for c in curve] == [2, 1, 2, 2] and [c["n_docs"] for c in curve] == [2, 1, 2, 2]
    # FVE = 1 - mean NMSE / 0.5: bin 0 mean 0.75, bin 1 0.4, bin 3-4 0.25, bin 33-64 0.1
    assert [c["fve"] for c in curve] == pytest.approx([-0.5, 0.2, 0.5, 0.8])
    assert curve[0]["tag_failures"] == 1 and curve[2]["mean_position"] == 3.5
    assert math.isnan(curve[1]["fve_ci95"][0])  # one document: no CI
    lo, hi = curve[0]["fve_ci95"]
    assert -1.0 - 1e-9 <= lo <= -0.5 <= hi <= 0.0 + 1e-9  # resampling documents a, b: means 1.0 / 0.75 / 0.5
    plat = P.plateau(pos, nm, docs, 0.5, n_boot=200)
    assert plat["fve"] == pytest.approx(0.8) and plat["n"] == 2 and plat["from_position"] == 50
    assert P.noise_ends(curve, plat["fve"], 0.35)["bin"] == "3-4"        # 0.5 >= 0.45 and 0.8 >= 0.45
    assert P.noise_ends(curve, plat["fve"], 0.05)["bin"] == "33-64"
    dip = curve[:3] + [dict(curve[2], bin="65-128", fve=0.1)]
    assert P.noise_ends(dip, 0.8, 0.35) is None                           # the last bin is below: never settles
    with pytest.raises(ValueError):
        P.plateau([0, 1], [0.1, 0.1], ["a", "a"], 0.5)


def test_every_position_rule_and_store_guard():
    ids = [7] * 40
    assert every_position(ids, []) == list(range(40))
    assert every_position(ids, [], max_position=30, stride=5) == list(range(16)) + [16, 21, 26]
    assert every_position([1] + ids, [1], max_position=3) == [1, 2, 3]            # <bos> skipped
    assert every_position(ids, [], max_position=100, stride=1, dense=4) == list(range(40))
    with pytest.raises(ValueError):
        every_position(ids, [], stride=0)
    from types import SimpleNamespace

    from nla_ray.runtime.stages import extract_spec
    from nla_ray.runtime.store import key_for

    cfg = SimpleNamespace(pools={"extract": SimpleNamespace(dtype="auto", num_gpus=0)}, base="x", layers=[2], seed=1,
                          positions_per_doc=5, max_length=64)
    assert "positions" not in extract_spec(cfg).kwargs  # stage-0 extractions keep their fingerprints
    spec = extract_spec(cfg, positions="every", max_position=10, stride=2)
    assert spec.kwargs["positions"] == "every" and spec.kwargs["stride"] == 2
    with pytest.raises(ValueError, match="stage-0"):
        key_for(spec)


# ---------------------------------------------------------------------------------------------
# the jobs end to end on the tiny families


@pytest.mark.ray
def test_position_trace_every_position_curve_and_trace_file(tiny_families, load_job):
    from test_text_jobs import run_job

    tmp, preset = tiny_families
    out = tmp / "positions"
    text = "The central bank raised rates on Thursday."
    args = ["--preset", str(preset), "--out", str(out), "--n-docs", "2", "--max-position", "60", "--stride", "8",
            "--text", text, "--tolerance", "0.1"]
    assert run_job(load_job, "position_trace", args) == 0
    s = json.loads((out / "summary.json").read_text())
    h = s["headline"]
    assert {"bins", "plateau", "noise_ends", "noise_ends_at_position", "fve_denominator", "n_docs", "n_positions",
            "texts", "stage0_min_position"} <= set(h)
    # SmolLM2's tokenizer adds no special token to raw text: positions 0..15, then 16, 24, ..., 56 per document
    want = list(range(16)) + [16, 24, 32, 40, 48, 56]
    rows = pq.read_table(out / "rows.parquet")
    assert h["n_docs"] == 2 and h["n_positions"] == rows.num_rows == 2 * len(want)
    for d in set(rows.column("doc_id").to_pylist()):
        assert sorted(p for p, x in zip(rows.column("position").to_pylist(), rows.column("doc_id").to_pylist())
                      if x == d) == want
    assert [b["bin"] for b in h["bins"]] == ["0", "1", "2", "3-4", "5-8", "9-16", "17-32", "33-64"]
    assert sum(b["n"] for b in h["bins"]) == rows.num_rows and h["bins"][-1]["n"] == 2 * 3  # 40, 48, 56
    assert h["plateau"]["n"] == 2 * 1 and h["plateau"]["from_position"] == 50                  # 56 only
    assert h["fve_denominator"]["name"].startswith("own_set")  # the tiny pair records no var_train
    assert h["noise_ends"] is None or h["noise_ends"]["bin"] in [b["bin"] for b in h["bins"]]
    assert (out / "position_trace.png").stat().st_size > 0
    # the trace file: the trace format, one line per token of the text, explanations not cut
    lines = (out / "traces.txt").read_text().splitlines()
    assert lines[0] == "== text-0" and lines[1].split()[:5] == ["pos", "token", "nmse", "cos", "fve"]
    n_tok = h["texts"]["n_tokens"]
    assert lines[-1].startswith(f"-- {n_tok} tokens") and len(lines) == n_tok + 3 and n_tok >= 8


@pytest.mark.ray
def test_answer_decode_offsets_answers_and_rates(tiny_families, load_job):
    from test_text_jobs import run_job

    tmp, preset = tiny_families
    out = tmp / "answers"
    args = ["--preset", str(preset), "--out", str(out), "--n-prompts", "4", "--offsets", "0,1,3",
            "--answer-tokens", "6"]
    assert run_job(load_job, "answer_decode", args) == 0
    s = json.loads((out / "summary.json").read_text())
    h = s["headline"]
    assert {"n_prompts", "offsets", "answer_right_form", "answer_forms", "per_offset", "by_true_form",
            "keyword_base_rates", "fve_denominator"} <= set(h)
    assert h["n_prompts"] == 4 and h["offsets"] == [0, 1, 3]
    assert [r["offset"] for r in h["per_offset"]] == [0, 1, 3] and all(r["n"] == 4 for r in h["per_offset"])
    assert h["per_offset"][0]["token"] == "\n"  # ChatML's generation prompt ends "<|im_start|>assistant\n"
    assert sum(h["answer_forms"].values()) == 4 and h["answer_right_form"]["n"] == 4
    assert [r["form"] for r in h["by_true_form"]] == list(A.FORMS[:4])
    assert [r["form"] for r in h["keyword_base_rates"]] == list(A.FORMS)
    rows = pq.read_table(out / "rows.parquet")
    assert rows.num_rows == 12
    pos, n_prompt, offs = (np.asarray(rows.column(c).to_pylist()) for c in ("position", "prompt_tokens", "offset"))
    assert (pos == n_prompt - 1 - offs).all()
    answers = {}
    for d, ans in zip(rows.column("doc_id").to_pylist(), rows.column("answer").to_pylist()):
        answers.setdefault(d, set()).add(ans)
    assert len(answers) == 4 and all(len(v) == 1 for v in answers.values())  # one answer per prompt
    assert set(rows.column("form").to_pylist()) == set(A.FORMS[:4])
    assert (out / "answer_decode.png").stat().st_size > 0
    # the same command again resumes: every prompt is already finished
    assert run_job(load_job, "answer_decode", args) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["run"]["arms"]["main"]["docs_skipped_done"] == 4
    assert again["headline"]["per_offset"] == h["per_offset"]
