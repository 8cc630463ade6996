"""GRPO-style refinement of a supervised AV against a frozen AR (reward = -NMSE).

For each step: draw `prompts_per_step` training activations, sample `group` explanations for each
at `temperature` (per-sample seeds, so a step is reproducible), score every explanation with the AR
(reward = -NMSE at mse_scale; a decode without a closed tag gets `fail_reward`, the release's -2),
normalise rewards within each group (advantage = (r - mean) / (std + eps)), and take a policy-
gradient step on the length-normalised log-probability of each sample. No KL term: the LoRA
starts from the SFT adapter and the step count is small; the held-out FVE before and after is what
decides whether the stage is kept.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from nla_ray.nla.av import AVEngine, sample_seed
from nla_ray.nla.models import decoder_of


@dataclass
class GRPOConfig:
    steps: int = 200
    group: int = 8
    prompts_per_step: int = 8
    lr: float = 2e-4
    temperature: float = 1.0
    max_new_tokens: int = 144
    fail_reward: float = -2.0
    seed: int = 0
    log_every: int = 10


def sequence_logprobs(engine: AVEngine, vectors: torch.Tensor, rows: list[list[int]]) -> torch.Tensor:
    """Mean log-probability per sampled token of each row, teacher-forced after the injected prompt.

    Rows are the generated ids up to and including their stop token (as `_generate_loop` returns
    them after trimming); padding positions are masked out.
    """
    model = engine.model
    dev = engine.device
    lengths = [max(1, len(r)) for r in rows]
    L = max(lengths)
    pad = engine.stop_ids[0]
    ids = torch.full((len(rows), L), pad, dtype=torch.long, device=dev)
    mask = torch.zeros((len(rows), L), dtype=torch.bool, device=dev)
    for i, r in enumerate(rows):
        if r:
            ids[i, :len(r)] = torch.tensor(r, device=dev)
            mask[i, :len(r)] = True
    prompt = engine.prompt_embeds(vectors)
    with torch.no_grad():
        temb = engine.embed(ids)
    x = torch.cat([prompt, temb[:, :-1]], dim=1)
    P = prompt.shape[1]
    h = decoder_of(model)(inputs_embeds=x, use_cache=False).last_hidden_state[:, P - 1:]
    logits = model.get_output_embeddings()(h).float()
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    lp = torch.gather(F.log_softmax(logits, dim=-1), 2, ids[..., None])[..., 0]
    return (lp * mask).sum(1) / mask.sum(1).clamp_min(1)


def group_advantages(rewards: np.ndarray, group: int) -> np.ndarray:
    r = rewards.reshape(-1, group)
    return ((r - r.mean(1, keepdims=True)) / (r.std(1, keepdims=True) + 1e-6)).reshape(-1)


def grpo_train(av: AVEngine, ar, rows: list[dict], cfg: GRPOConfig, log=print,
               deadline: float | None = None) -> list[dict]:
    """Update the trainable parameters of `av.model` (e.g. a PEFT adapter) in place.

    With a deadline the loop stops early (after a whole step) and the last curve point records the
    step it reached, so a report can say how many steps actually ran."""
    from nla_ray.core import metrics

    params = [p for p in av.model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the AV has no trainable parameters (load its adapter with is_trainable=True)")
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    gold_all = np.stack([r["vector"] for r in rows]).astype(np.float32)
    rng = np.random.default_rng(cfg.seed)
    curve, t0 = [], time.time()
    for step in range(cfg.steps):
        idx = rng.choice(len(rows), size=cfg.prompts_per_step, replace=False)
        rep = np.repeat(idx, cfg.group)
        vec = torch.from_numpy(gold_all[rep]).to(av.device)
        seeds = [sample_seed(cfg.seed, "grpo", step, int(i), g) for i in idx for g in range(cfg.group)]
        av.model.eval()
        with torch.no_grad():
            toks = av._generate_loop(av.prompt_embeds(vec), cfg.temperature, seeds, None, cfg.max_new_tokens)
        samples = [av._finish(t) for t in toks]
        texts = [s.explanation if s.explanation is not None else s.text for s in samples]
        nm = metrics.nmse(ar.reconstruct(texts), gold_all[rep], ar.meta.mse_scale)
        ok = np.array([s.status == "ok" for s in samples])
        rewards = np.where(ok, -nm, cfg.fail_reward).astype(np.float64)
        adv = torch.tensor(group_advantages(rewards, cfg.group), dtype=torch.float32, device=av.device)
        av.model.train()
        logp = sequence_logprobs(av, vec, toks)
        loss = -(adv * logp).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        stop = deadline is not None and time.time() > deadline
        if step % cfg.log_every == 0 or step == cfg.steps - 1 or stop:
            curve.append({"step": step, "reward_mean": float(rewards.mean()), "nmse_ok_mean": float(nm[ok].mean()) if ok.any() else None,
                          "tag_fail_rate": float(1 - ok.mean()), "loss": float(loss.detach()), "s": round(time.time() - t0, 1)})
            log(f"[grpo] step {step}/{cfg.steps} reward {rewards.mean():.4f} tag-fail {1 - ok.mean():.2f} "
                f"({time.time() - t0:.0f}s)")
        if stop:
            log(f"[grpo] deadline reached after {step + 1} of {cfg.steps} steps")
            break
    av.model.eval()
    return curve
