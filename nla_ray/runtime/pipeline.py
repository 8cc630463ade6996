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
pairs' sidecars, tokenizers, value heads and weight files, and `layout_check` says when the pools
cannot all run at once on the cluster it finds.
"""

from __future__ import annotations

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
        ray.init(address=address or os.environ["RAY_ADDRESS"], runtime_env=env, log_to_driver=True)
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
    meta.check_tokenizer(AutoTokenizer.from_pretrained(tpath, trust_remote_code=trust))
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


def layout_check(stages: Sequence[StageSpec], available: dict) -> tuple[str, str]:
    """("ok" | "in_turns" | "cannot", message) for the pools' resources against what the cluster has
    (`available`: Ray's resource dict, "GPU" and "CPU"). "in_turns": every pool fits alone but not all
    together, so the stages cannot all stream at once; "cannot": a single actor asks for more than
    the cluster has, so that pool would never start."""
    asked = {"GPU": 0.0, "CPU": 0.0}
    parts, too_big = [], []
    for s in stages:
        n = max(1, s.pool.concurrency)
        g, c = float(s.pool.num_gpus or 0), float(s.pool.num_cpus or 0)
        asked["GPU"] += g * n
        asked["CPU"] += c * n
        parts.append(f"{s.name} {n}x({g:g} GPU, {c:g} CPU)")
        for res, one in (("GPU", g), ("CPU", c)):
            if one > float(available.get(res, 0) or 0) + 1e-9:
                too_big.append(f"one {s.name} actor asks for {one:g} {res}")
    have = f"{float(available.get('GPU', 0) or 0):g} GPUs, {float(available.get('CPU', 0) or 0):g} CPUs"
    want = f"{asked['GPU']:g} GPUs, {asked['CPU']:g} CPUs"
    if too_big:
        return "cannot", (f"[pools] cannot run: {'; '.join(too_big)}, the cluster has {have} "
                          f"(pools: {', '.join(parts)}; together {want}). Lower the pool's num_gpus/num_cpus "
                          "(--set pools.<pool>.num_gpus=...) or use a larger cluster")
    short = [r for r in ("GPU", "CPU") if asked[r] > float(available.get(r, 0) or 0) + 1e-9]
    if short:
        return "in_turns", (f"[pools] the pools ask for {want} together ({', '.join(parts)}) but the cluster has "
                            f"{have}: they cannot all run at once, so stages will wait for each other's resources "
                            f"(short of {' and '.join(short)}); fractions (--set pools.<pool>.num_gpus=0.5) or "
                            "concurrency 1 let them share")
    return "ok", f"[pools] {', '.join(parts)} ask for {want} together; the cluster has {have}"


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
        tee: Callable[[dict], None] | None = None, log=print, lock: bool = True) -> RunInfo:
    """Stream `source` through `stages` into `parts`, resuming when the parts were made with the same
    `fingerprint` (else `RunMismatch`). `per_position`: rows per (document, position) — layers x samples.
    `lock`: hold the parts directory's lock while running (a second run into it is refused with
    `RunLocked`); the activation store, which several jobs fill side by side, runs without."""
    parts.log = log
    if lock:
        got = parts.acquire()
    try:
        info = _run(stages, source=source, parts=parts, fingerprint=fingerprint, per_position=per_position,
                    expected_rows=expected_rows, address=address, fresh=fresh, tee=tee, log=log, locked=lock)
        if lock and got.get("took_over") is not None:
            info.lock_taken_over = got["took_over"]
        return info
    finally:
        if lock:
            parts.release()


def _run(stages, *, source, parts: RowParts, fingerprint, per_position, expected_rows, address, fresh, tee, log,
         locked) -> RunInfo:
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
    ray = init_ray(address, stages)
    verdict, msg = layout_check(stages, ray.cluster_resources())
    if verdict == "cannot" and _LOCAL["started"]:  # a joined cluster may still add nodes; this one will not
        raise ValueError(msg)
    log(msg)
    import ray.data as rd

    ctx = rd.DataContext.get_current()
    ctx.enable_progress_bars = True
    first = stages[0].pool
    ds = rd.from_items(items, override_num_blocks=max(1, min(len(items), 16 * max(1, first.concurrency))))
    for s in stages:
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


def stage_timeline(table: pa.Table) -> dict:
    """Per stage: first start, last end, busy seconds, workers; and pairwise overlap of stage windows —
    the evidence that the pools ran concurrently rather than one after another."""
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
    return {"stages": out, "overlap_s": overlap}
