"""Throughput of the three NLA stages on the real architectures, against measured ceilings.

The models are the released architectures built from their config fields with random weights,
directly on the device (no downloads): a decoder's speed does not depend on what its weights
say, only on their shapes, so random weights cost the same as trained ones once generation runs a
fixed number of tokens (stop tokens are ignored here). Weights are drawn from N(0, 0.02), never
zeros (METHOD.md: zeros can run faster than real data).

Stages, each sized by the nla_ray preset that runs that model (layer K, document length, AV token
budget and temperature, AR batch):
  ceilings    device-to-device copy bandwidth (bytes read + written) and a square matrix product's
              rate, measured in the same process; every roofline below divides by these two;
  extraction  blocks 0..K over [B, T] tokens with output_hidden_states (what `Extractor` runs;
              B = Extractor's token budget // T);
  av          prompt embeddings with an injected vector -> N new tokens, for several batch sizes,
              with transformers' `generate` (the reference) and `fast_decode.FastDecoder`;
  ar          blocks 0..K over the AR prompt (template + an N-token explanation) + the value head.

Each stage's roofline fraction is floor / measured, where floor = max(FLOPs / matmul rate,
bytes / copy bandwidth). FLOPs = 2 x matmul parameters x tokens + attention (4 x heads x head_dim
per attended query-key pair, windows honoured); bytes = weights read once + KV read/written +
outputs written. A decode step's bytes count the keys actually attended, not the static buffer;
the AV prompt's shared prefix (every position before the injection slot) counts once, not per row.

`--tiny` scales every model and stage down so the whole thing runs on a CPU in seconds (tests).
"""

from __future__ import annotations

import functools
import gc
import inspect
import json
import os
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

SCHEMA = "nla_ray.bench/1"
DEFAULT_BATCHES = (32, 64, 128, 256, 512)
# fast = static cache + CUDA graphs; fused = fast + compiled norms/rotary/sampling (fast_decode `fuse=`);
# both take the decoder's default attention step (auto: Triton, else flash, else masked SDPA).
# fused-sdpa / fused-flash / fused-triton = fused with that step, to measure what each changes.
BACKENDS = ("hf", "fast", "fused", "fused-sdpa", "fused-flash", "fused-triton")
FAST_BACKENDS = ("fast", "fused", "fused-sdpa", "fused-flash", "fused-triton")


def fast_options(backend: str) -> dict:
    """fused-<attn>: fused with that decode attention step; fast / fused: the decoder's default (auto)."""
    attn = backend.split("-", 1)[1] if "-" in backend else "auto"
    return {"fuse": True if backend.startswith("fused") else None, "attn": attn}


# The correctness check (every fast backend, greedy): its size, and the bars it must clear. Per-step
# logits of the fast decoder are compared with one plain forward pass of the model (its default
# attention, no cache) over the prompt + the decoder's own tokens (teacher forcing), so a step that
# diverged does not hide the next. bf16 rounding flips near-ties, hence bars below 100%.
CHECK = {"batch": 32, "new": 64, "top_k": 10, "min_top1": 0.97, "min_topk_overlap": 0.9, "min_distinct": 50}
# Random N(0, 0.02) weights make attention nearly uniform, so every step's hidden state is the
# context's average and greedy decoding emits one id for every row and step (seen on the 27B:
# 1 distinct id): a check on such output shows nothing. Sharpening every layer's attention (q, k, v,
# o times 4) made the output vary but made the model chaotic: on the H200 (Qwen2.5-7B, bf16) flash
# and the Triton step each agreed with the plain pass on 0% of top-1 ids, because one bf16 rounding
# flipped near-tied attention and the flip grew through 28 layers. Even a calm random model fails
# the bar: its logits are ~Gaussian over ~150k ids, the top two are ~0.2 std apart, and a 28-62-layer
# bf16 residual stream carries ~1% relative rounding noise, so ~5% of top-1 ids flip between two
# correct kernels (measured on CPU stand-ins: 95% eager vs SDPA at 28 layers). So the check's models
# get one trained-like circuit instead (`sharpen_attention`): layer 0 copies the token it attends to
# into the residual stream and the LM head reads it back (tied, or the head a copy of the
# embeddings), which gives each step a clear winner (median ~10 std above the rest) chosen by
# attention over the context - it varies from step to step, and a wrong key, position or mask in a
# decode step changes it. All other layers keep the plain random weights (no chaos to amplify).
# SHARPEN scales layer 0's per-head q/k norms (Gemma: attention logits' std ~0.87 x SHARPEN**2 = 14
# at head_dim 128, query_pre_attn_scalar 168); models without q/k norms get queries and keys scaled
# so layer 0's logits have std COPY_LOGIT_STD whatever the width (N(0, 0.02) projections alone give
# 0.0004 x hidden: 1.4 at 3584, so a fixed factor would be far sharper on the real model than on a
# small stand-in). Timing runs use the same weights: no shape and no byte moved changes.
SHARPEN = 4.0
COPY_LOGIT_STD = 6.0
# Layer 0's copy: o_proj = v_proj^T scaled so the copied embedding is COPY_GAIN times a unit-rms
# token's projection (models without post-attention norms); Gemma's post-attention norm of layer 0
# sets the copy's rms instead, to COPY_POST (its residual also holds sqrt(d)-scaled embeddings).
COPY_GAIN = 20.0
COPY_POST = 16.0
# fused compiles kernels (inductor): on a GPU it is worth timing; on a CPU it needs a C++ toolchain.
DEFAULT_BACKENDS = ("hf", "fast", "fused") if torch.cuda.is_available() else ("hf", "fast")

# AV prompt length, the injection slot's index in it (every position before it is the same for all
# rows) and the AR template overhead (the AR prompt with an empty explanation), counted with
# the packaged tokenizers on the default templates (tests/test_bench_costmodel.py recounts them,
# so a template or tokenizer change fails loudly). No Qwen tokenizer ships here: Qwen2.5 uses the
# same ChatML turn format with a default system prompt, so it takes the SmolLM2 count.
PROMPT_TOKENS = {
    "chatml": {"av": 134, "slot": 117, "ar_overhead": 14, "counted_with": "pkg:smollm2-135m"},
    "gemma3": {"av": 108, "slot": 93, "ar_overhead": 15, "counted_with": "pkg:gemma3-270m"},
}

# --tiny: every stage shrunk to CPU-test size; shapes only, nothing here is reported as a result.
TINY_STAGES = {"extract_batch": 2, "extract_len": 32, "av_prompt": 12, "av_slot": 9, "av_new": 6, "av_batches": (2, 4),
               "ar_batch": 4, "ar_overhead": 6}
TINY_ARCH = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 6,
             "num_attention_heads": 4, "num_key_value_heads": 2}


@dataclass(frozen=True)
class BenchModel:
    name: str
    checkpoint: str        # the release whose config.json these fields copy
    preset: str            # nla_ray preset that runs it: layer, lengths, batches, temperature
    prompt: str            # key of PROMPT_TOKENS
    config_class: str
    fields: dict
    tiny_fields: dict = field(default_factory=dict)


