"""Back-of-the-envelope cost of running NLAs on production traffic, from measured throughputs.

Every number here is derived from one bench summary (`jobs/bench.py`, named with its sha256 in the
report's provenance) and the parameters passed in; nothing is assumed about the hardware.

Per explained activation, in GPU-seconds on the benchmarked GPU:
  av          1 / (explanations per second) at the AV batch size with the highest throughput
              (fixed-length decode of the preset's token budget: an upper bound per explanation);
  ar          1 / (AR rows per second): blocks 0..K over template + explanation, plus the value head;
  extraction  two regimes, because it is the one stage a deployment can get for free:
                hooked     0 — the served model already computes the residual stream; a hook at
                           layer K copies it out;
                recompute  the evaluation pipeline's protocol: a forward over blocks 0..K of a
                           whole document yields `positions_per_doc` activations, so one activation
                           costs 1 / (activations per second) of that forward.

Fleet size for a service emitting T tokens/s and explaining every k-th token: T/k activations
per second times (av + ar), plus extraction — 0 when hooked; when recomputed, every served token
must pass through blocks 0..K (the activation depends on the whole prefix), i.e. T / (extraction
tokens per second) GPUs whatever k is. The serving fleet itself is estimated from the same bench
(fast-decode tokens per second of the same architecture at its best batch), which gives the
overhead ratio NLA GPUs / serving GPUs — independent of T.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

KS = (1, 10, 100, 1000)
RATES = (1e3, 1e5, 1e7)
DEFAULT_USD_PER_GPU_HOUR = 3.0


def _ok(d) -> bool:
    return isinstance(d, dict) and d.get("status") == "ok"


def stage_throughputs(model_entry: dict, *, av_backend: str = "auto") -> dict:
    """Measured per-GPU throughputs of one benchmarked model (raises if a stage is missing).
    av_backend "auto" = the faster of the measured fast / fused decoders."""
    av = model_entry.get("av") or {}
    bests = av.get("best") or {}
    if av_backend == "auto":
        cands = [b for b in ("fused", "fast") if b in bests]
        av_backend = max(cands, key=lambda b: bests[b]["explanations_per_s"]) if cands else "fast"
    best = bests.get(av_backend)
    if best is None:
        raise ValueError(f"no successful AV run with backend {av_backend!r}")
    if not _ok(model_entry.get("extraction")):
        raise ValueError("no successful extraction measurement")
    ex = model_entry["extraction"]
    plan = model_entry["plan"]
    if _ok(model_entry.get("ar")):
        ar_rows, ar_tokens, ar_source = model_entry["ar"]["rows_per_s"], model_entry["ar"]["tokens"], "measured"
    elif ex.get("layers") == plan.get("layer", -2) + 1 and plan.get("ar_len"):
        # The AR runs the same blocks 0..K as extraction, over shorter sequences (less attention
        # per token), so the measured extraction token rate is a conservative price for it.
        ar_tokens = plan["ar_len"]
        ar_rows = ex["tokens_per_s"] / ar_tokens
        ar_source = (f"estimated: measured extraction prefill rate over the same blocks 0..{plan['layer']} "
                     f"({ex['tokens_per_s']:.0f} tok/s) / {ar_tokens} AR tokens")
    else:
        raise ValueError("no successful AR measurement")
    serve = best
    return {
        "av_explanations_per_s": best["explanations_per_s"], "av_batch": best["batch"],
        "av_new_tokens": av["new_tokens"], "av_backend": av_backend,
        "ar_rows_per_s": ar_rows, "ar_tokens": ar_tokens, "ar_source": ar_source,
        "extraction_tokens_per_s": ex["tokens_per_s"],
        "extraction_activations_per_s": ex["rows_per_s"] * plan["positions_per_doc"],
        "positions_per_doc": plan["positions_per_doc"], "document_tokens": ex["tokens"],
        "serve_tokens_per_s": serve["tokens_per_s"], "serve_batch": serve["batch"],
    }


def per_activation(th: dict) -> dict:
    """GPU-seconds per explained activation, by stage and in total for both extraction regimes."""
    av = 1.0 / th["av_explanations_per_s"]
    ar = 1.0 / th["ar_rows_per_s"]
    ex = 1.0 / th["extraction_activations_per_s"]
    return {"av_s": av, "ar_s": ar, "extraction_recompute_s": ex,
            "total_hooked_s": av + ar, "total_recompute_s": av + ar + ex,
            "explanations_per_gpu_s_hooked": 1.0 / (av + ar),
            "explanations_per_gpu_s_recompute": 1.0 / (av + ar + ex),
            "share": {"av": av / (av + ar + ex), "ar": ar / (av + ar + ex), "extraction": ex / (av + ar + ex)}}


def per_million(pa: dict, usd_per_gpu_hour: float) -> dict:
    out = {}
    for regime in ("hooked", "recompute"):
        hours = 1e6 * pa[f"total_{regime}_s"] / 3600.0
        out[regime] = {"gpu_hours": hours, "usd": hours * usd_per_gpu_hour}
    return out


def fleet(th: dict, pa: dict, tokens_per_s: float, every_k: int) -> dict:
    """GPUs to explain every k-th token of a T tokens/s service (fractional, and rounded up)."""
    acts = tokens_per_s / every_k
    nla_hooked = acts * pa["total_hooked_s"]
    recompute_extraction = tokens_per_s / th["extraction_tokens_per_s"]
    nla_recompute = nla_hooked + recompute_extraction
    serving = tokens_per_s / th["serve_tokens_per_s"]
    return {"tokens_per_s": tokens_per_s, "every_k": every_k, "activations_per_s": acts,
            "gpus_hooked": nla_hooked, "gpus_recompute": nla_recompute,
            "gpus_hooked_ceil": math.ceil(nla_hooked - 1e-9), "gpus_recompute_ceil": math.ceil(nla_recompute - 1e-9),
            "serving_gpus": serving, "overhead_hooked": nla_hooked / serving,
            "overhead_recompute": nla_recompute / serving}


def file_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def build(bench: dict, *, usd_per_gpu_hour: float = DEFAULT_USD_PER_GPU_HOUR, ks=KS, rates=RATES,
          av_backend: str = "auto", bench_path: str | None = None, bench_sha256: str | None = None) -> dict:
    """The whole report as a dict: per model throughputs, per-activation costs, per-million cost
    and the fleet table. Pure: everything comes from `bench` and the arguments."""
    if usd_per_gpu_hour <= 0:
        raise ValueError("usd_per_gpu_hour must be positive")
    models, skipped = {}, {}
    for name, entry in (bench.get("models") or {}).items():
        try:
            th = stage_throughputs(entry, av_backend=av_backend)
        except ValueError as e:
            skipped[name] = str(e)
            continue
        pa = per_activation(th)
        arch = entry.get("arch") or {}
        models[name] = {"params": arch.get("total_params"), "checkpoint": entry.get("checkpoint"),
                        "throughputs": th, "per_activation": pa,
                        "per_million_activations": per_million(pa, usd_per_gpu_hour),
                        "fleet": [fleet(th, pa, t, k) for t in rates for k in ks]}
    bp = bench.get("provenance") or {}
    return {"schema": "nla_ray.costmodel/1",
            "parameters": {"usd_per_gpu_hour": usd_per_gpu_hour, "every_k": list(ks), "tokens_per_s": list(rates),
                           "av_backend": av_backend},
            "bench": {"path": bench_path, "sha256": bench_sha256, "machine": bp.get("machine"),
                      "date": bp.get("date"), "git_commit": bp.get("git_commit"), "tiny": bench.get("tiny"),
                      "device": (bench.get("device") or {}).get("name"), "dtype": bench.get("dtype")},
            "models": models, "skipped": skipped}


# ---------------------------------------------------------------------------------------------
# reporting


def _g(x: float) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.3g}"


def render_markdown(report: dict) -> str:
    b, p = report["bench"], report["parameters"]
    lines = [f"# NLA deployment cost — from the bench on {b['machine']}" + (" (TINY CPU bench)" if b["tiny"] else ""),
             "",
             f"Derived from `{b['path']}` (sha256 `{(b['sha256'] or '')[:16]}…`, {b['date']}, commit "
             f"`{b['git_commit']}`, {b['dtype']}). Price parameter: ${p['usd_per_gpu_hour']:g} per GPU-hour. "
             f"AV backend: {p['av_backend']}. *Hooked*: activations read from the serving forward pass "
             "(extraction free); *recompute*: blocks 0..K re-run over the text.",
             "",
             "## Per explained activation",
             "",
             "| model | params | AV backend | AV batch | AV tokens | AV s | AR s | extraction s (recompute) | "
             "explanations / GPU-s (hooked) | (recompute) | GPU-h / 1M (hooked) | $ / 1M (hooked) | "
             "$ / 1M (recompute) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in report["models"].items():
        th, pa, pm = m["throughputs"], m["per_activation"], m["per_million_activations"]
        lines.append(
            f"| {name} | {_g(m['params'] / 1e9) + 'B' if m['params'] else '—'} | {th['av_backend']} | {th['av_batch']} | "
            f"{th['av_new_tokens']} | {pa['av_s']:.3g} | {pa['ar_s']:.3g} | {pa['extraction_recompute_s']:.3g} | "
            f"{_g(pa['explanations_per_gpu_s_hooked'])} | {_g(pa['explanations_per_gpu_s_recompute'])} | "
            f"{_g(pm['hooked']['gpu_hours'])} | {_g(pm['hooked']['usd'])} | {_g(pm['recompute']['usd'])} |")
    ks, rates = p["every_k"], p["tokens_per_s"]
    for regime in ("hooked", "recompute"):
        lines += ["", f"## GPUs to explain every k-th token ({regime})", "",
                  "Cells: NLA GPUs (overhead = NLA GPUs / GPUs serving the same tokens, from this bench's "
                  "own decode throughput).", "",
                  "| model | k | " + " | ".join(f"T = {t:.0e} tok/s" for t in rates) + " | overhead |",
                  "|---|---|" + "---|" * len(rates) + "---|"]
        for name, m in report["models"].items():
            by = {(f["tokens_per_s"], f["every_k"]): f for f in m["fleet"]}
            for k in ks:
                cells = [_g(by[(t, k)][f"gpus_{regime}"]) for t in rates]
                over = by[(rates[0], k)][f"overhead_{regime}"]
                lines.append(f"| {name} | {k} | " + " | ".join(cells) + f" | {_g(over)}× |")
    notes = [f"{n}: AR {m['throughputs']['ar_source']}" for n, m in report["models"].items()
             if m["throughputs"].get("ar_source", "measured") != "measured"]
    if notes:
        lines += ["", "AR cost not measured directly: " + "; ".join(notes)]
    if report["skipped"]:
        lines += ["", "Models left out: " + "; ".join(f"{n} ({why})" for n, why in report["skipped"].items())]
    return "\n".join(lines) + "\n"


def render_figure(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = list(report["models"])
    # Shares, not seconds: the models differ by orders of magnitude; the total is written on top.
    bottoms = [0.0] * len(names)
    for stage in ("av", "ar", "extraction"):
        vals = [report["models"][n]["per_activation"]["share"][stage] for n in names]
        ax1.bar(names, vals, bottom=bottoms, label={"extraction": "extraction (recompute)"}.get(stage, stage.upper()))
        bottoms = [a + b for a, b in zip(bottoms, vals)]
    for i, n in enumerate(names):
        ax1.text(i, 1.01, f"{report['models'][n]['per_activation']['total_recompute_s']:.3g} GPU-s",
                 ha="center", va="bottom", fontsize=8)
    ax1.set_ylim(0, 1.12)
    ax1.set_ylabel("share of GPU time per explained activation")
    ax1.set_title("Where the GPU time goes (recompute regime)")
    ax1.legend(fontsize=8, loc="lower right")
    ks, rates = report["parameters"]["every_k"], report["parameters"]["tokens_per_s"]
    styles = ["-", "--", ":", "-."]
    for i, n in enumerate(names):
        by = {(f["tokens_per_s"], f["every_k"]): f for f in report["models"][n]["fleet"]}
        for j, t in enumerate(rates):
            ax2.plot(ks, [by[(t, k)]["gpus_hooked"] for k in ks], styles[j % len(styles)], marker="o",
                     color=f"C{i}", label=f"{n}, T={t:.0e}")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("explain every k-th token")
    ax2.set_ylabel("GPUs (hooked activations)")
    ax2.set_title("Fleet for a service emitting T tokens/s")
    ax2.legend(fontsize=6, ncol=2)
    b = report["bench"]
    fig.suptitle(f"from bench on {b['machine']} ({b['date']}), ${report['parameters']['usd_per_gpu_hour']:g}/GPU-h",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(bench_path: str | Path, out: str | Path, *, usd_per_gpu_hour: float = DEFAULT_USD_PER_GPU_HOUR,
        av_backend: str = "auto", figure: bool = True) -> dict:
    from nla_ray.core.provenance import provenance

    bench_path = Path(bench_path)
    bench = json.loads(bench_path.read_text())
    report = build(bench, usd_per_gpu_hour=usd_per_gpu_hour, av_backend=av_backend, bench_path=str(bench_path),
                   bench_sha256=file_digest(bench_path))
    report["provenance"] = provenance(extra={"job": "cost_model", "bench_file": str(bench_path),
                                             "bench_sha256": report["bench"]["sha256"]})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(report, indent=1))
    (out / "table.md").write_text(render_markdown(report))
    if figure and report["models"]:
        render_figure(report, out / "figure.png")
    return report
