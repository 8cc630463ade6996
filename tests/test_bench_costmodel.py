"""jobs/bench.py at CPU test scale (`--tiny`) and the cost model on hand-checkable inputs.

The tiny bench runs every stage of every model for real (small shapes, fp32, CPU) and the test
checks the summary's schema, not its speed. The cost model is pure arithmetic: a synthetic bench
dict with round numbers gives results computed here by hand.
"""

import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch

from nla_ray.perf import bench
from nla_ray.perf import costmodel


# Tiny matmuls on a shared 2-core machine: more threads only add contention.
pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    summary = bench.run(list(bench.MODELS), out, tiny=True, reps=2, warmup=1, sample_temperature=1.0)
    return out, summary


def _positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _check_roofline(r):
    assert set(r) >= {"measured_s", "flops", "bytes", "compute_floor_s", "memory_floor_s", "floor_s", "bound",
                      "fraction"}
    assert r["bound"] in ("compute", "memory")
    assert r["floor_s"] == max(r["compute_floor_s"], r["memory_floor_s"])
    assert _positive(r["fraction"]) and _positive(r["flops"]) and _positive(r["bytes"])


def test_tiny_bench_schema(tiny_run):
    out, summary = tiny_run
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["schema"] == bench.SCHEMA and on_disk["tiny"] is True
    prov = on_disk["provenance"]
    assert {"command", "git_commit", "machine", "date"} <= set(prov)
    assert set(on_disk["models"]) == set(bench.MODELS)
    for name, m in on_disk["models"].items():
        assert m["status"] == "ok", (name, m.get("reason"))
        assert m["preset"] == bench.MODELS[name].preset
        # each model's ceilings are measured in its own run, with its own matmul shapes
        c = m["ceilings"]
        assert _positive(c["copy_bytes_per_s"]) and _positive(c["matmul_flops_per_s"])
        assert len(c["copy"]["reps_s"]) >= 5 and c["copy"]["median_s"] > 0
        assert len(c["matmul"]["shapes"]) == 4
        assert c["matmul_flops_per_s"] == max(x["flops_per_s"] for x in c["matmul"]["shapes"])
        assert m["ceilings_used"]["copy_bytes_per_s"] == c["copy_bytes_per_s"]
        for stage in ("extraction", "ar"):
            r = m[stage]
            assert r["status"] == "ok" and _positive(r["median_s"]) and len(r["reps_s"]) == 2
            assert _positive(r["tokens_per_s"]) and r["layers"] == m["plan"]["layer"] + 1
            _check_roofline(r["roofline"])
        assert _positive(m["extraction"]["activations_per_s"])
        av = m["av"]
        assert av["new_tokens"] == m["plan"]["av_new"]
        runs = {(r["backend"], r["batch"]): r for r in av["runs"] if r["temperature"] == av["temperature"]}
        assert set(runs) == {(b, n) for b in bench.DEFAULT_BACKENDS for n in m["plan"]["av_batches"]}
        for (backend, _), r in runs.items():
            assert r["status"] == "ok", r
            assert _positive(r["median_s"]) and _positive(r["explanations_per_s"])
            assert r["tokens_per_s"] == pytest.approx(r["explanations_per_s"] * av["new_tokens"])
            _check_roofline(r["roofline"])
            if backend == "fast":
                assert r["graphs"] is False  # CPU: the eager step
                assert r["shared_prefix"] == m["plan"]["av_slot"]
                assert _positive(r["prefill_s"]) and _positive(r["decode_s"])
                _check_roofline(r["roofline_decode"])
        assert {s["batch"] for s in av["speedup"]} == set(m["plan"]["av_batches"])
        assert set(av["best"]) == set(bench.DEFAULT_BACKENDS)
        # fp32 on a CPU: the fast path's per-step logits are the plain forward pass's
        chk = av["check"]["backends"]["fast"]
        assert chk["top1_agreement"] == 1.0 and chk["top10_overlap"] == 1.0 and chk["max_err_in_std"] < 1e-3
        # sampling was timed against greedy for the fast backend at every batch
        assert {(x["backend"], x["batch"]) for x in av["sampling"]} == {("fast", n) for n in m["plan"]["av_batches"]}
    table = (out / "table.md").read_text()
    assert "| gemma3-27b |" in table and "roofline" in table
    assert (out / "figure.png").stat().st_size > 0


