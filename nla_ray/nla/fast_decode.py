"""Fast AV decoding: a static KV cache and a one-token decode step replayed as a CUDA graph.

`AVEngine._generate_loop` pays, per generated token, a Python walk over every block (hundreds of
small kernel launches), a KV cache that grows by concatenation, and a host sync (`done.all()`).
For a batch of same-length AV prompts none of that is needed: every row sits at the same position,
so the cache can be one preallocated buffer per layer (transformers' `StaticCache`, batch x
(prompt_len + max_new)), and one decode step — sample the next token, embed it, run every block,
write the logits — has fixed shapes and can be captured once and replayed per token.

Semantics are the loop's, row for row: greedy argmax, or argmax(logits / temperature + Gumbel
noise) with the noise from `nla_ray.nla.av.gumbel_noise(seed, step, vocab)` (batch-independent); banned
tokens masked to -inf; a finished row keeps emitting the first stop id; every `check_every` steps
(8, the loop's cadence for its closed-tag test) the host looks once: rows whose text holds
`</explanation>` are marked done, and the decode stops when every row is done.

How it stays correct under graph replay: the position of the token being fed lives in a device
tensor advanced inside the graph; attention masks are computed in-graph from that tensor by a
registered attention function (`nla_fast_static`), which the model uses only while this module
decodes; keys are read up to a length bucket (a separate graph per `kv_bucket` tokens), so early
steps do not stream the empty tail of the cache. Sliding-window layers keep a full-length buffer
and get the window from the mask (HF's rule: key j is visible from query i when i - j < window).

Prefill shares work across rows: the rows of an AV batch are one prompt with a different vector in
one slot, so every position before the slot has the same keys and values in every row; that
prefix runs once at batch 1 and is written to all rows, and only the tail from the slot on runs at
full batch. The shared length is found by comparing the rows' embeddings, so any batch is safe.

On CPU (and with `graphs=False`) the same step runs eagerly, which is what the CPU tests compare
token for token against `_generate_loop`.
"""

from __future__ import annotations

import contextlib
import functools
import time
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from nla_ray.config import AV_ATTN
from nla_ray.core.noise import gumbel_noise

ATTN_NAME = "nla_fast_static"
_ACTIVE: "_Session | None" = None  # the session whose masks the attention function reads


# ---------------------------------------------------------------------------------------------
# attention


def _attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """AttentionInterface function: [B, H, q, hd] queries against the static cache's keys."""
    sess = _ACTIVE
    if sess is None:
        # Only reachable if a model is left switched to this implementation: behave like sdpa.
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if kwargs.get("softcap") is not None:
        raise ValueError("fast decode does not implement attention-logit softcapping (Gemma-2 style)")
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    b, h, q_len, hd = query.shape
    kv_heads = key.shape[1]
    group = h // kv_heads
    if q_len == 1 and sess.kernel == "triton":
        from nla_ray.nla.decode_kernel import decode_attention

        win = window if window is not None and window < sess.max_len else None
        return decode_attention(query, key, value, sess.seqused, scaling, win, sess.splits), None
    if q_len == 1 and sess.kernel == "flash" and (window is None or window >= sess.max_len):
        return _flash_decode(sess, query, key, value, scaling), None
    if q_len == 1:
        n = sess.kv_len
        k, v = key[:, :, :n], value[:, :, :n]
        mask = sess.decode_mask(window, n)
        # Grouped-query attention without copying keys: the `group` query heads that share one KV
        # head become `group` query rows of that head (head h reads KV head h // group).
        q = query.reshape(b, kv_heads, group, hd)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)
        out = out.reshape(b, h, 1, hd)
    else:
        # Prefill: queries at positions off..off+q_len-1 against keys 0..off+q_len-1 (off > 0 when
        # a shared prompt prefix is already in the cache).
        off = sess.q_offset
        n = off + q_len
        k, v = key[:, :, :n], value[:, :, :n]
        if group > 1:
            k = k[:, :, None].expand(b, kv_heads, group, n, hd).reshape(b, h, n, hd)
            v = v[:, :, None].expand(b, kv_heads, group, n, hd).reshape(b, h, n, hd)
        if off == 0 and (window is None or window >= q_len):
            out = F.scaled_dot_product_attention(query, k, v, is_causal=True, scale=scaling)
        else:
            out = F.scaled_dot_product_attention(query, k, v, attn_mask=sess.prefill_mask(q_len, window, off),
                                                 scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _flash_decode(sess: "_Session", query, key, value, scaling) -> torch.Tensor:
    """One decode step of attention with FlashAttention-2's variable-length kernel: [B, 1, H, hd].

    Two things the masked SDPA step cannot do: read each row's keys only up to the current position
    (`seqused_k`, a device tensor advanced in-graph, so one graph serves every step and no bucket
    of empty cache is streamed), and read each KV head once for all the query heads that share it.
    The second is the grouped-query trick of the FlashAttention decode path: the `group` query heads
    of one KV head become `group` query rows of a sequence whose only head is that KV head, so the
    kernel streams the cache once per KV head rather than once per query head (Qwen2.5-7B: 7x less).
    Every query row sees every key up to the position, so no causal mask is needed."""
    b, h, _, hd = query.shape
    kv_heads = key.shape[1]
    group = h // kv_heads
    # [B, H, 1, hd] -> rows (b, g) x heads kv: query head kv * group + g reads KV head kv.
    q = query.view(b, kv_heads, group, hd).transpose(1, 2).reshape(b * group, kv_heads, hd)
    # The cache's storage is [B, S, Hkv, hd] (see _PinnedLayerMixin): `key` is its transposed view.
    k = key.transpose(1, 2).reshape(b * sess.max_len, kv_heads, hd)
    v = value.transpose(1, 2).reshape(b * sess.max_len, kv_heads, hd)
    cu_q, cu_k = sess.flash_offsets(group)
    out = _varlen_flash(q, k, v, cu_q, cu_k, group, sess.max_len, scaling, sess.seqused)
    return out.view(b, group, kv_heads, hd).transpose(1, 2).reshape(b, 1, h, hd)


def _varlen_flash(q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale, seqused) -> torch.Tensor:
    """FlashAttention-2, variable-length form, no causal mask (a module-level seam: the CPU tests
    put a plain-torch reference of the same contract here)."""
    return torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, False, False,
                                                   scale=scale, seqused_k=seqused)[0]


