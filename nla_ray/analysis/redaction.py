"""§4 arithmetic: post-hoc redaction — which part of an explanation carries the signal?

The same unconstrained decodes are edited before the AR reads them: keep only the quoted spans,
keep only the prose, drop the quote marks but keep their text, or replace each span's content by
fillers of increasing junkiness. All edits are pure ``str -> str`` functions built on one parser,
so every edit agrees on what a "span" is; :func:`apply_edit` is the batch form an ``Apply``
pipeline stage calls.

Span rule (one line at a time, outermost first):

* a span opens at a quote character of either family (``quotes.DOUBLE_QUOTES`` /
  ``SINGLE_QUOTES``) and closes at the first matching closer on the same line — ``"`` with ``"``,
  ``“`` with ``”`` (or a sloppy ``“``), ``„`` with ``“``/``”``, ``«`` with ``»``, ``‘`` with ``’``,
  ``‹`` with ``›``, a backtick with a backtick or ``'``, and so on (``_CLOSERS``);
* inside an open span every other quote character is content, so ``"he said 'no'"`` is one span;
* apostrophe-like marks (``'`` ``‘`` ``’``) open only after a non-word character (so the ``'``
  of ``company's`` never opens) and close only before a non-word character (so ``don't`` inside
  a span never closes it);
* an opener with no closer on its line is prose (a stray mark, not a span). Keeping spans within
  a line stops one unmatched mark from swallowing the next paragraph.

A span's extent includes both marks; ``content`` is what lies between them.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

__all__ = [
    "Span",
    "parse_spans",
    "spans_only",
    "prose_only",
    "strip_quote_marks",
    "FILLERS",
    "filler_text",
    "replace_spans",
    "redaction_stats",
    "EDITS",
    "edit_text",
    "apply_edit",
    "apply_edits",
    "fve_figure",
]

# Opener -> the characters that may close it. Double family first, then single.
_CLOSERS: dict[str, str] = {
    '"': '"',
    "\u201c": "\u201d\u201c",          # “ … ” (or a sloppy “ … “)
    "\u201d": "\u201d",                # ” … ” (Swedish/Finnish style)
    "\u201e": "\u201c\u201d",          # „ … “ (German) or „ … ” (Polish)
    "\u201f": "\u201d",                # ‟ … ”
    "\u00ab": "\u00bb",                # « … »
    "\u2033": "\u2033",                # ″ … ″
    "\uff02": "\uff02",                # ＂ … ＂
    "\u2036": "\u2033\u2036",          # ‶ … ″
    "\u02ba": "\u02ba",                # ʺ … ʺ
    "\u02ee": "\u02ee",                # ˮ … ˮ
    "\u02dd": "\u02dd",                # ˝ … ˝
    "\u301d": "\u301e\u301f",          # 〝 … 〞 / 〟
    "\u2e42": "\u201c\u201d",          # ⹂ … “
    "\u275d": "\u275e",                # ❝ … ❞
    "\u05f4": "\u05f4",                # ״ … ״
    "'": "'",
    "\u2018": "\u2019\u2018",          # ‘ … ’ (or a sloppy ‘ … ‘)
    "\u201a": "\u2018\u2019",          # ‚ … ‘ / ’
    "\u201b": "\u2019",                # ‛ … ’
    "\u2039": "\u203a",                # ‹ … ›
    "\u2032": "\u2032",                # ′ … ′
    "\uff07": "\uff07",                # ＇ … ＇
    "`": "`'",                         # `…` (markdown) or `…' (TeX)
}
_DOUBLE_OPENERS = frozenset('"\u201c\u201d\u201e\u201f\u00ab\u2033\uff02\u2036\u02ba\u02ee\u02dd\u301d\u2e42\u275d\u05f4')
# Marks that double as apostrophes inside words.
_APOSTROPHE_LIKE = frozenset("'\u2018\u2019\uff07")


def _is_word(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


@dataclass(frozen=True)
class Span:
    """One quoted span: ``text[start:end]`` is open mark + content + close mark."""

    start: int
    end: int
    open_mark: str
    close_mark: str
    family: str  # "double" or "single"

    def content(self, text: str) -> str:
        return text[self.start + 1:self.end - 1]


def _opens(text: str, i: int) -> bool:
    ch = text[i]
    if ch not in _CLOSERS:
        return False
    if ch in _APOSTROPHE_LIKE:
        # "company's" / "rock'n'roll": a mark glued to a preceding word is an apostrophe.
        return i == 0 or not _is_word(text[i - 1])
    return True


def _closes(text: str, j: int, opener: str) -> bool:
    ch = text[j]
    if ch not in _CLOSERS[opener]:
        return False
    if ch in _APOSTROPHE_LIKE:
        # "don't" inside a span: a mark followed by a word character is an apostrophe.
        return j + 1 == len(text) or not _is_word(text[j + 1])
    return True


def parse_spans(text: str) -> list[Span]:
    """Quoted spans of ``text`` in order, by the rule in the module docstring."""
    text = text or ""
    spans: list[Span] = []
    i, n = 0, len(text)
    while i < n:
        if _opens(text, i):
            line_end = text.find("\n", i + 1)
            line_end = n if line_end < 0 else line_end
            close = next((j for j in range(i + 1, line_end) if _closes(text, j, text[i])), None)
            if close is not None:
                fam = "double" if text[i] in _DOUBLE_OPENERS else "single"
                spans.append(Span(i, close + 1, text[i], text[close], fam))
                i = close + 1
                continue
        i += 1
    return spans


# ---------------------------------------------------------------------------
# Edits
# ---------------------------------------------------------------------------

_MULTI_SPACE = re.compile(r"[ \t]{2,}")
_SPACE_BEFORE_PUNCT = re.compile(r"[ \t]+([,.;:!?])")


def _tidy(text: str) -> str:
    # Removing spans leaves double spaces and " ." behind; an AR never saw those in training.
    lines = [_SPACE_BEFORE_PUNCT.sub(r"\1", _MULTI_SPACE.sub(" ", ln)).strip() for ln in text.split("\n")]
    return "\n".join(lines).strip()


def spans_only(text: str, marks: bool = True) -> str:
    """Only the quoted spans: one line per source line that had any, spans joined by a space.

    ``marks=False`` keeps the span contents without their quote marks (the "identical text, no
    marks" comparison).
    """
    text = text or ""
    by_line: dict[int, list[str]] = {}
    for s in parse_spans(text):
        line = text.count("\n", 0, s.start)
        by_line.setdefault(line, []).append(text[s.start:s.end] if marks else s.content(text))
    return "\n".join(" ".join(parts) for _, parts in sorted(by_line.items()))


def prose_only(text: str) -> str:
    """The explanation with every span (marks and content) deleted, spacing tidied."""
    text = text or ""
    out, pos = [], 0
    for s in parse_spans(text):
        out.append(text[pos:s.start])
        pos = s.end
    out.append(text[pos:])
    return _tidy("".join(out))


def strip_quote_marks(text: str) -> str:
    """The explanation with each span's two marks removed and everything else unchanged."""
    text = text or ""
    out, pos = [], 0
    for s in parse_spans(text):
        out.append(text[pos:s.start])
        out.append(s.content(text))
        pos = s.end
    out.append(text[pos:])
    return "".join(out)


# Fillers, in order of increasing junkiness — i.e. increasing distance from what an AR saw in
# training and increasing amount of *false* content it is asked to read:
#   placeholder   — the word "something": fluent, carries no content, nothing to misread;
#   redacted      — "[REDACTED]": still content-free, but a visibly foreign marker;
#   common_words  — random common English words, as many as the span had: fluent but wrong
#                   content, which the AR will take as a (misleading) quotation;
#   random_tokens — random lowercase letter strings, word-shaped but not words;
#   random_chars  — random letters/digits/punctuation, as many characters as the span had.
# The marks and the span's leading/trailing whitespace are kept (a token-quote like " Thursday"
# stays a leading-space quote), so only the content changes, never the format around it.
FILLERS: tuple[str, ...] = ("placeholder", "redacted", "common_words", "random_tokens", "random_chars")

_COMMON_WORDS = tuple("""time year people way day man thing woman life child world school state family student
group country problem hand part place case week company system program question work government number night
point home water room mother area money story fact month lot right study book eye job word business issue side
kind head house service friend father power hour game line end member law car city community name president team
minute idea kid body information back parent face others level office door health person art war history party
result change morning reason research girl guy moment air teacher force education good new first last long great
little own other old right big high different small large next early young important few public bad same able
make take come see know get give find think tell become show leave feel put bring begin keep hold write stand
hear let mean set meet run pay sit speak lie lead read grow lose fall send build stay""".split())
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
# No quote marks, backslashes or angle brackets: a filler must not open a new span or a tag.
_JUNK_CHARS = _LETTERS + _LETTERS.upper() + "0123456789" + "#$%&()*+,-./:;=?@[]^_{|}~!"


def _rng(seed: int, text: str, index: int) -> np.random.Generator:
    # Keyed by the text itself (crc32: stable across processes, unlike hash()), so a row's filler
    # does not depend on which batch it landed in or in what order rows were edited.
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(text.encode("utf-8")), int(index)])