MODELS: dict[str, BenchModel] = {
    "gemma3-27b": BenchModel(
        "gemma3-27b", "google/gemma-3-27b-it", "paper-gemma27b-L41", "gemma3", "Gemma3TextConfig",
        dict(vocab_size=262208, hidden_size=5376, intermediate_size=21504, num_hidden_layers=62,
             num_attention_heads=32, num_key_value_heads=16, head_dim=128, query_pre_attn_scalar=168,
             sliding_window=1024, sliding_window_pattern=6, max_position_embeddings=131072,
             rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_activation="gelu_pytorch_tanh",
             rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                              "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
        # A window shorter than the tiny prompt, so the sliding path is exercised on a CPU too.
        dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=8)),
    "qwen2.5-7b": BenchModel(
        "qwen2.5-7b", "Qwen/Qwen2.5-7B-Instruct", "paper-qwen7b-L20", "chatml", "Qwen2Config",
        dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
             num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
             rms_norm_eps=1e-6, tie_word_embeddings=False, use_sliding_window=False,
             rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "smollm2-135m": BenchModel(
        "smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct", "mini", "chatml", "LlamaConfig",
        dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
             num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
             rms_norm_eps=1e-5, tie_word_embeddings=True,
             rope_parameters={"rope_type": "default", "rope_theta": 100000.0})),
    "gemma3-270m": BenchModel(
        "gemma3-270m", "google/gemma-3-270m-it", "mini-gemma", "gemma3", "Gemma3TextConfig",
        dict(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
             num_attention_heads=4, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
             sliding_window=512, sliding_window_pattern=6, max_position_embeddings=32768,
             rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_activation="gelu_pytorch_tanh",
             rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                              "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
        dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=8)),
}


def models_for_preset(preset: str) -> list[str]:
    """The bench models a preset runs (the architecture of its base model)."""
    return [m.name for m in MODELS.values() if m.preset == preset]


def measure_prompt_tokens(tokenizer) -> dict:
    """{'av': AV prompt length, 'slot': injection index, 'ar_overhead': AR prompt with no explanation}."""
    from nla_ray.nla import pairs
    from nla_ray.nla import templates as T

    char = pairs.choose_injection_char(tokenizer)
    ids = T.av_prompt_ids(tokenizer, T.DEFAULT_AV_TEMPLATE, char)
    slot = ids.index(tokenizer.encode(char, add_special_tokens=False)[0])
    ar = len(tokenizer(T.ar_prompt(T.DEFAULT_AR_TEMPLATE, ""), add_special_tokens=True)["input_ids"])
    return {"av": len(ids), "slot": slot, "ar_overhead": ar}


# ---------------------------------------------------------------------------------------------
# building


def make_config(spec: BenchModel, tiny: bool = False):
    import transformers

    fields = dict(spec.fields)
    if tiny:
        fields.update(TINY_ARCH)
        if "head_dim" not in spec.tiny_fields:
            fields.pop("head_dim", None)  # derive it from the tiny width
        fields.update(spec.tiny_fields)
    # Random weights never emit a meaningful stop token; none is configured, so `generate` runs
    # the full token budget.
    fields.update(eos_token_id=None, bos_token_id=None, pad_token_id=0)
    return getattr(transformers, spec.config_class)(**fields)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """One storage (tied weights); meta tensors have no storage, so compare the objects."""
    return a is b or (a.device.type != "meta" and a.data_ptr() == b.data_ptr())


def build_model(spec: BenchModel, *, device: torch.device, dtype: torch.dtype, tiny: bool = False, seed: int = 0):
    """The architecture with N(0, 0.02) weights, allocated on `device` (HF's initialisers skipped:
    on a 27B model they would dominate the run)."""
    from transformers import AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older layouts
        from transformers.modeling_utils import no_init_weights

    cfg = make_config(spec, tiny)
    with torch.device(device), no_init_weights():
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    # Skipping the initialisers also skips tying: without this the LM head would be a second
    # vocab x d matrix that the released (tied) models do not have.
    model.tie_weights()
    tied = _same(model.get_output_embeddings().weight, model.get_input_embeddings().weight)
    if tied != bool(getattr(cfg, "tie_word_embeddings", False)):
        raise RuntimeError(f"{spec.name}: LM head tied={tied}, config says {cfg.tie_word_embeddings}")
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=gen)
        for m in model.modules():
            # Llama/Qwen norms multiply by w (Gemma's by 1 + w): near-zero weights would scale every
            # block's input by ~0.02, which no trained model does. Centre them on 1.
            if type(m).__name__.endswith("RMSNorm") and not type(m).__name__.startswith("Gemma"):
                m.weight.add_(1.0)
        sharpen_attention(model, SHARPEN)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def sharpen_attention(model, factor: float, gain: float = COPY_GAIN, post: float = COPY_POST) -> int:
    """Give layer 0 a copy circuit (see SHARPEN): every query head takes head 0's query weights and
    every key/value group group 0's key weights (one attention pattern; q/k norms set to `factor`,
    or without them queries and keys scaled to COPY_LOGIT_STD); each head's o_proj block is its
    value group's v_proj transposed, so the attention output is the attended tokens' embeddings
    projected on the value subspace; the LM head of an untied model becomes a copy of the input
    embeddings, so those copies score their own ids.
    Values stay N(0, 0.02)-sized copies of drawn weights (no zeros, no shape change). Returns the
    number of tensors changed."""
    cfg = model.config
    d, heads, kv = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or d // heads
    rep = heads // kv
    layer = model.get_decoder().layers[0]
    at = layer.self_attn
    n = 0
    for proj, groups in ((at.q_proj, heads), (at.k_proj, kv)):
        for p in proj.parameters():  # weight [groups * hd, d], bias [groups * hd]
            p[hd:] = p[:hd].repeat((groups - 1,) + (1,) * (p.dim() - 1))
            n += 1
    v = at.v_proj.weight.float()
    scale = gain / (rep * float(v.pow(2).sum(1).mean()))  # V^T V ~ (mean row norm^2) x projection
    o = at.o_proj.weight
    for h in range(heads):
        g = h // rep
        o[:, h * hd:(h + 1) * hd] = (v[g * hd:(g + 1) * hd].T * scale).to(o.dtype)
    n += 1
    if hasattr(at, "q_norm"):  # Gemma: per-head q/k norms (weight w multiplies as 1 + w)
        at.q_norm.weight.fill_(factor - 1.0)
        at.k_norm.weight.fill_(factor - 1.0)
        layer.post_attention_layernorm.weight.fill_(post - 1.0)
        n += 3
    else:
        # q.k / sqrt(hd) for unit-rms inputs has std ~ rms(q) x rms(k) = sqrt(mean row norm^2 of each)
        qk = float(at.q_proj.weight.float().pow(2).sum(1).mean().sqrt()
                   * at.k_proj.weight.float().pow(2).sum(1).mean().sqrt())
        for proj in (at.q_proj, at.k_proj):
            for p in proj.parameters():
                p.mul_((COPY_LOGIT_STD / qk) ** 0.5)
        n += 4
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if not _same(head.weight, emb.weight):
        head.weight.copy_(emb.weight)
        n += 1
    return n


# ---------------------------------------------------------------------------------------------
# counting FLOPs and bytes


def attended_pairs(t: int, window: int | None) -> int:
    """Causal query-key pairs of a t-token sequence (a window w keeps keys with i - j < w)."""
    if window is None or window >= t:
        return t * (t + 1) // 2
    return window * (window + 1) // 2 + (t - window) * window


