"""The distributed shape: Ray Data streams documents through three actor pools.

    documents -> ExtractStage pool -> AVStage pool -> ARStage pool -> parquet parts (driver)

Each stage is a callable class that loads its model once per actor (Ray Data's batch-inference
pattern); pools take `num_gpus` (fractions let small models share a GPU), `num_cpus`,
`concurrency` and `batch_size` from the config, so the same code runs CPU actors on a laptop and
spreads over every GPU of a cluster. Stages stream: AV work starts as soon as the first extracted
rows exist. The driver writes each finished batch as a parquet part under `<out>/rows/`, so an
interrupted run resumes by skipping documents whose rows are all present; partial documents are
redone. Every row carries its provenance and per-stage timestamps + worker ids, from which the
summary shows that the pools overlapped in time.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .config import NLAConfig

KEY = ["doc_id", "position", "layer", "sample_idx"]
SHORT = "short_doc"  # placeholder status for documents with no position >= 50


def _worker() -> str:
    try:
        import ray

        gpus = ray.get_gpu_ids()
    except Exception:  # not inside Ray (unit tests call stages directly)
        gpus = []
    return f"{socket.gethostname()}:{os.getpid()}" + (f":gpu{','.join(str(g) for g in gpus)}" if gpus else "")


def _threads(num_cpus: float) -> None:
    import torch

    torch.set_num_threads(max(1, int(num_cpus)))


def _cfg(d: dict) -> NLAConfig:
    from .config import _build

    return _build(NLAConfig, d, "pipeline config")


class ExtractStage:
    """docs (doc_id, text) -> one row per sampled position (raw gold vector + provenance)."""

    def __init__(self, cfg: dict):
        from . import sources
        from .extract import Extractor
        from .models import load_causal_lm, resolve_device, resolve_dtype
        from transformers import AutoTokenizer

        self.cfg = c = _cfg(cfg)
        pool = c.pools["extract"]
        _threads(pool.num_cpus)
        dev = resolve_device("auto")
        res = sources.resolve(c.base)
        tok = AutoTokenizer.from_pretrained(res.path, trust_remote_code=False)
        model = load_causal_lm(res.path, device=dev, dtype=resolve_dtype(pool.dtype, dev))
        self.d = model.config.get_text_config().hidden_size
        self.ex = Extractor(model, tok, [c.layer], model_id=c.base, seed=c.seed,
                            positions_per_doc=c.positions_per_doc, max_length=c.max_length)

    def __call__(self, batch: dict) -> dict:
        t0 = time.time()
        docs = list(zip(batch["doc_id"].tolist(), batch["text"].tolist()))
        rows = self.ex.extract(docs)
        seen = {r["doc_id"] for r in rows}
        for doc_id, _ in docs:
            if doc_id not in seen:  # too short: keep a marker row so resume knows it is done
                rows.append({"doc_id": doc_id, "position": -1, "n_raw_tokens": 0, "sample_rank": 0,
                             "positions_in_doc": 0, "layer": self.cfg.layer, "model_id": self.cfg.base,
                             "token_id": -1, "token": "", "char_start": -1, "char_end": -1,
                             "prefix_text": "", "vector": np.zeros(self.d, np.float32), "seed": self.cfg.seed})
        out = {k: np.array([r[k] for r in rows], dtype=object if isinstance(rows[0][k], str) else None)
               for k in rows[0] if k != "vector"}
        out["vector"] = np.stack([r["vector"] for r in rows]).astype(np.float32)
        out["extract_t0"] = np.full(len(rows), t0)
        out["extract_t1"] = np.full(len(rows), time.time())
        out["extract_worker"] = np.array([_worker()] * len(rows), dtype=object)
        return out


class AVStage:
    """gold vectors -> n_samples explanations each (per-sample seeds; banned tokens optional)."""

    def __init__(self, cfg: dict):
        from . import pairs

        self.cfg = c = _cfg(cfg)
        pool = c.pools["av"]
        _threads(pool.num_cpus)
        dirs = pairs.resolve_pair(c.pair)
        self.av = pairs.load_av(dirs.av, dtype=pool.dtype, max_new_tokens=c.av.max_new_tokens,
                                backend=c.av.backend)
        self.banned = self.av.banned_ids_for(c.av.banned_chars) if c.av.banned_chars else None

    def __call__(self, batch: dict) -> dict:
        from .av import sample_seed

        t0 = time.time()
        c = self.cfg
        n_s = max(1, c.av.n_samples)
        idx = np.repeat(np.arange(len(batch["doc_id"])), n_s)
        out = {k: v[idx] for k, v in batch.items()}
        out["sample_idx"] = np.tile(np.arange(n_s), len(batch["doc_id"]))
        valid = out["position"] >= 0
        # "" rather than None: Ray turns None in object columns into NaN between stages.
        expl = np.array([""] * len(idx), dtype=object)
        raw = np.array([""] * len(idx), dtype=object)
        status = np.array([SHORT] * len(idx), dtype=object)
        ntok = np.zeros(len(idx), dtype=np.int64)
        if valid.any():
            vi = np.nonzero(valid)[0]
            seeds = [sample_seed(c.seed, out["doc_id"][i], int(out["position"][i]), int(out["layer"][i]),
                                 int(out["sample_idx"][i])) for i in vi]
            samples = self.av.generate(out["vector"][vi], temperature=c.av.temperature, seeds=seeds,
                                       banned_ids=self.banned)
            for i, s in zip(vi, samples):
                expl[i], raw[i], status[i], ntok[i] = s.explanation or "", s.text, s.status, s.n_tokens
        out.update(explanation=expl, av_text=raw, status=status, n_gen_tokens=ntok,
                   av_t0=np.full(len(idx), t0), av_t1=np.full(len(idx), time.time()),
                   av_worker=np.array([_worker()] * len(idx), dtype=object))
        return out


class ARStage:
    """explanations -> reconstructions, NMSE and cos per row (direction-only, fp32)."""

    def __init__(self, cfg: dict):
        from . import pairs

        self.cfg = c = _cfg(cfg)
        pool = c.pools["ar"]
        _threads(pool.num_cpus)
        self.ar = pairs.load_ar(pairs.resolve_pair(c.pair).ar, dtype=pool.dtype)

    def __call__(self, batch: dict) -> dict:
        from . import metrics

        t0 = time.time()
        n = len(batch["doc_id"])
        valid = batch["position"] >= 0
        recon = np.zeros_like(batch["vector"], dtype=np.float32)
        nm = np.full(n, np.nan, dtype=np.float32)
        cs = np.full(n, np.nan, dtype=np.float32)
        if valid.any():
            vi = np.nonzero(valid)[0]
            # A tag failure is scored on whatever text the AV produced; `status` keeps it separable.
            texts = [str(batch["explanation"][i]) if batch["status"][i] != "no_open_tag" else str(batch["av_text"][i])
                     for i in vi]
            r = self.ar.reconstruct(texts, batch_size=max(1, self.cfg.pools["ar"].batch_size))
            recon[vi] = r
            nm[vi] = metrics.nmse(r, batch["vector"][vi], self.ar.meta.mse_scale)
            cs[vi] = metrics.cosine(r, batch["vector"][vi])
        out = dict(batch)
        out.update(recon=recon, nmse=nm, cos=cs, ar_t0=np.full(n, t0), ar_t1=np.full(n, time.time()),
                   ar_worker=np.array([_worker()] * n, dtype=object))
        return out


# -------------------------------------------------------------------------------------------
# parquet parts


def _to_arrow(batch: dict) -> pa.Table:
    cols = {}
    for k, v in batch.items():
        v = np.asarray(v)
        if v.ndim == 2:  # vectors: fixed-size lists of float32
            cols[k] = pa.FixedSizeListArray.from_arrays(pa.array(v.astype(np.float32).reshape(-1)), v.shape[1])
        elif v.dtype == object:
            cols[k] = pa.array([None if x is None else str(x) for x in v], type=pa.string())
        else:
            cols[k] = pa.array(v)
    return pa.table(cols)


def vectors(table: pa.Table, column: str) -> np.ndarray:
    col = table.column(column).combine_chunks()
    d = col.type.list_size
    return np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, d)


def read_parts(rows_dir: Path) -> pa.Table | None:
    files = sorted(glob.glob(str(rows_dir / "part-*.parquet")))
    if not files:
        return None
    return pa.concat_tables([pq.read_table(f) for f in files], promote_options="default")


def completed_docs(table: pa.Table | None, n_samples: int) -> set[str]:
    """Documents whose every (position x sample) row is present."""
    if table is None or table.num_rows == 0:
        return set()
    doc = table.column("doc_id").to_pylist()
    pos = table.column("position").to_pylist()
    per = table.column("positions_in_doc").to_pylist()
    seen: dict[str, set] = {}
    need: dict[str, int] = {}
    samp = table.column("sample_idx").to_pylist()
    for d, p, n, s in zip(doc, pos, per, samp):
        seen.setdefault(d, set()).add((p, s))
        need[d] = 1 if p < 0 else n * n_samples
    return {d for d, s in seen.items() if len(s) >= need[d]}


def final_table(table: pa.Table) -> pa.Table:
    """Drop duplicates left by interrupted runs; stable order by (doc, rank, sample)."""
    df_keys = list(zip(*(table.column(k).to_pylist() for k in KEY)))
    first: dict = {}
    for i, k in enumerate(df_keys):
        first.setdefault(k, i)
    t = table.take(pa.array(sorted(first.values())))
    return t.sort_by([("doc_id", "ascending"), ("sample_rank", "ascending"), ("sample_idx", "ascending")])


# -------------------------------------------------------------------------------------------
# driver


@dataclass
class RunInfo:
    docs_total: int = 0
    docs_skipped_done: int = 0
    docs_submitted: int = 0
    rows_written: int = 0
    parts_written: int = 0
    wall_s: float = 0.0
    stage_args: dict = field(default_factory=dict)


def init_ray(address: str | None, cfg: NLAConfig):
    import ray

    if ray.is_initialized():
        return ray
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}}
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address or os.environ["RAY_ADDRESS"], runtime_env=env, log_to_driver=True)
    else:
        # A local cluster: declare at least as many logical CPUs as the pools ask for, so three
        # single-CPU actors can coexist on a 2-core laptop (they time-share; torch threads are capped).
        want = sum(p.num_cpus * p.concurrency for p in cfg.pools.values()) + 1
        ray.init(num_cpus=max(os.cpu_count() or 1, int(np.ceil(want))), include_dashboard=False,
                 runtime_env=env, log_to_driver=True)
    return ray


# Config fields that change what a row holds; the rest (n, n_docs, pools' sizes, bootstrap...) only
# change how many rows there are or how fast they come, so finished rows stay valid across them.
ROW_FIELDS = ("pair", "base", "layer", "corpus", "positions_per_doc", "seed", "max_length", "av")
_HASH_LIMIT = 64 << 20  # files above this (27B shards) are identified by name and size only


def _dir_digest(path: str | Path) -> str:
    from .sources import sha256_file  # streamed, and memoised per process by (path, size, mtime)

    h = hashlib.sha256()
    root = Path(path)
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        size = f.stat().st_size
        h.update(f"{f.relative_to(root)}\0{size}\0".encode())
        if size <= _HASH_LIMIT:
            h.update(sha256_file(f).encode())
    return h.hexdigest()


def run_fingerprint(cfg: NLAConfig) -> dict:
    """What the rows of a run depend on: the row-shaping config and the pair's files."""
    from . import pairs

    d = cfg.to_dict()
    fp = {k: d[k] for k in ROW_FIELDS}
    # "auto" resolves to bf16 on a GPU and fp32 on a CPU: record which of the two each pool gets.
    fp["dtypes"] = {name: [pool["dtype"], "gpu" if pool["num_gpus"] else "cpu"] for name, pool in d["pools"].items()}
    dirs = pairs.resolve_pair(cfg.pair)
    fp["pair_files"] = {"av": _dir_digest(dirs.av), "ar": _dir_digest(dirs.ar)}
    return json.loads(json.dumps(fp, default=str))


