"""Training the mini NLA pairs: LoRA adapters + a value head on the packaged base models.

Phases (each resumable from its saved output):
  collect — full-model forward over the TRAIN slice of the packaged corpus: raw block-K vectors at
            stage-0 positions, the base model's top-3 next tokens there, and the prefix text;
            `targets.make_target` turns those into explanation targets;
  ar      — AR = first K+1 blocks (+LoRA) + value head (identity init), direction-only MSE at
            mse_scale = sqrt(d) (= 2(1-cos)) between head(last-token residual) and the gold vector;
  av      — AV = base model (+LoRA), supervised: the vector is injected at injection_scale into the
            prompt slot and the model learns to write `<explanation>\\n{target}\\n</explanation>`;
  eval    — on the HELD-OUT slice, greedy: FVE (own-set Var), NMSE, cos, tag failures, a
            shuffled-pair null, and the AR alone on gold targets (its ceiling).

The ar and av phases take a deadline: when it passes they save a checkpoint (trainable weights,
value head, optimizer state, step, curve) and raise `Paused`; called again with the same
checkpoint directory they resume at that step, so a GPU that is lent in 10-minute calls can train
for longer. The data order is a pure function of the seed, so a resumed run sees the same batches.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nla_ray.core import metrics
from nla_ray.nla import templates as T
from nla_ray.nla.ar import AREngine, ValueHead
from nla_ray.nla.av import AVEngine
from nla_ray.core.batching import right_pad
from nla_ray.nla.extract import sample_positions
from nla_ray.nla.models import backbone_from_model, decoder_of, text_config
from nla_ray.training.targets import RECIPES, make_target

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class TrainConfig:
    family: str = "smollm2-L20"
    n_train_docs: int = 2000
    positions_per_doc: int = 16
    n_eval_docs: int = 200
    eval_positions_per_doc: int = 5
    seed: int = 42
    max_length: int = 1024
    lora_r: int = 8
    lora_alpha: int = 16
    ar_epochs: float = 2.0
    av_epochs: float = 2.0
    ar_lr: float = 5e-4
    head_lr: float = 1e-3
    av_lr: float = 1e-3
    ar_batch: int = 64
    av_batch: int = 32
    warmup_steps: int = 30
    max_target_tokens: int = 128
    eval_max_new_tokens: int = 144
    log_every: int = 25
    target_recipe: str = "v1"
    extra: dict = field(default_factory=dict)


def _cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, p)))


class Paused(Exception):
    """A training phase reached its deadline and saved a checkpoint; call it again to resume."""


def _ckpt_file(ckpt_dir) -> Path | None:
    return Path(ckpt_dir) / "resume.pt" if ckpt_dir else None


def _resume_key(cfg: TrainConfig, rows: list[dict], steps: int) -> dict:
    """What a checkpoint is only valid for: the config, the data (its targets) and the step count."""
    h = hashlib.sha256()
    for r in rows:
        h.update(f"{r.get('doc_id')}|{r.get('position')}|{r['target']}\n".encode())
    return {"config": config_dict(cfg), "rows": len(rows), "targets_sha256": h.hexdigest(), "steps": steps}


def _load_resume(ckpt_dir, named: dict, head, opt, log, key: dict) -> tuple[int, list, float]:
    """(start step, curve so far, seconds already spent) — (0, [], 0) when there is no checkpoint."""
    f = _ckpt_file(ckpt_dir)
    if f is None or not f.is_file():
        return 0, [], 0.0
    st = torch.load(f, map_location="cpu", weights_only=False)
    if st.get("key") != key:
        old = st.get("key") or {}
        diff = sorted(k for k in set(old) | set(key) if old.get(k) != key.get(k))
        if "config" in diff:
            oc, nc = old.get("config") or {}, key["config"]
            diff += [f"config.{k}" for k in sorted(set(oc) | set(nc)) if oc.get(k) != nc.get(k)]
        raise ValueError(f"{f}: checkpoint of another training run (differs in {diff}); delete it to start "
                         "this phase over")
    missing = set(named) ^ set(st["params"])
    if missing:
        raise ValueError(f"{f}: checkpoint parameters do not match this model ({sorted(missing)[:3]} ...)")
    with torch.no_grad():
        for n, p in named.items():
            p.copy_(st["params"][n].to(p.device, p.dtype))
        if head is not None:
            head.load_state_dict(st["head"])
    opt.load_state_dict(st["opt"])
    log(f"[resume] {f}: step {st['step']}, {st['elapsed_s']:.0f}s already trained")
    return int(st["step"]), list(st["curve"]), float(st["elapsed_s"])


def _save_resume(ckpt_dir, step: int, named: dict, head, opt, curve: list, elapsed_s: float, key: dict) -> Path:
    f = _ckpt_file(ckpt_dir)
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_name(f.name + ".tmp")
    torch.save({"key": key, "step": step, "params": {n: p.detach().cpu() for n, p in named.items()},
                "head": head.state_dict() if head is not None else None, "opt": opt.state_dict(),
                "curve": curve, "elapsed_s": elapsed_s}, tmp)
    tmp.replace(f)
    return f


def _maybe_pause(step: int, start: int, deadline: float | None, ckpt_dir, named, head, opt, curve,
                 elapsed_s: float, phase: str, key: dict) -> None:
    if deadline is None or step == start or time.time() < deadline:
        return
    if ckpt_dir is None:
        raise ValueError(f"{phase}: a deadline needs a checkpoint directory to pause into")
    f = _save_resume(ckpt_dir, step, named, head, opt, curve, elapsed_s, key)
    raise Paused(f"{phase} paused at step {step} (checkpoint {f}); run the same command again to resume")


def set_targets(rows: list[dict], recipe: str) -> list[dict]:
    """(Re)build every row's target with `recipe`, from the data the collect phase stored."""
    if recipe not in RECIPES:
        raise ValueError(f"target_recipe {recipe!r} is not one of {sorted(RECIPES)}")
    for r in rows:
        r["target"] = make_target(topic=r["topic"], prefix_text=r["prefix_text"], token=r["token"],
                                  top_next=r["top_next"], recipe=recipe)
    return rows


