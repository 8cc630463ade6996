"""§3 arithmetic: are the AV's quotes verbatim?

The AV never sees the text, only one residual vector, so anything it "quotes" is a reconstruction.
We measure the longest contiguous run of words an explanation shares with the true source context
(the document text up to and including the explained token) and compare it with a null in which
each explanation is paired with a context from a *different* document. Equal distributions mean
the quotes carry no copied text beyond what generic phrasing already shares.

Word matching is ``core.metrics.longest_common_word_run`` (lowercased ``\\w+(?:'\\w+)?`` words,
so punctuation and case never break or create a run). Before that, both texts are NFKC-normalised
and typographic apostrophes are folded to ASCII: a context that writes "don’t" and an explanation
that writes "don't" must be one word on both sides, not "don" + "t" on one side only.
"""

from __future__ import annotations

import unicodedata
from typing import Sequence

import numpy as np

from nla_ray.core import metrics

__all__ = ["normalize_text", "longest_run", "run_lengths", "shuffled_context_null", "run_stats"]

# Apostrophe look-alikes that appear inside words (’ is what most web text uses).
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "\uff07": "'", "\u2032": "'"})


def normalize_text(text: str) -> str:
    """NFKC (fullwidth -> ASCII, ligatures split) and apostrophe folding; words otherwise unchanged."""
    return unicodedata.normalize("NFKC", text or "").translate(_APOSTROPHES)


def longest_run(explanation: str, context: str) -> int:
    """Longest contiguous word run shared by ``explanation`` and ``context``, in words.

    ``context`` should be the source text up to and including the explained position (Extract's
    ``prefix_text``); text after the position is not something the vector could encode.
    """
    return metrics.longest_common_word_run(normalize_text(explanation), normalize_text(context))


def run_lengths(explanations: Sequence[str], contexts: Sequence[str]) -> np.ndarray:
    """``longest_run`` row by row, as an int64 array."""
    if len(explanations) != len(contexts):
        raise ValueError(f"{len(explanations)} explanations but {len(contexts)} contexts")
    return np.array([longest_run(e, c) for e, c in zip(explanations, contexts)], dtype=np.int64)


def shuffled_context_null(explanations: Sequence[str], contexts: Sequence[str], doc_ids: Sequence,
                          seed: int = 0) -> np.ndarray:
    """Run lengths when each explanation is scored against another document's context.

    The pairing is ``metrics.derangement_indices`` with the documents as clusters, so no
    explanation meets its own document (as long as no document holds more than half the rows);
    pairing within a document would credit phrases the document repeats.
    """
    n = len(explanations)
    if len(contexts) != n or len(doc_ids) != n:
        raise ValueError(f"lengths differ: {n} explanations, {len(contexts)} contexts, {len(doc_ids)} doc ids")
    perm = metrics.derangement_indices(n, clusters=np.asarray(doc_ids), seed=seed)
    return run_lengths(explanations, [contexts[j] for j in perm])


def run_stats(lengths: Sequence[int], threshold: int = 6) -> dict:
    """``{n, median, p90, mean, max, share_ge_6}`` of run lengths.

    Quantiles are numpy's default linear interpolation. ``share_ge_<threshold>`` is the fraction of
    decodes with a run of at least ``threshold`` words — six words of the same order is where a
    shared run stops being explainable by common collocations ("one of the", "at the end of").
    """
    x = np.asarray(lengths, dtype=np.float64)
    key = f"share_ge_{threshold}"
    if x.size == 0:
        return {"n": 0, "median": None, "p90": None, "mean": None, "max": None, key: None}
    return {"n": int(x.size), "median": float(np.median(x)), "p90": float(np.quantile(x, 0.9)),
            "mean": float(x.mean()), "max": int(x.max()), key: float((x >= threshold).mean())}
