"""GPU memory per pool, and where Ray may put the pools' actors (pure: no Ray, no torch).

Two questions, answered before any actor starts:

1. **Memory.** What one actor of each pool holds on its GPU: the weights of the part of the model it
   loads, the KV cache at its batch size, activations, and a fixed runtime overhead. The numbers
   are estimates from the architecture (config fields) and the pool/run settings, roughly right
   (±10%), not measured; what they assume:

   - weights: parameters x dtype bytes. A decoder block is q/k/v/o projections, a gated MLP (three
     `hidden x intermediate` matrices) and its norms. Extraction and the AR load the embedding and
     blocks 0..K only (the AR truncated model, NLA_FACTS); an untied LM head is built by the
     truncated CausalLM load and dropped after it, so it is counted (the caching allocator keeps
     its memory). The AV loads the whole model, LM head included. A checkpoint in a multimodal
     wrapper (the released Gemma-3 base and AV: `Gemma3ForConditionalGeneration`) also loads its
     vision tower (`extra_params`). The AR adds its fp32 value head (`hidden x hidden`).
   - KV cache (AV only; extraction and the AR run one forward pass with `use_cache=False`): the fast
     decode's static cache is one buffer per layer of `rows x (prompt + max_new_tokens)` keys and
     values, sliding-window layers included (they keep a full-length buffer), so
     `rows x (prompt + max_new) x layers x 2 x kv_heads x head_dim x dtype bytes`, with
     rows = batch_size x n_samples (the AV repeats each row once per sample before generating).
   - activations, extraction: `output_hidden_states` keeps every block's output for the whole
     forward pass ((blocks + 1) x tokens x hidden), plus one block's working set (q/k/v, the MLP's
     three intermediate tensors, residual and norm outputs), the 4D padding masks (one per
     attention kind) and the fp32 copies of the layers asked for. A forward pass holds at most
     `Extractor.batch_tokens` (16,384) padded tokens, or one document of `max_length`.
   - activations, AV: the prompt embeddings and one full-batch prefill over the whole prompt (the
     loop and hf backends; the fast/fused decode shares the prompt's prefix and needs less), and per
     decode step the logits buffer, its fp32 copy and the sampling noise / ban mask.
   - activations, AR: one block's working set over `batch_size x (template + explanation)` tokens,
     the explanation counted at the AV's full token budget (an upper bound).
   - runtime: RUNTIME_GB per actor (CUDA context, cuBLAS workspaces, allocator slack, CUDA graphs).
   - attention is memory-efficient (SDPA / flash): no `heads x T x T` score tensor.

2. **Placement.** Ray's `num_gpus` is a scheduling token, not a memory limit. A fractional request
   (0 < g < 1) lands on ONE GPU whose free share is at least g (Ray picks the best fit on the
   node: `NodeResourceInstanceSet::TryAllocate` in src/ray/common/scheduling/resource_instance_set.cc);
   a request >= 1 must be a whole number and takes that many untouched GPUs of one node; 1.5 is
   refused and never placed. So the real constraints are per GPU: shares add up to at most 1.0,
   and the memory of the actors that share a card must fit on it. `place` walks every order in
   which the actors may arrive (Ray Data starts all pools at once; their order is not fixed) and
   every node that has room, and says whether all actors are placed at once always, only in some
   orders, or never. `worst_shared_gpu` is the memory side: any set of fractional actors whose
   shares sum to <= 1.0 may end up on one card (arrival order, an actor restarted elsewhere), so the
   heaviest such set must fit the card.

A whole-GPU actor (num_gpus >= 1) still loads its model onto one device (the stages use the first
visible GPU), so its need is compared with one card, not with num_gpus cards.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

GB = 1e9           # decimal GB: a card sold as "141 GB" holds at least 141e9 usable-ish bytes
RUNTIME_GB = 2.0   # per GPU actor: CUDA context (~0.5-1 GB), cuBLAS workspaces, allocator slack, graphs
EXTRACT_BATCH_TOKENS = 16384  # nla_ray.nla.extract.Extractor(batch_tokens=...) default; tests check it
UNIT = 10000       # Ray's resource fixed point is 1e-4: shares are compared in these units
TIGHT = 0.9        # a GPU filled beyond this share of its card is reported as tight


# ---------------------------------------------------------------------------------------------
# architectures


@dataclass(frozen=True)
class ModelShape:
    """What the memory of a decoder depends on. `av_prompt_tokens` / `ar_overhead_tokens`: the AV
    prompt's length and the AR template's length with an empty explanation, in this model's tokens."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    qkv_bias: bool = False
    extra_params: int = 0          # parameters beside the text decoder (a multimodal wrapper's vision tower)
    extra_in: tuple = ()           # which pools load them ("extract", "av", "ar")
    av_prompt_tokens: int = 150
    ar_overhead_tokens: int = 20
    source: str = ""

    def block_params(self) -> int:
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        attn = self.hidden * (q + 2 * kv) + q * self.hidden + ((q + 2 * kv) if self.qkv_bias else 0)
        mlp = 3 * self.hidden * self.intermediate
        norms = 4 * self.hidden + 2 * self.head_dim  # Gemma-3's four block norms and q/k norms: an upper bound
        return attn + mlp + norms

    def embed_params(self) -> int:
        return self.vocab * self.hidden

    def total_params(self) -> int:
        return self.embed_params() + self.layers * self.block_params() + self.hidden + \
            (0 if self.tied else self.embed_params()) + self.extra_params

    def kv_bytes_per_token(self, elt: int) -> int:
        return self.layers * 2 * self.kv_heads * self.head_dim * elt

    def block_work_elems(self) -> int:
        """Elements per token that one block holds at once: q, k, v, the attention output, residual
        and norm outputs (4 x hidden) and the MLP's gate, up and product (3 x intermediate)."""
        return (self.heads + 2 * self.kv_heads) * self.head_dim + 4 * self.hidden + 3 * self.intermediate


