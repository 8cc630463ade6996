"""Shared fixtures: offline tokenizers of the packaged small models and tiny random decoders.

The tokenizers come from the packaged GGUF models (``pkg:smollm2-135m``, ``pkg:gemma3-270m``),
dequantized once into the nla_ray cache; no network access is needed. The models are built from
configs with random weights (seeded), so every test that uses them runs in seconds.
"""

import json
import os
from pathlib import Path

# Nothing in these tests may reach for the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from types import SimpleNamespace

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
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


# ---------------------------------------------------------------------------------------------
# two tiny families (random decoders on the real tokenizers) as presets, for the analysis jobs


def _tiny_family(tmp: Path, name: str, model, tok, layer: int, partner: str) -> Path:
    from nla_ray.nla import pairs

    base = tmp / f"{name}-base"
    model.save_pretrained(base, safe_serialization=True)
    tok.save_pretrained(base)
    pair = pairs.write_pair(tmp / f"{name}-pair", base_spec=str(base), model=model, tokenizer=tok, layer=layer,
                            copy_weights=True)
    cfg = {"pair": f"{pair / 'av'},{pair / 'ar'}", "base": str(base), "layer": layer, "n_docs": 3,
           "positions_per_doc": 2, "max_length": 256, "partner": partner, "bootstrap": 50,
           "corpus": {"kind": "packaged_bbc", "split": "heldout"},
           "av": {"max_new_tokens": 6},
           "pools": {p: {"num_cpus": 1, "batch_size": 4, "dtype": "float32"} for p in ("extract", "av", "ar")}}
    path = tmp / f"{name}.yaml"
    path.write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="session")
def tiny_families(tmp_path_factory, tiny_llama, smollm_tok, tiny_gemma, gemma_tok):
    tmp = tmp_path_factory.mktemp("fam")
    a = _tiny_family(tmp, "tl", tiny_llama, smollm_tok, 2, str(tmp / "tg.yaml"))
    _tiny_family(tmp, "tg", tiny_gemma, gemma_tok, 1, str(a))
    return tmp, a


def _load_job(name):
    """A module of jobs/ by name (they are scripts, not a package)."""
    import importlib
    import sys

    sys.path.insert(0, str(REPO / "jobs"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(REPO / "jobs"))


@pytest.fixture(scope="session")
def load_job():
    return _load_job
