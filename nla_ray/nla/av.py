"""The AV engine: inject an activation into the prompt's slot, then decode.

Injection (release facts): embed the prompt ids with the model's *own* input-embedding module
(for Gemma-3 that module multiplies by sqrt(d); a raw weight lookup would miss it), rescale the
vector to `injection_scale` with the norm taken in fp32, overwrite the one slot whose neighbours
match, and generate from `inputs_embeds`.

Decoding is our own loop over the KV cache rather than `generate`, for two reasons a researcher
cares about: (1) every sample has its own seed, and its noise is a pure function of
(seed, step, token id), so a row's text does not depend on which batch it landed in and a rerun is
bit-identical; (2) banned-token sets (the quote-ablation analysis) and early exit on a closed tag
are plain tensor ops. `backend="hf"` runs transformers' `generate` instead, kept as the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from nla_ray.nla import templates as T
from nla_ray.config import AV_ATTN
from nla_ray.config import AV_BACKENDS as BACKENDS  # the backends are documented there
from nla_ray.core.noise import gumbel_noise, sample_seed  # noqa: F401 - re-exported for callers
from nla_ray.nla.models import text_config, text_lm_view
from nla_ray.nla.sidecar import NlaMeta

# The backends that decode through nla_ray.nla.fast_decode: one captured session per decode shape.
GRAPH_BACKENDS = ("fast", "fused")


def inject(embeds: torch.Tensor, slot: int, vectors: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Overwrite row `slot` of each prompt's embeddings with its (rescaled) vector. Returns new tensor."""
    if vectors.ndim != 2 or vectors.shape[0] != embeds.shape[0] or vectors.shape[1] != embeds.shape[-1]:
        raise ValueError(f"vectors shape {tuple(vectors.shape)} does not fit embeddings "
                         f"{tuple(embeds.shape)} (need [batch, d_model={embeds.shape[-1]}])")
    v = vectors.to(device=embeds.device, dtype=torch.float32)
    if not torch.isfinite(v).all():
        bad = (~torch.isfinite(v).all(dim=1)).nonzero().flatten().tolist()
        raise ValueError(f"non-finite activation vector(s) at batch rows {bad[:8]}")
    if scale is not None:
        norm = v.norm(dim=1, keepdim=True).clamp_min(1e-12)
        v = v * (scale / norm)
    out = embeds.clone()
    out[:, slot, :] = v.to(embeds.dtype)
    return out


@dataclass
class Sample:
    text: str              # raw decoded continuation
    explanation: str | None
    status: str            # ok / no_close_tag / no_open_tag
    n_tokens: int


