"""Integration on the packaged small models (CPU): the real Gemma-3 tokenizer's token facts, and a
full vector -> text -> vector round trip through the mini SmolLM2 pair on a packaged BBC document.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from nla_ray.core import metrics as M
from nla_ray.nla import pairs
from nla_ray.nla import sources
from nla_ray.nla import templates as T
from nla_ray.nla.extract import MIN_POSITION, Extractor
from nla_ray.nla.models import load_backbone

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("torch_single_thread")]

GEMMA_CHAR = "\u321c"  # ㈜
GEMMA_CHAR_ID = 246566


def test_gemma3_injection_token_and_neighbours(gemma_tok):
    tok = gemma_tok
    assert tok.encode(GEMMA_CHAR, add_special_tokens=False) == [GEMMA_CHAR_ID]
    assert GEMMA_CHAR_ID != tok.unk_token_id
    ids = T.av_prompt_ids(tok, T.DEFAULT_AV_TEMPLATE, GEMMA_CHAR)
    assert ids.count(GEMMA_CHAR_ID) == 1
    slot = ids.index(GEMMA_CHAR_ID)
    assert tok.decode([ids[slot - 1]]) == ">"
    assert tok.decode([ids[slot + 1]]) == "</"
    assert ids[0] == tok.bos_token_id
    assert T.count_leading_bos(ids, tok.bos_token_id) == 1
    # the release's character is the one chosen for this tokenizer
    assert pairs.choose_injection_char(tok) == GEMMA_CHAR
    # the AR prompt (raw string, add_special_tokens=True) also gets exactly one <bos>
    ar_ids = tok(T.ar_prompt(T.DEFAULT_AR_TEMPLATE, "An explanation."), add_special_tokens=True)["input_ids"]
    assert T.count_leading_bos(ar_ids, tok.bos_token_id) == 1


@pytest.fixture(scope="module")
def mini_pair():
    dirs = pairs.resolve_pair("mini:smollm2-L20")
    # the trained pair that ships in the package, never a stand-in built on the fly
    assert Path(dirs.av) == pairs.SHIPPED_DIR / "smollm2-L20" / "av"
    assert (Path(dirs.av) / "adapter" / "adapter_model.safetensors").is_file()
    av = pairs.load_av(dirs.av, device="cpu", max_new_tokens=64)
    ar = pairs.load_ar(dirs.ar, device="cpu")
    return av, ar


def test_mini_pair_round_trip(mini_pair):
    from nla_ray.nla.corpora import PackagedBBCNews

    av, ar = mini_pair
    layer = ar.meta.layer
    assert layer == pairs.MINI_PAIRS["smollm2-L20"]["layer"] == 20
    assert av.meta.d_model == ar.meta.d_model == 576
    assert T.count_leading_bos(av.prompt_ids, av.tok.bos_token_id) <= 1
    assert av.prompt_ids[av.slot - 1] == av.meta.left_neighbor_id
    assert av.prompt_ids[av.slot + 1] == av.meta.right_neighbor_id

    # stage 0 on the base model (not the AV/AR, which may carry trained adapters)
    base = sources.resolve(pairs.MINI_PAIRS["smollm2-L20"]["base"]).path
    backbone = load_backbone(base, layer + 1, device=torch.device("cpu"), dtype=torch.float32)
    doc = next(iter(PackagedBBCNews(split="heldout", limit=1)))
    ex = Extractor(backbone, av.tok, [layer], model_id="pkg:smollm2-135m", positions_per_doc=2)
    rows = ex.extract([(doc.doc_id, doc.text)])
    assert len(rows) == 2 and ex.stats.docs_short == 0
    assert all(r["position"] >= MIN_POSITION and r["doc_id"] == doc.doc_id for r in rows)
    vectors = np.stack([r["vector"] for r in rows])
    assert vectors.shape == (2, 576) and np.isfinite(vectors).all()

    first = av.generate(vectors)
    second = av.generate(vectors)
    assert [s.text for s in first] == [s.text for s in second]
    assert all(0 < s.n_tokens <= 64 for s in first)
    # The trained AV writes its tagged explanation (held-out tag failures are 0%); the base model
    # without the adapter writes generic prose with no tag, which this catches.
    assert all(s.status == "ok" and s.explanation for s in first), [s.text for s in first]

    recon = ar.reconstruct([s.explanation for s in first])
    assert recon.shape == (2, 576) and recon.dtype == np.float32
    assert np.isfinite(recon).all()
    nmse = M.nmse(recon, vectors, ar.meta.mse_scale)
    # Trained pair: mean held-out NMSE 0.23 over 1000 activations; an untrained pair sits near 1.
    assert np.isfinite(nmse).all() and float(np.mean(nmse)) < 0.7, nmse
