"""Stand-in checkpoints: tiny random models saved in the layouts of the released NLA checkpoints.

The paper presets (`paper-gemma27b-L41`, `paper-qwen7b-L20`) name hub checkpoints of 7-27B
parameters that no CPU box here can load. A stand-in keeps everything about such a checkpoint that
code can trip over and shrinks only the sizes:

- **Gemma-3 family** (stands in for google/gemma-3-27b-it and kitft/nla-gemma3-27b-L41-av/-ar): the
  base and the AV are the multimodal ``Gemma3ForConditionalGeneration`` (a SigLIP vision tower, the
  projector, the text decoder under ``language_model``), weights in the hub's key layout
  (``language_model.model.*``, ``vision_tower.vision_model.*``, ``multi_modal_projector.*``), sharded
  with ``model.safetensors.index.json``, bf16, tied LM head; sliding + global layers; the real
  Gemma-3 tokenizer (``㈜`` = 246566) and turn template; ``generation_config.json`` with the
  instruction-tuned stop ids. The AR is the text decoder (``Gemma3ForCausalLM``) cut to K+1 blocks.
- **Qwen2 family** (stands in for Qwen/Qwen2.5-7B-Instruct and kitft/nla-qwen2.5-7b-L20-av/-ar):
  ``Qwen2ForCausalLM`` (q/k/v biases, untied LM head), sharded bf16 weights; the AR cut to K+1
  blocks. The tokenizer is SmolLM2's byte-level BPE (Qwen's own is not installed here) with Qwen2.5's
  special-token roles (no ``<bos>``, eos ``<|im_end|>``, pad ``<|endoftext|>``) and Qwen2.5's ChatML
  template with its default system turn. Qwen's injection character ``㈎`` is three tokens in this
  vocabulary, so the sidecar names the character `pairs.choose_injection_char` picks, with its live
  ids: the checks and the injection run exactly as they would on ``㈎`` = 149705.

Every role directory holds config.json (the real ``architectures``), the sharded safetensors and
their index, the tokenizer files, ``nla_meta.yaml`` with every field of the release's sidecar schema
(kind, schema_version 2, role, d_model, extraction.injection_scale / mse_scale — ``sqrt_d_model`` as
the release writes it —, the five token fields, both prompt templates, critic.extraction_layer_index)
and, for the AR, ``value_head.safetensors`` (key ``weight``, [d, d]). The AV and the AR are the base
plus a small perturbation (standing in for fine-tuning), the value head identity plus noise.

Where they sit: by default in a Hugging Face hub cache (models--owner--name/snapshots/<rev>/) under
the presets' own hub ids, at the release's depth (62 / 28 blocks, K = 41 / 20), so the presets run
with pair, base, layer and partner untouched and the hub ids resolve offline (`use_hub_cache`); or
(depth="tiny", hub_cache=False) as 6- / 5-block models in plain folders, which a run maps with
--set pair=AV,AR --set base=DIR --set layer=K and, for cross_family, a partner preset file.

The corpus stand-in is a parquet file in Ultra-FineWeb's layout (``content``, ``score``, ``source``;
split ``en``) whose rows 100000.. hold the documents, so the presets' own range (docs
100000-102000) and the release's doc ids (``openbmb/Ultra-FineWeb:en:<index>``) are used unchanged.

    from nla_ray import standins
    world = standins.build_world("/tmp/standins")       # ~10-30 s on 2 cores, ~260 MB
    standins.use_hub_cache(world["gemma"].hub_cache)
    argv = standins.job_argv(world, "gemma", "reproduce_fve", out=..., store=..., n=10)

scripts/paper_path.py runs the presets on them; tests/test_paper_path.py checks the runs.

The Qwen stand-in also comes at the real size: ``build_qwen(size=QWEN25_7B, device="cuda")`` is a
random-weight Qwen2.5-7B (its real widths, 28 blocks, untied 152,064-row head) in the same layout,
allocated and filled on the GPU; scripts/real_size_pipeline.py runs the pipeline on it (issue #14).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nla_ray.nla import templates as T

# What each stand-in stands in for (facts of the release; see design/NLA_FACTS.md).
RELEASED = {
    "gemma": {"preset": "paper-gemma27b-L41", "base": "google/gemma-3-27b-it",
              "av": "kitft/nla-gemma3-27b-L41-av", "ar": "kitft/nla-gemma3-27b-L41-ar",
              "layer": 41, "n_layers": 62, "d_model": 5376, "injection_char": "\u321c", "injection_token_id": 246566},
    "qwen": {"preset": "paper-qwen7b-L20", "base": "Qwen/Qwen2.5-7B-Instruct",
             "av": "kitft/nla-qwen2.5-7b-L20-av", "ar": "kitft/nla-qwen2.5-7b-L20-ar",
             "layer": 20, "n_layers": 28, "d_model": 3584, "injection_char": "\u320e", "injection_token_id": 149705},
}
# (blocks, layer K). "release": the released depth, so the presets' own `layer` applies (a block of
# width 64 costs next to nothing; the 262k-row Gemma embedding is what takes the memory). "tiny": a
# few blocks, K at about two thirds of the depth like L41/62 and L20/28; the run then sets `layer`.
DEPTHS = {"release": {"gemma": (62, 41), "qwen": (28, 20)}, "tiny": {"gemma": (6, 4), "qwen": (5, 3)}}
D_MODEL = 64
SHARDS = 2
# Qwen2.5-7B-Instruct's widths (its config.json), for a stand-in at the real size: `build_qwen(size=...)`
# with depth="release" gives the real 28 blocks, K = 20. The vocabulary is the real 152,064 rows even
# though the stand-in's tokenizer uses fewer ids: the embedding and LM head then cost what Qwen's do, and
# ids past the tokenizer (which a random LM head does sample) decode to nothing, as unused ids would.
QWEN25_7B = {"hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28, "num_key_value_heads": 4,
             "vocab_size": 152064}
TOKENIZERS = {"gemma": "pkg:gemma3-270m", "qwen": "pkg:smollm2-135m"}

# Qwen2.5-Instruct's turn format without its tool-calling branches: ChatML, and a default system turn
# when the conversation has none.
QWEN25_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# A few English documents (written for this file) long enough for the release's rule: positions >= 50.
DOCUMENTS = [
    "The town council of Alderbridge voted on Monday evening to restore the old railway footbridge, which "
    "has been closed to walkers since a storm damaged its wooden deck two winters ago. Engineers told the "
    "meeting that the iron frame is sound and that new oak planks, fresh paint and a ramp for wheelchairs "
    "could be fitted within six months. Residents who cross the river to reach the market and the primary "
    "school have asked for the repair for a long time, and several of them spoke in favour before the vote.",
    "To bake a simple loaf, mix five hundred grams of strong white flour with a teaspoon of salt and a packet "
    "of dried yeast, then add about three hundred millilitres of warm water and a spoonful of olive oil. "
    "Knead the dough on a floured surface for ten minutes until it feels smooth and springy, cover it, and "
    "leave it somewhere warm for an hour. Shape it, let it rise again in a greased tin, and bake it at two "
    "hundred degrees for thirty minutes, until the base sounds hollow when tapped.",
    "Astronomers using a telescope in the Chilean desert have found a small rocky planet orbiting a red dwarf "
    "star about forty light years from the Sun. The planet circles its star every nine days, so close that "
    "its surface is probably too hot for liquid water, yet its size and mass are close to those of the Earth. "
    "The team measured the slight wobble the planet causes in the star's light and plans to look for an "
    "atmosphere with the next generation of space telescopes, which could detect water vapour or carbon dioxide.",
    "In the second half the home side changed their shape, moving the captain into midfield and sending on a "
    "young winger who had scored twice for the reserves last week. The change worked almost at once: a long "
    "pass found the winger on the left, his cross was headed against the post, and the rebound was turned in "
    "from close range. The visitors pushed forward in the final twenty minutes but the goalkeeper made three "
    "fine saves, and the crowd stayed on their feet until the referee blew the final whistle.",
    "The library's new lending scheme lets members borrow tools as well as books. Drills, ladders, sewing "
    "machines and a pressure washer can be reserved online for up to a week, and volunteers check every item "
    "when it comes back. The idea came from a survey in which many households said they owned tools they used "
    "only once or twice a year. Since the scheme opened in March more than four hundred loans have been made, "
    "and the library hopes to add garden equipment and camping gear before the summer holidays begin.",
    "When the river flooded in the spring of that year, the farmers on the low fields moved their cattle to the "
    "hills and waited for the water to fall. It took nearly three weeks. Afterwards the soil was rich with silt, "
    "and the harvest that autumn was the best anyone could remember, although two barns had to be rebuilt and "
    "the road to the village was closed until the bridge had been inspected. Older people said the same thing "
    "had happened in their grandparents' time, and that the land always repaid the trouble of a flood.",
]
ULTRA_FINEWEB_START = 100_000  # the presets' held-out range starts here


@dataclass
class StandIn:
    """One family's stand-in: base, AV and AR directories, and what they stand in for."""

    family: str
    base: Path
    av: Path
    ar: Path
    layer: int
    n_layers: int
    d_model: int
    injection_scale: float
    released: dict = field(default_factory=dict)
    hub_cache: Path | None = None   # set: the directories are snapshots in this hub cache, under the hub ids

    @property
    def preset(self) -> str:
        return self.released["preset"]

    def family_overrides(self) -> dict:
        """The preset fields this stand-in needs changed: none when it sits in a hub cache at the
        release's depth; else the directories in place of the hub ids, and/or its own layer."""
        out = {}
        if self.hub_cache is None:
            out.update(pair=f"{self.av},{self.ar}", base=str(self.base))
        if self.layer != self.released["layer"]:
            out["layer"] = self.layer
        return out

    def overrides(self) -> list[str]:
        return [f"{k}={v}" for k, v in self.family_overrides().items()]