class AVEngine:
    """Batched vector -> explanation. One instance per model; thread-unsafe, like a torch model."""

    def __init__(self, model, tokenizer, meta: NlaMeta, *, max_new_tokens: int = 150,
                 backend: str = "loop", decode_batch: int | str | None = None, attn: str = "auto"):
        if meta.role != "av":
            raise ValueError(f"{meta.path}: role is {meta.role!r}, an AV engine needs role av")
        self.model, self.tok, self.meta = model, tokenizer, meta
        hidden = text_config(model.config).hidden_size
        meta.check_width(hidden)
        self.prompt_ids = meta.check_tokenizer(tokenizer)
        self.slot = self.prompt_ids.index(meta.injection_token_id)
        # The model's own embedding module: Gemma-3's multiplies by sqrt(d).
        self.embed = model.get_input_embeddings()
        self.max_new_tokens = max_new_tokens
        if backend not in BACKENDS:
            raise ValueError(f"backend {backend!r} not in {BACKENDS}")
        self.backend = backend
        self.vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None \
            else text_config(model.config).vocab_size
        self.stop_ids = self._stop_ids()
        # Rows decoded at once: None = all that arrive; an int caps it; "auto" sizes it from the free
        # GPU memory and the KV cache at max_new_tokens (fast_decode.auto_batch_size), per call.
        if not (decode_batch is None or decode_batch == "auto" or (isinstance(decode_batch, int) and decode_batch > 0)):
            raise ValueError(f"decode_batch must be a positive int, 'auto' or None, got {decode_batch!r}")
        self.decode_batch = decode_batch
        self.last_decode_batch: int | None = None
        # The fast decoder's attention step; only the backends of GRAPH_BACKENDS use it.
        if attn not in AV_ATTN:
            raise ValueError(f"attn {attn!r} not in {AV_ATTN}")
        self.attn = attn
        self._auto_sizes: dict = {}  # (max_new, sampling) -> rows that fit, sized once ("auto")

    def _stop_ids(self) -> list[int]:
        ids = set()
        for src in (getattr(self.model, "generation_config", None), self.model.config):
            e = getattr(src, "eos_token_id", None) if src is not None else None
            if isinstance(e, int):
                ids.add(e)
            elif isinstance(e, (list, tuple)):
                ids.update(int(i) for i in e)
        if self.tok.eos_token_id is not None:
            ids.add(int(self.tok.eos_token_id))
        for t in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|endoftext|>"):
            tid = self.tok.convert_tokens_to_ids(t)
            if isinstance(tid, int) and tid != getattr(self.tok, "unk_token_id", None) and tid >= 0:
                ids.add(tid)
        return sorted(ids)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def prompt_embeds(self, vectors: torch.Tensor) -> torch.Tensor:
        ids = torch.tensor([self.prompt_ids], device=self.device).expand(vectors.shape[0], -1)
        with torch.no_grad():
            emb = self.embed(ids)
        return inject(emb, self.slot, vectors, self.meta.injection_scale)

    def banned_ids_for(self, chars: Sequence[str]) -> list[int]:
        """Every vocabulary id that could write one of `chars` (e.g. a quote family): ids whose
        decoded text contains one, and byte fragments that can complete one (§2's mask)."""
        from nla_ray.analysis.quotes import banned_token_ids  # pure: needs only the tokenizer

        return banned_token_ids(self.tok, chars)

    @torch.no_grad()
    def generate(self, vectors, *, temperature: float = 0.0, seeds: Sequence[int] | None = None,
                 banned_ids: Sequence[int] | None = None, max_new_tokens: int | None = None) -> list[Sample]:
        vectors = torch.as_tensor(np.asarray(vectors, dtype=np.float32) if not torch.is_tensor(vectors) else vectors)
        if vectors.ndim == 1:
            vectors = vectors[None]
        n = vectors.shape[0]
        if n == 0:
            return []
        max_new = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        step = self._rows_at_once(n, max_new, temperature > 0)
        # A fixed decode batch also pads a short call up to it (the fast decoder keeps one captured
        # session per batch size: a pool's last, short batch would otherwise capture again); "auto"
        # sizes a ceiling, not a shape, so a call under it decodes as it came.
        pad_short = n < step and self.fixed_decode_batch is not None and self.backend in GRAPH_BACKENDS
        if step < n or pad_short:
            out = []
            for i in range(0, n, step):
                chunk = vectors[i: i + step]
                sd = None if seeds is None else list(seeds)[i: i + step]
                real = chunk.shape[0]
                if real < step and self.backend in GRAPH_BACKENDS:
                    # Pad the last chunk to the same batch (copies of its last row, dropped below): the
                    # fast decoder keeps one captured session per batch size, and a new size would
                    # capture again for every pool batch.
                    pad = step - real
                    chunk = torch.cat([chunk, chunk[-1:].expand(pad, -1)])
                    sd = None if sd is None else sd + [sd[-1]] * pad
                out += self.generate(chunk, temperature=temperature, seeds=sd, banned_ids=banned_ids,
                                     max_new_tokens=max_new)[:real]
            return out
        emb = self.prompt_embeds(vectors)
        if self.backend == "hf":
            tokens = self._generate_hf(emb, temperature, banned_ids, max_new)
        else:
            if temperature > 0 and seeds is None:
                raise ValueError("sampling (temperature > 0) needs one seed per row; see av.sample_seed")
            if seeds is not None and len(seeds) != n:
                raise ValueError(f"{len(seeds)} seeds for {n} vectors")
            if self.backend in GRAPH_BACKENDS:
                from nla_ray.nla.fast_decode import fast_generate  # imports this module, so not at the top

                tokens = fast_generate(self, emb, temperature, seeds, banned_ids, max_new)
            else:
                tokens = self._generate_loop(emb, temperature, seeds, banned_ids, max_new)
        return [self._finish(row) for row in tokens]

    @property
    def fixed_decode_batch(self) -> int | None:
        """The decode shape every call is cut or padded to: an int decode_batch (not None, not "auto")."""
        return None if self.decode_batch in (None, "auto") else int(self.decode_batch)

    def warm_up(self, *, temperature: float = 0.0, banned_ids: Sequence[int] | None = None) -> float:
        """Decode one full fixed-size batch of random vectors so compilation and graph capture happen
        now (in a pool actor's `__init__`, while the pools upstream already work) rather than inside
        the first real batch. Only for the fast backends on a GPU with a fixed decode batch; returns the
        seconds it took (0.0 when skipped)."""
        rows = self.fixed_decode_batch
        if self.backend not in GRAPH_BACKENDS or self.device.type != "cuda" or rows is None:
            return 0.0
        import time

        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(0)
        d = int(self.model.get_input_embeddings().weight.shape[1])
        vecs = torch.randn(rows, d, generator=g)
        seeds = list(range(rows)) if temperature > 0 else None
        self.generate(vecs, temperature=temperature, seeds=seeds, banned_ids=banned_ids)
        torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    def _rows_at_once(self, n: int, max_new: int, sampling: bool) -> int:
        if self.decode_batch is None:
            return n
        if self.decode_batch != "auto":
            return int(self.decode_batch)
        if self.device.type != "cuda":
            return n  # no GPU memory to size against: decode what arrived
        from nla_ray.nla.fast_decode import auto_batch_size

        key = (max_new, sampling)
        sizes = self._auto_sizes
        if key not in sizes:
            # Sized once per (token budget, sampling): the fast decoder's last session (its cache and
            # graphs) is handed back first, so the free memory counts it as available.
            dec = getattr(self, "_fast_decoder", None)
            if dec is not None and dec.session is not None:
                dec.release()
                torch.cuda.empty_cache()
            free, _ = torch.cuda.mem_get_info(self.device)
            sizes[key] = auto_batch_size(self.model, len(self.prompt_ids), max_new, free_bytes=free, sampling=sampling)
        self.last_decode_batch = sizes[key]
        return sizes[key]

    def _finish(self, row: list[int]) -> Sample:
        stop = set(self.stop_ids)
        cut = next((i for i, t in enumerate(row) if t in stop), len(row))
        text = self.tok.decode(row[:cut], skip_special_tokens=True)
        expl, status = T.parse_explanation(text)
        return Sample(text=text, explanation=expl, status=status, n_tokens=cut)

    def _generate_loop(self, emb, temperature, seeds, banned_ids, max_new) -> list[list[int]]:
        n = emb.shape[0]
        dev = emb.device
        seed_t = torch.tensor(list(seeds), dtype=torch.int64, device=dev) if seeds is not None else None
        stop = torch.tensor(self.stop_ids, device=dev)
        mask = None
        if banned_ids:
            mask = torch.zeros(self.vocab, dtype=torch.bool, device=dev)
            mask[torch.tensor(list(banned_ids), device=dev)] = True
        out = self.model(inputs_embeds=emb, use_cache=True, logits_to_keep=1)  # prefill: only the last logits
        past = out.past_key_values
        logits = out.logits[:, -1, :]
        done = torch.zeros(n, dtype=torch.bool, device=dev)
        steps = []
        for step in range(max_new):
            lg = logits.float()
            if mask is not None:
                lg = lg.masked_fill(mask, float("-inf"))
            if temperature > 0:
                nxt = torch.argmax(lg / temperature + gumbel_noise(seed_t, step, lg.shape[-1]), dim=-1)
            else:
                nxt = torch.argmax(lg, dim=-1)
            # A finished row keeps emitting its stop token so the batch stays rectangular.
            nxt = torch.where(done, stop[0], nxt)
            steps.append(nxt)
            done |= torch.isin(nxt, stop)
            if step % 8 == 7 or step == max_new - 1:
                done |= self._closed_tag(torch.stack(steps, 1), done)
            if bool(done.all()):
                break
            out = self.model(input_ids=nxt[:, None], past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = out.logits[:, -1, :]
        toks = torch.stack(steps, 1).tolist()
        return [self._trim_after_close(r) for r in toks]

    def _closed_tag(self, toks: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
        # Decoding every row each step is costly; every 8 steps, rows still open only, is enough.
        rows, finished = toks.tolist(), done.tolist()
        return torch.tensor([not f and T.CLOSE_TAG in self.tok.decode(r, skip_special_tokens=True)
                             for r, f in zip(rows, finished)], device=toks.device)

    def _trim_after_close(self, row: list[int]) -> list[int]:
        """Cut tokens generated after `</explanation>` so both backends return the same text."""
        for i, t in enumerate(row):
            if t in self.stop_ids:
                return row[: i + 1]
        if T.CLOSE_TAG not in self.tok.decode(row, skip_special_tokens=True):
            return row
        # "prefix contains the tag" is monotone in the prefix length: binary-search the shortest.
        lo, hi = 1, len(row)
        while lo < hi:
            mid = (lo + hi) // 2
            if T.CLOSE_TAG in self.tok.decode(row[:mid], skip_special_tokens=True):
                hi = mid
            else:
                lo = mid + 1
        return row[:lo]

    def _generate_hf(self, emb, temperature, banned_ids, max_new) -> list[list[int]]:
        kw = dict(inputs_embeds=emb, attention_mask=torch.ones(emb.shape[:2], dtype=torch.long, device=emb.device),
                  max_new_tokens=max_new, pad_token_id=self.stop_ids[0], eos_token_id=self.stop_ids)
        if banned_ids:
            kw["bad_words_ids"] = [[int(i)] for i in banned_ids]
        if temperature > 0:
            kw.update(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if getattr(self, "_hf_lm", None) is None:  # a multimodal wrapper generates through its text LM
            self._hf_lm = text_lm_view(self.model)
        seqs = self._hf_lm.generate(**kw)
        return [self._trim_after_close(r) for r in seqs.tolist()]
