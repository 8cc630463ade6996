"""Provenance attached to every result: command, commit, preset, machine, date."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parents[2]  # nla_ray/core/provenance.py -> the checkout


def _checkout_commit() -> str | None:
    """HEAD of the checkout this code sits in (suffix '+dirty' when tracked code differs), or None."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_REPO, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        if not re.fullmatch(r"[0-9a-f]{40}", sha):
            return None  # no repository here (a copied working tree prints 'HEAD' or nothing)
        # results/ is excluded: a job regenerating its own tracked outputs does not make the code dirty.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)results"], cwd=_REPO, capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def git_commit() -> str:
    """The commit that ran: $NLA_RAY_GIT_COMMIT when the submitter sets it (a `ray job submit` or
    device working dir is a copy whose .git, if any, need not be the one the code came from), else
    the checkout's HEAD, else 'unknown'. `provenance()` records which of the two it was."""
    return os.environ.get("NLA_RAY_GIT_COMMIT", "").strip() or _checkout_commit() or "unknown"


def machine() -> dict:
    info = {"host": platform.node(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "platform": platform.platform()}
    try:
        import torch
        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        else:
            info["gpus"] = []
    except ImportError:
        pass
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def machine_label(info: dict | None = None) -> str:
    info = info or machine()
    gpus = info.get("gpus") or []
    if gpus:
        return f"{len(gpus)}x {gpus[0]}"
    return f"CPU ({info.get('cpu_count')} cores)"


def provenance(preset: str | None = None, extra: dict | None = None) -> dict:
    info = machine()
    out = {
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name] + sys.argv),
        "git_commit": git_commit(),
        "preset": preset,
        "machine": machine_label(info),
        "machine_detail": info,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if os.environ.get("NLA_RAY_GIT_COMMIT", "").strip():
        out["git_commit_from"] = "NLA_RAY_GIT_COMMIT"
        checkout = _checkout_commit()
        if checkout and checkout != out["git_commit"]:
            out["git_checkout"] = checkout  # what the local .git says, for the record
    if extra:
        out.update(extra)
    return out
