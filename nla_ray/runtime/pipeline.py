"""The driver: Ray Data streams a source through a list of stage pools and writes parquet parts.

    source (documents | stored rows) -> [StageSpec, StageSpec, ...] -> parquet parts (driver)

Each stage is a callable class that loads its model once per actor (Ray Data's batch-inference
pattern); pools take `num_gpus` (fractions let small models share a GPU), `num_cpus`, `concurrency`
and `batch_size` from the config, so the same code runs CPU actors on a laptop and spreads over every
GPU of a cluster. Stages stream: AV work starts as soon as the first extracted rows exist. The driver
writes each finished batch as a part; an interrupted run resumes by skipping documents whose rows
are all present (partial documents are redone). `tee` hands every finished batch to another writer
too (the activation store keeps the extracted vectors of a streaming run).

What an overnight run survives (nla_ray.runtime.rows has the on-disk side): a dead actor (Ray Data
restarts it and retries its batch; the rows' `<stage>_worker` stamps count the restarts), a killed
driver or a stopped job (the same command resumes; its stale lock is taken over), a part cut short
(set aside, its documents redone), a second run into the same directory (refused while the first
lives), rows a stage cannot process (kept apart in `failed/`, counted in `RunInfo`, the other rows go
on; a stage failing on most rows stops the run). Before any actor starts, `preflight` checks the
pairs' sidecars, tokenizers, value heads and weight files; when the preset names its machine,
`memory_check` states each GPU pool's memory against its cards and refuses a layout in which actors
Ray may put on one GPU cannot fit it; and `layout_check` says, from each node's GPUs (Ray puts a
fractional actor on one GPU), when the pools cannot all run at once on the cluster it finds
(nla_ray.runtime.placement does the arithmetic). A driver joining a cluster whose Ray token it lacks
is stopped with one line before `ray.init` (nla_ray.runtime.ray_auth).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa

from nla_ray.core.table import to_batch, write_json  # noqa: F401 - write_json re-exported for jobs
from nla_ray.runtime.rows import RowParts, completed_docs
from nla_ray.runtime.stages import ERROR, StageSpec


@dataclass
class RunInfo:
    docs_total: int = 0
    docs_skipped_done: int = 0
    docs_submitted: int = 0
    rows_written: int = 0
    parts_written: int = 0
    wall_s: float = 0.0
    stages: list = field(default_factory=list)
    rows_failed: int = 0                                   # rows a stage could not process (in failed/)
    docs_failed: list = field(default_factory=list)        # their documents (unfinished: a rerun retries them)
    failures: list = field(default_factory=list)           # the first few: doc, position, layer, error
    parts_set_aside: list = field(default_factory=list)    # unreadable parts moved to set_aside/
    tmp_removed: int = 0                                   # .tmp parts of a writer that died
    lock_taken_over: dict | None = None                    # the stale lock this run took over
    docs_truncated: int = 0                                # documents longer than max_length (cut, counted)
    explanations_truncated: int = 0                        # AR texts longer than its context (scored cut)
    worker_processes: dict = field(default_factory=dict)   # stage -> processes that wrote this run's rows
    actor_restarts: dict = field(default_factory=dict)     # stage -> processes beyond the pool's size


class StageFailures(ValueError):
    """A stage failed on most of the rows it was given: something is wrong beyond a few bad inputs."""


MAX_FAILURES_KEPT = 20


def init_ray(address: str | None, stages: Sequence[StageSpec] = ()):
    import ray

    if ray.is_initialized():
        return ray
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}}
    from nla_ray.runtime.stages import FAULT_ENV

    if os.environ.get(FAULT_ENV):  # fault injection (jobs/reliability.py) reaches the pools' workers
        env["env_vars"][FAULT_ENV] = os.environ[FAULT_ENV]
    if address or os.environ.get("RAY_ADDRESS"):
        target = address or os.environ["RAY_ADDRESS"]
        # A cluster with token authentication that this driver cannot satisfy: one line now, instead of
        # Ray's ~20 s of a warning a second and a ConnectionError (nla_ray.runtime.ray_auth).
        from nla_ray.runtime.ray_auth import check_driver_token

        check_driver_token(target)
        ray.init(address=target, runtime_env=env, log_to_driver=True)
    else:
        # A local cluster: declare at least as many logical CPUs as the pools ask for, so several
        # single-CPU actors can coexist on a 2-core laptop (they time-share; torch threads are capped).
        # address="local": a fresh instance even when a `ray start` cluster runs on this machine (without
        # it, ray.init would join that cluster and refuse num_cpus); pass --ray-address to join one.
        want = sum(s.pool.num_cpus * max(1, s.pool.concurrency) for s in stages) + 1
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, int(np.ceil(want))), include_dashboard=False,
                 runtime_env=env, log_to_driver=True)
        _LOCAL["started"] = True
    return ray


_LOCAL = {"started": False}  # whether init_ray started a local cluster (nothing will add nodes to it)


_HASH_LIMIT = 64 << 20  # files above this (27B shards) are identified by name and size only


def dir_digest(path: str | Path) -> str:
    from nla_ray.nla.sources import sha256_file  # streamed, memoised per process by (path, size, mtime)

    h = hashlib.sha256()
    root = Path(path)
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        size = f.stat().st_size
        h.update(f"{f.relative_to(root)}\0{size}\0".encode())
        if size <= _HASH_LIMIT:
            h.update(sha256_file(f).encode())
    return h.hexdigest()


# Stage arguments that change how fast rows come, not what they hold.
_SPEED_ONLY = {"batch_size", "backend_threads"}


def stages_fingerprint(stages: Sequence[StageSpec]) -> list:
    """What rows made by these stages depend on: each stage's row-shaping arguments, the files of
    any model directory it loads (hashed), and whether its pool runs on a GPU ("auto" dtype resolves
    to bf16 there and fp32 on a CPU). Callables are named by module and qualified name."""
    out = []
    for s in stages:
        kw = {}
        for k, v in sorted(s.kwargs.items()):
            if k in _SPEED_ONLY:
                continue
            if k.endswith("_dir"):
                v = {"path": str(v), "sha256": dir_digest(v)}
            elif callable(v):
                v = f"{getattr(v, '__module__', '?')}.{getattr(v, '__qualname__', repr(v))}"
            kw[k] = v
        out.append({"stage": s.cls.__name__, "name": s.name, "device": "gpu" if s.pool.num_gpus else "cpu",
                    "kwargs": kw})
    return json.loads(json.dumps(out, default=str))


# -------------------------------------------------------------------------------------------
# before any actor starts: one clear line instead of an actor's traceback


def _checked_pair_role(directory: str, role: str, _memo: dict = {}):  # noqa: B006 - per-process memo
    """Everything a pool would find wrong when loading a pair role, checked on the driver without
    loading weights: the sidecar (fields, types, schema version), its token facts against the live
    tokenizer, the weight files (safetensors only, no custom code), the model width against
    `d_model`, and for an AR the value head's shape and the layer K."""
    from nla_ray.nla.sidecar import SIDECAR_NAME, SidecarError, read_sidecar

    side = Path(directory) / SIDECAR_NAME
    key = (str(directory), role, side.stat().st_mtime_ns if side.is_file() else None)
    if key in _memo:
        return _memo[key]
    from transformers import AutoConfig, AutoTokenizer

    from nla_ray.nla.models import check_weights_dir, remote_code_allowed, text_config
    from nla_ray.nla.pairs import _weights_and_tokenizer

    meta = read_sidecar(directory)
    if meta.role != role:
        raise SidecarError(meta.path, "role", role, meta.role, f"a {role.upper()} pool was given this directory")
    wpath, tpath = _weights_and_tokenizer(Path(directory), meta)
    check_weights_dir(wpath)
    trust = remote_code_allowed()
    cfg = text_config(AutoConfig.from_pretrained(wpath, trust_remote_code=trust))
    meta.check_width(cfg.hidden_size)
    if role == "ar":
        n_layers = cfg.num_hidden_layers
        if meta.layer is not None and not 0 <= meta.layer < n_layers:
            raise SidecarError(meta.path, "critic.extraction_layer_index", f"a block index in 0..{n_layers - 1}",
                               meta.layer, f"{wpath} has {n_layers} blocks")
        head = Path(directory) / "value_head.safetensors"
        if not head.is_file():
            raise FileNotFoundError(f"{directory}: missing value_head.safetensors (the AR's Linear(d, d) head)")
        from safetensors import safe_open

        with safe_open(str(head), framework="pt") as fh:
            if "weight" not in fh.keys():
                raise ValueError(f"{head}: no tensor named 'weight' (found {sorted(fh.keys())})")
            shape = tuple(fh.get_slice("weight").get_shape())
        if shape != (meta.d_model, meta.d_model):
            raise ValueError(f"{head}: tensor 'weight' has shape {shape}, expected ({meta.d_model}, {meta.d_model}) "
                             f"from d_model in {meta.path}")
    tok = AutoTokenizer.from_pretrained(tpath, trust_remote_code=trust)
    ids = meta.check_tokenizer(tok)
    # token counts the memory estimate uses (nla_ray.runtime.placement): the AV prompt, the AR template
    if role == "av":
        _PROMPT_TOKENS[str(directory)] = len(ids)
    else:
        from nla_ray.nla import templates as T

        empty = T.ar_prompt(meta.ar_template, "")
        _PROMPT_TOKENS[f"ar:{directory}"] = len(tok(empty, add_special_tokens=True)["input_ids"])
    _memo[key] = meta
    return meta


