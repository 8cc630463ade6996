"""Text-side analyses (§2-§5): quote-ban masks, escape hatches, verbatim runs, redaction, best-of-N.

CPU only; the tokenizer tests use the packaged offline tokenizers from conftest.
"""

import itertools
import random

import numpy as np
import pytest

from nla_ray.analysis import best_of_n as B
from nla_ray.analysis import quotes as Q
from nla_ray.analysis import redaction as R
from nla_ray.analysis import verbatim as V

# The released three-paragraph style.
RELEASED = ('Business news report on rates.\n'
            'The phrase "raised rates on Thursday" signals a figure being reported.\n'
            'Final token " Thursday" ends a clause, expecting "," or ".".')


# ---------------------------------------------------------------------------
# §2 masks on the real tokenizers
# ---------------------------------------------------------------------------

def _has(s, chars):
    return any(c in s for c in chars)


def _check_mask(tok, chars):
    decoded = Q.decode_vocab(tok)
    assert len(decoded) == len(tok)
    mask = Q.banned_token_ids(tok, chars)
    rule1 = Q.banned_token_ids(tok, chars, fragments=False)
    assert mask == sorted(mask) and set(rule1) <= set(mask)
    banned = set(mask)
    suffixes = tuple({c.encode()[j:] for c in chars for j in range(1, len(c.encode()))})
    # Every banned id, decoded by the tokenizer itself: a banned char, or a UTF-8 fragment that
    # can complete one.
    for i in mask:
        s = tok.decode([i])
        assert _has(s, chars) or ("\ufffd" in s and Q.token_bytes(tok, i).startswith(suffixes)), (i, s)
    # No allowed id writes a banned char (the whole vocabulary, via the cached decode) ...
    leaks = [i for i, s in enumerate(decoded) if i not in banned and _has(s, chars)]
    assert leaks == []
    # ... and the cache is the tokenizer's own decode (spot-checked on a random sample).
    for i in random.Random(0).sample(range(len(tok)), 300):
        assert decoded[i] == tok.decode([i])
    # Fragment route closed: the token holding the *last* byte of each multi-byte banned char,
    # as a lone byte, is banned, so the char cannot be assembled byte by byte.
    fragment_bytes = {i: Q.token_bytes(tok, i) for i, s in enumerate(decoded) if "\ufffd" in s}
    for c in chars:
        enc = c.encode()
        if len(enc) > 1:
            lone = [i for i, b in fragment_bytes.items() if b == enc[-1:]]
            assert lone and all(i in banned for i in lone), (c, lone)
    # The ordinary spellings of the marks are banned.
    for c in chars:
        ids = tok.encode(c, add_special_tokens=False)
        assert any(i in banned for i in ids), (c, ids)
    return mask


@pytest.mark.parametrize("which", ["smollm_tok", "gemma_tok"])
def test_ban_masks_on_real_tokenizers(request, which):
    tok = request.getfixturevalue(which)
    double = _check_mask(tok, Q.DOUBLE_QUOTES)
    both = _check_mask(tok, Q.ALL_QUOTES)
    assert set(double) < set(both)
    sizes = Q.family_sizes(tok)
    print(f"\n{which}: {sizes}")
    assert sizes["double"] == len(double) and sizes["double+single"] == len(both)
    assert sizes["double_decoded"] <= sizes["double"] < sizes["double+single"] <= sizes["vocab"]
    # A contraction's apostrophe is in the single-family ban only; plain words are in neither.
    apos = [i for i in tok.encode("It's", add_special_tokens=False) if "'" in tok.decode([i])]
    assert apos and set(apos) <= set(both) and not set(apos) & set(double)
    assert not set(tok.encode(" rates", add_special_tokens=False)) & set(both)


def test_sets_are_disjoint_single_chars():
    assert all(len(c) == 1 for c in Q.ALL_QUOTES)
    assert not set(Q.DOUBLE_QUOTES) & set(Q.SINGLE_QUOTES)
    assert len(set(Q.ALL_QUOTES)) == len(Q.ALL_QUOTES)
    for c in '"\u201c\u201d\u201e\u201f\u00ab\u00bb\u2033\uff02':
        assert c in Q.DOUBLE_QUOTES
    for c in "'\u2018\u2019\u201a\u201b\u2039\u203a\u2032\uff07`":
        assert c in Q.SINGLE_QUOTES


# ---------------------------------------------------------------------------
# §2 escape hatches
# ---------------------------------------------------------------------------

