"""§2 arithmetic: quote ablation at generation time.

The AV is decoded with every token that could write a quote character masked out (logit -inf), and
we ask what that costs in FVE and how the AV works around it. This module holds the pure parts:

* the two quote families as explicit character sets;
* the token mask — which vocabulary ids are banned for a set of characters (needs a tokenizer, but
  only calls its decode/convert methods: no model);
* escape-hatch detection — the delimiters an AV reaches for when quotes are gone;
* the per-condition table (NMSE / cos / FVE with a document-clustered CI, split into hatch-free and
  hatch-using subsets).

Everything here takes plain strings and numpy arrays; nothing imports Ray or torch.
"""

from __future__ import annotations

import json
import re
import weakref
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from nla_ray.core import metrics

__all__ = [
    "DOUBLE_QUOTES",
    "SINGLE_QUOTES",
    "ALL_QUOTES",
    "CONDITIONS",
    "HATCH_KINDS",
    "decode_vocab",
    "token_bytes",
    "banned_token_ids",
    "family_sizes",
    "hatches",
    "uses_hatch",
    "leaked_banned_chars",
    "quote_marks",
    "condition_table",
]

# ---------------------------------------------------------------------------
# Character sets
# ---------------------------------------------------------------------------

# The double family. The first nine are the classic double quotation marks; the rest are
# characters that *render* as a double quote and that a policy denied the classic ones could use
# instead. A ban is only as good as its weakest look-alike, so we err on the side of including them:
# a token containing one of these is rare in running English, so over-banning costs little.
#   U+0022 "  QUOTATION MARK
#   U+201C “  LEFT DOUBLE QUOTATION MARK
#   U+201D ”  RIGHT DOUBLE QUOTATION MARK
#   U+201E „  DOUBLE LOW-9 QUOTATION MARK
#   U+201F ‟  DOUBLE HIGH-REVERSED-9 QUOTATION MARK
#   U+00AB «  LEFT-POINTING DOUBLE ANGLE QUOTATION MARK
#   U+00BB »  RIGHT-POINTING DOUBLE ANGLE QUOTATION MARK
#   U+2033 ″  DOUBLE PRIME
#   U+FF02 ＂ FULLWIDTH QUOTATION MARK
#   -- added look-alikes --
#   U+2036 ‶  REVERSED DOUBLE PRIME
#   U+02BA ʺ  MODIFIER LETTER DOUBLE PRIME
#   U+02EE ˮ  MODIFIER LETTER DOUBLE APOSTROPHE
#   U+02DD ˝  DOUBLE ACUTE ACCENT (spacing form; renders as a slanted ")
#   U+301D 〝 REVERSED DOUBLE PRIME QUOTATION MARK
#   U+301E 〞 DOUBLE PRIME QUOTATION MARK
#   U+301F 〟 LOW DOUBLE PRIME QUOTATION MARK
#   U+2E42 ⹂  DOUBLE LOW-REVERSED-9 QUOTATION MARK
#   U+275D ❝  HEAVY DOUBLE TURNED COMMA QUOTATION MARK ORNAMENT
#   U+275E ❞  HEAVY DOUBLE COMMA QUOTATION MARK ORNAMENT
#   U+05F4 ״  HEBREW PUNCTUATION GERSHAYIM (visually a straight double quote)
# Deliberately *not* included: the corner brackets 「」『』 (CJK quotation marks, but they look like
# brackets and are the escape hatch §2 counts, so banning them would hide the phenomenon), and
# U+3003 〃 DITTO MARK (not used to open or close a quotation).
DOUBLE_QUOTES: tuple[str, ...] = (
    "\u0022", "\u201c", "\u201d", "\u201e", "\u201f", "\u00ab", "\u00bb", "\u2033", "\uff02",
    "\u2036", "\u02ba", "\u02ee", "\u02dd", "\u301d", "\u301e", "\u301f", "\u2e42", "\u275d", "\u275e",
    "\u05f4",
)

