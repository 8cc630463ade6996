"""Per-sample sampling noise: a pure function of (seed, step, token id).

A leaf shared by the AV's decode loop and the fast decoder, so a row's sampled text does not depend
on which batch or which backend produced it, and reruns are bit-identical.
"""

from __future__ import annotations

import hashlib

import torch

_M32 = 0xFFFFFFFF


def sample_seed(*parts) -> int:
    """A 63-bit seed from any tuple, e.g. (run seed, doc_id, position, sample index)."""
    h = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & 0x7FFFFFFFFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # Integer hash on int64 lanes kept below 2**32, so products never overflow int64.
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    return (x >> 16) ^ x


def gumbel_noise(seeds: torch.Tensor, step: int, vocab: int) -> torch.Tensor:
    """[B, V] Gumbel noise that depends only on (seed, step, token id) — batch-independent."""
    s = seeds.to(torch.int64)
    k = _mix32(_mix32((s & _M32) ^ _mix32((s >> 32) & _M32)) ^ step)
    ids = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    h = _mix32(_mix32(k[:, None] ^ ids[None, :]) ^ (ids[None, :] >> 7))
    u = ((h >> 8).to(torch.float32) + 0.5) / float(1 << 24)  # exact in fp32, strictly in (0,1)
    return -torch.log(-torch.log(u))