def test_hatches_on_released_style():
    assert not Q.uses_hatch(RELEASED)
    assert Q.leaked_banned_chars(RELEASED, Q.DOUBLE_QUOTES) == 8
    assert Q.quote_marks(RELEASED) == {"double": 8, "single": 0}

    corner = ("Business news report on rates.\nThe phrase 「raised rates on Thursday」 signals a figure.\n"
              "Final token 『Thursday』 ends a clause.")
    h = Q.hatches(corner)
    assert h["corner"] == 1 and h["white_corner"] == 1 and Q.uses_hatch(corner)
    assert Q.leaked_banned_chars(corner, Q.ALL_QUOTES) == 0

    italic = "The phrase *raised rates on Thursday* signals a figure, not **bold** text or 2 * 3 * 4."
    h = Q.hatches(italic)
    assert h["italic"] == 1 and h["bold"] == 1

    paren = ("Business news (probably a wire report).\nThe phrase (raised rates on Thursday) signals a figure.\n"
             "Final token (Thursday) ends a clause, expecting (,) or (.).")
    assert Q.hatches(paren)["paren_verbatim"] == 4  # the aside is not counted
    assert Q.hatches("A report (e.g. from Reuters) on rates (in the US).")["paren_verbatim"] == 0
    assert Q.hatches("The tone (raised rates on Thursday) signals worry.")["paren_verbatim"] == 1  # cue after

    dash = "The phrase \u2014raised rates on Thursday\u2014 signals a figure."
    assert Q.hatches(dash)["em_dash"] == 1
    assert Q.hatches("One dash \u2014 only.")["em_dash"] == 0
    # the mini AV's own substitutes under the both-families ban
    assert Q.hatches("The phrase - $1.00 to lower - from")["hyphen_pair"] == 1
    assert Q.hatches("The phrase $$1.05 trillion in 2004.")["double_dollar"] == 1
    assert Q.hatches("Price $1.05, a well-known rise.") == dict.fromkeys(Q.HATCH_KINDS, 0)

    other = "Phrases `raised rates` and <<on Thursday>> and \u2039rates\u203a and \u00abrates\u00bb."
    h = Q.hatches(other)
    assert (h["backtick"], h["ascii_angle"], h["single_angle"], h["double_angle"]) == (1, 1, 1, 1)
    assert not Q.uses_hatch(other, exclude=("backtick", "ascii_angle", "single_angle", "double_angle"))
    assert set(Q.hatches("")) == set(Q.HATCH_KINDS)


def test_condition_table():
    rng = np.random.default_rng(0)
    n = 40
    docs = np.repeat(np.arange(10), 4)
    texts_free = ["The phrase raised rates signals a figure."] * n
    texts_mixed = ["The phrase 「raised rates」 signals a figure." if i % 4 == 0 else texts_free[i] for i in range(n)]
    nm = rng.uniform(0.01, 0.02, n)
    nm[::4] = 0.005  # the hatch users reconstruct better
    conds = {"unconstrained": dict(nmse=nm, cos=1 - nm / 2, texts=[RELEASED] * n, doc_ids=docs),
             "ban both": dict(nmse=nm, cos=1 - nm / 2, texts=texts_mixed, doc_ids=docs)}
    rows = Q.condition_table(conds, var=0.05, n_boot=50, banned={"ban both": Q.ALL_QUOTES})
    by = {r["condition"]: r for r in rows}
    assert set(by) == {"unconstrained", "ban both", "ban both / hatch-free", "ban both / hatch-using"}
    top = by["ban both"]
    assert top["n"] == n and top["leaked_banned_chars"] == 0 and top["hatch_share"] == pytest.approx(0.25)
    assert top["fve"] == pytest.approx(1 - nm.mean() / 0.05, rel=1e-5)
    lo, hi = top["fve_ci95"]
    assert lo <= top["fve"] <= hi
    assert by["ban both / hatch-using"]["n"] == 10 and by["ban both / hatch-free"]["n"] == 30
    assert by["ban both / hatch-using"]["fve"] > by["ban both / hatch-free"]["fve"]
    assert top["hatch_counts"]["corner"] == 10
    assert by["unconstrained"]["decodes_with_double"] == n


# ---------------------------------------------------------------------------
# §3 verbatim runs
# ---------------------------------------------------------------------------