@dataclass
class Counts:
    d: int
    vocab: int
    n_layers: int
    heads: int
    kv_heads: int
    head_dim: int
    windows: list            # per layer: sliding window or None
    block_params: list       # per layer: all parameters
    block_matmul: list       # per layer: parameters of matrix weights (the FLOP-bearing ones)
    embed_params: int
    head_params: int         # the output projection (counted even when tied: it is read)
    tied: bool
    final_norm_params: int
    elt: int                 # bytes per parameter / activation element

    @classmethod
    def of(cls, model) -> "Counts":
        from nla_ray.nla.models import decoder_of, text_config

        cfg = text_config(model.config)
        dec = decoder_of(model)
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        types = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
        win = getattr(cfg, "sliding_window", None)
        windows = [win if t == "sliding_attention" else None for t in types]
        blocks = list(dec.layers)
        emb = dec.embed_tokens.weight
        head = model.get_output_embeddings().weight
        norm = getattr(dec, "norm", None)
        return cls(d=cfg.hidden_size, vocab=head.shape[0], n_layers=len(blocks), heads=heads,
                   kv_heads=getattr(cfg, "num_key_value_heads", None) or heads, head_dim=head_dim,
                   windows=windows,
                   block_params=[sum(p.numel() for p in b.parameters()) for b in blocks],
                   block_matmul=[sum(p.numel() for p in b.parameters() if p.ndim == 2) for b in blocks],
                   embed_params=emb.numel(), head_params=head.numel(), tied=_same(head, emb),
                   final_norm_params=sum(p.numel() for p in norm.parameters()) if norm is not None else 0,
                   elt=emb.element_size())

    @property
    def total_params(self) -> int:
        return sum(self.block_params) + self.embed_params + self.final_norm_params + \
            (0 if self.tied else self.head_params)

    def kv_bytes_per_token(self, n_layers: int | None = None) -> int:
        n = self.n_layers if n_layers is None else n_layers
        return n * 2 * self.kv_heads * self.head_dim * self.elt

    def prefill(self, batch: int, t: int, n_layers: int, logits_rows: int = 0, hidden_out: int = 0,
                offset: int = 0) -> dict:
        """FLOPs and bytes of blocks 0..n_layers-1 over [batch, t] tokens at positions offset.. (the
        first `offset` keys already cached), + LM head rows, + `hidden_out` hidden-state tensors out."""
        mm = sum(self.block_matmul[:n_layers])
        flops = 2 * batch * t * mm
        flops += sum(4 * batch * self.heads * self.head_dim *
                     (attended_pairs(offset + t, w) - attended_pairs(offset, w)) for w in self.windows[:n_layers])
        byts = sum(self.block_params[:n_layers]) * self.elt
        byts += batch * (t + offset) * self.kv_bytes_per_token(n_layers)  # new keys written, cached ones read
        byts += batch * t * self.d * self.elt * (1 + hidden_out)  # embeddings read, hidden states out
        if logits_rows:
            flops += 2 * batch * logits_rows * self.d * self.vocab
            byts += (self.head_params + self.final_norm_params) * self.elt + batch * logits_rows * self.vocab * self.elt
        return {"flops": float(flops), "bytes": float(byts)}

    def decode_step(self, batch: int, pos: int) -> dict:
        """One token per row fed at position `pos` (keys 0..pos attended, windows honoured)."""
        att = [min(pos + 1, w) if w else pos + 1 for w in self.windows]
        flops = 2 * batch * (sum(self.block_matmul) + self.d * self.vocab)
        flops += sum(4 * batch * self.heads * self.head_dim * a for a in att)
        byts = (sum(self.block_params) + self.final_norm_params + self.head_params) * self.elt
        byts += sum(2 * self.kv_heads * self.head_dim * self.elt * batch * (a + 1) for a in att)
        byts += batch * self.vocab * self.elt
        return {"flops": float(flops), "bytes": float(byts)}

    def generation(self, batch: int, prompt: int, new: int, shared_prefix: int = 0) -> dict:
        """Prefill (logits for the last row) + the new-1 forward passes that produce `new` tokens.
        A prefix every row shares needs computing once: the floor counts it at batch 1."""
        tot = self.prefill(batch, prompt - shared_prefix, self.n_layers, logits_rows=1, offset=shared_prefix)
        if shared_prefix:
            pre = self.prefill(1, shared_prefix, self.n_layers)
            tot = {k: tot[k] + pre[k] for k in tot}
        steps = [self.decode_step(batch, prompt + s) for s in range(new - 1)]
        return {"flops": tot["flops"] + sum(s["flops"] for s in steps),
                "bytes": tot["bytes"] + sum(s["bytes"] for s in steps),
                "prefill": tot,
                "decode": {"flops": sum(s["flops"] for s in steps), "bytes": sum(s["bytes"] for s in steps)}}


def roofline(measured_s: float, flops: float, byts: float, ceilings: dict) -> dict:
    c = flops / ceilings["matmul_flops_per_s"]
    m = byts / ceilings["copy_bytes_per_s"]
    floor = max(c, m)
    return {"measured_s": measured_s, "flops": flops, "bytes": byts, "compute_floor_s": c, "memory_floor_s": m,
            "floor_s": floor, "bound": "compute" if c >= m else "memory",
            "fraction": floor / measured_s if measured_s > 0 else None}


# ---------------------------------------------------------------------------------------------
# timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], *, device: torch.device, reps: int, warmup: int) -> list[float]:
    """Seconds per call: CUDA events around each call on a GPU, perf_counter on a CPU."""
    for _ in range(warmup):
        fn()
    _sync(device)
    out = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return out


def _stats(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "reps_s": times,
            "spread": (max(times) - min(times)) / statistics.median(times) if len(times) > 1 else 0.0}


def measure_ceilings(device: torch.device, dtype: torch.dtype, *, reps: int, warmup: int,
                     shapes: list[tuple[int, int, int]] = ()) -> dict:
    """Copy bandwidth (bytes read + written) and matmul rate on random data, measured long enough
    to be stable: GiB-sized copies and many repetitions (a few reps read 3-5% low on an H200), and
    the matmul rate as the best of a square product and `shapes` ([m, k] x [k, n], e.g. the model's
    own projections at a prefill's token count)."""
    cuda = device.type == "cuda"
    # GPU: 2 GiB per buffer (far past a 50-60 MB L2), 40 reps (~50 ms of copying); CPU: small.
    n_copy = (1 << 30) if cuda else (1 << 22)
    copy_reps = max(reps, 40 if cuda else 5)
    src = torch.randn(n_copy, device=device, dtype=dtype)
    dst = torch.empty_like(src)
    t_copy = timed(functools.partial(dst.copy_, src), device=device, reps=copy_reps, warmup=warmup + 3)
    copy_bytes = 2 * src.numel() * src.element_size()
    del src, dst
    n_sq = 8192 if cuda else 512
    todo = [(n_sq, n_sq, n_sq)] + [tuple(int(x) for x in sh) for sh in shapes]
    mm = []
    for m_, k_, n_ in todo:
        if not cuda:
            m_, k_, n_ = min(m_, 512), min(k_, 512), min(n_, 512)
        a = torch.randn(m_, k_, device=device, dtype=dtype)
        b = torch.randn(k_, n_, device=device, dtype=dtype)
        st = _stats(timed(functools.partial(torch.matmul, a, b), device=device, reps=max(reps, 20 if cuda else 5),
                          warmup=warmup + 2))
        mm.append({"shape": [m_, k_, n_], "flops_per_s": 2 * m_ * k_ * n_ / st["median_s"], **st})
        del a, b
    _free(device)
    cs = _stats(t_copy)
    best = max(mm, key=lambda r: r["flops_per_s"])
    return {"copy_bytes_per_s": copy_bytes / cs["median_s"], "matmul_flops_per_s": best["flops_per_s"],
            "copy": {"bytes": copy_bytes, **cs},
            "matmul": {"n": n_sq, "dtype": str(dtype).replace("torch.", ""), "best_shape": best["shape"],
                       "shapes": mm}}


def model_matmul_shapes(counts: "Counts", tokens: int) -> list[tuple[int, int, int]]:
    """The model's own projections at `tokens` rows: hidden -> MLP width, MLP width -> hidden,
    hidden -> query heads. The MLP width comes from the block's matrix parameters."""
    q = counts.heads * counts.head_dim
    kv = 2 * counts.kv_heads * counts.head_dim
    attn = counts.d * (q + kv) + q * counts.d
    ffn = max(1, (counts.block_matmul[0] - attn) // (3 * counts.d))
    return [(tokens, counts.d, ffn), (tokens, ffn, counts.d), (tokens, counts.d, q)]


def _free(device: torch.device) -> None:
    # Only GPU memory needs handing back between stages; on a CPU a full gc pass per batch only
    # costs time (seconds each on a busy 2-core box, where it dominated the tiny bench).
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


_OOM = tuple(t for t in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None))
             if t is not None)


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, _OOM) or "out of memory" in str(e).lower()


