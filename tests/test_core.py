"""Core behaviour of nla_ray on tiny random models (no downloads, seconds).

Two families: a Llama-style decoder with the SmolLM2 tokenizer and a Gemma-3 text decoder
(sqrt(d)-scaled embedding, sliding + global attention) with the Gemma-3 tokenizer. Fixtures live
in conftest.py. Every reference number is recomputed here from the plain HF model, never from the
module under test.
"""

import hashlib
import math
import random

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file
from torch import nn

from nla_ray.core import metrics as M
from nla_ray.nla import pairs
from nla_ray.nla import templates as T
from nla_ray.nla.ar import AREngine, ValueHead, load_value_head
from nla_ray.nla.av import AVEngine, gumbel_noise, inject, sample_seed
from nla_ray.nla.extract import MIN_POSITION, Extractor, align_position, sample_positions
from nla_ray.nla.models import backbone_from_model, load_backbone
from nla_ray.nla.sidecar import SIDECAR_NAME, NlaMeta, SidecarError, read_sidecar, write_sidecar

CPU = torch.device("cpu")

pytestmark = pytest.mark.usefixtures("torch_single_thread")

AR_TEXTS = [
    "Short.",
    "A news report on the council budget: schools and roads get more money next year.",
    "Sports commentary. The home side won three to one after a late goal, and the manager praised "
    "the defence for holding firm through the closing minutes of a tense match.",
    "Code",
]

WORDS = ("the council said budget school road plan vote week year people city river music film game "
         "team player market price bank share growth minister report court police health water energy "
         "company market sales profit record album song award show season coach league final").split()


def identity_head(d):
    head = ValueHead(d)
    with torch.no_grad():
        head.weight.copy_(torch.eye(d))
    return head


def random_head(d, seed=0):
    g = torch.Generator().manual_seed(seed)
    head = ValueHead(d)
    with torch.no_grad():
        head.weight.copy_(torch.eye(d) + 0.3 * torch.randn(d, d, generator=g))
    return head


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def full_hidden_states(model, ids):
    """All hidden states of the full HF model on one unpadded sequence: tuple of [T, d]."""
    out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    return [h[0] for h in out.hidden_states]


def ar_prompt_ids(tok, template, text):
    return tok(T.ar_prompt(template, text), add_special_tokens=True)["input_ids"]


def capture_rows(engine, monkeypatch):
    """Record the raw token rows every generate() call hands to _finish."""
    rows = []
    orig = engine._finish

    def spy(row):
        rows.append(list(row))
        return orig(row)

    monkeypatch.setattr(engine, "_finish", spy)
    return rows


# =============================================================================================
# 1. the injected row
# =============================================================================================


@pytest.mark.parametrize("scale", [7.5, None], ids=["scaled", "raw"])
def test_injected_row_is_where_and_what_it_should_be(tiny, scale):
    av_meta, _ = pairs.build_metas(tiny.tok, tiny.d, 2, scale)
    assert av_meta.injection_scale == scale
    eng = AVEngine(tiny.model, tiny.tok, av_meta)
    ids = eng.prompt_ids
    tid = av_meta.injection_token_id

    # one slot, neighbours exactly as the sidecar says, the canonical one-step chat prompt
    assert ids == T.av_prompt_ids(tiny.tok, av_meta.av_template, av_meta.injection_char)
    assert ids.count(tid) == 1
    assert eng.slot == ids.index(tid)
    assert 0 < eng.slot < len(ids) - 1
    assert ids[eng.slot - 1] == av_meta.left_neighbor_id
    assert ids[eng.slot + 1] == av_meta.right_neighbor_id

    vecs = randn(3, tiny.d, seed=1) * torch.tensor([[0.01], [1.0], [300.0]])
    emb = eng.prompt_embeds(vecs)
    assert emb.shape == (3, len(ids), tiny.d)
    assert emb.dtype == torch.float32

    # every other row is the model's own embedding, computed here by hand
    weight = tiny.model.get_input_embeddings().weight.detach()
    raw_lookup = weight[torch.tensor(ids)]
    by_hand = raw_lookup * math.sqrt(tiny.d) if tiny.name == "gemma3" else raw_lookup
    others = [i for i in range(len(ids)) if i != eng.slot]
    for b in range(3):
        torch.testing.assert_close(emb[b, others], by_hand[others], rtol=1e-6, atol=0)
    if tiny.name == "gemma3":
        # a raw nn.Embedding lookup misses Gemma-3's sqrt(d) factor
        assert not torch.allclose(emb[0, others], raw_lookup[others], rtol=1e-3, atol=1e-6)
        torch.testing.assert_close(emb[0, others], raw_lookup[others] * 8.0, rtol=1e-6, atol=0)

    # the slot row is the vector, rescaled to injection_scale (or raw)
    for b in range(3):
        v64 = vecs[b].double()
        want = v64 * (scale / v64.norm()) if scale is not None else v64
        torch.testing.assert_close(emb[b, eng.slot].double(), want, rtol=1e-5, atol=1e-6)
        if scale is not None:
            assert float(emb[b, eng.slot].double().norm()) == pytest.approx(scale, rel=1e-5)

    # injection changed exactly one row of the un-injected prompt embedding
    with torch.no_grad():
        plain = tiny.model.get_input_embeddings()(torch.tensor([ids]))[0]
    for b in range(3):
        changed = (emb[b] != plain).any(dim=-1).nonzero().flatten().tolist()
        assert changed == [eng.slot]


def test_injection_norm_is_taken_in_fp32():
    # In fp16 the squares of this vector overflow (1000**2 > 65504): a naive fp16 norm is inf.
    v16 = torch.full((1, 64), 1000.0, dtype=torch.float16)
    assert not torch.isfinite((v16 * v16).sum().sqrt())
    out = inject(torch.zeros(1, 5, 64), 2, v16, 80000.0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, 2], torch.full((64,), 10000.0), rtol=1e-6, atol=0)
    assert out[0, [0, 1, 3, 4]].abs().sum() == 0
    # bf16 embeddings: the row is the fp32-rescaled vector cast once to bf16
    v = randn(2, 64, seed=3) * 50
    outb = inject(torch.zeros(2, 4, 64, dtype=torch.bfloat16), 1, v, 150.0)
    want = (v * (150.0 / v.norm(dim=1, keepdim=True))).to(torch.bfloat16)
    assert outb.dtype == torch.bfloat16
    assert torch.equal(outb[:, 1], want)
    # inject returns a new tensor and leaves its input alone
    base = torch.ones(1, 3, 64)
    inject(base, 1, v[:1], None)
    assert torch.equal(base, torch.ones(1, 3, 64))