class RunMismatch(ValueError):
    """The output dir holds rows made with another pair or row-shaping config."""


def _check_resume(rows_dir: Path, fp: dict) -> None:
    f = rows_dir / "RUN.json"
    has_rows = any(rows_dir.glob("part-*.parquet"))
    old = json.loads(f.read_text()) if f.is_file() else None
    if has_rows and old != fp:
        if old is None:
            what = "no RUN.json (rows from an older nla_ray)"
        else:
            changed = sorted(k for k in set(old) | set(fp) if old.get(k) != fp.get(k))
            what = "; ".join(f"{k}: {old.get(k)!r} -> {fp.get(k)!r}"[:200] for k in changed)
        raise RunMismatch(f"{rows_dir} holds rows of a different run ({what}). Rerun with --fresh to discard "
                          "them, or pass another --out.")
    if not has_rows or old is None:
        write_json(f, fp)


def run(cfg: NLAConfig, docs: list, out_dir: Path, *, address: str | None = None, fresh: bool = False,
        log=print) -> RunInfo:
    """Run the three pools over `docs` (Document objects), resuming from `out_dir/rows` when its
    rows were made with the same pair files and row-shaping config (else `RunMismatch`)."""
    rows_dir = out_dir / "rows"
    if fresh and rows_dir.exists():
        for f in [*rows_dir.glob("part-*.parquet"), rows_dir / "RUN.json"]:
            f.unlink(missing_ok=True)
    rows_dir.mkdir(parents=True, exist_ok=True)
    _check_resume(rows_dir, run_fingerprint(cfg))
    info = RunInfo(docs_total=len(docs))
    done = completed_docs(read_parts(rows_dir), cfg.av.n_samples)
    todo = [d for d in docs if d.doc_id not in done]
    info.docs_skipped_done = len(docs) - len(todo)
    info.docs_submitted = len(todo)
    if info.docs_skipped_done:
        log(f"[resume] {info.docs_skipped_done}/{len(docs)} documents already finished in {rows_dir}")
    if not todo:
        return info
    ray = init_ray(address, cfg)
    import ray.data as rd

    ctx = rd.DataContext.get_current()
    ctx.enable_progress_bars = True
    cfgd = cfg.to_dict()
    t0 = time.time()
    ds = rd.from_items([{"doc_id": d.doc_id, "text": d.text} for d in todo],
                       override_num_blocks=max(1, min(len(todo), 4 * cfg.pools["extract"].concurrency * 4)))
    for name, cls in (("extract", ExtractStage), ("av", AVStage), ("ar", ARStage)):
        p = cfg.pools[name]
        kw = dict(fn_constructor_args=(cfgd,), batch_size=p.batch_size, concurrency=p.concurrency,
                  num_cpus=p.num_cpus, batch_format="numpy")
        if p.num_gpus:
            kw["num_gpus"] = p.num_gpus
        info.stage_args[name] = {k: v for k, v in kw.items() if k != "fn_constructor_args"}
        ds = ds.map_batches(cls, **kw)
    expected = len(todo) * cfg.positions_per_doc * max(1, cfg.av.n_samples)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
        n = len(batch["doc_id"])
        if n == 0:
            continue
        pq.write_table(_to_arrow(batch), rows_dir / f"part-{int(time.time() * 1e3):013d}-{uuid.uuid4().hex[:6]}.parquet")
        info.rows_written += n
        info.parts_written += 1
        rate = info.rows_written / max(time.time() - t0, 1e-9)
        log(f"[rows] {info.rows_written}/~{expected} written ({rate:.2f} rows/s, {time.time() - t0:.0f}s)")
    info.wall_s = time.time() - t0
    return info


def stage_timeline(table: pa.Table) -> dict:
    """Per stage: first start, last end, busy seconds, workers; and pairwise overlap of stage windows —
    the evidence that the pools ran concurrently rather than one after another."""
    out = {}
    t_min = None
    for s in ("extract", "av", "ar"):
        if f"{s}_t0" not in table.column_names:
            continue
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
    names = list(out)
    overlap = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            lo, hi = max(out[a]["start"], out[b]["start"]), min(out[a]["end"], out[b]["end"])
            overlap[f"{a}|{b}"] = round(max(0.0, hi - lo), 3)
    return {"stages": out, "overlap_s": overlap}


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)