def _peak_reset(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


# ---------------------------------------------------------------------------------------------
# the plan of one model's run


@dataclass
class StagePlan:
    layer: int
    positions_per_doc: int
    extract_batch: int
    extract_len: int
    av_prompt: int
    av_slot: int
    av_new: int
    av_batches: list
    temperature: float
    ar_batch: int
    ar_len: int
    sources: dict


def plan_for(spec: BenchModel, *, tiny: bool = False, new_tokens: int | None = None,
             batches: list[int] | None = None, temperature: float | None = None) -> StagePlan:
    from nla_ray.config import load_config
    from nla_ray.nla.extract import Extractor

    cfg = load_config(spec.preset)
    if tiny:
        s = TINY_STAGES
        n_layers = TINY_ARCH["num_hidden_layers"]
        new = new_tokens or s["av_new"]
        return StagePlan(layer=n_layers - 2, positions_per_doc=cfg.positions_per_doc,
                         extract_batch=s["extract_batch"], extract_len=s["extract_len"], av_prompt=s["av_prompt"],
                         av_slot=s["av_slot"],
                         av_new=new, av_batches=list(batches or s["av_batches"]),
                         temperature=cfg.av.temperature if temperature is None else temperature,
                         ar_batch=s["ar_batch"], ar_len=s["ar_overhead"] + new,
                         sources={"tiny": "TINY_STAGES"})
    budget = inspect.signature(Extractor.__init__).parameters["batch_tokens"].default
    prompt = PROMPT_TOKENS[spec.prompt]
    new = new_tokens or cfg.av.max_new_tokens
    return StagePlan(
        layer=cfg.layer, positions_per_doc=cfg.positions_per_doc,
        extract_batch=max(1, budget // cfg.max_length), extract_len=cfg.max_length,
        av_prompt=prompt["av"], av_slot=prompt["slot"], av_new=new, av_batches=list(batches or DEFAULT_BATCHES),
        temperature=cfg.av.temperature if temperature is None else temperature,
        ar_batch=cfg.pools["ar"].batch_size, ar_len=prompt["ar_overhead"] + new,
        sources={"preset": spec.preset, "extract_token_budget": f"Extractor.batch_tokens={budget}",
                 "prompt_tokens": prompt["counted_with"],
                 "ar_len": "AR template overhead + the full AV token budget (an upper bound)"})


# ---------------------------------------------------------------------------------------------
# stages


def _random_ids(batch: int, t: int, vocab: int, device, gen) -> torch.Tensor:
    # Token 0 is the pad id of these configs; real text never is all pads.
    return torch.randint(1, vocab, (batch, t), device=device, generator=gen)


def bench_prefill_stage(model, counts: Counts, *, n_layers: int, batch: int, t: int, hidden_states: bool,
                        head: torch.nn.Module | None, ceilings, device, reps, warmup, gen) -> dict:
    from nla_ray.nla.models import backbone_from_model

    bb = backbone_from_model(model, n_layers)
    ids = _random_ids(batch, t, counts.vocab, device, gen)
    mask = torch.ones_like(ids)
    last = torch.full((batch,), t - 1, device=device)
    rows = torch.arange(batch, device=device)

    @torch.no_grad()
    def run():
        out = bb(input_ids=ids, attention_mask=mask, output_hidden_states=hidden_states)
        if head is not None:
            return head(out.last_hidden_state[rows, last].float())
        return out

    _peak_reset(device)
    st = _stats(timed(run, device=device, reps=reps, warmup=warmup))
    work = counts.prefill(batch, t, n_layers, hidden_out=(n_layers + 1) if hidden_states else 0)
    if head is not None:
        work["flops"] += 2 * batch * counts.d * counts.d
    return {"status": "ok", "batch": batch, "tokens": t, "layers": n_layers, **st,
            "tokens_per_s": batch * t / st["median_s"], "rows_per_s": batch / st["median_s"],
            "peak_bytes": _peak(device), "roofline": roofline(st["median_s"], work["flops"], work["bytes"], ceilings)}


def _prompt_embeds(model, batch: int, t: int, slot: int, vocab: int, device, gen) -> torch.Tensor:
    """One prompt for every row (as in AVEngine) with a different random vector at `slot`."""
    from nla_ray.nla.av import inject

    ids = _random_ids(1, t, vocab, device, gen).expand(batch, t)
    with torch.no_grad():
        emb = model.get_input_embeddings()(ids)
    vec = torch.randn(batch, emb.shape[-1], device=device, generator=gen)
    # The vector's norm does not change the cost; the engine rescales it, here it stays as drawn.
    return inject(emb, slot, vec, None)


def bench_av_hf(model, emb, *, new: int, temperature: float, device, reps: int, warmup: int) -> dict:
    b = emb.shape[0]
    kw = dict(inputs_embeds=emb, attention_mask=torch.ones(emb.shape[:2], dtype=torch.long, device=device),
              pad_token_id=0)
    if temperature > 0:
        kw.update(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    else:
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)

    @torch.no_grad()
    def run():
        return model.generate(max_new_tokens=new, **kw)

    # The first call checks the fixed length and is the warm-up.
    out = run()
    if tuple(out.shape) != (b, new):
        raise RuntimeError(f"generate returned {tuple(out.shape)}, expected fixed length {(b, new)}")
    del out
    _peak_reset(device)
    st = _stats(timed(run, device=device, reps=reps, warmup=max(0, warmup - 1)))
    return {"status": "ok", **st, "peak_bytes": _peak(device)}


def bench_av_fast(model, emb, *, new: int, temperature: float, device, reps: int, warmup: int,
                  kv_bucket: int, backend: str = "fast", profile: bool = False) -> dict:
    from nla_ray.nla.fast_decode import FastDecoder

    b = emb.shape[0]
    dec = FastDecoder(model, stop_ids=(), kv_bucket=kv_bucket, **fast_options(backend))
    seeds = list(range(b)) if temperature > 0 else None
    t0 = time.perf_counter()
    toks = dec.generate(emb, temperature=temperature, seeds=seeds, max_new=new)  # builds + captures
    _sync(device)
    setup_s = time.perf_counter() - t0
    if tuple(toks.shape) != (b, new):
        raise RuntimeError(f"fast decode returned {tuple(toks.shape)}, expected {(b, new)}")
    info = {"setup_s": setup_s, "capture_s": dec.last["capture_s"], "graphs": dec.last["graphs"],
            "graph_error": dec.last["graph_error"], "kv_buckets": dec.last["buckets"],
            "shared_prefix": dec.last["shared_prefix"], "attn": dec.last["attn"],
            "attn_why_not": dec.last["attn_why_not"], "splits": dec.session.splits, "fuse_error": dec.fuse_error,
            "distinct_ids": int(toks.unique().numel())}
    for _ in range(max(0, warmup - 1)):
        dec.generate(emb, temperature=temperature, seeds=seeds, max_new=new)
    split = []

    def run():
        dec.generate(emb, temperature=temperature, seeds=seeds, max_new=new, timing=True)
        split.append((dec.last["prefill_s"], dec.last["decode_s"]))

    _peak_reset(device)
    st = _stats(timed(run, device=device, reps=reps, warmup=0))
    prefill = statistics.median(s[0] for s in split)
    decode = statistics.median(s[1] for s in split)
    out = {"status": "ok", **st, **info, "prefill_s": prefill, "decode_s": decode,
           "decode_s_per_token": decode / new, "peak_bytes": _peak(device)}
    if profile and device.type == "cuda":
        try:
            out["profile"] = profile_generate(lambda: dec.generate(emb, temperature=temperature, seeds=seeds,
                                                                   max_new=new), steps=new)
        except Exception as e:  # noqa: BLE001 - a profiler failure must not lose the timing above
            out["profile_error"] = f"{type(e).__name__}: {e}"[:300]
    dec.release()
    return out


# Kernel families of a decode step, by name (first match wins); the rest is "other".
KERNEL_KINDS = (("attention", ("flash", "fmha", "attention", "attn")),
                ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "matmul", "sm90_")),
                ("fused (compiled)", ("triton",)),
                ("copy / index", ("copy", "memcpy", "memset", "index", "cat", "scatter", "gather")),
                ("elementwise / reduce", ("elementwise", "reduce", "vectorized", "unrolled", "softmax", "argmax",
                                          "norm")))