def test_tiny_bench_merges_into_existing_summary(tiny_run, tmp_path):
    out, first = tiny_run
    again = tmp_path / "merged"
    again.mkdir()
    (again / "summary.json").write_text((out / "summary.json").read_text())
    s = bench.run(["smollm2-135m"], again, tiny=True, reps=1, warmup=0, backends=["fast"], figure=False)
    assert set(s["models"]) == set(bench.MODELS)
    assert s["models"]["gemma3-27b"] == json.loads((out / "summary.json").read_text())["models"]["gemma3-27b"]
    assert [r["backend"] for r in s["models"]["smollm2-135m"]["av"]["runs"]] == ["fast", "fast"]
    assert len(s["runs"]) == 2


def test_real_configs_match_the_releases():
    # Checked against the released config.json files (field names as transformers spells them).
    g = bench.make_config(bench.MODELS["gemma3-27b"])
    assert (g.hidden_size, g.num_hidden_layers, g.num_attention_heads, g.num_key_value_heads, g.head_dim,
            g.intermediate_size, g.vocab_size, g.sliding_window, g.query_pre_attn_scalar) == \
        (5376, 62, 32, 16, 128, 21504, 262208, 1024, 168)
    assert g.layer_types.count("full_attention") == 10 and g.layer_types[5] == "full_attention"
    assert g.layer_types[:5] == ["sliding_attention"] * 5
    q = bench.make_config(bench.MODELS["qwen2.5-7b"])
    assert (q.hidden_size, q.num_hidden_layers, q.num_attention_heads, q.num_key_value_heads,
            q.intermediate_size, q.vocab_size, q.tie_word_embeddings) == (3584, 28, 28, 4, 18944, 152064, False)
    assert set(q.layer_types) == {"full_attention"}
    s = bench.make_config(bench.MODELS["smollm2-135m"])
    assert (s.hidden_size, s.num_hidden_layers, s.num_attention_heads, s.num_key_value_heads,
            s.intermediate_size, s.vocab_size, s.tie_word_embeddings) == (576, 30, 9, 3, 1536, 49152, True)


def test_counts_against_the_model():
    model = bench.build_model(bench.MODELS["gemma3-27b"], device=torch.device("cpu"), dtype=torch.float32,
                              tiny=True)
    c = bench.Counts.of(model)
    assert c.tied and c.total_params == sum(p.numel() for p in model.parameters())
    assert not any(bool((p == 0).all()) for p in model.parameters())  # never time on zeros
    for t in (1, 5, 8, 9, 40):
        for w in (None, 1, 8, 100):
            assert bench.attended_pairs(t, w) == sum(min(i + 1, w or t + 1) for i in range(t))
    # Attention work is additive over a split prompt: a cached prefix + the rest = the whole.
    whole = c.prefill(3, 20, c.n_layers)
    pre, rest = c.prefill(3, 7, c.n_layers), c.prefill(3, 13, c.n_layers, offset=7)
    assert pre["flops"] + rest["flops"] == whole["flops"]
    shared = c.generation(4, 20, 5, shared_prefix=7)["prefill"]["flops"]
    assert shared < c.generation(4, 20, 5)["prefill"]["flops"]
    # A decode step reads every weight once (the tied matrix once, as the LM head).
    step = c.decode_step(1, 0)
    weights = (sum(c.block_params) + c.final_norm_params + c.head_params) * c.elt
    assert weights < step["bytes"] < weights + 10 * c.kv_bytes_per_token() + 10 * c.vocab * c.elt


def test_prompt_token_counts_are_live():
    from transformers import AutoTokenizer

    from nla_ray.nla import sources

    for key, counts in bench.PROMPT_TOKENS.items():
        try:
            path = sources.resolve(counts["counted_with"]).path
        except sources.ModelSourceError as e:
            pytest.skip(f"{counts['counted_with']} unavailable: {e}")
        live = bench.measure_prompt_tokens(AutoTokenizer.from_pretrained(path))
        assert live == {k: counts[k] for k in ("av", "slot", "ar_overhead")}, key


# ---------------------------------------------------------------------------------------------
# cost model


