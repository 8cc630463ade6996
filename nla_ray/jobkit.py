"""The job API: a job in jobs/ is its question (docstring), its arms and its summary; this owns the rest.

    JOB = Job("reproduce_fve", __doc__)

    @JOB.main
    def run(ctx: Context) -> Result:
        rows = ctx.round_trip(ctx.cfg)            # store-backed extraction -> AV pool -> AR pool
        return Result(headline=..., tables=[...], figures=[...], rows=rows)

`Job` parses the shared arguments (the README's contract), builds the config, picks the output dir,
catches user errors (one line naming the thing, non-zero exit; `--debug` shows the traceback), and
writes summary.json (config, headline, run info, per-phase wall time, provenance), table.md (tables,
a legend, examples, provenance), rows.parquet and the figures, each atomically. `Context` gives the
job documents, pairs resolved once on the driver, the training-set Var, the activation store and
`ctx.run(arm, stages, source)` to run any list of stages with resume.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nla_ray.config import NLAConfig, add_job_args, config_from_args, load_config
from nla_ray.core.provenance import provenance
from nla_ray.core.table import write_json, write_text


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def default_out(job: str, preset: str) -> Path:
    """runs/<job>/<preset>: ignored by git, so the README's commands leave a checkout clean."""
    return repo_root() / "runs" / job / preset


def documents(cfg: NLAConfig) -> list:
    from nla_ray.nla.corpora import make_source

    docs = []
    for d in make_source(dict(cfg.corpus)).iter_documents():
        docs.append(d)
        if len(docs) >= cfg.n_docs:
            break
    if not docs:
        raise ValueError(f"corpus {cfg.corpus} yielded no documents")
    return docs


class Timer:
    def __init__(self):
        self.t: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _C:
            def __enter__(self):
                self.t0 = time.time()

            def __exit__(self, *a):
                timer.t[name] = round(timer.t.get(name, 0.0) + time.time() - self.t0, 2)
        return _C()


@dataclass
class Table:
    title: str
    rows: list
    columns: list
    note: str = ""


@dataclass
class Result:
    """What a job hands back: the headline numbers, tables for table.md, figures it drew, rows."""

    headline: dict
    tables: list = field(default_factory=list)
    figures: list = field(default_factory=list)
    rows: pa.Table | None = None
    extra: dict = field(default_factory=dict)
    legend: str = ""
    examples: list = field(default_factory=list)
    clean: bool = True             # False: the job finished but something was not (exit 3)
    # The job's own module already wrote summary.json / table.md into ctx.out (bench rewrites them
    # after every stage so a run cut short keeps what it measured): Job adds the contract's keys
    # (job, config, headline, run, provenance) to that summary and provenance to the table.
    own_files: bool = False
    exit_status: int | None = None   # e.g. 75: paused at a budget, the same command resumes


FVE_LEGEND = ("FVE = 1 − NMSE / Var: the share of the activation's (direction-normalised) variance the "
              "round trip recovers. 0 = predicting the mean vector; the shuffled-pair null (explanations "
              "scored against other activations' gold) sits well below 0 when the signal is position-specific; "
              "1 = perfect. For scale: the released Gemma-3-27B L41 pair reaches 0.763–0.775 and Qwen2.5-7B L20 "
              "0.752. NMSE is on vectors rescaled to √d (NMSE = 2(1 − cos)); cos is uninformative on "
              "low-variance layers, read FVE. CIs resample documents (positions of one document are not independent).")


class UserError(Exception):
    """A mistake the user can fix: printed as one line, exit status 2."""


def _user_errors() -> tuple:
    from nla_ray.nla.sources import ModelSourceError  # a missing/unreadable model is the user's to fix

    return (UserError, ValueError, FileNotFoundError, KeyError, PermissionError, ModelSourceError)


USER_ERRORS = _user_errors()


