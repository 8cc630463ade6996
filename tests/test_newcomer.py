"""A newcomer's first hour (issue #16): one-line errors, the `nla-ray` entry point, the trace's
formatting, a quiet and idempotent setup, a demo that leaves the checkout clean. CPU, no Ray, no model
loads: every command here fails or finishes before a model would be loaded."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def nla_ray(*args: str, env: dict | None = None, timeout: int = 60) -> subprocess.CompletedProcess:
    """`python -m nla_ray ARGS` (what the `nla-ray` console script runs), from outside the repository."""
    return subprocess.run([sys.executable, "-m", "nla_ray", *args], capture_output=True, text=True,
                          timeout=timeout, cwd="/", env={**os.environ, "COLUMNS": "100", **(env or {})})


def assert_one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout[-500:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1, lines
    for n in needles:
        assert n in errors[0], (n, errors[0])
    return errors[0]


# ---- item 7: trace ---------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "   \n\t "])
def test_trace_refuses_empty_text_before_loading_anything(text, tmp_path):
    code = ("import sys\nfrom nla_ray.cli import main\n"
            f"rc = main(['trace', '--text', {text!r}])\n"
            "print('torch' in sys.modules, 'transformers' in sys.modules)\nsys.exit(rc)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert_one_line_error(r, "--text", "empty")
    assert r.stdout.split() == ["False", "False"]  # refused before torch (let alone a model) was imported
    f = tmp_path / "blank.txt"
    f.write_text(text, encoding="utf-8")
    assert_one_line_error(nla_ray("trace", "--text-file", str(f)), str(f), "empty")


def _rows(explanation: str, n: int = 2):
    from nla_ray.nla.trace import TraceRow

    rows = [TraceRow(3 + i, "\u0120bank", explanation, "ok", 0.21, 0.89, 0.52) for i in range(n)]
    rows.append(TraceRow(9, ".", None, "no_open_tag", 0.9, 0.5, -1.0))
    summary = {"n_tokens": n + 1, "nmse_mean": 0.3, "cos_mean": 0.8, "fve": 0.4, "fve_denominator": "own_set",
               "var": 0.48, "layer": 20, "tag_failures": 1}
    return rows, summary


def test_format_trace_wraps_long_explanations_without_cutting():
    from nla_ray.nla.trace import format_trace

    words = [f"w{i:03d}" for i in range(90)]  # ~450 characters, far past the old 100-character cut
    expl = " ".join(words)
    rows, summary = _rows(expl)
    out = format_trace(rows, summary, width=80)
    lines = out.splitlines()
    assert all(len(ln) <= 80 for ln in lines[:-1]), max(lines[:-1], key=len)  # the summary line may be long
    body = lines[1:-1]
    starts = [i for i, ln in enumerate(body) if ln[:4].strip().isdigit()]
    assert len(starts) == 3
    first = body[starts[0]:starts[1]]
    assert len(first) > 4  # wrapped onto continuation lines
    indent = first[0].index("w000")
    assert all(ln[:indent].strip() == "" for ln in first[1:])  # continuations sit under the column
    assert " ".join(ln[indent:].strip() for ln in first).split() == words  # every word, in order
    assert body[starts[2]].endswith("<no_open_tag>")
    # width 0: one line per token, nothing cut (position_trace writes files this way)
    flat = format_trace(rows, summary, width=0).splitlines()
    assert len(flat) == 5 and flat[1].endswith(expl)
    # short explanations stay on one line, unchanged
    rows, summary = _rows("Business news report on rates.")
    assert format_trace(rows, summary, width=80).splitlines()[1].endswith("  Business news report on rates.")


def test_format_trace_defaults_to_the_terminal_width(monkeypatch):
    from nla_ray.nla.trace import format_trace

    monkeypatch.setenv("COLUMNS", "70")
    rows, summary = _rows("word " * 60)
    assert max(len(ln) for ln in format_trace(rows, summary).splitlines()[:-1]) <= 70


# ---- item 2: one-line errors ------------------------------------------------------------------


def test_missing_pair_directory_is_one_line(tmp_path):
    missing = tmp_path / "no_such_pair"
    line = assert_one_line_error(nla_ray("trace", "--pair", str(missing), "--text", "hi"), str(missing),
                                 "no such directory")
    assert "mini:" in line  # says what would work instead
    (tmp_path / "half" / "av").mkdir(parents=True)
    assert_one_line_error(nla_ray("trace", "--pair", str(tmp_path / "half"), "--text", "hi"), "ar/")
    assert_one_line_error(nla_ray("trace", "--pair", f"{missing}/av,{missing}/ar", "--text", "hi"),
                          f"{missing}/av", "does not exist")


@pytest.mark.parametrize("args,needles", [
    (["trace", "--pair", "mini:nope", "--text", "hi"], ["'nope'", "smollm2-L20"]),
    (["trace", "--text-file", "/no/such/file.txt"], ["/no/such/file.txt", "no such file"]),
    (["trace", "--positions", "3,x", "--text", "hi"], ["--positions", "3,4,7"]),
    (["trace", "--batch-size", "0", "--text", "hi"], ["--batch-size"]),
    (["report", "--results", "/no/such/results"], ["/no/such/results", "no such directory"]),
    (["run", "no_such_job"], ["no_such_job", "reproduce_fve"]),
    (["run", "reproduce_fve", "--preset", "no-such-preset"], ["no-such-preset", "mini-gemma"]),
    (["run", "reproduce_fve", "--n", "0"], ["--n", "0"]),
    (["run", "reproduce_fve", "--n", "-3"], ["--n", "-3"]),
])
def test_user_errors_are_one_line(args, needles):
    assert_one_line_error(nla_ray(*args), *needles)


def test_hub_id_without_network_is_one_line():
    # conftest sets HF_HUB_OFFLINE=1 (no test reaches for the Hub); the CLI says so in one line
    r = nla_ray("trace", "--pair", "nobody-here/av-x,nobody-here/ar-x", "--text", "hi", env={"HF_HUB_OFFLINE": "1"})
    assert_one_line_error(r, "nobody-here/av-x", "offline", "local cache")


def test_debug_shows_the_traceback():
    r = nla_ray("--debug", "trace", "--text", " ")
    assert r.returncode == 2 and "Traceback" in r.stderr and "CliError" in r.stderr
    r = nla_ray("trace", "--text", " ", env={"NLA_RAY_DEBUG": "1"})
    assert r.returncode == 2 and "Traceback" in r.stderr


# ---- item 10: one entry point ------------------------------------------------------------------


def test_console_script_is_declared():
    tomllib = pytest.importorskip("tomllib")
    meta = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert meta["project"]["scripts"]["nla-ray"] == "nla_ray.cli:main"


def test_jobs_lists_every_job_without_importing_them():
    from nla_ray.cli import list_jobs

    stems = sorted(p.stem for p in (REPO / "jobs").glob("*.py") if not p.name.startswith("_"))
    listed = list_jobs()
    assert [n for n, _ in listed] == stems
    assert all(s and s != "(no docstring)" and "\n" not in s for _, s in listed)
    assert dict(listed)["reproduce_fve"] == "§1: does an NLA pair's FVE reproduce on held-out documents?"
    r = nla_ray("jobs")
    assert r.returncode == 0, r.stderr
    starts = {ln.split()[0] for ln in r.stdout.splitlines() if ln and not ln[0].isspace()}
    assert set(stems) <= starts
    assert "nla-ray run" in r.stdout
    code = "import sys; from nla_ray.cli import list_jobs; list_jobs(); print(sorted(m for m in ('torch', 'ray', 'transformers', 'pyarrow') if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "[]", r.stdout + r.stderr


def test_help_explains_each_subcommand():
    r = nla_ray("--help")
    assert r.returncode == 0
    for cmd in ("trace", "pairs", "report", "jobs", "run"):
        line = next((ln for ln in r.stdout.splitlines() if ln.strip().startswith(cmd + " ")), "")
        assert len(line.split()) > 3, (cmd, r.stdout)  # the command and a sentence about it
        sub = nla_ray(cmd, "--help")
        assert sub.returncode == 0 and "usage: nla-ray " + cmd in sub.stdout, sub.stdout + sub.stderr
    assert "--debug" in r.stdout and "NLA_RAY_DEBUG" in r.stdout


def test_run_passes_the_job_its_own_arguments():
    r = nla_ray("run", "reproduce_fve", "--help")
    assert r.returncode == 0 and "--preset" in r.stdout and "§1" in r.stdout, r.stdout + r.stderr


# ---- item 9: setup's output ---------------------------------------------------------------------


def test_pyproject_builds_without_deprecation_warnings(monkeypatch):
    """setuptools' `project.license` deprecation (printed once per build step) came from a TOML-table
    license; the SPDX string reads cleanly."""
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    monkeypatch.chdir(REPO)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = apply_configuration(Distribution(), str(REPO / "pyproject.toml"))
    msgs = [str(w.message) for w in caught]
    assert not [m for m in msgs if "license" in m.lower() or "deprecat" in m.lower()], msgs
    meta = dist.metadata
    assert "Apache-2.0" in (getattr(meta, "license_expression", None), meta.license)


def test_setup_rerun_is_silent_and_keyed_on_content(tmp_path):
    """A second `scripts/setup.sh` only checks: no output, no pip (a fake venv that has no pip)."""
    (tmp_path / "scripts").mkdir()
    for f in ("pyproject.toml", "scripts/setup.sh"):
        (tmp_path / f).write_bytes((REPO / f).read_bytes())
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "python").symlink_to(sys.executable)
    digest = hashlib.sha256((REPO / "pyproject.toml").read_bytes() + (REPO / "scripts/setup.sh").read_bytes()).hexdigest()
    (tmp_path / ".venv" / ".nla_ray_setup_done").write_text(digest + "\n")
    os.utime(tmp_path / "pyproject.toml")  # newer than the stamp, same content: still nothing to do
    r = subprocess.run(["bash", str(tmp_path / "scripts" / "setup.sh")], capture_output=True, text=True,
                       timeout=60, env={**os.environ, "PYTHON": sys.executable})
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")


# ---- item 5: the demo leaves a checkout clean ----------------------------------------------------


def test_demo_writes_under_an_ignored_runs_dir():
    from nla_ray.jobkit import default_out

    out = default_out("cross_family", "mini")
    assert out == REPO / "runs" / "cross_family" / "mini"
    make = (REPO / "Makefile").read_text(encoding="utf-8")
    demo = make.split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    assert "jobs/cross_family.py --preset mini" in demo and "--out" not in demo
    r = subprocess.run(["git", "check-ignore", "-q", str(out / "summary.json")], cwd=REPO, timeout=30)
    assert r.returncode == 0, "runs/ must be git-ignored"