# The two released architectures, copied from their config.json (the same numbers as
# nla_ray.perf.bench.MODELS, which tests compare against). Prompt lengths: nla_ray.perf.bench
# PROMPT_TOKENS (counted on the packaged tokenizers with the default templates; Qwen2.5 uses the
# ChatML count). Gemma-3-27B's base and AV checkpoints are the multimodal wrapper: its SigLIP
# so400m vision tower (27 layers, width 1152, MLP 4304: ~0.41B) and projector (1152 x 5376) load
# with them; the released AR is the text model alone.
KNOWN_SHAPES: dict[str, ModelShape] = {
    "google/gemma-3-27b-it": ModelShape(
        "Gemma-3-27B", hidden=5376, layers=62, heads=32, kv_heads=16, head_dim=128, intermediate=21504,
        vocab=262208, tied=True, extra_params=420_000_000, extra_in=("extract", "av"),
        av_prompt_tokens=108, ar_overhead_tokens=15, source="google/gemma-3-27b-it config.json (text_config)"),
    "Qwen/Qwen2.5-7B-Instruct": ModelShape(
        "Qwen2.5-7B", hidden=3584, layers=28, heads=28, kv_heads=4, head_dim=128, intermediate=18944,
        vocab=152064, tied=False, qkv_bias=True, av_prompt_tokens=134, ar_overhead_tokens=14,
        source="Qwen/Qwen2.5-7B-Instruct config.json"),
}