def torch_nmse(pred: torch.Tensor, gold: torch.Tensor, scale: float) -> torch.Tensor:
    p = pred.float() * (scale / pred.float().norm(dim=-1, keepdim=True).clamp_min(1e-12))
    g = gold.float() * (scale / gold.float().norm(dim=-1, keepdim=True).clamp_min(1e-12))
    return ((p - g) ** 2).mean(dim=-1)


# ---------------------------------------------------------------------------------------------
# collect


@torch.no_grad()
def collect(model, tok, docs, layer: int, *, positions_per_doc: int, seed: int, max_length: int,
            batch_docs: int = 8, recipe: str = "v1", log=print) -> list[dict]:
    """Full-model forward: raw hidden_states[K+1] + top-3 next tokens at stage-0 positions."""
    dev = next(model.parameters()).device
    special = set(tok.all_special_ids)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    out, t0 = [], time.time()
    for b in range(0, len(docs), batch_docs):
        chunk = []
        for d in docs[b:b + batch_docs]:
            ids = tok(d.text, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
            pos = sample_positions(ids, special, d.doc_id, seed, positions_per_doc)
            if pos:
                chunk.append((d, ids, pos))
        if not chunk:
            continue
        ids_t, mask = right_pad([c[1] for c in chunk], pad)
        # Block K's output via a hook: HF's hidden_states[-1] is final-normed when K is the last block.
        captured = {}

        def grab(_m, _i, out):
            captured["h"] = out[0] if isinstance(out, tuple) else out

        handle = decoder_of(model).layers[layer].register_forward_hook(grab)
        try:
            res = model(input_ids=ids_t.to(dev), attention_mask=mask.to(dev), use_cache=False)
        finally:
            handle.remove()
        hs = captured["h"]
        for i, (d, ids, pos) in enumerate(chunk):
            p_t = torch.tensor(pos, device=dev)
            top = res.logits[i, p_t].float().topk(3, dim=-1).indices.tolist()
            vecs = hs[i, p_t].float().cpu().numpy()
            for j, p in enumerate(pos):
                token = tok.decode([ids[p]])
                prefix = tok.decode(ids[:p + 1], skip_special_tokens=True)
                out.append({"doc_id": d.doc_id, "position": p, "topic": (d.meta or {}).get("topic", ""),
                            "token": token, "prefix_text": prefix,
                            "top_next": [tok.decode([t]) for t in top[j]], "vector": vecs[j]})
        if (b // batch_docs) % 25 == 0:
            log(f"[collect] {min(b + batch_docs, len(docs))}/{len(docs)} docs, {len(out)} rows, {time.time() - t0:.0f}s")
    return set_targets(out, recipe)


# ---------------------------------------------------------------------------------------------
# AR


def train_ar(model, tok, meta_ar, rows: list[dict], cfg: TrainConfig, log=print, *, ckpt_dir=None,
             deadline: float | None = None):
    """LoRA on blocks 0..K of `model` (in place, via PEFT) + a value head. Returns (peft_model, head, curve)."""
    from peft import LoraConfig, get_peft_model

    K = meta_ar.layer
    dev = next(model.parameters()).device
    torch.manual_seed(cfg.seed)  # the LoRA init must not depend on what ran before in this process
    peft = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                            target_modules=LORA_TARGETS, layers_to_transform=list(range(K + 1))))
    bb = backbone_from_model(peft.base_model.model, K + 1)
    head = ValueHead(meta_ar.d_model).to(dev)
    with torch.no_grad():
        head.weight.copy_(torch.eye(meta_ar.d_model, device=dev))
    engine = AREngine(bb, head, tok, meta_ar)
    params = [p for p in peft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": params, "lr": cfg.ar_lr}, {"params": engine.head.parameters(),
                             "lr": cfg.head_lr}], weight_decay=0.0)
    base_lrs = [g["lr"] for g in opt.param_groups]
    rng = np.random.default_rng(cfg.seed)
    n = len(rows)
    steps = int(cfg.ar_epochs * n / cfg.ar_batch)
    gold_all = np.stack([r["vector"] for r in rows]).astype(np.float32)
    order = np.concatenate([rng.permutation(n) for _ in range(int(math.ceil(cfg.ar_epochs)) + 1)])
    named = {n: p for n, p in peft.named_parameters() if p.requires_grad}
    key = _resume_key(cfg, rows, steps)
    start, curve, spent = _load_resume(ckpt_dir, named, engine.head, opt, log, key)
    t0 = time.time() - spent
    peft.train()
    for step in range(start, steps):
        _maybe_pause(step, start, deadline, ckpt_dir, named, engine.head, opt, curve, time.time() - t0, "ar", key)
        idx = order[step * cfg.ar_batch:(step + 1) * cfg.ar_batch]
        ids, mask, last = engine.encode([rows[i]["target"] for i in idx])
        h = bb(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False).last_hidden_state
        h_last = h[torch.arange(h.shape[0], device=dev), last.to(dev)].float()
        loss = torch_nmse(engine.head(h_last), torch.from_numpy(gold_all[idx]).to(dev), meta_ar.mse_scale).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params + list(engine.head.parameters()), 1.0)
        f = _cosine_lr(step, steps, cfg.warmup_steps)
        for g, lr in zip(opt.param_groups, base_lrs):
            g["lr"] = lr * f
        opt.step()
        if step % cfg.log_every == 0 or step == steps - 1:
            curve.append({"step": step, "loss_nmse": float(loss.detach()), "s": round(time.time() - t0, 1)})
            log(f"[ar] step {step}/{steps} nmse {float(loss.detach()):.4f} ({time.time() - t0:.0f}s)")
    peft.eval()
    return peft, engine.head, curve


