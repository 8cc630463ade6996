"""nla-ray: one entry point for the tools around the library and for the analysis jobs.

  nla-ray trace --text "The central bank raised rates."   the AV's explanation + AR score, token by token
  nla-ray pairs                                          the embedded-default NLA pairs
  nla-ray report                                         REPORT.md + report.html from results/
  nla-ray jobs                                           every analysis job in jobs/, one line each
  nla-ray run JOB [ARGS...]                              run a job (same as python jobs/JOB.py ARGS...)
  nla-ray placement --preset paper-gemma27b-L41          GPU memory per pool and the packings on the preset's machine

`python -m nla_ray ...` is the same program. Mistakes (a missing file or directory, an unknown pair,
a bad value) print one line saying what would fix them and exit 2; --debug, or NLA_RAY_DEBUG=1,
shows the Python traceback.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shutil
import sys
import textwrap
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
JOBS_DIR = REPO / "jobs"
EXIT_USER_ERROR = 2


class CliError(Exception):
    """A mistake the user can fix: printed as one line, exit status 2."""


# ---------------------------------------------------------------------------------------------
# checks that need no model


def _read_text(a) -> str:
    if a.text_file is not None:
        p = Path(a.text_file).expanduser()
        if not p.is_file():
            raise CliError(f"--text-file {a.text_file}: "
                           + ("is a directory, not a file" if p.is_dir() else "no such file"))
        text = p.read_text(encoding="utf-8")
        what = f"--text-file {a.text_file}"
    else:
        text, what = a.text, "--text"
    if not text.strip():
        raise CliError(f"{what} is empty or only whitespace: give the text whose tokens to trace")
    return text


def _parse_positions(spec: str | None) -> list[int] | None:
    if not spec:
        return None
    try:
        pos = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise CliError(f"--positions {spec!r}: expected comma-separated token indices, e.g. 3,4,7") from None
    if not pos or min(pos) < 0:
        raise CliError(f"--positions {spec!r}: token indices start at 0")
    return pos


def _looks_like_hub_id(s: str) -> bool:
    """`org/name`: one slash, not an absolute, home or dot-relative path."""
    return s.count("/") == 1 and not s.startswith(("/", "~", ".")) and all(s.split("/"))


def _check_pair_spec(spec: str) -> None:
    """Name what is wrong with a --pair before anything is loaded (mini:NAME is checked by
    resolve_pair, whose message lists the known names)."""
    hint = "expected mini:NAME (`nla-ray pairs` lists them), a directory holding av/ and ar/, or 'AV,AR'"
    if spec.startswith(("mini:", "mini-untrained:")):
        return
    if "," in spec:
        for part, role in zip((s.strip() for s in spec.split(",", 1)), ("AV", "AR")):
            p = Path(part).expanduser()
            if not part:
                raise CliError(f"--pair {spec!r}: the {role} side is empty; {hint}")
            if p.is_dir() or (not p.exists() and _looks_like_hub_id(part)):
                continue
            raise CliError(f"--pair {spec!r}: the {role} checkpoint {part} "
                           + ("is a file, not a checkpoint directory" if p.exists() else
                              "does not exist (give a directory or a hub id org/name)"))
        return
    p = Path(spec).expanduser()
    if not p.exists():
        raise CliError(f"--pair {spec}: no such directory; {hint}")
    if not p.is_dir():
        raise CliError(f"--pair {spec}: is a file, not a directory; {hint}")
    missing = [r for r in ("av", "ar") if not (p / r).is_dir()]
    if missing:
        raise CliError(f"--pair {spec}: the directory has no {' or '.join(m + '/' for m in missing)} "
                       f"(a pair directory holds av/ and ar/, each a checkpoint with nla_meta.yaml); "
                       f"for two separate checkpoints pass 'AV_DIR,AR_DIR'")


def _hub_error(e: Exception, spec: str) -> CliError | None:
    """A Hugging Face Hub failure as one line, or None when `e` is not one."""
    mod = type(e).__module__ or ""
    if not mod.startswith("huggingface_hub"):
        return None
    name = type(e).__name__
    if name in ("LocalEntryNotFoundError", "OfflineModeIsEnabled") or "connect" in str(e).lower():
        why = ("offline mode is on (HF_HUB_OFFLINE)" if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
               else "the Hugging Face Hub cannot be reached (no network?)")
        return CliError(f"--pair {spec}: {why} and no copy is in the local cache; download it where "
                        f"there is network, or pass local directories")
    if name in ("RepositoryNotFoundError", "GatedRepoError"):
        return CliError(f"--pair {spec}: the Hub has no such repository, or it is private or gated "
                        f"(log in with `hf auth login` if you have access)")
    return CliError(f"--pair {spec}: the Hugging Face Hub refused: {' '.join(str(e).split())}")


def _positive(flag: str, value, minimum: float = 1) -> None:
    if value is not None and value < minimum:
        raise CliError(f"{flag} must be at least {minimum:g}, got {value}")


# ---------------------------------------------------------------------------------------------
# commands


def _cmd_trace(a) -> int:
    # Everything a user can get wrong is checked before torch is imported or a model is loaded.
    text = _read_text(a)
    positions = _parse_positions(a.positions)
    _positive("--min-position", a.min_position, 0)
    _positive("--max-new-tokens", a.max_new_tokens)
    _positive("--batch-size", a.batch_size)
    _positive("--temperature", a.temperature, 0)
    if a.var is not None and not a.var > 0:
        raise CliError(f"--var must be a positive variance, got {a.var}")
    if a.width is not None and a.width < 0:
        raise CliError(f"--width must be 0 (no wrapping) or a number of columns, got {a.width}")
    _check_pair_spec(a.pair)
    if not a.debug:
        _quiet_model_loading()

    from nla_ray.nla import pairs
    from nla_ray.nla.trace import format_trace, trace_text

    try:
        dirs = pairs.resolve_pair(a.pair)
    except Exception as e:  # noqa: BLE001 - only Hub failures are translated; the rest re-raised
        hub = _hub_error(e, a.pair)
        if hub is None:
            raise
        raise hub from e
    av = pairs.load_av(dirs.av, device=a.device, dtype=a.dtype, max_new_tokens=a.max_new_tokens)
    ar = pairs.load_ar(dirs.ar, device=a.device, dtype=a.dtype)
    rows, summary = trace_text(av, ar, text, positions=positions, min_position=a.min_position,
                               temperature=a.temperature, seed=a.seed, var=a.var, batch_size=a.batch_size)
    print(format_trace(rows, summary, width=a.width))
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r.__dict__, ensure_ascii=False) + "\n")
            f.write(json.dumps({"summary": summary, "pair": a.pair}) + "\n")
        print(f"wrote {out} (one JSON line per token, full explanations, then the summary)")
    return 0


def _quiet_model_loading() -> None:
    """Weight-loading progress bars and deprecation notices addressed to library developers would bury
    the table; --debug keeps them."""
    import warnings

    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _cmd_pairs(a) -> int:
    from nla_ray.nla import pairs

    for name, cfg in pairs.MINI_PAIRS.items():
        shipped = (pairs.SHIPPED_DIR / name / "av" / "nla_meta.yaml").is_file()
        print(f"mini:{name:<14} base {cfg['base']:<18} layer {cfg['layer']:<3} "
              f"{'trained (shipped)' if shipped else 'MISSING: train it, or use mini-untrained:' + name}")
    return 0


def _cmd_report(a) -> int:
    results = Path(a.results).expanduser()
    if not results.is_dir():
        raise CliError(f"--results {a.results}: no such directory (the results tree: results/<job>/<preset>/)")
    from nla_ray import report_page

    md, page = report_page.write_report(results, a.out)
    print(f"wrote {md}\nwrote {page}")
    return 0


def _jobs_dir() -> Path:
    if not JOBS_DIR.is_dir():
        raise CliError(f"no jobs/ directory beside the package ({JOBS_DIR}): the jobs ship with the "
                       f"repository; clone it and install with `pip install -e .`")
    return JOBS_DIR


def job_summary(doc: str) -> str:
    """A job's one-line summary: the first sentence of its docstring's first paragraph (a first line
    that stops mid-sentence is carried on to the sentence's end)."""
    para = " ".join(doc.strip().split("\n\n", 1)[0].split())
    m = re.search(r"[.?!](?=\s|$)", para)
    return para[:m.end()] if m else para or "(no docstring)"


def list_jobs(jobs_dir: Path | None = None) -> list[tuple[str, str]]:
    """(name, summary) for every jobs/*.py, read with `ast`: no job module (and nothing heavy) is imported."""
    out = []
    for path in sorted((jobs_dir or _jobs_dir()).glob("*.py")):
        if path.name.startswith("_"):
            continue
        try:
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))) or ""
        except SyntaxError as e:
            doc = f"(does not parse: {e.msg}, line {e.lineno})"
        out.append((path.stem, job_summary(doc)))
    return out