def hub_snapshot_dir(cache: str | Path, repo_id: str) -> Path:
    """The folder huggingface_hub's cache keeps `repo_id` in (models--owner--name/snapshots/<rev>/,
    with refs/main naming <rev>): a checkpoint written there loads by its hub id, offline."""
    rev = hashlib.sha1(f"nla_ray stand-in of {repo_id}".encode()).hexdigest()
    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(rev)
    snap = repo / "snapshots" / rev
    snap.mkdir(parents=True, exist_ok=True)
    return snap


def use_hub_cache(cache: str | Path) -> None:
    """Point this process, and the Ray workers it starts later, at `cache` for hub ids (offline)."""
    import huggingface_hub.constants as C

    os.environ["HF_HUB_CACHE"] = str(cache)
    os.environ["HF_HUB_OFFLINE"] = "1"
    C.HF_HUB_CACHE = str(cache)  # read at call time by huggingface_hub and transformers
    C.HF_HUB_OFFLINE = True


def _role_dirs(family: str, out: Path, hub_cache: bool) -> dict:
    rel = RELEASED[family]
    if hub_cache:
        return {role: hub_snapshot_dir(out, rel[role]) for role in ("base", "av", "ar")}
    return {role: out / rel[role].split("/")[1] for role in ("base", "av", "ar")}


