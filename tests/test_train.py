"""Training the mini NLA pairs on tiny random models (CPU, seconds).

Covers nla_ray.training.targets (the deterministic explanation targets), nla_ray.training.sft (torch_nmse, collect,
train_ar, train_av) and the adapter format the training job ships (PEFT LoRA folder under
``adapter/``, applied by ``pairs.apply_adapter``). Reference numbers are recomputed here from the
plain HF model or from nla_ray.core.metrics, never from the function under test.
"""

import copy
import importlib.util
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from nla_ray.core import metrics as M
from nla_ray.nla import pairs
from nla_ray.training import targets
from nla_ray.training import sft as train
from nla_ray.nla.ar import AREngine
from nla_ray.nla.corpora import Document
from nla_ray.nla.extract import MIN_POSITION, Extractor, sample_positions
from nla_ray.nla.models import backbone_from_model

pytestmark = pytest.mark.usefixtures("torch_single_thread")

REPO = Path(__file__).resolve().parent.parent
QUOTED = re.compile(r'"([^"\n]*)"')
K = 2  # block index of the tiny 4-block models used below (not the last block on purpose)


def _quiet(_msg):
    pass


def _spans(line: str) -> list[str]:
    assert line.count('"') % 2 == 0, f"unbalanced quotes in {line!r}"
    return QUOTED.findall(line)


def _fresh(model):
    """An independent copy of a session-scoped tiny model: training wraps models in place."""
    return copy.deepcopy(model).eval()


# ---------------------------------------------------------------------------------------------
# targets


def test_make_target_shape_and_content():
    kw = dict(topic="business",
              prefix_text="Shares in Tesco rose after Tesco said quarterly profits at Tesco beat forecasts, "
                          "the retailer reported",
              token=" reported", top_next=[" on", " that", " a"])
    t = targets.make_target(**kw)
    assert t == targets.make_target(**kw)  # deterministic
    lines = t.split("\n")
    assert len(lines) == 3 and t.splitlines() == lines
    # Tesco x3 first, then the 1-counts by recency (the final token is part of the prefix)
    assert lines[0] == "Business news report on Tesco, reported, retailer."
    # the phrase is taken from the text BEFORE the final token
    assert _spans(lines[1]) == ["beat forecasts, the retailer"]
    assert lines[1] == 'The phrase "beat forecasts, the retailer" signals the running narrative of the article.'
    assert _spans(lines[2]) == [" reported", " on", " that", " a"]
    assert lines[2] == 'Final token " reported" sits mid-sentence, expecting " on", " that" or " a".'


@pytest.mark.parametrize("topic,name", [("business", "Business"), ("sport", "Sports"), ("sports", "Sports"),
                                        ("tech", "Technology"), ("science", "Science"), ("", "General")])
def test_make_target_topic_names(topic, name):
    t = targets.make_target(topic=topic, prefix_text="Markets opened higher on Monday", token=" Monday",
                            top_next=["."])
    assert t.split("\n")[0].startswith(f"{name} news report")


def test_make_target_empty_prefix_and_no_top_next():
    t = targets.make_target(topic="politics", prefix_text="", token="", top_next=[])
    lines = t.split("\n")
    assert lines == ["Politics news report.", "The opening words set up the article.",
                     'Final token "" is whitespace between words.']
    # only the token is there to quote, but it is still quoted
    assert _spans(lines[2]) == [""]

    t = targets.make_target(topic="tech", prefix_text="The new phone launches today", token=" today",
                            top_next=[])
    lines = t.split("\n")
    assert len(lines) == 3
    assert lines[2] == 'Final token " today" sits mid-sentence.'
    assert "expecting" not in t
    assert _spans(lines[1]) == ["The new phone launches"]


@pytest.mark.parametrize("nxt,tail", [
    ([" on"], 'expecting " on".'),
    ([" on", None, " at"], 'expecting " on" or " at".'),
    ([" a", " b", " c", " d"], 'expecting " a", " b" or " c".'),
])
def test_make_target_next_token_lists(nxt, tail):
    t = targets.make_target(topic="sport", prefix_text="The match ended", token=" ended", top_next=nxt)
    assert t.split("\n")[2].endswith(tail)


