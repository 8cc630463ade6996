"""The AR engine: explanation text -> reconstructed activation.

The base model truncated to blocks 0..K (identity final norm, no LM head) reads the AR template
around the explanation; the value head (Linear(d, d, bias=False)) applied to the *last real token*'s
residual is the reconstruction. Prompts are raw strings tokenized with add_special_tokens=True
(dropping Gemma's <bos> cost FVE 0.77 -> 0.31 in the release's notes), right-padded in batches.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from nla_ray.nla import templates as T
from nla_ray.core.batching import right_pad
from nla_ray.nla.models import text_config
from nla_ray.nla.sidecar import NlaMeta


class ValueHead(nn.Linear):
    def __init__(self, d: int):
        super().__init__(d, d, bias=False)


def load_value_head(path, d: int, *, where: str = "value_head.safetensors") -> ValueHead:
    from safetensors.torch import load_file

    state = load_file(str(path))
    if "weight" not in state:
        raise ValueError(f"{where}: no tensor named 'weight' (found {sorted(state)})")
    w = state["weight"]
    if tuple(w.shape) != (d, d):
        raise ValueError(f"{where}: weight shape {tuple(w.shape)}, expected ({d}, {d}) from d_model")
    head = ValueHead(d)
    with torch.no_grad():
        head.weight.copy_(w.float())
    return head


class AREngine:
    def __init__(self, backbone: nn.Module, value_head: nn.Module, tokenizer, meta: NlaMeta,
                 *, max_length: int = 1024):
        if meta.role != "ar":
            raise ValueError(f"{meta.path}: role is {meta.role!r}, an AR engine needs role ar")
        meta.check_width(text_config(backbone.config).hidden_size)
        n_layers = text_config(backbone.config).num_hidden_layers
        if meta.layer is not None and n_layers != meta.layer + 1:
            raise ValueError(f"{meta.path}: critic.extraction_layer_index={meta.layer} needs a backbone of "
                             f"{meta.layer + 1} blocks, got {n_layers}")
        w = getattr(value_head, "weight", None)
        if w is None or tuple(w.shape) != (meta.d_model, meta.d_model):
            raise ValueError(f"{meta.path}: value head weight shape {None if w is None else tuple(w.shape)}, "
                             f"expected ({meta.d_model}, {meta.d_model})")
        self.suffix = meta.check_tokenizer(tokenizer)
        self.backbone, self.tok, self.meta = backbone, tokenizer, meta
        p = next(backbone.parameters())
        self.head = value_head.to(device=p.device, dtype=torch.float32).eval()
        self.max_length = max_length
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        # Per row of the last `reconstruct` call: was its prompt cut to max_length? (counted per row
        # by the AR stage, so a run says how many explanations were scored on a truncated text)
        self.last_truncated = np.zeros(0, dtype=bool)
        self._cut: list[bool] = []  # per row of the last `encode` call (replaced, not grown: SFT encodes often)

    @property
    def device(self):
        return next(self.backbone.parameters()).device

    def encode(self, explanations: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows, self._cut = [], []
        for e in explanations:
            ids = self.tok(T.ar_prompt(self.meta.ar_template, e), add_special_tokens=True)["input_ids"]
            cut = len(ids) > self.max_length
            if cut:
                # Keep the head (<bos> + template start) and the whole template tail: the stored
                # suffix omits its first token (it may merge with the text), so keep one more.
                tail = len(self.suffix) + 1
                ids = ids[:self.max_length - tail] + ids[-tail:]
            self._cut.append(cut)
            rows.append(ids)
        ids, mask = right_pad(rows, self.pad_id)
        last = mask.sum(1) - 1
        return ids, mask, last

    @torch.no_grad()
    def hidden_last(self, explanations: Sequence[str]) -> torch.Tensor:
        """Block-K residual at the last real token, fp32 [B, d]."""
        ids, mask, last = self.encode(explanations)
        dev = self.device
        out = self.backbone(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False)
        h = out.last_hidden_state
        return h[torch.arange(h.shape[0], device=dev), last.to(dev)].float()

    @torch.no_grad()
    def reconstruct(self, explanations: Sequence[str], batch_size: int = 32) -> np.ndarray:
        if len(explanations) == 0:
            self.last_truncated = np.zeros(0, dtype=bool)
            return np.zeros((0, self.meta.d_model), dtype=np.float32)
        outs, cut = [], []
        for i in range(0, len(explanations), batch_size):
            outs.append(self.head(self.hidden_last(explanations[i:i + batch_size])).cpu().numpy())
            cut += self._cut
        self.last_truncated = np.array(cut, dtype=bool)
        return np.concatenate(outs).astype(np.float32)