# ---------------------------------------------------------------------------------------------
# tokenizers


def gemma_tokenizer():
    """The real Gemma-3 tokenizer (packaged Gemma-3-270M: the tokenizer all Gemma-3 sizes share)."""
    from transformers import AutoTokenizer

    from nla_ray.nla import sources

    return AutoTokenizer.from_pretrained(sources.resolve(TOKENIZERS["gemma"]).path)


def qwen_tokenizer(smollm=None):
    """SmolLM2's byte-level BPE (`smollm`, copied, or loaded from the package) with Qwen2.5-Instruct's
    special-token roles and turn format."""
    import copy

    from transformers import AutoTokenizer

    from nla_ray.nla import sources

    tok = copy.deepcopy(smollm) if smollm is not None else \
        AutoTokenizer.from_pretrained(sources.resolve(TOKENIZERS["qwen"]).path)
    tok.bos_token = None                 # Qwen2.5: no <bos>; raw text gets no special tokens
    tok.unk_token = None                 # byte-level BPE has no unknown token
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|endoftext|>"
    tok.chat_template = QWEN25_CHAT_TEMPLATE
    # The turn markers stay special tokens (never sampled as extraction positions), as in Qwen's.
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tok


# ---------------------------------------------------------------------------------------------
# writing weights in the released layout


def _hub_key_gemma(key: str) -> str:
    """transformers-5 state-dict key of Gemma3ForConditionalGeneration -> the hub checkpoint's key."""
    key = re.sub(r"^model\.language_model\.", "language_model.model.", key)
    key = re.sub(r"^model\.vision_tower\.", "vision_tower.vision_model.", key)
    return re.sub(r"^model\.multi_modal_projector\.", "multi_modal_projector.", key)


