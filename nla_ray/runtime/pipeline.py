"""The driver: Ray Data streams a source through a list of stage pools and writes parquet parts.

    source (documents | stored rows) -> [StageSpec, StageSpec, ...] -> parquet parts (driver)

Each stage is a callable class that loads its model once per actor (Ray Data's batch-inference
pattern); pools take `num_gpus` (fractions let small models share a GPU), `num_cpus`, `concurrency`
and `batch_size` from the config, so the same code runs CPU actors on a laptop and spreads over every
GPU of a cluster. Stages stream: AV work starts as soon as the first extracted rows exist. The driver
writes each finished batch as a part; an interrupted run resumes by skipping documents whose rows
are all present (partial documents are redone). `tee` hands every finished batch to another writer
too (the activation store keeps the extracted vectors of a streaming run).
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
from nla_ray.runtime.stages import StageSpec


@dataclass
class RunInfo:
    docs_total: int = 0
    docs_skipped_done: int = 0
    docs_submitted: int = 0
    rows_written: int = 0
    parts_written: int = 0
    wall_s: float = 0.0
    stages: list = field(default_factory=list)


def init_ray(address: str | None, stages: Sequence[StageSpec] = ()):
    import ray

    if ray.is_initialized():
        return ray
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}}
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
    return ray


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
        tee: Callable[[dict], None] | None = None, log=print) -> RunInfo:
    """Stream `source` through `stages` into `parts`, resuming when the parts were made with the same
    `fingerprint` (else `RunMismatch`). `per_position`: rows per (document, position) — layers x samples."""
    if fresh:
        parts.clear()
    parts.check(fingerprint)
    docs_total = len({(s["doc_id"] if isinstance(s, dict) else s.doc_id) for s in source}) \
        if not isinstance(source, pa.Table) else len(set(source.column("doc_id").to_pylist()))
    done = completed_docs(parts.read(), per_position)
    items, n_docs = _items(source, done)
    info = RunInfo(docs_total=docs_total, docs_submitted=n_docs, docs_skipped_done=docs_total - n_docs,
                   stages=[s.describe() for s in stages])
    if info.docs_skipped_done:
        log(f"[resume] {info.docs_skipped_done}/{docs_total} documents already finished in {parts.dir}")
    if not items:
        return info
    init_ray(address, stages)
    import ray.data as rd

    ctx = rd.DataContext.get_current()
    ctx.enable_progress_bars = True
    first = stages[0].pool
    ds = rd.from_items(items, override_num_blocks=max(1, min(len(items), 16 * max(1, first.concurrency))))
    for s in stages:
        ds = ds.map_batches(s.cls, **s.map_batches_args())
    t0 = time.time()
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
        n = len(batch["doc_id"])
        if n == 0:
            continue
        parts.write(batch)
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
    return info


def stage_timeline(table: pa.Table) -> dict:
    """Per stage: first start, last end, busy seconds, workers; and pairwise overlap of stage windows —
    the evidence that the pools ran concurrently rather than one after another."""
    out = {}
    t_min = None
    names = [c[: -len("_t0")] for c in table.column_names if c.endswith("_t0") and f"{c[:-3]}_worker" in table.column_names]
    for s in names:
        t0 = np.asarray(table.column(f"{s}_t0").to_numpy(), dtype=float)
        t1 = np.asarray(table.column(f"{s}_t1").to_numpy(), dtype=float)
        w = table.column(f"{s}_worker").to_pylist()
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
