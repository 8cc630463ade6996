"""One configuration schema for every job: YAML presets + a file + `--set a.b=value` overrides.

Presets live in nla_ray/presets/<name>.yaml. `mini` is the embedded default (packaged SmolLM2 pair,
packaged BBC News held-out slice, CPU); `paper-gemma27b-L41` and `paper-qwen7b-L20` follow the
assessment's protocol on the released checkpoints (Ultra-FineWeb en docs 100000-102000, seed 42,
1000 activations from 200 documents, greedy, training-set Var denominators).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nla_ray.core.typed import coerce, field_types

# loop: our KV-cache loop (CPU default); hf: transformers' generate (reference); fast: static cache +
# CUDA-graph decode (nla_ray.nla.fast_decode); fused: fast with compiled norm/rotary kernels on a GPU
# (fast on a CPU). loop and fast give the same rows for the same seeds; fused may differ where
# compiled kernels round differently (bf16 near-ties); hf samples with its own RNG.
AV_BACKENDS = ("loop", "hf", "fast", "fused")
# The fast decoder's attention step (av.attn); nla_ray.nla.fast_decode says what each is.
AV_ATTN = ("auto", "triton", "flash", "sdpa")

PRESET_DIR = Path(__file__).resolve().parent / "presets"


@dataclass
class PoolConfig:
    num_gpus: float = 0.0          # fractions let small models share a GPU
    num_cpus: float = 1.0
    concurrency: int = 1           # actors in the pool
    batch_size: int = 16           # rows per map_batches call
    dtype: str = "auto"            # auto = bf16 on GPU, fp32 on CPU


@dataclass
class MachineConfig:
    """The machine a preset is laid out for: `nodes` x `gpus` cards of `gpu_memory_gb` each (decimal GB,
    as sold: an H200 is 141). The pipeline compares each pool's estimated GPU memory with one card
    (nla_ray.runtime.placement) and `nla-ray placement` states the layout on it."""

    gpus: int = 0                  # GPUs per node
    gpu_memory_gb: float = 0.0     # memory of one GPU
    name: str = ""                 # e.g. "2xH200"
    nodes: int = 1
    cpus: float | None = None      # CPUs per node, when the layout should be checked against them too


@dataclass
class AVConfig:
    temperature: float = 0.0
    n_samples: int = 1
    max_new_tokens: int = 150
    banned_chars: list = field(default_factory=list)   # quote ablation: ban tokens containing these
    backend: str = "loop"     # one of AV_BACKENDS; the GPU presets use fused
    # Rows decoded at once inside the AV pool's batch: null = the whole batch; an int caps it; "auto"
    # sizes it from the free GPU memory and the KV cache at max_new_tokens (fast_decode.auto_batch_size).
    decode_batch: Any = None
    # The fast decoder's attention step: auto (the Triton kernel of nla_ray/nla/decode_kernel.py where it
    # runs and passes its self-test, else FlashAttention-2, else masked SDPA), triton, flash or sdpa.
    attn: str = "auto"


@dataclass
class NLAConfig:
    name: str = "mini"
    pair: str = "mini:smollm2-L20"            # AV/AR pair spec (see nla_ray.nla.pairs)
    base: str = "pkg:smollm2-135m"            # model whose activations are explained
    layer: int = 20                           # K: block K output = hidden_states[K+1]; the pair's layer
    layers: list = field(default_factory=list)  # layers to extract (empty = [layer]); one forward pass
    partner: str | None = None                # the other family's preset (cross-family transfer)
    corpus: dict = field(default_factory=lambda: {"kind": "packaged_bbc", "split": "heldout"})
    n_docs: int = 40
    positions_per_doc: int = 5
    n: int | None = None                      # cap on activations (None = n_docs * positions_per_doc)
    seed: int = 42
    max_length: int = 2048
    var_train: float | None = None            # training-set Var; None = the pair sidecar's eval.var_train
    av: AVConfig = field(default_factory=AVConfig)
    pools: dict = field(default_factory=lambda: {"extract": PoolConfig(), "av": PoolConfig(), "ar": PoolConfig()})
    bootstrap: int = 1000
    # Pools for jobs that run this family beside another (cross-family): av/ar overrides, so both
    # families' AV and AR pools can be placed at once on the named machine.
    cross_pools: dict = field(default_factory=dict)
    # The machine this preset's pools are laid out for (None: no machine named, no memory check).
    machine: MachineConfig | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def extract_layers(self) -> list[int]:
        return sorted(set([int(x) for x in self.layers] or [self.layer]))


def _build(cls, data: dict, where: str):
    names = {f.name: f for f in dataclasses.fields(cls)}
    hints = field_types(cls)
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(names)}")
    kw = {}
    for k, v in data.items():
        v = coerce(hints[k], v, f"{where}.{k}")
        if k == "av":
            v = _build(AVConfig, v or {}, f"{where}.av")
        elif k == "cross_pools":
            bad = sorted(set(v or {}) - {"av", "ar"})
            if bad:
                raise ValueError(f"{where}.cross_pools: unknown pool(s) {bad}; cross_pools are av, ar")
            v = {p: _build(PoolConfig, q or {}, f"{where}.cross_pools.{p}") for p, q in (v or {}).items()}
        elif k == "machine":
            v = _machine(v, f"{where}.machine")
        elif k == "pools":
            bad = sorted(set(v or {}) - {"extract", "av", "ar"})
            if bad:
                raise ValueError(f"{where}.pools: unknown pool(s) {bad}; pools are extract, av, ar")
            v = {p: _build(PoolConfig, (v or {}).get(p) or {}, f"{where}.pools.{p}") for p in ("extract", "av", "ar")}
        kw[k] = v
    out = cls(**kw)
    if cls is AVConfig:
        if out.backend not in AV_BACKENDS:
            raise ValueError(f"{where}.backend: {out.backend!r} is not one of {list(AV_BACKENDS)}")
        if out.attn not in AV_ATTN:
            raise ValueError(f"{where}.attn: {out.attn!r} is not one of {list(AV_ATTN)}")
        db = out.decode_batch
        if isinstance(db, str) and db.strip().lstrip("-").isdigit():  # --set av.decode_batch=64 arrives as text
            db = out.decode_batch = int(db)
        if not (db is None or db == "auto" or (isinstance(db, int) and not isinstance(db, bool) and db > 0)):
            raise ValueError(f"{where}.decode_batch: expected a positive number of rows, 'auto' (from free GPU "
                             f"memory) or null (the pool's whole batch), got {db!r}")
    return out


def _machine(v, where: str) -> MachineConfig | None:
    """A `machine:` mapping, checked: whole GPUs and nodes, a positive card size."""
    if v is None or isinstance(v, MachineConfig):
        return v
    if not isinstance(v, dict):
        raise ValueError(f"{where}: expected a mapping like {{gpus: 2, gpu_memory_gb: 141, name: 2xH200}} "
                         f"(or null), got {v!r}")
    m = _build(MachineConfig, v, where)
    missing = [k for k in ("gpus", "gpu_memory_gb") if k not in v]
    if missing:
        raise ValueError(f"{where}: {' and '.join(missing)} missing; a machine names its GPUs per node and the "
                         f"memory of one GPU, e.g. {{gpus: 2, gpu_memory_gb: 141, name: 2xH200}}")
    if m.gpus < 1:
        raise ValueError(f"{where}.gpus: expected a whole number of GPUs per node, at least 1, got {m.gpus}")
    if not (m.gpu_memory_gb > 0 and m.gpu_memory_gb < 10_000):
        raise ValueError(f"{where}.gpu_memory_gb: expected the memory of one GPU in GB (e.g. 141 for an H200, "
                         f"80 for an H100), got {m.gpu_memory_gb}")
    if m.nodes < 1:
        raise ValueError(f"{where}.nodes: expected at least 1 node, got {m.nodes}")
    if m.cpus is not None and not m.cpus > 0:
        raise ValueError(f"{where}.cpus: expected a positive number of CPUs per node (or null), got {m.cpus}")
    return m


def _merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "corpus":
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _set(d: dict, dotted: str, value: str) -> None:
    keys = dotted.split(".")
    cur = d
    for k in keys[:-1]:
        cur = cur.setdefault(k, {})
    cur[keys[-1]] = yaml.safe_load(value)


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_config(preset: str = "mini", file: str | None = None, overrides: list[str] | None = None,
                **direct: Any) -> NLAConfig:
    path = PRESET_DIR / f"{preset}.yaml"
    if preset.endswith((".yaml", ".yml")) and Path(preset).is_file():  # a preset of the user's own
        path = Path(preset)
        preset = path.stem
    if not path.is_file():
        raise ValueError(f"unknown preset {preset!r}; available: {list_presets()} (or a path to a .yaml file)")
    data = yaml.safe_load(path.read_text()) or {}
    if file:
        data = _merge(data, yaml.safe_load(Path(file).read_text()) or {})
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"--set expects key.path=value, got {item!r}")
        k, v = item.split("=", 1)
        _set(data, k.strip(), v)
    for k, v in direct.items():
        if v is not None:
            data[k] = v
    data.setdefault("name", preset)
    base = NLAConfig().to_dict()
    return _build(NLAConfig, _merge(base, data), f"preset {preset}")


def add_job_args(p: argparse.ArgumentParser, job: str) -> None:
    """The job contract shared by every script in jobs/."""
    p.add_argument("--preset", default="mini", help=f"preset name (available: {', '.join(list_presets())})")
    p.add_argument("--config", help="YAML file merged over the preset")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any field, e.g. --set av.temperature=1.0 --set pools.av.num_gpus=0.5")
    p.add_argument("--n", type=int, help="exactly this many activations (the first n of ceil(n / positions_per_doc) "
                   "documents, in corpus order)")
    p.add_argument("--out", help=f"output dir (default runs/{job}/<preset>/, ignored by git; committed results are "
                   f"written with --out results/{job}/<preset>)")
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster to join (default: the one `ray job submit` gives, else a local one)")
    p.add_argument("--fresh", action="store_true", help="ignore finished work in --out and start over")


def config_from_args(a: argparse.Namespace) -> NLAConfig:
    cfg = load_config(a.preset, a.config, a.set)
    if a.n is not None:
        if a.n <= 0:
            raise ValueError(f"--n must be a positive number of activations, got {a.n}")
        cfg.n = a.n
        cfg.n_docs = -(-a.n // cfg.positions_per_doc)
    return cfg