def synthetic_bench():
    """One model; every throughput a round number so the expected costs are hand-computable."""
    return {
        "schema": bench.SCHEMA, "tiny": False, "dtype": "bfloat16", "device": {"name": "Synthetic GPU"},
        "provenance": {"machine": "1x Synthetic GPU", "date": "2026-01-01T00:00:00+00:00", "git_commit": "abc"},
        "models": {
            "m": {
                "checkpoint": "org/m", "arch": {"total_params": 7_000_000_000},
                "plan": {"positions_per_doc": 5},
                "extraction": {"status": "ok", "rows_per_s": 2.0, "tokens_per_s": 20_000.0, "tokens": 10_000},
                "ar": {"status": "ok", "rows_per_s": 100.0, "tokens": 200},
                "av": {"new_tokens": 200,
                       "best": {"fast": {"batch": 64, "explanations_per_s": 10.0, "tokens_per_s": 2_000.0},
                                "hf": {"batch": 32, "explanations_per_s": 2.0, "tokens_per_s": 400.0}}},
            },
            "broken": {"status": "error", "av": {}, "plan": {"positions_per_doc": 5}},
        },
    }


def test_costmodel_by_hand():
    r = costmodel.build(synthetic_bench(), usd_per_gpu_hour=3.0)
    assert "broken" in r["skipped"] and set(r["models"]) == {"m"}
    m = r["models"]["m"]
    pa = m["per_activation"]
    assert pa["av_s"] == pytest.approx(0.1)             # 1 / 10 explanations per s
    assert pa["ar_s"] == pytest.approx(0.01)            # 1 / 100 rows per s
    assert pa["extraction_recompute_s"] == pytest.approx(0.1)  # 1 / (2 docs/s x 5 positions)
    assert pa["explanations_per_gpu_s_hooked"] == pytest.approx(1 / 0.11)
    assert sum(pa["share"].values()) == pytest.approx(1.0)
    pm = m["per_million_activations"]
    assert pm["hooked"]["gpu_hours"] == pytest.approx(1e6 * 0.11 / 3600)
    assert pm["hooked"]["usd"] == pytest.approx(1e6 * 0.11 / 3600 * 3.0)
    assert pm["recompute"]["usd"] == pytest.approx(1e6 * 0.21 / 3600 * 3.0)
    by = {(f["tokens_per_s"], f["every_k"]): f for f in m["fleet"]}
    assert set(by) == {(t, k) for t in costmodel.RATES for k in costmodel.KS}
    f = by[(1e5, 10)]
    assert f["activations_per_s"] == pytest.approx(1e4)
    assert f["gpus_hooked"] == pytest.approx(1e4 * 0.11)                  # 1100 GPUs
    assert f["gpus_recompute"] == pytest.approx(1e4 * 0.11 + 1e5 / 20_000)  # + 5 extraction GPUs
    assert f["gpus_hooked_ceil"] == 1100
    assert f["serving_gpus"] == pytest.approx(1e5 / 2_000)
    assert f["overhead_hooked"] == pytest.approx(1100 / 50)
    # The overhead ratio does not depend on the service's rate.
    assert by[(1e3, 10)]["overhead_hooked"] == pytest.approx(f["overhead_hooked"])
    hf = costmodel.build(synthetic_bench(), av_backend="hf")["models"]["m"]["per_activation"]
    assert hf["av_s"] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        costmodel.build(synthetic_bench(), usd_per_gpu_hour=0)


def test_costmodel_job_on_tiny_bench(tiny_run, tmp_path):
    out, _ = tiny_run
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "jobs" / "cost_model.py"
    spec = importlib.util.spec_from_file_location("cost_model_job", path)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    rc = job.JOB.entry(["--bench", str(out / "summary.json"), "--out", str(tmp_path), "--usd-per-gpu-hour", "2.5",
                        "--n", "2000"])
    assert rc == 0
    rep = json.loads((tmp_path / "summary.json").read_text())
    # The job contract's keys on top of the cost model's own: the preset's model is the headline,
    # and --n is priced with it.
    assert rep["job"] == "cost_model" and rep["config"]["name"] == "mini"
    h = rep["headline"]
    assert h["model"] == "smollm2-135m" and h["for_n"]["n"] == 2000
    per = rep["models"]["smollm2-135m"]["per_activation"]["total_recompute_s"]
    assert h["for_n"]["gpu_hours_recompute"] == pytest.approx(per * 2000 / 3600)
    assert h["for_n"]["usd_recompute"] == pytest.approx(per * 2000 / 3600 * 2.5)
    # Contract arguments that mean nothing here are refused, naming why, and nothing is written.
    assert job.JOB.entry(["--bench", str(out / "summary.json"), "--out", str(tmp_path / "x"), "--fresh"]) == 2
    assert not (tmp_path / "x").exists()
    assert job.JOB.entry(["--bench", str(tmp_path / "nope.json"), "--out", str(tmp_path / "y")]) == 2
    assert rep["bench"]["sha256"] == costmodel.file_digest(out / "summary.json")
    assert rep["provenance"]["bench_sha256"] == rep["bench"]["sha256"]
    assert rep["parameters"]["usd_per_gpu_hour"] == 2.5
    assert set(rep["models"]) == set(bench.MODELS)
    table = (tmp_path / "table.md").read_text()
    assert "$2.5 per GPU-hour" in table and "T = 1e+07 tok/s" in table
    assert (tmp_path / "figure.png").stat().st_size > 0


