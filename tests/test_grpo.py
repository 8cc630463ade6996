"""GRPO mechanics on tiny random models: teacher-forced log-probs, advantages, one update."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from nla_ray.training import grpo
from nla_ray.nla import pairs
from nla_ray.nla.ar import AREngine, ValueHead
from nla_ray.nla.av import AVEngine
from nla_ray.nla.models import backbone_from_model

pytestmark = pytest.mark.usefixtures("torch_single_thread")
D, K = 64, 2


def _engines(tiny_llama, smollm_tok):
    from peft import LoraConfig, get_peft_model

    av_meta, ar_meta = pairs.build_metas(smollm_tok, D, K, 10.0)
    policy = get_peft_model(copy.deepcopy(tiny_llama), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    av = AVEngine(policy.base_model.model, smollm_tok, av_meta, max_new_tokens=6)
    head = ValueHead(D)
    with torch.no_grad():
        head.weight.copy_(torch.eye(D))
    ar = AREngine(backbone_from_model(copy.deepcopy(tiny_llama), K + 1), head, smollm_tok, ar_meta)
    return policy, av, ar


def test_sequence_logprobs_match_a_full_forward(tiny_llama, smollm_tok):
    _, av, _ = _engines(tiny_llama, smollm_tok)
    vec = torch.randn(2, D)
    rows = [[11, 22, 33], [44, 55]]
    got = grpo.sequence_logprobs(av, vec, rows)
    for i, r in enumerate(rows):
        emb = av.prompt_embeds(vec[i:i + 1])
        full = torch.cat([emb, av.embed(torch.tensor([r]))], dim=1)
        with torch.no_grad():
            logits = av.model(inputs_embeds=full).logits[0].float()
        P = emb.shape[1]
        lp = torch.log_softmax(logits[P - 1:P - 1 + len(r)], -1)[torch.arange(len(r)), torch.tensor(r)]
        assert got[i].item() == pytest.approx(lp.mean().item(), abs=1e-4)


def test_group_advantages_are_normalised_within_groups():
    a = grpo.group_advantages(np.array([1.0, 2.0, 3.0, 10.0, 10.0, 10.0]), 3)
    np.testing.assert_allclose(a[:3].mean(), 0, atol=1e-9)
    assert a[0] < a[1] < a[2]
    np.testing.assert_allclose(a[3:], 0, atol=1e-6)  # equal rewards: no signal, no update direction


def test_one_grpo_step_updates_only_the_adapter(tiny_llama, smollm_tok):
    policy, av, ar = _engines(tiny_llama, smollm_tok)
    rows = [{"vector": np.random.default_rng(i).standard_normal(D).astype(np.float32)} for i in range(4)]
    lora_before = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    frozen_before = {n: p.detach().clone() for n, p in policy.named_parameters() if not p.requires_grad}
    # A random tiny AV never closes its tag, so every sample would get the same failure reward and
    # a zero advantage; score the raw text instead so the rewards differ within each group.
    finish = av._finish

    def as_ok(row):
        s = finish(row)
        s.status, s.explanation = "ok", s.text
        return s

    av._finish = as_ok
    cfg = grpo.GRPOConfig(steps=2, group=2, prompts_per_step=2, max_new_tokens=5, lr=1e-2, log_every=1,
                          temperature=1.0)
    curve = grpo.grpo_train(av, ar, rows, cfg, log=lambda m: None)
    assert len(curve) == 2 and all(np.isfinite(c["reward_mean"]) for c in curve)
    assert all(c["tag_fail_rate"] == 0 for c in curve)
    changed = [n for n, p in policy.named_parameters() if p.requires_grad and not torch.equal(p, lora_before[n])]
    assert changed, "no adapter parameter moved"
    assert all(torch.equal(p, frozen_before[n]) for n, p in policy.named_parameters() if not p.requires_grad)


def test_grpo_refuses_a_frozen_policy(tiny_llama, smollm_tok):
    av_meta, ar_meta = pairs.build_metas(smollm_tok, D, K, 10.0)
    frozen = copy.deepcopy(tiny_llama).requires_grad_(False)
    av = AVEngine(frozen, smollm_tok, av_meta)
    ar = AREngine(backbone_from_model(copy.deepcopy(tiny_llama), K + 1), ValueHead(D), smollm_tok, ar_meta)
    with pytest.raises(ValueError, match="trainable"):
        grpo.grpo_train(av, ar, [{"vector": np.ones(D, np.float32)}] * 2, grpo.GRPOConfig(steps=1), log=print)


def test_identical_rewards_give_no_update(tiny_llama, smollm_tok):
    """All samples failing the tag check share the failure reward: zero advantage, no step."""
    policy, av, ar = _engines(tiny_llama, smollm_tok)
    before = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    rows = [{"vector": np.random.default_rng(i).standard_normal(D).astype(np.float32)} for i in range(2)]
    curve = grpo.grpo_train(av, ar, rows, grpo.GRPOConfig(steps=1, group=2, prompts_per_step=2, max_new_tokens=4),
                            log=lambda m: None)
    assert curve[0]["tag_fail_rate"] == 1.0
    assert all(torch.equal(p, before[n]) for n, p in policy.named_parameters() if p.requires_grad)


def test_grpo_stops_at_its_deadline_after_one_whole_step(tiny_llama, smollm_tok):
    _, av, ar = _engines(tiny_llama, smollm_tok)
    rows = [{"vector": np.random.default_rng(i).standard_normal(D).astype(np.float32)} for i in range(2)]
    msgs = []
    curve = grpo.grpo_train(av, ar, rows, grpo.GRPOConfig(steps=50, group=2, prompts_per_step=2, max_new_tokens=3,
                                                          log_every=10), log=msgs.append, deadline=0.0)
    assert [c["step"] for c in curve] == [0]
    assert any("deadline reached after 1 of 50 steps" in m for m in msgs)