def test_make_target_quotes_and_newlines_do_not_break_quoting():
    prefix = 'The minister said: "We will\nnot raise taxes,"\n\n'
    t = targets.make_target(topic="politics", prefix_text=prefix, token="\n\n",
                            top_next=['"', "\n", 'He said "no"'])
    lines = t.split("\n")
    assert len(lines) == 3
    assert lines[0].startswith("Politics news report on ")
    # inner double quotes became single quotes; the phrase is a quotation being relayed
    assert _spans(lines[1]) == ["will not raise taxes,'"]
    assert "a quotation being relayed" in lines[1]
    # the newline token is escaped, not written raw; every next token keeps its own quotes
    assert _spans(lines[2]) == ["\\n\\n", "'", "\\n", "He said 'no'"]
    assert lines[2].startswith('Final token "\\n\\n" is whitespace between words')
    # a token that IS a double quote
    t = targets.make_target(topic="tech", prefix_text='He called it "', token='"', top_next=["smart"])
    lines = t.split("\n")
    assert len(lines) == 3
    assert _spans(lines[1]) == ["He called it"]
    assert _spans(lines[2]) == ["'", "smart"]


def test_make_target_carriage_return_is_escaped():
    t = targets.make_target(topic="business", prefix_text="Profits rose.\r\n", token="\r\n", top_next=["\r\n"])
    assert len(t.splitlines()) == 3


def test_salient_words_frequency_then_recency_and_stopwords():
    text = ("apple banana Cherry banana would there people years apple date Apple and the of "
            "banana eggs")
    # apple x3 (latest casing "Apple"), banana x3 (mentioned last) -> banana first; then the 1-counts
    # by recency: eggs, date, Cherry. Stopwords (would, there, people, years) and short words never rank.
    assert targets.salient_words(text, k=10) == ["banana", "Apple", "eggs", "date", "Cherry"]
    assert targets.salient_words(text) == ["banana", "Apple", "eggs"]
    assert targets.salient_words("alpha gamma beta", k=3) == ["beta", "gamma", "alpha"]
    assert targets.salient_words("the and of it would could people", k=3) == []
    assert targets.salient_words("", k=3) == []
    # only the last `window` words count
    assert targets.salient_words("zebra zebra zebra " + "horse " * 5, k=1, window=5) == ["horse"]
    # deterministic
    assert targets.salient_words(text) == targets.salient_words(text)


# ---------------------------------------------------------------------------------------------
# torch_nmse


@pytest.mark.parametrize("d", [8, 64])
def test_torch_nmse_matches_metrics(d):
    rng = np.random.default_rng(d)
    p = (rng.standard_normal((9, d)) * rng.uniform(0.1, 50, (9, 1))).astype(np.float32)
    g = (rng.standard_normal((9, d)) * rng.uniform(0.1, 50, (9, 1))).astype(np.float32)
    for scale in (1.0, 3.7, math.sqrt(d)):
        got = train.torch_nmse(torch.from_numpy(p), torch.from_numpy(g), scale).numpy()
        np.testing.assert_allclose(got, M.nmse(p, g, scale), atol=1e-5, rtol=0)
    got = train.torch_nmse(torch.from_numpy(p), torch.from_numpy(g), math.sqrt(d)).numpy()
    cos = (p * g).sum(1) / (np.linalg.norm(p, axis=1) * np.linalg.norm(g, axis=1))
    np.testing.assert_allclose(got, 2 * (1 - cos), atol=1e-5, rtol=0)
    # identical directions -> 0, opposite -> 4 at scale sqrt(d)
    same = train.torch_nmse(torch.from_numpy(p), torch.from_numpy(3 * p), math.sqrt(d))
    opp = train.torch_nmse(torch.from_numpy(p), torch.from_numpy(-p), math.sqrt(d))
    np.testing.assert_allclose(same.numpy(), 0, atol=1e-5)
    np.testing.assert_allclose(opp.numpy(), 4, atol=1e-4)


