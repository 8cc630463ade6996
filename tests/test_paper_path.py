"""The paper path on stand-ins (issue #13, part 3): the paper-* presets end to end on a CPU.

Tiny random checkpoints in the released layouts (nla_ray/standins.py) sit in a Hugging Face cache
under the presets' own hub ids, at the release's depth, so `paper-gemma27b-L41` and
`paper-qwen7b-L20` run with their pair, base, layer and partner untouched; only the corpus (a local
Ultra-FineWeb-layout parquet), the pools (CPU) and the decode length are set. reproduce_fve runs on
each family and cross_family between them, through the jobs' normal entry points, on one local Ray.
"""

from __future__ import annotations

import json
import math

import pyarrow.parquet as pq
import pytest
import yaml

from nla_ray import standins

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("torch_single_thread")]

N = 10  # activations per run: 2 documents x 5 positions


@pytest.fixture(scope="module")
def world(tmp_path_factory, gemma_tok, smollm_tok):
    import huggingface_hub.constants as C

    tmp = tmp_path_factory.mktemp("paper_path")
    w = standins.build_world(tmp / "world", gemma_tok=gemma_tok, qwen_tok=standins.qwen_tokenizer(smollm_tok))
    cache = str(w["gemma"].hub_cache)
    with pytest.MonkeyPatch.context() as mp:  # this process and the Ray workers it starts
        mp.setenv("HF_HUB_CACHE", cache)
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(C, "HF_HUB_CACHE", cache)
        mp.setattr(C, "HF_HUB_OFFLINE", True)
        yield tmp, w


@pytest.fixture(scope="module")
def runs(world, load_job):
    """reproduce_fve on each family, then cross_family (Gemma as A), sharing one store and one Ray."""
    import ray

    tmp, w = world
    out, codes = {}, {}
    try:
        for job, fam in (("reproduce_fve", "gemma"), ("reproduce_fve", "qwen"), ("cross_family", "gemma")):
            key = f"{job}:{fam}"
            out[key] = tmp / "out" / job / fam
            argv = standins.job_argv(w, fam, job, out=out[key], store=tmp / "store", n=N)
            codes[key] = load_job(job).JOB.entry(argv)
    finally:
        ray.shutdown()
    return tmp, w, out, codes


def test_standins_hold_the_released_layouts(world):
    from nla_ray.nla import sources
    from nla_ray.nla.sidecar import SIDECAR_NAME, read_sidecar

    _, w = world
    wrapper, text, qwen = ["Gemma3ForConditionalGeneration"], ["Gemma3ForCausalLM"], ["Qwen2ForCausalLM"]
    want = {("gemma", "base"): (wrapper, 62), ("gemma", "av"): (wrapper, 62), ("gemma", "ar"): (text, 42),
            ("qwen", "base"): (qwen, 28), ("qwen", "av"): (qwen, 28), ("qwen", "ar"): (qwen, 21)}
    for (fam, role), (arch, blocks) in want.items():
        s = w[fam]
        lay = standins.role_layout(getattr(s, role))
        assert (lay["architectures"], lay["num_hidden_layers"], lay["hidden_size"]) == (arch, blocks, 64)
        assert len(lay["shards"]) == 2 and lay["index"] and lay["value_head"] == (role == "ar")
        # the hub id the preset names resolves, offline, to this very snapshot
        assert sources.resolve(s.released[role]).path == str(getattr(s, role))
        if role == "base":
            continue
        raw = yaml.safe_load((getattr(s, role) / SIDECAR_NAME).read_text())
        assert raw["kind"] == "nla_model" and raw["schema_version"] == 2 and raw["role"] == role
        assert raw["d_model"] == 64 and raw["extraction"]["mse_scale"] == "sqrt_d_model"
        assert set(raw["extraction"]) == {"injection_scale", "mse_scale"}
        assert (raw["extraction"]["injection_scale"] is None) == (role == "ar")
        assert set(raw["tokens"]) == {"injection_char", "injection_token_id", "injection_left_neighbor_id",
                                      "injection_right_neighbor_id", "critic_suffix_ids"}
        assert set(raw["prompt_templates"]) == {"av", "ar"}
        assert raw["critic"]["extraction_layer_index"] == s.released["layer"]
        meta = read_sidecar(getattr(s, role))
        assert meta.layer == s.layer == s.released["layer"] and meta.mse_scale == 8.0
    # Gemma-3's release character, from the live tokenizer; Qwen's is not one token in SmolLM2's BPE
    g = read_sidecar(w["gemma"].av)
    assert (g.injection_char, g.injection_token_id) == ("\u321c", 246566)
    assert all(w[f].overrides() == [] for f in ("gemma", "qwen"))
    assert pq.read_table(next(w["corpus"].glob("*.parquet"))).column_names == ["content", "score", "source"]


