"""What every job does around the pipeline: docs from the config, output dir, provenance, writing."""

from __future__ import annotations

import time
from pathlib import Path

from .config import NLAConfig
from .corpora import make_source


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def out_dir_for(job: str, cfg: NLAConfig, out: str | None) -> Path:
    return Path(out) if out else repo_root() / "results" / job / cfg.name


def documents(cfg: NLAConfig) -> list:
    spec = dict(cfg.corpus)
    src = make_source(spec)
    docs = []
    for d in src.iter_documents():
        docs.append(d)
        if len(docs) >= cfg.n_docs:
            break
    if not docs:
        raise ValueError(f"corpus {spec} yielded no documents")
    return docs


class Timer:
    def __init__(self):
        self.t = {}

    def __call__(self, name: str):
        timer = self

        class _C:
            def __enter__(self):
                self.t0 = time.time()

            def __exit__(self, *a):
                timer.t[name] = round(time.time() - self.t0, 2)
        return _C()