def flash_decode_status(device, dtype, head_dim: int, softcap=None) -> str | None:
    """None when the flash decode step can run here, else the reason it cannot (then the masked
    SDPA step runs). A tiny call is made and compared with SDPA, so a kernel missing from this
    build, or one that disagrees, is found before any graph is captured."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return "not a CUDA device"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"FlashAttention needs bf16/fp16, the model runs {str(dtype).replace('torch.', '')}"
    if head_dim % 8 or head_dim > 256:
        return f"head_dim {head_dim} not supported by FlashAttention-2"
    if softcap is not None:
        return "attention-logit softcapping"
    if torch.cuda.get_device_capability(dev) < (8, 0):
        return "GPU older than sm80"
    if not hasattr(torch.ops.aten, "_flash_attention_forward"):
        return "this torch has no _flash_attention_forward"
    try:
        g = torch.Generator(device=dev).manual_seed(0)
        b, kvh, group, s_max, used = 3, 2, 2, 40, 17
        q = torch.randn(b, kvh * group, 1, head_dim, device=dev, dtype=dtype, generator=g)
        kb = torch.randn(b, s_max, kvh, head_dim, device=dev, dtype=dtype, generator=g)
        vb = torch.randn(b, s_max, kvh, head_dim, device=dev, dtype=dtype, generator=g)

        class _S:  # the session fields _flash_decode reads
            max_len = s_max
            seqused = torch.full((b,), used, dtype=torch.int32, device=dev)

            @staticmethod
            def flash_offsets(grp):
                ar = torch.arange(b + 1, dtype=torch.int32, device=dev)
                return ar * grp, ar * s_max

        got = _flash_decode(_S, q, kb.transpose(1, 2), vb.transpose(1, 2), None)
        err = float((got.float() - _reference_decode(q, kb, vb, _S.seqused, None)).abs().max())
        if not err < 2e-2:
            return f"flash decode disagrees with SDPA on a self-test (max abs error {err:.3g})"
    except Exception as e:  # noqa: BLE001 - any failure means: use the masked SDPA step
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return None


def triton_decode_status(device, dtype, head_dim: int, softcap=None) -> str | None:
    """None when the Triton decode kernel can run here, else why not. Like the flash check, a
    small call (both the one-pass and the split form, a window too) is compared with SDPA first."""
    import os

    dev = torch.device(device)
    if dev.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "not a CUDA device"
    if softcap is not None:
        return "attention-logit softcapping"
    if head_dim & (head_dim - 1) or head_dim < 16:
        return f"head_dim {head_dim} is not a power of two >= 16"
    try:
        from nla_ray.nla.decode_kernel import decode_attention
    except Exception as e:  # noqa: BLE001 - no Triton: another step runs
        return f"Triton unavailable ({type(e).__name__}: {e})"[:200]
    try:
        g = torch.Generator(device=dev).manual_seed(0)
        b, kvh, group, s_max = 3, 2, 3, 80
        q = torch.randn(b, kvh * group, 1, head_dim, device=dev, dtype=dtype, generator=g)
        kb = torch.randn(b, s_max, kvh, head_dim, device=dev, dtype=dtype, generator=g)
        vb = torch.randn(b, s_max, kvh, head_dim, device=dev, dtype=dtype, generator=g)
        used = torch.tensor([1, 37, 80], dtype=torch.int32, device=dev)
        for window, splits in ((None, 1), (None, 3), (20, 2)):
            got = decode_attention(q, kb.transpose(1, 2), vb.transpose(1, 2), used, None, window, splits)
            err = float((got.float() - _reference_decode(q, kb, vb, used, window)).abs().max())
            tol = 1e-4 if dtype == torch.float32 else 3e-2
            if not err < tol:
                return f"Triton decode disagrees with SDPA on a self-test (max abs error {err:.3g})"
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return None


def _reference_decode(q, kb, vb, used, window) -> torch.Tensor:
    """Plain-torch decode attention in fp32: [B, H, 1, D] queries, [B, S, Hkv, D] caches -> [B, 1, H, D]."""
    b, h, _, d = q.shape
    group = h // kb.shape[2]
    out = []
    for i in range(b):
        n = int(used[i])
        lo = max(0, n - window) if window else 0
        k = kb[i, lo:n].float().transpose(0, 1).repeat_interleave(group, 0)  # [H, n, D]
        v = vb[i, lo:n].float().transpose(0, 1).repeat_interleave(group, 0)
        out.append(F.scaled_dot_product_attention(q[i].float(), k, v).transpose(0, 1))
    return torch.stack(out)


_REGISTERED = False


def _register() -> None:
    global _REGISTERED
    if not _REGISTERED:
        from transformers import AttentionInterface

        AttentionInterface.register(ATTN_NAME, _attention)
        _REGISTERED = True


@contextlib.contextmanager
def _switched(model, sess: "_Session"):
    """Route the model's attention through `_attention` and make `sess` the mask source, then undo.
    Every config object reachable from a module is switched, so multimodal wrappers follow too."""
    global _ACTIVE
    _register()
    configs = {}
    for m in model.modules():
        c = getattr(m, "config", None)
        if c is not None and hasattr(c, "_attn_implementation_internal"):
            configs[id(c)] = c
    saved = [(c, c._attn_implementation_internal) for c in configs.values()]
    prev = _ACTIVE
    try:
        for c, _ in saved:
            c._attn_implementation_internal = ATTN_NAME
        _ACTIVE = sess
        yield
    finally:
        _ACTIVE = prev
        for c, old in saved:
            c._attn_implementation_internal = old


# ---------------------------------------------------------------------------------------------
# fused elementwise ops (optional)
#
# Inside a CUDA graph the host cost is gone, but every kernel still costs the GPU a few
# microseconds. Eager RMSNorm is ~10 kernels (cast, pow, mean, add, rsqrt, mul, ...), a Gemma-3
# block has six of them plus two rotary embeddings, so at decode batch sizes a 62-block model spends
# milliseconds per token on tiny kernels. `fuse=` compiles the norm and rotary math once per
# process (shapes dynamic) into a few kernels and routes the model's modules through them while the
# decoder runs; the arithmetic is the same (fp32 norm, same casts), only the kernels differ.

_GEMMA_NORMS = {"Gemma3RMSNorm", "Gemma2RMSNorm", "GemmaRMSNorm"}
_LLAMA_NORMS = {"LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm"}


def _norm_gemma(x, w, eps: float):  # Gemma: (x_hat * (1 + w)) in fp32, then the input dtype
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * (1.0 + w.float())).type_as(x)


def _norm_llama(x, w, eps: float):  # Llama/Qwen: w * x_hat cast back to the input dtype
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * y.to(x.dtype)


@functools.lru_cache(maxsize=None)
def _compiled(fn, backend: str):
    return torch.compile(fn, dynamic=True, backend=backend)


@contextlib.contextmanager
def _fused(model, backend: str | None):
    """Route RMSNorms and rotary embeddings through compiled versions (`backend` None: no-op)."""
    if not backend:
        yield
        return
    import sys

    patched, modules = [], {}
    stack = contextlib.ExitStack()
    try:
        # Norms of several ranks (hidden, q/k heads) x batch/length 1 specialisations can exceed
        # dynamo's default of 8 graphs per function, after which it would quietly run eager.
        cfg = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(cfg, name):
                stack.enter_context(cfg.patch(**{name: max(64, getattr(cfg, name))}))
                break
        for m in model.modules():
            name = type(m).__name__
            if name in _GEMMA_NORMS or name in _LLAMA_NORMS:
                fn = _compiled(_norm_gemma if name in _GEMMA_NORMS else _norm_llama, backend)
                eps = float(getattr(m, "eps", getattr(m, "variance_epsilon", 1e-6)))
                patched.append((m, m.__dict__.get("forward")))  # an instance forward (e.g. a hook) comes back
                m.forward = functools.partial(fn, w=m.weight, eps=eps)
            mod = sys.modules.get(type(m).__module__)
            if mod is not None and callable(getattr(mod, "apply_rotary_pos_emb", None)):
                modules.setdefault(mod.__name__, (mod, mod.apply_rotary_pos_emb))
        for mod, orig in modules.values():
            mod.apply_rotary_pos_emb = _compiled(orig, backend)
        yield
    finally:
        for m, prev in patched:
            if prev is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = prev
        for mod, orig in modules.values():
            mod.apply_rotary_pos_emb = orig
        stack.close()


# ---------------------------------------------------------------------------------------------
# cache


class _PinnedLayerMixin:
    """One layer's preallocated keys/values, written at the session's device-side position."""

    def _setup(self, sess: "_Session", batch: int, kv_heads: int, head_dim: int, dtype, device):
        self.sess = sess
        # Stored [B, S, Hkv, hd] (what FlashAttention's variable-length kernel reads as [B*S, Hkv,
        # hd]); `keys`/`values` are [B, Hkv, S, hd] views of it, the layout transformers expects.
        self.keys = torch.zeros(batch, sess.max_len, kv_heads, head_dim, dtype=dtype, device=device).transpose(1, 2)
        self.values = torch.zeros(batch, sess.max_len, kv_heads, head_dim, dtype=dtype,
                                  device=device).transpose(1, 2)
        self.dtype, self.device = dtype, device
        self.batch_size, self.num_heads, self.k_head_dim = batch, kv_heads, head_dim
        self.v_head_dim = head_dim
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states):  # buffers exist from the start
        return None

    def update(self, key_states, value_states, *args, **kwargs):
        shared = self.sess.broadcast
        if (key_states.shape[0] != self.keys.shape[0] and not (shared and key_states.shape[0] == 1)) \
                or key_states.shape[1] != self.keys.shape[1] or key_states.shape[3] != self.keys.shape[3]:
            raise ValueError(f"static cache holds {tuple(self.keys.shape)}, the model wrote "
                             f"{tuple(key_states.shape)}: per-layer head counts differ from the config")
        n = key_states.shape[-2]
        idx = self.sess.pos.view(1) if n == 1 else self.sess.pos + self.sess.arange[:n]
        if shared:
            # A prefix every row shares, computed once: the same keys go to every row.
            full = (self.keys.shape[0], -1, -1, -1)
            self.keys.index_copy_(2, idx, key_states.expand(full))
            self.values.index_copy_(2, idx, value_states.expand(full))
            return self.keys[:1], self.values[:1]
        self.keys.index_copy_(2, idx, key_states)
        self.values.index_copy_(2, idx, value_states)
        return self.keys, self.values


@functools.lru_cache(maxsize=None)
def _pinned_layer_class():
    # Built on first use: transformers is imported lazily, like everywhere else in nla_ray.
    from transformers.cache_utils import StaticLayer

    return type("_PinnedLayer", (_PinnedLayerMixin, StaticLayer), {})


def _make_cache(model, sess: "_Session", batch: int, dtype, device):
    """transformers' StaticCache, its layers replaced by full-length buffers that write at the
    session position (HF's own static layers keep the write index in per-layer state, and its
    sliding layers roll on a host-side counter: neither survives graph replay unchanged)."""
    from transformers import StaticCache

    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    layer_cls = _pinned_layer_class()
    cache = StaticCache(config=model.config, max_cache_len=sess.max_len)
    layers = []
    for _ in range(len(cache.layers)):
        layer = layer_cls(max_cache_len=sess.max_len)
        layer._setup(sess, batch, kv_heads, head_dim, dtype, device)
        layers.append(layer)
    cache.layers = layers
    return cache


# ---------------------------------------------------------------------------------------------
# one decode session: fixed (batch, prompt length, max_new, sampling mode)


def _model_dtype(model) -> torch.dtype:
    return next(p for p in model.parameters() if p.is_floating_point()).dtype


def output_vocab(model) -> int:
    emb = model.get_output_embeddings()
    if emb is not None:
        return emb.weight.shape[0]
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return cfg.vocab_size


def shared_prefix_len(emb: torch.Tensor) -> int:
    """Leading positions where every row's embedding equals row 0's (bitwise), capped so at least
    one position is left for the per-row pass; 0 for a single row."""
    if emb.shape[0] < 2:
        return 0
    differs = (emb[1:] != emb[:1]).flatten(2).any(dim=2).any(dim=0)
    first = differs.nonzero()
    n = int(first[0]) if first.numel() else emb.shape[1]
    return min(n, emb.shape[1] - 1)


def kv_buckets(prompt_len: int, max_new: int, bucket: int) -> list[int]:
    """Key lengths that get their own graph: multiples of `bucket` covering prompt_len+1 .. max_len."""
    max_len = prompt_len + max_new
    if bucket <= 0:
        return [max_len]
    first = -(-(prompt_len + 1) // bucket) * bucket
    out = list(range(first, max_len, bucket)) + [max_len]
    return sorted(set(min(x, max_len) for x in out))


def _text_config(model):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _windows(cfg) -> list[int | None]:
    """Each layer's sliding window (None: full attention), from the config's layer types."""
    n = cfg.num_hidden_layers
    win = getattr(cfg, "sliding_window", None)
    if win is None or getattr(cfg, "use_sliding_window", True) is False:
        return [None] * n
    types = getattr(cfg, "layer_types", None) or ["sliding_attention"] * n
    return [win if t == "sliding_attention" else None for t in types]


# The decode step's attention: "triton" (nla_ray.nla.decode_kernel), "flash" (FlashAttention-2's
# varlen kernel), "sdpa" (masked SDPA over a key-length bucket); "auto" takes the first of AUTO_ATTN
# that runs here, else sdpa.
ATTN_CHOICES = AV_ATTN
# Triton first: on the H200 (results/perf/h200-decode-r3) it beat FlashAttention-2's step by 16% per
# token on Gemma-3-27B at batch 128 (22.8 vs 27.1 ms) and 7-12% on Qwen2.5-7B, and the 27B's
# teacher-forced logits check passed with it (100% top-1, 96% top-10). Each session still self-tests
# the chosen kernel against SDPA and falls through to the next when it disagrees or cannot run.
AUTO_ATTN = ("triton", "flash")


def _pick(logits, banned, seeds, step, done, stop, temperature: float, has_banned: bool):
    """The next token of every row (and the rows done after it): greedy argmax, or the Gumbel-max
    sample with per-row noise. A pure function so `fuse` can compile it into a few kernels: eager, the
    noise hash over [B, vocab] int64 lanes is ~30 full-size kernels per step."""
    lg = logits.float()
    if has_banned:
        lg = lg.masked_fill(banned, float("-inf"))
    if temperature > 0:
        nxt = torch.argmax(lg / temperature + gumbel_noise(seeds, step, lg.shape[-1]), dim=-1)
    else:
        nxt = torch.argmax(lg, dim=-1)
    if stop is not None:
        nxt = torch.where(done, stop[0], nxt)
        # isin may sort and size its output on the host for larger inputs; a broadcast compare never
        # leaves the device, so it is safe inside a captured graph.
        done = done | (nxt[:, None] == stop[None, :]).any(dim=1)
    return nxt, done


class _Session:
    def __init__(self, model, *, batch: int, prompt_len: int, max_new: int, temperature: float,
                 banned: bool, stop_ids: Sequence[int], vocab: int, device, kv_bucket: int,
                 attn: str = "auto", fuse: str | None = None):
        self.model = model
        self.batch, self.prompt_len, self.max_new = batch, prompt_len, max_new
        self.max_len = prompt_len + max_new
        self.temperature, self.has_banned = float(temperature), banned
        self.vocab = vocab
        self.device = torch.device(device)
        self.dtype = _model_dtype(model)
        dev = self.device
        self.arange = torch.arange(self.max_len, device=dev)
        self.pos = torch.zeros((), dtype=torch.long, device=dev)    # position of the token being fed
        self.step = torch.zeros((), dtype=torch.long, device=dev)   # index of the token being sampled
        self.tok = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.logits = torch.zeros(batch, vocab, dtype=self.dtype, device=dev)
        self.out = torch.zeros(batch, max_new, dtype=torch.long, device=dev)
        self.done = torch.zeros(batch, dtype=torch.bool, device=dev)
        self.seeds = torch.zeros(batch, dtype=torch.int64, device=dev)
        self.banned = torch.zeros(vocab, dtype=torch.bool, device=dev)
        self.stop = torch.tensor(list(stop_ids), dtype=torch.long, device=dev) if stop_ids else None
        cfg = _text_config(model)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        softcap = getattr(cfg, "attn_logit_softcapping", None)
        why_not = {}
        self.kernel = "sdpa"
        # "auto" tries AUTO_ATTN in order (Triton, then flash; see there for the timings), else sdpa.
        for name, status in (("triton", triton_decode_status), ("flash", flash_decode_status)):
            if attn == name or (attn == "auto" and name in AUTO_ATTN):
                why_not[name] = status(dev, self.dtype, head_dim, softcap)
                if why_not[name] is None:
                    self.kernel = name
                    break
                if attn == name:
                    raise ValueError(f"attn={name!r} cannot run here: {why_not[name]}")
        self.why_not = why_not  # each faster kernel tried and why it could not run
        self.seqused = torch.zeros(batch, dtype=torch.int32, device=dev)  # keys each row attends
        self._offsets: dict = {}
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.splits = 1
        if self.kernel == "triton":
            from nla_ray.nla.decode_kernel import splits_for

            self.splits = splits_for(batch, kv_heads, self.max_len, 64, dev)
        # Layers the triton/flash steps serve need no key-length buckets: they read up to the position
        # themselves. Under flash, sliding layers the decode can outgrow keep the masked step (and buckets).
        one_graph = self.kernel == "triton" or (
            self.kernel == "flash" and all(w is None or w >= self.max_len for w in _windows(cfg)))
        self.buckets = kv_buckets(prompt_len, max_new, 0 if one_graph else kv_bucket)
        self.fuse = fuse
        self.kv_len = self.max_len
        self._masks: dict = {}
        self.broadcast = False   # prefill of a shared prefix at batch 1: write it to every row
        self.q_offset = 0        # position of the first query of a prefill pass
        self.prefix_len = 0
        self.cache = _make_cache(model, self, batch, self.dtype, dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.graph_error: str | None = None
        self.capture_s = 0.0

    # masks --------------------------------------------------------------------------------
    def decode_mask(self, window, n: int) -> torch.Tensor:
        """[1, 1, 1, n] bool: keys at positions <= pos (and > pos - window on sliding layers)."""
        key = (window if window is not None and window < self.max_len else None, n)
        m = self._masks.get(key)
        if m is None:
            ar = self.arange[:n]
            m = ar <= self.pos
            if key[0] is not None:
                m = m & (ar > self.pos - key[0])
            m = m.view(1, 1, 1, n)
            self._masks[key] = m
        return m

    def prefill_mask(self, q_len: int, window: int | None, offset: int = 0) -> torch.Tensor:
        """[1, 1, q_len, offset + q_len] bool for queries at offset.. against keys 0.."""
        d = self.arange[offset: offset + q_len, None] - self.arange[None, : offset + q_len]
        m = d >= 0
        if window is not None:
            m = m & (d < window)
        return m.view(1, 1, q_len, offset + q_len)

    def flash_offsets(self, group: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Cumulative query and key offsets of the flash step: `group` query rows and a max_len
        stretch of cache per batch row (made on the first, uncaptured, step; reused in graphs)."""
        got = self._offsets.get(group)
        if got is None:
            ar = torch.arange(self.batch + 1, dtype=torch.int32, device=self.device)
            got = self._offsets[group] = (ar * group, ar * self.max_len)
        return got

    def bucket_for(self, step: int) -> int:
        need = self.prompt_len + step + 1
        return next(b for b in self.buckets if b >= need)

    # the step ------------------------------------------------------------------------------
    def sample(self) -> None:
        """Pick token `step` for every row from `logits`; record it; feed it next."""
        pick = _compiled(_pick, self.fuse) if self.fuse else _pick
        nxt, done = pick(self.logits, self.banned, self.seeds, self.step, self.done, self.stop,
                         self.temperature, self.has_banned)
        if self.stop is not None:
            self.done.copy_(done)
        self.out.index_copy_(1, self.step.view(1), nxt.view(-1, 1))
        self.tok.copy_(nxt.view(-1, 1))

    def forward(self, kv_len: int) -> None:
        """Run token `step` through the model at position prompt_len + step; advance `step`."""
        self.kv_len = kv_len
        self._masks = {}
        self.pos.copy_(self.step + self.prompt_len)
        if self.kernel != "sdpa":
            self.seqused.copy_(self.pos + 1)  # keys 0..pos, every row (broadcast, cast to int32)
        out = self.model(input_ids=self.tok, position_ids=self.pos.view(1, 1), past_key_values=self.cache,
                         use_cache=True)
        self.logits.copy_(out.logits[:, -1])
        self.step.add_(1)

    def full_step(self, kv_len: int) -> None:
        self.sample()
        self.forward(kv_len)

    def prefill(self, emb: torch.Tensor, share_prefix: bool = True) -> None:
        """Fill the cache with the prompts and `logits` with each row's next-token logits.

        AV prompts are one template with a different vector in one slot, so every position before
        the slot is the same for all rows, and so is its KV (causal attention): with
        `share_prefix`, that prefix runs once at batch 1 and is broadcast, and only the rest runs
        at full batch."""
        self.kv_len = self.max_len
        self._masks = {}
        self.pos.zero_()
        off = shared_prefix_len(emb) if share_prefix else 0
        self.prefix_len = off
        try:
            if off > 0:
                self.broadcast, self.q_offset = True, 0
                self.model(inputs_embeds=emb[:1, :off], position_ids=self.arange[:off].view(1, -1),
                           past_key_values=self.cache, use_cache=True, logits_to_keep=1)
                self.broadcast = False
                self.pos.fill_(off)
            self.q_offset = off
            out = self.model(inputs_embeds=emb[:, off:], position_ids=self.arange[off: self.prompt_len].view(1, -1),
                             past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        finally:
            self.broadcast, self.q_offset = False, 0
        self.logits.copy_(out.logits[:, -1])
        self.step.zero_()
        self.done.zero_()

    # graphs --------------------------------------------------------------------------------
    def capture(self) -> None:
        """One graph per key-length bucket, sharing one memory pool (they never run concurrently).
        Warm-up runs mutate the state; `prefill` resets all of it before real use."""
        t0 = time.perf_counter()
        pool = None
        current = torch.cuda.current_stream(self.device)
        stream = torch.cuda.Stream(device=self.device)
        stream.wait_stream(current)
        try:
            for i, kv_len in enumerate(self.buckets):
                with torch.cuda.stream(stream):
                    # Keep the warm-up position inside this bucket and inside the output buffer.
                    at = max(0, min(kv_len - 1 - self.prompt_len, self.max_new - 1))
                    # The first bucket warms up twice: library handles and workspaces get created
                    # on the first run, and none of that may happen during capture.
                    for _ in range(2 if i == 0 else 1):
                        self.step.fill_(at)
                        self.full_step(kv_len)
                    self.step.fill_(at)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool, stream=stream):
                    self.full_step(kv_len)
                pool = g.pool()
                self.graphs[kv_len] = g
                # Masks made during capture live in the pool; the next capture may reuse it.
                self._masks = {}
            current.wait_stream(stream)
        except Exception as e:  # noqa: BLE001 - a capture failure falls back to the eager step
            self.graphs = {}
            if "out of memory" in str(e).lower():
                raise  # the eager step would need the same memory: let the caller size down
            self.graph_error = f"{type(e).__name__}: {e}"
            torch.cuda.synchronize(self.device)
        self.capture_s = time.perf_counter() - t0

    def run_step(self, step: int) -> None:
        kv_len = self.bucket_for(step)
        g = self.graphs.get(kv_len)
        if g is not None:
            g.replay()
        else:
            self.full_step(kv_len)


