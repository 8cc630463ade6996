"""Make fine-tuned variants of a preset's base model, for checkpoint_transfer: same architecture,
other weights, each a small LoRA adapter with the recipe and loss curve that made it.

The release's question is a pair trained on one checkpoint reading another (IT -> SFT / DPO). The
mini world makes its own: on the packaged corpus's TRAIN slice, a short and a longer SFT on one topic
and a DPO step on preference pairs built from the corpus (see nla_ray/training/variants.py). The
adapters cover blocks 0..layer (the pair reads layer `layer`; the blocks above it cannot change what
it sees). Variants go to <--out>/<name>/ (adapter/ + variant.json); `--ship` writes them to
nla_ray/variants/<base>/, where checkpoint_transfer finds them by default.

  python jobs/train_variants.py --preset mini                    # all recipes, into runs/train_variants/mini
  python jobs/train_variants.py --preset mini --only dpo --set variant.steps=10
  python jobs/train_variants.py --preset mini --ship             # replace the shipped variants
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `ray job submit` working dirs

from nla_ray.core.typed import set_fields  # noqa: E402
from nla_ray.jobkit import Context, Job, Result, Table, UserError, repo_root  # noqa: E402
from nla_ray.training import variants as V  # noqa: E402

# The recipes (steps sized so all three train in ~15 minutes on 2 CPU cores).
RECIPES = [
    V.VariantRecipe("sft-short", "sft", steps=20, lr=1e-3, topic="sports", seq_len=64),
    V.VariantRecipe("sft-long", "sft", steps=80, lr=2e-3, topic="sports", seq_len=64),
    V.VariantRecipe("dpo", "dpo", steps=40, lr=5e-4, beta=0.1),
]
TRAIN_DOCS = 300   # training documents per recipe, spread over the train slice (or the topic's part of it)


def shipped_dir(base: str) -> Path:
    return repo_root() / "nla_ray" / "variants" / base.split(":", 1)[-1]


def _args(p) -> None:
    p.add_argument("--only", help=f"comma list of recipes (default all: {', '.join(r.name for r in RECIPES)})")
    p.add_argument("--ship", action="store_true", help="write to nla_ray/variants/<base>/ (replacing those shipped)")
    p.add_argument("--device", default="auto")


ONE_PROCESS = "variants train in one process"
JOB = Job("train_variants", __doc__, add_args=_args, own_sets=("variant",),
          unused={"ray_address": ONE_PROCESS, "store": ONE_PROCESS, "verify_against": ONE_PROCESS,
                  "n": "the recipes fix their steps (--set variant.steps=N)"})


@JOB.main
def run(ctx: Context) -> Result:
    import torch
    from transformers import AutoTokenizer

    from nla_ray.nla import sources
    from nla_ray.nla.corpora import PackagedBBCNews
    from nla_ray.nla.models import load_causal_lm, resolve_device

    cfg, a = ctx.cfg, ctx.args
    names = [r.name for r in RECIPES]
    only = [x.strip() for x in a.only.split(",")] if a.only else names
    bad = [x for x in only if x not in names]
    if bad:
        raise UserError(f"--only: unknown recipe(s) {bad}; recipes: {names}")
    res = sources.resolve(cfg.base)
    tok = AutoTokenizer.from_pretrained(res.path)
    dev = resolve_device(a.device)
    out_root = shipped_dir(cfg.base) if a.ship else ctx.out
    with ctx.timer("load_documents"):
        texts = {d.doc_id: d.text for d in PackagedBBCNews(split="train").iter_documents()}
    rows, curves = [], {}
    for recipe in (copy.deepcopy(r) for r in RECIPES if r.name in only):
        set_fields(recipe, ctx.own_sets["variant"], "--set variant")
        recipe.max_block, recipe.seed = cfg.layer, cfg.seed
        docs = [t for d, t in texts.items() if recipe.topic is None or d.split(":")[1].split("/")[0] == recipe.topic]
        docs = docs[::max(1, len(docs) // TRAIN_DOCS)][:TRAIN_DOCS]  # spread over the slice (all topics for dpo)
        if not docs:
            raise UserError(f"recipe {recipe.name}: no training documents of topic {recipe.topic!r}")
        t0 = time.time()
        with ctx.timer(recipe.name):
            model = load_causal_lm(res.path, device=dev, dtype=torch.float32)
            peft, curve = V.train_variant(model, tok, docs, recipe, log=ctx.log)
        d = out_root / recipe.name
        shutil.rmtree(d, ignore_errors=True)
        (d / "adapter").mkdir(parents=True)
        V.save_adapter(peft, d / "adapter")
        info = {"name": recipe.name, "base": cfg.base, "base_sha256": res.sha256, "recipe": recipe.to_dict(),
                "train_documents": len(docs), "corpus": "packaged_bbc train slice", "wall_s": round(time.time() - t0, 1),
                "final_loss": curve[-1]["loss"], "curve": curve, "provenance": ctx.provenance}
        (d / "variant.json").write_text(json.dumps(info, indent=1))
        curves[recipe.name] = curve
        rows.append({"variant": recipe.name, "kind": recipe.kind, "topic": recipe.topic or "all", "steps": recipe.steps,
                     "lr": recipe.lr, "docs": len(docs), "first loss": curve[0]["loss"], "last loss": curve[-1]["loss"],
                     "s": info["wall_s"], "dir": str(d)})
        del model, peft
    fig = _figure(curves, ctx.figure("variant_curves.png"), f"{cfg.name}: variants of {cfg.base}")
    return Result(headline={"variants": rows, "dir": str(out_root)}, figures=[fig],
                  tables=[Table("Variants made", rows, list(rows[0]))],
                  legend="Each variant is the base plus a LoRA adapter on blocks 0..layer; variant.json holds its "
                         "recipe, data and loss curve. sft: next-token loss on one topic; dpo: the DPO loss on "
                         "(document opening, its continuation, another document's continuation).")


def _figure(curves: dict, path: Path, title: str) -> Path:
    from nla_ray.report import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for name, c in curves.items():
        ax.plot([r["step"] for r in c], [r["loss"] for r in c], label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


if __name__ == "__main__":
    JOB.run_cli()