def save_sharded(state: dict, directory: Path, n_shards: int = SHARDS, dtype=torch.bfloat16) -> list[str]:
    """Write `state` as model-0000i-of-0000n.safetensors plus model.safetensors.index.json (the
    layout of every multi-shard hub checkpoint); tensors in `dtype`. Returns the shard names."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    names = list(state)
    sizes = [state[k].numel() for k in names]
    target = sum(sizes) / n_shards
    shards, cur, acc = [], [], 0
    for k, s in zip(names, sizes):  # contiguous runs of keys, cut near equal byte counts
        if cur and acc + s / 2 > target * (len(shards) + 1) and len(shards) < n_shards - 1:
            shards.append(cur)
            cur = []
        cur.append(k)
        acc += s
    shards.append(cur)
    files, weight_map, total = [], {}, 0
    for i, keys in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        # .cpu(): a no-op for CPU tensors; a GPU-built state is copied out one shard at a time (not
        # every safetensors version accepts CUDA tensors).
        part = {k: state[k].detach().to(dtype).contiguous().cpu() for k in keys}
        save_file(part, str(directory / fname), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in part.values())
        weight_map.update({k: fname for k in keys})
        files.append(fname)
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return files


def _write_config(config, directory: Path, architectures: list[str]) -> None:
    config.architectures = architectures
    config.dtype = torch.bfloat16  # what the released configs declare
    config.save_pretrained(directory)


def _perturbed(state: dict, scale: float, seed: int) -> dict:
    """`state` plus Gaussian noise of `scale` x each tensor's std (a stand-in for fine-tuning). The noise
    is drawn on each tensor's own device (a GPU-built 7B state never visits the CPU); CPU tensors draw
    from one CPU generator in key order, as they always did."""
    gens: dict = {}
    out = {}
    for k, v in state.items():
        if v.is_floating_point() and v.numel() > 1 and float(v.std()) > 0:
            if v.device not in gens:
                gens[v.device] = torch.Generator(device=v.device).manual_seed(seed)
            v = v + scale * float(v.std()) * torch.randn(v.shape, generator=gens[v.device], dtype=v.dtype,
                                                         device=v.device)
        out[k] = v
    return out


def _write_value_head(directory: Path, d: int, seed: int) -> None:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    w = torch.eye(d) + 0.05 * torch.randn(d, d, generator=g)
    save_file({"weight": w.contiguous()}, str(directory / "value_head.safetensors"), metadata={"format": "pt"})


def sidecar_dict(role: str, tokenizer, *, d_model: int, layer: int, injection_scale: float | None,
                 stands_in_for: dict) -> dict:
    """Every field of the release's model sidecar (schema_version 2), computed from the live tokenizer."""
    from nla_ray.nla import pairs

    char = pairs.choose_injection_char(tokenizer)
    tid = tokenizer.encode(char, add_special_tokens=False)[0]
    prompt = T.av_prompt_ids(tokenizer, T.DEFAULT_AV_TEMPLATE, char)
    slot = prompt.index(tid)
    return {
        "kind": "nla_model",
        "schema_version": 2,
        "role": role,
        "d_model": d_model,
        "extraction": {"injection_scale": injection_scale if role == "av" else None,
                       "mse_scale": "sqrt_d_model"},
        "tokens": {"injection_char": char, "injection_token_id": int(tid),
                   "injection_left_neighbor_id": int(prompt[slot - 1]),
                   "injection_right_neighbor_id": int(prompt[slot + 1]),
                   "critic_suffix_ids": T.ar_suffix_ids(tokenizer, T.DEFAULT_AR_TEMPLATE)},
        "prompt_templates": {"av": T.DEFAULT_AV_TEMPLATE, "ar": T.DEFAULT_AR_TEMPLATE},
        "extraction_layer_index": layer,
        "critic": {"extraction_layer_index": layer},
        "standin": {"stands_in_for": stands_in_for, "random_weights": True,
                    "note": "tiny random model in the released layout; its numbers mean nothing"},
    }


def _write_sidecar(directory: Path, data: dict) -> None:
    import yaml

    from nla_ray.nla.sidecar import SIDECAR_NAME

    (directory / SIDECAR_NAME).write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")


def _tokenizer_files(tokenizer, directories: list[Path]) -> None:
    """The tokenizer files in every role directory (written once, copied: Gemma's tokenizer.json is 33 MB)."""
    import shutil

    first, *rest = directories
    written = [Path(f) for f in tokenizer.save_pretrained(first) if Path(f).is_file()]
    for d in rest:
        d.mkdir(parents=True, exist_ok=True)
        for f in written:
            shutil.copyfile(f, d / f.name)


# ---------------------------------------------------------------------------------------------
# the two families


def _measure_scale(model, tokenizer, layer: int) -> float:
    from nla_ray.nla.pairs import measure_layer_norm

    return round(measure_layer_norm(model, tokenizer, layer), 2)