def _cmd_jobs(a) -> int:
    jobs = list_jobs()
    w = max(len(n) for n, _ in jobs) + 2
    cols = max(60, shutil.get_terminal_size((100, 24)).columns)
    for name, summary in jobs:
        print(textwrap.fill(summary, cols, initial_indent=f"{name:<{w}}", subsequent_indent=" " * w))
    print(f"\nrun one: nla-ray run JOB --preset mini [--n N] [--out DIR]   (nla-ray run JOB --help: its arguments)\n"
          f"the files: {JOBS_DIR}/JOB.py (python jobs/JOB.py ... is the same)")
    return 0


def _cmd_run(a) -> int:
    import runpy

    jobs = dict(list_jobs())
    name = a.job[:-3] if a.job.endswith(".py") else a.job
    name = Path(name).name
    if name not in jobs:
        raise CliError(f"unknown job {a.job!r}; jobs: {', '.join(jobs)} (`nla-ray jobs` says what each does)")
    path = JOBS_DIR / f"{name}.py"
    sys.argv = [str(path), *a.args]
    runpy.run_path(str(path), run_name="__main__")  # the job exits with its own status
    return 0


def _cmd_placement(a) -> int:
    import shlex

    from nla_ray.config import load_config
    from nla_ray.core.provenance import provenance
    from nla_ray.core.table import write_json, write_text
    from nla_ray.jobkit import Context
    from nla_ray.runtime import placement as P

    presets = a.preset or ["paper-gemma27b-L41", "paper-qwen7b-L20"]
    # --set items about one family's model stay with it; the rest (pools, machine, av.*) apply to the
    # partner too, as they do in cross_family (jobkit.Context.partner)
    shared = [s for s in a.set if s.split("=", 1)[0].strip().split(".")[0] not in Context.FAMILY_KEYS]
    statements = []
    for name in presets:
        cfg = load_config(name, overrides=a.set)
        if cfg.machine is None:
            raise P.no_machine_error(cfg)
        partner = None
        if cfg.partner and cfg.cross_pools and not a.no_cross:
            partner = load_config(cfg.partner, overrides=shared)
        statements.append(P.preset_statement(cfg, partner))
    command = "python -m nla_ray placement " + " ".join(shlex.quote(x) for x in a.argv_echo)
    prov = provenance(",".join(presets))
    prov["command"] = command
    md = P.render_markdown(statements, command=command, provenance=prov)
    print(md, end="")
    if a.out:
        out = Path(a.out).expanduser()
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text(out.with_suffix(".md"), md)
        write_json(out.with_suffix(".json"), {"command": command, "statements": statements, "provenance": prov,
                                              "assumptions": P.ASSUMPTIONS})
        print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")
    bad = [st["preset"] for st in statements for lay in [st["pipeline"], (st.get("cross_family") or {}).get(
        "side_by_side")] if lay and (not lay["fits"] or lay["all_at_once"] != "always")]
    return 3 if bad else 0


