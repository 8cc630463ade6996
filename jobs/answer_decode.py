"""Can the NLA read the answer before the model writes it? Explanations just before a symbolic-regression answer.

The seed exploration's prompt (`prompt_from_dataset`: 24 rows `x0, x1 → y`, "Answer with exactly one
line") is generated from seeded datasets of a small family of equation forms (linear, product,
quadratic, sin, exp, cos; nla_ray/analysis/answer.py). Each prompt goes to the base model as a user
turn (chat template, generation prompt); the model's greedy answer is generated, and its layer-K
residuals at the last token before the answer and `--offsets` tokens before it go through the AV and
AR pools. Reported: FVE / NMSE / cos per offset (document = prompt, clustered CIs), how often the
explanation names the answer's form and the true form (a stated keyword matcher per form), against
how often it names that form when the answer has another form, and how often the answer itself has
the right form.

  python jobs/answer_decode.py --preset mini --n-prompts 12 --offsets 0,1,2,4,8
"""

from __future__ import annotations

import hashlib
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `ray job submit` working dirs

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from nla_ray.analysis import answer as A  # noqa: E402
from nla_ray.core import metrics  # noqa: E402
from nla_ray.core.table import column, scored, vectors  # noqa: E402
from nla_ray.jobkit import FVE_LEGEND, Context, Job, Result, Table, UserError, ci_str  # noqa: E402

DEFAULT_N_PROMPTS = 12
DEFAULT_OFFSETS = "0,1,2,4,8"
DEFAULT_ANSWER_TOKENS = 64


def add_args(p) -> None:
    p.add_argument("--n-prompts", type=int, default=DEFAULT_N_PROMPTS,
                   help=f"prompts, cycling over the forms (default {DEFAULT_N_PROMPTS})")
    p.add_argument("--offsets", default=DEFAULT_OFFSETS,
                   help=f"tokens before the answer to explain, 0 = the last prompt token (default {DEFAULT_OFFSETS})")
    p.add_argument("--forms", default=",".join(A.FORMS), help=f"equation forms (default {','.join(A.FORMS)})")
    p.add_argument("--answer-tokens", type=int, default=DEFAULT_ANSWER_TOKENS,
                   help=f"most tokens of the model's greedy answer (default {DEFAULT_ANSWER_TOKENS})")


JOB = Job("answer_decode", __doc__, add_args=add_args)


def _ints(text: str, what: str) -> list[int]:
    try:
        vals = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise UserError(f"{what} {text!r}: expected comma-separated integers") from None
    if not vals or vals[0] < 0:
        raise UserError(f"{what} {text!r}: expected integers >= 0")
    return vals


def _rate_str(r: dict) -> str:
    return "n/a" if r["rate"] is None else f"{r['rate']:.2f} {ci_str(r['ci95'])}"