def build_gemma(out: str | Path, tokenizer=None, *, depth: str = "release", hub_cache: bool = True,
                d: int = D_MODEL, seed: int = 0) -> StandIn:
    """Gemma-3 stand-in: base and AV as Gemma3ForConditionalGeneration, AR as the cut text decoder."""
    from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, GenerationConfig,
                              SiglipVisionConfig)

    out = Path(out)
    tok = tokenizer or gemma_tokenizer()
    n_layers, layer = DEPTHS[depth]["gemma"]
    # Gemma-3's interleave (five local layers, then a global one; every third in a few-block model so
    # blocks 0..K hold both kinds), at a tiny window so documents and the AV prompt are longer than it,
    # as 27B's 1024-token window is on real documents.
    period = 6 if n_layers >= 12 else 3
    layer_types = ["full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(n_layers)]
    text = Gemma3TextConfig(
        vocab_size=262208, hidden_size=d, intermediate_size=2 * d, num_hidden_layers=n_layers,
        # 27B: 32 heads x 128 = 4096 != 5376 wide, query scaling by 5376 / 32 = 168, not by head_dim;
        # the same mismatch here: 4 heads x 32 = 128 != 64, scaling by 64 / 4 = 16.
        num_attention_heads=4, num_key_value_heads=2, head_dim=d // 2, query_pre_attn_scalar=d // 4,
        sliding_window=16, layer_types=layer_types, max_position_embeddings=8192,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}},
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    cfg = Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                       boi_token_index=255999, eoi_token_index=256000, image_token_index=262144)
    torch.manual_seed(seed)
    base = Gemma3ForConditionalGeneration(cfg).eval()
    scale = _measure_scale(base, tok, layer)
    end_of_turn = tok.convert_tokens_to_ids("<end_of_turn>")
    gen = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=[tok.eos_token_id, end_of_turn],
                           pad_token_id=tok.pad_token_id, cache_implementation="hybrid", do_sample=True, top_k=64,
                           top_p=0.95)
    state = {k: v for k, v in base.state_dict().items() if k != "lm_head.weight"}  # tied to the embedding
    # AR: the text decoder cut to blocks 0..K, as a causal LM (its LM head is tied and never used).
    ar_text = Gemma3TextConfig(**{**text.to_dict(), "num_hidden_layers": layer + 1,
                                  "layer_types": layer_types[: layer + 1]})
    ar_state = {"model." + k[len("model.language_model."):]: v for k, v in state.items()
                if k.startswith("model.language_model.")
                and not (k.startswith("model.language_model.layers.") and int(k.split(".")[3]) > layer)}
    return _save_pair("gemma", out, hub_cache, tok, state=state, hub_key=_hub_key_gemma, config=base.config,
                      arch="Gemma3ForConditionalGeneration", gen=gen, ar_state=ar_state, ar_config=ar_text,
                      ar_arch="Gemma3ForCausalLM", d=d, layer=layer, n_layers=n_layers, scale=scale, seed=seed)


def _random_model(cfg, *, device, dtype: torch.dtype, seed: int):
    """A causal LM of `cfg` allocated straight on `device` in `dtype`, transformers' initialisers
    skipped, then filled in place with N(0, 0.02) (RMSNorm weights 1 + N(0, 0.02), as a trained Qwen's
    sit near 1). On a GPU a 7B model is ready in seconds where the stock CPU initialisers take minutes
    and fp32 copies; every tensor is random, none zero, so nothing downstream is timed on zeros."""
    from transformers import AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers before 5.x kept it here
        from transformers.modeling_utils import no_init_weights

    device = torch.device(device)
    with torch.device(device), no_init_weights():
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.02, generator=gen)
            if name.endswith("norm.weight"):
                p.add_(1.0)
    return model.eval()


class _Steps:
    """Wall seconds per build step, into `timings` when the caller passed a dict (GPU work is
    synchronised first, so a step's time is its own)."""

    def __init__(self, timings: dict | None, device=None):
        self.timings, self.device = timings, device

    def __call__(self, name: str):
        import contextlib
        import time

        @contextlib.contextmanager
        def step():
            t0 = time.perf_counter()
            yield
            if self.timings is not None:
                if self.device is not None and torch.device(self.device).type == "cuda":
                    torch.cuda.synchronize(self.device)
                self.timings[name] = round(time.perf_counter() - t0, 2)

        return step()


