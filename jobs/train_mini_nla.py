"""Train a mini NLA pair (SmolLM2-135M L20 or Gemma-3-270M L12) on the packaged corpus's TRAIN slice.

The preset names the family (mini -> smollm2-L20, mini-gemma -> gemma3-L12; --family overrides).
Phases: collect -> ar -> av -> eval (see nla_ray/training/sft.py). Each phase saves its output under
--work and is skipped when rerun, so a long training splits into calls of a few minutes. The result
is a pair in the released sidecar format whose weights are LoRA adapters on the packaged base model
plus the AR value head (a few MB). It is written to <--out>/pair (a run directory); `--ship`
writes it to nla_ray/pairs/<family>/ instead, where `mini:<family>` picks it up, replacing the
shipped pair — shipping is always this explicit step.

Training settings are `--set train.<field>=...` (TrainConfig in nla_ray/training/sft.py) and
`--set grpo.<field>=...` (GRPOConfig); `--n` is the number of training activations.

  python jobs/train_mini_nla.py --preset mini                       # GPU recommended
  python jobs/train_mini_nla.py --preset mini-gemma --set train.av_epochs=1.5
  python jobs/train_mini_nla.py --preset mini --n 160 --set train.positions_per_doc=4   # CPU smoke, runs/...
  python jobs/train_mini_nla.py --preset mini-gemma --budget-s 540  # pauses (exit 75) before 9 min; rerun resumes
  python jobs/train_mini_nla.py --preset mini --ship --out results/train_mini_nla/smollm2-L20   # replace the shipped pair

With --budget-s the ar/av phases save a checkpoint under --work when the budget is spent and the job
exits with status 75 (EX_TEMPFAIL); the same command resumes at that step. The target recipe
(`--set train.target_recipe=v2`, see nla_ray/training/targets.py) is applied to the collected data at
load time, so recipes can share one collect phase. `--fresh` deletes --work's phase outputs first.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from nla_ray.nla import pairs  # noqa: E402
from nla_ray.nla import sources  # noqa: E402
from nla_ray.training import targets  # noqa: E402
from nla_ray.training import sft as train  # noqa: E402
from nla_ray.nla.corpora import PackagedBBCNews  # noqa: E402
from nla_ray.nla.models import load_causal_lm, resolve_device  # noqa: E402
from nla_ray.jobkit import Context, Job, Result, UserError  # noqa: E402
from nla_ray.runtime.pipeline import write_json  # noqa: E402
from nla_ray.core.provenance import provenance  # noqa: E402
from nla_ray.nla.sidecar import write_sidecar  # noqa: E402
from nla_ray.core.typed import set_fields  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def _save_adapter(peft_model, directory: Path) -> None:
    """PEFT adapter, stored fp16 to keep the shipped pair small (the base stays fp32)."""
    from nla_ray.training.variants import save_adapter

    save_adapter(peft_model, directory)


def _curve_figure(curves: dict, path: Path, title: str) -> None:
    from nla_ray.report import pyplot, save_figure

    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, (name, key) in zip(axes, (("ar", "loss_nmse"), ("av", "loss_ce"))):
        c = curves.get(name) or []
        ax.plot([p["step"] for p in c], [p[key] for p in c], color="#3b6ea5")
        ax.set_title(f"{name.upper()} training: {key}", fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def _args(p) -> None:
    p.add_argument("--family", choices=sorted(pairs.MINI_PAIRS), help="override the preset's family")
    p.add_argument("--work", help="phase checkpoints (default ~/.cache/nla_ray/train/<family>)")
    p.add_argument("--pair-out", help="where the trained pair goes (default <--out>/pair; with --ship the shipped dir)")
    p.add_argument("--ship", action="store_true",
                   help="write the pair to nla_ray/pairs/<family>/, replacing the shipped one")
    p.add_argument("--device", default="auto")
    p.add_argument("--phases", default="collect,ar,av,eval",
                   help="comma list of collect,ar,av,eval,grpo (grpo needs eval first: it reports before/after)")
    p.add_argument("--promote-grpo", action="store_true",
                   help="replace the pair's AV adapter with the GRPO one if held-out FVE improved")
    p.add_argument("--budget-s", type=float,
                   help="wall-clock budget: ar/av checkpoint and exit 75 when it is spent, grpo stops early")


ONE_PROCESS = "training runs in one process on one device"
JOB = Job("train_mini_nla", __doc__, add_args=_args, own_sets=("train", "grpo"),
          unused={"ray_address": ONE_PROCESS, "store": ONE_PROCESS + " and collects its own activations",
                  "verify_against": ONE_PROCESS})
EX_TEMPFAIL = 75


@JOB.main
def run(ctx: Context) -> Result:
    a = ctx.args
    if a.family is None:
        spec = str(ctx.cfg.pair)
        fam = spec.split(":", 1)[1] if spec.startswith("mini:") else None
        if fam not in pairs.MINI_PAIRS:
            raise UserError(f"preset {ctx.cfg.name!r} (pair {spec}) is not a mini family: train_mini_nla trains "
                            f"{', '.join('mini:' + f for f in pairs.MINI_PAIRS)} (--preset mini / mini-gemma, or --family)")
        a.family = fam
    a.set, a.grpo, a.results = ctx.own_sets["train"], ctx.own_sets["grpo"], str(ctx.out)
    if a.ship and a.pair_out:
        raise UserError("--ship writes the shipped pair; --pair-out names another place: give one of them")
    deadline = time.time() + a.budget_s if a.budget_s is not None else None
    try:
        _run(a, deadline, n=ctx.cfg.n, fresh=a.fresh)
    except train.Paused as e:
        ctx.log(f"[paused] {e}")
        return Result(headline={"paused": str(e)}, own_files=True, exit_status=EX_TEMPFAIL)
    path = ctx.out / "summary.json"
    held = json.loads(path.read_text()).get("heldout", {}) if path.is_file() else {}
    return Result(headline={"family": a.family, **held}, own_files=True,
                  figures=[f for f in [ctx.out / "training_curves.png"] if f.is_file()])


def _run(a, deadline, *, n: int | None = None, fresh: bool = False) -> int:

    cfg = train.TrainConfig(family=a.family)
    set_fields(cfg, a.set, "--set train")
    if n is not None:
        cfg.n_train_docs = -(-n // cfg.positions_per_doc)
    if cfg.target_recipe not in targets.RECIPES:
        raise UserError(f"--set train.target_recipe: {cfg.target_recipe!r} is not one of {sorted(targets.RECIPES)}")
    fam = pairs.MINI_PAIRS[a.family]
    K = fam["layer"]
    work = Path(a.work) if a.work else sources.cache_root() / "train" / a.family
    results = Path(a.results)
    pair_out = (Path(a.pair_out) if a.pair_out else pairs.SHIPPED_DIR / a.family if a.ship else results / "pair")
    if fresh:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    phases = a.phases.split(",")
    dev = resolve_device(a.device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.seed)
    log = lambda m: print(m, flush=True)  # noqa: E731
    res = sources.resolve(fam["base"])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(res.path)
    timings = {}

    # -- collect ---------------------------------------------------------------------------
    data_f = work / "data.pt"
    if "collect" in phases and not data_f.is_file():
        t0 = time.time()
        model = load_causal_lm(res.path, device=dev, dtype=torch.float32)
        tr_docs = list(PackagedBBCNews(split="train", limit=cfg.n_train_docs).iter_documents())
        ev_docs = list(PackagedBBCNews(split="heldout", limit=cfg.n_eval_docs).iter_documents())
        tr = train.collect(model, tok, tr_docs, K, positions_per_doc=cfg.positions_per_doc, seed=cfg.seed,
                           max_length=cfg.max_length, log=log)
        ev = train.collect(model, tok, ev_docs, K, positions_per_doc=cfg.eval_positions_per_doc, seed=cfg.seed,
                           max_length=cfg.max_length, log=log)
        tmp = data_f.with_name(data_f.name + ".tmp")  # a run killed mid-save must not leave half a file
        torch.save({"train": tr, "eval": ev}, tmp)
        tmp.replace(data_f)
        del model
        timings["collect_s"] = round(time.time() - t0, 1)
    if not data_f.is_file():
        raise UserError(f"no collected data at {data_f}: run the collect phase first")
    data = torch.load(data_f, weights_only=False)
    tr, ev = train.set_targets(data["train"], cfg.target_recipe), train.set_targets(data["eval"], cfg.target_recipe)
    overlap = {r["doc_id"] for r in tr} & {r["doc_id"] for r in ev}
    if overlap:
        raise UserError(f"held-out documents leaked into training: {sorted(overlap)[:5]}")
    norms = np.linalg.norm(np.stack([r["vector"] for r in tr]), axis=1)
    inj_scale = round(float(np.median(norms)), 2)
    gold_tr = np.stack([r["vector"] for r in tr]).astype(np.float32)
    log(f"[data] train rows {len(tr)} from {len({r['doc_id'] for r in tr})} docs; eval rows {len(ev)}; "
        f"median |v| {inj_scale}")
    d = gold_tr.shape[1]
    from nla_ray.core import metrics

    var_train = float(metrics.variance_baseline(gold_tr, math.sqrt(d)))
    extra = {"base_checkpoint": fam["base"], "stage": "sl",
             "base_model": {"source": fam["base"], "gguf_file": res.gguf_file, "sha256": res.sha256},
             "eval": {"var_train": round(var_train, 6)},
             "training": {"recipe": "nla_ray.training.sft (LoRA + value head, deterministic targets)",
                          "config": train.config_dict(cfg), "injection_scale_from": "median |v| of training vectors"}}
    av_meta, ar_meta = pairs.build_metas(tok, d, K, inj_scale, extra)

    # -- AR --------------------------------------------------------------------------------
    ar_dir = work / "ar"
    curves = json.loads((work / "curves.json").read_text()) if (work / "curves.json").is_file() else {}
    if "ar" in phases and not (ar_dir / "value_head.safetensors").is_file():
        t0 = time.time()
        model = load_causal_lm(res.path, device=dev, dtype=torch.float32)
        peft_m, head, curves["ar"] = train.train_ar(model, tok, ar_meta, tr, cfg, log=log, ckpt_dir=work / "ar.ckpt",
                                                    deadline=deadline)
        tmp = work / "ar.tmp"
        (tmp / "adapter").mkdir(parents=True, exist_ok=True)
        _save_adapter(peft_m, tmp / "adapter")
        from safetensors.torch import save_file

        save_file({"weight": head.weight.detach().float().cpu().contiguous()}, str(tmp / "value_head.safetensors"))
        tmp.rename(ar_dir)
        shutil.rmtree(work / "ar.ckpt", ignore_errors=True)  # finished: a later run must not resume it
        write_json(work / "curves.json", curves)
        del model, peft_m
        timings["ar_s"] = round(time.time() - t0, 1)

    # -- AV --------------------------------------------------------------------------------
    av_dir = work / "av"
    if "av" in phases and not (av_dir / "adapter" / "adapter_config.json").is_file():
        t0 = time.time()
        model = load_causal_lm(res.path, device=dev, dtype=torch.float32)
        peft_m, curves["av"] = train.train_av(model, tok, av_meta, tr, cfg, log=log, ckpt_dir=work / "av.ckpt",
                                              deadline=deadline)
        tmp = work / "av.tmp"
        (tmp / "adapter").mkdir(parents=True, exist_ok=True)
        _save_adapter(peft_m, tmp / "adapter")
        tmp.rename(av_dir)
        shutil.rmtree(work / "av.ckpt", ignore_errors=True)
        write_json(work / "curves.json", curves)
        del model, peft_m
        timings["av_s"] = round(time.time() - t0, 1)

    # -- write the pair + eval ---------------------------------------------------------------
    if "eval" in phases:
        if not (ar_dir / "value_head.safetensors").is_file() or not (av_dir / "adapter").is_dir():
            raise UserError("eval needs the ar and av phases to have finished")
        for role, meta, src in (("av", av_meta, av_dir), ("ar", ar_meta, ar_dir)):
            dst = pair_out / role
            shutil.rmtree(dst, ignore_errors=True)
            dst.mkdir(parents=True)
            shutil.copytree(src / "adapter", dst / "adapter")
            for f in (dst / "adapter").glob("README.md"):
                f.unlink()
            if role == "ar":
                shutil.copy(src / "value_head.safetensors", dst / "value_head.safetensors")
            write_sidecar(dst, meta)
        t0 = time.time()
        av = pairs.load_av(pair_out / "av", device=str(dev), dtype="float32", max_new_tokens=cfg.eval_max_new_tokens)
        ar = pairs.load_ar(pair_out / "ar", device=str(dev), dtype="float32")
        timings["load_shipped_pair_s"] = round(time.time() - t0, 1)
        t0 = time.time()
        ev_res = train.evaluate(av, ar, ev, batch=64, max_new_tokens=cfg.eval_max_new_tokens, seed=cfg.seed, log=log)
        timings["eval_s"] = round(time.time() - t0, 1)
        size = sum(f.stat().st_size for f in pair_out.rglob("*") if f.is_file())
        summary = {"job": "train_mini_nla", "family": a.family, "base": fam["base"], "layer": K,
                   "config": train.config_dict(cfg), "injection_scale": inj_scale, "var_train": var_train,
                   "train_rows": len(tr), "train_docs": len({r["doc_id"] for r in tr}),
                   "heldout": {k: v for k, v in ev_res.items() if k != "examples"},
                   "examples": ev_res["examples"], "curves": curves,
                   # timings: this invocation's phases; training_s: each phase in total, across resumed calls
                   "timings": timings,
                   "training_s": {k: (curves.get(k) or [{}])[-1].get("s") for k in ("ar", "av")},
                   "pair_dir": str(pair_out.relative_to(REPO)) if pair_out.is_relative_to(REPO) else str(pair_out),
                   "pair_bytes": size, "target_recipe": {"name": cfg.target_recipe,
                                                         **targets.RECIPES[cfg.target_recipe],
                                                         "doc": targets.__doc__.strip()},
                   "provenance": provenance(a.family)}
        write_json(results / "summary.json", summary)
        _curve_figure(curves, results / "training_curves.png",
                      f"{a.family}: held-out FVE {ev_res['fve_own']:.3f} (own-set Var)")
        log(json.dumps(summary["heldout"], indent=1))
        for ex in ev_res["examples"][:3]:
            log(f"--- context …{ex['context_tail'][-100:]!r}\n    explanation: {ex['explanation']!r}\n    nmse {ex['nmse']:.4f}")
    if "grpo" in phases:
        _grpo_phase(a, cfg, tok, res, dev, tr, ev, work, pair_out, results, log, deadline)
    return 0


def _grpo_phase(a, cfg, tok, res, dev, tr, ev, work: Path, pair_out: Path, results: Path, log, deadline) -> None:
    """Policy-gradient refinement of the shipped AV against its frozen AR; before/after on held-out."""
    from peft import PeftModel

    from nla_ray.training import grpo
    from nla_ray.nla.av import AVEngine
    from nla_ray.nla.sidecar import read_sidecar

    if not (results / "summary.json").is_file():
        raise UserError("grpo reports before/after: run the eval phase first")
    gcfg = grpo.GRPOConfig(max_new_tokens=cfg.eval_max_new_tokens, seed=cfg.seed)
    set_fields(gcfg, a.grpo, "--set grpo")
    base = load_causal_lm(res.path, device=dev, dtype=torch.float32)
    peft_m = PeftModel.from_pretrained(base, str(pair_out / "av" / "adapter"), is_trainable=True)
    av = AVEngine(peft_m.base_model.model, tok, read_sidecar(pair_out / "av"), max_new_tokens=cfg.eval_max_new_tokens)
    ar = pairs.load_ar(pair_out / "ar", device=str(dev), dtype="float32")
    t0 = time.time()
    # Leave room for the held-out evaluation after training (about as long as the eval phase took).
    stop_at = deadline - 120 if deadline is not None else None
    curve = grpo.grpo_train(av, ar, tr, gcfg, log=log, deadline=stop_at)
    train_s = round(time.time() - t0, 1)
    out = work / "av_grpo" / "adapter"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    _save_adapter(peft_m, out)
    after = train.evaluate(av, ar, ev, batch=64, max_new_tokens=cfg.eval_max_new_tokens, seed=cfg.seed, log=log)
    before = json.loads((results / "summary.json").read_text())["heldout"]
    promoted = bool(a.promote_grpo and curve and after["fve_own"] > before["fve_own"])
    if promoted:
        shutil.rmtree(pair_out / "av" / "adapter")
        shutil.copytree(out, pair_out / "av" / "adapter", ignore=shutil.ignore_patterns("README.md"))
        # The shipped AV is now the GRPO one: its sidecar and the summary's held-out block say so.
        meta = read_sidecar(pair_out / "av")
        run = {"config": vars(gcfg), "steps_done": curve[-1]["step"] + 1,
               "heldout_fve_before": before["fve_own"], "heldout_fve_after": after["fve_own"]}
        # Runs stack (each starts from the adapter the previous one promoted): keep them all.
        history = list(meta.raw.get("grpo_history") or ([meta.raw["grpo"]] if meta.raw.get("grpo") else []))
        meta.raw.pop("grpo", None)
        meta.raw.update(stage="grpo", grpo_history=history + [run])
        write_sidecar(pair_out / "av", meta)
        summary = json.loads((results / "summary.json").read_text())
        summary.update(heldout_before_grpo=before, heldout={k: v for k, v in after.items() if k != "examples"},
                       examples=after["examples"], stage="grpo")
        write_json(results / "summary.json", summary)
    write_json(results / "grpo.json", {
        "config": vars(gcfg), "steps_done": curve[-1]["step"] + 1 if curve else 0, "train_s": train_s,
        "curve": curve, "promoted": promoted,
        "before": before, "after": {k: v for k, v in after.items() if k != "examples"},
        "examples_after": after["examples"], "provenance": provenance(a.family)})
    log(f"[grpo] held-out FVE before {before['fve_own']:.4f} -> after {after['fve_own']:.4f}"
        f" ({'promoted' if promoted else 'not promoted'})")


if __name__ == "__main__":
    JOB.run_cli()