@JOB.main
def run(ctx: Context) -> Result:
    from nla_ray.nla.corpora import Document
    from nla_ray.runtime.stages import answer_spec, ar_spec, av_spec

    a, cfg = ctx.args, ctx.cfg
    offsets = _ints(a.offsets, "--offsets")
    forms = [f.strip() for f in a.forms.split(",") if f.strip()]
    bad = [f for f in forms if f not in A.FORMS]
    if bad or not forms:
        raise UserError(f"--forms: unknown form(s) {bad}; forms are {list(A.FORMS)}")
    if a.n_prompts < 1 or a.answer_tokens < 1:
        raise UserError("--n-prompts and --answer-tokens must be >= 1")
    prompts = A.prompt_set(a.n_prompts, cfg.seed, forms)
    meta = {p["prompt_id"]: p for p in prompts}
    docs = [Document(doc_id=p["prompt_id"], text=p["prompt"], source="answer_decode") for p in prompts]
    dirs = ctx.pair(cfg)
    stages = [answer_spec(cfg, offsets=offsets, max_new_tokens=a.answer_tokens), av_spec(cfg, dirs.av),
              ar_spec(cfg, dirs.ar)]
    # the generator is part of what the rows depend on (a prompt's id names only its form and index)
    gen = hashlib.sha256("\n".join(p["prompt"] for p in A.prompt_set(len(A.FORMS), cfg.seed)).encode()).hexdigest()
    rows = scored(ctx.limit(ctx.run("", stages, docs, extra_fp={"prompt_generator": gen})))
    if rows.num_rows == 0:
        raise UserError("no rows came back")
    scale = ctx.meta(cfg).mse_scale

    pid = column(rows, "doc_id")
    off = column(rows, "offset").astype(int)
    nm, cs = column(rows, "nmse").astype(float), column(rows, "cos").astype(float)
    status = rows.column("status").to_pylist()
    expl = [e if s != "no_open_tag" else r for e, s, r in zip(rows.column("explanation").to_pylist(), status,
                                                               rows.column("av_text").to_pylist())]
    answers = rows.column("answer").to_pylist()
    true_form = [meta[p]["form"] for p in pid]
    ans_form = [A.answer_form(x) for x in answers]
    named = [A.named_forms(e) for e in expl]
    names_ans = np.array([f in n for f, n in zip(ans_form, named)])
    names_true = np.array([f in n for f, n in zip(true_form, named)])
    names_any = np.array([bool(n) for n in named])
    var = ctx.var_train(cfg)
    var_name = "train_set (preset var_train, else the AR sidecar's eval.var_train)"
    if var is None:
        var, var_name = metrics.variance_baseline(vectors(rows, "vector"), scale), "own_set (every row of this run)"
    nb, sd = cfg.bootstrap, cfg.seed

    per_offset = []
    for o in sorted(set(off.tolist())):
        m = off == o
        if len(set(pid[m].tolist())) >= 2:
            lo, hi, _ = metrics.fve_ci(nm[m], pid[m], var, n_boot=nb, seed=sd)
        else:
            lo = hi = float("nan")
        per_offset.append({
            "offset": int(o), "n": int(m.sum()),
            "token": Counter(rows.column("token").to_pylist()[i] for i in np.nonzero(m)[0]).most_common(1)[0][0],
            "nmse": float(nm[m].mean()), "cos": float(cs[m].mean()), "fve": float(1 - nm[m].mean() / var),
            "fve_ci95": [float(lo), float(hi)],
            "names_answer_form": A.rate(names_ans[m], pid[m], n_boot=nb, seed=sd),
            "names_true_form": A.rate(names_true[m], pid[m], n_boot=nb, seed=sd),
            "names_any_form": A.rate(names_any[m], pid[m], n_boot=nb, seed=sd),
            "tag_failures": int(sum(status[i] != "ok" for i in np.nonzero(m)[0]))})

    # one line per prompt: its answer (the same on every offset's row)
    first = {}
    for i, p in enumerate(pid.tolist()):
        first.setdefault(p, i)
    order = list(first)
    right = np.array([ans_form[first[p]] == true_form[first[p]] for p in order])
    answer_right = A.rate(right, np.array(order, dtype=object), n_boot=nb, seed=sd)
    by_form = []
    o0 = off == offsets[0]
    for f in forms:
        ps = [p for p in order if meta[p]["form"] == f]
        if not ps:
            continue
        m = o0 & np.isin(pid, ps)
        by_form.append({"form": f, "prompts": len(ps),
                        "answer has this form": float(np.mean([ans_form[first[p]] == f for p in ps])),
                        "answer forms": ", ".join(f"{k} {v}" for k, v in
                                                  Counter(ans_form[first[p]] for p in ps).most_common()),
                        f"explanation (offset {offsets[0]}) names it":
                            float(names_true[m].mean()) if m.any() else None})
    # keyword base rates at the first offset: names form f when the answer is f, and when it is not
    base_rates = []
    for f in A.FORMS:
        says = np.array([f in n for n in named])
        is_f = np.array([x == f for x in ans_form])
        base_rates.append({"form": f, "answers of this form": int((o0 & is_f).sum()),
                           "named when the answer is it": A.rate(says[o0 & is_f], pid[o0 & is_f], n_boot=nb, seed=sd),
                           "named when the answer is another form": A.rate(says[o0 & ~is_f], pid[o0 & ~is_f],
                                                                          n_boot=nb, seed=sd)})

    fig = A.figure(per_offset, ctx.figure("answer_decode.png"),
                   f"{cfg.name}: layer-{cfg.layer} pair before the model's answer ({len(order)} prompts)")
    rows = rows.append_column("form", pa.array(true_form, pa.string())) \
        .append_column("equation", pa.array([meta[p]["equation"] for p in pid], pa.string())) \
        .append_column("answer_form", pa.array(ans_form, pa.string())) \
        .append_column("named_forms", pa.array([",".join(n) for n in named], pa.string()))
    examples = []
    for p in order[: min(6, len(order))]:
        i = next(j for j in range(len(pid)) if pid[j] == p and off[j] == offsets[0])
        said = " ".join(answers[i].split())
        said = said if len(said) <= 100 else said[:99] + "…"
        examples.append({"context": f"true {meta[p]['equation']}; the model answered: {said}",
                         "explanation": expl[i], "offset": int(off[i]), "answer form": ans_form[i],
                         "named forms": ",".join(named[i]) or "-", "nmse": float(nm[i]),
                         "fve": float(1 - nm[i] / var)})
    t_off = [{"offset": r["offset"], "token": repr(r["token"]), "n": r["n"], "NMSE": r["nmse"], "cos": r["cos"],
              "FVE": r["fve"], "95% CI": ci_str(r["fve_ci95"]),
              "names answer's form": _rate_str(r["names_answer_form"]),
              "names true form": _rate_str(r["names_true_form"]), "names any form": _rate_str(r["names_any_form"]),
              "tag failures": r["tag_failures"]} for r in per_offset]
    t_base = [{"form": r["form"], "answers of this form": r["answers of this form"],
               "named when the answer is it": _rate_str(r["named when the answer is it"]),
               "named when the answer is another form": _rate_str(r["named when the answer is another form"])}
              for r in base_rates]
    return Result(
        headline={"n_prompts": len(order), "offsets": offsets, "forms": forms, "fve_denominator": {"name": var_name,
                  "var": var}, "answer_right_form": answer_right,
                  "answer_forms": dict(Counter(ans_form[first[p]] for p in order)), "per_offset": per_offset,
                  "by_true_form": by_form, "keyword_base_rates": base_rates},
        figures=[fig], rows=rows, examples=examples,
        tables=[Table(f"Before the answer, by offset (denominator: {var_name}, Var {var:.4g}; seed, Gemma-27B L41 "
                      "on its one prompt at offset 0: cos ~0.979, FVE ~0.278)", t_off, list(t_off[0])),
                Table(f"The model's answers by true form (answer has the right form: {_rate_str(answer_right)})",
                      by_form, list(by_form[0])),
                Table(f"Does the explanation (offset {offsets[0]}) name a form more when the answer has it?",
                      t_base, list(t_base[0]))],
        legend=FVE_LEGEND + " Here a document is one prompt; offset 0 is the last token before the answer (the chat "
        "template's newline after the assistant marker), offset k is k tokens earlier. The answer's form is the "
        "first of sin, exp, cos, quadratic (a power ≥ 2), other, product (x0·x1), linear whose pattern appears in "
        "the expression after 'y =' (else the answer's first line, unless that is prose: 'none'); 'echo' = the "
        "answer repeats the prompt. An explanation names a form "
        "when that form's keyword pattern matches (nla_ray/analysis/answer.py FORM_KEYWORDS: e.g. linear/slope, "
        "product/multiply, quadratic/squared/^2, sin/sine, exp/exponential, cos/cosine; not 'line', 'square', "
        "'polynomial'). Compare 'named when the answer is it' with 'named when the answer is another form': a "
        "form the explanation names regardless of the answer is not a read-out of the answer.")


if __name__ == "__main__":
    JOB.run_cli()
