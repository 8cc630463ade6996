"""Shared fixtures: offline tokenizers of the packaged small models and tiny random decoders.

The tokenizers come from the packaged GGUF models (``pkg:smollm2-135m``, ``pkg:gemma3-270m``),
dequantized once into the nla_ray cache; no network access is needed. The models are built from
configs with random weights (seeded), so every test that uses them runs in seconds.
"""

import os

# Nothing in these tests may reach for the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from types import SimpleNamespace

import pytest
import torch

TINY_D = 64
TINY_LAYERS = 4


def _packaged_tokenizer(spec: str):
    from transformers import AutoTokenizer

    from nla_ray.nla import sources

    try:
        path = sources.resolve(spec).path
    except sources.ModelSourceError as e:  # the packaged model is not installed here
        pytest.skip(f"{spec} unavailable: {e}")
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="session")
def smollm_tok():
    """SmolLM2-135M-Instruct tokenizer (byte-level BPE, ChatML template, no <bos> on raw text)."""
    return _packaged_tokenizer("pkg:smollm2-135m")


@pytest.fixture(scope="session")
def gemma_tok():
    """Gemma-3 tokenizer (SentencePiece, <bos> added on raw text, Gemma turn template)."""
    return _packaged_tokenizer("pkg:gemma3-270m")


@pytest.fixture(scope="session")
def tiny_llama(smollm_tok):
    """Random 4-block Llama-style decoder whose vocabulary matches the SmolLM2 tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1234)
    cfg = LlamaConfig(vocab_size=len(smollm_tok), hidden_size=TINY_D, num_hidden_layers=TINY_LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                      max_position_embeddings=2048, bos_token_id=smollm_tok.bos_token_id,
                      eos_token_id=smollm_tok.eos_token_id, pad_token_id=smollm_tok.pad_token_id)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def tiny_gemma(gemma_tok):
    """Random 4-block Gemma-3 text decoder (sqrt(d)-scaled embedding, sliding + global layers)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(4321)
    cfg = Gemma3TextConfig(vocab_size=len(gemma_tok), hidden_size=TINY_D, intermediate_size=128,
                           num_hidden_layers=TINY_LAYERS, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                           layer_types=["sliding_attention", "full_attention",
                                        "sliding_attention", "full_attention"],
                           max_position_embeddings=2048, bos_token_id=gemma_tok.bos_token_id,
                           eos_token_id=gemma_tok.eos_token_id, pad_token_id=gemma_tok.pad_token_id)
    return Gemma3ForCausalLM(cfg).eval()


@pytest.fixture(scope="session", params=["llama", "gemma3"])
def tiny(request):
    """Either tiny family: .name, .model, .tok, .d, .n_layers."""
    if request.param == "llama":
        model, tok = request.getfixturevalue("tiny_llama"), request.getfixturevalue("smollm_tok")
    else:
        model, tok = request.getfixturevalue("tiny_gemma"), request.getfixturevalue("gemma_tok")
    return SimpleNamespace(name=request.param, model=model, tok=tok, d=TINY_D, n_layers=TINY_LAYERS)


@pytest.fixture(scope="module")
def torch_single_thread():
    """Run a module's tiny-model work on one intra-op thread, then restore the setting.

    The tiny models gain nothing from threading, and on a busy 2-core box OpenMP threads competing
    with another process made the decoding tests several times slower.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