def filler_text(content: str, filler: str, rng: np.random.Generator) -> str:
    """The replacement for one span's (stripped) ``content`` under ``filler``."""
    n_words = max(1, len(content.split()))
    if filler == "placeholder":
        return "something"
    if filler == "redacted":
        return "[REDACTED]"
    if filler == "common_words":
        return " ".join(_COMMON_WORDS[int(k)] for k in rng.integers(0, len(_COMMON_WORDS), n_words))
    if filler == "random_tokens":
        return " ".join("".join(_LETTERS[int(c)] for c in rng.integers(0, 26, int(rng.integers(2, 9))))
                        for _ in range(n_words))
    if filler == "random_chars":
        return "".join(_JUNK_CHARS[int(c)] for c in rng.integers(0, len(_JUNK_CHARS), max(1, len(content))))
    raise ValueError(f"unknown filler {filler!r}; expected one of {FILLERS}")


def replace_spans(text: str, filler: str = "placeholder", seed: int = 0) -> str:
    """Each span's content replaced by ``filler`` (one of ``FILLERS``), marks kept.

    Deterministic given ``(text, filler, seed)``.
    """
    if filler not in FILLERS:
        raise ValueError(f"unknown filler {filler!r}; expected one of {FILLERS}")
    text = text or ""
    out, pos = [], 0
    for k, s in enumerate(parse_spans(text)):
        content = s.content(text)
        core = content.strip()
        lead = content[:len(content) - len(content.lstrip())]
        trail = content[len(content.rstrip()):]
        out.append(text[pos:s.start + 1])
        out.append(lead + filler_text(core, filler, _rng(seed, text, k)) + trail)
        out.append(s.close_mark)
        pos = s.end
    out.append(text[pos:])
    return "".join(out)


