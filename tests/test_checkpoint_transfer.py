"""Fine-tuned variants (training/variants.py) and the checkpoint_transfer job on tiny models."""

import copy
import json
import math

import numpy as np
import pytest
import torch

from nla_ray.analysis import transfer as T
from nla_ray.training import variants as V


def test_dpo_loss_is_log2_at_the_reference_and_falls_with_the_margin():
    z = torch.zeros(3)
    assert V.dpo_loss(z, z, z, z, beta=0.1).item() == pytest.approx(math.log(2))
    better = V.dpo_loss(torch.full((3,), 2.0), z, z, z, beta=0.5).item()
    assert better == pytest.approx(-math.log(1 / (1 + math.exp(-1.0))))  # -log σ(0.5 * 2)
    assert V.dpo_loss(z, torch.full((3,), 2.0), z, z, beta=0.5).item() > math.log(2)


def test_preference_pairs_never_pair_a_document_with_itself(smollm_tok):
    texts = [f"Document number {i} says something about topic {i} and then goes on for a while " * 4 for i in range(5)]
    pairs = V.preference_pairs(smollm_tok, texts, prompt_len=8, completion_len=6, seed=3)
    assert len(pairs) == 5
    for prompt, chosen, rejected in pairs:
        assert len(prompt) == 8 and len(chosen) == len(rejected) == 6 and chosen != rejected
        ids = [smollm_tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        src = [k for k, x in enumerate(ids) if x[:8] == prompt][0]
        assert ids[src][8:14] == chosen  # chosen is the prompt's own continuation
    with pytest.raises(ValueError, match=">= 2 documents"):
        V.preference_pairs(smollm_tok, ["short"], 8, 6, 0)


def test_token_windows_are_full_and_cover_the_text(smollm_tok):
    text = "one two three four five six seven eight nine ten " * 3
    ids = smollm_tok(text, add_special_tokens=False)["input_ids"]
    w = V.token_windows(smollm_tok, [text], 7, seed=0)
    assert all(len(x) == 7 for x in w) and len(w) == len(ids) // 7
    assert sorted(map(tuple, w)) == sorted(tuple(ids[i:i + 7]) for i in range(0, len(ids) - 6, 7))


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_train_variant_adapts_only_blocks_up_to_max_block(kind, tiny_llama, smollm_tok, tmp_path):
    texts = ["The match ended two all after a late goal from the visiting side in the rain. " * 6] * 4
    r = V.VariantRecipe("v", kind, steps=2, lr=1e-3, batch=2, seq_len=16, max_block=1, prompt_len=8,
                        completion_len=4)
    peft, curve = V.train_variant(copy.deepcopy(tiny_llama), smollm_tok, texts, r, log=lambda m: None)
    assert len(curve) == 2 and all(math.isfinite(c["loss"]) for c in curve)
    V.save_adapter(peft, tmp_path / "adapter")
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    blocks = {int(k.split("layers.")[1].split(".")[0]) for k in state}
    assert blocks == {0, 1} and all(v.dtype == torch.float16 for v in state.values())
    assert not (tmp_path / "adapter" / "README.md").exists()


def test_drift_of_a_model_against_itself_is_exactly_zero():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 8)).astype(np.float32)
    d = T.drift(x, x.copy(), [i // 3 for i in range(12)], scale=math.sqrt(8), n_boot=20)
    assert d["nmse"] == 0.0 and d["nmse_ci95"] == [0.0, 0.0] and d["cos"] == pytest.approx(1.0, abs=1e-6)
    moved = T.drift(x, x + rng.normal(size=x.shape).astype(np.float32), [i // 3 for i in range(12)], math.sqrt(8),
                    n_boot=20)
    assert moved["nmse"] > 0.1 and moved["cos"] < 1
    assert T.degradation(0.3, 0.5) == {"fve_lost": pytest.approx(0.2), "fve_retained": pytest.approx(0.6)}


def _perturbed_variant(model, directory):
    """The base plus a LoRA adapter with random (non-zero) B matrices: a real, different checkpoint."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(7)
    peft = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=V.LORA_TARGETS))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    V.save_adapter(peft, directory / "adapter")


def test_checkpoint_transfer_job_on_tiny_variants(tiny_families, tiny_llama, load_job):
    """The base's own weights as a 'variant' drift exactly 0 and transfer exactly; a perturbed one drifts."""
    import ray

    tmp, preset = tiny_families
    _perturbed_variant(tiny_llama, tmp / "variants" / "perturbed")
    out = tmp / "ckpt"
    try:
        rc = load_job("checkpoint_transfer").JOB.entry(
            ["--preset", str(preset), "--out", str(out), "--store", str(tmp / "store_ckpt"),
             "--variants", f"{tmp / 'tl-base'},{tmp / 'variants' / 'perturbed'}"])
    finally:
        ray.shutdown()
    assert rc == 0
    h = json.loads((out / "summary.json").read_text())["headline"]["checkpoints"]
    assert set(h) == {"base", "tl-base", "perturbed"}
    same, moved = h["tl-base"], h["perturbed"]
    assert same["drift_nmse"] == pytest.approx(0.0, abs=1e-6) and same["fve"] == pytest.approx(h["base"]["fve"])
    assert moved["drift_nmse"] > 1e-3 and moved["n"] == h["base"]["n"] == 6
    assert (out / "checkpoint_transfer.png").stat().st_size > 0
    assert load_job("checkpoint_transfer").JOB.entry(["--preset", str(preset), "--out", str(tmp / "x"),
                                                      "--variants", str(tmp / "nope")]) == 2