# ---------------------------------------------------------------------------------------------
# parser


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a subcommand's --debug must not reset the one given before the subcommand.
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the Python traceback of an error (also: NLA_RAY_DEBUG=1)")
    p = argparse.ArgumentParser(prog="nla-ray", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", default=False,
                   help="show the Python traceback of an error (also: NLA_RAY_DEBUG=1)")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    t = sub.add_parser("trace", parents=[common], help="the AV's explanation and the AR's NMSE / cos / FVE for every token of a text",
                       description="For each token of a text: extract the pair's layer-K residual, "
                                   "verbalize it with the AV, reconstruct it with the AR, and print "
                                   "NMSE / cos / FVE per token. Explanations are wrapped to the terminal "
                                   "width; --out keeps them as JSON lines.")
    t.add_argument("--pair", default="mini:smollm2-L20",
                   help="mini:smollm2-L20 | mini:gemma3-L12 | DIR with av/ and ar/ | 'AV,AR' (dirs or hub ids)")
    g = t.add_mutually_exclusive_group(required=True)
    g.add_argument("--text", help="the text to trace")
    g.add_argument("--text-file", help="read the text from this file")
    t.add_argument("--positions", help="comma-separated token indices (default: every non-special token)")
    t.add_argument("--min-position", type=int, default=0, help="skip tokens before this index")
    t.add_argument("--max-new-tokens", type=int, default=120, help="longest explanation, in tokens")
    t.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (reproducible)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--var", type=float, help="FVE denominator (default: sidecar eval.var_train, else own set)")
    t.add_argument("--device", default="auto")
    t.add_argument("--dtype", default="auto")
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--width", type=int,
                   help="wrap explanations to this many columns (default: the terminal's; 0: one line per token)")
    t.add_argument("--out", help="also write the rows (full explanations) as JSON lines here")
    t.set_defaults(fn=_cmd_trace)

    s = sub.add_parser("pairs", parents=[common], help="list the embedded-default NLA pairs and whether each is trained",
                       description="The mini pairs that ship in nla_ray/pairs/ (pass one as --pair mini:NAME).")
    s.set_defaults(fn=_cmd_pairs)

    r = sub.add_parser("report", parents=[common], help="write REPORT.md and a self-contained report.html from results/",
                       description="One page for every analysis: our numbers beside the seed's, figures, "
                                   "provenance, and a verdict computed from the numbers.")
    r.add_argument("--results", default=str(REPO / "results"),
                   help="the results tree (default: the repository's results/)")
    r.add_argument("--out", help="where to write REPORT.md and report.html (default: --results)")
    r.set_defaults(fn=_cmd_report)

    j = sub.add_parser("jobs", parents=[common], help="list the analysis jobs (name and what each answers)",
                       description="Every jobs/*.py with the first line of its docstring (read, not imported).")
    j.set_defaults(fn=_cmd_jobs)

    pl = sub.add_parser("placement", parents=[common],
                        help="GPU memory per pool and where Ray may place the pools, on the preset's named machine",
                        description="For each preset: what one actor of each pool needs on its GPU (weights of the "
                                    "part of the model it loads, KV cache at its batch size, activations; estimated "
                                    "from the architecture), its num_gpus share of the card, whether Ray places every "
                                    "pool's actors at once on the machine the preset names (`machine:`) in every "
                                    "arrival order, every packing it may choose with the GB per GPU, and the heaviest "
                                    "set of actors that may share one card. With a partner preset and cross_pools, "
                                    "the cross-family layout too. Exit 3 when a layout does not fit or cannot run "
                                    "all pools at once.")
    pl.add_argument("--preset", action="append", help="a preset (repeat for several; default: both paper presets)")
    pl.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a field first, e.g. --set pools.av.batch_size=256 --set machine.gpus=4")
    pl.add_argument("--no-cross", action="store_true", help="leave out the cross-family layout")
    pl.add_argument("--out", help="also write OUT.md and OUT.json (e.g. results/reliability/placement)")
    pl.set_defaults(fn=_cmd_placement)

    u = sub.add_parser("run", help="run a job by name: nla-ray run reproduce_fve --preset mini --n 20",
                       description="Runs jobs/JOB.py with the arguments that follow (the job contract: "
                                   "--preset, --set, --n, --out, ...; `nla-ray run JOB --help`). Same as "
                                   "`python jobs/JOB.py ARGS...`; the job's --debug shows its tracebacks.")
    u.add_argument("job", help="a name from `nla-ray jobs`")
    u.add_argument("args", nargs=argparse.REMAINDER, help="the job's own arguments")
    u.set_defaults(fn=_cmd_run)
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    args = list(sys.argv[1:] if argv is None else argv)
    a.argv_echo = args[args.index(a.cmd) + 1:] if a.cmd in args else []  # the subcommand's own arguments
    debug = a.debug = bool(a.debug or os.environ.get("NLA_RAY_DEBUG", "") not in ("", "0"))
    try:
        return a.fn(a)
    except BrokenPipeError:  # `nla-ray jobs | head`: the reader left; nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:  # noqa: BLE001 - user errors become one line; anything else is re-raised
        if not _is_user_error(e):
            raise
        if debug:
            traceback.print_exc()
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        msg = " ".join(str(msg).split())  # one line, whatever the message held
        print(f"error: {msg}" + ("" if debug else "   (--debug for the traceback)"), file=sys.stderr)
        return EXIT_USER_ERROR


def _is_user_error(e: Exception) -> bool:
    """The errors the library raises for things a user can fix (the same set the jobs treat as one-line
    errors), plus a packaged model that is not installed."""
    if isinstance(e, (CliError, ValueError, FileNotFoundError, NotADirectoryError, KeyError, PermissionError)):
        return True
    sources = sys.modules.get("nla_ray.nla.sources")
    return sources is not None and isinstance(e, sources.ModelSourceError)


if __name__ == "__main__":
    sys.exit(main())