# =============================================================================================
# 2. a doubled <bos>
# =============================================================================================


def test_count_leading_bos():
    assert T.count_leading_bos([2, 2, 105, 2], 2) == 2
    assert T.count_leading_bos([2, 105], 2) == 1
    assert T.count_leading_bos([105, 2], 2) == 0
    assert T.count_leading_bos([], 2) == 0
    assert T.count_leading_bos([2, 2], 2) == 2
    assert T.count_leading_bos([2, 2], None) == 0


def test_doubled_bos_is_caught(gemma_tok, tiny_gemma, monkeypatch):
    av_meta, _ = pairs.build_metas(gemma_tok, 64, 2, 10.0)
    good = av_meta.check_tokenizer(gemma_tok)
    assert T.count_leading_bos(good, gemma_tok.bos_token_id) == 1

    original = gemma_tok.apply_chat_template

    def two_step(messages, tokenize=True, add_generation_prompt=False, **kw):
        # the classic mistake: render to text, then tokenize again with special tokens
        text = original(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        return gemma_tok(text, add_special_tokens=True)["input_ids"] if tokenize else text

    monkeypatch.setattr(gemma_tok, "apply_chat_template", two_step)
    doubled = T.av_prompt_ids(gemma_tok, av_meta.av_template, av_meta.injection_char)
    assert T.count_leading_bos(doubled, gemma_tok.bos_token_id) == 2
    assert doubled[1:] == good  # everything shifted by one position

    with pytest.raises(SidecarError, match="bos") as err:
        av_meta.check_tokenizer(gemma_tok)
    assert "2 <bos>" in str(err.value)
    with pytest.raises(SidecarError, match="bos"):
        AVEngine(tiny_gemma, gemma_tok, av_meta)


# =============================================================================================
# 3. sidecar drift
# =============================================================================================


@pytest.fixture
def sidecars(tmp_path, gemma_tok):
    av_meta, ar_meta = pairs.build_metas(gemma_tok, 64, 2, 1234.5)
    write_sidecar(tmp_path / "av", av_meta)
    write_sidecar(tmp_path / "ar", ar_meta)
    return tmp_path, av_meta, ar_meta


def _rewrite(directory, mutate):
    p = directory / SIDECAR_NAME
    d = yaml.safe_load(p.read_text(encoding="utf-8"))
    mutate(d)
    p.write_text(yaml.safe_dump(d, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return p


def _assert_names(err, field, expected, live, path=None):
    msg = str(err)
    assert err.field == field
    assert f"'{field}'" in msg, msg
    assert repr(expected) in msg, msg
    assert repr(live) in msg, msg
    if path is not None:
        assert str(path) in msg, msg


def test_sidecar_roundtrip(sidecars, gemma_tok):
    root, av_meta, ar_meta = sidecars
    for role, meta in (("av", av_meta), ("ar", ar_meta)):
        back = read_sidecar(root / role)
        assert back.role == role
        for f in ("d_model", "injection_scale", "mse_scale", "injection_char", "injection_token_id",
                  "left_neighbor_id", "right_neighbor_id", "critic_suffix_ids", "av_template",
                  "ar_template", "layer"):
            assert getattr(back, f) == getattr(meta, f), f
        assert back.path == str(root / role / SIDECAR_NAME)
        back.check_tokenizer(gemma_tok)
    assert read_sidecar(root / "av").injection_scale == 1234.5
    assert read_sidecar(root / "ar").mse_scale == pytest.approx(8.0)
    assert isinstance(SidecarError("w", "f", 1, 2), ValueError)


def test_sidecar_scale_spellings(sidecars):
    root = sidecars[0]
    cases = [(None, None), ("sqrt_d_model", 8.0), ("raw", None), (150, 150.0), ("80000", 80000.0)]
    for spec, want in cases:
        _rewrite(root / "av", lambda d: d["extraction"].__setitem__("injection_scale", spec))
        assert read_sidecar(root / "av").injection_scale == want, spec
    _rewrite(root / "av", lambda d: d["extraction"].pop("mse_scale"))
    assert read_sidecar(root / "av").mse_scale == pytest.approx(8.0)  # sqrt(d) by default


def _first_suffix(meta):
    return meta.critic_suffix_ids


# (role, mutate, stage, field, expected, live): expected/live may be callables of (meta, tok)
DRIFT = {
    "injection_token_id": (
        "av", lambda d: d["tokens"].__setitem__("injection_token_id", 105), "check",
        "tokens.injection_token_id", [105], lambda m, tok: [m.injection_token_id]),
    "injection_char": (
        "av", lambda d: d["tokens"].__setitem__("injection_char", "A"), "check",
        "tokens.injection_token_id", lambda m, tok: [m.injection_token_id],
        lambda m, tok: tok.encode("A", add_special_tokens=False)),
    "left_neighbour": (
        "av", lambda d: d["tokens"].__setitem__("injection_left_neighbor_id", 9999), "check",
        "tokens.injection_left_neighbor_id", 9999, lambda m, tok: m.left_neighbor_id),
    "right_neighbour": (
        "av", lambda d: d["tokens"].__setitem__("injection_right_neighbor_id", 8888), "check",
        "tokens.injection_right_neighbor_id", 8888, lambda m, tok: m.right_neighbor_id),
    "critic_suffix_ids": (
        "ar", lambda d: d["tokens"].__setitem__("critic_suffix_ids", [1, 2, 3]), "check",
        "tokens.critic_suffix_ids", [1, 2, 3], lambda m, tok: m.critic_suffix_ids),
    "kind": ("av", lambda d: d.__setitem__("kind", "nla_modle"), "read", "kind", "nla_model", "nla_modle"),
    "role": ("ar", lambda d: d.__setitem__("role", "decoder"), "read", "role",
             "one of av/ar (or actor/critic)", "decoder"),
    "mse_scale": ("av", lambda d: d["extraction"].__setitem__("mse_scale", "banana"), "read",
                  "extraction.mse_scale", "a number, null or 'sqrt_d_model'", "banana"),
    "injection_scale": ("av", lambda d: d["extraction"].__setitem__("injection_scale", -3), "read",
                        "extraction.injection_scale", "a positive finite number", -3),
    "d_model_type": ("av", lambda d: d.__setitem__("d_model", "64"), "read", "d_model",
                     "a positive integer", "64"),
    "layer": ("ar", lambda d: d["critic"].__setitem__("extraction_layer_index", "two"), "read",
              "critic.extraction_layer_index", "an integer layer K", "two"),
    "av_template": ("av", lambda d: d["prompt_templates"].__setitem__("av", "no slot here"), "read",
                    "prompt_templates.av", "a template containing {injection_char}", "no slot here"),
}


@pytest.mark.parametrize("case", sorted(DRIFT))
def test_sidecar_drift_names_the_field(sidecars, gemma_tok, case):
    root, av_meta, ar_meta = sidecars
    role, mutate, stage, field, expected, live = DRIFT[case]
    meta = av_meta if role == "av" else ar_meta
    expected = expected(meta, gemma_tok) if callable(expected) else expected
    live = live(meta, gemma_tok) if callable(live) else live
    path = _rewrite(root / role, mutate)
    with pytest.raises(SidecarError) as err:
        read_sidecar(root / role).check_tokenizer(gemma_tok)
    _assert_names(err.value, field, expected, live, path)
    if stage == "check":  # the file itself still parses; the live tokenizer disagrees
        read_sidecar(root / role)


def test_sidecar_d_model_vs_model_width(sidecars, gemma_tok, tiny_gemma):
    root = sidecars[0]
    path = _rewrite(root / "av", lambda d: d.__setitem__("d_model", 128))
    meta = read_sidecar(root / "av")
    with pytest.raises(SidecarError) as err:
        AVEngine(tiny_gemma, gemma_tok, meta)
    _assert_names(err.value, "d_model", 128, 64, path)
    path = _rewrite(root / "ar", lambda d: d.__setitem__("d_model", 32))
    with pytest.raises(SidecarError) as err:
        AREngine(backbone_from_model(tiny_gemma, 3), identity_head(64), gemma_tok, read_sidecar(root / "ar"))
    _assert_names(err.value, "d_model", 32, 64, path)


def test_sidecar_malformed_or_missing(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / SIDECAR_NAME).write_text("kind: nla_model\nrole: [av\n", encoding="utf-8")
    with pytest.raises(SidecarError) as err:
        read_sidecar(tmp_path / "bad")
    assert err.value.field == "<yaml>" and "valid YAML" in str(err.value)
    with pytest.raises(SidecarError) as err:
        read_sidecar(tmp_path / "nowhere")
    assert err.value.field == "<file>" and "missing" in str(err.value)
    assert str(tmp_path / "nowhere" / SIDECAR_NAME) in str(err.value)
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / SIDECAR_NAME).write_text("- 1\n- 2\n", encoding="utf-8")
    with pytest.raises(SidecarError) as err:
        read_sidecar(tmp_path / "list")
    assert err.value.field == "<root>"


@pytest.mark.parametrize("field", ["prompt_templates", "critic"])
def test_sidecar_non_mapping_sections_name_the_field(sidecars, field):
    root = sidecars[0]
    _rewrite(root / "ar", lambda d: d.__setitem__(field, ["not", "a", "mapping"]))
    with pytest.raises(SidecarError) as err:
        read_sidecar(root / "ar")
    assert field in str(err.value)


def test_sidecar_old_field_names_parse(tmp_path, gemma_tok, sidecars):
    _, av_meta, ar_meta = sidecars
    tokens = {"injection_char": av_meta.injection_char, "injection_token_id": av_meta.injection_token_id,
              "injection_left_neighbor_id": av_meta.left_neighbor_id,
              "injection_right_neighbor_id": av_meta.right_neighbor_id,
              "critic_suffix_ids": ar_meta.critic_suffix_ids}
    for old, new in (("actor", "av"), ("critic", "ar")):
        d = {"kind": "nla_model", "role": old, "d_model": 64,
             "extraction": {"injection_scale": 80000, "mse_scale": "sqrt_d_model"},
             "tokens": tokens,
             "prompt_templates": {"actor": T.DEFAULT_AV_TEMPLATE, "critic": T.DEFAULT_AR_TEMPLATE},
             "critic": {"num_hidden_layers": 2}}
        (tmp_path / old).mkdir()
        (tmp_path / old / SIDECAR_NAME).write_text(yaml.safe_dump(d, allow_unicode=True), encoding="utf-8")
        meta = read_sidecar(tmp_path / old)
        assert meta.role == new
        assert meta.layer == 2
        assert meta.av_template == T.DEFAULT_AV_TEMPLATE
        assert meta.ar_template == T.DEFAULT_AR_TEMPLATE
        assert meta.injection_scale == 80000.0
        assert meta.mse_scale == pytest.approx(8.0)
        meta.check_tokenizer(gemma_tok)
    # the current name wins over the old one when both are present
    both = NlaMeta.from_dict({**d, "role": "ar", "critic": {"num_hidden_layers": 9, "extraction_layer_index": 5}})
    assert both.layer == 5


# =============================================================================================
# 4. the AR backbone = hidden_states[K+1] at the last token
# =============================================================================================


@pytest.mark.parametrize("K", [0, 2])
def test_ar_backbone_equals_full_model_hidden_state(tiny, K):
    _, ar_meta = pairs.build_metas(tiny.tok, tiny.d, K, None)
    eng = AREngine(backbone_from_model(tiny.model, K + 1), identity_head(tiny.d), tiny.tok, ar_meta)

    prompts = [ar_prompt_ids(tiny.tok, ar_meta.ar_template, t) for t in AR_TEXTS]
    assert len({len(p) for p in prompts}) >= 3  # different lengths -> real padding
    for p in prompts:
        assert p[-len(ar_meta.critic_suffix_ids):] == ar_meta.critic_suffix_ids
        if tiny.tok.bos_token_id is not None and tiny.name == "gemma3":
            assert T.count_leading_bos(p, tiny.tok.bos_token_id) == 1
    ref = torch.stack([full_hidden_states(tiny.model, p)[K + 1][-1] for p in prompts])

    ids, mask, last = eng.encode(AR_TEXTS)
    assert ids.shape == (len(AR_TEXTS), max(len(p) for p in prompts))
    assert last.tolist() == [len(p) - 1 for p in prompts]
    for i, p in enumerate(prompts):
        assert ids[i, : len(p)].tolist() == p and mask[i].sum() == len(p)

    got = torch.from_numpy(eng.reconstruct(AR_TEXTS))
    assert got.shape == (len(AR_TEXTS), tiny.d) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(eng.hidden_last(AR_TEXTS), ref, atol=1e-5, rtol=0)
    # right padding changes nothing: one at a time, or in batches of two, gives the same rows
    one = torch.from_numpy(np.concatenate([eng.reconstruct([t]) for t in AR_TEXTS]))
    torch.testing.assert_close(one, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.from_numpy(eng.reconstruct(AR_TEXTS, batch_size=2)), ref, atol=1e-5, rtol=0)
    assert eng.reconstruct([]).shape == (0, tiny.d)


def test_ar_value_head_is_applied_to_the_last_token(tiny_llama, smollm_tok):
    _, ar_meta = pairs.build_metas(smollm_tok, 64, 1, None)
    head = random_head(64, seed=5)
    eng = AREngine(backbone_from_model(tiny_llama, 2), head, smollm_tok, ar_meta)
    h = torch.stack([full_hidden_states(tiny_llama, ar_prompt_ids(smollm_tok, ar_meta.ar_template, t))[2][-1]
                     for t in AR_TEXTS])
    want = h.double() @ head.weight.detach().double().T
    torch.testing.assert_close(torch.from_numpy(eng.reconstruct(AR_TEXTS)).double(), want, atol=1e-5, rtol=1e-5)


def test_backbone_view_leaves_the_model_alone(tiny):
    before = full_hidden_states(tiny.model, [5, 6, 7, 8, 9])
    bb = backbone_from_model(tiny.model, 2)
    assert len(bb.layers) == 2 and isinstance(bb.norm, nn.Identity)
    assert bb.config.num_hidden_layers == 2
    if tiny.name == "gemma3":
        assert bb.config.layer_types == ["sliding_attention", "full_attention"]
    # weights shared, not copied
    assert bb.embed_tokens.weight.data_ptr() == tiny.model.get_input_embeddings().weight.data_ptr()
    assert len(tiny.model.model.layers) == tiny.n_layers
    assert not isinstance(tiny.model.model.norm, nn.Identity)
    assert tiny.model.config.num_hidden_layers == tiny.n_layers
    after = full_hidden_states(tiny.model, [5, 6, 7, 8, 9])
    for a, b in zip(before, after):
        assert torch.equal(a, b)


def test_load_backbone_from_saved_dir(tiny, tmp_path):
    K = 2
    path = tmp_path / "model"
    tiny.model.save_pretrained(path)
    bb = load_backbone(str(path), K + 1, device=CPU, dtype=torch.float32)
    assert len(bb.layers) == K + 1 and isinstance(bb.norm, nn.Identity)
    _, ar_meta = pairs.build_metas(tiny.tok, tiny.d, K, None)
    eng = AREngine(bb, identity_head(tiny.d), tiny.tok, ar_meta)
    ref = torch.stack([full_hidden_states(tiny.model, ar_prompt_ids(tiny.tok, ar_meta.ar_template, t))[K + 1][-1]
                       for t in AR_TEXTS])
    torch.testing.assert_close(torch.from_numpy(eng.reconstruct(AR_TEXTS)), ref, atol=1e-5, rtol=0)


def test_written_pair_loads_back(tiny_llama, smollm_tok, tmp_path):
    """write_pair(copy_weights=True) -> load_av / load_ar reproduce the in-memory engines."""
    K = 2
    head = random_head(64, seed=9)
    out = pairs.write_pair(tmp_path / "pair", base_spec="tiny-llama", model=tiny_llama, tokenizer=smollm_tok,
                           layer=K, injection_scale=12.0, copy_weights=True, value_head=head)
    assert pairs.resolve_pair(str(out)) == pairs.PairDirs(str(out / "av"), str(out / "ar"))
    av = pairs.load_av(out / "av", device="cpu", max_new_tokens=6)
    ar = pairs.load_ar(out / "ar", device="cpu")
    assert av.meta.injection_scale == 12.0 and ar.meta.layer == K
    assert len(ar.backbone.layers) == K + 1

    h = torch.stack([full_hidden_states(tiny_llama, ar_prompt_ids(smollm_tok, ar.meta.ar_template, t))[K + 1][-1]
                     for t in AR_TEXTS])
    want = h.double() @ head.weight.detach().double().T
    torch.testing.assert_close(torch.from_numpy(ar.reconstruct(AR_TEXTS)).double(), want, atol=1e-5, rtol=1e-5)

    av_meta, _ = pairs.build_metas(smollm_tok, 64, K, 12.0)
    mem = AVEngine(tiny_llama, smollm_tok, av_meta, max_new_tokens=6)
    vecs = randn(2, 64, seed=4)
    assert [s.text for s in av.generate(vecs)] == [s.text for s in mem.generate(vecs)]


# =============================================================================================
# 5. metrics on vectors out of the tiny AR
# =============================================================================================


def test_metrics_on_ar_vectors_match_float64_reference(tiny_gemma, gemma_tok):
    _, ar_meta = pairs.build_metas(gemma_tok, 64, 2, None)
    gold_eng = AREngine(backbone_from_model(tiny_gemma, 3), identity_head(64), gemma_tok, ar_meta)
    pred_eng = AREngine(backbone_from_model(tiny_gemma, 3), random_head(64, seed=2), gemma_tok, ar_meta)
    gold = gold_eng.reconstruct(AR_TEXTS)
    pred = pred_eng.reconstruct(AR_TEXTS)
    s = ar_meta.mse_scale
    assert s == pytest.approx(8.0)

    g64, p64 = gold.astype(np.float64), pred.astype(np.float64)
    gn = g64 / np.linalg.norm(g64, axis=1, keepdims=True) * s
    pn = p64 / np.linalg.norm(p64, axis=1, keepdims=True) * s
    nmse64 = ((pn - gn) ** 2).mean(axis=1)
    cos64 = (p64 * g64).sum(1) / (np.linalg.norm(p64, axis=1) * np.linalg.norm(g64, axis=1))
    var64 = ((gn - gn.mean(axis=0)) ** 2).mean()

    nmse = M.nmse(pred, gold, s)
    np.testing.assert_allclose(nmse, nmse64, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(nmse, 2 * (1 - cos64), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(M.cosine(pred, gold), cos64, rtol=1e-5, atol=1e-6)
    var = M.variance_baseline(gold, s)
    assert var == pytest.approx(var64, rel=1e-5)
    assert M.fve(nmse, var) == pytest.approx(1 - nmse64.mean() / var64, rel=1e-4, abs=1e-5)
    assert np.all(nmse > 0)  # a perturbed head does not reconstruct perfectly


# =============================================================================================
# 6. sampling positions and extraction
# =============================================================================================


def make_docs(tok, n_long=5, seed=0):
    rng = random.Random(seed)
    docs = []
    for i in range(n_long):
        words = [rng.choice(WORDS) for _ in range(rng.randint(70, 160))]
        if i == 1:  # special tokens inside the text, past position 50
            for j in range(55, len(words), 9):
                words[j] = tok.eos_token
        docs.append((f"doc-{i}", " ".join(words).capitalize() + "."))
    docs.append(("short-a", "Too short to sample from."))
    docs.append(("short-b", " ".join(WORDS[:30])))
    return docs


def test_sample_positions_is_a_pure_function_of_doc_and_seed():
    ids = list(range(1000, 1200))
    special = {ids[60], ids[61], ids[120]}
    p = sample_positions(ids, special, "doc-a", 42, 5)
    assert p == sample_positions(list(ids), special, "doc-a", 42, 5)
    assert len(p) == 5 and len(set(p)) == 5
    assert all(x >= MIN_POSITION and ids[x] not in special for x in p)
    # the release formula: random.Random(sha256(f"{seed}|{doc_id}").digest()).sample(candidates, k)
    cands = [i for i in range(len(ids)) if i >= 50 and ids[i] not in special]
    assert p == random.Random(hashlib.sha256(b"42|doc-a").digest()).sample(cands, 5)
    assert p != sample_positions(ids, special, "doc-b", 42, 5)
    assert p != sample_positions(ids, special, "doc-a", 43, 5)
    every = sample_positions(ids, special, "doc-a", 42, 10_000)
    assert sorted(every) == cands
    assert sample_positions(ids[:50], set(), "d", 42, 5) == []
    assert sample_positions(ids[:51], set(), "d", 42, 5) == [50]
    assert sample_positions(ids[:51], {ids[50]}, "d", 42, 5) == []


def test_extraction_is_independent_of_order_and_batching(tiny):
    docs = make_docs(tiny.tok)
    special = set(tiny.tok.all_special_ids)
    enc = {d: tiny.tok(t, add_special_tokens=True)["input_ids"] for d, t in docs}
    n_short = sum(len(v) <= MIN_POSITION for v in enc.values())
    assert n_short == 2
    assert any(t in special for t in enc["doc-1"][MIN_POSITION:])  # the special-token doc really has them

    def run(order, batch_tokens):
        ex = Extractor(tiny.model, tiny.tok, [1, 2], model_id="tiny", seed=7, positions_per_doc=4,
                       batch_tokens=batch_tokens)
        rows = ex.extract([docs[i] for i in order])
        keyed = {(r["doc_id"], r["position"], r["layer"]): r for r in rows}
        assert len(keyed) == len(rows)
        return ex, keyed

    n = len(docs)
    shuffled = list(range(n))
    random.Random(3).shuffle(shuffled)
    ex_a, a = run(range(n), 10**7)              # one batch
    ex_b, b = run(reversed(range(n)), 1)        # one document per forward pass
    ex_c, c = run(shuffled, 300)                # a few mixed batches
    assert set(a) == set(b) == set(c)
    for key in a:
        for other in (b, c):
            torch.testing.assert_close(torch.from_numpy(other[key]["vector"]),
                                       torch.from_numpy(a[key]["vector"]), atol=1e-5, rtol=0)

    for ex in (ex_a, ex_b, ex_c):
        assert ex.stats.docs_in == n
        assert ex.stats.docs_short == n_short
        assert sorted(ex.stats.short_ids) == ["short-a", "short-b"]
        assert ex.stats.rows_out == len(a)

    per_doc = {}
    for (doc_id, pos, layer), r in a.items():
        per_doc.setdefault(doc_id, set()).add(pos)
        ids = enc[doc_id]
        assert pos >= MIN_POSITION and ids[pos] not in special
        assert r["token_id"] == ids[pos] and r["n_raw_tokens"] == pos + 1
        assert r["vector"].dtype == np.float32 and r["vector"].shape == (tiny.d,)
    assert set(per_doc) == {f"doc-{i}" for i in range(5)}
    for doc_id, positions in per_doc.items():
        assert sorted(positions) == sorted(sample_positions(enc[doc_id], special, doc_id, 7, 4))

    # the vectors are the full model's hidden_states[K+1] (raw block-K output)
    for doc_id in per_doc:
        hs = full_hidden_states(tiny.model, enc[doc_id])
        for pos in per_doc[doc_id]:
            for layer in (1, 2):
                torch.testing.assert_close(torch.from_numpy(a[(doc_id, pos, layer)]["vector"]),
                                           hs[layer + 1][pos], atol=1e-5, rtol=0)


def test_extraction_special_tokens_and_length_boundary(tiny_llama, smollm_tok):
    tok = smollm_tok
    special = set(tok.all_special_ids)
    doc = make_docs(tok)[1]
    ex = Extractor(tiny_llama, tok, [2], model_id="tiny", positions_per_doc=10_000)
    rows = ex.extract([doc])
    ids = tok(doc[1], add_special_tokens=True)["input_ids"]
    cands = [i for i in range(MIN_POSITION, len(ids)) if ids[i] not in special]
    assert sorted(r["position"] for r in rows) == cands  # every candidate, no special token
    assert len(cands) < len(ids) - MIN_POSITION

    # exactly 50 tokens: skipped and counted; exactly 51: one row, at position 50
    by_len = {}
    for n in range(30, 90):
        text = " ".join(WORDS[i % len(WORDS)] for i in range(n))
        by_len.setdefault(len(tok(text, add_special_tokens=True)["input_ids"]), text)
    assert 50 in by_len and 51 in by_len
    ex = Extractor(tiny_llama, tok, [2], model_id="tiny", positions_per_doc=3)
    rows = ex.extract([("fifty", by_len[50]), ("fifty-one", by_len[51])])
    assert ex.stats.docs_short == 1 and ex.stats.short_ids == ["fifty"]
    assert [(r["doc_id"], r["position"]) for r in rows] == [("fifty-one", 50)]


def test_extraction_at_the_last_block_is_raw(tiny_llama, smollm_tok):
    """Block 3 of a 4-block model: the raw output, not HF's final-normed hidden_states[4]."""
    text = " ".join(WORDS * 2)
    ids = smollm_tok(text, add_special_tokens=True)["input_ids"]
    rows = Extractor(tiny_llama, smollm_tok, [3], model_id="tiny", positions_per_doc=2).extract([("d", text)])
    with torch.no_grad():
        raw = backbone_from_model(tiny_llama, 4)(input_ids=torch.tensor([ids])).last_hidden_state[0]
    hs = full_hidden_states(tiny_llama, ids)
    for r in rows:
        torch.testing.assert_close(torch.from_numpy(r["vector"]), raw[r["position"]], atol=1e-5, rtol=0)
        assert not torch.allclose(torch.from_numpy(r["vector"]), hs[4][r["position"]], atol=1e-3)
    with pytest.raises(ValueError, match="outside"):
        Extractor(tiny_llama, smollm_tok, [4], model_id="tiny")


# =============================================================================================
# 7. decoding
# =============================================================================================


@pytest.fixture(scope="module")
def av_metas(smollm_tok, gemma_tok):
    return {"llama": pairs.build_metas(smollm_tok, 64, 2, 10.0)[0],
            "gemma3": pairs.build_metas(gemma_tok, 64, 2, 10.0)[0]}


def test_greedy_is_deterministic_and_loop_equals_hf(tiny, av_metas, monkeypatch):
    meta = av_metas[tiny.name]
    vecs = randn(3, tiny.d, seed=11) * 3
    loop = AVEngine(tiny.model, tiny.tok, meta, max_new_tokens=12)
    hf = AVEngine(tiny.model, tiny.tok, meta, max_new_tokens=12, backend="hf")
    rows_loop, rows_hf = capture_rows(loop, monkeypatch), capture_rows(hf, monkeypatch)

    first = loop.generate(vecs)
    second = loop.generate(vecs)
    ref = hf.generate(vecs)
    assert rows_loop[:3] == rows_loop[3:6]
    assert rows_loop[:3] == rows_hf[:3]
    assert [s.text for s in first] == [s.text for s in second] == [s.text for s in ref]
    assert all(0 < len(r) <= 12 for r in rows_loop)
    # a row's greedy text does not depend on its batch
    alone = loop.generate(vecs[1:2])
    assert rows_loop[-1] == rows_loop[1] and alone[0].text == first[1].text
    # numpy input and a 1-D vector work the same
    assert loop.generate(vecs[0].numpy())[0].text == first[0].text


def test_sampling_is_seeded_and_batch_independent(tiny, av_metas, monkeypatch):
    meta = av_metas[tiny.name]
    eng = AVEngine(tiny.model, tiny.tok, meta, max_new_tokens=12)
    rows = capture_rows(eng, monkeypatch)
    vecs = randn(4, tiny.d, seed=12) * 3
    seeds = [sample_seed(42, "doc", p, 0) for p in range(4)]

    eng.generate(vecs, temperature=1.0, seeds=seeds)
    batch = rows[:4]
    eng.generate(vecs, temperature=1.0, seeds=seeds)
    assert rows[4:8] == batch
    eng.generate(vecs[2:3], temperature=1.0, seeds=seeds[2:3])
    assert rows[8] == batch[2]
    eng.generate(vecs[[3, 0]], temperature=1.0, seeds=[seeds[3], seeds[0]])
    assert rows[9:11] == [batch[3], batch[0]]
    eng.generate(vecs[:1], temperature=1.0, seeds=[seeds[0] + 1])
    assert rows[11] != batch[0]  # another seed, another sample
    eng.generate(vecs[:1])
    assert rows[12] != batch[0]  # sampling at T=1 is not greedy

    with pytest.raises(ValueError, match="seed"):
        eng.generate(vecs, temperature=1.0)
    with pytest.raises(ValueError, match="seeds"):
        eng.generate(vecs, temperature=1.0, seeds=seeds[:2])


def test_gumbel_noise_and_sample_seed():
    a = gumbel_noise(torch.tensor([5, 7, 2**62 + 3]), 3, 1000)
    b = gumbel_noise(torch.tensor([2**62 + 3]), 3, 1000)
    assert torch.equal(a[2], b[0])
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(a[0], gumbel_noise(torch.tensor([5]), 4, 1000)[0])
    big = gumbel_noise(torch.tensor([123]), 0, 200_000)
    assert torch.isfinite(big).all()
    assert float(big.mean()) == pytest.approx(0.5772, abs=0.02)  # Euler-Mascheroni
    assert sample_seed(42, "d", 7, 0) == sample_seed(42, "d", 7, 0)
    assert sample_seed(42, "d", 7, 0) != sample_seed(42, "d", 7, 1)
    assert 0 <= sample_seed("x") < 2**63


@pytest.mark.parametrize("backend", ["loop", "hf"])
def test_banned_ids_never_appear(tiny, av_metas, monkeypatch, backend):
    meta = av_metas[tiny.name]
    eng = AVEngine(tiny.model, tiny.tok, meta, max_new_tokens=12, backend=backend)
    rows = capture_rows(eng, monkeypatch)
    vecs = randn(3, tiny.d, seed=13) * 3
    seeds = [1, 2, 3]
    kw = {"seeds": seeds} if backend == "loop" else {}
    torch.manual_seed(0)
    eng.generate(vecs)
    eng.generate(vecs, temperature=1.0, **kw)
    stop = set(eng.stop_ids)
    banned = sorted({t for r in rows for t in r} - stop)
    assert banned
    del rows[:]
    eng.generate(vecs, banned_ids=banned)
    eng.generate(vecs, temperature=1.0, banned_ids=banned, **kw)
    assert len(rows) == 6
    for r in rows:
        assert not set(r) & set(banned)


def test_banned_ids_for_chars(tiny_llama, smollm_tok, av_metas):
    eng = AVEngine(tiny_llama, smollm_tok, av_metas["llama"])
    banned = eng.banned_ids_for(['"', "\u201c"])
    # every id that decodes to a banned char, plus lone byte fragments that could complete "“"
    naive = {i for i in range(len(smollm_tok)) if '"' in smollm_tok.decode([i]) or "\u201c" in smollm_tok.decode([i])}
    assert naive and naive <= set(banned)
    assert all("\ufffd" in smollm_tok.decode([i]) for i in set(banned) - naive)
    assert smollm_tok.encode('"', add_special_tokens=False)[0] in banned
    assert smollm_tok.encode("hello", add_special_tokens=False)[0] not in banned


def test_finish_cuts_at_stop_and_close_tag(tiny_llama, smollm_tok, av_metas):
    eng = AVEngine(tiny_llama, smollm_tok, av_metas["llama"])
    body = smollm_tok.encode("<explanation>\nA budget story.\n</explanation>", add_special_tokens=False)
    tail = smollm_tok.encode(" and then more words", add_special_tokens=False)
    stop = eng.stop_ids[0]
    s = eng._finish(body + [stop] + tail)
    assert (s.explanation, s.status, s.n_tokens) == ("A budget story.", "ok", len(body))
    trimmed = eng._trim_after_close(body + tail)
    assert trimmed == body
    s = eng._finish(body[:-3])
    assert s.status == "no_close_tag" and s.explanation.startswith("A budget")


# =============================================================================================
# 8. bad inputs
# =============================================================================================


def test_wrong_width_vector_raises(tiny_llama, smollm_tok, av_metas):
    eng = AVEngine(tiny_llama, smollm_tok, av_metas["llama"], max_new_tokens=2)
    with pytest.raises(ValueError, match="shape"):
        eng.generate(randn(2, 65))
    with pytest.raises(ValueError, match="shape"):
        eng.prompt_embeds(randn(2, 63))
    with pytest.raises(ValueError, match="shape"):
        inject(torch.zeros(2, 5, 64), 1, randn(3, 64), 1.0)
    assert eng.generate(np.zeros((0, 64), dtype=np.float32)) == []


def test_non_finite_vector_names_the_row(tiny_llama, smollm_tok, av_metas):
    eng = AVEngine(tiny_llama, smollm_tok, av_metas["llama"], max_new_tokens=2)
    v = randn(4, 64)
    v[1, 5] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite.*rows \[1\]"):
        eng.generate(v)
    v = randn(4, 64)
    v[2, 0] = float("inf")
    v[3, 63] = float("-inf")
    with pytest.raises(ValueError, match=r"rows \[2, 3\]"):
        eng.prompt_embeds(v)


def test_value_head_file_of_wrong_shape(tmp_path):
    good = tmp_path / "good.safetensors"
    w = randn(64, 64, seed=8)
    save_file({"weight": w}, str(good))
    head = load_value_head(good, 64)
    assert isinstance(head, nn.Linear) and head.bias is None and torch.equal(head.weight.detach(), w)
    bad = tmp_path / "bad.safetensors"
    save_file({"weight": randn(64, 32)}, str(bad))
    with pytest.raises(ValueError, match=r"shape \(64, 32\).*\(64, 64\)"):
        load_value_head(bad, 64, where="ar/value_head.safetensors")
    with pytest.raises(ValueError, match="shape"):
        load_value_head(good, 576)
    wrong_key = tmp_path / "key.safetensors"
    save_file({"value_head.weight": w}, str(wrong_key))
    with pytest.raises(ValueError, match="weight"):
        load_value_head(wrong_key, 64)


def test_ar_engine_rejects_value_head_of_wrong_shape(tiny_llama, smollm_tok):
    _, ar_meta = pairs.build_metas(smollm_tok, 64, 2, None)
    with pytest.raises(ValueError, match="shape"):
        AREngine(backbone_from_model(tiny_llama, 3), nn.Linear(64, 32, bias=False), smollm_tok, ar_meta)


def test_ar_engine_value_head_of_wrong_input_width_fails(tiny_llama, smollm_tok):
    _, ar_meta = pairs.build_metas(smollm_tok, 64, 2, None)
    with pytest.raises(ValueError, match="shape"):
        AREngine(backbone_from_model(tiny_llama, 3), ValueHead(65), smollm_tok, ar_meta)


def test_load_ar_without_value_head(tmp_path, smollm_tok):
    av_meta, ar_meta = pairs.build_metas(smollm_tok, 64, 2, 5.0)
    write_sidecar(tmp_path / "ar", ar_meta)
    write_sidecar(tmp_path / "av", av_meta)
    with pytest.raises(FileNotFoundError, match="value_head"):
        pairs.load_ar(tmp_path / "ar")
    with pytest.raises(SidecarError, match="role"):
        pairs.load_ar(tmp_path / "av")
    with pytest.raises(SidecarError, match="role"):
        pairs.load_av(tmp_path / "ar")


def test_engine_role_and_layer_mismatch(tiny_llama, smollm_tok):
    av_meta, ar_meta = pairs.build_metas(smollm_tok, 64, 2, 5.0)
    with pytest.raises(ValueError, match="role"):
        AVEngine(tiny_llama, smollm_tok, ar_meta)
    with pytest.raises(ValueError, match="role"):
        AREngine(backbone_from_model(tiny_llama, 3), identity_head(64), smollm_tok, av_meta)
    with pytest.raises(ValueError, match="extraction_layer_index=2"):
        AREngine(backbone_from_model(tiny_llama, 2), identity_head(64), smollm_tok, ar_meta)
    with pytest.raises(ValueError, match="backend"):
        AVEngine(tiny_llama, smollm_tok, av_meta, backend="vllm")


def test_ar_truncation_keeps_head_and_length(tiny_llama, smollm_tok):
    _, ar_meta = pairs.build_metas(smollm_tok, 64, 2, None)
    eng = AREngine(backbone_from_model(tiny_llama, 3), identity_head(64), smollm_tok, ar_meta, max_length=24)
    long = "word " * 60 + "end."
    full = ar_prompt_ids(smollm_tok, ar_meta.ar_template, long)
    ids, mask, last = eng.encode([long, "Short."])
    assert ids.shape[1] == 24 and int(last[0]) == 23
    row = ids[0].tolist()
    assert row[-len(ar_meta.critic_suffix_ids):] == ar_meta.critic_suffix_ids
    assert row[:10] == full[:10]
    assert np.isfinite(eng.reconstruct([long])).all()


def test_ar_truncation_keeps_the_whole_template_tail(tiny_llama, smollm_tok):
    _, ar_meta = pairs.build_metas(smollm_tok, 64, 2, None)
    eng = AREngine(backbone_from_model(tiny_llama, 3), identity_head(64), smollm_tok, ar_meta, max_length=24)
    ids, _, _ = eng.encode(["word " * 60 + "end."])
    assert smollm_tok.decode(ids[0].tolist()).endswith("</text> <summary>")


# =============================================================================================
# 9. parsing what the AV writes
# =============================================================================================


def test_parse_explanation_statuses():
    assert T.parse_explanation("<explanation>  A budget story. </explanation>") == ("A budget story.", "ok")
    assert T.parse_explanation("pre <explanation>\nline 1\nline 2\n</explanation> post") == ("line 1\nline 2", "ok")
    assert T.parse_explanation("<explanation>a</explanation><explanation>b</explanation>") == ("a", "ok")
    assert T.parse_explanation("<explanation> cut off mid") == ("cut off mid", "no_close_tag")
    assert T.parse_explanation("no tags at all") == (None, "no_open_tag")
    assert T.parse_explanation("text</explanation>") == (None, "no_open_tag")
    assert T.parse_explanation("") == (None, "no_open_tag")
    assert T.parse_explanation(T.explanation_target("round trip")) == ("round trip", "ok")


def test_prompt_builders():
    assert T.ar_prompt(T.DEFAULT_AR_TEMPLATE, "X") == "Summary of the following text: <text>X</text> <summary>"
    assert "<concept>\u321c</concept>" in T.av_prompt_text(T.DEFAULT_AV_TEMPLATE, "\u321c")
    with pytest.raises(ValueError):
        T.ar_prompt("no placeholder", "x")
    with pytest.raises(ValueError):
        T.av_prompt_text("no placeholder", "x")


# =============================================================================================
# 10. aligning two tokenizers
# =============================================================================================


def test_align_position_on_two_offset_lists():
    # "The cat sat." split two ways
    a = [(0, 3), (3, 7), (7, 11), (11, 12)]          # The| cat| sat|.
    b = [(0, 0), (0, 2), (2, 3), (3, 5), (5, 7), (7, 12)]  # <bos>|Th|e| c|at| sat.
    assert align_position(a[1][1], b) == (4, 0)        # " cat" ends where "at" ends
    assert align_position(a[0][1], b) == (2, 0)
    assert align_position(a[3][1], b) == (5, 0)
    assert align_position(a[2][1], b) == (5, 1)        # "sat" ends at 11, b's token at 12
    assert align_position(6, [(0, 4), (4, 8)]) == (0, -2)  # tie: the earlier token wins
    assert align_position(7, b, min_position=5) == (5, 5)
    assert align_position(1, [(0, 0), (0, 0), (0, 3)]) == (2, 2)  # empty spans are skipped
    with pytest.raises(ValueError):
        align_position(3, [(0, 0)])
    with pytest.raises(ValueError):
        align_position(3, a, min_position=10)


def test_align_position_across_real_tokenizers(smollm_tok, gemma_tok):
    text = "The council said the budget for schools and roads would rise next year."
    sa = smollm_tok(text, add_special_tokens=True, return_offsets_mapping=True)["offset_mapping"]
    sb = gemma_tok(text, add_special_tokens=True, return_offsets_mapping=True)["offset_mapping"]
    ends_b = {e for s, e in sb if e > s}
    for s, e in sa:
        if e <= s:
            continue
        i, err = align_position(e, sb)
        assert sb[i][1] - e == err
        if e in ends_b:
            assert err == 0
        assert abs(err) <= min(abs(x - e) for x in ends_b)


def test_git_commit_prefers_the_submitters_commit(monkeypatch):
    """A copied working tree may carry a stale .git: an explicit NLA_RAY_GIT_COMMIT wins."""
    import re

    from nla_ray.core import provenance

    monkeypatch.setenv("NLA_RAY_GIT_COMMIT", "0123456789abcdef0123456789abcdef01234567")
    assert provenance.git_commit() == "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.delenv("NLA_RAY_GIT_COMMIT")
    got = provenance.git_commit()
    assert got == "unknown" or re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", got)


def test_config_values_take_their_field_types_and_bad_ones_name_the_field():
    from nla_ray.config import load_config

    c = load_config("mini", overrides=["av.temperature=1e-3", "bootstrap=200", "pools.av.num_gpus=1"])
    assert c.av.temperature == 1e-3 and isinstance(c.av.temperature, float)
    assert c.bootstrap == 200 and isinstance(c.pools["av"].num_gpus, float)
    for bad, field in [("bootstrap=lots", "bootstrap"), ("seed=1.5", "seed"), ("pools.av.concurrency=two", "concurrency"),
                       ("av.backend=turbo", "av.backend")]:
        with pytest.raises(ValueError, match=field):
            load_config("mini", overrides=[bad])
    assert load_config("paper-gemma27b-L41").av.backend == "fused"


def test_typed_coercion_edges():
    from nla_ray.config import load_config
    from nla_ray.core.typed import coerce, coerce_text

    c = load_config("mini", overrides=["var_train=1e-3", "n=null", "seed=12345678901234567891"])
    assert c.var_train == 1e-3 and c.n is None and c.seed == 12345678901234567891
    for bad, field in [("layer=null", "layer"), ("seed=.inf", "seed"), ("seed=true", "seed"),
                       ("av.temperature=yes", "temperature")]:
        with pytest.raises(ValueError, match=field):
            load_config("mini", overrides=[bad])
    assert coerce(int, "1e3", "x") == 1000 and coerce(float, 3, "x") == 3.0
    assert coerce_text(str, "010", "x") == "010"  # text fields keep the text
    assert coerce_text(int | None, "null", "x") is None
    with pytest.raises(ValueError, match="expected a float"):
        coerce_text(float, "true", "x")