def build_qwen(out: str | Path, tokenizer=None, *, depth: str = "release", hub_cache: bool = True,
               d: int = D_MODEL, seed: int = 10, size: dict | None = None, device=None,
               dtype: torch.dtype = torch.bfloat16, shards: int = SHARDS, timings: dict | None = None) -> StandIn:
    """Qwen2 stand-in: Qwen2ForCausalLM base and AV (untied head), AR cut to blocks 0..K.

    `size`: Qwen2Config fields replacing the tiny widths (QWEN25_7B for the real model; with
    depth="release" that is Qwen2.5-7B at its real config). `device`: build there, uninitialised, then
    N(0, 0.02) in place (`_random_model`, in `dtype`), and perturb the AV/AR on that device; None keeps
    the small CPU build (transformers' own init, seeded). `shards`: safetensors files per role (the
    released Qwen2.5-7B has 4). `timings`: filled with seconds per step."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    out = Path(out)
    tok = tokenizer or qwen_tokenizer()
    n_layers, layer = DEPTHS[depth]["qwen"]
    endoftext, im_end = tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|im_end|>")
    widths = {"vocab_size": len(tok), "hidden_size": d, "intermediate_size": 2 * d, "num_attention_heads": 4,
              "num_key_value_heads": 2, **(size or {})}
    d = widths["hidden_size"]
    cfg = Qwen2Config(**widths, num_hidden_layers=n_layers, max_position_embeddings=32768,
                      rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, rms_norm_eps=1e-6,
                      tie_word_embeddings=False, use_sliding_window=False, sliding_window=131072,
                      max_window_layers=n_layers, bos_token_id=endoftext, eos_token_id=im_end)
    steps = _Steps(timings, device)
    with steps("init"):
        if device is None:
            torch.manual_seed(seed)
            base = Qwen2ForCausalLM(cfg).eval()
        else:
            base = _random_model(cfg, device=device, dtype=dtype, seed=seed)
    with steps("measure_injection_scale"):
        scale = _measure_scale(base, tok, layer)
    gen = GenerationConfig(bos_token_id=endoftext, eos_token_id=[im_end, endoftext], pad_token_id=endoftext,
                           do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)
    state = dict(base.state_dict())
    ar_cfg = Qwen2Config(**{**cfg.to_dict(), "num_hidden_layers": layer + 1, "max_window_layers": layer + 1,
                                   "layer_types": list(cfg.layer_types)[: layer + 1]})
    ar_state = {k: v for k, v in state.items()
                if not (k.startswith("model.layers.") and int(k.split(".")[2]) > layer)}
    return _save_pair("qwen", out, hub_cache, tok, state=state, hub_key=lambda k: k, config=base.config,
                      arch="Qwen2ForCausalLM", gen=gen, ar_state=ar_state, ar_config=ar_cfg,
                      ar_arch="Qwen2ForCausalLM", d=d, layer=layer, n_layers=n_layers, scale=scale, seed=seed,
                      shards=shards, steps=steps)


def _save_pair(family: str, out: Path, hub_cache: bool, tok, *, state: dict, hub_key, config, arch: str, gen,
               ar_state: dict, ar_config, ar_arch: str, d: int, layer: int, n_layers: int, scale: float,
               seed: int, shards: int = SHARDS, steps: _Steps | None = None) -> StandIn:
    """Write a family's base, AV (the base perturbed, as fine-tuning would) and AR (cut to blocks
    0..K, perturbed) in the released layout: sharded safetensors under the hub's key names, configs,
    generation config, tokenizer files, the AR's value head and both sidecars. `steps` times each part."""
    steps = steps or _Steps(None)
    rel = RELEASED[family]
    dirs = _role_dirs(family, out, hub_cache)
    with steps("save_base"):
        _save_role(state, dirs["base"], hub_key, config, arch, gen, shards)
    with steps("perturb_and_save_av"):
        # one role's perturbed copy alive at a time: on a GPU a 7B state is 15 GB per copy
        _save_role(_perturbed(state, 0.02, seed + 1), dirs["av"], hub_key, config, arch, gen, shards)
    with steps("perturb_and_save_ar"):
        save_sharded(_perturbed(ar_state, 0.02, seed + 2), dirs["ar"], n_shards=shards)
        _write_config(ar_config, dirs["ar"], [ar_arch])
    with steps("tokenizer_value_head_sidecars"):
        _tokenizer_files(tok, [dirs["base"], dirs["av"], dirs["ar"]])
        _write_value_head(dirs["ar"], d, seed + 3)
        stands = {k: rel[k] for k in ("base", "av", "ar", "layer", "d_model")}
        for role in ("av", "ar"):
            _write_sidecar(dirs[role], sidecar_dict(role, tok, d_model=d, layer=layer, injection_scale=scale,
                                                    stands_in_for={**stands, "checkpoint": rel[role]}))
    return StandIn(family, dirs["base"], dirs["av"], dirs["ar"], layer, n_layers, d, scale, dict(rel),
                   out if hub_cache else None)


def _save_role(state: dict, directory: Path, hub_key, config, arch: str, gen, shards: int) -> None:
    """One full-model role (base or AV): weights under the hub's key names, config, generation config."""
    save_sharded({hub_key(k): v for k, v in state.items()}, directory, n_shards=shards)
    _write_config(config, directory, [arch])
    gen.save_pretrained(directory)


# ---------------------------------------------------------------------------------------------
# corpus


def build_corpus(out: str | Path, docs: list[str] | None = None, start: int = ULTRA_FINEWEB_START) -> Path:
    """A parquet file in Ultra-FineWeb's layout (split `en`: content, score, source) whose rows
    `start`.. are `docs` (rows before are empty filler, skipped by the source's range). Returns the
    folder to give as `corpus.name` (the hub dataset's data/ultrafineweb_en/)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = list(DOCUMENTS if docs is None else docs)
    folder = Path(out) / "Ultra-FineWeb" / "data" / "ultrafineweb_en"
    folder.mkdir(parents=True, exist_ok=True)
    n = start + len(docs)
    table = pa.table({
        "content": [""] * start + docs,
        "score": pa.array([0.0] * start + [round(0.9 - 0.01 * i, 3) for i in range(len(docs))], pa.float64()),
        "source": ["filler"] * start + ["standin"] * len(docs),
    })
    assert table.num_rows == n
    pq.write_table(table, folder / "ultrafineweb_en_part_00000.parquet")
    return folder


def corpus_overrides(folder: str | Path) -> list[str]:
    """--set items pointing the presets' Ultra-FineWeb corpus at the local copy, ids unchanged."""
    return [f"corpus.name={folder}", "corpus.id_prefix=openbmb/Ultra-FineWeb"]