# ---------------------------------------------------------------------------------------------
# AV


def end_of_turn_id(tok) -> int:
    for t in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>"):
        tid = tok.convert_tokens_to_ids(t)
        if isinstance(tid, int) and tid >= 0 and tid != tok.unk_token_id:
            return tid
    return int(tok.eos_token_id)


def _chunked_ce(model, hidden: torch.Tensor, labels: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """CE over label positions only, chunked: a 262k-word LM head over every position would not fit."""
    head = model.get_output_embeddings()
    cap = getattr(text_config(model.config), "final_logit_softcapping", None)
    total, count = hidden.new_zeros((), dtype=torch.float32), 0
    for i in range(0, hidden.shape[0], chunk):
        logits = head(hidden[i:i + chunk]).float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        total = total + F.cross_entropy(logits, labels[i:i + chunk], reduction="sum")
        count += labels[i:i + chunk].numel()
    return total / max(count, 1)


def train_av(model, tok, meta_av, rows: list[dict], cfg: TrainConfig, log=print, *, ckpt_dir=None,
             deadline: float | None = None):
    from peft import LoraConfig, get_peft_model

    dev = next(model.parameters()).device
    torch.manual_seed(cfg.seed + 1)
    peft = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                            target_modules=LORA_TARGETS))
    inner = peft.base_model.model
    engine = AVEngine(inner, tok, meta_av)
    eot = end_of_turn_id(tok)
    tgt_ids = []
    for r in rows:
        ids = tok(T.explanation_target(r["target"]), add_special_tokens=False)["input_ids"][:cfg.max_target_tokens]
        tgt_ids.append(ids + [eot])
    params = [p for p in peft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.av_lr, weight_decay=0.0)
    rng = np.random.default_rng(cfg.seed + 1)
    n = len(rows)
    steps = int(cfg.av_epochs * n / cfg.av_batch)
    order = np.concatenate([rng.permutation(n) for _ in range(int(math.ceil(cfg.av_epochs)) + 1)])
    gold_all = np.stack([r["vector"] for r in rows]).astype(np.float32)
    P = len(engine.prompt_ids)
    dec = decoder_of(inner)
    named = {n: p for n, p in peft.named_parameters() if p.requires_grad}
    key = _resume_key(cfg, rows, steps)
    start, curve, spent = _load_resume(ckpt_dir, named, None, opt, log, key)
    t0 = time.time() - spent
    peft.train()
    for step in range(start, steps):
        _maybe_pause(step, start, deadline, ckpt_dir, named, None, opt, curve, time.time() - t0, "av", key)
        idx = order[step * cfg.av_batch:(step + 1) * cfg.av_batch]
        L = max(len(tgt_ids[i]) for i in idx)
        tgt = torch.full((len(idx), L), eot, dtype=torch.long)
        lab = torch.full((len(idx), L), -100, dtype=torch.long)
        for j, i in enumerate(idx):
            tgt[j, :len(tgt_ids[i])] = torch.tensor(tgt_ids[i])
            lab[j, :len(tgt_ids[i])] = torch.tensor(tgt_ids[i])
        tgt, lab = tgt.to(dev), lab.to(dev)
        prompt = engine.prompt_embeds(torch.from_numpy(gold_all[idx]).to(dev))
        with torch.no_grad():
            temb = engine.embed(tgt)
        # Position P-1+t predicts target token t; right-padding at the end never affects earlier tokens.
        x = torch.cat([prompt, temb[:, :-1]], dim=1)
        h = dec(inputs_embeds=x, use_cache=False).last_hidden_state[:, P - 1:]
        keep = lab.reshape(-1) != -100
        loss = _chunked_ce(inner, h.reshape(-1, h.shape[-1])[keep], lab.reshape(-1)[keep])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for g in opt.param_groups:
            g["lr"] = cfg.av_lr * _cosine_lr(step, steps, cfg.warmup_steps)
        opt.step()
        if step % cfg.log_every == 0 or step == steps - 1:
            curve.append({"step": step, "loss_ce": float(loss.detach()), "s": round(time.time() - t0, 1)})
            log(f"[av] step {step}/{steps} ce {float(loss.detach()):.4f} ({time.time() - t0:.0f}s)")
    peft.eval()
    return peft, curve


