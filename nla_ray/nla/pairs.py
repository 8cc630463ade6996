"""NLA pair directories: write them in the released layout, load them into engines.

Released layout (one directory per role, each a Hugging Face model dir):
  <av>/   config.json, model*.safetensors, tokenizer files, nla_meta.yaml
  <ar>/   config.json (num_hidden_layers = K+1), model*.safetensors, tokenizer files,
          value_head.safetensors (key "weight", [d, d]), nla_meta.yaml
Small pairs built from a packaged base model keep the same sidecars but, instead of weight
copies, name the base in `nla_meta.yaml` under `base_model` (spec + GGUF sha256); an optional
`adapter/` folder (PEFT LoRA) holds trained deltas. Both layouts load through `load_av`/`load_ar`.

Pair specs: ``mini:smollm2-L20`` / ``mini:gemma3-L12`` (embedded default), a directory holding
``av/`` and ``ar/``, or ``AV,AR`` with each a directory or hub id.
"""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import torch

from nla_ray.nla import sources
from nla_ray.nla import templates as T
from nla_ray.nla.ar import AREngine, ValueHead, load_value_head
from nla_ray.nla.av import AVEngine
from nla_ray.nla.models import (backbone_from_model, load_backbone, load_causal_lm, remote_code_allowed,
                                resolve_device, resolve_dtype, text_config)
from nla_ray.nla.sidecar import NlaMeta, SidecarError, read_sidecar, write_sidecar

# The mini world mirrors the paper world: layer ~2/3 depth, one pair per model family.
MINI_PAIRS = {
    "smollm2-L20": {"base": "pkg:smollm2-135m", "layer": 20},
    "gemma3-L12": {"base": "pkg:gemma3-270m", "layer": 12},
}
# nla_ray/pairs/, beside this package (nla_ray/nla/): the trained mini pairs ship there.
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "pairs"
# Characters the release chose; reused when the tokenizer has them as single tokens.
RELEASE_CHARS = ("\u321c", "\u320e", "\u33a1")  # ㈜ (Gemma-3), ㈎ (Qwen), ㎡ (Llama-3.3)
# Anchor text for measuring activation norms when choosing an injection scale.
NORM_PROBE_TEXT = (
    "The committee met on Tuesday to review the budget for the coming year. Members agreed that "
    "spending on schools and roads should rise, while administrative costs would be cut. The chair "
    "said the plan balanced growth with restraint, and a final vote is expected next month after "
    "a period of public consultation in which residents can submit their comments in writing."
)


@dataclass
class PairDirs:
    av: str
    ar: str


def _local_dir(spec: str) -> Path:
    p = Path(spec).expanduser()
    if p.is_dir():
        return p
    if spec.count("/") == 1:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "*.yaml", "*.model",
                                                            "*.txt", "*.jinja", "tokenizer*"]))
    raise FileNotFoundError(f"checkpoint {spec!r} is neither a directory nor a hub id")


def resolve_pair(spec: str) -> PairDirs:
    """``mini:NAME`` (the trained pair shipped in nla_ray/pairs/), ``mini-untrained:NAME`` (built on
    first use: the base model with an identity AV/AR, for plumbing checks only), a directory with
    av/ and ar/, or ``AV,AR`` (two directories or hub ids)."""
    for prefix in ("mini:", "mini-untrained:"):
        if spec.startswith(prefix):
            name = spec[len(prefix):]
            if name not in MINI_PAIRS:
                raise ValueError(f"unknown mini pair {name!r}; known: {sorted(MINI_PAIRS)}")
            if prefix == "mini-untrained:":
                d = ensure_untrained_pair(name)
                return PairDirs(str(d / "av"), str(d / "ar"))
            shipped = SHIPPED_DIR / name
            # Never fall back to an untrained pair here: its numbers look like results but mean nothing.
            for role in ("av", "ar"):
                if not (shipped / role / "nla_meta.yaml").is_file():
                    raise FileNotFoundError(
                        f"pair {spec}: the trained pair is missing ({shipped / role / 'nla_meta.yaml'} not found); "
                        f"train it with `python jobs/train_mini_nla.py --family {name}`, or ask for "
                        f"mini-untrained:{name} explicitly")
            return PairDirs(str(shipped / "av"), str(shipped / "ar"))
    if "," in spec:
        av, ar = (s.strip() for s in spec.split(",", 1))
        return PairDirs(str(_local_dir(av)), str(_local_dir(ar)))
    p = Path(spec).expanduser()
    if (p / "av").is_dir() and (p / "ar").is_dir():
        return PairDirs(str(p / "av"), str(p / "ar"))
    raise ValueError(f"pair spec {spec!r}: expected mini:NAME, a directory with av/ and ar/, or 'AV,AR'")