# The single family, exactly the set the assessment names:
#   U+0027 '  APOSTROPHE
#   U+2018 ‘  LEFT SINGLE QUOTATION MARK
#   U+2019 ’  RIGHT SINGLE QUOTATION MARK
#   U+201A ‚  SINGLE LOW-9 QUOTATION MARK
#   U+201B ‛  SINGLE HIGH-REVERSED-9 QUOTATION MARK
#   U+2039 ‹  SINGLE LEFT-POINTING ANGLE QUOTATION MARK
#   U+203A ›  SINGLE RIGHT-POINTING ANGLE QUOTATION MARK
#   U+2032 ′  PRIME
#   U+FF07 ＇ FULLWIDTH APOSTROPHE
#   U+0060 `  GRAVE ACCENT (backtick)
# Not added (unlike the double family): ʼ U+02BC, ʻ U+02BB, ´ U+00B4, ‵ U+2035, ❛❜ U+275B/C.
# The ASCII apostrophe already makes this ban hit contractions ("don't"), so the single-family
# condition is a blunt instrument whatever we add; we keep it to the named set so its size is
# comparable with the published one.
SINGLE_QUOTES: tuple[str, ...] = (
    "\u0027", "\u2018", "\u2019", "\u201a", "\u201b", "\u2039", "\u203a", "\u2032", "\uff07", "\u0060",
)

ALL_QUOTES: tuple[str, ...] = DOUBLE_QUOTES + SINGLE_QUOTES

# The §2 AV conditions, arm name -> banned characters (the seed's "unconstrained", "ban the "-family",
# "ban the "+' families"). quote_ablation decodes them; verbatim_runs and redaction reuse its rows.
CONDITIONS: dict[str, tuple[str, ...]] = {"free": (), "no_double": DOUBLE_QUOTES, "no_quotes": ALL_QUOTES}

_REPLACEMENT = "\ufffd"

# ---------------------------------------------------------------------------
# Token mask
# ---------------------------------------------------------------------------

# Decoding a 262k vocabulary one id at a time takes seconds; analyses ask for several masks and
# family sizes of the same tokenizer, so the decoded vocabulary is kept per tokenizer object.
_VOCAB_CACHE: "weakref.WeakKeyDictionary[Any, list[str]]" = weakref.WeakKeyDictionary()


def decode_vocab(tokenizer) -> list[str]:
    """``[tokenizer.decode([i]) for i in range(len(tokenizer))]``, computed once per tokenizer.

    ``len(tokenizer)`` (not ``vocab_size``) so added/special tokens are covered too: a mask that
    missed an added token containing a quote would leak. ``batch_decode`` gives the same strings as
    per-id ``decode``.
    """
    try:
        cached = _VOCAB_CACHE.get(tokenizer)
    except TypeError:  # an unhashable / non-weakrefable tokenizer: just don't cache
        cached = None
    if cached is not None:
        return cached
    n = len(tokenizer)
    ids = [[i] for i in range(n)]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        # The Rust backend directly: transformers' decode adds only the optional space clean-up
        # (off here), and this skips its per-id Python overhead.
        decoded = list(backend.decode_batch(ids, skip_special_tokens=False))
    else:
        # Clean-up only drops spaces before punctuation, never adds or removes a quote character,
        # but take the exact transformers path anyway when it is on.
        decoded = list(tokenizer.batch_decode(ids))
    try:
        _VOCAB_CACHE[tokenizer] = decoded
    except TypeError:
        pass
    return decoded


