"""Deterministic explanation targets for training the mini NLAs (no API, no other model).

The release warm-started its AV on explanations written by another model, in a three-part style:
genre/topic, a quoted phrase and what it signals, and the final token with what should follow.
We build the same shape from the data itself, so the recipe is reproducible from the job file:

  1. topic line   — "<Topic> news report on <k1>, <k2>, <k3>." where the topic is the BBC section
                    and k1..k3 are the prefix's salient content words (frequency, then recency);
  2. quoted phrase — 'The phrase "<last 2-5 words before the token>" signals <role>.' The role
                    comes from simple surface cues (a number, a quotation, a name, a clause);
  3. final token  — 'Final token "<tok>" <where it sits>, expecting "<a>", "<b>" or "<c>".' with
                    a/b/c the BASE model's own top-3 next-token predictions at that position.

Quotes appear in every target on purpose: the quote-ablation, verbatim-run and redaction analyses
need a quoting habit to measure.

Recipes (`RECIPES`, chosen by `TrainConfig.target_recipe` and recorded in the pair's sidecar):
  v1 — the quoted phrase is the last 4 words before the token (at most 60 characters);
  v2 — the last 10 words (at most 100 characters). A mid-depth residual still carries several
       preceding tokens, so a longer verbatim span gives the AR more of what the vector holds;
       whether the AV can write it back is what the held-out FVE measures.
"""

from __future__ import annotations

import re
from collections import Counter

_WORD = re.compile(r"[A-Za-z][A-Za-z'\-]+")
STOPWORDS = frozenset("""a about above after again against all also am an and any are as at be because been
before being below between both but by can could did do does doing down during each few for from further had
has have having he her here hers herself him himself his how i if in into is it its itself just more most my
no nor not now of off on once only or other our ours out over own said same she should so some such than that
the their theirs them then there these they this those through to too under until up very was we were what
when where which while who whom why will with would you your yours year years new one two also says told mr
mrs ms last first people time there""".split())

TOPIC_NAMES = {"business": "Business", "entertainment": "Entertainment", "politics": "Politics",
               "sport": "Sports", "sports": "Sports", "tech": "Technology"}


def salient_words(prefix: str, k: int = 3, window: int = 80) -> list[str]:
    words = _WORD.findall(prefix)[-window:]
    content = [w for w in words if len(w) >= 4 and w.lower() not in STOPWORDS]
    if not content:
        return []
    counts = Counter(w.lower() for w in content)
    last_seen = {w.lower(): i for i, w in enumerate(content)}
    surface = {}
    for w in content:  # keep the most recent casing (names stay capitalized)
        surface[w.lower()] = w
    ranked = sorted(counts, key=lambda w: (-counts[w], -last_seen[w]))
    return [surface[w] for w in ranked[:k]]


RECIPES = {"v1": {"quote_words": 4, "quote_chars": 60}, "v2": {"quote_words": 10, "quote_chars": 100}}


def recent_phrase(prefix_before_token: str, n_words: int = 4, max_chars: int = 60) -> str:
    text = prefix_before_token.rstrip()
    toks = text.split()
    phrase = " ".join(toks[-n_words:]) if toks else ""
    return phrase.replace('"', "'")[-max_chars:]


def phrase_role(phrase: str) -> str:
    if re.search(r"\d", phrase):
        return "a figure or date being reported"
    if "'" in phrase or "\u2018" in phrase or "\u201c" in phrase:
        return "a quotation being relayed"
    caps = [w for w in phrase.split() if w[:1].isupper()]
    if len(caps) >= 2:
        return "named people or organisations in the story"
    if phrase.endswith((",", ";", ":")):
        return "a clause continuing the sentence"
    return "the running narrative of the article"


def token_role(token: str) -> str:
    t = token.strip()
    if not t:
        return "is whitespace between words"
    if re.fullmatch(r"[.!?]", t):
        return "ends a sentence"
    if re.fullmatch(r"[,;:]", t):
        return "breaks the clause"
    if re.fullmatch(r"\d[\d.,]*", t):
        return "is part of a number"
    if t[:1].isupper():
        return "starts a capitalised name or sentence"
    return "sits mid-sentence"


# Everything str.splitlines() breaks on: a raw one inside a quote would add a line to the target.
_LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


def _q(s: str) -> str:
    for ch in _LINE_BREAKS:
        s = s.replace(ch, repr(ch)[1:-1])
    s = s.replace('"', "'")
    return f'"{s}"'


def make_target(*, topic: str, prefix_text: str, token: str, top_next: list[str], recipe: str = "v1") -> str:
    """One explanation in the three-paragraph release style, from data alone."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown target recipe {recipe!r}; known: {sorted(RECIPES)}")
    spec = RECIPES[recipe]
    words = salient_words(prefix_text)
    topic_name = TOPIC_NAMES.get(topic, topic.capitalize() if topic else "General")
    line1 = f"{topic_name} news report" + (f" on {', '.join(words)}." if words else ".")
    before = prefix_text[: len(prefix_text) - len(token)] if token and prefix_text.endswith(token) else prefix_text
    phrase = recent_phrase(before, spec["quote_words"], spec["quote_chars"])
    line2 = f"The phrase {_q(phrase)} signals {phrase_role(phrase)}." if phrase else \
        "The opening words set up the article."
    nxt = [t for t in top_next if t is not None][:3]
    if len(nxt) > 1:
        expect = ", ".join(_q(t) for t in nxt[:-1]) + f" or {_q(nxt[-1])}"
    else:
        expect = _q(nxt[0]) if nxt else ""
    line3 = f"Final token {_q(token)} {token_role(token)}" + (f", expecting {expect}." if nxt else ".")
    return "\n".join([line1, line2, line3])
