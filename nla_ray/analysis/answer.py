"""Decoding before an answer: the seed exploration's symbolic-regression prompt, seeded datasets from
a small family of equation forms, and two stated matchers — the form of an answer expression, and
which forms an explanation names.

The prompt is the seed's `prompt_from_dataset`, character for character as the seed shows it. Two
things in the seed are typography, not the prompt: its curly quotes are the code's string quotes,
and its table shows U+2212 for minus signs in mid-line (`{x:+.4f}` writes ASCII '-', as the seed's
line-start minus signs show). The row arrow is U+2192 as the seed shows it (`ARROW`); the seed's page
also shows the signature's `->` as an arrow, so the original code may have had `->` there too.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from typing import Any, Sequence

import numpy as np

__all__ = ["ARROW", "FORMS", "FORM_PRECEDENCE", "FORM_KEYWORDS", "prompt_from_dataset", "make_dataset",
           "prompt_set", "answer_form", "named_forms", "rate", "figure"]

ARROW = "\u2192"

# The forms prompts are generated from (cycled in this order over prompt indices).
FORMS = ("linear", "product", "quadratic", "sin", "exp", "cos")

# y = f(x0, x1): the expression (coefficients a, b, c filled in) and its value.
_TEMPLATES = {
    "linear": (("a", "x0"), ("b", "x1"), ("c", "")),
    "product": (("a", "x0*x1"), ("c", "")),
    "quadratic": (("a", "x0**2"), ("b", "x1"), ("c", "")),
    "sin": (("a", "sin(x0)"), ("b", "x1"), ("c", "")),
    "exp": (("a", "exp(x0)"), ("b", "x1"), ("c", "")),
    "cos": (("a", "cos(x1)"), ("b", "x0"), ("c", "")),
}
_TERM_VALUE = {"x0": lambda x0, x1: x0, "x1": lambda x0, x1: x1, "x0*x1": lambda x0, x1: x0 * x1,
               "x0**2": lambda x0, x1: x0 * x0, "sin(x0)": lambda x0, x1: math.sin(x0),
               "exp(x0)": lambda x0, x1: math.exp(x0), "cos(x1)": lambda x0, x1: math.cos(x1),
               "": lambda x0, x1: 1.0}
_SLOPES = (-3.0, -2.5, -2.0, -1.5, -1.0, -0.5, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0)
_OFFSETS = (-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0)


def prompt_from_dataset(dataset: dict[str, Any], n_rows: int = 24) -> str:
    """The seed's prompt: 24 rows `x0, x1 → y`, its instructions, 'Answer with exactly one line'."""
    rows = []
    for (x0, x1), y in zip(dataset["train_x"][:n_rows], dataset["train_y"][:n_rows], strict=True):
        rows.append(f"{x0:+.4f}, {x1:+.4f} {ARROW} {y:+.6f}")
    table = "\n".join(rows)
    return (
        "A hidden equation generated these noiseless samples. Variables are x0 and x1.\n"
        "Infer the simplest symbolic equation for y. Use operators +, -, *, /, powers, "
        "and cos if useful.\n\n"
        f"{table}\n\n"
        "Answer with exactly one line in this format:\n"
        "y = <expression using x0 and x1>"
    )


def _equation(terms: Sequence[tuple[float, str]]) -> str:
    out = ""
    for k, (coef, term) in enumerate(t for t in terms if t[0] != 0):
        mag = abs(coef)
        body = (f"{mag:g}*{term}" if mag != 1 else term) if term else f"{mag:g}"
        out += (("-" if coef < 0 else "") + body) if k == 0 else ((" - " if coef < 0 else " + ") + body)
    return "y = " + (out or "0")


def make_dataset(form: str, seed: int, index: int = 0, n_rows: int = 24) -> dict:
    """`n_rows` noiseless samples of one equation of `form` (coefficients and x's drawn from an RNG
    seeded by sha256 of (seed, form, index)); x's uniform in [-2, 2] rounded to the 4 decimals the
    prompt shows, y computed from the rounded x's."""
    if form not in _TEMPLATES:
        raise ValueError(f"unknown equation form {form!r}; forms: {list(FORMS)}")
    rng = random.Random(hashlib.sha256(f"{seed}|{form}|{index}".encode()).digest())
    coefs = {"a": rng.choice(_SLOPES), "b": rng.choice(_SLOPES), "c": rng.choice(_OFFSETS)}
    terms = [(coefs[name], term) for name, term in _TEMPLATES[form]]
    xs, ys = [], []
    for _ in range(n_rows):
        x0, x1 = round(rng.uniform(-2, 2), 4), round(rng.uniform(-2, 2), 4)
        xs.append((x0, x1))
        ys.append(sum(c * _TERM_VALUE[t](x0, x1) for c, t in terms))
    return {"train_x": xs, "train_y": ys, "form": form, "equation": _equation(terms),
            "coefficients": {k: coefs[k] for k, _ in _TEMPLATES[form]}}


def prompt_set(n_prompts: int, seed: int, forms: Sequence[str] = FORMS) -> list[dict]:
    """Prompt i uses form forms[i % len(forms)]: {prompt_id, index, form, equation, prompt}."""
    out = []
    for i in range(int(n_prompts)):
        form = forms[i % len(forms)]
        ds = make_dataset(form, seed, i)
        out.append({"prompt_id": f"p{i:04d}-{form}", "index": i, "form": form, "equation": ds["equation"],
                    "prompt": prompt_from_dataset(ds)})
    return out


# -- the form of an answer ------------------------------------------------------------------------