class FastDecoder:
    """Decode batches of same-length prompt embeddings on one model. Keeps the last session
    (cache + graphs) and reuses it while (batch, prompt length, max_new, sampling mode) repeat."""

    def __init__(self, model, *, stop_ids: Sequence[int] = (), graphs: bool | None = None,
                 kv_bucket: int = 64, check_every: int = 8, share_prefix: bool = True,
                 fuse: str | bool | None = None, attn: str = "auto"):
        if check_every < 1:
            raise ValueError("check_every must be >= 1")
        self.model = model
        self.stop_ids = [int(i) for i in stop_ids]
        self.vocab = output_vocab(model)
        self.device = next(model.parameters()).device
        self.graphs = (self.device.type == "cuda") if graphs is None else bool(graphs)
        if self.graphs and self.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        self.kv_bucket = kv_bucket
        self.check_every = check_every
        self.share_prefix = share_prefix
        # fuse: True = torch.compile's default backend (inductor); a string names another backend
        # (tests use "aot_eager", which needs no compiler); None/False = plain eager kernels.
        self.fuse = ("inductor" if fuse is True else fuse) or None
        self.fuse_error: str | None = None
        # attn: "auto" = the flash decode step where it can run (CUDA, bf16/fp16), else masked SDPA;
        # "flash" insists (an error says why it cannot run); "sdpa" = always the masked step.
        if attn not in ATTN_CHOICES:
            raise ValueError(f"attn {attn!r} not in {ATTN_CHOICES}")
        self.attn = attn
        self.session: _Session | None = None
        self.last: dict = {}

    def release(self) -> None:
        """Drop the cache and graphs (their memory goes back to the allocator)."""
        self.session = None

    def _session(self, batch, prompt_len, max_new, temperature, banned) -> _Session:
        key = (batch, prompt_len, max_new, float(temperature), bool(banned))
        s = self.session
        if s is not None and (s.batch, s.prompt_len, s.max_new, s.temperature, s.has_banned) == key:
            return s
        self.session = None  # free the old buffers before allocating new ones
        s = _Session(self.model, batch=batch, prompt_len=prompt_len, max_new=max_new, temperature=temperature,
                     banned=banned, stop_ids=self.stop_ids, vocab=self.vocab, device=self.device,
                     kv_bucket=self.kv_bucket, attn=self.attn, fuse=self.fuse)
        if self.graphs:
            with _switched(self.model, s), _fused(self.model, self.fuse):
                s.capture()
        self.session = s
        return s

    def generate(self, emb: torch.Tensor, **kw) -> torch.Tensor:
        """[B, T, d] prompt embeddings -> [B, n_steps] token ids; see `_generate` for the keywords.

        With `fuse`, a failure to compile the fused kernels (no Triton, an inductor error) drops
        this decoder to the plain fast path once, with the reason kept in `fuse_error` and a
        warning, rather than ending the caller's run."""
        if not self.fuse:
            return self._generate(emb, **kw)
        try:
            return self._generate(emb, **kw)
        except Exception as e:  # noqa: BLE001
            if "out of memory" in str(e).lower():
                raise
            import warnings

            self.fuse_error = f"{type(e).__name__}: {e}"[:500]
            warnings.warn(f"fused decode kernels failed, using the plain fast path: {self.fuse_error}")
            self.fuse, self.session = None, None
            return self._generate(emb, **kw)

    @torch.no_grad()
    def _generate(self, emb: torch.Tensor, *, temperature: float = 0.0, seeds: Sequence[int] | None = None,
                  banned_ids: Sequence[int] | None = None, max_new: int,
                  on_check: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None] | None = None,
                  timing: bool = False, record_logits: list | None = None) -> torch.Tensor:
        """[B, T, d] prompt embeddings -> [B, n_steps] token ids (device tensor).

        `on_check(tokens[B, s+1], done[B])` runs at every check point and may return extra rows
        to mark done. With no stop ids and no `on_check` the decode is fixed-length (benchmarks).
        With `timing`, `self.last` gets prefill / decode seconds (device-synchronised). With
        `record_logits` (a list), the logits each token was picked from are appended to it, one
        [B, vocab] copy per step (correctness checks; it costs a copy per step)."""
        if emb.ndim != 3:
            raise ValueError(f"prompt embeddings must be [batch, length, d], got {tuple(emb.shape)}")
        if max_new < 1:
            raise ValueError("max_new must be >= 1")
        batch, prompt_len = emb.shape[:2]
        if temperature > 0 and (seeds is None or len(seeds) != batch):
            raise ValueError("sampling (temperature > 0) needs one seed per row; see av.sample_seed")
        sess = self._session(batch, prompt_len, max_new, temperature, bool(banned_ids))
        if temperature > 0:
            sess.seeds.copy_(torch.tensor([int(s) for s in seeds], dtype=torch.int64))
        if banned_ids:
            sess.banned.zero_()
            sess.banned[torch.tensor([int(i) for i in banned_ids], dtype=torch.long, device=sess.device)] = True
        checking = sess.stop is not None or on_check is not None
        clock = _Clock(sess.device) if timing else None
        with _switched(self.model, sess), _fused(self.model, self.fuse):
            if clock:
                clock.mark("start")
            sess.prefill(emb.to(sess.dtype), share_prefix=self.share_prefix)
            if clock:
                clock.mark("prefill")
            n_steps = max_new
            for s in range(max_new):
                if record_logits is not None:
                    record_logits.append(sess.logits.clone())
                if s == max_new - 1:
                    sess.sample()  # the last token needs no forward pass
                else:
                    sess.run_step(s)
                if checking and (s % self.check_every == self.check_every - 1 or s == max_new - 1):
                    if on_check is not None:
                        extra = on_check(sess.out[:, : s + 1], sess.done)
                        if extra is not None:
                            sess.done |= extra.to(device=sess.device, dtype=torch.bool)
                    if bool(sess.done.all()):
                        n_steps = s + 1
                        break
            if clock:
                clock.mark("decode")
        toks = sess.out[:, :n_steps].clone()  # the buffer is overwritten by the next call
        self.last = {"n_steps": n_steps, "graphs": bool(sess.graphs), "graph_error": sess.graph_error,
                     "shared_prefix": sess.prefix_len, "attn": sess.kernel, "flash": sess.kernel == "flash",
                     "flash_why_not": sess.why_not.get("flash"),
                     "attn_why_not": sess.why_not,
                     "capture_s": sess.capture_s, "buckets": list(sess.buckets)}
        if clock:
            self.last.update(clock.seconds())
        return toks