def test_reproduce_fve_runs_the_paper_presets(runs):
    _, w, out, codes = runs
    for fam in ("gemma", "qwen"):
        key = f"reproduce_fve:{fam}"
        assert codes[key] == 0, key
        s = json.loads((out[key] / "summary.json").read_text())
        assert {"job", "config", "headline", "run", "provenance", "documents", "timeline"} <= set(s)
        rel = w[fam].released
        assert s["config"]["name"] == rel["preset"] and s["config"]["layer"] == rel["layer"]
        assert s["config"]["pair"] == f"{rel['av']},{rel['ar']}" and s["config"]["base"] == rel["base"]
        h = s["headline"]
        assert (h["n"], h["n_docs"]) == (N, math.ceil(N / 5))
        assert sum(h["status_counts"].values()) == N and h["fve_train"]["var"] == s["config"]["var_train"]
        stages = s["run"]["arms"]["main"]["stages"]
        assert [st["name"] for st in stages] == ["extract", "av", "ar"]
        assert all(st["num_gpus"] == 0 and st["dtype"] == "bfloat16" for st in stages)
        assert s["run"]["arms"]["main"]["rows_failed"] == 0
        rows = pq.read_table(out[key] / "rows.parquet")
        assert rows.num_rows == N and set(rows.column("layer").to_pylist()) == {rel["layer"]}
        assert {len(v) for v in rows.column("vector").to_pylist()} == {64}
        assert {len(v) for v in rows.column("recon").to_pylist()} == {64}
        assert all(d.startswith("openbmb/Ultra-FineWeb:en:10000") for d in rows.column("doc_id").to_pylist())
        assert min(rows.column("position").to_pylist()) >= 50 and max(rows.column("n_gen_tokens").to_pylist()) <= 8


def test_gemma_extraction_read_the_text_decoder_inside_the_wrapper(runs, gemma_tok):
    """The job's stored L41 vectors are hidden_states[42] of the multimodal wrapper's text decoder."""
    _, w, out, _ = runs
    rows = pq.read_table(out["reproduce_fve:gemma"] / "rows.parquet")
    g = standins.wrapper_extraction_check(w["gemma"], rows, tokenizer=gemma_tok)
    assert g["class"] == "Gemma3ForConditionalGeneration"
    assert g["decoder"].startswith("model.language_model (Gemma3TextModel, 62 blocks")
    assert g["rows_checked"] == N and g["min_cos"] > 0.999 and g["max_rel_err"] < 0.02, g


def test_cross_family_between_the_stand_ins(runs):
    tmp, w, out, codes = runs
    key = "cross_family:gemma"
    assert codes[key] == 0
    s = json.loads((out[key] / "summary.json").read_text())
    h = s["headline"]
    assert sorted(s["cells"]) == ["aa", "ab", "ba", "bb"] and set(h["fve"]) == {"aa", "ab", "ba", "bb"}
    assert [h["families"][f]["preset"] for f in "ab"] == ["paper-gemma27b-L41", "paper-qwen7b-L20"]
    assert [h["families"][f]["layer"] for f in "ab"] == [41, 20]
    assert h["families"]["b"]["pair"] == "kitft/nla-qwen2.5-7b-L20-av,kitft/nla-qwen2.5-7b-L20-ar"
    assert h["alignment"]["positions"] == N and h["alignment"]["aligned"] >= N - 1
    assert set(s["timeline"]["stages"]) == {"av_a", "av_b", "ar_a", "ar_b"}
    stages = s["run"]["arms"]["main"]["stages"]
    assert all(st["num_gpus"] == 0 for st in stages)
    rows = pq.read_table(out[key] / "rows.parquet")
    assert rows.num_rows == h["alignment"]["aligned"]
    assert {len(v) for v in rows.column("b_vector").to_pylist()} == {64}
    # Gemma's activations came from reproduce_fve's store entry; Qwen's were read again, aligned.
    entries = {p.parent.parent.name for p in (tmp / "store").rglob("RUN.json")}
    assert entries == {"google_gemma-3-27b-it", "Qwen_Qwen2.5-7B-Instruct"}
    assert len(list((tmp / "store" / "google_gemma-3-27b-it").glob("*/RUN.json"))) == 1
    assert len(list((tmp / "store" / "Qwen_Qwen2.5-7B-Instruct").glob("*/RUN.json"))) == 2


def test_gemma_av_decodes_through_the_wrapper_on_every_backend(world):
    """The AV loads as Gemma3ForConditionalGeneration and injects through its own (sqrt(d)-scaled)
    embedding; the presets' decode (fused: the eager fast path on a CPU), the loop and transformers'
    generate (through the text LM over the wrapper's weights) write the same greedy tokens."""
    _, w = world
    c = standins.av_backend_check(w["gemma"])
    assert c["model"] == "Gemma3ForConditionalGeneration" and c["embedding"] == "Gemma3TextScaledWordEmbedding"
    assert c["injection_token_id"] == 246566 and c["slots"] == 1
    assert c["backends_agree"], c["texts"]
