"""A run's rows on disk: parquet parts, the fingerprint they were made with, and what is finished.

Every finished batch is one `part-*.parquet` (written whole, synced to disk, then renamed, so a crash
never leaves half a part under that name). `RUN.json` records what the rows depend on (pairs' files,
row-shaping config); rows of another run are refused rather than mixed in. A document is finished
when all its rows are present; a rerun redoes only the unfinished ones.

What a crash or a second run can leave, and what happens to it:
  - `LOCK`: the run writing here (host, pid, command). A second run into the same directory is
    refused while that process lives; a lock whose process is gone (a killed driver, a stopped job)
    is taken over.
  - a part that cannot be read (cut short by a crash on a file system without atomic rename, a copy
    interrupted): moved to `set_aside/` when found, so its documents count as unfinished and are redone.
  - `*.tmp` files of a writer that died mid-part: removed by the next run that holds the lock.
  - rows a stage could not process (`row_error` set): kept apart in `failed/`, never among the parts,
    so their documents are unfinished and a rerun tries them again.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import sys
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


class RunLocked(ValueError):
    """Another live run is writing into the same rows directory."""


LOCK_NAME = "LOCK"
SET_ASIDE = "set_aside"
FAILED_DIR = "failed"


def _process_start(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch), or None when there is no such process."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


def lock_holder_alive(info: dict) -> bool | None:
    """True/False when the lock's process is known to live / to be gone; None when it cannot be told
    (the lock was taken on another host)."""
    if info.get("host") != socket.gethostname():
        return None
    pid = info.get("pid")
    if not isinstance(pid, int):
        return False
    started = _process_start(pid)
    if started is None:
        return False
    want = info.get("process_start")
    # a pid the system gave to a new process after the lock's process ended is not the holder
    return not isinstance(want, (int, float)) or abs(started - want) < 2.0


class RowParts:
    """The parts directory of one pipeline run."""

    def __init__(self, directory: Path, log=None):
        self.dir = Path(directory)
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.set_aside: list[dict] = []   # unreadable parts found by read(): {"part", "reason"}
        self._lock_depth = 0

    def files(self) -> list[Path]:
        return sorted(self.dir.glob("part-*.parquet"))

    def failed_files(self) -> list[Path]:
        return sorted((self.dir / FAILED_DIR).glob("part-*.parquet"))

    def clear(self) -> None:
        for f in [*self.files(), *self.failed_files(), self.dir / "RUN.json"]:
            f.unlink(missing_ok=True)

    # -- one run at a time ------------------------------------------------------------------
    @property
    def lock_path(self) -> Path:
        return self.dir / LOCK_NAME

    def lock_info(self) -> dict | None:
        try:
            return json.loads(self.lock_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # half-written by a process killed between creating and filling it

    def acquire(self, command: str | None = None) -> dict:
        """Take the directory's lock, or raise `RunLocked` naming the run that holds it. A lock left by
        a process that is gone is taken over (returned as {"took_over": <its info>})."""
        if self._lock_depth:
            self._lock_depth += 1
            return {}
        self.dir.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "process_start": _process_start(os.getpid()),
              "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "command": command or " ".join(sys.argv)}
        took_over = None
        for _ in range(5):
            try:
                fd = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                info = self.lock_info()
                if info is None:
                    continue  # released between our open and our read
                if info == {}:
                    age = time.time() - self.lock_path.stat().st_mtime if self.lock_path.exists() else 99
                    if age < 5:  # its writer may be filling it right now
                        time.sleep(0.5)
                        continue
                    alive = False
                elif info.get("pid") == me["pid"] and info.get("host") == me["host"]:
                    alive = False  # our own process (a previous run here that ended without releasing)
                else:
                    alive = lock_holder_alive(info)
                if alive is not False:
                    where = "on this machine" if alive else f"on host {info.get('host')!r} (cannot tell from here whether it still runs)"
                    raise RunLocked(
                        f"{self.dir} is in use by another run {where}: pid {info.get('pid')}, started "
                        f"{info.get('started')}, command: {info.get('command')!r}. Wait for it to finish or pass "
                        f"another --out" + ("" if alive else f"; if that run is gone, delete {self.lock_path}"))
                took_over = info
                try:
                    self.lock_path.unlink()
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(me))
                fh.flush()
                os.fsync(fh.fileno())
            self._lock_depth = 1
            return {"took_over": took_over} if took_over is not None else {}
        raise RunLocked(f"{self.dir}: could not take {self.lock_path} (another run keeps taking it)")

    def release(self) -> None:
        if not self._lock_depth:
            return
        self._lock_depth -= 1
        if self._lock_depth:
            return
        info = self.lock_info()
        if info and info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
            self.lock_path.unlink(missing_ok=True)

    def remove_stale_tmp(self) -> list[str]:
        """Remove `*.tmp` parts a writer left when it died (call only while holding the lock)."""
        gone = []
        for f in [*self.dir.glob("*.tmp"), *(self.dir / FAILED_DIR).glob("*.tmp")]:
            f.unlink(missing_ok=True)
            gone.append(f.name)
        return gone

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

    def write(self, batch: dict, *, failed: bool = False) -> Path:
        """One part, whole or not at all: written to a .tmp, synced, then renamed. `failed`: rows a
        stage could not process, kept apart under failed/ (never read back as finished rows)."""
        d = self.dir / FAILED_DIR if failed else self.dir
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"part-{int(time.time() * 1e3):013d}-{uuid.uuid4().hex[:6]}.parquet"
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as fh:
            pq.write_table(to_arrow(batch), fh)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
        try:  # the rename itself survives a power cut only once the directory is synced
            dfd = os.open(d, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass
        return path

    def _set_aside(self, f: Path, reason: str) -> None:
        dest = self.dir / SET_ASIDE / f.name
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            f.replace(dest)
        except FileNotFoundError:
            return  # another reader moved it first
        except OSError as e:
            reason += f" (could not move it: {e})"
        self.set_aside.append({"part": f.name, "reason": reason})
        self.log(f"[rows] set aside unreadable part {f.name} -> {dest.parent}/ ({reason}); "
                 "its documents count as unfinished and are redone")

    def read(self) -> pa.Table | None:
        tables = []
        for f in self.files():
            try:
                tables.append(pq.read_table(f))
            except (pa.ArrowException, OSError) as e:  # cut short: no footer, or empty
                self._set_aside(f, f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
        if not tables:
            return None
        return pa.concat_tables(tables, promote_options="default")

    def read_failed(self) -> pa.Table | None:
        files = self.failed_files()
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