def test_torch_nmse_is_differentiable_in_half_precision_inputs():
    p = torch.randn(4, 16, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(4, 16)
    loss = train.torch_nmse(p, g, 4.0)
    assert loss.dtype == torch.float32 and loss.shape == (4,)
    loss.mean().backward()
    assert p.grad is not None and torch.isfinite(p.grad.float()).all()


# ---------------------------------------------------------------------------------------------
# synthetic training rows

TOPICS = ["business", "sport", "tech", "politics"]
WORDS = ("market shares profits council minister election goal match striker phone software chips "
         "budget voters league season launch network investors growth").split()


def _rows(n: int, d: int, seed: int) -> list[dict]:
    """Rows whose vector is predictable from the target's topic: a shared direction plus a per-topic one."""
    rng = np.random.default_rng(seed)
    common = rng.standard_normal(d)
    protos = {t: rng.standard_normal(d) for t in TOPICS}
    rows = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        words = [WORDS[j] for j in rng.choice(len(WORDS), 3, replace=False)]
        prefix = " ".join(words)
        tgt = targets.make_target(topic=topic, prefix_text=prefix, token=" " + words[-1],
                                  top_next=[" the", ",", "."])
        vec = (1.5 * common + protos[topic] + 0.2 * rng.standard_normal(d)) * 3.0
        rows.append({"target": tgt, "vector": vec.astype(np.float32), "topic": topic, "doc_id": f"d{i}"})
    return rows


def _cfg(**kw) -> train.TrainConfig:
    base = dict(seed=0, lora_r=4, lora_alpha=8, warmup_steps=2, log_every=1, max_target_tokens=48,
                ar_lr=1e-2, head_lr=1e-2, av_lr=1e-2)
    base.update(kw)
    return train.TrainConfig(**base)


# ---------------------------------------------------------------------------------------------
# AR


@pytest.fixture(scope="module")
def ar_trained(tiny_llama, smollm_tok):
    torch.manual_seed(0)
    d = tiny_llama.config.hidden_size
    base = _fresh(tiny_llama)
    pristine = _fresh(tiny_llama)
    rows = _rows(32, d, seed=1)
    _, ar_meta = pairs.build_metas(smollm_tok, d, K, 10.0)
    cfg = _cfg(ar_epochs=5.0, ar_batch=8)  # int(5 * 32 / 8) = 20 steps
    peft_m, head, curve = train.train_ar(base, smollm_tok, ar_meta, rows, cfg, log=_quiet)
    return dict(peft=peft_m, head=head, curve=curve, rows=rows, meta=ar_meta, pristine=pristine, d=d, cfg=cfg)


def test_train_ar_learns(ar_trained):
    curve, d = ar_trained["curve"], ar_trained["d"]
    assert [c["step"] for c in curve] == list(range(20))
    losses = [c["loss_nmse"] for c in curve]
    assert all(math.isfinite(x) and 0 <= x <= 4 for x in losses)
    assert losses[-1] < losses[0]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    head = ar_trained["head"]
    assert tuple(head.weight.shape) == (d, d)
    # the head moved away from its identity initialisation
    assert not torch.allclose(head.weight.detach(), torch.eye(d))
    assert not ar_trained["peft"].training


def test_train_ar_lora_only_on_blocks_up_to_k(ar_trained, tiny_llama):
    names = [n for n, p in ar_trained["peft"].named_parameters() if "lora_" in n]
    assert names
    layers = {int(re.search(r"\.layers\.(\d+)\.", n).group(1)) for n in names}
    assert layers == set(range(K + 1))
    # every LoRA target module of those blocks got an adapter
    for mod in train.LORA_TARGETS:
        assert any(f".{mod}.lora_A" in n for n in names), mod
    # the session fixture was not touched (the test trained a copy)
    assert not any("lora_" in n for n, _ in tiny_llama.named_parameters())


def test_train_ar_adapter_round_trips(ar_trained, smollm_tok, tmp_path):
    """Save as the job does (adapter/ + value head), apply to a fresh base as load_ar does: same reconstructions."""
    peft_m, head, meta = ar_trained["peft"], ar_trained["head"], ar_trained["meta"]
    texts = [r["target"] for r in ar_trained["rows"][:5]]
    trained = AREngine(backbone_from_model(peft_m.base_model.model, K + 1), head, smollm_tok, meta)
    want = trained.reconstruct(texts)

    peft_m.save_pretrained(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    merged = pairs.apply_adapter(_fresh(ar_trained["pristine"]), tmp_path)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    head_copy = copy.deepcopy(head)
    got = AREngine(backbone_from_model(merged, K + 1), head_copy, smollm_tok, meta).reconstruct(texts)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    # and the adapter matters: the untrained base gives something else
    plain = AREngine(backbone_from_model(_fresh(ar_trained["pristine"]), K + 1), copy.deepcopy(head),
                     smollm_tok, meta).reconstruct(texts)
    assert np.abs(plain - want).max() > 1e-3


def test_apply_adapter_without_adapter_folder_is_identity(tiny_llama, tmp_path):
    m = _fresh(tiny_llama)
    assert pairs.apply_adapter(m, tmp_path) is m


# ---------------------------------------------------------------------------------------------
# AV


@pytest.fixture(scope="module")
def av_trained(tiny_llama, smollm_tok):
    torch.manual_seed(0)
    d = tiny_llama.config.hidden_size
    base = _fresh(tiny_llama)
    pristine = _fresh(tiny_llama)
    rows = _rows(16, d, seed=2)
    av_meta, _ = pairs.build_metas(smollm_tok, d, K, 4.0)
    cfg = _cfg(av_epochs=2.5, av_batch=4)  # int(2.5 * 16 / 4) = 10 steps
    peft_m, curve = train.train_av(base, smollm_tok, av_meta, rows, cfg, log=_quiet)
    return dict(peft=peft_m, curve=curve, rows=rows, meta=av_meta, pristine=pristine, d=d)


def test_train_av_ce_decreases(av_trained):
    curve = av_trained["curve"]
    assert [c["step"] for c in curve] == list(range(10))
    ce = [c["loss_ce"] for c in curve]
    assert all(math.isfinite(x) for x in ce)
    # a random 49k-word model starts near ln(vocab)
    assert ce[0] > 0.5 * math.log(av_trained["peft"].get_output_embeddings().weight.shape[0])
    assert ce[-1] < ce[0]
    assert np.mean(ce[-3:]) < np.mean(ce[:3])
    assert not av_trained["peft"].training


def _probe_ids(tok) -> torch.Tensor:
    return tok("Final token \" profits\" sits mid-sentence, expecting \" rose\".", return_tensors="pt")["input_ids"]


def test_train_av_adapter_round_trips(av_trained, smollm_tok, tmp_path):
    peft_m = av_trained["peft"]
    ids = _probe_ids(smollm_tok)
    with torch.no_grad():
        want = peft_m(input_ids=ids).logits
    peft_m.save_pretrained(str(tmp_path / "adapter"))
    cfg = (tmp_path / "adapter" / "adapter_config.json").read_text()
    assert '"lora"' in cfg.lower()
    merged = pairs.apply_adapter(_fresh(av_trained["pristine"]), tmp_path)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        got = merged(input_ids=ids).logits
        plain = av_trained["pristine"](input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert (plain - want).abs().max() > 1e-3  # training changed the model


def test_shipped_fp16_adapter_round_trips(av_trained, smollm_tok, tmp_path):
    """The job stores the adapter in fp16 (jobs/train_mini_nla._save_adapter); it still loads onto fp32."""
    spec = importlib.util.spec_from_file_location("_train_mini_nla_job", REPO / "jobs" / "train_mini_nla.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    from safetensors.torch import load_file

    peft_m = av_trained["peft"]
    ids = _probe_ids(smollm_tok)
    with torch.no_grad():
        want = peft_m(input_ids=ids).logits
    (tmp_path / "adapter").mkdir()
    job._save_adapter(peft_m, tmp_path / "adapter")
    state = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert state and all(v.dtype == torch.float16 for v in state.values())
    merged = pairs.apply_adapter(_fresh(av_trained["pristine"]), tmp_path)
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    with torch.no_grad():
        got = merged(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=2e-2, rtol=0)


# ---------------------------------------------------------------------------------------------
# pause at a deadline, resume from the checkpoint


def _trainable(peft_m) -> dict:
    return {n: p.detach().clone() for n, p in peft_m.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("phase", ["ar", "av"])
def test_paused_phase_resumes_to_the_same_weights(phase, tiny_llama, smollm_tok, tmp_path):
    """A run cut at a deadline and resumed from its checkpoint ends where the uninterrupted run ends."""
    d = tiny_llama.config.hidden_size
    rows = _rows(16, d, seed=3)
    av_meta, ar_meta = pairs.build_metas(smollm_tok, d, K, 4.0)
    cfg = _cfg(ar_epochs=2.0, ar_batch=8, av_epochs=2.0, av_batch=8)  # 4 steps either way
    fn = train.train_ar if phase == "ar" else train.train_av
    meta = ar_meta if phase == "ar" else av_meta

    def run(**kw):
        torch.manual_seed(0)
        out = fn(_fresh(tiny_llama), smollm_tok, meta, rows, cfg, log=_quiet, **kw)
        return out[0], out[-1], (out[1] if phase == "ar" else None)

    ref_m, ref_curve, ref_head = run()
    ck = tmp_path / "ckpt"
    with pytest.raises(train.Paused, match=f"{phase} paused at step 1"):
        run(ckpt_dir=ck, deadline=0.0)  # the deadline has passed: one step, then pause
    assert (ck / "resume.pt").is_file()
    got_m, got_curve, got_head = run(ckpt_dir=ck, deadline=None)
    assert [c["step"] for c in got_curve] == [c["step"] for c in ref_curve] == [0, 1, 2, 3]
    key = "loss_nmse" if phase == "ar" else "loss_ce"
    np.testing.assert_allclose([c[key] for c in got_curve], [c[key] for c in ref_curve], rtol=1e-5, atol=1e-6)
    want, have = _trainable(ref_m), _trainable(got_m)
    assert want.keys() == have.keys()
    for n in want:
        torch.testing.assert_close(have[n], want[n], rtol=1e-5, atol=1e-6)
    if ref_head is not None:
        torch.testing.assert_close(got_head.weight, ref_head.weight, rtol=1e-5, atol=1e-6)


def test_deadline_without_checkpoint_dir_is_refused(tiny_llama, smollm_tok):
    d = tiny_llama.config.hidden_size
    _, ar_meta = pairs.build_metas(smollm_tok, d, K, 4.0)
    with pytest.raises(ValueError, match="checkpoint directory"):
        train.train_ar(_fresh(tiny_llama), smollm_tok, ar_meta, _rows(16, d, seed=3),
                       _cfg(ar_epochs=2.0, ar_batch=8), log=_quiet, deadline=0.0)


def test_resume_checkpoint_of_another_run_is_refused(tiny_llama, smollm_tok, tmp_path):
    d = tiny_llama.config.hidden_size
    _, ar_meta = pairs.build_metas(smollm_tok, d, K, 4.0)
    rows = _rows(16, d, seed=3)
    cfg = _cfg(ar_epochs=2.0, ar_batch=8)
    with pytest.raises(train.Paused):
        train.train_ar(_fresh(tiny_llama), smollm_tok, ar_meta, rows, cfg, log=_quiet, ckpt_dir=tmp_path,
                       deadline=0.0)
    changed = _cfg(ar_epochs=2.0, ar_batch=8, ar_lr=5e-3)  # same shapes, another run
    with pytest.raises(ValueError, match=r"another training run.*config\.ar_lr"):
        train.train_ar(_fresh(tiny_llama), smollm_tok, ar_meta, rows, changed, log=_quiet, ckpt_dir=tmp_path)
    other_rows = train.set_targets([dict(r, prefix_text="x " + r["target"], token=" x", top_next=["a"])
                                    for r in rows], "v1")
    with pytest.raises(ValueError, match="targets_sha256"):
        train.train_ar(_fresh(tiny_llama), smollm_tok, ar_meta, other_rows, cfg, log=_quiet, ckpt_dir=tmp_path)
    torch.save({"step": 1, "params": {"nope": torch.zeros(1)}, "head": None, "opt": {}, "curve": [],
                "elapsed_s": 0.0}, tmp_path / "resume.pt")  # no key at all: refused the same way
    with pytest.raises(ValueError, match="another training run"):
        train.train_ar(_fresh(tiny_llama), smollm_tok, ar_meta, rows, cfg, log=_quiet, ckpt_dir=tmp_path)


def test_target_recipes_differ_only_in_the_quote():
    kw = dict(topic="business", prefix_text="Shares in the oil giant fell sharply on Monday after the company "
              "warned that profits would drop", token=" drop", top_next=[" by", ".", " sharply"])
    v1 = targets.make_target(**kw).split("\n")
    v2 = targets.make_target(**kw, recipe="v2").split("\n")
    assert v1[0] == v2[0] and v1[2] == v2[2]
    assert v1[1].startswith('The phrase "warned that profits would"')
    assert v2[1].startswith('The phrase "sharply on Monday after the company warned that profits would"')
    with pytest.raises(ValueError, match="unknown target recipe"):
        targets.make_target(**kw, recipe="v9")
    rows = [dict(kw, top_next=kw["top_next"])]
    assert train.set_targets(rows, "v2")[0]["target"] == "\n".join(v2)
    with pytest.raises(ValueError, match="target_recipe"):
        train.set_targets(rows, "v0")


# ---------------------------------------------------------------------------------------------
# collect

VOCAB = ("the company said profits rose sharply in the third quarter as sales of new phones grew "
         "while costs fell and investors welcomed the results which beat analyst forecasts for the "
         "year ahead shares closed higher on Monday after the chief executive promised more growth").split()


def _doc(doc_id: str, n_words: int, seed: int) -> Document:
    rng = np.random.default_rng(seed)
    words = [VOCAB[i] for i in rng.integers(0, len(VOCAB), n_words)]
    text = " ".join(words).capitalize() + "."
    return Document(doc_id=doc_id, text=text, source="synthetic", meta={"topic": "business"})


@pytest.fixture(scope="module")
def collected(tiny_llama, smollm_tok):
    docs = [_doc("bbc-a", 110, 1), _doc("bbc-b", 75, 2), _doc("bbc-short", 12, 3), _doc("bbc-c", 140, 4)]
    rows = train.collect(tiny_llama, smollm_tok, docs, K, positions_per_doc=3, seed=7, max_length=256,
                         batch_docs=2, log=_quiet)
    return docs, rows


def test_collect_positions_and_rows(collected, smollm_tok):
    docs, rows = collected
    special = set(smollm_tok.all_special_ids)
    by_doc = {}
    for r in rows:
        by_doc.setdefault(r["doc_id"], []).append(r["position"])
    for d in docs:
        ids = smollm_tok(d.text, add_special_tokens=True, truncation=True, max_length=256)["input_ids"]
        want = sample_positions(ids, special, d.doc_id, 7, 3)
        if d.doc_id == "bbc-short":
            assert len(ids) <= MIN_POSITION and want == []
            assert d.doc_id not in by_doc
            continue
        assert len(ids) > 60
        assert by_doc[d.doc_id] == want
    assert len(rows) == 9
    for r in rows:
        assert r["topic"] == "business"
        assert len(r["top_next"]) == 3 and all(isinstance(t, str) for t in r["top_next"])
        assert isinstance(r["target"], str) and len(r["target"].split("\n")) == 3
        assert r["target"].startswith("Business news report")
        assert r["target"] == targets.make_target(topic="business", prefix_text=r["prefix_text"],
                                                  token=r["token"], top_next=r["top_next"])
        assert r["vector"].dtype == np.float32 and r["vector"].shape == (64,)


def test_collect_vectors_and_next_tokens_match_full_model(collected, tiny_llama, smollm_tok):
    docs, rows = collected
    text = {d.doc_id: d.text for d in docs}
    for r in rows:
        ids = smollm_tok(text[r["doc_id"]], add_special_tokens=True)["input_ids"]
        p = r["position"]
        with torch.no_grad():
            out = tiny_llama(input_ids=torch.tensor([ids]), output_hidden_states=True)
        np.testing.assert_allclose(r["vector"], out.hidden_states[K + 1][0, p].numpy(), atol=1e-4, rtol=0)
        top = out.logits[0, p].topk(3).indices.tolist()
        assert r["top_next"] == [smollm_tok.decode([t]) for t in top]
        assert r["token"] == smollm_tok.decode([ids[p]])
        assert r["prefix_text"] == smollm_tok.decode(ids[:p + 1], skip_special_tokens=True)
        assert r["prefix_text"].endswith(r["token"])


def test_collect_agrees_with_stage0_extractor(collected, tiny_llama, smollm_tok):
    """collect's full-model vectors are the same raw block-K vectors that stage 0 extracts."""
    docs, rows = collected
    ex = Extractor(tiny_llama, smollm_tok, [K], model_id="tiny", seed=7, positions_per_doc=3, max_length=256)
    ref = {(e["doc_id"], e["position"]): e for e in ex.extract([(d.doc_id, d.text) for d in docs])}
    assert set(ref) == {(r["doc_id"], r["position"]) for r in rows}
    for r in rows:
        e = ref[(r["doc_id"], r["position"])]
        np.testing.assert_allclose(r["vector"], np.asarray(e["vector"], dtype=np.float32), atol=1e-4, rtol=0)


def test_collect_last_block_is_raw_like_stage0(tiny_llama, smollm_tok):
    last = tiny_llama.config.num_hidden_layers - 1
    docs = [_doc("bbc-last", 90, 5)]
    rows = train.collect(tiny_llama, smollm_tok, docs, last, positions_per_doc=2, seed=3, max_length=256,
                         log=_quiet)
    ex = Extractor(tiny_llama, smollm_tok, [last], model_id="tiny", seed=3, positions_per_doc=2, max_length=256)
    ref = {e["position"]: e["vector"] for e in ex.extract([(d.doc_id, d.text) for d in docs])}
    assert rows and set(ref) == {r["position"] for r in rows}
    for r in rows:
        np.testing.assert_allclose(r["vector"], ref[r["position"]], atol=1e-4, rtol=0)


def _train_job():
    spec = importlib.util.spec_from_file_location("_train_mini_nla_job2", REPO / "jobs" / "train_mini_nla.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return job


def test_train_job_contract_routes_sets_and_never_touches_the_shipped_pair(tmp_path):
    """--preset picks the family, --set train.* reaches TrainConfig, --n sizes the training data, and
    by default nothing is written under nla_ray/pairs (shipping is the explicit --ship)."""
    job = _train_job()
    shipped = pairs.SHIPPED_DIR / "smollm2-L20"
    before = {p: p.stat().st_mtime_ns for p in shipped.rglob("*") if p.is_file()}
    # A bad training field is one line (exit 2) before any work.
    assert job.JOB.entry(["--set", "train.bogus=1", "--out", str(tmp_path / "a"), "--work", str(tmp_path / "w")]) == 2
    assert job.JOB.entry(["--preset", "paper-qwen7b-L20", "--out", str(tmp_path / "b")]) == 2
    assert job.JOB.entry(["--ship", "--pair-out", str(tmp_path / "p"), "--out", str(tmp_path / "c")]) == 2
    # The collect phase on 6 training activations (3 documents x 2 positions) and 2 held-out documents.
    rc = job.JOB.entry(["--preset", "mini", "--n", "6", "--set", "train.positions_per_doc=2",
                        "--set", "train.n_eval_docs=2", "--set", "train.eval_positions_per_doc=1",
                        "--phases", "collect", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "run")])
    assert rc == 0
    data = torch.load(tmp_path / "w" / "data.pt", weights_only=False)
    assert len(data["train"]) == 6 and len({r["doc_id"] for r in data["train"]}) == 3
    assert len(data["eval"]) == 2
    import json

    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["job"] == "train_mini_nla" and s["headline"]["family"] == "smollm2-L20"
    assert s["provenance"]["preset"] == "mini"
    assert {p: p.stat().st_mtime_ns for p in shipped.rglob("*") if p.is_file()} == before