def test_longest_run_punctuation_case_and_apostrophes():
    ctx = "The central bank raised rates on Thursday, citing inflation. It didn\u2019t say more."
    assert V.longest_run('The phrase "Raised rates, on THURSDAY" signals a figure.', ctx) == 4
    assert V.longest_run("It didn't say", ctx) == 3  # typographic vs ASCII apostrophe
    assert V.longest_run("nothing shared here", ctx) == 0
    assert V.longest_run("", ctx) == 0
    assert V.longest_run("\uff32aised rates", ctx) == 2  # fullwidth letter folded by NFKC
    # Order matters: the same words shuffled are not a run.
    assert V.longest_run("Thursday on rates raised", ctx) == 1


def test_shuffled_context_null_and_stats():
    contexts = ["alpha beta gamma delta epsilon zeta", "one two three four five six seven"]
    contexts = [contexts[0]] * 3 + [contexts[1]] * 3
    docs = [0, 0, 0, 1, 1, 1]
    expl = [c for c in contexts]  # a perfect copier
    own = V.run_lengths(expl, contexts)
    null = V.shuffled_context_null(expl, contexts, docs, seed=3)
    assert own.tolist() == [6, 6, 6, 7, 7, 7]
    assert null.tolist() == [0] * 6  # every row paired with the other document
    s = V.run_stats([0, 0, 1, 2, 4, 6, 7, 0, 0, 10])
    assert s["median"] == 1.5 and s["share_ge_6"] == pytest.approx(0.3) and s["max"] == 10
    assert s["p90"] == pytest.approx(np.quantile([0, 0, 1, 2, 4, 6, 7, 0, 0, 10], 0.9))
    assert V.run_stats([])["median"] is None


# ---------------------------------------------------------------------------
# §4 redaction
# ---------------------------------------------------------------------------

def test_parse_spans_released_style():
    spans = R.parse_spans(RELEASED)
    assert [s.content(RELEASED) for s in spans] == ["raised rates on Thursday", " Thursday", ",", "."]
    assert all(RELEASED[s.start] == '"' and RELEASED[s.end - 1] == '"' for s in spans)
    t = "The company's 'growth' didn't stall; \u201cdon\u2019t\u201d and \u2018rock\u2019n\u2019roll\u2019 and \"he said 'no'\"."
    assert [s.content(t) for s in R.parse_spans(t)] == ["growth", "don\u2019t", "rock\u2019n\u2019roll", "he said 'no'"]
    assert [s.family for s in R.parse_spans(t)] == ["single", "double", "single", "double"]
    # An unmatched mark is prose, and spans never cross a line.
    assert R.parse_spans('A stray " mark.\nThen "x".') == [R.Span(21, 24, '"', '"', "double")]


def test_edits_on_released_style():
    assert R.spans_only(RELEASED) == '"raised rates on Thursday"\n" Thursday" "," "."'
    assert R.spans_only(RELEASED, marks=False) == "raised rates on Thursday\n Thursday , ."
    prose = R.prose_only(RELEASED)
    assert prose == ("Business news report on rates.\nThe phrase signals a figure being reported.\n"
                     "Final token ends a clause, expecting or.")
    stripped = R.strip_quote_marks(RELEASED)
    assert '"' not in stripped and "raised rates on Thursday" in stripped
    assert R.strip_quote_marks("It didn't 'work'.") == "It didn't work."
    assert R.prose_only("no quotes at all") == R.strip_quote_marks("no quotes at all") == "no quotes at all"


def test_fillers_ordered_deterministic_and_marks_kept():
    assert R.FILLERS == ("placeholder", "redacted", "common_words", "random_tokens", "random_chars")
    for f in R.FILLERS:
        out = R.replace_spans(RELEASED, f, seed=7)
        assert out == R.replace_spans(RELEASED, f, seed=7)  # deterministic
        assert out.count('"') == RELEASED.count('"')       # marks kept, no new quote marks
        assert "raised rates" not in out and "Business news report on rates." in out
        spans = R.parse_spans(out)
        assert len(spans) == 4 and spans[1].content(out).startswith(" ")  # leading space kept
    assert R.replace_spans(RELEASED, "redacted").count("[REDACTED]") == 4
    assert R.replace_spans(RELEASED, "common_words", seed=1) != R.replace_spans(RELEASED, "common_words", seed=2)
    words = R.parse_spans(R.replace_spans(RELEASED, "common_words", seed=1))[0]
    assert len(words.content(R.replace_spans(RELEASED, "common_words", seed=1)).split()) == 4
    with pytest.raises(ValueError):
        R.replace_spans(RELEASED, "nonsense")