class Context:
    def __init__(self, job: "Job", args: argparse.Namespace, cfg: NLAConfig, out: Path):
        from nla_ray.runtime.store import ActivationStore

        self.job, self.args, self.cfg, self.out = job, args, cfg, out
        self.provenance: dict | None = None  # set by Job before the work starts
        self.timer = Timer()
        self.store = ActivationStore(args.store, log=self.log)
        self.runs: dict[str, dict] = {}
        self.own_sets: dict[str, list[str]] = {}
        self._pairs: dict = {}
        self._docs: dict = {}

    def log(self, msg: str) -> None:
        print(msg, flush=True)

    # -- configs, documents, pairs ------------------------------------------------------------
    FAMILY_KEYS = ("pair", "base", "layer", "layers", "var_train", "partner", "name", "max_length")

    def partner(self, cfg: NLAConfig | None = None) -> NLAConfig:
        """The other family's config: its preset, with this run's corpus, seed and sizes, and the
        `--set` overrides that are not about one family (av.max_new_tokens applies to both AVs;
        pair=... only to the first)."""
        cfg = cfg or self.cfg
        if not cfg.partner:
            raise UserError(f"preset {cfg.name!r} names no partner family (set partner: <preset>)")
        shared = [s for s in self.args.set if s.split("=", 1)[0].strip().split(".")[0] not in self.FAMILY_KEYS]
        other = load_config(cfg.partner, overrides=shared)
        for k in ("corpus", "seed", "n_docs", "n", "positions_per_doc", "bootstrap"):
            setattr(other, k, getattr(cfg, k))
        return other

    def documents(self, cfg: NLAConfig | None = None) -> list:
        cfg = cfg or self.cfg
        key = (repr(cfg.corpus), cfg.n_docs)
        if key not in self._docs:
            with self.timer("load_documents"):
                self._docs[key] = documents(cfg)
        return self._docs[key]

    def pair(self, cfg: NLAConfig | None = None):
        """The pair's directories, resolved once on the driver (actors get plain paths)."""
        from nla_ray.nla import pairs

        spec = (cfg or self.cfg).pair
        if spec not in self._pairs:
            self._pairs[spec] = pairs.resolve_pair(spec)
        return self._pairs[spec]

    def tokenizer(self, cfg: NLAConfig | None = None):
        """The base model's tokenizer (the pair's AV and AR share it), loaded on the driver."""
        from transformers import AutoTokenizer

        from nla_ray.nla import sources

        return AutoTokenizer.from_pretrained(sources.resolve((cfg or self.cfg).base).path)

    def meta(self, cfg: NLAConfig | None = None, role: str = "ar"):
        from nla_ray.nla.sidecar import read_sidecar

        dirs = self.pair(cfg)
        return read_sidecar(dirs.ar if role == "ar" else dirs.av)

    def var_train(self, cfg: NLAConfig | None = None) -> float | None:
        """The training-set Var: the preset's, else the AR sidecar's `eval.var_train`, else None."""
        cfg = cfg or self.cfg
        if cfg.var_train is not None:
            return cfg.var_train
        v = (self.meta(cfg).raw.get("eval") or {}).get("var_train")
        return float(v) if v is not None else None

    # -- running stages -----------------------------------------------------------------------
    def activations(self, cfg: NLAConfig | None = None, *, layers: list[int] | None = None,
                    anchors: dict | None = None, anchor_key: str | None = None, align_tolerance: int = 2,
                    adapter: str | None = None):
        """Stored activations of `cfg`'s base model (or, with `adapter`, of the base with a pair
        role's adapter merged) for this run's documents (extracted once)."""
        from nla_ray.runtime.stages import extract_spec

        cfg = cfg or self.cfg
        spec = extract_spec(cfg, name="extract", layers=layers or cfg.extract_layers, align_tolerance=align_tolerance,
                            adapter=adapter)
        with self.timer("extract"):
            got = self.store.ensure(spec, self.documents(cfg), address=self.args.ray_address, anchors=anchors,
                                    anchor_key=anchor_key, machine=cfg.machine)
        run = getattr(self.store, "last_run", None)
        if run and run.get("rows_failed"):
            # An extraction into the store that lost rows is a run that was not clean, like a pipeline arm.
            self.runs[f"extract:{cfg.name}" + (f":{adapter}" if adapter else "")] = run
        return got

    def paired(self, cfg_a: NLAConfig, cfg_b: NLAConfig, tolerance: int = 2):
        """Both families at the same document positions: A's stored rows (stage-0 positions) beside
        B's rows aligned to them by character offset (`b_` columns). Returns (rows, alignment stats)."""
        from nla_ray.analysis.cross_family import anchors_from, join_families

        key_a, acts_a = self.activations(cfg_a)
        _, acts_b = self.activations(cfg_b, anchors=anchors_from(acts_a, cfg_a.layer), anchor_key=key_a.digest(),
                                     align_tolerance=tolerance)
        return join_families(acts_a, acts_b, tolerance)

    def run(self, arm: str, stages: list, source, *, per_position: int = 1, extra_fp: dict | None = None,
            fp_stages: list | None = None, tee=None, root: Path | None = None) -> pa.Table:
        """Run `stages` over `source` (documents or a row table) into `<out>/rows[/<arm>]`, resuming
        finished documents; returns this run's final rows (deduplicated, stable order). The rows'
        fingerprint is `fp_stages` (default: all stages) plus `extra_fp`. `root`: another job's
        output dir whose rows of the same arm and fingerprint are reused (finished documents are not
        run again; a different fingerprint is refused, naming what changed)."""
        from nla_ray.runtime import pipeline
        from nla_ray.runtime.rows import RowParts, final_table

        base = Path(root) if root is not None else self.out
        parts = RowParts(base / "rows" / arm if arm else base / "rows")
        fp = {"stages": pipeline.stages_fingerprint(fp_stages or stages), **(extra_fp or {})}
        if isinstance(source, pa.Table):
            doc_ids = list(dict.fromkeys(source.column("doc_id").to_pylist()))
            n_act = int(np.sum(np.asarray(source.column("position").to_numpy()) >= 0))
        else:
            doc_ids = [d.doc_id for d in source]
            n_act = len(doc_ids) * self.cfg.positions_per_doc
        expected = n_act * per_position
        with self.timer(f"pipeline{':' + arm if arm else ''}"):
            info = pipeline.run(stages, source=source, parts=parts, fingerprint=fp, per_position=per_position,
                                expected_rows=expected, address=self.args.ray_address,
                                fresh=self.args.fresh and arm not in self.runs and root is None, tee=tee,
                                log=self.log, machine=self.cfg.machine)
        self.runs[arm or "main"] = info.__dict__
        return final_table(parts.read(), docs=doc_ids)

    def round_trip(self, cfg: NLAConfig | None = None, *, arm: str = "", source: pa.Table | None = None,
                   root: Path | None = None, **av_override) -> pa.Table:
        """Activations -> AV pool -> AR pool. When the store has this run's activations they are the
        source; otherwise documents stream through extract -> AV -> AR (three pools side by side) and
        the store keeps the extracted columns as they come. `av_override` changes the AV stage's
        arguments (temperature, n_samples, banned_chars...)."""
        from nla_ray.runtime.stages import EXTRACT_COLUMNS, ar_spec, av_spec, extract_spec
        from nla_ray.runtime.store import key_for

        cfg = cfg or self.cfg
        dirs = self.pair(cfg)
        av = av_spec(cfg, dirs.av, **av_override)
        stages = [av, ar_spec(cfg, dirs.ar)]
        per = max(1, av.kwargs["n_samples"]) * len(cfg.extract_layers)
        if source is not None:
            return self.limit(self.run(arm, stages, source, per_position=per, extra_fp={"source": "rows"}, root=root))
        ext = extract_spec(cfg, layers=cfg.extract_layers)
        key = key_for(ext)
        docs = self.documents(cfg)
        ids = [d.doc_id for d in docs]
        fp = {"activations": key.digest()}
        if self.store.missing(key, ids):
            rows = self.run(arm, [ext, *stages], docs, per_position=per, extra_fp=fp, fp_stages=stages,
                            tee=self.store.tee(key, EXTRACT_COLUMNS), root=root)
        else:
            self.log(f"[store] activations of {len(ids)} documents found in {self.store.entry(key).dir}")
            rows = self.run(arm, stages, self.store.load(key, ids), per_position=per, extra_fp=fp, root=root)
        return self.limit(rows)

    def limit(self, table: pa.Table) -> pa.Table:
        """Keep the first `--n` activations (documents in corpus order, then sampled rank)."""
        n = self.cfg.n
        if n is None or table.num_rows == 0:
            return table
        doc_order = {d: i for i, d in enumerate(dict.fromkeys(table.column("doc_id").to_pylist()))}
        keys = sorted({(doc_order[d], r, d) for d, r, p in zip(table.column("doc_id").to_pylist(),
                                                               table.column("sample_rank").to_pylist(),
                                                               table.column("position").to_pylist()) if p >= 0})
        keep = {(d, r) for _, r, d in keys[:n]}
        mask = [(d, r) in keep or p < 0 for d, r, p in zip(table.column("doc_id").to_pylist(),
                                                          table.column("sample_rank").to_pylist(),
                                                          table.column("position").to_pylist())]
        return table.filter(pa.array(mask))

    def decodes_root(self, job: str) -> Path | None:
        """Where to reuse another job's decodes (e.g. quote_ablation's arms): `--decodes DIR`, else
        that job's default output dir for this preset when it holds rows, else None (run here)."""
        given = getattr(self.args, "decodes", None)
        if given:
            if not (Path(given) / "rows").is_dir():
                raise UserError(f"--decodes {given}: no rows/ there (expected a finished {job} output dir)")
            return Path(given)
        d = default_out(job, self.cfg.name)
        return d if (d / "rows").is_dir() else None

    def figure(self, name: str) -> Path:
        return self.out / name