def _gpt2_byte_decoder() -> dict[str, int]:
    # GPT-2's byte-level BPE writes each byte as a printable unicode char; invert that table.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) \
        + list(range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_DECODER = _gpt2_byte_decoder()
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


_BYTE_LEVEL_CACHE: "weakref.WeakKeyDictionary[Any, bool]" = weakref.WeakKeyDictionary()


def _is_byte_level(tokenizer) -> bool:
    """True when the tokenizer's pieces are GPT-2 byte-level strings (SmolLM2, Llama-3, Qwen)."""
    # Answering serialises the whole tokenizer to JSON (~0.1 s); token_bytes asks once per token.
    try:
        return _BYTE_LEVEL_CACHE[tokenizer]
    except (KeyError, TypeError):
        pass
    answer = _byte_level_uncached(tokenizer)
    try:
        _BYTE_LEVEL_CACHE[tokenizer] = answer
    except TypeError:
        pass
    return answer


def _byte_level_uncached(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        try:
            dec = json.loads(backend.to_str()).get("decoder") or {}
        except Exception:  # noqa: BLE001 - an exotic backend: fall through to the heuristics
            dec = {}
        stack = [dec]
        while stack:
            d = stack.pop()
            if d.get("type") == "ByteLevel":
                return True
            stack.extend(d.get("decoders") or [])
        if dec:
            return False
    return hasattr(tokenizer, "byte_decoder")  # slow GPT-2-style tokenizers


def token_bytes(tokenizer, token_id: int, *, byte_level: Optional[bool] = None) -> bytes:
    """The raw bytes one token contributes to the output (before UTF-8 decoding).

    SentencePiece byte-fallback pieces ``<0xHH>`` are that byte; byte-level BPE pieces are mapped
    back through GPT-2's byte table; any other piece is its UTF-8 with ``▁`` read as a space.
    """
    piece = tokenizer.convert_ids_to_tokens(int(token_id))
    if piece is None:
        return b""
    m = _BYTE_PIECE.match(piece)
    if m:
        return bytes([int(m.group(1), 16)])
    if byte_level is None:
        byte_level = _is_byte_level(tokenizer)
    if byte_level and all(c in _BYTE_DECODER for c in piece):
        return bytes(_BYTE_DECODER[c] for c in piece)
    return piece.replace("\u2581", " ").encode("utf-8")


def _completing_suffixes(chars: Iterable[str]) -> tuple[bytes, ...]:
    # Proper, non-empty suffixes of each multi-byte char's UTF-8 encoding. A suffix of a multi-byte
    # encoding starts with a continuation byte (0x80-0xBF), so only a token that *begins* mid-char
    # can match: a fragment, never a token of whole characters.
    out = set()
    for c in chars:
        enc = c.encode("utf-8")
        for j in range(1, len(enc)):
            out.add(enc[j:])
    return tuple(sorted(out))


def banned_token_ids(tokenizer, chars: Sequence[str], *, fragments: bool = True) -> list[int]:
    """Every vocabulary id that can write one of ``chars``; sorted ascending.

    Rule 1 (what ``AVEngine.banned_ids_for`` does): ``decode([id])`` contains a banned char.

    Rule 2 (``fragments=True``), for byte-level BPE and byte-fallback vocabularies: a token whose
    decoded text contains U+FFFD is a partial UTF-8 sequence, and rule 1 cannot see which character
    it would help build. Such a token is banned iff its raw bytes *begin with a proper suffix* of
    the UTF-8 encoding of a banned char — i.e. it could be the token that completes that char after
    fragments already emitted. This is the smallest static rule that makes every banned char
    unreachable by any token sequence: whatever token holds the char's last byte either holds the
    whole char (rule 1 catches it, since a lead byte is never swallowed by preceding garbage) or
    begins with a proper suffix of it (rule 2). Leading fragments (e.g. the bytes E2 80 shared by
    “ ” ‘ ’ and — –) stay allowed, so the mask does not also ban em-dashes and other escape hatches
    built from the same lead bytes. It still over-bans a little: a completing byte such as 0x9C
    also ends unrelated characters, which a stateless mask cannot tell apart.

    A token that decodes to a literal U+FFFD (bytes EF BF BD, a complete character) is judged by
    rule 1 like any other token. ``fragments=False`` gives rule 1 alone, identical to
    ``AVEngine.banned_ids_for``.
    """
    chars = tuple(dict.fromkeys(c for c in chars if c))
    if not chars:
        return []
    decoded = decode_vocab(tokenizer)
    suffixes = _completing_suffixes(chars) if fragments else ()
    byte_level = _is_byte_level(tokenizer) if suffixes else False
    # One character class instead of a per-char loop: 262k strings x ~30 chars adds up.
    # (An entry longer than one char is matched as a substring, as banned_ids_for does.)
    if all(len(c) == 1 for c in chars):
        has_char = re.compile("[" + "".join(re.escape(c) for c in chars) + "]").search
    else:
        has_char = re.compile("|".join(re.escape(c) for c in sorted(chars, key=len, reverse=True))).search
    banned = []
    for i, s in enumerate(decoded):
        if has_char(s):
            banned.append(i)
        elif suffixes and _REPLACEMENT in s:
            if token_bytes(tokenizer, i, byte_level=byte_level).startswith(suffixes):
                banned.append(i)
    return banned


def family_sizes(tokenizer) -> dict:
    """How many ids each ablation condition bans on this tokenizer.

    ``double`` / ``double+single`` are the full masks (rule 1 + fragment rule); the ``*_decoded``
    entries are rule 1 alone, so the number of fragment-only ids is their difference.
    """
    d = banned_token_ids(tokenizer, DOUBLE_QUOTES)
    b = banned_token_ids(tokenizer, ALL_QUOTES)
    d0 = banned_token_ids(tokenizer, DOUBLE_QUOTES, fragments=False)
    b0 = banned_token_ids(tokenizer, ALL_QUOTES, fragments=False)
    return {"vocab": len(tokenizer), "double": len(d), "double+single": len(b),
            "double_decoded": len(d0), "double+single_decoded": len(b0)}


# ---------------------------------------------------------------------------
# Escape hatches
# ---------------------------------------------------------------------------

# Words right before a parenthesis that announce a quotation in the released style
# ("The phrase (raised rates) signals", "Final token (Thursday) ends", "expecting (,) or (.)").
_PAREN_CUES_BEFORE = frozenset("""phrase phrases word words token tokens text wording expression term terms
string line title name heading headline clause sentence snippet fragment passage quote quotation reads read
says said like expecting expects expected followed continuation continuations completion completions
next called titled named reading mention mentions mentioned""".split())
# Verbs right after a parenthesis that treat it as a quoted object ("(raised rates) signals ...").
_PAREN_CUES_AFTER = frozenset("""signals signal suggests suggest indicates indicate implies imply ends end begins
begin starts start marks mark opens open closes close completes complete continues continue introduces
introduce precedes precede follows follow""".split())
# Openers of a parenthetical *aside*: never a verbatim span, whatever surrounds it.
_ASIDE_OPENERS = ("e.g", "i.e", "eg ", "ie ", "etc", "such as", "likely", "possibly", "probably", "perhaps",
                  "maybe", "presumably", "typically", "usually", "often", "especially", "including",
                  "namely", "see ", "cf", "note", "sic", "or ", "and ", "which", "that is", "also", "not ",
                  "s)", "es)", "plural", "singular", "approximately", "about ", "roughly", "around ")
_PAREN_MAX_WORDS = 12
_WORDS = re.compile(r"[\w']+")

# Delimiter kinds, bracket-like ones counted by their opener (an unclosed opener is still the AV
# reaching for the device), symmetric ones counted as closed pairs within one line.
_OPENERS = {
    "corner": "\u300c",          # 「 … 」
    "white_corner": "\u300e",    # 『 … 』
    "double_angle": "\u00ab",    # « … »  (double family: only seen when that family is allowed)
    "single_angle": "\u2039",    # ‹ … ›  (single family)
    "cjk_angle": "\u3008\u300a",  # 〈 … 〉 and 《 … 》
    "lenticular": "\u3010\u3016",  # 【 … 】 and 〖 … 〗
}
_PAIRS = {
    # *italic* (markdown rule: no space just inside the stars) but not **bold**.
    "italic": re.compile(r"(?<![*\w])\*(?![\s*])[^*\n]+?(?<![\s*])\*(?![*\w])"),
    "bold": re.compile(r"(?<!\*)\*\*(?!\s)[^*\n]+?(?<!\s)\*\*(?!\*)"),
    "underscore": re.compile(r"(?<![\w_])_(?![\s_])[^_\n]+?(?<![\s_])_(?![\w_])"),
    "backtick": re.compile(r"`[^`\n]+`"),
    "ascii_angle": re.compile(r"<<[^<>\n]+>>"),
    # An em-dash (or horizontal bar) pair on one line enclosing 1..12 words.
    "em_dash": re.compile(r"[\u2014\u2015]([^\u2014\u2015\n]+?)[\u2014\u2015]"),
    # Seen on the mini SmolLM2 AV with both families banned: "The phrase - $1.00 to lower - from",
    # a spaced ASCII hyphen pair doing the em-dash's job (1..12 words between, like em_dash) ...
    "hyphen_pair": re.compile(r"(?<!\S)-\s([^\n]+?)\s-(?!\S)"),
    # ... and "$$" opening the span ("The phrase $$1.05 trillion"); a price never writes two dollars.
    "double_dollar": re.compile(r"\$\$"),
}
_PAREN = re.compile(r"\(([^()\n]*)\)")

HATCH_KINDS: tuple[str, ...] = tuple(_OPENERS) + tuple(_PAIRS) + ("paren_verbatim",)


def _paren_verbatim(text: str) -> int:
    """Parenthesised spans that stand where a quotation would.

    Rule: the content has 1..12 words and does not open like an aside (e.g., i.e., such as,
    likely, or, which, ...), and either (a) the word just before "(" is a quoting cue (phrase,
    word, token, reads, expecting, ...), or (b) the word just after ")" is a verb that takes the
    span as its subject (signals, suggests, ends, begins, ...), or (c) it directly follows another
    verbatim paren span with only a comma/"or"/"and" between — the released "expecting X, Y or Z"
    list. A content that is nothing but punctuation (e.g. "(,)") counts under (a)-(c) as well:
    that is how a quote-free AV writes an expected comma. Everything else is an aside.
    """
    count = 0
    prev_end = None
    for m in _PAREN.finditer(text):
        inner = m.group(1).strip()
        low = inner.lower()
        n_words = len(_WORDS.findall(inner))
        is_punct = bool(inner) and n_words == 0
        ok_shape = (1 <= n_words <= _PAREN_MAX_WORDS or is_punct) and not low.startswith(_ASIDE_OPENERS)
        before = _WORDS.findall(text[max(0, m.start() - 40):m.start()])
        after = _WORDS.findall(text[m.end():m.end() + 40])
        gap_before = text[m.start() - 1:m.start()] if m.start() else ""
        cue = (bool(before) and gap_before in (" ", ":") and before[-1].lower() in _PAREN_CUES_BEFORE) \
            or (bool(after) and text[m.end():m.end() + 1] == " " and after[0].lower() in _PAREN_CUES_AFTER)
        chained = prev_end is not None and re.fullmatch(r"\s*(,|,?\s*(or|and))\s*", text[prev_end:m.start()]) \
            is not None
        if ok_shape and (cue or chained):
            count += 1
            prev_end = m.end()
        else:
            prev_end = None
    return count


def hatches(text: str) -> dict[str, int]:
    """Counts of each non-quote delimiter kind in ``text`` (keys: ``HATCH_KINDS``).

    Quote characters proper are not hatches (``quote_marks`` counts them); ``«»``, ``‹›`` and
    backticks belong to the quote families but are listed because under a ban of the *other*
    family they are exactly what the AV substitutes. An em-dash pair counts only with 1..12 words
    between the dashes, so a long em-dash aside is not taken for a quotation.
    """
    text = text or ""
    out = {k: sum(text.count(ch) for ch in chs) for k, chs in _OPENERS.items()}
    for k, rx in _PAIRS.items():
        if k in ("em_dash", "hyphen_pair"):
            out[k] = sum(1 for m in rx.finditer(text)
                         if 1 <= len(_WORDS.findall(m.group(1))) <= _PAREN_MAX_WORDS)
        else:
            out[k] = len(rx.findall(text))
    out["paren_verbatim"] = _paren_verbatim(text)
    return out


def uses_hatch(text: str, exclude: Iterable[str] = ()) -> bool:
    """Whether any hatch kind (other than those in ``exclude``) occurs in ``text``."""
    skip = set(exclude)
    return any(v > 0 for k, v in hatches(text).items() if k not in skip)


def leaked_banned_chars(text: str, chars: Sequence[str]) -> int:
    """Occurrences of banned characters in a decode made under that ban (should be 0)."""
    text = text or ""
    return sum(text.count(c) for c in set(chars) if c)


def quote_marks(text: str) -> dict[str, int]:
    """Counts of double-family and single-family characters (``single`` includes apostrophes)."""
    text = text or ""
    return {"double": leaked_banned_chars(text, DOUBLE_QUOTES),
            "single": leaked_banned_chars(text, SINGLE_QUOTES)}


# ---------------------------------------------------------------------------
# Per-condition table
# ---------------------------------------------------------------------------

def _row(name: str, nm: np.ndarray, cs: np.ndarray, docs: np.ndarray, var: float,
         n_boot: int, seed: int) -> dict:
    row: dict = {"condition": name, "n": int(len(nm))}
    if len(nm) == 0:
        row.update(nmse=None, cos=None, fve=None, fve_ci95=None)
        return row
    lo, hi, point = metrics.fve_ci(nm, docs, var, n_boot=n_boot, seed=seed)
    row.update(nmse=float(np.mean(nm)), cos=float(np.mean(cs)), fve=float(point), fve_ci95=[float(lo), float(hi)],
               n_docs=int(len(np.unique(docs))))
    return row


def condition_table(conditions: dict, var: float, *, n_boot: int = 1000, seed: int = 0,
                    banned: Optional[dict] = None, split_hatches: Optional[Iterable[str]] = None) -> list[dict]:
    """One row per ablation condition, plus hatch-free / hatch-using sub-rows.

    ``conditions`` maps a condition name to a dict of equal-length arrays ``nmse``, ``cos``,
    ``texts`` (the explanations) and ``doc_ids``. Rows carry NMSE, cos, FVE against the fixed
    denominator ``var`` with a document-clustered 95% bootstrap CI, plus the share of decodes using
    a hatch, per-kind hatch counts, and — for conditions named in ``banned`` (name -> chars) — the
    number of banned characters that leaked. Sub-rows (``"<name> / hatch-free"`` and
    ``"<name> / hatch-using"``) are added for the conditions in ``split_hatches`` (default: every
    condition with a ban). Empty or NaN-NMSE rows (failed decodes the caller did not score) are
    dropped before the arithmetic and reported as ``n_unscored``.
    """
    banned = dict(banned or {})
    split = set(banned) if split_hatches is None else set(split_hatches)
    rows = []
    for name, c in conditions.items():
        nm = np.asarray(c["nmse"], dtype=np.float64)
        cs = np.asarray(c["cos"], dtype=np.float64)
        texts = ["" if t is None else str(t) for t in c["texts"]]
        docs = np.asarray(c["doc_ids"])
        if not (len(nm) == len(cs) == len(texts) == len(docs)):
            raise ValueError(f"condition {name!r}: nmse/cos/texts/doc_ids lengths differ "
                             f"({len(nm)}, {len(cs)}, {len(texts)}, {len(docs)})")
        ok = np.isfinite(nm) & np.isfinite(cs)
        nm, cs, docs = nm[ok], cs[ok], docs[ok]
        texts = [t for t, k in zip(texts, ok) if k]
        counts = [hatches(t) for t in texts]
        use = np.array([any(v > 0 for v in h.values()) for h in counts], dtype=bool)
        row = _row(name, nm, cs, docs, var, n_boot, seed)
        row["n_unscored"] = int((~ok).sum())
        row["hatch_share"] = float(use.mean()) if len(use) else None
        row["hatch_counts"] = {k: int(sum(h[k] for h in counts)) for k in HATCH_KINDS}
        row["decodes_with_double"] = int(sum(quote_marks(t)["double"] > 0 for t in texts))
        row["decodes_with_single"] = int(sum(quote_marks(t)["single"] > 0 for t in texts))
        if name in banned:
            row["leaked_banned_chars"] = int(sum(leaked_banned_chars(t, banned[name]) for t in texts))
        rows.append(row)
        if name in split:
            rows.append(_row(f"{name} / hatch-free", nm[~use], cs[~use], docs[~use], var, n_boot, seed))
            rows.append(_row(f"{name} / hatch-using", nm[use], cs[use], docs[use], var, n_boot, seed))
    return rows


# ---------------------------------------------------------------------------
# Fig. 1
# ---------------------------------------------------------------------------

def hatch_figure(rows: list[dict], path, title: str):
    """Fig. 1 analogue: escape-hatch counts per condition (kinds never seen are left out)."""
    from nla_ray.report import pyplot, save_figure

    plt = pyplot()
    top = [r for r in rows if "hatch_counts" in r]
    kinds = [k for k in HATCH_KINDS if any(r["hatch_counts"][k] for r in top)] or ["corner", "italic", "paren_verbatim"]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(kinds) + 2), 3.8))
    width = 0.8 / max(1, len(top))
    for i, r in enumerate(top):
        xs = np.arange(len(kinds)) + i * width
        vals = [r["hatch_counts"][k] for k in kinds]
        bars = ax.bar(xs, vals, width, label=f"{r['condition']} (n={r['n']})")
        ax.bar_label(bars, fontsize=7)
    ax.set_xticks(np.arange(len(kinds)) + width * (len(top) - 1) / 2, kinds, rotation=20)
    ax.set_ylabel("decodes' delimiter count")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
