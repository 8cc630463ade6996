"""The `nla_meta.yaml` sidecar: the contract between a checkpoint and every line that uses it.

Nothing it holds is hard-coded elsewhere. `read_sidecar` parses both the current field names
(role av/ar, prompt_templates.av/ar, critic.extraction_layer_index) and the older ones
(actor/critic, critic.num_hidden_layers); `check_tokenizer` asserts each token fact against the
live tokenizer. Every failure raises `SidecarError` naming the file, the field, the expected and
the live value.
"""

from __future__ import annotations

import datetime as _dt
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nla_ray.nla import templates as T

SIDECAR_NAME = "nla_meta.yaml"
_ROLES = {"av": "av", "actor": "av", "ar": "ar", "critic": "ar"}
SCHEMA_VERSIONS = (1, 2)  # the sidecar versions this code reads (absent: the release's files, read as 1)
MISSING = "<missing>"


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class SidecarError(ValueError):
    def __init__(self, where: str, field_name: str, expected: Any, live: Any, hint: str = ""):
        self.field = field_name
        msg = f"{where}: field '{field_name}': expected {expected!r}, live {live!r}"
        super().__init__(msg + (f" ({hint})" if hint else ""))


def resolve_scale(spec: Any, d_model: int, *, where: str = "?", field_name: str = "scale") -> float | None:
    """null/'raw'/'none' -> None (use the vector as is), 'sqrt_d_model' -> sqrt(d), number -> float."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("raw", "none", "null")):
        return None
    if isinstance(spec, str) and spec.strip() == "sqrt_d_model":
        return math.sqrt(d_model)
    try:
        val = float(spec)
    except (TypeError, ValueError):
        raise SidecarError(where, field_name, "a number, null or 'sqrt_d_model'", spec) from None
    if not math.isfinite(val) or val <= 0:
        raise SidecarError(where, field_name, "a positive finite number", spec)
    return val


@dataclass
class NlaMeta:
    role: str                          # "av" | "ar"
    d_model: int
    injection_scale: float | None
    mse_scale: float | None
    injection_char: str
    injection_token_id: int
    left_neighbor_id: int | None
    right_neighbor_id: int | None
    critic_suffix_ids: list[int] | None
    av_template: str
    ar_template: str
    layer: int | None                  # K: output of decoder block K = hidden_states[K+1]
    raw: dict = field(default_factory=dict, repr=False)
    path: str = "<memory>"

    # --- reading -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict, where: str = "<memory>") -> "NlaMeta":
        if not isinstance(d, dict):
            raise SidecarError(where, "<root>", "a mapping", type(d).__name__)
        kind = d.get("kind", MISSING)
        if kind != "nla_model":
            raise SidecarError(where, "kind", "nla_model", kind)
        version = d.get("schema_version", 1)
        if not _int(version) or version not in SCHEMA_VERSIONS:
            raise SidecarError(where, "schema_version", f"one of {list(SCHEMA_VERSIONS)}", version,
                               "written by a newer or another tool: upgrade nla_ray or convert the file")
        role = _ROLES.get(str(d.get("role", "")).lower())
        if role is None:
            raise SidecarError(where, "role", "one of av/ar (or actor/critic)", d.get("role", MISSING))
        d_model = d.get("d_model", MISSING)
        if not isinstance(d_model, int) or isinstance(d_model, bool) or d_model <= 0:
            raise SidecarError(where, "d_model", "a positive integer", d_model)
        ext = d.get("extraction") or {}
        if not isinstance(ext, dict):
            raise SidecarError(where, "extraction", "a mapping", ext)
        if role == "av" and "injection_scale" not in ext:  # null is a value (inject raw); absence is not
            raise SidecarError(where, "extraction.injection_scale", "a number, null or 'sqrt_d_model'", MISSING,
                               "an AV must say what norm the vector is injected at")
        inj = resolve_scale(ext.get("injection_scale"), d_model, where=where,
                            field_name="extraction.injection_scale")
        mse = resolve_scale(ext.get("mse_scale", "sqrt_d_model"), d_model, where=where,
                            field_name="extraction.mse_scale")
        tok = d.get("tokens", MISSING)
        if not isinstance(tok, dict):
            raise SidecarError(where, "tokens", "a mapping", tok)
        char = tok.get("injection_char", MISSING)
        if not isinstance(char, str) or len(char) != 1:
            raise SidecarError(where, "tokens.injection_char", "a single character", char)
        tid = tok.get("injection_token_id", MISSING)
        if not _int(tid):
            raise SidecarError(where, "tokens.injection_token_id", "an integer", tid)
        for side in ("left", "right"):
            name = f"injection_{side}_neighbor_id"
            v = tok.get(name, MISSING)
            if role == "av" and v is MISSING:
                raise SidecarError(where, f"tokens.{name}", "an integer (the token beside the slot)", MISSING,
                                   "without it the slot cannot be checked against the live tokenizer")
            if v is not MISSING and v is not None and not _int(v):
                raise SidecarError(where, f"tokens.{name}", "an integer", v)
        suffix = tok.get("critic_suffix_ids", MISSING)
        if role == "ar" and suffix is MISSING:
            raise SidecarError(where, "tokens.critic_suffix_ids", "a list of integers (null skips the check)",
                               MISSING, "without it the AR prompt's tail cannot be checked")
        suffix = None if suffix is MISSING else suffix
        if suffix is not None and not (isinstance(suffix, list) and all(_int(i) for i in suffix)):
            raise SidecarError(where, "tokens.critic_suffix_ids", "a list of integers or null", suffix)
        pt = d.get("prompt_templates") or {}
        if not isinstance(pt, dict):
            raise SidecarError(where, "prompt_templates", "a mapping", pt)
        av_t = pt.get("av", pt.get("actor"))
        ar_t = pt.get("ar", pt.get("critic"))
        if role == "av" and not (isinstance(av_t, str) and "{injection_char}" in av_t):
            raise SidecarError(where, "prompt_templates.av", "a template containing {injection_char}",
                               MISSING if av_t is None else av_t)
        if role == "ar" and not (isinstance(ar_t, str) and "{explanation}" in ar_t):
            raise SidecarError(where, "prompt_templates.ar", "a template containing {explanation}",
                               MISSING if ar_t is None else ar_t)
        critic = d.get("critic") or {}
        if not isinstance(critic, dict):
            raise SidecarError(where, "critic", "a mapping", critic)
        layer = critic.get("extraction_layer_index", critic.get("num_hidden_layers",
                                                                  d.get("extraction_layer_index")))
        if role == "ar" and not _int(layer):
            raise SidecarError(where, "critic.extraction_layer_index", "an integer layer K",
                               MISSING if layer is None else layer)
        return cls(role=role, d_model=d_model, injection_scale=inj, mse_scale=mse,
                   injection_char=char, injection_token_id=tid,
                   left_neighbor_id=tok.get("injection_left_neighbor_id"),
                   right_neighbor_id=tok.get("injection_right_neighbor_id"),
                   critic_suffix_ids=suffix, av_template=av_t or T.DEFAULT_AV_TEMPLATE,
                   ar_template=ar_t or T.DEFAULT_AR_TEMPLATE,
                   layer=layer if isinstance(layer, int) else None, raw=d, path=where)

    # --- checking against the live tokenizer / model ----------------------------------------
    def check_tokenizer(self, tokenizer) -> list[int]:
        """Assert every token fact; returns the canonical AV prompt ids (AV) or the AR suffix (AR)."""
        w = self.path
        enc = [int(i) for i in tokenizer.encode(self.injection_char, add_special_tokens=False)]
        if enc != [self.injection_token_id]:
            raise SidecarError(w, "tokens.injection_token_id", [self.injection_token_id], enc,
                               f"injection char {self.injection_char!r} must encode to one token")
        unk = getattr(tokenizer, "unk_token_id", None)
        if unk is not None and self.injection_token_id == unk:
            raise SidecarError(w, "tokens.injection_token_id", "not the UNK token", unk)
        if self.role == "av":
            ids = T.av_prompt_ids(tokenizer, self.av_template, self.injection_char)
            nbos = T.count_leading_bos(ids, getattr(tokenizer, "bos_token_id", None))
            if nbos > 1:
                raise SidecarError(w, "prompt (chat template)", "at most one leading <bos>", f"{nbos} <bos>",
                                   "the prompt was tokenized twice with special tokens")
            slots = [i for i, t in enumerate(ids) if t == self.injection_token_id]
            if len(slots) != 1:
                raise SidecarError(w, "tokens.injection_token_id", "exactly one slot in the AV prompt",
                                   f"{len(slots)} occurrences")
            p = slots[0]
            if not 0 < p < len(ids) - 1:
                raise SidecarError(w, "tokens.injection_token_id", "a slot with two neighbours", f"position {p}")
            if self.left_neighbor_id is not None and ids[p - 1] != self.left_neighbor_id:
                raise SidecarError(w, "tokens.injection_left_neighbor_id", self.left_neighbor_id, ids[p - 1])
            if self.right_neighbor_id is not None and ids[p + 1] != self.right_neighbor_id:
                raise SidecarError(w, "tokens.injection_right_neighbor_id", self.right_neighbor_id, ids[p + 1])
            return ids
        live = T.ar_suffix_ids(tokenizer, self.ar_template)
        if self.critic_suffix_ids is not None and list(self.critic_suffix_ids) != live:
            raise SidecarError(w, "tokens.critic_suffix_ids", list(self.critic_suffix_ids), live)
        probe = tokenizer(T.ar_prompt(self.ar_template, "A probe explanation."),
                          add_special_tokens=True)["input_ids"]
        if list(probe[-len(live):]) != live:
            raise SidecarError(w, "tokens.critic_suffix_ids", live, list(probe[-len(live):]),
                               "the tokenized AR prompt does not end with the suffix")
        nbos = T.count_leading_bos(probe, getattr(tokenizer, "bos_token_id", None))
        if nbos > 1:
            raise SidecarError(w, "AR prompt", "at most one leading <bos>", f"{nbos} <bos>")
        return live

    def check_width(self, hidden_size: int) -> None:
        if hidden_size != self.d_model:
            raise SidecarError(self.path, "d_model", self.d_model, hidden_size, "model hidden size")

    # --- writing ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dict(self.raw)
        d.update({
            "kind": "nla_model", "schema_version": 2, "role": self.role, "d_model": self.d_model,
            "extraction": {"injection_scale": self.injection_scale, "mse_scale": self.mse_scale},
            "tokens": {"injection_char": self.injection_char,
                       "injection_token_id": self.injection_token_id,
                       "injection_left_neighbor_id": self.left_neighbor_id,
                       "injection_right_neighbor_id": self.right_neighbor_id,
                       "critic_suffix_ids": self.critic_suffix_ids},
            "prompt_templates": {"av": self.av_template, "ar": self.ar_template},
        })
        if self.layer is not None:
            d["extraction_layer_index"] = self.layer
            if self.role == "ar":
                d["critic"] = {"extraction_layer_index": self.layer}
        d.setdefault("created_at", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        d.setdefault("created_by", "nla_ray")
        return d


def read_sidecar(directory: str | Path) -> NlaMeta:
    p = Path(directory) / SIDECAR_NAME
    if not p.is_file():
        raise SidecarError(str(p), "<file>", "an nla_meta.yaml sidecar", "missing")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise SidecarError(str(p), "<yaml>", "valid YAML", str(e).splitlines()[0]) from None
    return NlaMeta.from_dict(data, where=str(p))


def write_sidecar(directory: str | Path, meta: NlaMeta) -> Path:
    p = Path(directory) / SIDECAR_NAME
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(yaml.safe_dump(meta.to_dict(), sort_keys=False, allow_unicode=True), encoding="utf-8")
    return p