class _Clock:
    """Named marks; CUDA events on a GPU (no sync until read), perf_counter on a CPU."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.marks: list = []

    def mark(self, name: str) -> None:
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append((name, e))
        else:
            self.marks.append((name, time.perf_counter()))

    def seconds(self) -> dict:
        if self.cuda:
            self.marks[-1][1].synchronize()
        out = {}
        for (_, a), (name, b) in zip(self.marks, self.marks[1:]):
            out[f"{name}_s"] = (a.elapsed_time(b) / 1e3) if self.cuda else (b - a)
        return out


# ---------------------------------------------------------------------------------------------
# how many rows fit


def bytes_per_row(model, prompt_len: int, max_new: int, sampling: bool = False) -> dict:
    """GPU bytes one more row of a fast decode needs, by part: the static KV cache at prompt_len +
    max_new (every layer, both K and V), the per-step vocabulary work (the logits buffer, the model's
    logits output, the fp32 copy sampling reads, and for sampling the noise's fp32/int64 lanes), and
    the prompt pass's largest transient (hidden states and the MLP's intermediate at the prompt's
    length). Rough on the transient side by design: it is small next to the cache at AV lengths."""
    cfg = _text_config(model)
    elt = _model_dtype(model).itemsize if hasattr(_model_dtype(model), "itemsize") else 2
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    vocab = output_vocab(model)
    kv = cfg.num_hidden_layers * 2 * kv_heads * head_dim * elt * (prompt_len + max_new)
    logits = vocab * (2 * elt + 4 + (4 + 8 + 8 if sampling else 0))
    inter = getattr(cfg, "intermediate_size", 4 * cfg.hidden_size)
    prefill = prompt_len * (4 * cfg.hidden_size + 3 * inter) * elt
    return {"kv_cache": kv, "vocab_work": logits, "prefill_transient": prefill, "total": kv + logits + prefill}


def auto_batch_size(model, prompt_len: int, max_new: int, *, free_bytes: int, sampling: bool = False,
                    use: float = 0.85, cap: int = 1024, multiple: int = 8) -> int:
    """The largest batch (a multiple of `multiple`, at most `cap`) whose rows fit in `use` of the
    free GPU memory. Raises when not even one row fits, naming the numbers."""
    per = bytes_per_row(model, prompt_len, max_new, sampling)
    room = int(free_bytes * use)
    n = room // per["total"]
    if n < 1:
        raise ValueError(f"one AV row needs ~{per['total'] / 2**20:.0f} MiB (KV cache {per['kv_cache'] / 2**20:.0f} MiB "
                         f"at {prompt_len}+{max_new} tokens) but only {free_bytes / 2**20:.0f} MiB are free "
                         f"({use:.0%} usable): lower av.max_new_tokens or give the AV pool more of a GPU")
    return int(max(1, min(cap, n if n < multiple else n // multiple * multiple)))


# ---------------------------------------------------------------------------------------------
# the AVEngine entry point


def decoder_for(engine) -> FastDecoder:
    """The engine's FastDecoder, created on first use and kept on the engine."""
    dec = getattr(engine, "_fast_decoder", None)
    # Fused kernels come from inductor, which needs a GPU (or a C++ toolchain): only on CUDA.
    fuse = True if engine.backend == "fused" and next(engine.model.parameters()).is_cuda else None
    # A decoder that already fell back from fused kernels (fuse_error set) is kept, not rebuilt.
    if dec is None or dec.model is not engine.model or dec.stop_ids != [int(i) for i in engine.stop_ids] \
            or dec.attn != engine.attn \
            or (dec.fuse != (fuse and "inductor") and dec.fuse_error is None):
        dec = FastDecoder(engine.model, stop_ids=engine.stop_ids, fuse=fuse, attn=engine.attn)
        engine._fast_decoder = dec
    return dec


