"""Placement and memory that fit the named machines (issue #13, part 4).

Pure checks of nla_ray.runtime.placement against hand-computed numbers (weights, KV cache, activations;
Ray's per-GPU packing), the paper presets' layouts on their 2xH200 machine, the pipeline's [pools] and
[memory] checks, the generated statement in results/reliability/, and one Ray run on a local head that
declares 2 GPUs: every pool's actor is placed at once with the paper-gemma27b-L41 shares.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from nla_ray.config import MachineConfig, PoolConfig, load_config
from nla_ray.runtime import pipeline
from nla_ray.runtime import placement as P
from nla_ray.runtime.stages import Stage, StageSpec

REPO = Path(__file__).resolve().parent.parent
H200 = dict(gpus=2, card_gb=141.0)
OLD_GEMMA = ["pools.extract.num_gpus=1", "pools.av.num_gpus=1", "pools.ar.num_gpus=0.5"]


# ---------------------------------------------------------------------------------------------
# memory, by hand


def test_block_and_model_parameters_by_hand():
    toy = P.ModelShape("toy", hidden=8, layers=4, heads=2, kv_heads=1, head_dim=4, intermediate=16, vocab=100, tied=True)
    # q 8x8, k and v 8x4 each, o 8x8 = 192; MLP 3 x 8 x 16 = 384; norms 4 x 8 + 2 x 4 = 40
    assert toy.block_params() == 192 + 384 + 40
    assert toy.total_params() == 100 * 8 + 4 * 616 + 8
    assert toy.kv_bytes_per_token(2) == 4 * 2 * 1 * 4 * 2
    g = P.KNOWN_SHAPES["google/gemma-3-27b-it"]
    # 5376 x (4096 + 2 x 2048) + 4096 x 5376 + 3 x 5376 x 21504 + 4 x 5376 + 2 x 128
    assert g.block_params() == 44_040_192 + 22_020_096 + 346_816_512 + 21_504 + 256 == 412_898_560
    text = g.total_params() - g.extra_params
    assert text == 262_208 * 5376 + 62 * 412_898_560 + 5376
    # the published sizes: Gemma-3-27B (with its vision tower) 27.43B, Qwen2.5-7B 7.62B
    assert abs(g.total_params() / 27.432e9 - 1) < 0.005
    q = P.KNOWN_SHAPES["Qwen/Qwen2.5-7B-Instruct"]
    assert abs(q.total_params() / 7.6156e9 - 1) < 0.002
    assert q.kv_bytes_per_token(2) == 28 * 2 * 4 * 128 * 2 == 57_344


def test_pool_needs_of_the_gemma_preset_by_hand():
    cfg = load_config("paper-gemma27b-L41")
    ext, av, ar = P.config_needs(cfg, P.KNOWN_SHAPES[cfg.base])
    gb = 1e9
    block, embed = 412_898_560, 262_208 * 5376
    # extraction: embedding + 42 blocks + the vision tower, bf16
    assert ext.weights_gb == pytest.approx((embed + 42 * block + 420_000_000) * 2 / gb)
    # 43 hidden states x 16,384 tokens x 5376 + one block's working set (q,k,v 8192 + 4 x 5376 + 3 x 21504
    # per token) + two bool masks of 16,384 x 4096 + one fp32 layer out
    assert ext.act_gb == pytest.approx((43 * 16384 * 5376 * 2 + 16384 * 94_208 * 2 + 2 * 16384 * 4096
                                        + 16384 * 5376 * 4) / gb)
    assert ext.kv_gb == 0 and ext.total_gb == pytest.approx(51.49, abs=0.01)
    # AV: the whole model, KV of 128 rows x (108 + 200) tokens x 62 layers x K,V x 16 heads x 128 x 2 B
    assert av.weights_gb == pytest.approx(P.KNOWN_SHAPES[cfg.base].total_params() * 2 / gb)
    assert av.kv_gb == pytest.approx(128 * 308 * 507_904 / gb) and av.kv_gb == pytest.approx(20.02, abs=0.01)
    assert av.total_gb == pytest.approx(79.97, abs=0.01)
    # AR: 42 blocks, no vision tower, + the fp32 value head; 64 x (15 + 200) tokens
    assert ar.weights_gb == pytest.approx(((embed + 42 * block) * 2 + 5376 * 5376 * 4) / gb)
    assert ar.act_gb == pytest.approx((64 * 215 * 94_208 * 2 + 2 * 64 * 215 * 215) / gb)
    assert ar.total_gb == pytest.approx(42.22, abs=0.01)


def test_the_copied_numbers_match_their_sources():
    """KNOWN_SHAPES copies the bench's architectures and prompt counts; the extraction token budget is
    Extractor's default."""
    from nla_ray.nla.extract import Extractor
    from nla_ray.perf import bench

    for hub, key in (("google/gemma-3-27b-it", "gemma3-27b"), ("Qwen/Qwen2.5-7B-Instruct", "qwen2.5-7b")):
        s, m = P.KNOWN_SHAPES[hub], bench.MODELS[key]
        f = m.fields
        assert m.checkpoint == hub
        assert (s.hidden, s.layers, s.heads, s.kv_heads, s.intermediate, s.vocab, s.tied) == (
            f["hidden_size"], f["num_hidden_layers"], f["num_attention_heads"], f["num_key_value_heads"],
            f["intermediate_size"], f["vocab_size"], f["tie_word_embeddings"])
        assert s.head_dim == f.get("head_dim", f["hidden_size"] // f["num_attention_heads"])
        counts = bench.PROMPT_TOKENS[m.prompt]
        assert (s.av_prompt_tokens, s.ar_overhead_tokens) == (counts["av"], counts["ar_overhead"])
    assert inspect.signature(Extractor.__init__).parameters["batch_tokens"].default == P.EXTRACT_BATCH_TOKENS


def test_dtype_and_sampling_change_the_need():
    s = P.KNOWN_SHAPES["Qwen/Qwen2.5-7B-Instruct"]
    a = P.av_need(s, batch_size=4, max_new_tokens=10, dtype="bfloat16")
    b = P.av_need(s, batch_size=4, max_new_tokens=10, dtype="float32")
    assert b.weights_gb == pytest.approx(2 * a.weights_gb) and b.kv_gb == pytest.approx(2 * a.kv_gb)
    c = P.av_need(s, batch_size=4, max_new_tokens=10, n_samples=3, dtype="bfloat16", sampling=True)
    assert c.kv_gb == pytest.approx(3 * a.kv_gb)  # each row repeated once per sample before decoding
    assert c.act_gb > a.act_gb
    with pytest.raises(ValueError, match="dtype 'int4'"):
        P.dtype_bytes("int4")


# ---------------------------------------------------------------------------------------------
# packing, by hand


def _place(spec, nodes=(P.Node(2),)):
    return P.place(P.actors_of(spec), list(nodes))


def test_packing_is_per_gpu_not_a_sum():
    # three 0.6-GPU actors sum to 1.8 <= 2 GPUs, but no GPU holds two of them
    r = _place([("a", 0.6, 1, 1), ("b", 0.6, 1, 1), ("c", 0.6, 1, 1)])
    assert r.verdict == "never" and r.asked["GPU"] == 1.8 and not r.complete
    assert r.stuck and len(r.stuck[0]["waiting"]) == 1
    # the former Gemma layout, 1 + 1 + 0.5 on two GPUs: the AR waits for a whole GPU's actor to leave
    r = _place([("extract", 1, 2, 1), ("av", 1, 2, 1), ("ar", 0.5, 2, 1)])
    assert r.verdict == "never"
    assert {"packing": ((("av",), ("extract",)),), "waiting": ["ar"]} in r.stuck
    # shares that add up exactly: only the orders that pair them right place everyone
    r = _place([("a", 0.5, 1, 1), ("b", 0.3, 1, 1), ("c", 0.3, 1, 1), ("d", 0.5, 1, 1), ("e", 0.4, 1, 1)])
    assert r.verdict == "sometimes" and r.complete and r.stuck


def test_packing_follows_rays_rules():
    assert _place([("av", 1.5, 1, 1)]).verdict == "cannot"  # Ray refuses fractional requests above 1
    assert "fractional requests above 1" in _place([("av", 1.5, 1, 1)]).cannot[0]
    r = _place([("av", 2, 1, 1)], [P.Node(1)])
    assert r.verdict == "cannot" and r.cannot == ["one av actor asks for 2 GPU, the largest node has 1"]
    assert _place([("av", 0, 4, 1)], [P.Node(0, 2)]).cannot == ["one av actor asks for 4 CPU, the largest node has 2"]
    # a whole-GPU request takes untouched GPUs: 0.5 first on a 2-GPU node leaves one whole GPU
    assert _place([("x", 0.5, 0, 1), ("y", 1, 0, 1)]).verdict == "always"
    # best fit puts a second 0.5 beside the first (least share left over), so a whole GPU stays free
    assert _place([("x", 0.5, 0, 2), ("y", 1, 0, 1)]).verdict == "always"
    # CPUs per node count too: two 3-CPU actors on 4-CPU nodes need two nodes
    assert _place([("a", 0, 3, 2)], [P.Node(0, 4)]).verdict == "never"
    assert _place([("a", 0, 3, 2)], [P.Node(0, 4), P.Node(0, 4)]).verdict == "always"
    # best fit: a 0.3 actor joins the fuller GPU, so a later 0.9 still finds an empty one (were it put on
    # the empty GPU, the 0.9 would wait)
    assert _place([("a", 0.6, 0, 1), ("b", 0.3, 0, 1), ("c", 0.9, 0, 1)]).verdict == "always"


def test_the_heaviest_set_that_may_share_a_card():
    actors = P.actors_of([("extract", 0.45, 2, 1, 51.5), ("av", 0.6, 2, 1, 80.0), ("ar", 0.35, 2, 1, 42.2)])
    w = P.worst_shared_gpu(actors)
    assert w == {"pools": ["av", "ar"], "share": 0.95, "mem_gb": 122.2}
    assert P.neighbours(actors, "extract") == {"pools": ["ar"], "share": 0.35, "mem_gb": 42.2}
    old = P.actors_of([("extract", 1, 2, 1, 51.5), ("av", 1, 2, 1, 80.0), ("ar", 0.5, 2, 1, 42.2)])
    assert P.worst_shared_gpu(old)["pools"] == ["av"] and P.neighbours(old, "av")["pools"] == []
    # two 0.5 actors of one pool may meet on one card
    assert P.worst_shared_gpu(P.actors_of([("av", 0.5, 1, 2, 70.0)]))["mem_gb"] == 140.0


# ---------------------------------------------------------------------------------------------
# the paper presets on their machine


@pytest.mark.parametrize("preset", ["paper-gemma27b-L41", "paper-qwen7b-L20"])
def test_paper_layouts_run_all_pools_at_once_and_fit(preset):
    cfg = load_config(preset)
    assert cfg.machine == MachineConfig(gpus=2, gpu_memory_gb=141.0, name="2xH200")
    partner = load_config(cfg.partner)
    st = P.preset_statement(cfg, partner)
    layouts = [st["pipeline"], st["cross_family"]["side_by_side"], *st["cross_family"]["extraction"]]
    for lay in layouts:
        assert lay["all_at_once"] == "always" and not lay["stuck"] and lay["fits"], lay
        for p in lay["pools"]:
            # the layout rule: every share covers its need, so any set Ray may co-locate fits the card
            assert p["num_gpus"] * 141 >= p["total_gb"], p
            assert p["fits"] and p["total_gb"] + p["neighbours"]["mem_gb"] <= 141
    assert st["pipeline"]["worst_shared_gpu"]["mem_gb"] <= 141


def test_the_former_gemma_layout_is_reported_as_not_placeable_at_once():
    cfg = load_config("paper-gemma27b-L41", overrides=OLD_GEMMA)
    st = P.preset_statement(cfg)
    assert st["pipeline"]["all_at_once"] == "never" and st["pipeline"]["asked"]["GPU"] == 2.5
    verdict, msg = pipeline.layout_check(_specs(cfg), {"GPU": 2.0, "CPU": 32.0}, [{"GPU": 2.0, "CPU": 32.0}])
    assert verdict == "in_turns" and "cannot all run at once" in msg and "2.5 GPUs" in msg
    # the new one, on the same cluster
    verdict, msg = pipeline.layout_check(_specs(load_config("paper-gemma27b-L41")), {"GPU": 2.0, "CPU": 32.0})
    assert verdict == "ok" and "every order" in msg and "1.4 GPUs, 6 CPUs" in msg


def test_machine_field_is_checked():
    for bad, match in ((["machine.gpus=0", "machine.gpu_memory_gb=80"], r"machine\.gpus: expected a whole number"),
                       (["machine.gpus=2", "machine.gpu_memory_gb=0"], r"machine\.gpu_memory_gb: expected the memory"),
                       (["machine.gpus=2"], "gpu_memory_gb missing"),
                       (["machine=8"], "expected a mapping"),
                       (["machine.gpus=2", "machine.gpu_memory_gb=80", "machine.vram=1"], r"unknown field\(s\) \['vram'\]"),
                       (["machine.gpus=1.5", "machine.gpu_memory_gb=80"], "machine.gpus: expected a int")):
        with pytest.raises(ValueError, match=match):
            load_config("mini", overrides=bad)
    assert load_config("paper-qwen7b-L20", overrides=["machine=null"]).machine is None
    assert load_config("paper-qwen7b-L20", overrides=["machine.gpus=8"]).machine.gpus == 8


# ---------------------------------------------------------------------------------------------
# the pipeline's checks


class _Noop(Stage):
    def process(self, batch):
        return batch


def _specs(cfg) -> list[StageSpec]:
    return [StageSpec(_Noop, name, cfg.pools[name]) for name in ("extract", "av", "ar")]


def test_layout_check_packs_per_node():
    def spec(name, g, n=1):
        return StageSpec(_Noop, name, PoolConfig(num_gpus=g, num_cpus=1, concurrency=n))

    three = [spec("a", 0.6), spec("b", 0.6), spec("c", 0.6)]
    verdict, msg = pipeline.layout_check(three, {"GPU": 2.0, "CPU": 8.0})
    assert verdict == "in_turns" and "1.8 GPUs" in msg and "no packing holds them all" in msg
    assert pipeline.layout_check(three, {"GPU": 3.0, "CPU": 8.0})[0] == "ok"
    # two 1-GPU nodes: a 2-GPU actor fits on neither, although the cluster has 2 GPUs
    nodes = [{"GPU": 1.0, "CPU": 4.0}, {"GPU": 1.0, "CPU": 4.0}]
    verdict, msg = pipeline.layout_check([spec("av", 2)], {"GPU": 2.0, "CPU": 8.0}, nodes)
    assert verdict == "cannot" and "largest node has 1" in msg and "on 2 nodes (1 GPU/4 CPU, 1 GPU/4 CPU)" in msg
    five = [spec("a", 0.5), spec("b", 0.3), spec("c", 0.3), spec("d", 0.5), spec("e", 0.4)]
    verdict, msg = pipeline.layout_check(five, {"GPU": 2.0, "CPU": 8.0})
    assert verdict == "in_turns" and "only some orders" in msg and "cannot be placed" in msg


def test_memory_check_lines_and_refusal(tiny_families):
    """[memory] per pool against the named card, from the checkpoints the pools load; a card too small
    for a set Ray may co-locate is refused naming the pools, their GB and the card."""
    from nla_ray.nla import pairs
    from nla_ray.runtime.stages import ar_spec, av_spec, extract_spec

    _, preset = tiny_families
    cfg = load_config(str(preset), overrides=["pools.extract.num_gpus=0.45", "pools.av.num_gpus=0.6",
                                              "pools.ar.num_gpus=0.35", "pools.extract.dtype=bfloat16"])
    dirs = pairs.resolve_pair(cfg.pair)
    stages = [extract_spec(cfg, layers=cfg.extract_layers), av_spec(cfg, dirs.av), ar_spec(cfg, dirs.ar)]
    pipeline.preflight(stages)
    logs: list[str] = []
    needs = pipeline.memory_check(stages, MachineConfig(gpus=2, gpu_memory_gb=141, name="2xH200"), log=logs.append)
    assert [n.pool for n in needs] == ["extract", "av", "ar"] and len(logs) == 3
    assert all(m.startswith("[memory] ") and "141 GB card" in m and m.endswith(": fits") for m in logs)
    assert "av (1 x 0.6 GPU" in logs[1] and "with ar (" in logs[1]
    # the tiny AV's prompt was counted from its own template and tokenizer
    assert f"({pipeline._PROMPT_TOKENS[str(dirs.av)]} prompt + 6 new)" in needs[1].notes["kv_cache"]
    # a 2.5 GB card: the runtime alone (2 GB per actor) leaves no room for two actors on one card
    with pytest.raises(ValueError, match=r"\[memory\] the pools do not fit the tiny machine's 2.5 GB GPUs: Ray may "
                                         r"put av \+ ar on one GPU \(their num_gpus sum to 0\.95 <= 1\), ~4\.\d GB > 2\.5 GB"):
        pipeline.memory_check(stages, {"gpus": 2, "gpu_memory_gb": 2.5, "name": "tiny"}, log=logs.append)
    # CPU pools say so and need no config
    cpu = [extract_spec(load_config(str(preset)), layers=[1])]
    out: list[str] = []
    assert pipeline.memory_check(cpu, {"gpus": 1, "gpu_memory_gb": 80}, log=out.append) == []
    assert out == ["[memory] extract: on CPUs (num_gpus 0), no GPU memory on the 1 GPU machine"]


def test_alive_together_from_the_stamps():
    t = pa.table({"a_worker": ["h:1", "h:1"], "a_tinit": [0.0, 0.0], "a_t1": [5.0, 9.0],
                  "b_worker": ["h:2", "h:2"], "b_tinit": [3.0, 3.0], "b_t1": [12.0, 12.0]})
    got = pipeline.alive_together(t)
    assert got["at"] == 3.0 and got["seconds"] == 6.0 and got["placed"] == {"a": [0.0], "b": [3.0]}
    # b placed only after a's last batch ended: never together
    t2 = t.set_column(t.column_names.index("b_tinit"), "b_tinit", pa.array([10.0, 10.0]))
    assert pipeline.alive_together(t2)["at"] is None


# ---------------------------------------------------------------------------------------------
# the generated statement


def test_placement_command_writes_the_statement(tmp_path, capsys):
    from nla_ray.cli import main

    out = tmp_path / "placement"
    assert main(["placement", "--preset", "paper-gemma27b-L41", "--preset", "paper-qwen7b-L20", "--out", str(out)]) == 0
    md = (tmp_path / "placement.md").read_text()
    assert md.splitlines()[2] == (f"`python -m nla_ray placement --preset paper-gemma27b-L41 --preset "
                                  f"paper-qwen7b-L20 --out {out}`")
    assert "## paper-gemma27b-L41 on 2xH200" in md and "## paper-qwen7b-L20 on 2xH200" in md
    assert md.count("All at once: **always**") == 3 and "**80.0**" in md
    data = json.loads((tmp_path / "placement.json").read_text())
    assert [s["preset"] for s in data["statements"]] == ["paper-gemma27b-L41", "paper-qwen7b-L20"]
    assert data["provenance"]["command"].startswith("python -m nla_ray placement")
    # a layout that cannot run all pools at once: the same table, exit 3
    assert main(["placement", "--preset", "paper-gemma27b-L41", "--no-cross", *sum((["--set", s] for s in OLD_GEMMA), [])]) == 3
    assert "All at once: **never**" in capsys.readouterr().out
    assert main(["placement", "--preset", "mini"]) == 2  # no machine named: one line


def test_committed_statement_matches_the_code():
    """results/reliability/placement.json is what the code computes now (regenerate with the command
    at the top of placement.md when the presets or the model change)."""
    data = json.loads((REPO / "results" / "reliability" / "placement.json").read_text())
    assert data["command"] == ("python -m nla_ray placement --preset paper-gemma27b-L41 --preset paper-qwen7b-L20 "
                               "--out results/reliability/placement")
    for st in data["statements"]:
        cfg = load_config(st["preset"])
        fresh = P.preset_statement(cfg, load_config(cfg.partner))
        assert json.loads(json.dumps(fresh)) == st, st["preset"]


# ---------------------------------------------------------------------------------------------
# on Ray: a local head that declares the named machine's 2 GPUs (CPU only, tiny models standing in)


@pytest.fixture
def two_gpu_ray():
    import ray

    ray.shutdown()
    # Logical GPUs: Ray assigns them (CUDA_VISIBLE_DEVICES, ray.get_gpu_ids) exactly as on the
    # 2xH200 head; torch finds no CUDA and the tiny models run on the CPU.
    ray.init(address="local", num_cpus=4, num_gpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()


@pytest.mark.ray
@pytest.mark.usefixtures("torch_single_thread")
def test_the_gemma_shares_place_every_pool_at_once_on_two_gpus(two_gpu_ray, tiny_families, tmp_path):
    """With paper-gemma27b-L41's shares (0.45 + 0.6 + 0.35) every pool's actor is alive at one instant;
    with the former 1 + 1 + 0.5 the AR waits until extraction is over."""
    from nla_ray.jobkit import documents
    from nla_ray.nla import pairs
    from nla_ray.runtime.rows import RowParts
    from nla_ray.runtime.stages import ar_spec, av_spec, extract_spec

    _, preset = tiny_families
    gemma = load_config("paper-gemma27b-L41").pools
    sets = [f"pools.{p}.num_gpus={gemma[p].num_gpus}" for p in ("extract", "av", "ar")]
    cfg = load_config(str(preset), overrides=sets + ["n_docs=2"])
    dirs = pairs.resolve_pair(cfg.pair)
    stages = [extract_spec(cfg, layers=cfg.extract_layers), av_spec(cfg, dirs.av), ar_spec(cfg, dirs.ar)]
    assert [s.pool.num_gpus for s in stages] == [0.45, 0.6, 0.35]
    logs: list[str] = []
    info = pipeline.run(stages, source=documents(cfg), parts=RowParts(tmp_path / "rows"),
                        fingerprint={"stages": pipeline.stages_fingerprint(stages)}, log=logs.append,
                        machine=load_config("paper-gemma27b-L41").machine)
    assert info.rows_written == 4 and info.rows_failed == 0
    assert any(m.startswith("[pools]") and "every order" in m and "2 GPUs" in m for m in logs), logs
    assert sum(m.startswith("[memory]") for m in logs) == 3
    rows = RowParts(tmp_path / "rows").read()
    together = pipeline.alive_together(rows, ["extract", "av", "ar"])
    assert together["at"] is not None and together["seconds"] > 0, together
    # each actor got a GPU of its own share; the AV (0.6) never shares one with extraction (0.45)
    gpu = {s: {w.rsplit(":gpu", 1)[1] for w in rows.column(f"{s}_worker").to_pylist()} for s in ("extract", "av", "ar")}
    assert all(len(v) == 1 for v in gpu.values()), gpu
    assert gpu["av"] != gpu["extract"]
    tl = pipeline.stage_timeline(rows)
    assert tl["together"]["all_placed"] and tl["together"]["seconds"] > 0
    assert np.isfinite(rows.column("nmse").to_numpy()).all()

    # The same run with the former shares (1 + 1 + 0.5) on the same head: reported as not placeable at
    # once, and the AR is placed only after the extraction actor has finished and left its GPU.
    old = load_config(str(preset), overrides=[f"pools.{p}.num_gpus={g}" for p, g in
                                              (("extract", 1), ("av", 1), ("ar", 0.5))] + ["n_docs=2"])
    stages = [extract_spec(old, layers=old.extract_layers), av_spec(old, dirs.av), ar_spec(old, dirs.ar)]
    logs = []
    pipeline.run(stages, source=documents(old), parts=RowParts(tmp_path / "old"),
                 fingerprint={"stages": pipeline.stages_fingerprint(stages)}, log=logs.append)
    assert any(m.startswith("[pools]") and "cannot all run at once" in m for m in logs), logs
    rows = RowParts(tmp_path / "old").read()
    assert pipeline.alive_together(rows, ["extract", "av", "ar"])["at"] is None
    assert min(rows.column("ar_tinit").to_pylist()) > max(rows.column("extract_t1").to_pylist())