def redaction_stats(texts: Sequence[str]) -> dict:
    """``{n, spans_per_decode, share_of_chars, share_of_chars_content}`` over ``texts``.

    ``share_of_chars`` counts span characters *with* their marks over all characters (what
    ``prose_only`` deletes); ``share_of_chars_content`` counts the contents only.
    """
    n_spans = n_chars = n_span_chars = n_content = 0
    for t in texts:
        t = "" if t is None else str(t)
        spans = parse_spans(t)
        n_spans += len(spans)
        n_chars += len(t)
        n_span_chars += sum(s.end - s.start for s in spans)
        n_content += sum(s.end - s.start - 2 for s in spans)
    n = len(texts)
    return {"n": n, "spans_per_decode": n_spans / n if n else None,
            "share_of_chars": n_span_chars / n_chars if n_chars else None,
            "share_of_chars_content": n_content / n_chars if n_chars else None}


# ---------------------------------------------------------------------------
# Batch form
# ---------------------------------------------------------------------------

EDITS: dict[str, Callable[..., str]] = {
    "identity": lambda t: t,
    "spans_only": spans_only,
    "spans_only_unmarked": lambda t: spans_only(t, marks=False),
    "prose_only": prose_only,
    "strip_quote_marks": strip_quote_marks,
    "replace_spans": replace_spans,
}


def edit_text(text: str, edit: str, **kw: Any) -> str:
    """Apply the edit named ``edit`` (a key of ``EDITS``) to one string."""
    try:
        fn = EDITS[edit]
    except KeyError:
        raise ValueError(f"unknown edit {edit!r}; expected one of {sorted(EDITS)}") from None
    return fn(text, **kw)


def _as_text(v: Any) -> str:
    # Ray turns None in object columns into NaN between stages; both mean "no explanation".
    if v is None or (isinstance(v, float) and v != v):
        return ""
    return str(v)


def apply_edit(batch: dict, edit: str, src: str = "explanation", dst: str = "explanation_edit",
               **kw: Any) -> dict:
    """``batch`` (Ray Data numpy format) with ``dst`` = ``edit`` applied to column ``src``.

    Returns a new dict sharing the other columns; ``dst`` is an object array of str. ``kw`` goes to
    the edit (e.g. ``filler="redacted", seed=0`` for ``replace_spans``). Empty/missing explanations
    stay "".
    """
    if src not in batch:
        raise KeyError(f"apply_edit: batch has no column {src!r} (columns: {sorted(batch)})")
    if edit not in EDITS:
        raise ValueError(f"unknown edit {edit!r}; expected one of {sorted(EDITS)}")
    col = batch[src]
    out = dict(batch)
    edited = np.empty(len(col), dtype=object)
    for i, v in enumerate(col):
        t = _as_text(v)
        edited[i] = edit_text(t, edit, **kw) if t else ""
    out[dst] = edited
    return out


# ---------------------------------------------------------------------------
# Fig. 2
# ---------------------------------------------------------------------------

def fve_figure(rows: Sequence[dict], path, title: str):
    """Fig. 2 analogue: FVE after each edit (bars, doc-clustered 95% CI), the unedited level dashed."""
    from nla_ray.report import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(5.5, 0.75 * len(rows) + 2), 3.8))
    fves = [r["fve"] for r in rows]
    err = np.array([[r["fve"] - r["ci"][0], r["ci"][1] - r["fve"]] for r in rows]).T
    ax.bar(range(len(rows)), fves, yerr=err, capsize=3, color=["#4c72b0" if r["edit"] == "identity" else "#dd8452"
                                                               for r in rows])
    base = next((r["fve"] for r in rows if r["edit"] == "identity"), None)
    if base is not None:
        ax.axhline(base, ls="--", lw=1, color="#4c72b0")
    ax.axhline(0, lw=0.8, color="black")
    ax.set_xticks(range(len(rows)), [r["label"] for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("FVE (own-set Var)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def apply_edits(batch: dict, edits: dict, src: str = "explanation") -> dict:
    """Several edits in one pass: ``edits`` maps an output column to ``(edit, kwargs)``. One stage
    for all edits keeps a pipeline to one CPU actor however many edits are compared."""
    out = dict(batch)
    for dst, (edit, kw) in edits.items():
        out = apply_edit(out, edit, src=src, dst=dst, **kw)
    return out