def test_merge_takes_each_model_from_the_named_run(tiny_run, tmp_path):
    out, first = tiny_run
    second = tmp_path / "second"
    s2 = bench.run(["smollm2-135m"], second, tiny=True, reps=1, warmup=0, backends=["fast"], figure=False)
    merged = bench.merge([(out / "summary.json", ["gemma3-27b"]), (second / "summary.json", ["smollm2-135m"])],
                         tmp_path / "merged", figure=False)
    assert set(merged["models"]) == {"gemma3-27b", "smollm2-135m"}
    assert merged["models"]["smollm2-135m"] == s2["models"]["smollm2-135m"]  # taken as measured
    assert merged["models"]["gemma3-27b"]["av"] == first["models"]["gemma3-27b"]["av"]
    assert merged["models"]["smollm2-135m"]["measured_by"]["date"] == s2["provenance"]["date"]
    assert [m["models"] for m in merged["merged_from"]] == [["gemma3-27b"], ["smollm2-135m"]]
    md = (tmp_path / "merged" / "table.md").read_text()
    assert "Merged by" in md and "nothing re-measured" in md
    with pytest.raises(ValueError, match="no model"):
        bench.merge([(second / "summary.json", ["qwen2.5-7b"])], tmp_path / "bad", figure=False)


def test_bench_job_preset_picks_its_architecture(tmp_path):
    """Through the job contract: --preset mini-gemma benches only the Gemma-3-270M architecture."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "jobs" / "bench.py"
    spec = importlib.util.spec_from_file_location("bench_job", path)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    rc = job.JOB.entry(["--preset", "mini-gemma", "--tiny", "--reps", "1", "--warmup", "0", "--backends", "fast",
                        "--out", str(tmp_path)])
    assert rc == 0
    s = json.loads((tmp_path / "summary.json").read_text())
    assert list(s["models"]) == ["gemma3-270m"] and s["headline"]["models"] == {"gemma3-270m": "ok"}
    assert s["job"] == "bench" and s["config"]["name"] == "mini-gemma" and s["schema"] == bench.SCHEMA
    assert "## Provenance" in (tmp_path / "table.md").read_text()
    assert job.JOB.entry(["--preset", "mini", "--tiny", "--n", "3", "--out", str(tmp_path / "x")]) == 2


def test_compare_logits_and_kernel_kinds():
    """The logits check's numbers on hand-made rows, and the profile's kernel families by name."""
    ref = torch.tensor([[[5.0, 4.0, 3.0, 2.0, 1.0, 0.0]]], dtype=torch.float64)  # [B=1, S=1, V=6]
    same = bench.compare_logits(ref.clone(), ref, k=3)
    assert same["top1_agreement"] == 1.0 and same["top3_overlap"] == 1.0 and same["max_err_in_std"] == 0.0
    swapped = ref.clone()
    swapped[..., 0], swapped[..., 1] = 4.0, 5.0       # top-1 flips, the top-3 set is the same
    r = bench.compare_logits(swapped, ref, k=3)
    assert r["top1_agreement"] == 0.0 and r["top3_overlap"] == 1.0
    assert r["max_err_in_std"] == pytest.approx(1.0 / float(ref.std()))
    low = ref.clone()
    low[..., 2] = -9.0                                  # one of the reference's top 3 leaves the top 3
    assert bench.compare_logits(low, ref, k=3)["top3_overlap"] == pytest.approx(2 / 3)
    assert bench.kernel_kind("void pytorch_flash::flash_fwd_kernel<...>") == "attention"
    assert bench.kernel_kind("_decode_attention_split") == "attention"  # nla_ray/nla/decode_kernel.py
    assert bench.kernel_kind("some_kernel") == "other"
    assert bench.kernel_kind("nvjet_sm90_tst_168x128_64x5_1x2_h_bz_TNN") == "matmul"
    assert bench.kernel_kind("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0") == "fused (compiled)"
    assert bench.kernel_kind("void at::native::index_elementwise_kernel<128, 4, index_copy>") == "copy / index"