def kernel_kind(name: str) -> str:
    low = name.lower()
    for kind, keys in KERNEL_KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def profile_generate(fn: Callable[[], object], *, steps: int) -> dict:
    """GPU kernel time of one generate call by kernel family (CUDA graph replays included: CUPTI
    records the kernels a replay launches), per generated token, against the call's wall time.
    The gap between the two is time the GPU sat idle between kernels."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
    wall = a.elapsed_time(b) / 1e3
    kinds: dict[str, float] = {}
    top: dict[str, list] = {}
    n_kernels = 0
    for e in prof.events():
        if getattr(e, "device_type", None) is None or "CUDA" not in str(e.device_type):
            continue
        t = (getattr(e, "device_time", None) or getattr(e, "cuda_time", 0) or 0) / 1e6
        kind = kernel_kind(e.name)
        kinds[kind] = kinds.get(kind, 0.0) + t
        rec = top.setdefault(e.name[:90], [0.0, 0])
        rec[0] += t
        rec[1] += 1
        n_kernels += 1
    busy = sum(kinds.values())
    return {"wall_s": wall, "kernel_s": busy, "idle_fraction": max(0.0, 1 - busy / wall) if wall else None,
            "kernels": n_kernels, "kernels_per_token": n_kernels / max(1, steps),
            "per_token_ms": {k: v * 1e3 / max(1, steps) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "top": [{"name": k, "s": v[0], "calls": v[1]} for k, v in
                    sorted(top.items(), key=lambda kv: -kv[1][0])[:15]]}


def teacher_forced_logits(model, emb: torch.Tensor, toks: torch.Tensor) -> torch.Tensor:
    """The plain path: one forward pass (the model's default attention, no cache) over the prompt
    and the decoder's own tokens; [B, new, vocab], row s = the logits token s was picked from."""
    with torch.no_grad():
        tail = model.get_input_embeddings()(toks[:, :-1]).to(emb.dtype)
        out = model(inputs_embeds=torch.cat([emb, tail], dim=1), use_cache=False, logits_to_keep=toks.shape[1])
    return out.logits


def compare_logits(fast: torch.Tensor, ref: torch.Tensor, k: int) -> dict:
    """[B, S, V] per-step logits of a decoder against the plain path's: top-1 agreement, top-k set
    overlap, and the largest difference in units of the reference row's standard deviation."""
    f, r = fast.float(), ref.float()
    top1 = float((f.argmax(-1) == r.argmax(-1)).float().mean())
    fk, rk = f.topk(k, dim=-1).indices, r.topk(k, dim=-1).indices
    overlap = float((fk[..., :, None] == rk[..., None, :]).any(-1).float().mean())
    err = ((f - r).abs().amax(-1) / r.std(-1).clamp_min(1e-6))
    return {"top1_agreement": top1, f"top{k}_overlap": overlap, "max_err_in_std": float(err.max()),
            "median_err_in_std": float(err.median())}


def check_fast(model, counts: Counts, plan: StagePlan, *, device, gen, kv_bucket: int, backends=FAST_BACKENDS) -> dict:
    """Each fast backend, greedy, against the plain path: per-step logits compared under teacher
    forcing (CHECK's bars), the number of distinct ids emitted (a check on output that never varies
    shows nothing), and graph replay against the same decoder run eagerly (same kernels: identical)."""
    from nla_ray.nla.fast_decode import FastDecoder

    b = min(CHECK["batch"], min(plan.av_batches))
    new = min(plan.av_new, CHECK["new"])
    emb = _prompt_embeds(model, b, plan.av_prompt, plan.av_slot, counts.vocab, device, gen)
    out = {"batch": b, "new_tokens": new, "bars": dict(CHECK), "backends": {}}
    cuda = device.type == "cuda"
    for backend in [x for x in backends if x in FAST_BACKENDS]:
        opts = fast_options(backend)
        if not cuda:
            opts["fuse"] = None  # inductor needs a GPU here; the CPU check covers the plain step
        rec: list = []
        dec = FastDecoder(model, graphs=cuda, kv_bucket=kv_bucket, **opts)
        toks = dec.generate(emb, max_new=new, record_logits=rec)
        r = {"distinct_ids": int(toks.unique().numel()), "graphs": dec.last["graphs"],
             "graph_error": dec.last["graph_error"], "attn": dec.last["attn"], "fuse_error": dec.fuse_error}
        dec.release()
        r.update(compare_logits(torch.stack(rec, 1), teacher_forced_logits(model, emb, toks), CHECK["top_k"]))
        del rec
        if cuda and backend == "fast":
            eager = FastDecoder(model, graphs=False, kv_bucket=kv_bucket, **opts).generate(emb, max_new=new)
            r["graph_equals_eager"] = bool(torch.equal(eager, toks))
        r["passed"] = bool(r["top1_agreement"] >= CHECK["min_top1"]
                           and r[f"top{CHECK['top_k']}_overlap"] >= CHECK["min_topk_overlap"]
                           and r["distinct_ids"] >= min(CHECK["min_distinct"], b)
                           and r.get("graph_equals_eager", True))
        out["backends"][backend] = r
        _free(device)
    return out


def _fits(device, need: float) -> tuple[bool, float | None]:
    if device.type != "cuda":
        return True, None
    free, _ = torch.cuda.mem_get_info(device)
    return need < free, float(free)


def _speedup(hf: dict, fast: dict) -> dict:
    """Median ratio, and the range the repetitions allow (slowest hf over fastest fast, and back)."""
    return {"median": hf["median_s"] / fast["median_s"],
            "low": min(hf["reps_s"]) / max(fast["reps_s"]), "high": max(hf["reps_s"]) / min(fast["reps_s"])}


def bench_av(model, counts: Counts, plan: StagePlan, *, backends, ceilings, device, reps, warmup, gen,
             kv_bucket: int, deadline: float | None, on_update: Callable[[], None], hf_reps: int | None = None,
             sample_temperature: float | None = None, profile: bool = False) -> dict:
    """Every backend at every batch size at the plan's temperature; with `sample_temperature`, the
    fast backends again at that temperature (per-row seeds), to price sampling against greedy."""
    res = {"prompt_len": plan.av_prompt, "new_tokens": plan.av_new, "temperature": plan.temperature,
           "sample_temperature": sample_temperature, "runs": []}
    oom_at: dict[str, int] = {}
    if any(b in FAST_BACKENDS for b in backends):
        try:
            res["check"] = check_fast(model, counts, plan, device=device, gen=gen, kv_bucket=kv_bucket,
                                      backends=backends)
        except Exception as e:  # noqa: BLE001
            res["check"] = {"status": "oom" if _is_oom(e) else "error", "reason": f"{type(e).__name__}: {e}"[:500]}
        finally:
            _free(device)
        on_update()
    temps = [plan.temperature] + ([sample_temperature] if sample_temperature is not None
                                  and sample_temperature != plan.temperature else [])
    # Sampling is timed on the backends that run in production (not hf, not the -sdpa comparison).
    todo = [(b, be, t) for b in plan.av_batches for be in backends for t in temps
            if t == plan.temperature or (be in FAST_BACKENDS and not be.endswith("-sdpa"))]
    biggest = max(plan.av_batches)
    # Batch by batch, every backend back to back: a run cut by its budget still has pairs to compare.
    for b, backend, temp in todo:
        row = {"backend": backend, "batch": b, "temperature": temp}
        res["runs"].append(row)
        if deadline is not None and time.time() > deadline:
            row.update(status="skipped", reason="time budget spent")
            continue
        if backend in oom_at and b > oom_at[backend]:
            row.update(status="skipped", reason=f"out of memory at batch {oom_at[backend]}")
            continue
        # The KV cache alone for (prompt + new) tokens; the fast path holds all of it at once.
        kv = b * (plan.av_prompt + plan.av_new) * counts.kv_bytes_per_token()
        ok, free = _fits(device, kv)
        if not ok:
            row.update(status="oom", reason="predicted", kv_bytes=kv, free_bytes=free)
            oom_at[backend] = min(oom_at.get(backend, b), b)
            on_update()
            continue
        emb = None
        try:
            emb = _prompt_embeds(model, b, plan.av_prompt, plan.av_slot, counts.vocab, device, gen)
            if backend == "hf":
                r = bench_av_hf(model, emb, new=plan.av_new, temperature=temp, device=device,
                                reps=hf_reps or reps, warmup=warmup)
            else:
                r = bench_av_fast(model, emb, new=plan.av_new, temperature=temp, device=device,
                                  reps=reps, warmup=warmup, kv_bucket=kv_bucket, backend=backend,
                                  profile=profile and b == biggest and backend.startswith("fused"))
            work = counts.generation(b, plan.av_prompt, plan.av_new, shared_prefix=plan.av_slot)
            r["roofline"] = roofline(r["median_s"], work["flops"], work["bytes"], ceilings)
            if "decode_s" in r:
                r["roofline_decode"] = roofline(r["decode_s"], work["decode"]["flops"], work["decode"]["bytes"],
                                                ceilings)
                r["roofline_prefill"] = roofline(r["prefill_s"], work["prefill"]["flops"],
                                                 work["prefill"]["bytes"], ceilings)
            r["tokens_per_s"] = b * plan.av_new / r["median_s"]
            r["explanations_per_s"] = b / r["median_s"]
            row.update(r)
        except Exception as e:  # noqa: BLE001 - one failed configuration must not end the run
            if _is_oom(e):
                row.update(status="oom", reason=str(e).splitlines()[0][:300])
                oom_at[backend] = min(oom_at.get(backend, b), b)
            else:
                row.update(status="error", reason=f"{type(e).__name__}: {e}"[:500])
        finally:
            del emb
            _free(device)
        on_update()
    ok = {(r["backend"], r["batch"], r["temperature"]): r for r in res["runs"] if r.get("status") == "ok"}
    t0 = plan.temperature
    res["speedup"] = [{"batch": b, **{f"{fb}_over_hf": _speedup(ok[("hf", b, t0)], ok[(fb, b, t0)])
                                      for fb in FAST_BACKENDS if (fb, b, t0) in ok}}
                      for b in plan.av_batches if ("hf", b, t0) in ok and any((fb, b, t0) in ok for fb in FAST_BACKENDS)]
    if len(temps) > 1:
        ts = temps[1]
        res["sampling"] = [{"batch": b, "backend": fb, "sampled_over_greedy": ok[(fb, b, ts)]["median_s"] /
                            ok[(fb, b, t0)]["median_s"]}
                           for b in plan.av_batches for fb in FAST_BACKENDS if (fb, b, ts) in ok and (fb, b, t0) in ok]
    res["best"] = {}
    for backend in backends:
        runs = [r for r in res["runs"] if r["backend"] == backend and r.get("status") == "ok" and r["temperature"] == t0]
        if runs:
            best = max(runs, key=lambda r: r["explanations_per_s"])
            res["best"][backend] = {"batch": best["batch"], "explanations_per_s": best["explanations_per_s"],
                                    "tokens_per_s": best["tokens_per_s"],
                                    "roofline_fraction": best["roofline"]["fraction"]}
    return res


# ---------------------------------------------------------------------------------------------
# the run


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # bf16 is what the presets run on a GPU; on a CPU bf16 matmuls are slow, so fp32.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
            "fp16": torch.float16, "float16": torch.float16}[name]


