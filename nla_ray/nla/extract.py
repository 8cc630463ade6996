"""Stage 0: sample token positions per document and extract RAW residual vectors.

Release protocol: forward the base model over each document (right truncation at `max_length`,
special tokens added as the tokenizer does); candidate positions are indices >= 50 that are not
special tokens; draw k of them with ``random.Random(sha256(f"{seed}|{doc_id}").digest())`` and
``rng.sample`` — so a document always gets the same positions whatever batch or order it comes in.
Vectors are stored raw (no normalization). "Layer K" is the output of block K = hidden_states[K+1];
several layers come out of one forward pass. Each row also carries the sampled token's character
span in the original text, which is how two tokenizers are aligned for cross-family transfer.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import torch

from nla_ray.core.batching import right_pad
from nla_ray.nla.models import backbone_from_model

MIN_POSITION = 50


def sample_positions(token_ids: Sequence[int], special_ids: Iterable[int], doc_id: str, seed: int, k: int,
                     min_position: int = MIN_POSITION) -> list[int]:
    special = set(int(s) for s in special_ids)
    cands = [i for i, t in enumerate(token_ids) if i >= min_position and int(t) not in special]
    rng = random.Random(hashlib.sha256(f"{seed}|{doc_id}".encode()).digest())
    return rng.sample(cands, k=min(k, len(cands)))


# The `every` rule (token-position traces): all positions below this index, then every stride-th.
DENSE_POSITIONS = 16


def every_position(token_ids: Sequence[int], special_ids: Iterable[int], *, max_position: int | None = None,
                   stride: int = 1, dense: int = DENSE_POSITIONS) -> list[int]:
    """Every non-special token index up to `max_position` (inclusive; None = the whole document), in
    order: all of them below `dense`, then `dense`, `dense + stride`, ... (stride 1 = all)."""
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    special = set(int(s) for s in special_ids)
    n = len(token_ids) if max_position is None else min(len(token_ids), int(max_position) + 1)
    return [i for i in range(n) if int(token_ids[i]) not in special and (i < dense or (i - dense) % stride == 0)]


@dataclass
class ExtractStats:
    docs_in: int = 0
    docs_short: int = 0          # fewer than min_position+1 usable tokens: skipped, counted
    rows_out: int = 0
    short_ids: list = field(default_factory=list)


class Extractor:
    """Base model (truncated above the deepest layer asked for) -> raw vectors at sampled positions."""

    def __init__(self, model, tokenizer, layers: Sequence[int], *, model_id: str, seed: int = 42,
                 positions_per_doc: int = 5, max_length: int = 2048, min_position: int = MIN_POSITION,
                 batch_tokens: int = 16384, rule: str = "sample", max_position: int | None = None, stride: int = 1):
        """`rule`: "sample" (the release's stage 0: k positions >= min_position) or "every" (every
        non-special position up to `max_position`, see `every_position`; the forward pass stops there)."""
        if rule not in ("sample", "every"):
            raise ValueError(f"position rule {rule!r} is not 'sample' or 'every'")
        self.rule, self.max_position, self.stride = rule, max_position, stride
        self.layers = sorted(set(int(x) for x in layers))
        n_total = model.config.get_text_config().num_hidden_layers
        if self.layers[0] < 0 or self.layers[-1] >= n_total:
            raise ValueError(f"layers {self.layers} outside 0..{n_total - 1}")
        self.backbone = backbone_from_model(model, self.layers[-1] + 1)
        self.tok = tokenizer
        self.model_id, self.seed, self.k = model_id, seed, positions_per_doc
        self.max_length, self.min_position, self.batch_tokens = max_length, min_position, batch_tokens
        self.special = set(getattr(tokenizer, "all_special_ids", []))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self.stats = ExtractStats()

    @property
    def device(self):
        return next(self.backbone.parameters()).device

    def tokenize(self, text: str):
        enc = self.tok(text, add_special_tokens=True, truncation=True, max_length=self.max_length,
                       return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

    @torch.no_grad()
    def hidden(self, ids_list: list[list[int]]) -> list[dict[int, torch.Tensor]]:
        """Per document, {layer: [T, d] fp32} of raw block outputs."""
        ids, mask = right_pad(ids_list, self.pad_id)
        out = self.backbone(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                            output_hidden_states=True, use_cache=False)
        hs = out.hidden_states
        return [{L: hs[L + 1][i, : len(r)].float() for L in self.layers} for i, r in enumerate(ids_list)]

    def extract(self, docs: Iterable[tuple[str, str]]) -> list[dict]:
        """docs: (doc_id, text) pairs -> one row per (document, position, layer)."""
        prepared = []
        for doc_id, text in docs:
            self.stats.docs_in += 1
            ids, offs = self.tokenize(text)
            if self.rule == "every":
                pos = every_position(ids, self.special, max_position=self.max_position, stride=self.stride)
                if pos:  # causal: the tokens after the last position asked for change nothing before it
                    ids, offs = ids[: pos[-1] + 1], offs[: pos[-1] + 1]
            else:
                pos = sample_positions(ids, self.special, doc_id, self.seed, self.k, self.min_position)
            if not pos:
                self.stats.docs_short += 1
                self.stats.short_ids.append(doc_id)
                continue
            prepared.append((doc_id, text, ids, offs, pos))
        rows: list[dict] = []
        # Pack by token budget: long documents alone, short ones together.
        prepared.sort(key=lambda p: len(p[2]))
        batch: list = []
        for item in prepared + [None]:
            if item is not None and (not batch or (len(batch) + 1) * len(item[2]) <= self.batch_tokens):
                batch.append(item)
                continue
            if batch:
                rows.extend(self._rows(batch))
            batch = [item] if item is not None else []
        self.stats.rows_out += len(rows)
        return rows

    def _rows(self, batch) -> list[dict]:
        hidden = self.hidden([b[2] for b in batch])
        rows = []
        for (doc_id, text, ids, offs, pos), hs in zip(batch, hidden):
            n_pos = len(pos)
            for rank, p in enumerate(pos):
                cs, ce = offs[p]
                prefix = self.tok.decode(ids[: p + 1], skip_special_tokens=True)
                for L in self.layers:
                    v = hs[L][p]
                    rows.append({
                        "doc_id": doc_id, "position": p, "n_raw_tokens": p + 1, "sample_rank": rank,
                        "positions_in_doc": n_pos, "layer": L, "model_id": self.model_id,
                        "token_id": int(ids[p]), "token": self.tok.decode([ids[p]]),
                        "char_start": int(cs), "char_end": int(ce), "prefix_text": prefix,
                        "vector": v.cpu().numpy().astype(np.float32), "seed": self.seed,
                    })
        return rows


def align_position(char_end: int, offsets: Sequence[tuple[int, int]], min_position: int = 0) -> tuple[int, int]:
    """Index of the token (in another tokenizer's offsets) that ends closest to `char_end`, and the
    signed character error. Used to read two model families at the same place in a document."""
    best, err = -1, None
    for i, (s, e) in enumerate(offsets):
        if i < min_position or e <= s:
            continue
        d = e - char_end
        if err is None or abs(d) < abs(err) or (abs(d) == abs(err) and d < 0):
            best, err = i, d
    if best < 0:
        raise ValueError("no aligned token: offsets are empty past min_position")
    return best, int(err)