def build_world(out: str | Path, *, depth: str = "release", hub_cache: bool = True, gemma_tok=None,
                qwen_tok=None) -> dict:
    """Both families and the corpus under `out`: {"gemma": StandIn, "qwen": StandIn, "corpus": Path}.
    With `hub_cache` the checkpoints sit in `out`/hub under their hub ids (call `use_hub_cache` on it
    before a run); otherwise in `out`/gemma and `out`/qwen, named by the run's --set pair=/base=."""
    out = Path(out)
    where = {f: out / "hub" if hub_cache else out / f for f in ("gemma", "qwen")}
    return {"gemma": build_gemma(where["gemma"], gemma_tok, depth=depth, hub_cache=hub_cache),
            "qwen": build_qwen(where["qwen"], qwen_tok, depth=depth, hub_cache=hub_cache),
            "corpus": build_corpus(out)}


def injection_note(s: StandIn) -> str:
    """One line: the injection character the stand-in's sidecar names against the release's."""
    from nla_ray.nla.sidecar import read_sidecar

    m = read_sidecar(s.av)
    rel = s.released
    same = m.injection_token_id == rel["injection_token_id"] and m.injection_char == rel["injection_char"]
    return (f"{s.family}: injection char {m.injection_char!r} = {m.injection_token_id}"
            + (" (the release's)" if same else f" (release: {rel['injection_char']!r} = {rel['injection_token_id']}, "
               "not one token in this vocabulary)") + f", injection_scale {m.injection_scale:g}, "
            f"mse_scale {m.mse_scale:.3f} = sqrt({m.d_model})" + ("" if math.isclose(m.mse_scale, math.sqrt(m.d_model))
                                                                   else " (!)"))


# ---------------------------------------------------------------------------------------------
# running the paper presets on the stand-ins


def cpu_overrides(num_cpus: float = 0.5) -> list[str]:
    """--set items moving every pool of the presets (and their cross-family layout) onto CPUs; half a
    CPU each so cross_family's four AV/AR pools run side by side on a 2-core box. dtype, batch sizes,
    concurrency and the AV backend stay the presets' own."""
    out = []
    for p in ("extract", "av", "ar"):
        out += [f"pools.{p}.num_gpus=0", f"pools.{p}.num_cpus={num_cpus}"]
    for p in ("av", "ar"):
        out += [f"cross_pools.{p}.num_gpus=0", f"cross_pools.{p}.num_cpus={num_cpus}"]
    return out


def partner_preset(other: StandIn, folder: str | Path) -> Path:
    """For a run whose stand-ins are named by directory: the partner family's packaged preset with
    its checkpoints and layer mapped onto `other`, written as <folder>/<preset>.yaml (the file's
    stem is the preset's name, so tables keep the name). cross_family reads `partner` as a preset;
    --set items naming one family's checkpoints never reach the other family's config."""
    import yaml

    from nla_ray.config import PRESET_DIR

    data = yaml.safe_load((PRESET_DIR / f"{other.preset}.yaml").read_text())
    data.update(other.family_overrides())
    path = Path(folder) / f"{other.preset}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return path


def job_argv(world: dict, family: str, job: str, *, out: str | Path, store: str | Path, n: int,
             max_new_tokens: int = 8, partner_dir: str | Path | None = None) -> list[str]:
    """The command line of `job` (reproduce_fve or cross_family) on `family`'s paper preset, mapped
    onto the stand-ins: corpus, CPU pools, a short decode, and whatever family fields the stand-ins
    need (none in a hub cache at the release's depth)."""
    s: StandIn = world[family]
    sets = s.overrides() + corpus_overrides(world["corpus"]) + cpu_overrides() + [f"av.max_new_tokens={max_new_tokens}"]
    if job == "cross_family":
        other: StandIn = world["qwen" if family == "gemma" else "gemma"]
        if other.family_overrides():
            if partner_dir is None:
                raise ValueError("cross_family on stand-ins named by directory needs partner_dir (for the "
                                 "partner preset file)")
            sets.append(f"partner={partner_preset(other, partner_dir)}")
    argv = ["--preset", s.preset, "--n", str(n), "--out", str(out), "--store", str(store)]
    for item in sets:
        argv += ["--set", item]
    return argv