def _base_config(base: str):
    from transformers import AutoConfig

    from nla_ray.nla import sources
    from nla_ray.nla.models import check_weights_dir, remote_code_allowed, text_config

    path = sources.resolve(base).path
    check_weights_dir(path)
    return path, text_config(AutoConfig.from_pretrained(path, trust_remote_code=remote_code_allowed()))


def preflight(stages: Sequence[StageSpec], source=None, items: list | None = None, log=print) -> dict:
    """Check what the pools will load and read before starting them; raises a ValueError (or
    FileNotFoundError) naming the file, the field, what was expected and what was found. Returns
    counts worth reporting (documents longer than an extraction's max_length)."""
    found: dict = {"docs_truncated": 0}
    widths: dict[str, tuple[int, str]] = {}   # column -> (width, who makes it)
    if isinstance(source, pa.Table):
        import pyarrow.types as pat

        for name in source.column_names:
            t = source.schema.field(name).type
            if pat.is_fixed_size_list(t):
                widths[name] = (t.list_size, f"the source rows' column {name!r}")
    for s in stages:
        kw = s.kwargs
        if "base" in kw and "layers" in kw:  # an extraction (or an answering model)
            path, cfg = _base_config(kw["base"])
            n_layers = cfg.num_hidden_layers
            bad = [L for L in kw["layers"] if not 0 <= int(L) < n_layers]
            if bad:
                raise ValueError(f"stage {s.name}: layers {bad} outside 0..{n_layers - 1} of {kw['base']} ({path})")
            widths["vector"] = (cfg.hidden_size, f"{kw['base']} (hidden size, {path}/config.json)")
            ml = kw.get("max_length")
            if ml and items and "text" in items[0]:
                from transformers import AutoTokenizer

                from nla_ray.nla.models import remote_code_allowed

                tok = AutoTokenizer.from_pretrained(path, trust_remote_code=remote_code_allowed())
                long = []
                for it in items:
                    t = it.get("text")
                    if isinstance(t, str) and len(t) > ml:  # fewer characters than tokens cannot be too long
                        try:
                            n = len(tok(t, add_special_tokens=True)["input_ids"])
                        except Exception:  # noqa: BLE001 - the extraction reports such a text itself
                            continue
                        if n > ml:
                            long.append(it["doc_id"])
                if long:
                    found["docs_truncated"] = len(long)
                    log(f"[preflight] {len(long)} document(s) are longer than max_length={ml} tokens: truncated "
                        f"to their first {ml} tokens, positions drawn from those (e.g. {long[:3]})")
        if "av_dir" in kw:
            meta = _checked_pair_role(kw["av_dir"], "av")
            col = f"{kw.get('src', '')}vector"
            if col in widths and widths[col][0] != meta.d_model:
                raise ValueError(f"vectors of width {widths[col][0]} from {widths[col][1]} cannot go into the AV "
                                 f"{kw['av_dir']}: field 'd_model' of {meta.path} is {meta.d_model}")
        if "ar_dir" in kw:
            meta = _checked_pair_role(kw["ar_dir"], "ar")
            for _, gold, _, _ in kw.get("reads") or [("explanation", "vector", "position", "")]:
                if gold in widths and widths[gold][0] != meta.d_model:
                    raise ValueError(f"gold vectors of width {widths[gold][0]} from {widths[gold][1]} cannot be "
                                     f"scored by the AR {kw['ar_dir']}: field 'd_model' of {meta.path} is "
                                     f"{meta.d_model}")
    return found