# ---------------------------------------------------------------------------------------------
# choosing the injection token


def choose_injection_char(tokenizer, template: str = T.DEFAULT_AV_TEMPLATE) -> str:
    """A rare character that is one token and does not merge with its neighbours in the AV prompt.

    The release's own characters win when the tokenizer has them; otherwise the single-character,
    non-ASCII, non-alphanumeric-Latin token with the highest id (BPE merges late = rarest) that
    passes the neighbour check.
    """
    def ok(ch: str) -> bool:
        ids = tokenizer.encode(ch, add_special_tokens=False)
        if len(ids) != 1 or ids[0] == getattr(tokenizer, "unk_token_id", None):
            return False
        prompt = T.av_prompt_ids(tokenizer, template, ch)
        return prompt.count(ids[0]) == 1

    for ch in RELEASE_CHARS:
        if ok(ch):
            return ch
    special = set(getattr(tokenizer, "all_special_ids", []))
    for tid in range(len(tokenizer) - 1, -1, -1):
        if tid in special:
            continue
        s = tokenizer.decode([tid])
        if len(s) != 1 or ord(s) < 0x2000:
            continue
        if unicodedata.category(s)[0] in "LS" and ok(s):
            return s
    raise ValueError("no single-token rare character found for injection")


def measure_layer_norm(model, tokenizer, layer: int, text: str = NORM_PROBE_TEXT) -> float:
    """Median L2 norm of raw block-`layer` outputs over a probe text (position 0 excluded: the first
    token's residual is an outlier in most models)."""
    bb = backbone_from_model(model, layer + 1)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=True)["input_ids"]
    with torch.no_grad():
        h = bb(input_ids=ids.to(next(model.parameters()).device)).last_hidden_state[0, 1:].float()
    return float(h.norm(dim=-1).median())


# ---------------------------------------------------------------------------------------------
# writing pairs


def build_metas(tokenizer, d_model: int, layer: int, injection_scale: float | None,
                extra: dict | None = None) -> tuple[NlaMeta, NlaMeta]:
    char = choose_injection_char(tokenizer)
    tid = tokenizer.encode(char, add_special_tokens=False)[0]
    prompt = T.av_prompt_ids(tokenizer, T.DEFAULT_AV_TEMPLATE, char)
    slot = prompt.index(tid)
    suffix = T.ar_suffix_ids(tokenizer, T.DEFAULT_AR_TEMPLATE)
    common = dict(d_model=d_model, mse_scale=math.sqrt(d_model), injection_char=char, injection_token_id=tid,
                  left_neighbor_id=prompt[slot - 1], right_neighbor_id=prompt[slot + 1],
                  critic_suffix_ids=suffix, av_template=T.DEFAULT_AV_TEMPLATE,
                  ar_template=T.DEFAULT_AR_TEMPLATE, layer=layer)
    raw = {"stage": "init"}
    raw.update(extra or {})
    av = NlaMeta(role="av", injection_scale=injection_scale, raw=dict(raw), **common)
    ar = NlaMeta(role="ar", injection_scale=None, raw=dict(raw), **common)
    return av, ar


def write_pair(out: str | Path, *, base_spec: str, model, tokenizer, layer: int,
               injection_scale: float | None = None, copy_weights: bool = False,
               value_head: torch.nn.Module | None = None) -> Path:
    """Write an (untrained unless `value_head` is given) NLA pair for `model` at layer K.

    AV = the base model; AR = its first K+1 blocks + a value head (identity unless given). With
    copy_weights the weights are saved into each dir (the released layout); otherwise the sidecar
    names the base spec and its sha256 so the pair is a few kB.
    """
    out = Path(out)
    d = text_config(model.config).hidden_size
    n_total = text_config(model.config).num_hidden_layers
    if not 0 <= layer < n_total:
        raise ValueError(f"layer {layer} outside 0..{n_total - 1}")
    if injection_scale is None:
        injection_scale = round(measure_layer_norm(model, tokenizer, layer), 2)
    resolved = sources.resolve(base_spec) if not copy_weights else None
    extra = {"base_checkpoint": base_spec}
    if resolved is not None:
        extra["base_model"] = {"source": base_spec, "gguf_file": resolved.gguf_file, "sha256": resolved.sha256}
    av_meta, ar_meta = build_metas(tokenizer, d, layer, injection_scale, extra)
    (out / "av").mkdir(parents=True, exist_ok=True)
    (out / "ar").mkdir(parents=True, exist_ok=True)
    if copy_weights:
        model.save_pretrained(out / "av", safe_serialization=True)
        tokenizer.save_pretrained(out / "av")
        bb = backbone_from_model(model, layer + 1)
        bb.save_pretrained(out / "ar", safe_serialization=True)
        tokenizer.save_pretrained(out / "ar")
    head = value_head or ValueHead(d)
    if value_head is None:
        with torch.no_grad():
            head.weight.copy_(torch.eye(d))  # the release initialises the head at identity
    from safetensors.torch import save_file

    save_file({"weight": head.weight.detach().float().cpu().contiguous()}, str(out / "ar" / "value_head.safetensors"))
    write_sidecar(out / "av", av_meta)
    write_sidecar(out / "ar", ar_meta)
    return out


