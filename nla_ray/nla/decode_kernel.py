"""A decode-step attention kernel (Triton) for the fast decoder: one query token per row against
that row's static cache, reading each key and value once.

Why not FlashAttention or SDPA: at decode, the query heads that share a KV head are the only
queries that can share a tile (Gemma-3-27B: 2 of them, Qwen2.5-7B: 7), and those kernels tile
queries by 64-128 rows, so on the H200 they spend most of their time on padding (the 27B at batch
256: 16 ms of a 42 ms step in attention, where reading the cache once takes ~6 ms). Here a program
owns one (row, KV head, split of the keys): it loads the group's queries once (padded to 16 rows,
the least a tensor-core dot takes), streams the keys 0..n-1 of its row (n read from a device
tensor, so one CUDA graph serves every step and no empty cache is read), and keeps the online
softmax in fp32. Sliding windows are a lower bound on the keys (HF's rule: key j is visible from
query i when i - j < window). When the grid has few programs (small batch, few KV heads) the keys
are split across programs and a second kernel merges the partial softmaxes.

Triton is imported here only, and this module only when the decoder picks the kernel, so machines
without Triton (and CPUs, outside Triton's interpreter) never load it.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _decode_attention_split(Q, K, V, SEQ, OUT, PM, PL, PACC,
                  s_qb, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_ob, s_oh,
                  scale, window, n_splits,
                  G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                  SPLIT: tl.constexpr, PREC: tl.constexpr):
    # int64 offsets: batch x cache stride passes 2**31 at large batches and long caches.
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    s = tl.program_id(2)
    n_valid = tl.load(SEQ + b)
    lo = tl.maximum(n_valid - window, 0)  # no window: the caller passes one longer than any cache
    # Keys [lo, n_valid) cut into n_splits stretches of whole blocks.
    per = (n_valid - lo + n_splits - 1) // n_splits
    per = (per + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    start = lo + s * per
    end = tl.minimum(start + per, n_valid)
    g = tl.arange(0, GP)
    d = tl.arange(0, D)
    gmask = g < G
    q = tl.load(Q + b * s_qb + (h * G + g)[:, None] * s_qh + d[None, :], mask=gmask[:, None], other=0.0)
    m = tl.full([GP], float("-inf"), tl.float32)
    l = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        valid = n < end
        k = tl.load(K + b * s_kb + n[:, None] * s_ks + h * s_kh + d[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(V + b * s_vb + n[:, None] * s_vs + h * s_vh + d[None, :], mask=valid[:, None], other=0.0)
        sc = tl.dot(q, tl.trans(k), input_precision=PREC).to(tl.float32) * scale
        sc = tl.where(valid[None, :], sc, float("-inf"))
        m_new = tl.maximum(m, tl.max(sc, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(sc - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC).to(tl.float32)
        m = m_new
    if SPLIT:
        # Partial softmax of this stretch: [B, Hkv, splits, G] maxima and sums, [.., G, D] sums.
        base = ((b * tl.num_programs(1) + h) * n_splits + s) * G
        tl.store(PM + base + g, m, mask=gmask)
        tl.store(PL + base + g, l, mask=gmask)
        tl.store(PACC + (base + g)[:, None] * D + d[None, :], acc, mask=gmask[:, None])
    else:
        out = acc / l[:, None]
        tl.store(OUT + b * s_ob + (h * G + g)[:, None] * s_oh + d[None, :], out.to(OUT.dtype.element_ty),
                 mask=gmask[:, None])


@triton.jit
def _decode_attention_merge(OUT, PM, PL, PACC, s_ob, s_oh, n_splits,
                  G: tl.constexpr, D: tl.constexpr, SP: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)   # KV head
    g = tl.program_id(2)                # query row of the group
    s = tl.arange(0, SP)
    d = tl.arange(0, D)
    smask = s < n_splits
    base = ((b * tl.num_programs(1) + h) * n_splits + s) * G + g
    m = tl.load(PM + base, mask=smask, other=float("-inf"))
    l = tl.load(PL + base, mask=smask, other=0.0)
    top = tl.max(m, 0)
    w = tl.where(m > float("-inf"), tl.exp(m - top), 0.0)  # an empty stretch weighs nothing
    acc = tl.load(PACC + base[:, None] * D + d[None, :], mask=smask[:, None], other=0.0)
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
    tl.store(OUT + b * s_ob + (h * G + g) * s_oh + d, out.to(OUT.dtype.element_ty))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count if torch.cuda.is_available() else 1


def splits_for(batch: int, kv_heads: int, max_len: int, block_n: int, device) -> int:
    """Stretches per (row, KV head): enough programs for ~4 per SM, each with at least a block."""
    dev = torch.device(device)
    sms = _sm_count(dev.index or 0) if dev.type == "cuda" else 1
    want = -(-4 * sms // max(1, batch * kv_heads))
    return max(1, min(want, -(-max_len // block_n), 16))


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, seqused: torch.Tensor,
                     scale: float | None, window: int | None, n_splits: int = 1) -> torch.Tensor:
    """query [B, H, 1, D]; key/value [B, Hkv, S, D] (any strides with the last one 1, e.g. the
    transposed view of a [B, S, Hkv, D] cache); seqused [B] int32 = keys each row attends
    (0..n-1). Returns the attention output [B, 1, H, D] in the query's dtype."""
    b, h, _, d = query.shape
    kv_heads = key.shape[1]
    group = h // kv_heads
    if d & (d - 1) or d < 16:
        raise ValueError(f"decode kernel needs a power-of-two head_dim >= 16, got {d}")
    block_n = 64 if d <= 128 else 32
    gp = max(16, triton.next_power_of_2(group))
    out = torch.empty(b, 1, h, d, dtype=query.dtype, device=query.device)
    q = query.reshape(b, h, d)
    if q.stride(-1) != 1:
        q = q.contiguous()
    o = out.view(b, h, d)
    scale = float(d ** -0.5 if scale is None else scale)
    split = n_splits > 1
    if split:
        pm = torch.empty(b, kv_heads, n_splits, group, dtype=torch.float32, device=query.device)
        pl = torch.empty_like(pm)
        pacc = torch.empty(b, kv_heads, n_splits, group, d, dtype=torch.float32, device=query.device)
    else:
        pm = pl = pacc = o  # unused
    _decode_attention_split[(b, kv_heads, n_splits)](
        q, key, value, seqused, o, pm, pl, pacc,
        q.stride(0), q.stride(1), key.stride(0), key.stride(2), key.stride(1),
        value.stride(0), value.stride(2), value.stride(1), o.stride(0), o.stride(1),
        scale, int(window) if window else 1 << 30, n_splits,
        G=group, GP=gp, D=d, BLOCK_N=block_n, SPLIT=split,
        # fp32 models (the mini presets) keep fp32 products; tf32 would round them to 10 bits.
        PREC="ieee" if query.dtype == torch.float32 else "tf32", num_warps=4, num_stages=2)
    if split:
        _decode_attention_merge[(b, kv_heads, group)](o, pm, pl, pacc, o.stride(0), o.stride(1), n_splits,
                                            G=group, D=d, SP=triton.next_power_of_2(n_splits), num_warps=4)
    return out