def fast_generate(engine, emb: torch.Tensor, temperature: float, seeds: Sequence[int] | None,
                  banned_ids: Sequence[int] | None, max_new: int) -> list[list[int]]:
    """Drop-in for `AVEngine._generate_loop`: same arguments after `self`, same token rows."""
    from nla_ray.nla import templates as T

    tok = engine.tok
    dec = decoder_for(engine)
    # Only the tokens since the last check (plus the tag's length, for a tag split across two checks)
    # can hold a new closing tag. Detokenising whole rows at every check, 256 rows x 200 tokens with
    # the Qwen tokenizer, took 0.17 s of CPU per decode (the GPU waiting) against 0.035 s for the
    # tails (measured on the dev machine's CPU); the decode itself takes ~2.2 s on an H200. Rows
    # already done stay done either way.
    window = dec.check_every + len(tok.encode(T.CLOSE_TAG, add_special_tokens=False)) + 2

    def closed_tag(toks: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
        finished = done.tolist()
        rows = toks[:, -window:].tolist()
        return torch.tensor([(not f) and T.CLOSE_TAG in tok.decode(r, skip_special_tokens=True)
                             for r, f in zip(rows, finished)], dtype=torch.bool)

    toks = dec.generate(emb, temperature=temperature, seeds=seeds, banned_ids=banned_ids, max_new=max_new,
                        on_check=closed_tag)
    return [engine._trim_after_close(r) for r in toks.tolist()]