def device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return {"type": "cuda", "name": p.name, "memory_bytes": int(p.total_memory),
                "multiprocessors": p.multi_processor_count, "torch": torch.__version__,
                "cuda": torch.version.cuda}
    return {"type": "cpu", "name": "CPU", "threads": torch.get_num_threads(), "torch": torch.__version__}


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def bench_model(spec: BenchModel, *, device, dtype, tiny, backends, reps, warmup, new_tokens, batches,
                temperature, kv_bucket, deadline, on_update, entry: dict, hf_reps: int | None = None,
                sample_temperature: float | None = None, profile: bool = False) -> dict:
    import transformers

    plan = plan_for(spec, tiny=tiny, new_tokens=new_tokens, batches=batches, temperature=temperature)
    entry.update({"checkpoint": spec.checkpoint, "preset": spec.preset, "plan": asdict(plan),
                  "config_class": spec.config_class, "transformers": transformers.__version__})
    t0 = time.perf_counter()
    model = build_model(spec, device=device, dtype=dtype, tiny=tiny)
    _sync(device)
    entry["build_s"] = time.perf_counter() - t0
    counts = Counts.of(model)
    # Ceilings measured here, in this model's process and next to its rows, with its own matmul
    # shapes: every roofline fraction of this model divides by these.
    ceilings = measure_ceilings(device, dtype, reps=reps, warmup=warmup,
                                shapes=model_matmul_shapes(counts, plan.extract_batch * plan.extract_len))
    entry["ceilings"] = ceilings
    entry["ceilings_used"] = {k: ceilings[k] for k in ("copy_bytes_per_s", "matmul_flops_per_s")}
    entry["arch"] = {k: v for k, v in asdict(counts).items() if k not in ("block_params", "block_matmul", "windows")}
    entry["arch"].update(total_params=counts.total_params, weight_bytes=counts.total_params * counts.elt,
                         kv_bytes_per_token=counts.kv_bytes_per_token(),
                         sliding_layers=sum(w is not None for w in counts.windows),
                         sliding_window=next((w for w in counts.windows if w), None))
    on_update()
    gen = torch.Generator(device=device).manual_seed(1)
    k1 = plan.layer + 1

    def stage(name, fn):
        if deadline is not None and time.time() > deadline:
            entry[name] = {"status": "skipped", "reason": "time budget spent"}
        else:
            try:
                entry[name] = fn()
            except Exception as e:  # noqa: BLE001
                entry[name] = {"status": "oom" if _is_oom(e) else "error",
                               "reason": f"{type(e).__name__}: {e}"[:500]}
            finally:
                _free(device)
        on_update()

    common = dict(ceilings=ceilings, device=device, reps=reps, warmup=warmup, gen=gen)
    stage("extraction", functools.partial(bench_prefill_stage, model, counts, n_layers=k1, batch=plan.extract_batch,
                                          t=plan.extract_len, hidden_states=True, head=None, **common))
    if entry["extraction"].get("status") == "ok":
        entry["extraction"]["activations_per_s"] = entry["extraction"]["rows_per_s"] * plan.positions_per_doc
    # The AR's value head: Linear(d, d) in fp32 on the last real token, as AREngine runs it. The AR
    # runs before the AV sweep: it takes seconds, the sweep takes minutes and may hit the budget.
    head = torch.nn.Linear(counts.d, counts.d, bias=False, device=device, dtype=torch.float32)
    stage("ar", functools.partial(bench_prefill_stage, model, counts, n_layers=k1, batch=plan.ar_batch,
                                  t=plan.ar_len, hidden_states=False, head=head, **common))
    stage("av", functools.partial(bench_av, model, counts, plan, backends=backends, kv_bucket=kv_bucket,
                                  deadline=deadline, on_update=on_update, hf_reps=hf_reps,
                                  sample_temperature=sample_temperature, profile=profile, **common))
    del model, head
    _free(device)
    return entry


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def run(models: list[str], out: str | Path, *, tiny: bool = False, device: str = "auto", dtype: str = "auto",
        backends=DEFAULT_BACKENDS, reps: int = 3, warmup: int = 1, new_tokens: int | None = None,
        batches: list[int] | None = None, temperature: float | None = None, kv_bucket: int = 64,
        budget_s: float | None = None, fresh: bool = False, figure: bool = True, hf_reps: int | None = None,
        sample_temperature: float | None = None, profile: bool = False) -> dict:
    """Benchmark `models`, writing summary.json / table.md / figure.png under `out` after every
    stage (a run cut short keeps what it measured). An existing summary of the same kind (tiny or
    not) is merged: models measured now replace their entries, others stay."""
    from nla_ray.core.provenance import provenance

    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; known: {sorted(MODELS)}")
    bad = [b for b in backends if b not in BACKENDS]
    if bad:
        raise ValueError(f"unknown backend(s) {bad}; known: {list(BACKENDS)}")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    dt = resolve_dtype(dtype, dev)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "summary.json"
    start = time.time()
    deadline = start + budget_s if budget_s else None
    summary = {}
    if path.is_file() and not fresh:
        old = json.loads(path.read_text())
        if old.get("schema") == SCHEMA and old.get("tiny") == tiny:
            summary = old
    prov = provenance(extra={"job": "bench", "models": models})
    summary.update({"schema": SCHEMA, "tiny": tiny, "provenance": prov, "device": device_info(dev),
                    "dtype": str(dt).replace("torch.", "")})
    summary.setdefault("models", {})
    summary.setdefault("runs", []).append({k: prov[k] for k in ("command", "git_commit", "date", "machine")})
    settings = {"reps": reps, "hf_reps": hf_reps or reps, "warmup": warmup, "backends": list(backends),
                "kv_bucket": kv_bucket, "budget_s": budget_s, "sample_temperature": sample_temperature,
                "profile": profile}

    def update():
        _write_json(path, summary)

    update()
    measured_by = {k: prov[k] for k in ("command", "git_commit", "date", "machine")}
    for name in models:
        entry = {"status": "running", "settings": settings, "measured_by": measured_by}
        summary["models"][name] = entry
        try:
            bench_model(MODELS[name], device=dev, dtype=dt, tiny=tiny, backends=backends, reps=reps, warmup=warmup,
                        new_tokens=new_tokens, batches=batches, temperature=temperature, kv_bucket=kv_bucket,
                        deadline=deadline, on_update=update, entry=entry, hf_reps=hf_reps,
                        sample_temperature=sample_temperature, profile=profile)
            entry["status"] = "ok"
        except Exception as e:  # noqa: BLE001 - e.g. the weights alone do not fit
            entry["status"] = "oom" if _is_oom(e) else "error"
            entry["reason"] = f"{type(e).__name__}: {e}"[:500]
            _free(dev)
        entry["wall_s"] = time.time() - start
        update()
    summary["wall_s"] = time.time() - start
    update()
    (out / "table.md").write_text(render_markdown(summary))
    if figure:
        render_figure(summary, out / "figure.png")
    return summary