def cluster_nodes() -> list[dict]:
    """Resources of each live node of the connected Ray cluster ({"GPU": n, "CPU": m, ...})."""
    import ray

    return [dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive")]


def layout_check(stages: Sequence[StageSpec], available: dict, nodes: Sequence[dict] | None = None) -> tuple[str, str]:
    """("ok" | "in_turns" | "cannot", message) for the pools' actors against the cluster. `available`:
    Ray's resource dict ("GPU", "CPU"); `nodes`: the same per node (default: one node holding
    `available`). Sums are not enough: Ray puts a fractional actor on ONE GPU (shares on a GPU add up
    to at most 1), so three 0.6-GPU actors need three GPUs although they sum to 1.8. "ok": every
    order in which Ray may place the actors puts them all at once (nla_ray.runtime.placement.place);
    "in_turns": some or every order leaves a pool waiting for another to finish, so the stages cannot
    all stream at once; "cannot": an actor fits on no node, so that pool would never start."""
    from nla_ray.runtime import placement as P

    pools = [(s.name, float(s.pool.num_gpus or 0), float(s.pool.num_cpus or 0), max(1, s.pool.concurrency))
             for s in stages]
    parts = [f"{name} {n}x({g:g} GPU, {c:g} CPU)" for name, g, c, n in pools]
    node_res = list(nodes) if nodes else [available]
    res = P.place(P.actors_of(pools), [P.Node(int(float(n.get("GPU", 0) or 0)), float(n.get("CPU", 0) or 0))
                                         for n in node_res])
    gpus, cpus = float(available.get("GPU", 0) or 0), float(available.get("CPU", 0) or 0)
    have = f"{gpus:g} GPUs, {cpus:g} CPUs"
    if len(node_res) > 1:
        have += " on " + str(len(node_res)) + " nodes (" + ", ".join(
            f"{float(n.get('GPU', 0) or 0):g} GPU/{float(n.get('CPU', 0) or 0):g} CPU" for n in node_res) + ")"
    want = f"{res.asked['GPU']:g} GPUs, {res.asked['CPU']:g} CPUs"
    if res.truncated:
        want += f" (packings searched: the first {res.states}, not all)"
    if res.verdict == "cannot":
        return "cannot", (f"[pools] cannot run: {'; '.join(res.cannot)}, the cluster has {have} "
                          f"(pools: {', '.join(parts)}; together {want}). Lower the pool's num_gpus/num_cpus "
                          "(--set pools.<pool>.num_gpus=...) or use a larger cluster")
    if res.verdict == "always":
        return "ok", (f"[pools] {', '.join(parts)} ask for {want} together; the cluster has {have}: every order "
                      "in which Ray may place them puts all pools' actors at once")
    short = [r for r, k in (("GPU", gpus), ("CPU", cpus)) if res.asked[r] > k + 1e-9]
    if short:
        return "in_turns", (f"[pools] the pools ask for {want} together ({', '.join(parts)}) but the cluster has "
                            f"{have}: they cannot all run at once, so stages will wait for each other's resources "
                            f"(short of {' and '.join(short)}); fractions (--set pools.<pool>.num_gpus=0.5) or "
                            "concurrency 1 let them share")
    stuck = res.stuck[0]
    example = f"after {P.describe_packing(stuck['packing'])}, {' and '.join(stuck['waiting'])} cannot be placed"
    if res.verdict == "never":
        return "in_turns", (f"[pools] the pools ask for {want} together ({', '.join(parts)}), within the cluster's "
                            f"{have} in sum, but Ray puts each fractional actor on one GPU whose shares add up "
                            f"to at most 1: no packing holds them all, so they cannot all run at once and stages "
                            f"will wait for each other ({example}). Choose num_gpus so the actors pack onto the "
                            "GPUs (nla-ray placement shows the packings)")
    return "in_turns", (f"[pools] the pools ask for {want} together ({', '.join(parts)}); the cluster has {have}, "
                        f"but only some orders of placement hold them all at once: {example}, and stages would "
                        "wait for each other. Choose num_gpus so any packing holds them (nla-ray placement "
                        "shows the packings)")


def _stage_role(s: StageSpec) -> str | None:
    kw = s.kwargs
    if "av_dir" in kw:
        return "av"
    if "ar_dir" in kw:
        return "ar"
    if "base" in kw and "layers" in kw:
        return "extract" if s.cls.__name__ == "Extract" else "generate"
    return None


def _shape_at(path: str, name: str, **prompt):
    """The placement ModelShape of the checkpoint at `path` (its config.json; a multimodal wrapper's
    vision tower counted)."""
    from transformers import AutoConfig

    from nla_ray.nla.models import remote_code_allowed, text_config
    from nla_ray.runtime.placement import shape_from_config

    full = AutoConfig.from_pretrained(path, trust_remote_code=remote_code_allowed())
    return shape_from_config(text_config(full), name=name, vision=getattr(full, "vision_config", None),
                             source=f"{path}/config.json", **prompt)


def stage_need(s: StageSpec, explanation_tokens: int = 200):
    """What one actor of stage `s` needs on its GPU (a placement.PoolNeed), from the config of the
    checkpoint it loads; None for a stage that loads no model. `explanation_tokens`: the longest
    text an AR stage reads (the AV's token budget)."""
    from nla_ray.runtime import placement as P

    role, kw, pool = _stage_role(s), s.kwargs, s.pool
    common = dict(pool=s.name, num_gpus=float(pool.num_gpus or 0), concurrency=max(1, pool.concurrency))
    dtype = kw.get("dtype", pool.dtype)
    if role in ("extract", "generate"):
        path, _ = _base_config(kw["base"])
        shape = _shape_at(path, kw["base"])
        if role == "generate":  # the whole model answering one prompt at a time (ChatAnswer)
            need = P.av_need(shape, batch_size=1, max_new_tokens=int(kw.get("max_new_tokens", 64)), dtype=dtype,
                             prompt_tokens=512, **common)
        else:
            need = P.extract_need(shape, n_blocks=max(int(x) for x in kw["layers"]) + 1, batch_size=pool.batch_size,
                                  max_length=int(kw.get("max_length") or 2048), dtype=dtype,
                                  layers_out=len(kw["layers"]), **common)
            if kw.get("adapter"):  # the whole model is loaded to merge the adapter, then viewed up to K
                extra = (shape.layers - max(int(x) for x in kw["layers"]) - 1) * shape.block_params()
                need.weights_gb += extra * P.dtype_bytes(dtype) / P.GB
    elif role == "av":
        meta = _checked_pair_role(kw["av_dir"], "av")
        from nla_ray.nla.pairs import _weights_and_tokenizer

        wpath, _ = _weights_and_tokenizer(Path(kw["av_dir"]), meta)
        shape = _shape_at(str(wpath), str(kw["av_dir"]), av_prompt_tokens=_PROMPT_TOKENS.get(str(kw["av_dir"]), 150))
        need = P.av_need(shape, batch_size=pool.batch_size, max_new_tokens=int(kw.get("max_new_tokens", 150)),
                         n_samples=int(kw.get("n_samples", 1)), dtype=dtype,
                         sampling=float(kw.get("temperature", 0) or 0) > 0 or bool(kw.get("banned_chars")), **common)
    elif role == "ar":
        meta = _checked_pair_role(kw["ar_dir"], "ar")
        from nla_ray.nla.pairs import _weights_and_tokenizer

        wpath, _ = _weights_and_tokenizer(Path(kw["ar_dir"]), meta)
        shape = _shape_at(str(wpath), str(kw["ar_dir"]))
        text = _PROMPT_TOKENS.get(f"ar:{kw['ar_dir']}", 20) + int(explanation_tokens)
        need = P.ar_need(shape, n_blocks=(meta.layer if meta.layer is not None else shape.layers - 1) + 1,
                         batch_size=int(kw.get("batch_size", pool.batch_size)), text_tokens=text, dtype=dtype, **common)
    else:
        return None
    need.num_cpus = float(pool.num_cpus or 0)
    return need


def memory_check(stages: Sequence[StageSpec], machine, log=print) -> list:
    """One `[memory]` line per pool: what one actor needs on its GPU against the named machine's card
    (`machine`: nla_ray.config.MachineConfig or a dict with gpus / gpu_memory_gb / name), with the
    heaviest pools Ray may put beside it. Raises a ValueError naming the pools, their GB and the card
    when a set of actors Ray may put on one GPU cannot fit it. Returns the PoolNeeds."""
    from nla_ray.runtime import placement as P

    m = machine if isinstance(machine, dict) else dataclasses.asdict(machine)
    card, label = float(m["gpu_memory_gb"]), m.get("name") or f"{m['gpus']} GPU"
    # An AR reads explanations at most as long as the AV's token budget (the longest of this run's AVs;
    # an AR over stored rows gets the release's ~200).
    expl = max([int(s.kwargs.get("max_new_tokens", 0)) for s in stages if _stage_role(s) == "av"] or [200])
    needs = []
    for s in stages:
        if not s.pool.num_gpus:
            log(f"[memory] {s.name}: on CPUs (num_gpus 0), no GPU memory on the {label} machine")
            continue
        need = stage_need(s, expl)
        if need is None:
            log(f"[memory] {s.name}: loads no model; {s.pool.num_gpus:g} GPU share, memory not estimated")
            continue
        needs.append(need)
    actors = P.actors_of(needs)
    too_big = []
    for n in needs:
        nb = P.neighbours(actors, n.pool)
        beside = (f"with {' + '.join(nb['pools'])} ({nb['mem_gb']:.1f} GB) that Ray may put beside it the card holds "
                  f"{n.total_gb + nb['mem_gb']:.1f}" if nb["pools"] else f"alone on its card: {n.total_gb:.1f}")
        ok = n.total_gb + nb["mem_gb"] <= card + 1e-9
        log(f"[memory] {n.pool} ({n.concurrency} x {n.num_gpus:g} GPU, {n.model}): needs ~{n.total_gb:.1f} GB "
            f"(weights {n.weights_gb:.1f} + KV cache {n.kv_gb:.1f} + activations {n.act_gb:.1f} + runtime "
            f"{n.runtime_gb:.1f}); given a {n.share_gb(card):.1f} GB share of a {card:g} GB card; {beside} of "
            f"{card:g} GB: {'fits' if ok else 'DOES NOT FIT'}")
        if n.total_gb > card + 1e-9:
            too_big.append(f"one {n.pool} actor alone needs ~{n.total_gb:.1f} GB")
    worst = P.worst_shared_gpu(actors)
    if too_big or worst["mem_gb"] > card + 1e-9:
        why = "; ".join(too_big) or (
            f"Ray may put {' + '.join(worst['pools'])} on one GPU (their num_gpus sum to {worst['share']:g} <= 1), "
            f"~{worst['mem_gb']:.1f} GB")
        raise ValueError(f"[memory] the pools do not fit the {label} machine's {card:g} GB GPUs: {why} > {card:g} GB. "
                         "Raise the heavier pools' num_gpus until no such set sums to <= 1 (a share of at least "
                         "need / card each), or lower their batch_size; `nla-ray placement --preset ...` shows "
                         "every packing")
    return needs


_PROMPT_TOKENS: dict = {}   # AV prompt / AR template lengths counted by preflight, per role directory


def restarts_seen(table: pa.Table | None, stages: Sequence[StageSpec]) -> tuple[dict, dict]:
    """Per stage, the processes whose stamps are on `table`'s rows, and how many more there were than
    the pool's size (each restart of a dead actor comes back in a new process)."""
    procs, restarts = {}, {}
    if table is None or table.num_rows == 0:
        return procs, restarts
    for s in stages:
        col = f"{s.name}_worker"
        if col not in table.column_names:
            continue
        n = len({w for w in table.column(col).to_pylist() if w})
        procs[s.name] = n
        restarts[s.name] = max(0, n - max(1, s.pool.concurrency))
    return procs, restarts


def full_batches(ds, batch_size: int):
    """Re-block a stream into exactly `batch_size`-row blocks (the last may be short) before a pool.

    Why: Ray Data bundles an upstream pool's blocks (say 8 documents x 5 positions = 40 rows) until a
    bundle holds >= batch_size rows, then cuts batch_size plus a remainder from each bundle. On the H200
    real-size run a decode pool at batch 256 got 256, 24, 256, 24, 256, 24, 160 for 1000 rows: 7 calls
    instead of 4, each short one costing a whole 200-token decode and a new graph capture. A strict
    streaming repartition (no shuffle, no materialisation) gives every call a full batch. Its tasks
    need a CPU beside the pools' actors (see the caller).
    """
    if batch_size <= 1:
        return ds
    import inspect

    params = inspect.signature(type(ds).repartition).parameters
    if "target_num_rows_per_block" not in params:
        return ds  # an older Ray: batches keep their remainders (slower, not wrong)
    kw = {"strict": True} if "strict" in params else {}
    return ds.repartition(target_num_rows_per_block=int(batch_size), **kw)


def _items(source, done: set[str]) -> tuple[list[dict], int]:
    """Ray Data items for the unfinished part of `source` (Documents, dicts or an arrow table)."""
    if isinstance(source, pa.Table):
        b = to_batch(source)
        keep = [i for i, d in enumerate(b["doc_id"]) if d not in done]
        return [{k: v[i] for k, v in b.items()} for i in keep], len({b["doc_id"][i] for i in keep})
    items = []
    for d in source:
        item = {"doc_id": d.doc_id, "text": d.text} if hasattr(d, "doc_id") else dict(d)
        if item["doc_id"] not in done:
            items.append(item)
    return items, len(items)


def run(stages: Sequence[StageSpec], *, source, parts: RowParts, fingerprint: dict, per_position: int = 1,
        expected_rows: int | None = None, address: str | None = None, fresh: bool = False,
        tee: Callable[[dict], None] | None = None, log=print, lock: bool = True, machine=None) -> RunInfo:
    """Stream `source` through `stages` into `parts`, resuming when the parts were made with the same
    `fingerprint` (else `RunMismatch`). `per_position`: rows per (document, position) — layers x samples.
    `lock`: hold the parts directory's lock while running (a second run into it is refused with
    `RunLocked`); the activation store, which several jobs fill side by side, runs without.
    `machine`: the machine the preset names (config `machine:`): each GPU pool's memory is checked
    against its cards before anything starts (`memory_check`)."""
    parts.log = log
    if lock:
        got = parts.acquire()
    try:
        info = _run(stages, source=source, parts=parts, fingerprint=fingerprint, per_position=per_position,
                    expected_rows=expected_rows, address=address, fresh=fresh, tee=tee, log=log, locked=lock,
                    machine=machine)
        if lock and got.get("took_over") is not None:
            info.lock_taken_over = got["took_over"]
        return info
    finally:
        if lock:
            parts.release()


def _run(stages, *, source, parts: RowParts, fingerprint, per_position, expected_rows, address, fresh, tee, log,
         locked, machine=None) -> RunInfo:
    if locked:
        tmp = parts.remove_stale_tmp()
        if tmp:
            log(f"[resume] removed {len(tmp)} unfinished .tmp part(s) a killed writer left in {parts.dir}")
    if fresh:
        parts.clear()
    parts.check(fingerprint)
    docs_total = len({(s["doc_id"] if isinstance(s, dict) else s.doc_id) for s in source}) \
        if not isinstance(source, pa.Table) else len(set(source.column("doc_id").to_pylist()))
    done = completed_docs(parts.read(), per_position)
    items, n_docs = _items(source, done)
    info = RunInfo(docs_total=docs_total, docs_submitted=n_docs, docs_skipped_done=docs_total - n_docs,
                   stages=[s.describe() for s in stages], parts_set_aside=list(parts.set_aside),
                   tmp_removed=len(tmp) if locked else 0)
    if info.docs_skipped_done:
        log(f"[resume] {info.docs_skipped_done}/{docs_total} documents already finished in {parts.dir}")
    items = _refuse_bad_texts(items, parts, info, log)
    if not items:
        return info
    info.docs_truncated = preflight(stages, source, items, log=log)["docs_truncated"]
    if machine is not None:
        memory_check(stages, machine, log=log)
    ray = init_ray(address, stages)
    verdict, msg = layout_check(stages, ray.cluster_resources(), cluster_nodes())
    if verdict == "cannot" and _LOCAL["started"]:  # a joined cluster may still add nodes; this one will not
        raise ValueError(msg)
    log(msg)
    import ray.data as rd

    ctx = rd.DataContext.get_current()
    ctx.enable_progress_bars = True
    first = stages[0].pool
    ds = rd.from_items(items, override_num_blocks=max(1, min(len(items), 16 * max(1, first.concurrency))))
    # Re-blocking runs as Ray tasks needing a CPU beside the pools' actors: with none spare (a 2-CPU
    # laptop whose pools hold both) the tasks never start and the stream hangs, so it is done only
    # where a CPU is left, and only before GPU pools (whose decode shapes it is for).
    spare_cpu = float(ray.cluster_resources().get("CPU", 0)) - sum(
        s.pool.num_cpus * max(1, s.pool.concurrency) for s in stages)
    reblock = [s.name for s in stages if s.pool.num_gpus and s.pool.batch_size > 1]
    if reblock and spare_cpu < 1:
        log(f"[batches] no CPU spare beside the pools ({spare_cpu:g}): {', '.join(reblock)} get Ray Data's "
            "batches with their remainders (slower decode shapes, same rows)")
        reblock = []
    for s in stages:
        if s.name in reblock:
            ds = full_batches(ds, s.pool.batch_size)
        ds = ds.map_batches(s.cls, **s.map_batches_args())
    t0 = time.time()
    docs_failed: dict[str, None] = {d: None for d in info.docs_failed}
    written = []
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
        n = len(batch["doc_id"])
        if n == 0:
            continue
        err = batch.pop(ERROR, None)
        bad = np.array([isinstance(e, str) and bool(e) for e in err], dtype=bool) if err is not None \
            else np.zeros(n, dtype=bool)
        if bad.any():
            failed = {k: v[bad] for k, v in batch.items()}
            failed[ERROR] = np.asarray(err, dtype=object)[bad]
            parts.write(failed, failed=True)
            _record_failures(info, failed, docs_failed, log)
            batch = {k: v[~bad] for k, v in batch.items()}
            n = len(batch["doc_id"])
            if info.rows_failed >= MAX_FAILURES_KEPT and info.rows_failed > info.rows_written + n:
                raise StageFailures(
                    f"stopped: {info.rows_failed} rows failed against {info.rows_written + n} processed "
                    f"(first: {info.failures[0]['error']}); the failed rows are in {parts.dir / 'failed'}")
            if n == 0:
                continue
        written.append(parts.write(batch))
        if tee is not None:
            tee(batch)
        info.rows_written += n
        info.explanations_truncated += int(sum(np.asarray(v, dtype=bool).sum() for k, v in batch.items()
                                               if k.startswith("ar_truncated")))
        info.parts_written += 1
        el = time.time() - t0
        rate = info.rows_written / max(el, 1e-9)
        msg = f"[rows] {info.rows_written}" + (f"/~{expected_rows}" if expected_rows else "") + f" written, {rate:.2f} rows/s, {el:.0f}s"
        if expected_rows and expected_rows > info.rows_written:
            msg += f", ~{(expected_rows - info.rows_written) / max(rate, 1e-9):.0f}s left"
        log(msg)
        sys.stdout.flush()
    info.wall_s = time.time() - t0
    info.docs_failed = list(docs_failed)
    if info.explanations_truncated:
        log(f"[ar] {info.explanations_truncated} explanation(s) were longer than the AR's context and were scored on "
            "their head and the template's tail (column ar_truncated)")
    if info.rows_failed:
        log(f"[failed] {info.rows_failed} row(s) of {len(docs_failed)} document(s) could not be processed; kept "
            f"apart in {parts.dir / 'failed'} (the other rows are kept; a rerun tries those documents again)")
    cols = [f"{s.name}_worker" for s in stages]
    if written:
        import pyarrow.parquet as pq

        stamps = pa.concat_tables([pq.read_table(f, columns=[c for c in cols if c in pq.read_schema(f).names])
                                   for f in written], promote_options="default")
        info.worker_processes, info.actor_restarts = restarts_seen(stamps, stages)
        if any(info.actor_restarts.values()):
            log(f"[actors] restarted during this run: {info.actor_restarts} (their batches were retried)")
    return info


def _refuse_bad_texts(items: list[dict], parts: RowParts, info: RunInfo, log) -> list[dict]:
    """Documents whose text cannot cross into Ray (Arrow strings are UTF-8: a lone surrogate would stop
    the whole dataset) fail here, one by one, recorded like any failed row."""
    from nla_ray.runtime.stages import FAILED, text_problem

    bad = [(i, text_problem(it["text"])) for i, it in enumerate(items) if "text" in it]
    bad = [(i, why) for i, why in bad if why]
    if not bad:
        return items
    failed = {"doc_id": np.array([str(items[i]["doc_id"]) for i, _ in bad], dtype=object),
              "position": np.full(len(bad), FAILED), "layer": np.full(len(bad), -1),
              "sample_idx": np.zeros(len(bad), dtype=np.int64),
              ERROR: np.array([f"driver: doc {items[i]['doc_id']}: {why}" for i, why in bad], dtype=object)}
    parts.write(failed, failed=True)
    docs: dict = {d: None for d in info.docs_failed}
    _record_failures(info, failed, docs, log)
    info.docs_failed = list(docs)
    drop = {i for i, _ in bad}
    return [it for i, it in enumerate(items) if i not in drop]


def _record_failures(info: RunInfo, failed: dict, docs: dict, log) -> None:
    n = len(failed["doc_id"])
    info.rows_failed += n
    for i in range(n):
        docs.setdefault(str(failed["doc_id"][i]), None)
        if len(info.failures) < MAX_FAILURES_KEPT:
            info.failures.append({"doc_id": str(failed["doc_id"][i]),
                                  "position": int(failed["position"][i]) if "position" in failed else None,
                                  "layer": int(failed["layer"][i]) if "layer" in failed else None,
                                  "sample_idx": int(failed["sample_idx"][i]) if "sample_idx" in failed else None,
                                  "error": str(failed[ERROR][i])})
    log(f"[failed] {n} row(s) kept apart: {str(failed[ERROR][0])[:300]}")


def alive_together(table: pa.Table, stages: Sequence[str] | None = None) -> dict | None:
    """The first instant at which an actor of every stage was alive, and for how long they all were.
    An actor (one `<stage>_worker` value) is alive from its placement (`<stage>_tinit`) until at least
    the end of its last batch (`<stage>_t1`). None when a stage has no such stamps (e.g. rows a
    resumed run took from the store). {"at": epoch s, "seconds": length of the common window,
    "placed": {stage: [first placement of each worker]}}."""
    names = list(stages) if stages else [c[: -len("_tinit")] for c in table.column_names if c.endswith("_tinit")]
    spans: dict = {}
    for s in names:
        cols = (f"{s}_worker", f"{s}_tinit", f"{s}_t1")
        if any(c not in table.column_names for c in cols):
            return None
        w, ti, t1 = (table.column(c).to_pylist() for c in cols)
        per: dict = {}
        for a, b, c in zip(w, ti, t1):
            if isinstance(a, str) and a and b is not None and c is not None and np.isfinite(b) and np.isfinite(c):
                lo, hi = per.get(a, (b, c))
                per[a] = (min(lo, b), max(hi, c))
        if not per:
            return None
        spans[s] = sorted(per.values())
    best = None
    for t in sorted({lo for v in spans.values() for lo, _ in v}):
        ends = [max((hi for lo, hi in v if lo <= t <= hi), default=None) for v in spans.values()]
        if all(e is not None for e in ends):
            best = {"at": t, "seconds": round(min(ends) - t, 3)}
            break
    placed = {s: [round(lo, 3) for lo, _ in v] for s, v in spans.items()}
    return {"at": best["at"] if best else None, "seconds": best["seconds"] if best else 0.0, "placed": placed}


def stage_timeline(table: pa.Table) -> dict:
    """Per stage: first start, last end, busy seconds, workers; pairwise overlap of stage windows —
    the evidence that the pools ran concurrently rather than one after another — and `together`:
    whether an actor of every stage was alive at one instant (all pools placed at once)."""
    out = {}
    t_min = None
    names = [c[: -len("_t0")] for c in table.column_names if c.endswith("_t0") and f"{c[:-3]}_worker" in table.column_names]
    for s in names:
        w = table.column(f"{s}_worker").to_pylist()
        # rows a resumed run took from the store carry no extraction stamps: only stamped rows count
        have = [i for i, x in enumerate(w) if isinstance(x, str) and x]
        if not have:
            continue
        t0 = np.asarray(table.column(f"{s}_t0").to_numpy(zero_copy_only=False), dtype=float)[have]
        t1 = np.asarray(table.column(f"{s}_t1").to_numpy(zero_copy_only=False), dtype=float)[have]
        w = [w[i] for i in have]
        spans = sorted(set(zip(t0.tolist(), t1.tolist(), w)))
        busy = sum(b - a for a, b, _ in spans)
        out[s] = {"start": float(t0.min()), "end": float(t1.max()), "busy_s": round(busy, 3),
                  "batches": len(spans), "workers": sorted(set(w))}
        t_min = out[s]["start"] if t_min is None else min(t_min, out[s]["start"])
    for s in out:
        out[s]["start_rel_s"] = round(out[s]["start"] - t_min, 3)
        out[s]["end_rel_s"] = round(out[s]["end"] - t_min, 3)
    overlap = {}
    keys = list(out)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            lo, hi = max(out[a]["start"], out[b]["start"]), min(out[a]["end"], out[b]["end"])
            overlap[f"{a}|{b}"] = round(max(0.0, hi - lo), 3)
    together = alive_together(table, list(out)) if out else None
    if together is not None and t_min is not None:
        together = {"all_placed": together["at"] is not None, "from_rel_s": None if together["at"] is None
                    else round(together["at"] - t_min, 3), "seconds": together["seconds"]}
    return {"stages": out, "overlap_s": overlap, "together": together}