class Job:
    """`unused`: contract arguments that mean nothing to this job, with why (given, they are refused
    with that reason instead of silently ignored). `own_sets`: `--set PREFIX.key=value` items routed
    to the job (ctx.own_sets[PREFIX] = ["key=value", ...]) instead of the preset's config."""

    def __init__(self, name: str, doc: str | None, *, add_args: Callable[[argparse.ArgumentParser], None] | None = None,
                 unused: dict[str, str] | None = None, own_sets: tuple[str, ...] = ()):
        self.name, self.doc, self.add_args = name, doc or name, add_args
        self.unused, self.own_sets = dict(unused or {}), tuple(own_sets)

    def _check_args(self, args: argparse.Namespace) -> dict[str, list[str]]:
        for dest, why in self.unused.items():
            v = getattr(args, dest, None)
            if v not in (None, False, [], ""):
                raise UserError(f"--{dest.replace('_', '-')} does not apply to {self.name}: {why}")
        routed: dict[str, list[str]] = {p: [] for p in self.own_sets}
        keep = []
        for item in args.set:
            head, _, rest = item.partition(".")
            if head.strip() in routed and rest:
                routed[head.strip()].append(rest)
            else:
                keep.append(item)
        args.set = keep
        return routed

    def parser(self) -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(prog=f"jobs/{self.name}.py", description=self.doc,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        add_job_args(p, self.name)
        p.add_argument("--store", help="activation store root (default $NLA_RAY_STORE or ~/.cache/nla_ray/store)")
        p.add_argument("--verify-against", help="another run's output dir: report bit-identity of rows")
        p.add_argument("--debug", action="store_true", help="show Python tracebacks for user errors")
        if self.add_args:
            self.add_args(p)
        return p

    def main(self, body: Callable[[Context], Result]) -> Callable[[list | None], int]:
        def entry(argv: list | None = None) -> int:
            args = self.parser().parse_args(argv)
            debug = args.debug or os.environ.get("NLA_RAY_DEBUG")
            try:
                own_sets = self._check_args(args)
                cfg = config_from_args(args)
                # A Ray cluster this driver cannot authenticate to: say so now, in one line, before
                # documents, models and preflight (Ray itself would warn for ~20 s, then fail).
                from nla_ray.runtime.ray_auth import check_driver_token

                check_driver_token(args.ray_address or os.environ.get("RAY_ADDRESS"))
                out = Path(args.out) if args.out else default_out(self.name, cfg.name)
                if os.environ.get("RAY_JOB_ID") and not args.out:
                    print(f"[{self.name}] note: running as a Ray job without --out, so {out} is inside Ray's "
                          "temporary copy of the working dir; pass an absolute --out to keep the results",
                          file=sys.stderr, flush=True)
                ctx = Context(self, args, cfg, out)
                ctx.own_sets = own_sets
                # Taken before the work, not after: a commit made while a long run is going must not
                # be recorded as the code that ran.
                ctx.provenance = provenance(cfg.name)
                ctx.log(f"[{self.name}] preset {cfg.name} -> {out}")
                t0 = time.time()
                res = body(ctx)
                ctx.timer.t["total"] = round(time.time() - t0, 2)
                failed = {arm: r.get("rows_failed", 0) for arm, r in ctx.runs.items() if r.get("rows_failed")}
                if failed:  # rows a stage could not process: kept apart, counted; the run is not clean
                    res.clean = False
                    ctx.log(f"[{self.name}] not clean: rows failed per arm {failed} (see summary.json run.arms.*.failures)")
                self.write(ctx, res)
            except USER_ERRORS as e:
                if debug:
                    traceback.print_exc()
                msg = e.args[0] if isinstance(e, KeyError) and e.args else e
                msg = " ".join(str(msg).split())  # one line, whatever the library's message looked like
                print(f"error: {msg}" + ("" if debug else "   (--debug for the traceback)"), file=sys.stderr)
                return 2
            if res.exit_status is not None:
                return res.exit_status
            return 0 if res.clean else 3
        self.entry = entry
        return entry

    def run_cli(self) -> None:
        sys.exit(self.entry())

    def write(self, ctx: Context, res: Result) -> None:
        from nla_ray import report

        out = ctx.out
        out.mkdir(parents=True, exist_ok=True)
        if res.own_files:
            return self._write_over_own(ctx, res)
        summary = {"job": self.name, "config": ctx.cfg.to_dict(), "headline": res.headline, **res.extra,
                   "run": {"arms": ctx.runs, "wall_s_by_phase": ctx.timer.t},
                   "provenance": ctx.provenance or provenance(ctx.cfg.name)}
        if res.rows is not None:
            tmp = out / "rows.parquet.tmp"
            pq.write_table(res.rows, tmp)
            tmp.replace(out / "rows.parquet")
            if ctx.args.verify_against:
                other = pq.read_table(Path(ctx.args.verify_against) / "rows.parquet")
                summary["verify_against"] = {"dir": ctx.args.verify_against, **compare_rows(res.rows, other)}
                ctx.log(f"verify: {summary['verify_against']}")
        write_json(out / "summary.json", summary)
        md = [f"# {self.name} — {ctx.cfg.name}\n", self.doc.strip().splitlines()[0] + "\n"]
        for t in res.tables:
            md.append(f"## {t.title}\n\n" + report.markdown_table(t.rows, t.columns) + (f"\n{t.note}\n" if t.note else ""))
        for f in res.figures:
            md.append(f"![{Path(f).stem}]({Path(f).name})\n")
        if res.legend:
            md.append("## How to read this\n\n" + res.legend + "\n")
        if res.examples:
            md.append("## Examples\n\n" + report.examples_md(res.examples))
        md.append("## Provenance\n\n" + report.provenance_md(summary["provenance"]))
        write_text(out / "table.md", "\n".join(md))
        ctx.log("\n".join(md[:2 + len(res.tables)]))
        ctx.log(f"[{self.name}] wrote {out}/summary.json, table.md" + (", rows.parquet" if res.rows is not None else "")
                + "".join(f", {Path(f).name}" for f in res.figures))


    def _write_over_own(self, ctx: Context, res: Result) -> None:
        import json

        from nla_ray import report

        path = ctx.out / "summary.json"
        own = json.loads(path.read_text()) if path.is_file() else {}
        prov = dict(ctx.provenance or provenance(ctx.cfg.name))
        theirs = own.get("provenance") or {}
        if any(theirs.get(k) not in (None, prov[k]) for k in ("command", "git_commit")):
            own["measured_provenance"] = theirs  # another command measured what this one re-derived
        prov.update({k: v for k, v in theirs.items() if k not in prov})  # e.g. the bench file's sha256
        own.update({"job": self.name, "config": ctx.cfg.to_dict(), "headline": res.headline, **res.extra,
                    "run": {"wall_s_by_phase": ctx.timer.t}, "provenance": prov})
        write_json(path, own)
        md = (ctx.out / "table.md").read_text() if (ctx.out / "table.md").is_file() else f"# {self.name}\n"
        if "## Provenance" not in md:
            md = md.rstrip() + "\n\n## Provenance\n\n" + report.provenance_md(prov)
        write_text(ctx.out / "table.md", md)
        ctx.log(f"[{self.name}] wrote {ctx.out}/summary.json, table.md"
                + "".join(f", {Path(f).name}" for f in res.figures))


def compare_rows(a: pa.Table, b: pa.Table, text: str = "explanation", vec: str = "recon") -> dict:
    """Bit-identity of two runs' rows on their common keys (explanations and reconstructions)."""
    from nla_ray.core.table import vectors
    from nla_ray.runtime.rows import KEY

    def index(t):
        keys = list(zip(*(t.column(k).to_pylist() for k in KEY)))
        return {k: i for i, k in enumerate(keys)}
    ia, ib = index(a), index(b)
    common = sorted(set(ia) & set(ib), key=str)
    ta, tb = a.column(text).to_pylist(), b.column(text).to_pylist()
    ra, rb = vectors(a, vec), vectors(b, vec)
    same_text = sum(ta[ia[k]] == tb[ib[k]] for k in common)
    same_vec = sum(np.array_equal(ra[ia[k]], rb[ib[k]]) for k in common)
    diff = max((float(np.abs(ra[ia[k]] - rb[ib[k]]).max()) for k in common), default=float("nan"))
    return {"rows_compared": len(common), "identical_explanations": int(same_text),
            "bit_identical_reconstructions": int(same_vec), "max_abs_recon_diff": diff,
            "bit_identical": len(common) > 0 and same_text == same_vec == len(common)}


def ci_str(ci) -> str:
    return "[" + ", ".join("nan" if (x is None or (isinstance(x, float) and math.isnan(x))) else f"{x:.3f}" for x in ci) + "]"
