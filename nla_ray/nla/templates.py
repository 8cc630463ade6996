"""AV and AR prompts, and parsing what the AV writes.

Format facts (NLA release): the AV prompt is one user turn rendered by the tokenizer's chat
template and tokenized in the same call; the AR prompt is a raw string tokenized with
``add_special_tokens=True`` (Gemma/Llama get exactly one ``<bos>``); the AV answers inside
``<explanation>...</explanation>``.
"""

from __future__ import annotations

import re
from typing import Sequence

# The release's default templates. Checkpoints carry their own copy in nla_meta.yaml, which wins.
DEFAULT_AV_TEMPLATE = (
    "You are a meticulous AI researcher conducting an important investigation into activation "
    "vectors from a language model. Your overall task is to describe the semantic content of that "
    "activation vector.\n\n"
    "We will pass the vector enclosed in <concept> tags into your context. You must then produce an "
    "explanation for the vector, enclosed within <explanation> tags. The explanation consists of "
    "2-3 text snippets describing that vector.\n\n"
    "Here is the vector:\n\n"
    "<concept>{injection_char}</concept>\n\n"
    "Please provide an explanation."
)
DEFAULT_AR_TEMPLATE = "Summary of the following text: <text>{explanation}</text> <summary>"

OPEN_TAG, CLOSE_TAG = "<explanation>", "</explanation>"
_EXPL_RE = re.compile(r"<explanation>(.*?)</explanation>", re.DOTALL)


def _as_id_list(out) -> list[int]:
    """apply_chat_template returns a list, a BatchEncoding or a nested list depending on version."""
    if hasattr(out, "keys") and "input_ids" in out:
        out = out["input_ids"]
    if hasattr(out, "tolist"):
        out = out.tolist()
    if out and isinstance(out[0], list):
        if len(out) != 1:
            raise ValueError(f"expected one tokenized prompt, got {len(out)}")
        out = out[0]
    return [int(i) for i in out]


def av_prompt_text(template: str, injection_char: str) -> str:
    if "{injection_char}" not in template:
        raise ValueError("AV template has no {injection_char} placeholder")
    return template.replace("{injection_char}", injection_char)


def av_prompt_ids(tokenizer, template: str, injection_char: str) -> list[int]:
    """Chat-templated AV prompt, tokenized in one step (two steps would double Gemma's <bos>)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("tokenizer has no chat template: the AV prompt must be a chat turn "
                         "(for a base Gemma-3 load it through nla_ray.nla.sources, which supplies the turn format)")
    msgs = [{"role": "user", "content": av_prompt_text(template, injection_char)}]
    out = tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
    return _as_id_list(out)


def count_leading_bos(ids: Sequence[int], bos_id: int | None) -> int:
    n = 0
    while bos_id is not None and n < len(ids) and ids[n] == bos_id:
        n += 1
    return n


def ar_prompt(template: str, explanation: str) -> str:
    if "{explanation}" not in template:
        raise ValueError("AR template has no {explanation} placeholder")
    return template.replace("{explanation}", explanation)


def ar_suffix_ids(tokenizer, template: str) -> list[int]:
    """Expected tail of every tokenized AR prompt. The first token of the suffix is dropped because
    it can merge with the explanation's last character (e.g. '.</')."""
    suffix = template.split("{explanation}")[-1]
    ids = tokenizer(suffix, add_special_tokens=False)["input_ids"]
    if len(ids) < 2:
        raise ValueError(f"AR template suffix {suffix!r} tokenizes to fewer than 2 tokens")
    return [int(i) for i in ids[1:]]


def parse_explanation(text: str) -> tuple[str | None, str]:
    """(explanation, status) with status in ok / no_close_tag / no_open_tag.

    No closing tag means a truncated or failed decode (the assessment's 'tag failure'); the text
    after an unclosed opening tag is still returned so it can be inspected and, if wanted, scored.
    """
    m = _EXPL_RE.search(text)
    if m:
        return m.group(1).strip(), "ok"
    if OPEN_TAG in text:
        return text.split(OPEN_TAG, 1)[1].strip(), "no_close_tag"
    return None, "no_open_tag"


def explanation_target(text: str) -> str:
    """The SFT target format of the release: tags on their own lines."""
    return f"{OPEN_TAG}\n{text}\n{CLOSE_TAG}"
