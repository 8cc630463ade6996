"""Loading decoders the way NLAs need them.

Two views of a base model:
  - the full causal LM (the AV generates with it);
  - a *backbone* truncated to its first K+1 blocks with the final norm replaced by identity, so its
    last hidden state is the raw output of block K = HF ``hidden_states[K+1]`` (the AR, and
    extraction without running the blocks above K).

Gemma-3 checkpoints can load as the multimodal wrapper; `decoder_of` finds the text decoder in
either layout. Safe defaults: ``trust_remote_code=False`` and safetensors only. A checkpoint that
holds its weights only as pickle files, or asks to run its own Python code (`auto_map`), is refused
with the file named; custom code runs only when the user opts in with NLA_RAY_TRUST_REMOTE_CODE=1.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

SAFE = {"trust_remote_code": False, "use_safetensors": True}
REMOTE_CODE_ENV = "NLA_RAY_TRUST_REMOTE_CODE"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def remote_code_allowed() -> bool:
    """Whether the user opted in to running a checkpoint's own Python code (off unless
    NLA_RAY_TRUST_REMOTE_CODE is 1/true/yes)."""
    return os.environ.get(REMOTE_CODE_ENV, "").strip().lower() in ("1", "true", "yes")


def check_weights_dir(path: str | Path) -> None:
    """Refuse, naming the file, a local checkpoint whose weights exist only as pickle files (loading
    a pickle can run code) or whose config asks for custom code without the user's opt-in. A hub id
    (not a local directory) is left to `from_pretrained`, which loads safetensors only."""
    p = Path(path)
    if not p.is_dir():
        return
    if not remote_code_allowed():
        for name in ("config.json", "tokenizer_config.json"):
            f = p / name
            try:
                data = json.loads(f.read_text()) if f.is_file() else {}
            except (OSError, ValueError):
                continue
            if isinstance(data, dict) and data.get("auto_map"):
                raise ValueError(
                    f"{f}: field 'auto_map' asks to run the checkpoint's own Python code ({data['auto_map']}); "
                    f"expected no custom code (trust_remote_code is off). Set {REMOTE_CODE_ENV}=1 to allow it "
                    "explicitly if you trust this checkpoint")
    safetensors = list(p.glob("*.safetensors")) + list(p.glob("*.safetensors.index.json"))
    pickles = sorted(f.name for f in p.iterdir() if f.is_file() and f.suffix in PICKLE_SUFFIXES)
    if not safetensors and pickles:
        raise ValueError(
            f"{p}: weights only as pickle files ({', '.join(pickles[:4])}); expected *.safetensors. nla_ray "
            "loads safetensors only (unpickling can run code). Convert once where you trust the file: "
            "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)")


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        # fp32 on CPU (bf16 matmuls are slow there); bf16 on GPU for the big checkpoints.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"dtype {dtype!r} not one of {sorted(table)}")
    return table[dtype]


def text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def truncate_config(config, n_layers: int):
    """Copy of `config` whose text decoder keeps blocks 0..n_layers-1 (per-layer lists cut too)."""
    config = copy.deepcopy(config)
    tc = text_config(config)
    total = tc.num_hidden_layers
    if not 1 <= n_layers <= total:
        raise ValueError(f"cannot keep {n_layers} blocks of a {total}-block model")
    for key, val in list(vars(tc).items()):
        # layer_types (Gemma-3 sliding/global, Qwen windows) and similar per-layer lists
        if isinstance(val, list) and len(val) == total and key != "architectures":
            setattr(tc, key, val[:n_layers])
    tc.num_hidden_layers = n_layers
    return config


def decoder_of(model: nn.Module) -> nn.Module:
    """The text decoder stack (has .layers and .embed_tokens) in CausalLM or multimodal layouts."""
    for path in ("model.language_model", "language_model.model", "language_model", "model", ""):
        mod = model
        ok = True
        for part in filter(None, path.split(".")):
            mod = getattr(mod, part, None)
            if mod is None:
                ok = False
                break
        if ok and hasattr(mod, "layers") and hasattr(mod, "embed_tokens"):
            return mod
    raise TypeError(f"cannot find a text decoder in {type(model).__name__}")


def text_lm_view(model: nn.Module) -> nn.Module:
    """A text-only causal LM over `model`'s weights, for `generate(inputs_embeds=...)`: `model` itself
    unless it is a multimodal wrapper (Gemma3ForConditionalGeneration, whose generate refuses
    inputs_embeds); then the text config's own CausalLM class, built on the meta device and handed
    the wrapper's decoder and LM head (shared, not copied)."""
    tc = text_config(model.config)
    if tc is model.config:
        return model
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        view = AutoModelForCausalLM.from_config(tc)
    view.model = decoder_of(model)
    view.lm_head = model.get_output_embeddings()
    left = [n for n, t in [*view.named_parameters(), *view.named_buffers()] if t.is_meta]
    if left:
        raise TypeError(f"{type(view).__name__} over {type(model).__name__}: {left[:4]} not taken from the wrapper")
    view.generation_config = model.generation_config
    return view.eval()


def identity_final_norm(decoder: nn.Module) -> None:
    for name in ("norm", "final_layernorm", "ln_f"):
        if hasattr(decoder, name):
            setattr(decoder, name, nn.Identity())
            return
    raise TypeError(f"{type(decoder).__name__} has no final norm attribute to replace")


def load_causal_lm(path: str, *, device: torch.device, dtype: torch.dtype, config=None, **kw: Any):
    from transformers import AutoConfig, AutoModelForCausalLM

    check_weights_dir(path)
    trust = remote_code_allowed()
    if config is None:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust)
    model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype, **{**SAFE, "trust_remote_code": trust},
                                                 **kw)
    return model.to(device).eval()


def load_backbone(path: str, n_layers: int, *, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Blocks 0..n_layers-1 with identity final norm; drops the LM head (the AR has none)."""
    from transformers import AutoConfig

    from transformers.utils import logging as hf_logging

    check_weights_dir(path)
    config = truncate_config(AutoConfig.from_pretrained(path, trust_remote_code=remote_code_allowed()), n_layers)
    # Blocks above K are in the checkpoint by design; the 'unexpected keys' report is noise here.
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = load_causal_lm(path, device=device, dtype=dtype, config=config)
    finally:
        hf_logging.set_verbosity(level)
    dec = decoder_of(model)
    identity_final_norm(dec)
    return dec.eval()


def backbone_from_model(model: nn.Module, n_layers: int) -> nn.Module:
    """Truncated, identity-normed *view* of an in-memory model (weights shared, not copied)."""
    dec = decoder_of(model)
    view = copy.copy(dec)  # shallow: shares parameters
    view._modules = dict(dec._modules)
    view.layers = nn.ModuleList(list(dec.layers)[:n_layers])
    view.config = truncate_config(dec.config, n_layers)
    identity_final_norm(view)
    return view