def shape_from_config(cfg, *, name: str = "", vision=None, av_prompt_tokens: int = 150,
                      ar_overhead_tokens: int = 20, source: str = "") -> ModelShape:
    """A ModelShape from a (text) config object with Hugging Face's field names; `vision`: the
    wrapper's vision config when the checkpoint holds one (its tower is counted for every pool)."""
    hidden, heads = int(cfg.hidden_size), int(cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or hidden // heads)
    extra = 0
    if vision is not None:
        vh, vi, vl = int(vision.hidden_size), int(vision.intermediate_size), int(vision.num_hidden_layers)
        extra = vl * (4 * vh * vh + 2 * vh * vi) + vh * hidden  # blocks + the projector; embeddings are small
    tied = bool(getattr(cfg, "tie_word_embeddings", True))
    return ModelShape(name or getattr(cfg, "model_type", "model"), hidden=hidden, layers=int(cfg.num_hidden_layers),
                      heads=heads, kv_heads=int(getattr(cfg, "num_key_value_heads", None) or heads),
                      head_dim=head_dim, intermediate=int(cfg.intermediate_size), vocab=int(cfg.vocab_size),
                      tied=tied, qkv_bias=bool(getattr(cfg, "attention_bias", False) or cfg.model_type == "qwen2"),
                      extra_params=extra, extra_in=("extract", "av", "ar") if extra else (),
                      av_prompt_tokens=av_prompt_tokens, ar_overhead_tokens=ar_overhead_tokens, source=source)


def dtype_bytes(dtype: str) -> int:
    """Bytes per element; "auto" is bf16 on a GPU (nla_ray.nla.models.resolve_dtype)."""
    d = str(dtype or "auto").lower()
    if d in ("auto", "bfloat16", "bf16", "float16", "fp16", "half"):
        return 2
    if d in ("float32", "fp32", "float"):
        return 4
    raise ValueError(f"dtype {dtype!r}: expected auto, bfloat16, float16 or float32")


# ---------------------------------------------------------------------------------------------
# memory per pool


@dataclass
class PoolNeed:
    """One actor of a pool: GB it needs on its GPU, by part, and what Ray's share of the card is."""

    pool: str
    role: str                     # extract | av | ar
    model: str
    num_gpus: float
    concurrency: int
    batch_size: int
    dtype: str
    weights_gb: float
    kv_gb: float
    act_gb: float
    runtime_gb: float
    notes: dict = field(default_factory=dict)   # part -> how it was counted
    num_cpus: float = 0.0

    @property
    def total_gb(self) -> float:
        return self.weights_gb + self.kv_gb + self.act_gb + self.runtime_gb

    def share_gb(self, card_gb: float) -> float:
        """The memory Ray's token nominally stands for: num_gpus of a card (one card for >= 1)."""
        return min(1.0, float(self.num_gpus)) * card_gb

    def as_dict(self) -> dict:
        return {**asdict(self), "total_gb": round(self.total_gb, 2)}


def _gb(x: float) -> float:
    return x / GB


def extract_need(shape: ModelShape, *, n_blocks: int, batch_size: int, max_length: int, dtype: str = "auto",
                 layers_out: int = 1, batch_tokens: int = EXTRACT_BATCH_TOKENS, pool: str = "extract",
                 num_gpus: float = 0.0, concurrency: int = 1) -> PoolNeed:
    """Extraction: embedding + blocks 0..n_blocks-1 (+ an untied head at load, + the wrapper's
    tower), one forward pass over at most `batch_tokens` padded tokens (or one `max_length` doc)."""
    elt = dtype_bytes(dtype)
    params = shape.embed_params() + n_blocks * shape.block_params() + (0 if shape.tied else shape.embed_params())
    params += shape.extra_params if "extract" in shape.extra_in else 0
    tokens = min(max(1, batch_size) * max_length, max(batch_tokens, max_length))
    kept = (n_blocks + 1) * tokens * shape.hidden * elt
    work = tokens * shape.block_work_elems() * elt
    masks = 2 * tokens * max_length  # bool [docs, 1, T, T] per attention kind; docs x T = tokens
    out32 = layers_out * tokens * shape.hidden * 4
    return PoolNeed(pool, "extract", shape.name, num_gpus, concurrency, batch_size, dtype,
                    weights_gb=_gb(params * elt), kv_gb=0.0, act_gb=_gb(kept + work + masks + out32),
                    runtime_gb=RUNTIME_GB,
                    notes={"weights": f"embedding + blocks 0..{n_blocks - 1} of {shape.layers}"
                                      + ("" if shape.tied else " + LM head (built at load, then dropped)")
                                      + (" + vision tower" if "extract" in shape.extra_in and shape.extra_params else "")
                                      + f": {params / 1e9:.2f}B params x {elt} B",
                           "activations": f"{n_blocks + 1} hidden states x {tokens} tokens x {shape.hidden} "
                                          f"(output_hidden_states) + one block's working set",
                           "kv_cache": "none (one forward pass, use_cache=False)"})


def av_need(shape: ModelShape, *, batch_size: int, max_new_tokens: int, n_samples: int = 1, dtype: str = "auto",
            prompt_tokens: int | None = None, sampling: bool = False, pool: str = "av", num_gpus: float = 0.0,
            concurrency: int = 1) -> PoolNeed:
    """The AV: the whole model, a static KV cache of rows x (prompt + max_new), prefill and logits."""
    elt = dtype_bytes(dtype)
    prompt = int(prompt_tokens or shape.av_prompt_tokens)
    rows = max(1, batch_size) * max(1, n_samples)
    params = shape.embed_params() + shape.layers * shape.block_params() + shape.hidden
    params += 0 if shape.tied else shape.embed_params()
    params += shape.extra_params if "av" in shape.extra_in else 0
    length = prompt + max_new_tokens
    kv = rows * length * shape.kv_bytes_per_token(elt)
    embeds = rows * prompt * shape.hidden * elt
    prefill = rows * prompt * shape.block_work_elems() * elt
    logits = rows * shape.vocab * (elt + 4 + (8 if sampling else 4))  # buffer, fp32 copy, noise and/or mask
    return PoolNeed(pool, "av", shape.name, num_gpus, concurrency, batch_size, dtype,
                    weights_gb=_gb(params * elt), kv_gb=_gb(kv), act_gb=_gb(embeds + prefill + logits),
                    runtime_gb=RUNTIME_GB,
                    notes={"weights": f"whole model ({shape.layers} blocks"
                                      + (", untied LM head" if not shape.tied else "")
                                      + (", vision tower" if "av" in shape.extra_in and shape.extra_params else "")
                                      + f"): {params / 1e9:.2f}B params x {elt} B",
                           "kv_cache": f"{rows} rows x ({prompt} prompt + {max_new_tokens} new) tokens x "
                                       f"{shape.kv_bytes_per_token(elt) / 1e6:.3f} MB/token",
                           "activations": f"prompt embeddings + a full-batch prefill of {prompt} tokens + "
                                          f"logits over {shape.vocab} ids"})


def ar_need(shape: ModelShape, *, n_blocks: int, batch_size: int, text_tokens: int, dtype: str = "auto",
            pool: str = "ar", num_gpus: float = 0.0, concurrency: int = 1) -> PoolNeed:
    """The AR: embedding + blocks 0..K (+ an untied head at load) + the fp32 value head, one forward
    pass over batch_size x text_tokens."""
    elt = dtype_bytes(dtype)
    params = shape.embed_params() + n_blocks * shape.block_params() + (0 if shape.tied else shape.embed_params())
    params += shape.extra_params if "ar" in shape.extra_in else 0
    head = shape.hidden * shape.hidden * 4
    tokens = max(1, batch_size) * text_tokens
    work = tokens * shape.block_work_elems() * elt
    masks = 2 * max(1, batch_size) * text_tokens * text_tokens
    return PoolNeed(pool, "ar", shape.name, num_gpus, concurrency, batch_size, dtype,
                    weights_gb=_gb(params * elt + head), kv_gb=0.0, act_gb=_gb(work + masks),
                    runtime_gb=RUNTIME_GB,
                    notes={"weights": f"embedding + blocks 0..{n_blocks - 1} of {shape.layers}"
                                      + ("" if shape.tied else " + LM head (built at load, then dropped)")
                                      + f" + fp32 value head: {params / 1e9:.2f}B params x {elt} B",
                           "activations": f"one block's working set over {batch_size} x {text_tokens} tokens "
                                          f"(template + the AV's full token budget)",
                           "kv_cache": "none (one forward pass, use_cache=False)"})


def config_needs(cfg, shape: ModelShape, *, pools: dict | None = None, which: Sequence[str] = ("extract", "av", "ar"),
                 suffix: str = "") -> list[PoolNeed]:
    """PoolNeeds of a job config (nla_ray.config.NLAConfig) on `shape`: the extraction over blocks
    0..max(layers), the AV with the config's decode settings, the AR over blocks 0..layer. `pools`:
    other pool settings (e.g. cfg.cross_pools merged over cfg.pools); `suffix` names the pools
    (cross_family's av_a, ar_b, ...)."""
    pools = pools or cfg.pools
    out = []
    for role in which:
        p = pools[role]
        kw = dict(pool=f"{role}{suffix}", num_gpus=float(p.num_gpus), concurrency=int(p.concurrency))
        cpus = float(p.num_cpus)
        if role == "extract":
            out.append(extract_need(shape, n_blocks=max(cfg.extract_layers) + 1, batch_size=p.batch_size,
                                    max_length=cfg.max_length, dtype=p.dtype, layers_out=len(cfg.extract_layers), **kw))
        elif role == "av":
            out.append(av_need(shape, batch_size=p.batch_size, max_new_tokens=cfg.av.max_new_tokens,
                               n_samples=cfg.av.n_samples, dtype=p.dtype,
                               sampling=cfg.av.temperature > 0 or bool(cfg.av.banned_chars), **kw))
        else:
            out.append(ar_need(shape, n_blocks=cfg.layer + 1, batch_size=p.batch_size,
                               text_tokens=shape.ar_overhead_tokens + cfg.av.max_new_tokens, dtype=p.dtype, **kw))
        out[-1].num_cpus = cpus
    return out


# ---------------------------------------------------------------------------------------------
# placement


@dataclass(frozen=True)
class Actor:
    pool: str
    gpus: float
    cpus: float = 0.0
    mem_gb: float | None = None


@dataclass(frozen=True)
class Node:
    gpus: int
    cpus: float | None = None     # None: not limited here
    name: str = ""


def actors_of(needs_or_pools: Iterable) -> list[Actor]:
    """One Actor per actor of each pool: from PoolNeeds, or from (name, num_gpus, num_cpus,
    concurrency[, mem_gb]) tuples."""
    out = []
    for p in needs_or_pools:
        if isinstance(p, PoolNeed):
            out += [Actor(p.pool, float(p.num_gpus), float(p.num_cpus), p.total_gb)] * max(1, p.concurrency)
        else:
            name, g, c, n, *mem = p
            out += [Actor(name, float(g or 0), float(c or 0), mem[0] if mem else None)] * max(1, int(n))
    return out


def _units(g: float) -> int:
    return int(round(g * UNIT))


def _gpu_request_problem(g: float) -> str:
    if g < 0:
        return f"a negative GPU request ({g:g})"
    if g >= 1 and abs(g - round(g)) > 1e-9:
        return (f"{g:g} GPUs: Ray refuses fractional requests above 1 (it never places such an actor); "
                f"use a whole number or a fraction below 1")
    return ""


@dataclass
class PlaceResult:
    verdict: str                 # always | sometimes | never | cannot
    pools: dict                  # pool -> {"actors", "num_gpus", "num_cpus"}
    asked: dict                  # {"GPU": sum, "CPU": sum}
    nodes: list                  # [{"gpus", "cpus"}]
    cannot: list                 # why single actors can never be placed
    complete: list               # distinct packings with every actor placed: [[[pools per GPU] per node]]
    stuck: list                  # an example state where some actor waits forever: (packing, waiting pools)
    states: int
    truncated: bool

    def as_dict(self) -> dict:
        return asdict(self)


def place(actors: Sequence[Actor], nodes: Sequence[Node], *, max_states: int = 200_000) -> PlaceResult:
    """Every way Ray may place `actors` on `nodes`, arriving in any order, onto any node with room,
    the best-fit GPU within a node (ties: any of them). "always": every order ends with all actors
    placed at once; "sometimes": some orders leave an actor waiting for another to leave;
    "never": no order places them all; "cannot": an actor fits on no node even alone. The search
    visits each distinct state once (GPUs of a node are interchangeable, so they are kept sorted);
    `truncated` says it stopped at `max_states` and the verdict covers only what it saw."""
    pools: dict = {}
    for a in actors:
        d = pools.setdefault(a.pool, {"actors": 0, "num_gpus": a.gpus, "num_cpus": a.cpus})
        d["actors"] += 1
    asked = {"GPU": round(sum(a.gpus for a in actors), 6), "CPU": round(sum(a.cpus for a in actors), 6)}
    node_info = [{"gpus": n.gpus, "cpus": n.cpus} for n in nodes]
    cannot = []
    kinds = {a.pool: a for a in actors}
    for name, a in kinds.items():
        why = _gpu_request_problem(a.gpus)
        if why:
            cannot.append(f"{name} asks for {why}")
            continue
        fits = [n for n in nodes if (n.cpus is None or a.cpus <= n.cpus + 1e-9) and
                (a.gpus == 0 or (a.gpus < 1 and n.gpus >= 1) or (a.gpus >= 1 and n.gpus >= round(a.gpus)))]
        if not fits:
            most_g, most_c = max((n.gpus for n in nodes), default=0), max((n.cpus or 0 for n in nodes), default=0)
            if a.gpus > 0 and not any(n.gpus >= max(1, math.ceil(a.gpus)) for n in nodes):
                cannot.append(f"one {name} actor asks for {a.gpus:g} GPU, the largest node has {most_g}")
            else:
                cannot.append(f"one {name} actor asks for {a.cpus:g} CPU, the largest node has {most_c:g}")
    if cannot:
        return PlaceResult("cannot", pools, asked, node_info, cannot, [], [], 0, False)

    names = sorted(kinds)
    # A GPU: (free units, pools on it); a node: (sorted GPUs, free CPUs (None: unlimited), CPU-only pools).
    start = tuple((tuple((UNIT, ()) for _ in range(n.gpus)), n.cpus, ()) for n in nodes)
    todo0 = tuple(pools[p]["actors"] for p in names)
    seen, stack = set(), [(start, todo0)]
    complete, stuck, truncated = {}, [], False
    while stack:
        state, todo = stack.pop()
        if (state, todo) in seen:
            continue
        seen.add((state, todo))
        if len(seen) > max_states:
            truncated = True
            break
        if not any(todo):
            complete.setdefault(_packing(state), None)
            continue
        waiting = []
        for i, p in enumerate(names):
            if not todo[i]:
                continue
            nxt = [s for j in range(len(nodes)) for s in _put(state, j, kinds[p])]
            if not nxt:
                waiting.append(p)
                continue
            rest = todo[:i] + (todo[i] - 1,) + todo[i + 1:]
            stack.extend((s, rest) for s in nxt)
        if waiting and len(stuck) < 3:
            # Some pool can no longer be placed here; it waits until another actor leaves (at the end of
            # that pool's work). The other pools may still be placed, but never all of them together.
            stuck.append({"packing": _packing(state), "waiting": waiting})
    placed_all = bool(complete)
    dead = bool(stuck)
    verdict = "always" if placed_all and not dead else ("sometimes" if placed_all else "never")
    return PlaceResult(verdict, pools, asked, node_info, [], [list(map(list, p)) for p in complete], stuck,
                       len(seen), truncated)


def _packing(state) -> tuple:
    """A readable, order-free view of a state: per node, the pools on each GPU (+ CPU-only pools)."""
    out = []
    for gpus, _, cpu_only in state:
        view = [list(g[1]) for g in gpus]
        if cpu_only:
            view.append(["cpu:" + p for p in cpu_only])
        out.append(tuple(tuple(v) for v in view))
    return tuple(out)


def _put(state, j: int, a: Actor) -> list:
    """States after placing actor `a` on node j (empty when it does not fit there)."""
    gpus, cpus, cpu_only = state[j]
    if cpus is not None and a.cpus > cpus + 1e-9:
        return []
    left = None if cpus is None else round(cpus - a.cpus, 6)
    u = _units(a.gpus)
    out = []
    if u == 0:
        node = (gpus, left, tuple(sorted(cpu_only + (a.pool,))))
        out.append(node)
    elif u < UNIT:
        room = [g for g in gpus if g[0] >= u]
        if room:
            best = min(g[0] for g in room)   # Ray's best fit: the GPU with the least share left over
            # GPUs tied on that share may hold different pools: Ray takes the lowest index, which
            # says nothing about which pools are there, so each of them is a possible outcome.
            for chosen in sorted({g for g in room if g[0] == best}, key=_gpu_key):
                g = list(gpus)
                g[gpus.index(chosen)] = (chosen[0] - u, tuple(sorted(chosen[1] + (a.pool,))))
                out.append((tuple(sorted(g, key=_gpu_key)), left, cpu_only))
    else:
        whole = u // UNIT
        empty = [k for k, g in enumerate(gpus) if g[0] == UNIT]
        if len(empty) >= whole:
            g = list(gpus)
            for n, k in enumerate(empty[:whole]):
                # the model sits on the first of its GPUs; the others are held but empty
                g[k] = (0, (a.pool,) if n == 0 else (f"({a.pool})",))
            out.append((tuple(sorted(g, key=_gpu_key)), left, cpu_only))
    return [state[:j] + (node,) + state[j + 1:] for node in out]


def _gpu_key(g) -> tuple:
    return (-g[0], g[1])


def worst_shared_gpu(actors: Sequence[Actor], capacity: float = 1.0) -> dict:
    """The heaviest set of actors that may share one GPU: fractional actors whose shares sum to <= 1.0
    (any such set can meet on one card: arrival order, a restarted actor), or a whole-GPU actor alone.
    Returns {"pools": [...], "share": sum of num_gpus, "mem_gb": sum of their memory}. `capacity`:
    the share left on the card (for the neighbours of an actor already there)."""
    cap = _units(capacity)
    counts: dict = {}
    for a in actors:
        counts.setdefault((a.pool, a.gpus, a.mem_gb), 0)
        counts[(a.pool, a.gpus, a.mem_gb)] += 1
    best = {"pools": [], "share": 0.0, "mem_gb": 0.0}
    frac = [(k, n) for k, n in counts.items() if 0 < k[1] < 1]
    for (pool, g, mem), _ in counts.items():
        if g >= 1 and cap >= UNIT and (mem or 0) > best["mem_gb"]:
            best = {"pools": [pool], "share": float(g), "mem_gb": float(mem or 0)}
    for combo in itertools.product(*[range(n + 1) for _, n in frac]):
        share = sum(_units(k[1]) * c for (k, _), c in zip(frac, combo))
        if share > cap or not any(combo):
            continue
        mem = sum((k[2] or 0) * c for (k, _), c in zip(frac, combo))
        if mem > best["mem_gb"] + 1e-9:
            best = {"pools": [k[0] for (k, _), c in zip(frac, combo) for _ in range(c)],
                    "share": share / UNIT, "mem_gb": mem}
    best["share"] = round(best["share"], 4)
    best["mem_gb"] = round(best["mem_gb"], 2)
    return best


def neighbours(actors: Sequence[Actor], pool: str) -> dict:
    """The heaviest set of other actors Ray may put on the same GPU as one actor of `pool` (empty for
    a whole-GPU actor: nothing shares its cards)."""
    mine = next(a for a in actors if a.pool == pool)
    if mine.gpus >= 1 or mine.gpus <= 0:
        return {"pools": [], "share": 0.0, "mem_gb": 0.0}
    rest = list(actors)
    rest.remove(mine)
    return worst_shared_gpu(rest, capacity=1.0 - mine.gpus)


def describe_packing(packing: Sequence, mem: dict | None = None) -> str:
    """'GPU0: av+ar (122.2 GB), GPU1: extract (51.5 GB)'; nodes after the first are named node1, ..."""
    parts = []
    for j, node in enumerate(packing):
        gi = 0
        for gpu in node:
            if gpu and gpu[0].startswith("cpu:"):
                parts.append(f"{'node%d ' % j if len(packing) > 1 else ''}CPU: " + "+".join(p[4:] for p in gpu))
                continue
            names = [p for p in gpu if not p.startswith("(")] or [p for p in gpu]
            label = "+".join(names) if gpu else "empty"
            gb = sum((mem or {}).get(p, 0.0) or 0.0 for p in gpu if not p.startswith("("))
            parts.append(f"{'node%d ' % j if len(packing) > 1 else ''}GPU{gi}: {label}"
                         + (f" ({gb:.1f} GB)" if mem and gpu else ""))
            gi += 1
    return ", ".join(parts)


def gpu_loads(packing: Sequence, mem: dict) -> list[list[float]]:
    """Per node, per GPU: GB of the actors a packing puts there (`mem`: pool -> GB per actor)."""
    return [[round(sum(mem.get(p, 0.0) or 0.0 for p in gpu if not p.startswith(("(", "cpu:"))), 2) for gpu in node
             if not (gpu and gpu[0].startswith("cpu:"))] for node in packing]


# ---------------------------------------------------------------------------------------------
# the statement: memory per pool and packings on a machine


def statement(needs: Sequence[PoolNeed], *, gpus: int, card_gb: float, nodes: int = 1,
              cpus: float | None = None) -> dict:
    """Everything the placement statement says about one layout on a machine of `nodes` x `gpus`
    cards of `card_gb`: per pool need vs share, whether all actors are placed at once, every
    complete packing with the GB per GPU, and the heaviest set that may share a card."""
    actors = actors_of(needs)
    res = place(actors, [Node(gpus, cpus) for _ in range(nodes)])
    worst = worst_shared_gpu(actors)
    mem = {n.pool: n.total_gb for n in needs}
    packings = [{"packing": p, "gb_per_gpu": gpu_loads(p, mem)} for p in res.complete]
    fits = worst["mem_gb"] <= card_gb + 1e-9 and all(n.total_gb <= card_gb for n in needs if n.num_gpus > 0)
    rows = []
    for n in needs:
        nb = neighbours(actors, n.pool) if n.num_gpus > 0 else {"pools": [], "share": 0.0, "mem_gb": 0.0}
        rows.append({**n.as_dict(), "share_gb": round(n.share_gb(card_gb), 2),
                     "need_over_share": round(n.total_gb / max(n.share_gb(card_gb), 1e-9), 3),
                     "neighbours": nb, "left_for_it_gb": round(card_gb - nb["mem_gb"], 2),
                     "fits": n.num_gpus <= 0 or n.total_gb + nb["mem_gb"] <= card_gb + 1e-9})
    return {"machine": {"nodes": nodes, "gpus_per_node": gpus, "gpu_memory_gb": card_gb, "cpus_per_node": cpus},
            "pools": rows,
            "all_at_once": res.verdict, "asked": res.asked, "cannot": res.cannot,
            "packings": packings, "stuck": res.stuck, "worst_shared_gpu": worst,
            "fits": fits, "tight": worst["mem_gb"] > TIGHT * card_gb, "states_explored": res.states}


# ---------------------------------------------------------------------------------------------
# a preset's statement (nla-ray placement)


def shape_for(cfg) -> ModelShape:
    """The architecture of a config's base model: the released ones from KNOWN_SHAPES (no files
    needed), anything else from its config.json, which must then be on this machine."""
    if cfg.base in KNOWN_SHAPES:
        return KNOWN_SHAPES[cfg.base]
    from transformers import AutoConfig

    from nla_ray.nla import sources

    path = sources.resolve(cfg.base).path
    full = AutoConfig.from_pretrained(path)
    text = full.get_text_config() if hasattr(full, "get_text_config") else full
    return shape_from_config(text, name=cfg.base, vision=getattr(full, "vision_config", None),
                             source=f"{path}/config.json")


def no_machine_error(cfg) -> ValueError:
    return ValueError(f"preset {cfg.name!r} names no machine: add `machine: {{gpus: 2, gpu_memory_gb: 141, "
                      f"name: 2xH200}}` to it, or pass --set machine.gpus=2 --set machine.gpu_memory_gb=141")


def preset_statement(cfg, partner=None) -> dict:
    """The placement statement of one preset on its named machine: the pipeline's three pools, and
    with a partner preset the cross-family layout (each family's extraction alone into the store,
    then both families' AV and AR pools side by side, from `cross_pools`)."""
    m = cfg.machine
    if m is None:
        raise no_machine_error(cfg)
    shape = shape_for(cfg)
    machine = dict(gpus=m.gpus, card_gb=m.gpu_memory_gb, nodes=m.nodes, cpus=m.cpus)
    out = {"preset": cfg.name, "base": cfg.base, "layer": cfg.layer,
           "machine": {"name": m.name, "nodes": m.nodes, "gpus": m.gpus, "gpu_memory_gb": m.gpu_memory_gb,
                       "cpus": m.cpus},
           "model": {"name": shape.name, "params_b": round(shape.total_params() / 1e9, 3),
                     "block_params_m": round(shape.block_params() / 1e6, 2), "source": shape.source,
                     "av_prompt_tokens": shape.av_prompt_tokens, "ar_overhead_tokens": shape.ar_overhead_tokens},
           "run": {"max_length": cfg.max_length, "max_new_tokens": cfg.av.max_new_tokens,
                   "n_samples": cfg.av.n_samples, "layers": cfg.extract_layers},
           "pipeline": statement(config_needs(cfg, shape), **machine)}
    if partner is not None and cfg.cross_pools:
        other = shape_for(partner)
        fams = ((cfg, shape, "_a"), (partner, other, "_b"))
        extract = [config_needs(c, sh, which=("extract",), suffix=sfx)[0] for c, sh, sfx in fams]
        side = [n for c, sh, sfx in fams for n in config_needs(c, sh, pools={**c.pools, **c.cross_pools},
                                                                  which=("av", "ar"), suffix=sfx)]
        out["cross_family"] = {"partner": partner.name,
                               "extraction": [statement([e], **machine) for e in extract],
                               "side_by_side": statement(side, **machine)}
    return out


def _f(x: float) -> str:
    return f"{x:.1f}"


def _pool_table(st: dict) -> list[str]:
    card = st["machine"]["gpu_memory_gb"]
    lines = ["| pool | actors × num_gpus | model part | weights | KV cache | activations | runtime | **need** "
             "| Ray share (num_gpus × card) | heaviest pools Ray may put beside it | left for it | fits |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in st["pools"]:
        if not p["num_gpus"]:
            lines.append(f"| {p['pool']} | {p['concurrency']} × 0 | {p['model']} | "
                         + " | ".join(["—"] * 5) + " | on CPUs | — | — | — |")
            continue
        nb = p["neighbours"]
        beside = " + ".join(nb["pools"]) + f" ({_f(nb['mem_gb'])})" if nb["pools"] else "none"
        lines.append(f"| {p['pool']} | {p['concurrency']} × {p['num_gpus']:g} | {p['model']}: {p['notes']['weights']} "
                     f"| {_f(p['weights_gb'])} | {_f(p['kv_gb'])} | {_f(p['act_gb'])} | {_f(p['runtime_gb'])} "
                     f"| **{_f(p['total_gb'])}** | {_f(p['share_gb'])} | {beside} | {_f(p['left_for_it_gb'])} of {card:g} "
                     f"| {'yes' if p['fits'] else '**NO**'} |")
    return lines


_VERDICT = {"always": "every arrival order Ray may see places all actors at once",
            "sometimes": "only some arrival orders place all actors at once; in others a pool waits",
            "never": "no packing places all actors at once: pools run in turns",
            "cannot": "an actor fits on no node at all"}


def _layout_md(st: dict, title: str) -> list[str]:
    m = st["machine"]
    card = m["gpu_memory_gb"]
    mem = {p["pool"]: p["total_gb"] for p in st["pools"]}
    lines = [f"**{title}**", ""] + _pool_table(st) + [""]
    lines.append(f"- Shares asked: {st['asked']['GPU']:g} GPUs of {m['nodes'] * m['gpus_per_node']} "
                 f"(need: {_f(sum(p['total_gb'] * p['concurrency'] for p in st['pools'] if p['num_gpus']))} GB of "
                 f"{m['nodes'] * m['gpus_per_node'] * card:g} GB). All at once: **{st['all_at_once']}** — "
                 f"{_VERDICT[st['all_at_once']]}.")
    for why in st["cannot"]:
        lines.append(f"- Cannot: {why}.")
    for pk in st["packings"]:
        lines.append(f"- Packing Ray may choose: {describe_packing(pk['packing'], mem)}")
    for s in st["stuck"][:2]:
        lines.append(f"- Stuck: after {describe_packing(s['packing'], mem)}, {' and '.join(s['waiting'])} "
                     "cannot be placed until another actor leaves")
    w = st["worst_shared_gpu"]
    if w["pools"]:
        lines.append(f"- Heaviest set that may share one card: {' + '.join(w['pools'])} (shares {w['share']:g}) = "
                     f"{_f(w['mem_gb'])} GB of {card:g} GB ({100 * w['mem_gb'] / card:.0f}%): "
                     + ("fits" if st["fits"] else "**does not fit**") + ("; tight" if st["tight"] else ""))
    lines.append("")
    return lines


ASSUMPTIONS = """\
How the numbers are made (`nla_ray/runtime/placement.py`; estimates from the architecture, roughly right,
not measured): weights = parameters × dtype bytes (extraction and the AR load the embedding and blocks
0..K, an untied LM head is built at load and counted; the AV loads the whole model; the released Gemma-3
base and AV load the multimodal wrapper's vision tower, ~0.42B); the AV's KV cache is the fast decode's
static cache, rows × (prompt + max_new_tokens) tokens for every layer (sliding-window layers keep a
full-length buffer); extraction keeps every block's hidden state for a pass of up to 16,384 padded tokens;
activations count one block's working set (memory-efficient attention, no T×T scores), the AV a
full-batch prefill over the whole prompt and the logits; the AR reads template + the AV's whole token
budget; 2 GB per actor for the CUDA context, workspaces and allocator slack. GB are decimal (10⁹ bytes):
a card sold as 141 GB gives PyTorch somewhat more. Ray's `num_gpus` is a scheduling token: a fractional
actor lands on one GPU with enough share left (best fit), so the check is per GPU — any set of actors
whose shares sum to ≤ 1 may meet on one card and must fit it. Each pool's share is at least its need
divided by the card, so a packing Ray accepts is a packing that fits."""


ON_RAY = """\
On Ray: `tests/test_placement.py::test_the_gemma_shares_place_every_pool_at_once_on_two_gpus` runs the three
pools with paper-gemma27b-L41's shares on a local head that declares 2 GPUs (tiny models on the CPU): an
actor of every pool is alive at one instant (each row carries `<stage>_tinit`, when its actor was placed),
while the former 1 + 1 + 0.5 places the AR only after the extraction actor has left its GPU."""


def render_markdown(statements: Sequence[dict], *, command: str, provenance: dict | None = None) -> str:
    lines = ["# Placement and GPU memory of the paper presets", "", f"`{command}`", ""]
    if provenance:
        lines += [f"Generated {provenance.get('date')} at commit `{provenance.get('git_commit')}` on "
                  f"{provenance.get('machine')} (no GPU needed: the numbers come from the architectures).", ""]
    lines += [ASSUMPTIONS, "", ON_RAY, ""]
    seen_cross = set()
    for st in statements:
        m, mo = st["machine"], st["model"]
        lines += [f"## {st['preset']} on {m['name'] or 'the named machine'} "
                  f"({m['nodes']} node × {m['gpus']} GPU × {m['gpu_memory_gb']:g} GB)", "",
                  f"{mo['name']} ({mo['params_b']:.2f}B parameters, {mo['block_params_m']:.1f}M per block; "
                  f"{mo['source']}), layer {st['layer']}; max_length {st['run']['max_length']}, AV prompt "
                  f"{mo['av_prompt_tokens']} + {st['run']['max_new_tokens']} new tokens, "
                  f"{st['run']['n_samples']} sample(s); AR template {mo['ar_overhead_tokens']} tokens. GB per actor.", ""]
        lines += _layout_md(st["pipeline"], "The pipeline's pools (extract → AV → AR, streaming side by side)")
        cf = st.get("cross_family")
        if cf:
            key = tuple(sorted((st["preset"], cf["partner"])))
            if key in seen_cross:
                lines += [f"Cross-family layout with {cf['partner']}: stated under that preset above.", ""]
                continue
            seen_cross.add(key)
            lines += [f"### Cross-family with {cf['partner']} (`jobs/cross_family.py`, `cross_pools`)", "",
                      "Each family's extraction runs alone first, into the activation store:", ""]
            for e in cf["extraction"]:
                p = e["pools"][0]
                lines.append(f"- {p['pool']}: {p['model']}, **{_f(p['total_gb'])} GB** (weights {_f(p['weights_gb'])}, "
                             f"activations {_f(p['act_gb'])}) on {p['num_gpus']:g} GPU: "
                             + ("fits" if e["fits"] else "**does not fit**"))
            lines += ["", "Then the four AV and AR pools side by side (suffix _a: this preset, _b: the partner):", ""]
            lines += _layout_md(cf["side_by_side"], "Cross-family AV and AR pools")
    return "\n".join(lines).rstrip() + "\n"