def ensure_untrained_pair(name: str) -> Path:
    cfg = MINI_PAIRS[name]
    res = sources.resolve(cfg["base"])
    out = sources.cache_root() / "pairs" / f"{name}-untrained-{(res.sha256 or 'x')[:16]}"
    if (out / "ar" / "nla_meta.yaml").is_file():
        return out
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(res.path)
    model = load_causal_lm(res.path, device=torch.device("cpu"), dtype=torch.float32)
    tmp = out.with_name(out.name + ".tmp")
    write_pair(tmp, base_spec=cfg["base"], model=model, tokenizer=tok, layer=cfg["layer"])
    tmp.rename(out)
    return out


# ---------------------------------------------------------------------------------------------
# loading


def _weights_and_tokenizer(directory: Path, meta: NlaMeta) -> tuple[str, str]:
    """(path with weights, path with tokenizer) for either layout."""
    if (directory / "config.json").is_file():
        return str(directory), str(directory)
    base = meta.raw.get("base_model") or {}
    spec = base.get("source")
    if not spec:
        raise SidecarError(meta.path, "base_model.source", "weights in the directory or a base model spec",
                           None, f"{directory} has no config.json")
    res = sources.resolve(spec)
    want = base.get("sha256")
    if want and res.sha256 and want != res.sha256:
        raise SidecarError(meta.path, "base_model.sha256", want, res.sha256,
                           "the installed base model file differs from the one this pair was built on")
    return res.path, res.path


def apply_adapter(model, directory: str | Path):
    """`model` with the LoRA adapter of a pair role directory (`<dir>/adapter/`) merged in; a role
    without an adapter (full weights) is returned unchanged."""
    directory = Path(directory)
    ad = directory / "adapter"
    if not (ad / "adapter_config.json").is_file():
        return model
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(ad)).merge_and_unload()


def load_av(directory: str | Path, *, device=None, dtype=None, max_new_tokens: int = 150,
            backend: str = "loop", decode_batch=None, attn: str = "auto") -> AVEngine:
    from transformers import AutoTokenizer

    directory = Path(directory)
    meta = read_sidecar(directory)
    if meta.role != "av":
        raise SidecarError(meta.path, "role", "av", meta.role)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    wpath, tpath = _weights_and_tokenizer(directory, meta)
    tok = AutoTokenizer.from_pretrained(tpath, trust_remote_code=remote_code_allowed())
    model = apply_adapter(load_causal_lm(wpath, device=dev, dtype=dt), directory)
    return AVEngine(model, tok, meta, max_new_tokens=max_new_tokens, backend=backend, decode_batch=decode_batch,
                    attn=attn)


def load_ar(directory: str | Path, *, device=None, dtype=None) -> AREngine:
    from transformers import AutoTokenizer

    directory = Path(directory)
    meta = read_sidecar(directory)
    if meta.role != "ar":
        raise SidecarError(meta.path, "role", "ar", meta.role)
    head_path = directory / "value_head.safetensors"
    if not head_path.is_file():
        raise FileNotFoundError(f"{directory}: missing value_head.safetensors (the AR's Linear(d, d) head)")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    wpath, tpath = _weights_and_tokenizer(directory, meta)
    tok = AutoTokenizer.from_pretrained(tpath, trust_remote_code=remote_code_allowed())
    tok.padding_side = "right"
    if (directory / "adapter" / "adapter_config.json").is_file():
        model = apply_adapter(load_causal_lm(wpath, device=dev, dtype=dt), directory)
        bb = backbone_from_model(model, meta.layer + 1)
    else:
        bb = load_backbone(wpath, meta.layer + 1, device=dev, dtype=dt)
    head = load_value_head(head_path, meta.d_model, where=str(head_path))
    return AREngine(bb, head, tok, meta)