def role_layout(directory: str | Path) -> dict:
    """What a role directory holds, as a real checkpoint's would be described: architectures, depth,
    shards, the value head, the sidecar's role / layer / injection token."""
    d = Path(directory)
    cfg = json.loads((d / "config.json").read_text())
    tc = cfg.get("text_config", cfg)
    out = {"architectures": cfg.get("architectures"), "model_type": cfg.get("model_type"),
           "num_hidden_layers": tc.get("num_hidden_layers"), "hidden_size": tc.get("hidden_size"),
           "shards": sorted(p.name for p in d.glob("model-*.safetensors")),
           "index": (d / "model.safetensors.index.json").is_file(),
           "value_head": (d / "value_head.safetensors").is_file()}
    if (d / "nla_meta.yaml").is_file():
        from nla_ray.nla.sidecar import read_sidecar

        m = read_sidecar(d)
        out["sidecar"] = {"role": m.role, "schema_version": m.raw.get("schema_version"), "layer": m.layer,
                          "injection_char": m.injection_char, "injection_token_id": m.injection_token_id,
                          "injection_scale": m.injection_scale, "mse_scale": m.raw["extraction"]["mse_scale"]}
    return out


def document_text(doc_id: str, docs: list[str] | None = None, start: int = ULTRA_FINEWEB_START) -> str:
    """The text behind a stand-in corpus id (``openbmb/Ultra-FineWeb:en:<index>``)."""
    return list(DOCUMENTS if docs is None else docs)[int(doc_id.rsplit(":", 1)[1]) - start]


def wrapper_extraction_check(s: StandIn, rows, tokenizer=None) -> dict:
    """Recompute a job's stored vectors with plain transformers: the base loaded as the hub config
    says (Gemma3ForConditionalGeneration for the Gemma stand-in), its text decoder's
    hidden_states[K+1] at each row's position. Returns the class, where the decoder sat, and how
    close the job's vectors are (cosine, relative norm error); the job ran bf16, so does this."""
    import numpy as np
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nla_ray.nla import sources

    path = sources.resolve(s.released["base"] if s.hub_cache else str(s.base)).path
    tok = tokenizer or AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    decoder, where = model, ""
    for name in ("model.language_model", "model"):
        mod = model
        for part in name.split("."):
            mod = getattr(mod, part, None)
        if mod is not None and hasattr(mod, "layers"):
            decoder, where = mod, name
            break
    doc_ids = rows.column("doc_id").to_pylist()
    positions = rows.column("position").to_pylist()
    layers = rows.column("layer").to_pylist()
    got = np.stack([np.asarray(v, dtype=np.float32) for v in rows.column("vector").to_pylist()])
    cos, rel = [], []
    with torch.no_grad():
        for doc in dict.fromkeys(doc_ids):
            ids = tok(document_text(doc), add_special_tokens=True, return_tensors="pt")["input_ids"]
            hs = decoder(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
            for i in (i for i, d in enumerate(doc_ids) if d == doc and positions[i] >= 0):
                want = hs[layers[i] + 1][0, positions[i]].float().numpy()
                cos.append(float(want @ got[i] / (np.linalg.norm(want) * np.linalg.norm(got[i]))))
                rel.append(float(np.linalg.norm(want - got[i]) / np.linalg.norm(want)))
    return {"class": type(model).__name__, "decoder": f"{where} ({type(decoder).__name__}, "
            f"{len(decoder.layers)} blocks)", "rows_checked": len(cos), "min_cos": min(cos),
            "max_rel_err": max(rel)}


def av_backend_check(s: StandIn, n: int = 2, max_new_tokens: int = 6) -> dict:
    """Load the stand-in's AV the way the AV pool does and decode `n` random vectors greedily with
    each backend (loop, fused — the presets' —, and transformers' generate): the classes it loaded
    as, the injection slot, and whether the backends wrote the same tokens."""
    import numpy as np

    from nla_ray.nla import pairs

    rel = s.released
    av = pairs.resolve_pair(f"{rel['av']},{rel['ar']}").av if s.hub_cache else str(s.av)
    eng = pairs.load_av(av, device="cpu", dtype="float32", max_new_tokens=max_new_tokens, backend="loop")
    v = np.random.RandomState(0).randn(n, s.d_model).astype(np.float32)
    texts = {}
    for backend in ("loop", "fused", "hf"):
        eng.backend = backend
        texts[backend] = [x.text for x in eng.generate(v)]
    return {"model": type(eng.model).__name__, "embedding": type(eng.embed).__name__,
            "injection_token_id": eng.prompt_ids[eng.slot], "slots": eng.prompt_ids.count(eng.prompt_ids[eng.slot]),
            "prompt_tokens": len(eng.prompt_ids), "texts": texts,
            "backends_agree": texts["loop"] == texts["fused"] == texts["hf"]}