def test_redaction_stats_and_apply_edit():
    st = R.redaction_stats([RELEASED, "no quotes"])
    n_span_chars = sum(s.end - s.start for s in R.parse_spans(RELEASED))
    assert st["spans_per_decode"] == 2.0
    assert st["share_of_chars"] == pytest.approx(n_span_chars / (len(RELEASED) + 9))
    assert st["share_of_chars_content"] < st["share_of_chars"]

    batch = {"doc_id": np.array([1, 2, 3]),
             "explanation": np.array([RELEASED, None, float("nan")], dtype=object)}
    out = R.apply_edit(batch, "replace_spans", filler="redacted", seed=0)
    assert out["explanation_edit"].dtype == object and out["explanation_edit"][1:].tolist() == ["", ""]
    assert out["explanation_edit"][0] == R.replace_spans(RELEASED, "redacted", seed=0)
    assert out["explanation"] is batch["explanation"] and "explanation_edit" not in batch
    out = R.apply_edit(batch, "prose_only", dst="prose")
    assert out["prose"][0] == R.prose_only(RELEASED)
    with pytest.raises(ValueError):
        R.apply_edit(batch, "nope")


# ---------------------------------------------------------------------------
# §5 best-of-N
# ---------------------------------------------------------------------------

def _brute(m, n):
    return np.array([np.mean([row[list(c)].min() for c in itertools.combinations(range(m.shape[1]), n)])
                     for row in m])


def test_best_of_n_arithmetic():
    m = np.random.default_rng(0).uniform(0.005, 0.03, (7, 6))
    m[0, :3] = m[0, 3]  # ties
    np.testing.assert_allclose(B.best_of_n(m, 1), m.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(B.best_of_n(m, 6), m.min(axis=1), rtol=1e-12)
    prev = None
    for n in range(1, 7):
        exact = B.best_of_n(m, n)
        np.testing.assert_allclose(exact, _brute(m, n), rtol=1e-12)
        np.testing.assert_allclose(B.best_of_n(m, n, n_resamples=3000, seed=1), exact, atol=1.5e-3)
        if prev is not None:
            assert np.all(exact <= prev + 1e-15)  # monotone non-increasing in N
        prev = exact
    for k in (1, 5, 10):
        for n in range(1, k + 1):
            assert B.subset_min_weights(k, n).sum() == pytest.approx(1.0)
    with pytest.raises(ValueError):
        B.best_of_n(m, 7)
    assert B.best_index(m, 3).tolist() == np.argmin(m[:, :3], axis=1).tolist()


def test_to_matrix_curve_slope_and_failures():
    rng = np.random.default_rng(2)
    m = rng.uniform(0.01, 0.02, (5, 10))
    act = np.repeat(np.array(["a", "b", "c", "d", "e"]), 10)
    samp = np.tile(np.arange(10), 5)
    order = rng.permutation(50)
    mm, ids = B.to_matrix(act[order], samp[order], m.ravel()[order])
    np.testing.assert_array_equal(mm, m)
    assert ids.tolist() == ["a", "b", "c", "d", "e"]
    with pytest.raises(ValueError):
        B.to_matrix(act[:-1], samp[:-1], m.ravel()[:-1])  # a missing cell
    with pytest.raises(ValueError):
        B.to_matrix(np.r_[act, "a"], np.r_[samp, 0], np.r_[m.ravel(), 0.1])  # a duplicate

    rows = B.curve(m, (1, 2, 3, 5, 10, 20), var=0.05, greedy=m[:, 0], doc_ids=[0, 0, 1, 1, 2], n_boot=50)
    assert [r["selection"] for r in rows] == ["greedy", "1 sample", "best of 2", "best of 3", "best of 5", "best of 10"]
    fves = [r["fve"] for r in rows[1:]]
    assert fves == sorted(fves)
    assert rows[1]["nmse"] == pytest.approx(m.mean())
    assert rows[-1]["fve"] == pytest.approx(1 - m.min(axis=1).mean() / 0.05, rel=1e-5)

    Ns = np.array([1, 2, 3, 5, 10])
    assert B.slope_per_doubling(Ns, 0.77 + 0.01 * np.log2(Ns)) == pytest.approx(0.01)
    assert B.slope_per_doubling([1, 2], [0.5, 0.5]) == pytest.approx(0.0)

    tf = B.tag_failures(["ok", "ok", "no_close_tag", "ok", "no_open_tag", "ok"], act_ids=[1, 1, 1, 2, 2, 3])
    assert tf["failures"] == 2 and tf["activations_with_failure"] == 2
    assert tf["counts"] == {"no_close_tag": 1, "no_open_tag": 1, "ok": 4}