def merge(specs: list[tuple[str | Path, list[str]]], out: str | Path, *, figure: bool = True) -> dict:
    """One summary from several runs on the same kind of device: `specs` = [(summary.json, [models
    to take from it])], later specs win. Each model keeps the ceilings and provenance of the run
    that measured it (`measured_by`); the tables are re-rendered. Nothing is re-measured."""
    merged: dict | None = None
    for src, names in specs:
        s = json.loads(Path(src).read_text())
        if s.get("schema") != SCHEMA:
            raise ValueError(f"{src}: schema {s.get('schema')!r} is not {SCHEMA!r}")
        if merged is None:
            merged = {**s, "models": {}, "runs": [], "merged_from": []}
        elif (s.get("tiny"), s["device"].get("name"), s.get("dtype")) != \
                (merged.get("tiny"), merged["device"].get("name"), merged.get("dtype")):
            raise ValueError(f"{src}: another device, scale or dtype ({s['device'].get('name')}, tiny={s.get('tiny')}, "
                             f"{s.get('dtype')}) than {merged['device'].get('name')}, tiny={merged.get('tiny')}, "
                             f"{merged.get('dtype')}")
        run = {k: s["provenance"][k] for k in ("command", "git_commit", "date", "machine")}
        missing = [n for n in names if n not in s.get("models", {})]
        if missing:
            raise ValueError(f"{src}: no model(s) {missing}; it has {sorted(s.get('models', {}))}")
        for n in names:
            entry = dict(s["models"][n])
            entry.setdefault("measured_by", run)
            merged["models"][n] = entry
        merged["runs"].append(run)
        merged["merged_from"].append({"summary": str(src), "models": list(names), **run})
        # Each model keeps the ceilings its own run measured (entry["ceilings"]).
        merged.update(provenance=s["provenance"])
    if merged is None:
        raise ValueError("nothing to merge")
    from nla_ray.core.provenance import provenance

    p = provenance(extra={"job": "bench-merge"})
    merged["merged_by"] = {k: p[k] for k in ("command", "git_commit", "date", "machine")}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "summary.json", merged)
    (out / "table.md").write_text(render_markdown(merged))
    if figure:
        render_figure(merged, out / "figure.png")
    return merged


# ---------------------------------------------------------------------------------------------
# reporting


def _fmt(x, spec=".3g"):
    return "—" if x is None else format(x, spec)


def _pct(x):
    return "—" if x is None else f"{100 * x:.0f}%"


def _ceil_line(name: str, c: dict) -> str:
    mm = c["matmul"]
    best = mm.get("best_shape") or [mm["n"]] * 3
    return (f"- {name}: copy {c['copy_bytes_per_s'] / 1e12:.3g} TB/s (read + write, {c['copy']['bytes'] / 2**30:.3g} GiB "
            f"moved per rep, {len(c['copy']['reps_s'])} reps, spread {_pct(c['copy']['spread'])}); {mm['dtype']} matmul "
            f"{c['matmul_flops_per_s'] / 1e12:.3g} TFLOP/s (best of {len(mm.get('shapes', [1]))} shapes, at "
            f"{'x'.join(str(x) for x in best)})")


