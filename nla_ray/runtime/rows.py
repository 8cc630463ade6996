"""A run's rows on disk: parquet parts, the fingerprint they were made with, and what is finished.

Every finished batch is one `part-*.parquet` (written whole, then renamed, so a crash never leaves
half a part under that name). `RUN.json` records what the rows depend on (pairs' files, row-shaping
config); rows of another run are refused rather than mixed in. A document is finished when all its
rows are present; a rerun redoes only the unfinished ones.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nla_ray.core.table import to_arrow, write_json

KEY = ["doc_id", "position", "layer", "sample_idx"]
SHORT = "short_doc"  # status of the marker row kept for a document with no position >= 50


class RunMismatch(ValueError):
    """The output dir holds rows made with another pair or row-shaping config."""


class RowParts:
    """The parts directory of one pipeline run."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)

    def files(self) -> list[Path]:
        return sorted(self.dir.glob("part-*.parquet"))

    def clear(self) -> None:
        for f in [*self.files(), self.dir / "RUN.json"]:
            f.unlink(missing_ok=True)

    def check(self, fingerprint: dict) -> None:
        """Record the fingerprint for a new run; refuse rows of a different one, naming what changed."""
        self.dir.mkdir(parents=True, exist_ok=True)
        f = self.dir / "RUN.json"
        has_rows = bool(self.files())
        old = json.loads(f.read_text()) if f.is_file() else None
        if has_rows and old != fingerprint:
            if old is None:
                what = "no RUN.json (rows from an older nla_ray)"
            else:
                changed = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
                what = "; ".join(f"{k}: {old.get(k)!r} -> {fingerprint.get(k)!r}"[:200] for k in changed)
            raise RunMismatch(f"{self.dir} holds rows of a different run ({what}). Rerun with --fresh to discard "
                              "them, or pass another --out.")
        if not has_rows or old is None:
            write_json(f, fingerprint)

    def write(self, batch: dict) -> Path:
        path = self.dir / f"part-{int(time.time() * 1e3):013d}-{uuid.uuid4().hex[:6]}.parquet"
        tmp = path.with_suffix(".tmp")
        pq.write_table(to_arrow(batch), tmp)
        tmp.replace(path)
        return path

    def read(self) -> pa.Table | None:
        files = self.files()
        if not files:
            return None
        return pa.concat_tables([pq.read_table(f) for f in files], promote_options="default")


def read_parts(rows_dir: Path) -> pa.Table | None:
    return RowParts(rows_dir).read()


def completed_docs(table: pa.Table | None, per_position: int) -> set[str]:
    """Documents whose every (position x layer x sample) row is present; `per_position` is
    layers x samples. A short-document marker (position -1) finishes its document on its own."""
    if table is None or table.num_rows == 0:
        return set()
    cols = [table.column(k).to_pylist() for k in ("doc_id", "position", "positions_in_doc", "layer", "sample_idx")]
    seen: dict[str, set] = {}
    need: dict[str, int] = {}
    for d, p, n, layer, s in zip(*cols):
        seen.setdefault(d, set()).add((p, layer, s))
        need[d] = 1 if p < 0 else n * per_position
    return {d for d, s in seen.items() if len(s) >= need[d]}


def final_table(table: pa.Table, docs: list[str] | None = None) -> pa.Table:
    """Drop duplicates left by interrupted runs, keep only `docs` when given, and order rows stably
    by (doc, rank, layer, sample) so two runs of the same command give the same table."""
    keys = list(zip(*(table.column(k).to_pylist() for k in KEY)))
    first: dict = {}
    for i, k in enumerate(keys):
        first.setdefault(k, i)
    t = table.take(pa.array(sorted(first.values())))
    if docs is not None:
        t = t.filter(pa.array(np.isin(np.asarray(t.column("doc_id").to_pylist(), dtype=object), list(docs))))
    return t.sort_by([("doc_id", "ascending"), ("sample_rank", "ascending"), ("layer", "ascending"),
                      ("sample_idx", "ascending")])