# ---------------------------------------------------------------------------------------------
# eval


@torch.no_grad()
def evaluate(av: AVEngine, ar: AREngine, rows: list[dict], *, batch: int = 64, max_new_tokens: int = 112,
             seed: int = 0, log=print) -> dict:
    gold = np.stack([r["vector"] for r in rows]).astype(np.float32)
    docs = np.asarray([r["doc_id"] for r in rows])
    expl, status = [], []
    t0 = time.time()
    for i in range(0, len(rows), batch):
        for s in av.generate(gold[i:i + batch], temperature=0.0, max_new_tokens=max_new_tokens):
            expl.append(s.explanation if s.explanation is not None else s.text)
            status.append(s.status)
        log(f"[eval] generated {len(expl)}/{len(rows)} ({time.time() - t0:.0f}s)")
    rec = ar.reconstruct(expl, batch_size=batch)
    rec_gold_targets = ar.reconstruct([r["target"] for r in rows], batch_size=batch)
    scale = ar.meta.mse_scale
    var = metrics.variance_baseline(gold, scale)
    nm = metrics.nmse(rec, gold, scale)
    lo, hi, _ = metrics.fve_ci(nm, docs, var, n_boot=500, seed=seed)
    nm_t = metrics.nmse(rec_gold_targets, gold, scale)
    return {
        "n": len(rows), "n_docs": int(len(set(docs.tolist()))), "var_own": float(var),
        "fve_own": float(1 - nm.mean() / var), "fve_own_ci95": [float(lo), float(hi)],
        "nmse": float(nm.mean()), "cos": float(metrics.cosine(rec, gold).mean()),
        "tag_failure_rate": float(np.mean([s != "ok" for s in status])),
        "shuffled_null_fve": float(metrics.shuffled_null(rec, gold, scale, var, seed=seed, clusters=docs)),
        "ar_on_gold_targets_fve": float(1 - nm_t.mean() / var),
        "examples": [{"context_tail": rows[i]["prefix_text"][-160:], "explanation": expl[i],
                      "target": rows[i]["target"], "nmse": float(nm[i])} for i in range(min(12, len(rows)))],
    }


def config_dict(cfg: TrainConfig) -> dict:
    return asdict(cfg)