def render_markdown(summary: dict) -> str:
    prov = summary["provenance"]
    lines = [f"# NLA stage throughput — {prov['machine']}" + (" (tiny, CPU test scale)" if summary["tiny"] else ""),
             "",
             f"Random-weight models in {summary['dtype']}; {prov['date']}; commit `{prov['git_commit']}`; "
             f"`{prov['command']}`.",
             "",
             *([f"Merged by `{summary['merged_by']['command']}` ({summary['merged_by']['date']}) from "
                f"{len(summary['merged_from'])} runs (nothing re-measured); each model's numbers come "
                "from one run, named in its `measured_by` in summary.json:", ""]
               + [f"- `{r['command']}` (commit `{r['git_commit']}`, {r['date']}): {', '.join(r['models'])}"
                  for r in summary["merged_from"]] + [""] if summary.get("merged_from") else []),
             "Ceilings, measured in each model's own process just before its rows (every roofline fraction of a "
             "model divides by its line). Roofline fraction = max(FLOPs / rate, bytes / bandwidth) / measured.", ""]
    for name, m in summary["models"].items():
        c = m.get("ceilings") or summary.get("ceilings")
        if c:
            lines.append(_ceil_line(name, c))
    lines += ["", "| model | stage | batch | tokens | median s | throughput | bound | roofline |",
              "|---|---|---|---|---|---|---|---|"]
    for name, m in summary["models"].items():
        for st in ("extraction", "ar"):
            r = m.get(st, {})
            if r.get("status") != "ok":
                lines.append(f"| {name} | {st} | | | {r.get('status', '—')} | {r.get('reason', '')[:60]} | | |")
                continue
            lines.append(f"| {name} | {st} (blocks 0..{r['layers'] - 1}) | {r['batch']} | {r['tokens']} | "
                         f"{_fmt(r['median_s'])} | {_fmt(r['tokens_per_s'])} tok/s | {r['roofline']['bound']} | "
                         f"{_pct(r['roofline']['fraction'])} |")
    lines += ["", "## AV sampling (prefill + fixed-length decode)", "",
              "hf = `model.generate`; fast = static KV cache + CUDA-graph decode step; fused = fast with RMSNorm, "
              "rotary and sampling maths compiled (`torch.compile`) into fewer kernels; fast and fused take the "
              "decoder's default attention step at the run's commit, and the attn column says which ran (triton = "
              "nla_ray/nla/decode_kernel.py, flash = FlashAttention-2 varlen, sdpa = masked SDPA over a key "
              "bucket); fused-sdpa / fused-flash / fused-triton force that step. "
              "Speedup is against hf at the same batch and temperature, in the same process: median ratio "
              "[slowest hf rep / fastest fast rep, fastest hf / slowest fast]. Spread = (max - min) / median of "
              "the repetitions.", "",
              "| model | batch | T | backend | attn | median s | spread | speedup vs hf | expl/s | decode ms/token | "
              "roofline (decode only for fast) | graphs |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in summary["models"].items():
        av = m.get("av")
        if not isinstance(av, dict) or "runs" not in av:
            continue
        t0 = av.get("temperature", 0.0)
        by = {(r["backend"], r["batch"], r.get("temperature", t0)): r for r in av["runs"]}
        for b in sorted({r["batch"] for r in av["runs"]}):
            for temp in sorted({r.get("temperature", t0) for r in av["runs"]}):
                h = by.get(("hf", b, temp), {})
                for backend in BACKENDS:
                    r = by.get((backend, b, temp))
                    if r is None:
                        continue
                    lead = f"| {name} | {b} | {_fmt(temp, 'g')} | {backend} |"
                    if r.get("status") != "ok":
                        lines.append(f"{lead} | {r.get('status', '—')} | {r.get('reason', '')[:50]} | | | | | |")
                        continue
                    fast = backend in FAST_BACKENDS
                    sp = _speedup(h, r) if fast and h.get("status") == "ok" else None
                    roof = r["roofline_decode"]["fraction"] if fast else r["roofline"]["fraction"]
                    attn = (r.get("attn") or ("flash" if r.get("flash") else "sdpa")) if fast else "—"
                    lines.append(
                        f"{lead} {attn} | {_fmt(r['median_s'])} | {_pct(r.get('spread'))} | "
                        + (f"{sp['median']:.2f}× [{sp['low']:.2f}, {sp['high']:.2f}]" if sp else "—")
                        + f" | {_fmt(r['explanations_per_s'])} | "
                        f"{_fmt(r['decode_s_per_token'] * 1e3) if fast else '—'} | {_pct(roof)} | "
                        f"{r.get('graphs', '—') if fast else '—'} |")
    samp = [(n, x) for n, m in summary["models"].items() if isinstance(m.get("av"), dict)
            for x in m["av"].get("sampling", [])]
    if samp:
        lines += ["", "Sampling (per-row seeds) against greedy, same backend and batch: time ratio.", "",
                  "| model | batch | backend | sampled / greedy |", "|---|---|---|---|"]
        lines += [f"| {n} | {x['batch']} | {x['backend']} | {x['sampled_over_greedy']:.3f} |" for n, x in samp]
    checks = [(n, m["av"]["check"]) for n, m in summary["models"].items()
              if isinstance(m.get("av"), dict) and "check" in m["av"]]
    if checks:
        k = CHECK["top_k"]
        lines += ["", f"Correctness (greedy, teacher-forced): each fast backend's per-step logits against one plain "
                  f"forward pass over the prompt + its own tokens. Bars: top-1 agreement ≥ {_pct(CHECK['min_top1'])}, "
                  f"top-{k} overlap ≥ {_pct(CHECK['min_topk_overlap'])}, ≥ {CHECK['min_distinct']} distinct ids "
                  "(attention sharpened so greedy output varies; see bench.SHARPEN), graph replay == eager for fast.",
                  "", f"| model | backend | batch × tokens | distinct ids | top-1 | top-{k} overlap | max err (row std) | "
                  "graph == eager | passed |", "|---|---|---|---|---|---|---|---|---|"]
        for n, c in checks:
            if "backends" not in c:
                lines.append(f"| {n} | | | {c.get('status', '—')}: {c.get('reason', '')[:60]} | | | | | |")
                continue
            for be, r in c["backends"].items():
                lines.append(f"| {n} | {be} | {c['batch']} × {c['new_tokens']} | {r['distinct_ids']} | "
                             f"{_pct(r['top1_agreement'])} | {_pct(r[f'top{k}_overlap'])} | "
                             f"{_fmt(r['max_err_in_std'])} | {r.get('graph_equals_eager', '—')} | {r['passed']} |")
    profs = [(n, r) for n, m in summary["models"].items() if isinstance(m.get("av"), dict)
             for r in m["av"].get("runs", []) if r.get("profile")]
    if profs:
        kinds = [kd for kd, _ in KERNEL_KINDS] + ["other"]
        lines += ["", "Where a decode token's GPU time goes (each fused backend, largest batch; torch.profiler "
                  "over one generate "
                  "call, CUDA-graph replays included; ms per token by kernel family; idle = wall - kernel time).", "",
                  "| model | backend | batch | T | " + " | ".join(kinds) + " | kernels / token | idle |",
                  "|---|---|---|---|" + "---|" * len(kinds) + "---|---|"]
        for n, r in profs:
            p = r["profile"]
            lines.append(f"| {n} | {r['backend']} | {r['batch']} | {_fmt(r['temperature'], 'g')} | "
                         + " | ".join(_fmt(p['per_token_ms'].get(kd), '.2f') for kd in kinds)
                         + f" | {p['kernels_per_token']:.0f} | {_pct(p['idle_fraction'])} |")
    return "\n".join(lines) + "\n"


def render_figure(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, m in summary["models"].items():
        av = m.get("av")
        if not isinstance(av, dict):
            continue
        for backend, style in (("hf", "--o"), ("fast", "-s"), ("fused", "-^"), ("fused-sdpa", ":v"),
                               ("fused-flash", ":x"), ("fused-triton", "-.d")):
            runs = sorted((r for r in av.get("runs", []) if r["backend"] == backend and r.get("status") == "ok"
                           and r.get("temperature", av.get("temperature")) == av.get("temperature")),
                          key=lambda r: r["batch"])
            if runs:
                ax1.plot([r["batch"] for r in runs], [r["explanations_per_s"] for r in runs], style,
                         label=f"{name} {backend}")
    ax1.set_xscale("log", base=2)
    ax1.set_yscale("log")
    ax1.set_xlabel("AV batch size")
    ax1.set_ylabel("explanations / s (fixed-length decode)")
    ax1.set_title("AV sampling throughput")
    ax1.legend(fontsize=7)
    labels, fracs = [], []
    for name, m in summary["models"].items():
        for st in ("extraction", "ar"):
            r = m.get(st, {})
            if r.get("status") == "ok":
                labels.append(f"{name}\n{st}")
                fracs.append(r["roofline"]["fraction"])
        best = (m.get("av") or {}).get("best", {}) if isinstance(m.get("av"), dict) else {}
        for backend in BACKENDS:
            if backend in best:
                labels.append(f"{name}\nav {backend} b={best[backend]['batch']}")
                fracs.append(best[backend]["roofline_fraction"])
    ax2.bar(range(len(fracs)), fracs)
    ax2.set_xticks(range(len(fracs)))
    ax2.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax2.set_ylabel("roofline fraction (floor / measured)")
    ax2.set_ylim(0, 1)
    ax2.set_title("Share of the measured ceilings reached")
    fig.suptitle(f"{summary['provenance']['machine']} — {summary['dtype']}" + (" — tiny" if summary["tiny"] else ""),
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