# Precedence: the first form (or "other") whose pattern appears in the normalised expression.
FORM_PRECEDENCE = ("sin", "exp", "cos", "quadratic", "other", "product", "linear")
_ANSWER_PATTERNS = {
    "sin": r"(?<![a-z])sin(?![a-wyz])",
    "exp": r"(?<![a-z])exp(?![a-wyz])|(?<![a-z])e\^",
    "cos": r"(?<![a-z])cos(?![a-wyz])",
    "quadratic": r"x[01]\)?\^\(?[2-9]|x0\*x0|x1\*x1",              # any power >= 2 of a variable
    "other": r"sqrt|(?<![a-z])(log|ln|tan|abs)|/\(?[-+.\d]*\*?x[01]|\^\(?-",   # roots, logs, 1/x ...
    "product": r"x0\)?\*?\(?x1|x1\)?\*?\(?x0",
    "linear": r"x[01]",
}


# Words an expression may hold; any other word on an answer's line without 'y =' makes it prose.
_EXPRESSION_WORDS = {"sin", "cos", "exp", "sqrt", "log", "ln", "tan", "abs", "np", "math"}


def _expression(answer: str) -> str | None:
    m = re.search(r"y\s*=\s*([^\n]+)", answer)
    if m:
        expr = m.group(1)
    else:
        expr = next((ln for ln in answer.splitlines() if ln.strip()), "")
        if set(re.findall(r"[a-z]{2,}", expr.lower())) - _EXPRESSION_WORDS:
            return None
    expr = expr.lower().replace("**", "^").replace("\u00b2", "^2").replace("\u00b3", "^3")
    expr = expr.replace("\u00d7", "*").replace("\u00b7", "*").replace("\u2212", "-")
    return re.sub(r"\s+", "", expr.strip("`$ "))


def answer_form(answer: str) -> str:
    """The form of an answer's expression (the text after 'y =' on its line, else its first line
    unless that line is prose): the first of sin, exp, cos, quadratic (a variable to a power >= 2),
    other (roots, logs, tan, abs, division by a variable, negative powers), product (x0 times x1),
    linear (x0 or x1 appear) whose pattern matches; 'echo' when the answer repeats the prompt (its
    placeholder `<expression ...>` or its opening words); 'none' when there is no expression with a
    variable."""
    low = answer.lower()
    if "<expression" in low or "hidden equation generated" in low:
        return "echo"
    expr = _expression(answer)
    if expr is None:
        return "none"
    for form in FORM_PRECEDENCE:
        if re.search(_ANSWER_PATTERNS[form], expr):
            return form
    return "none"


# -- which forms an explanation names -------------------------------------------------------------

# Case-insensitive. Deliberately absent: "line" (the prompt asks for "exactly one line"), "square"
# alone ("least squares"), "polynomial" (any of these forms is written as one), "multiple".
FORM_KEYWORDS = {
    "linear": r"\blinear(ly)?\b|\bslopes?\b|straight line",
    "product": r"\bproducts?\b|multipl(y|ied|ies|ying|ication)|x0\s*\*\s*x1|x1\s*\*\s*x0",
    "quadratic": r"quadratic|squared|parabol|\^\s*2|\*\*\s*2|\u00b2|second[- ](degree|order)",
    "sin": r"\bsin\b|\bsines?\b|sinus",
    "exp": r"\bexp\b|exponent|\be\s*\^",
    "cos": r"\bcos\b|\bcosines?\b",
}


def named_forms(explanation: str | None) -> list[str]:
    """The forms (in FORMS order) whose keyword pattern appears in the explanation."""
    text = explanation or ""
    return [f for f in FORMS if re.search(FORM_KEYWORDS[f], text, flags=re.IGNORECASE)]


def rate(flags: Sequence[bool], clusters: Sequence | None = None, *, n_boot: int = 1000, seed: int = 0) -> dict:
    """Share of True with a 95% CI resampling `clusters` (prompts); NaN CI for fewer than 2 clusters."""
    from nla_ray.core import metrics

    f = np.asarray(flags, dtype=np.float64)
    if len(f) == 0:
        return {"rate": None, "ci95": [None, None], "n": 0}
    cl = np.asarray(clusters if clusters is not None else np.arange(len(f)), dtype=object)
    if len(set(cl.tolist())) < 2:
        return {"rate": float(f.mean()), "ci95": [float("nan"), float("nan")], "n": int(len(f))}
    lo, hi, point = metrics.clustered_bootstrap_ci(f, cl, np.mean, n_boot=n_boot, seed=seed)
    return {"rate": float(point), "ci95": [float(lo), float(hi)], "n": int(len(f))}


def figure(per_offset: Sequence[dict], path, title: str):
    """Left: FVE by offset before the answer (CI bars). Right: how often the explanation names the
    answer's form, the true form, any form."""
    from nla_ray.report import pyplot, save_figure

    plt = pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(9, 3.6))
    x = np.array([r["offset"] for r in per_offset])
    y = np.array([r["fve"] for r in per_offset])
    ci = np.array([r["fve_ci95"] for r in per_offset], dtype=float)
    ax.errorbar(x, y, yerr=np.abs(np.stack([y - ci[:, 0], ci[:, 1] - y])), fmt="o-", capsize=3, color="#3b6ea5")
    ax.set_xlabel("tokens before the answer (0 = last prompt token)")
    ax.set_ylabel("FVE")
    ax.set_xticks(x)
    for key, label, color in (("names_answer_form", "names the answer's form", "#dd8452"),
                              ("names_true_form", "names the true form", "#55a868"),
                              ("names_any_form", "names any form", "#888888")):
        bx.plot(x, [r[key]["rate"] for r in per_offset], "o-", label=label, color=color)
    bx.set_ylim(-0.02, 1.02)
    bx.set_xticks(x)
    bx.set_xlabel("tokens before the answer")
    bx.set_ylabel("share of prompts")
    bx.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)
