"""Fine-tuned variants of a base model (same architecture, other weights), made as small LoRA adapters.

checkpoint_transfer asks how a pair trained on one base reads activations of that base after further
fine-tuning. The release's case is IT -> SFT / DPO checkpoints of a 27B model; here the variants are
made from the mini base itself, on the packaged corpus, so the drift is known and reproducible:

  sft     next-token cross-entropy on documents of one topic (a short and a longer run)
  dpo     the DPO loss (Rafailov et al. 2023) on preference pairs built from the corpus: a document's
          opening as the prompt, its true continuation as `chosen`, another document's continuation
          as `rejected`; the reference model is the base itself (the adapter switched off)

The adapters cover blocks 0..max_block only: a pair reading layer K sees nothing of the blocks above
it, so adapting them would add bytes and no drift. Each variant records its recipe and loss curve.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class VariantRecipe:
    name: str
    kind: str                  # "sft" | "dpo"
    steps: int
    lr: float
    topic: str | None = None   # sft: the corpus topic it is tuned on
    batch: int = 4
    seq_len: int = 128
    lora_r: int = 8
    lora_alpha: int = 16
    max_block: int = 20
    beta: float = 0.1          # dpo: strength of the KL anchor to the reference
    prompt_len: int = 48       # dpo: tokens of the document opening used as the prompt
    completion_len: int = 32   # dpo: tokens of each continuation
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def save_adapter(peft_model, directory) -> None:
    """A PEFT adapter stored fp16 (a few MB to ship; it loads onto an fp32 base unchanged)."""
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    directory = Path(directory)
    peft_model.save_pretrained(str(directory), safe_serialization=True)
    f = directory / "adapter_model.safetensors"
    save_file({k: v.to(torch.float16).contiguous() for k, v in load_file(str(f)).items()}, str(f))
    for extra in directory.glob("README.md"):  # PEFT's model card template: not ours to ship
        extra.unlink()


def with_lora(model, recipe: VariantRecipe):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lora_dropout=0.0,
                                            target_modules=LORA_TARGETS,
                                            layers_to_transform=list(range(recipe.max_block + 1))))


def token_windows(tok, texts: list[str], length: int, seed: int) -> list[list[int]]:
    """Every full `length`-token window of each text (no special tokens), shuffled with `seed`."""
    out = []
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        out.extend(ids[i:i + length] for i in range(0, len(ids) - length + 1, length))
    random.Random(seed).shuffle(out)
    return out


def preference_pairs(tok, texts: list[str], prompt_len: int, completion_len: int, seed: int) -> list[tuple]:
    """(prompt, chosen, rejected) token lists: a document's opening, its own continuation, and the
    continuation of another document (a derangement, so no text is paired with itself)."""
    need = prompt_len + completion_len
    docs = [ids for ids in (tok(t, add_special_tokens=False)["input_ids"] for t in texts) if len(ids) >= need]
    if len(docs) < 2:
        raise ValueError(f"preference pairs need >= 2 documents of >= {need} tokens, got {len(docs)}")
    rng = random.Random(seed)
    order = list(range(len(docs)))
    rng.shuffle(order)
    pairs = []
    for k, i in enumerate(order):
        j = order[(k + 1) % len(order)]
        pairs.append((docs[i][:prompt_len], docs[i][prompt_len:need], docs[j][prompt_len:need]))
    return pairs


def completion_logprob(model, prompts: list[list[int]], completions: list[list[int]]) -> torch.Tensor:
    """Sum of log p(completion | prompt) per row (equal lengths within a batch, so no padding)."""
    ids = torch.tensor([p + c for p, c in zip(prompts, completions)])
    logits = model(input_ids=ids).logits[:, :-1].float()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    n = len(completions[0])
    return logp[:, -n:].sum(-1)


def dpo_loss(pol_c, pol_r, ref_c, ref_r, beta: float) -> torch.Tensor:
    """−log σ(β[(log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r))]), averaged over the batch."""
    return -F.logsigmoid(beta * ((pol_c - ref_c) - (pol_r - ref_r))).mean()


def _lr(step: int, total: int, warmup: int = 5) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def train_variant(model, tok, texts: list[str], recipe: VariantRecipe, *, log=print) -> tuple[object, list[dict]]:
    """LoRA-tune `model` on `texts` by `recipe`; returns (peft model, loss curve)."""
    torch.manual_seed(recipe.seed)
    peft = with_lora(model, recipe)
    peft.train()
    params = [p for p in peft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr(s, recipe.steps))
    if recipe.kind == "sft":
        data = token_windows(tok, texts, recipe.seq_len, recipe.seed)
    elif recipe.kind == "dpo":
        data = preference_pairs(tok, texts, recipe.prompt_len, recipe.completion_len, recipe.seed)
    else:
        raise ValueError(f"recipe {recipe.name}: kind must be 'sft' or 'dpo', got {recipe.kind!r}")
    if len(data) < recipe.batch:
        raise ValueError(f"recipe {recipe.name}: {len(data)} training items, fewer than one batch ({recipe.batch})")
    curve, t0 = [], time.time()
    for step in range(recipe.steps):
        lo = (step * recipe.batch) % (len(data) - recipe.batch + 1)
        batch = data[lo:lo + recipe.batch]
        if recipe.kind == "sft":
            ids = torch.tensor(batch)
            loss = peft(input_ids=ids, labels=ids).loss
            extra = {}
        else:
            prompts, chosen, rejected = zip(*batch)
            with torch.no_grad(), peft.disable_adapter():
                ref_c = completion_logprob(peft, list(prompts), list(chosen))
                ref_r = completion_logprob(peft, list(prompts), list(rejected))
            pol_c = completion_logprob(peft, list(prompts), list(chosen))
            pol_r = completion_logprob(peft, list(prompts), list(rejected))
            loss = dpo_loss(pol_c, pol_r, ref_c, ref_r, recipe.beta)
            margin = ((pol_c - ref_c) - (pol_r - ref_r)).mean().item()
            extra = {"reward_margin": round(margin, 4)}
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        curve.append({"step": step, "loss": round(float(loss.detach()), 5), "s": round(time.time() - t0, 1), **extra})
        if step % 10 == 0 or step == recipe.steps - 1:
            log(f"[{recipe.name}] step {step + 1}/{recipe.steps} loss {float(loss):.4f} "
                + " ".join(f"{k} {v}" for k, v in extra.items()) + f" ({time.time() - t0:.0f}s)")
    peft.eval()
    return peft, curve
