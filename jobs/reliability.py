"""Reliability (#13): faults survived with no row lost or duplicated; bad inputs end in a clear message or a counted skip.

An overnight run must survive a dead actor or a killed job with nothing lost or duplicated, and every bad
input must end in a clear message or a counted skip (issue #13, parts 1 and 2).

Faults, each against an uninterrupted run of the same command (`jobs/reproduce_fve.py` on a world of
tiny random decoders with the real SmolLM2 tokenizer, local Ray on this machine). A fault is survived
when the final table equals the uninterrupted one bit for bit (explanations, raw AV text,
reconstructions, gold vectors) with no row lost and none duplicated:
  actor      SIGKILL the AV actor mid-run: Ray Data restarts it and retries its batches (the rows'
             `av_worker` stamps count the restarts)
  driver     SIGKILL the driver mid-run, then the same command again: only unfinished documents redone
  job_stop   `ray job stop` a submitted job mid-run (a private head on 127.0.0.1), then submit it again
  torn_part  a parquet part cut short as a crash mid-write leaves it: found at resume, set aside, redone
  lock       a second run into the same --out while the first runs: refused with a clear message
  bad_rows   one document's rows make the AV stage raise: the other rows kept, the failed ones recorded
             with their error and counted, exit status 3 (not clean)
Bad inputs: each case builds one bad thing (a sidecar field, a vector, a document, a weight file, a
config value) and records what the user sees and how it is handled; tests/test_bad_inputs.py runs the
same cases and asserts them.

  python jobs/reliability.py --out results/reliability                 # everything, CPU, ~15 min
  python jobs/reliability.py --faults lock,torn_part --out /tmp/rel     # a subset
  python jobs/reliability.py --faults none --out /tmp/rel               # bad inputs only (~1 min)
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `ray job submit` working dirs

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from nla_ray.jobkit import Context, Job, Result, Table, compare_rows, repo_root  # noqa: E402
from nla_ray.runtime.local_head import free_ports, stop_processes_with  # noqa: E402

FAULTS = ("actor", "driver", "job_stop", "torn_part", "lock", "bad_rows")


def _args(p) -> None:
    p.add_argument("--faults", default=",".join(FAULTS),
                   help=f"comma-separated faults to inject ({', '.join(FAULTS)}), or 'none' (bad inputs only)")
    p.add_argument("--work", help="where the world, the faulted runs and their logs go "
                                  "(default runs/reliability/work; ignored by git)")
    p.add_argument("--docs", type=int, default=32, help="documents per faulted run (2 activations each)")
    p.add_argument("--no-bad-inputs", action="store_true", help="skip the bad-input cases")


JOB = Job("reliability", __doc__, add_args=_args, unused={
    "store": "each faulted run has its own activation store under --work",
    "fresh": "every scenario starts from an empty directory under --work",
    "ray_address": "the faults run on local clusters this job starts (and a private head for job_stop)",
    "verify_against": "each fault is compared with this job's own uninterrupted run",
    "n": "use --docs (each document gives 2 activations)",
    "config": "the faulted runs use the tiny world's preset"})


# ---------------------------------------------------------------------------------------------
# the world: a tiny random decoder on the real SmolLM2 tokenizer, as an NLA pair and a preset


@dataclass
class World:
    root: Path
    base: Path
    av: Path
    ar: Path
    preset: Path


def build_world(root: Path, n_docs: int = 32, max_new_tokens: int = 24) -> World:
    """A 4-block Llama-style decoder (d=64, random weights, seeded) with the SmolLM2 tokenizer, written
    as a base model and an NLA pair (weights copied, the released layout), and a preset over the
    packaged BBC held-out slice. Built once per root."""
    root = Path(root)
    base, pair = root / "tl-base", root / "tl-pair"
    preset = root / f"tiny-{n_docs}.yaml"
    if not (pair / "ar" / "value_head.safetensors").is_file():
        import torch
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        from nla_ray.nla import pairs, sources

        tok = AutoTokenizer.from_pretrained(sources.resolve("pkg:smollm2-135m").path)
        torch.manual_seed(1234)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=128, max_position_embeddings=2048,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id)
        model = LlamaForCausalLM(cfg).eval()
        model.save_pretrained(base, safe_serialization=True)
        tok.save_pretrained(base)
        tmp = root / "tl-pair.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        pairs.write_pair(tmp, base_spec=str(base), model=model, tokenizer=tok, layer=2, copy_weights=True)
        tmp.rename(pair)
    if not preset.is_file():
        preset.write_text(json.dumps({
            "pair": f"{pair / 'av'},{pair / 'ar'}", "base": str(base), "layer": 2, "n_docs": n_docs,
            "positions_per_doc": 2, "max_length": 256, "bootstrap": 50,
            "corpus": {"kind": "packaged_bbc", "split": "heldout"}, "av": {"max_new_tokens": max_new_tokens},
            "pools": {p: {"num_cpus": 1, "batch_size": 2, "dtype": "float32"} for p in ("extract", "av", "ar")}},
            indent=1))
    return World(root, base, pair / "av", pair / "ar", preset)


# ---------------------------------------------------------------------------------------------
# running the faulted command


KEY = ["doc_id", "position", "layer", "sample_idx"]


def job_cmd(world: World, out: Path, store: Path) -> list[str]:
    return [sys.executable, str(repo_root() / "jobs" / "reproduce_fve.py"), "--preset", str(world.preset),
            "--out", str(out), "--store", str(store)]


def start(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    fh = open(log, "w")
    return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=repo_root(),
                            env={**os.environ, **(env or {})})


def finish(proc: subprocess.Popen, timeout: float = 900) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        return proc.wait()


def wait_for(pred, proc: subprocess.Popen | None, timeout: float = 600, every: float = 0.1) -> bool:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return True
        if proc is not None and proc.poll() is not None:
            return bool(pred())
        time.sleep(every)
    return False


def n_parts(out: Path) -> int:
    return len(list((out / "rows").glob("part-*.parquet")))


def descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def kill_tree(pid: int, grace: float = 0.0) -> int:
    """SIGKILL process `pid` and, after `grace` seconds, whichever of its descendants (recorded before)
    are still alive, each by its own pid. Returns how many descendants outlived it."""
    import psutil

    kids = descendants(pid)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    time.sleep(grace)
    left = 0
    for k in kids:
        try:
            if k.is_running():
                left += 1
                k.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(kids, timeout=10)
    return left


def find_worker(driver_pid: int, label: str):
    """The Ray worker process of this driver's local cluster whose title names `label` (e.g. Verbalize)."""
    for p in descendants(driver_pid):
        try:
            if any(label in a for a in p.cmdline()):
                return p
        except Exception:  # noqa: BLE001 - gone between listing and reading
            continue
    return None


def summary(out: Path) -> dict:
    f = out / "summary.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def arm(s: dict) -> dict:
    return (s.get("run", {}).get("arms") or {}).get("main", {})


def done_docs(out: Path, skip: tuple = ()) -> set[str]:
    """Finished documents among the readable parts (read without moving anything), `skip` left out."""
    from nla_ray.runtime.rows import completed_docs

    tables = []
    for f in sorted((out / "rows").glob("part-*.parquet")):
        if f.name in skip:
            continue
        try:
            tables.append(pq.read_table(f))
        except (pa.ArrowException, OSError):
            continue
    return completed_docs(pa.concat_tables(tables, promote_options="default") if tables else None, per_position=1)


def keys_of(t: pa.Table) -> list[tuple]:
    return list(zip(*(t.column(k).to_pylist() for k in KEY)))


def compare(base: pa.Table, got: pa.Table | None, skip_docs: set[str] = frozenset()) -> dict:
    """Rows lost / duplicated / unexpected, and bit-identity (explanations, raw AV text, reconstructions,
    gold vectors) of the final table against the uninterrupted one; `skip_docs`: documents expected to
    be missing (recorded as failed instead)."""
    if skip_docs:
        base = base.filter(pa.array([d not in skip_docs for d in base.column("doc_id").to_pylist()]))
    if got is None:
        return {"rows_expected": base.num_rows, "rows_final": 0, "rows_lost": base.num_rows, "rows_duplicated": 0,
                "rows_unexpected": 0, "bit_identical": False}
    kb, kg = keys_of(base), keys_of(got)
    a = compare_rows(base, got, "explanation", "recon")
    b = compare_rows(base, got, "av_text", "vector")
    same = (a["bit_identical"] and b["bit_identical"] and a["rows_compared"] == len(set(kb)) == len(set(kg)))
    return {"rows_expected": base.num_rows, "rows_final": got.num_rows, "rows_lost": len(set(kb) - set(kg)),
            "rows_duplicated": len(kg) - len(set(kg)), "rows_unexpected": len(set(kg) - set(kb)),
            "bit_identical": bool(same), "max_abs_recon_diff": a["max_abs_recon_diff"]}


def final_rows(out: Path) -> pa.Table | None:
    f = out / "rows.parquet"
    return pq.read_table(f) if f.is_file() else None


def superseded(out: Path) -> int:
    """Rows present more than once among the parts (a partial document redone): dropped on read."""
    from nla_ray.runtime.rows import RowParts

    t = RowParts(out / "rows", log=lambda m: None).read()
    return 0 if t is None else t.num_rows - len(set(keys_of(t)))


class Faults:
    def __init__(self, ctx: Context, world: World, work: Path):
        self.ctx, self.world, self.work = ctx, world, work
        self.base_out = work / "baseline" / "out"
        self.base_store = work / "baseline" / "store"
        self.baseline: pa.Table | None = None

    def log(self, msg: str) -> None:
        self.ctx.log(f"[reliability] {msg}")

    def dirs(self, name: str) -> tuple[Path, Path, Path]:
        d = self.work / name
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        return d / "out", d / "store", d

    def run_baseline(self) -> dict:
        out, store, d = self.dirs("baseline")
        t0 = time.time()
        rc = finish(start(job_cmd(self.world, out, store), d / "run.log"))
        if rc != 0:
            raise RuntimeError(f"the uninterrupted run failed (exit {rc}); see {d / 'run.log'}")
        self.baseline = final_rows(out)
        self.log(f"baseline: {self.baseline.num_rows} rows in {time.time() - t0:.0f}s")
        return {"rows": self.baseline.num_rows, "wall_s": round(time.time() - t0, 1), "command": job_cmd(self.world, out, store)}

    def row(self, fault: str, injected: str, rc, cmp: dict, *, ok_rc=(0,), restarts=0, redone=None, extra=None,
            notes: str = "", mid_run: bool = True) -> dict:
        survived = bool(mid_run and (rc in ok_rc) and cmp.get("bit_identical") and cmp["rows_lost"] == 0
                        and cmp["rows_duplicated"] == 0 and cmp.get("rows_unexpected", 0) == 0
                        and all((extra or {}).get(k, True) for k in ("checks_ok",)))
        r = {"fault": fault, "injected": injected, "injected_mid_run": bool(mid_run), "survived": survived,
             "exit_status": rc, **cmp, "restarts": restarts, "redone_docs": redone, "notes": notes}
        r.update(extra or {})
        self.log(f"{fault}: survived={survived} lost={cmp['rows_lost']} duplicated={cmp['rows_duplicated']} "
                 f"bit_identical={cmp.get('bit_identical')} restarts={restarts} redone={redone} ({notes})")
        return r

    # -- 1. a dead AV actor ---------------------------------------------------------------------
    def actor(self) -> dict:
        out, store, d = self.dirs("actor")
        proc = start(job_cmd(self.world, out, store), d / "run.log")
        wait_for(lambda: n_parts(out) >= 1, proc)
        victim = find_worker(proc.pid, "Verbalize")
        injected, at = "no AV actor found", n_parts(out)
        if victim is not None and proc.poll() is None:
            victim.send_signal(signal.SIGKILL)
            injected = f"SIGKILL AV actor pid {victim.pid} after {at} part(s) written"
        rc = finish(proc)
        s = arm(summary(out))
        restarts = int((s.get("actor_restarts") or {}).get("av", 0))
        cmp = compare(self.baseline, final_rows(out))
        return self.row("actor", injected, rc, cmp, restarts=restarts, redone=0, mid_run=restarts >= 1,
                        notes=f"av worker processes {(s.get('worker_processes') or {}).get('av')}; the killed "
                              "actor's batches were retried on its restart")

    # -- 2. a killed driver ---------------------------------------------------------------------
    def driver(self) -> dict:
        out, store, d = self.dirs("driver")
        cmd = job_cmd(self.world, out, store)
        proc = start(cmd, d / "run1.log")
        wait_for(lambda: n_parts(out) >= 2, proc)
        mid = proc.poll() is None
        at = n_parts(out)
        left = kill_tree(proc.pid, grace=3.0)
        proc.wait()
        done = done_docs(out)
        lock_left = (out / "rows" / "LOCK").is_file()
        rc = finish(start(cmd, d / "run2.log"))
        s = arm(summary(out))
        n_total = s.get("docs_total")
        redone = s.get("docs_submitted")
        checks = (s.get("docs_skipped_done") == len(done) and redone == (n_total or 0) - len(done)
                  and (not lock_left or s.get("lock_taken_over") is not None))
        cmp = compare(self.baseline, final_rows(out))
        return self.row("driver", f"SIGKILL driver pid {proc.pid} after {at} part(s) written; same command again",
                        rc, cmp, redone=redone, mid_run=mid and len(done) < (n_total or 0),
                        extra={"checks_ok": checks, "docs_finished_at_kill": len(done),
                               "stale_lock_taken_over": s.get("lock_taken_over") is not None,
                               "ray_processes_outliving_driver": left, "superseded_part_rows": superseded(out)},
                        notes=f"{len(done)}/{n_total} documents finished at the kill; the rerun redid "
                              f"{redone} (exactly the unfinished ones: {checks}); stale lock taken over: "
                              f"{s.get('lock_taken_over') is not None}; {left} Ray process(es) outlived the driver "
                              "(killed by pid)")

    # -- 3. ray job stop -------------------------------------------------------------------------
    def job_stop(self) -> dict:
        out, store, d = self.dirs("job_stop")
        head = PrivateHead(d)
        try:
            head.start()
            cmd = job_cmd(self.world, out, store)
            head.submit("rel-1", cmd)
            last = [time.time()]

            def progress() -> bool:  # parts every 0.2 s; whether the job ended already every 5 s
                if n_parts(out) >= 2:
                    return True
                if time.time() - last[0] > 5:
                    last[0] = time.time()
                    return head.status("rel-1") in ("SUCCEEDED", "FAILED", "STOPPED")
                return False
            wait_for(progress, None, timeout=900, every=0.2)
            mid = head.status("rel-1") == "RUNNING"
            at = n_parts(out)
            head.ray("job", "stop", "rel-1")
            wait_for(lambda: head.status("rel-1") in ("STOPPED", "FAILED", "SUCCEEDED"), None, timeout=120, every=2)
            first = head.status("rel-1")
            time.sleep(2)
            done = done_docs(out)
            lock_left = (out / "rows" / "LOCK").is_file()
            head.submit("rel-2", cmd)
            wait_for(lambda: head.status("rel-2") in ("SUCCEEDED", "FAILED", "STOPPED"), None, timeout=900, every=3)
            second = head.status("rel-2")
            (d / "job1.log").write_text(head.ray("job", "logs", "rel-1").stdout)
            (d / "job2.log").write_text(head.ray("job", "logs", "rel-2").stdout)
        finally:
            head.stop()
        s = arm(summary(out))
        n_total, redone = s.get("docs_total"), s.get("docs_submitted")
        checks = (s.get("docs_skipped_done") == len(done) and redone == (n_total or 0) - len(done)
                  and (not lock_left or s.get("lock_taken_over") is not None))
        cmp = compare(self.baseline, final_rows(out))
        return self.row("job_stop", f"`ray job stop` after {at} part(s) written ({first}); submitted again",
                        0 if second == "SUCCEEDED" else second, cmp, redone=redone,
                        mid_run=mid and first == "STOPPED" and len(done) < (n_total or 0),
                        extra={"checks_ok": checks, "docs_finished_at_stop": len(done),
                               "stale_lock_taken_over": s.get("lock_taken_over") is not None,
                               "superseded_part_rows": superseded(out)},
                        notes=f"first job {first}, second {second}; {len(done)}/{n_total} documents finished at the "
                              f"stop, the resubmission redid {redone} (exactly the unfinished ones: {checks}); the "
                              f"stopped driver {'left its lock (taken over)' if lock_left else 'released its lock'}")

    # -- 4. a part cut short ---------------------------------------------------------------------
    def torn_part(self) -> dict:
        out, store, d = self.dirs("torn_part")
        shutil.copytree(self.base_out / "rows", out / "rows")
        shutil.copytree(self.base_store, store)
        (out / "rows" / "LOCK").unlink(missing_ok=True)
        parts = sorted((out / "rows").glob("part-*.parquet"))
        victim = parts[len(parts) // 2]
        raw = victim.read_bytes()
        victim.write_bytes(raw[: len(raw) // 2])
        (out / "rows" / f"{victim.stem}-x.tmp").write_bytes(raw[: len(raw) // 3])  # and a dead writer's .tmp
        expect = len(set(self.baseline.column("doc_id").to_pylist())) - len(done_docs(out, skip=(victim.name,)))
        rc = finish(start(job_cmd(self.world, out, store), d / "run.log"))
        s = arm(summary(out))
        aside = [p["part"] for p in s.get("parts_set_aside") or []]
        checks = aside == [victim.name] and (out / "rows" / "set_aside" / victim.name).is_file() \
            and s.get("docs_submitted") == expect and s.get("tmp_removed") == 1
        cmp = compare(self.baseline, final_rows(out))
        return self.row("torn_part", f"{victim.name} cut to {len(raw) // 2} of {len(raw)} bytes (+ a stale .tmp); "
                        "same command again", rc, cmp, redone=s.get("docs_submitted"),
                        extra={"checks_ok": checks, "set_aside": aside, "tmp_removed": s.get("tmp_removed")},
                        notes=f"set aside {aside}; {s.get('docs_submitted')} document(s) redone (expected {expect}); "
                              f"{s.get('tmp_removed')} stale .tmp removed")

    # -- 5. two runs into one --out --------------------------------------------------------------
    def lock(self) -> dict:
        out, store, d = self.dirs("lock")
        cmd = job_cmd(self.world, out, store)
        first = start(cmd, d / "run1.log")
        wait_for(lambda: (out / "rows" / "LOCK").is_file(), first)
        second = subprocess.run(cmd, capture_output=True, text=True, cwd=repo_root(), timeout=600)
        first_alive = first.poll() is None
        msg = next((ln for ln in second.stderr.splitlines() if ln.startswith("error:")), second.stderr[-300:])
        (d / "run2.log").write_text(second.stdout + second.stderr)
        rc = finish(first)
        cmp = compare(self.baseline, final_rows(out))
        checks = second.returncode == 2 and "in use by another run" in msg
        return self.row("lock", "a second run of the same command into the same --out while the first runs",
                        rc, cmp, redone=0, mid_run=first_alive,
                        extra={"checks_ok": checks, "second_exit_status": second.returncode, "second_message": msg},
                        notes=f"second run: exit {second.returncode}, {msg[:220]}")

    # -- 6. a stage raising on one document's rows -----------------------------------------------
    def bad_rows(self) -> dict:
        from nla_ray.runtime.rows import RowParts
        from nla_ray.runtime.stages import FAULT_ENV

        out, store, d = self.dirs("bad_rows")
        shutil.copytree(self.base_store, store)
        docs = list(dict.fromkeys(self.baseline.column("doc_id").to_pylist()))
        victim = docs[len(docs) // 3]
        want = sum(1 for x in self.baseline.column("doc_id").to_pylist() if x == victim)
        rc = finish(start(job_cmd(self.world, out, store), d / "run.log", env={FAULT_ENV: f"av:{victim}"}))
        s = arm(summary(out))
        failed = RowParts(out / "rows", log=lambda m: None).read_failed()
        failed_docs = set(failed.column("doc_id").to_pylist()) if failed is not None else set()
        errors = failed.column("row_error").to_pylist() if failed is not None else []
        checks = (rc == 3 and s.get("rows_failed") == want and failed_docs == {victim}
                  and all("InjectedFault" in e for e in errors))
        cmp = compare(self.baseline, final_rows(out), skip_docs={victim})
        return self.row("bad_rows", f"the AV stage raises on every batch holding {victim} ({FAULT_ENV})", rc, cmp,
                        ok_rc=(3,), redone=0,
                        extra={"checks_ok": checks, "rows_failed": s.get("rows_failed"), "rows_failed_expected": want,
                               "failed_error": errors[0] if errors else None},
                        notes=f"exit {rc} (3 = not clean); {s.get('rows_failed')} row(s) of {victim} recorded in "
                              f"rows/failed/ with their error, the other {cmp['rows_final']} rows kept")


class PrivateHead:
    """A Ray head of this job's own (loopback, free ports, its own temp dir), stopped by pid."""

    def __init__(self, d: Path):
        self.d = d
        self.tmp = Path(f"/tmp/nlrel{os.getpid()}")  # short: Ray's socket paths must stay < 108 bytes
        self.env = dict(os.environ, RAY_AUTH_MODE="token",
                        PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
        self.bin = str(Path(sys.executable).parent / "ray")

    def start(self) -> None:
        gcs, dash, agent, grpc, renv, metrics = free_ports(6)
        self.address = f"http://127.0.0.1:{dash}"
        r = subprocess.run([self.bin, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", gcs,
                            "--dashboard-host", "127.0.0.1", "--dashboard-port", dash, "--num-cpus", "4",
                            "--dashboard-agent-listen-port", agent, "--dashboard-agent-grpc-port", grpc,
                            "--runtime-env-agent-port", renv, "--metrics-export-port", metrics,
                            "--temp-dir", str(self.tmp), "--disable-usage-stats"],
                           env=self.env, capture_output=True, text=True, timeout=300)
        (self.d / "head.log").write_text(r.stdout + r.stderr)
        if r.returncode != 0:
            raise RuntimeError(f"ray start failed: {r.stderr[-500:]}")

    def ray(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([self.bin, *args[:2], "--address", self.address, *args[2:]], env=self.env,
                              capture_output=True, text=True, timeout=300)

    def submit(self, sid: str, cmd: list[str]) -> None:
        for _ in range(12):  # a fresh head's job agent registers a little after `ray start` returns
            r = self.ray("job", "submit", "--no-wait", "--submission-id", sid, "--", *cmd)
            if r.returncode == 0:
                return
            time.sleep(5)
        raise RuntimeError(f"ray job submit failed: {(r.stdout + r.stderr)[-500:]}")

    def status(self, sid: str) -> str:
        """PENDING / RUNNING / STOPPED / SUCCEEDED / FAILED, as `ray job status` prints it (UNKNOWN when the
        head does not answer). The CLI, not the Python client: the client reads the token-auth mode once
        per process, before this head exists."""
        r = self.ray("job", "status", sid)
        text = r.stdout + r.stderr
        for phrase, status in ((f"Job '{sid}' succeeded", "SUCCEEDED"), (f"Job '{sid}' was stopped", "STOPPED"),
                               (f"Job '{sid}' failed", "FAILED")):
            if phrase in text:
                return status
        for status in ("RUNNING", "PENDING", "STOPPED", "SUCCEEDED", "FAILED"):
            if f"Status for job '{sid}': {status}" in text or f"JobStatus.{status}" in text:
                return status
        return "UNKNOWN"

    def stop(self) -> None:
        stop_processes_with(str(self.tmp))
        shutil.rmtree(self.tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# bad inputs: one case per bad thing; each returns what the user sees and whether it is handled


@dataclass
class Case:
    name: str
    group: str
    what: str
    run: object            # (world, tmp: Path) -> dict(seen=str, handled=bool, how=str, names=[str])


def _role_copy(src: Path, dst: Path, mutate=None, drop: tuple = (), files: dict | None = None) -> Path:
    """A role directory like `src` (weights and tokenizer linked, not copied) with its sidecar changed
    by `mutate(dict)`, files in `drop` left out and `files` (name -> bytes) written in."""
    import yaml

    from nla_ray.nla.sidecar import SIDECAR_NAME

    dst.mkdir(parents=True)
    for f in Path(src).iterdir():
        if f.name in drop or f.name == SIDECAR_NAME or f.name in (files or {}):
            continue
        (dst / f.name).symlink_to(f.resolve())
    data = yaml.safe_load((Path(src) / SIDECAR_NAME).read_text(encoding="utf-8"))
    if mutate:
        mutate(data)
    (dst / SIDECAR_NAME).write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    for name, blob in (files or {}).items():
        (dst / name).write_bytes(blob)
    return dst


def _preflight_seen(stages: list, source=None, items=None) -> tuple[str, bool, list]:
    """What a job prints when the driver's checks refuse the input (exit 2), or "" when they pass."""
    from nla_ray.runtime.pipeline import preflight

    logged: list[str] = []
    try:
        preflight(stages, source, items, log=logged.append)
    except (ValueError, FileNotFoundError) as e:
        return f"error: {e}", True, logged
    return "", False, logged


def _spec(kind: str, d: Path, **kw):
    from nla_ray.config import PoolConfig
    from nla_ray.runtime.stages import Reconstruct, StageSpec, Verbalize

    if kind == "av":
        return StageSpec(Verbalize, "av", PoolConfig(), {"av_dir": str(d), "src": "", **kw})
    return StageSpec(Reconstruct, "ar", PoolConfig(), {"ar_dir": str(d), "reads": [["explanation", "vector", "position", ""]]})


def _sidecar_case(role: str, field: str, mutate, expected_live: str):
    def run(world: World, tmp: Path) -> dict:
        d = _role_copy(getattr(world, role), tmp / role, mutate)
        seen, refused, _ = _preflight_seen([_spec(role, d)])
        return {"seen": seen, "handled": refused, "how": "refused before any actor starts (exit 2)",
                "names": [str(d / "nla_meta.yaml"), f"'{field}'", expected_live]}
    return run


def _delete(path: str):
    def mutate(data: dict) -> None:
        *head, last = path.split(".")
        cur = data
        for k in head:
            cur = cur[k]
        cur.pop(last)
        if path == "critic.extraction_layer_index":
            data.pop("extraction_layer_index", None)  # the other spelling the reader accepts
    return mutate


def _set(path: str, value):
    def mutate(data: dict) -> None:
        *head, last = path.split(".")
        cur = data
        for k in head:
            cur = cur[k]
        cur[last] = value(cur[last]) if callable(value) else value
    return mutate


REQUIRED = [("av", "kind"), ("av", "role"), ("av", "d_model"), ("av", "tokens"), ("av", "tokens.injection_char"),
            ("av", "tokens.injection_token_id"), ("av", "tokens.injection_left_neighbor_id"),
            ("av", "tokens.injection_right_neighbor_id"), ("av", "extraction.injection_scale"),
            ("av", "prompt_templates.av"), ("ar", "prompt_templates.ar"), ("ar", "critic.extraction_layer_index"),
            ("ar", "tokens.critic_suffix_ids")]
WRONG_TYPES = [("av", "d_model", "64"), ("av", "tokens.injection_token_id", "12"),
               ("av", "tokens.injection_left_neighbor_id", "x"), ("av", "tokens.injection_char", 7),
               ("av", "extraction.injection_scale", "banana"), ("ar", "tokens.critic_suffix_ids", "1,2"),
               ("ar", "critic.extraction_layer_index", "two"), ("av", "schema_version", 99)]
DRIFT = [("av", "tokens.injection_token_id", lambda v: v + 1), ("av", "tokens.injection_left_neighbor_id", lambda v: v + 1),
         ("av", "tokens.injection_right_neighbor_id", lambda v: v + 1), ("ar", "tokens.critic_suffix_ids", lambda v: [1, 2, 3])]


def _cached(world: World, key: str, make):
    cache = world.__dict__.setdefault("_cache", {})
    if key not in cache:
        cache[key] = make()
    return cache[key]


def _verbalize(world: World):
    from nla_ray.runtime.stages import Verbalize

    return _cached(world, "av", lambda: Verbalize("av", 1, av_dir=str(world.av), dtype="float32", max_new_tokens=3))


def _reconstruct(world: World):
    from nla_ray.runtime.stages import Reconstruct

    return _cached(world, "ar", lambda: Reconstruct("ar", 1, ar_dir=str(world.ar), dtype="float32", batch_size=4))


def _extract(world: World, max_length: int = 128):
    from nla_ray.runtime.stages import Extract

    return _cached(world, f"ex{max_length}", lambda: Extract("extract", 1, base=str(world.base), layers=[2], seed=42,
                                                             positions_per_doc=2, max_length=max_length,
                                                             dtype="float32"))


def _vector_case(bad: str):
    def run(world: World, tmp: Path) -> dict:
        from nla_ray.runtime.stages import ERROR

        g = np.random.default_rng(0)
        vec = g.standard_normal((3, 64)).astype(np.float32)
        vec[0] = {"nan": np.nan, "inf": np.inf, "zero": 0.0}[bad]
        if bad != "zero":
            vec[0, 1:] = 1.0
        batch = {"doc_id": np.array(["bad", "good", "short"], dtype=object), "position": np.array([60, 61, -1]),
                 "layer": np.array([2, 2, 2]), "vector": vec}
        out = _verbalize(world)(batch)
        ar = _reconstruct(world)({**out, "vector": vec})
        err = out[ERROR]
        handled = bool(err[0]) and not err[1] and not err[2] and out["status"][1] != "short_doc" \
            and np.isfinite(ar["nmse"][1]) and bool(ar[ERROR][0])
        return {"seen": f"failed row: {err[0]}", "handled": handled,
                "how": "row kept apart in rows/failed/ and counted (rows_failed), the batch's other rows go on; "
                       "exit 3", "names": ["doc bad", "position 60", "layer 2"]}
    return run


def _gold_nan(world: World, tmp: Path) -> dict:
    from nla_ray.runtime.stages import ERROR

    vec = np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)
    vec[1, 3] = np.nan
    batch = {"doc_id": np.array(["good", "bad"], dtype=object), "position": np.array([70, 71]),
             "explanation": np.array(["A budget report.", "Sports."], dtype=object), "vector": vec}
    out = _reconstruct(world)(batch)
    handled = bool(out[ERROR][1]) and not out[ERROR][0] and np.isfinite(out["nmse"][0])
    return {"seen": f"failed row: {out[ERROR][1]}", "handled": handled,
            "how": "AR-only runs (redaction) refuse the row instead of scoring NaN into the mean; counted",
            "names": ["doc bad", "gold column 'vector'", "non-finite"]}


def _wrong_width(world: World, tmp: Path) -> dict:
    src = pa.table({"doc_id": ["d"], "position": [60],
                    "vector": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(32, np.float32)), 32)})
    seen, refused, _ = _preflight_seen([_spec("av", world.av)], source=src)
    return {"seen": seen, "handled": refused, "how": "refused before any actor starts (exit 2)",
            "names": ["width 32", "'d_model'", "64", str(world.av / "nla_meta.yaml")]}


LONG = ("The council met on Tuesday to review the budget for the coming year, and members agreed that "
        "spending on schools and roads should rise while administrative costs would be cut. ") * 8


def _docs_case(kind: str):
    def run(world: World, tmp: Path) -> dict:
        from nla_ray.runtime.stages import ERROR, SHORT

        texts = {"empty": "", "short": "Too short to have a position 50.", "long": LONG * 3,
                 "utf8": LONG[:200] + "\udcff\udcfe" + LONG[200:], "control": LONG.replace(" ", " \x00\x07\x1b", 20)}
        ex = _extract(world)
        batch = {"doc_id": np.array([kind, "ok"], dtype=object), "text": np.array([texts[kind], LONG], dtype=object)}
        out = ex(batch)
        mine = np.array([d == kind for d in out["doc_id"]])
        others_ok = bool(((out["doc_id"] == "ok") & (out["position"] >= 50)).sum() == 2)
        err = [e for e in out[ERROR][mine] if e]
        if kind in ("empty", "short"):
            handled = others_ok and list(out["position"][mine]) == [-1] and not err
            return {"seen": "a short_doc marker row (position -1): no position >= 50; the job counts it "
                            "(reproduce_fve: documents.short_skipped; the corpus source skips blank documents "
                            "and counts them as skipped_empty)", "handled": handled,
                    "how": f"counted skip ({SHORT})", "names": []}
        if kind == "long":
            from nla_ray.config import PoolConfig
            from nla_ray.runtime.pipeline import preflight
            from nla_ray.runtime.stages import Extract, StageSpec

            logged: list[str] = []
            spec = StageSpec(Extract, "extract", PoolConfig(), {"base": str(world.base), "layers": [2], "max_length": 128})
            found = preflight([spec], None, [{"doc_id": kind, "text": texts[kind]}, {"doc_id": "ok", "text": "short"}],
                              log=logged.append)
            handled = others_ok and found["docs_truncated"] == 1 and bool((out["position"][mine] < 128).all()) \
                and bool(mine.sum() == 2)
            return {"seen": logged[0] if logged else "", "handled": handled,
                    "how": "truncated to max_length and counted (run.arms.*.docs_truncated)",
                    "names": ["max_length=128", "1 document(s)"]}
        if kind == "utf8":
            handled = others_ok and len(err) == 1 and list(out["position"][mine]) == [-3]
            return {"seen": f"failed row: {err[0] if err else ''}", "handled": handled,
                    "how": "the document fails alone (rows/failed/, counted, exit 3); the others go on",
                    "names": ["not valid Unicode", "character 200"]}
        handled = others_ok and not err and bool((out["position"][mine] >= 50).sum() == 2)
        return {"seen": "extracted as usual (control characters are ordinary tokens)", "handled": handled,
                "how": "processed; nothing to refuse", "names": []}
    return run


def _value_head(kind: str):
    def run(world: World, tmp: Path) -> dict:
        from safetensors.numpy import save

        if kind == "missing":
            d = _role_copy(world.ar, tmp / "ar", drop=("value_head.safetensors",))
            names = [str(d), "value_head.safetensors"]
        else:
            d = _role_copy(world.ar, tmp / "ar", files={"value_head.safetensors":
                                                        save({"weight": np.zeros((64, 32), np.float32)})})
            names = [str(d / "value_head.safetensors"), "(64, 32)", "(64, 64)", "'weight'"]
        seen, refused, _ = _preflight_seen([_spec("ar", d)])
        return {"seen": seen, "handled": refused, "how": "refused before any actor starts (exit 2)", "names": names}
    return run


def _pickle_only(world: World, tmp: Path) -> dict:
    d = _role_copy(world.av, tmp / "av", drop=("model.safetensors",), files={"pytorch_model.bin": b"\x80\x04N."})
    seen, refused, _ = _preflight_seen([_spec("av", d)])
    return {"seen": seen, "handled": refused, "how": "refused: safetensors only (exit 2)",
            "names": [str(d), "pytorch_model.bin", "safetensors"]}


def _remote_code(opt_in: bool):
    def run(world: World, tmp: Path) -> dict:
        from nla_ray.nla.models import REMOTE_CODE_ENV, check_weights_dir

        cfg = json.loads((world.av / "config.json").read_text())
        cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
        d = _role_copy(world.av, tmp / "av", files={"config.json": json.dumps(cfg).encode()})
        before = os.environ.pop(REMOTE_CODE_ENV, None)
        try:
            if opt_in:
                os.environ[REMOTE_CODE_ENV] = "1"
                try:
                    check_weights_dir(d)
                    return {"seen": f"with {REMOTE_CODE_ENV}=1 the check lets the checkpoint through",
                            "handled": True, "how": "explicit opt-in only", "names": []}
                except ValueError as e:
                    return {"seen": f"error: {e}", "handled": False, "how": "opt-in ignored", "names": []}
            seen, refused, _ = _preflight_seen([_spec("av", d)])
            return {"seen": seen, "handled": refused, "how": f"refused unless {REMOTE_CODE_ENV}=1 (exit 2)",
                    "names": [str(d / "config.json"), "'auto_map'", REMOTE_CODE_ENV]}
        finally:
            os.environ.pop(REMOTE_CODE_ENV, None)
            if before is not None:
                os.environ[REMOTE_CODE_ENV] = before
    return run


def _long_explanation(world: World, tmp: Path) -> dict:
    from nla_ray.runtime.stages import ERROR

    st = _reconstruct(world)
    text = ("word " * 3000).strip()
    n_tok = len(st.ar.tok(text)["input_ids"])
    vec = np.random.default_rng(2).standard_normal((1, 64)).astype(np.float32)
    out = st({"doc_id": np.array(["long"], dtype=object), "position": np.array([60]),
              "explanation": np.array([text], dtype=object), "vector": vec})
    handled = not out[ERROR][0] and bool(np.isfinite(out["recon"]).all()) and n_tok > st.ar.max_length \
        and bool(out["ar_truncated"][0])
    return {"seen": f"an explanation of {n_tok} tokens is scored on the AR's first {st.ar.max_length} prompt tokens "
                    "with the template's tail kept (no error); the row's ar_truncated is "
                    f"{bool(out['ar_truncated'][0])}", "handled": handled,
            "how": "truncated (head and template tail kept; nla_ray.nla.ar), counted per row (ar_truncated; the run "
                   "log and run.explanations_truncated sum it)", "names": []}


def _config_case(args: list[str], names: list[str]):
    def run(world: World, tmp: Path) -> dict:
        import importlib

        sys.path.insert(0, str(repo_root() / "jobs"))
        try:
            job = importlib.import_module("reproduce_fve").JOB
        finally:
            sys.path.remove(str(repo_root() / "jobs"))
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = job.entry(["--out", str(tmp / "out"), *args])
        return {"seen": err.getvalue().strip().splitlines()[0] if err.getvalue().strip() else "",
                "handled": rc == 2, "how": f"one line, exit {rc}", "names": names}
    return run


def cases() -> list[Case]:
    out = []
    for role, field in REQUIRED:
        out.append(Case(f"missing:{field}", "sidecar missing a required field", f"{role} sidecar without {field}",
                        _sidecar_case(role, field, _delete(field), "'<missing>'")))
    for role, field, value in WRONG_TYPES:
        out.append(Case(f"type:{field}", "sidecar field of the wrong type or version",
                        f"{role} sidecar {field} = {value!r}", _sidecar_case(role, field, _set(field, value), repr(value))))
    for role, field, change in DRIFT:
        out.append(Case(f"drift:{field}", "sidecar vs live tokenizer", f"{role} sidecar {field} off by one",
                        _sidecar_case(role, field, _set(field, change), "live")))
    out.append(Case("vector:wrong_width", "vectors", "stored rows of width 32 into a d=64 AV", _wrong_width))
    for bad in ("nan", "inf", "zero"):
        out.append(Case(f"vector:{bad}", "vectors", f"one row's vector {bad.upper()} in an AV batch", _vector_case(bad)))
    out.append(Case("vector:gold_nan", "vectors", "a NaN gold vector in an AR-only batch", _gold_nan))
    for kind, what in (("empty", "an empty document"), ("short", "a document under 50 tokens"),
                       ("long", "a document over max_length"), ("utf8", "text with invalid UTF-8 (lone surrogates)"),
                       ("control", "text with control characters")):
        out.append(Case(f"doc:{kind}", "documents", what, _docs_case(kind)))
    out.append(Case("value_head:missing", "weights", "AR without value_head.safetensors", _value_head("missing")))
    out.append(Case("value_head:shape", "weights", "value head of shape (64, 32)", _value_head("shape")))
    out.append(Case("weights:pickle_only", "weights", "AV weights only as pytorch_model.bin", _pickle_only))
    out.append(Case("remote_code:refused", "weights", "config.json with auto_map (custom code)", _remote_code(False)))
    out.append(Case("remote_code:opt_in", "weights", "the same with NLA_RAY_TRUST_REMOTE_CODE=1", _remote_code(True)))
    out.append(Case("explanation:too_long", "texts", "an explanation of ~3000 tokens into the AR", _long_explanation))
    out.append(Case("config:preset", "config", "--preset nope", _config_case(["--preset", "nope"], ["unknown preset", "'nope'"])))
    out.append(Case("config:field", "config", "--set bogus=1", _config_case(["--set", "bogus=1"], ["unknown field", "bogus"])))
    out.append(Case("config:pool", "config", "--set pools.nope.num_gpus=1",
                    _config_case(["--set", "pools.nope.num_gpus=1"], ["unknown pool", "nope"])))
    return out


def run_case(case: Case, world: World, tmp: Path) -> dict:
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        r = case.run(world, tmp)
    except Exception as e:  # noqa: BLE001 - an unhandled bad input is a finding, recorded as such
        r = {"seen": f"unhandled {type(e).__name__}: {e}", "handled": False, "how": "crashed", "names": []}
    r["names_shown"] = all(n in r["seen"] for n in r.get("names", []))
    return {"case": case.name, "group": case.group, "input": case.what, **r}


# ---------------------------------------------------------------------------------------------


@JOB.main
def run(ctx: Context) -> Result:
    from nla_ray.config import load_config

    args = ctx.args
    work = Path(args.work) if args.work else repo_root() / "runs" / "reliability" / "work"
    work.mkdir(parents=True, exist_ok=True)
    chosen = [] if args.faults.strip() in ("", "none") else [f.strip() for f in args.faults.split(",") if f.strip()]
    unknown = sorted(set(chosen) - set(FAULTS))
    if unknown:
        raise ValueError(f"--faults: unknown fault(s) {unknown}; known: {', '.join(FAULTS)}")
    with ctx.timer("world"):
        world = build_world(work / "world", n_docs=args.docs)
    ctx.cfg = load_config(str(world.preset))

    bad = []
    if not args.no_bad_inputs:
        with ctx.timer("bad_inputs"):
            scratch = work / "bad_inputs"
            shutil.rmtree(scratch, ignore_errors=True)
            for i, c in enumerate(cases()):
                bad.append(run_case(c, world, scratch / f"{i:02d}"))
                ctx.log(f"[bad input] {c.name}: handled={bad[-1]['handled']} names_shown={bad[-1]['names_shown']}")

    rows, base_info = [], None
    if chosen:
        f = Faults(ctx, world, work)
        with ctx.timer("baseline"):
            base_info = f.run_baseline()
        for name in chosen:
            with ctx.timer(name):
                t0 = time.time()
                try:
                    r = getattr(f, name)()
                except Exception as e:  # noqa: BLE001 - a fault the harness could not inject is reported
                    r = {"fault": name, "injected": f"harness error: {type(e).__name__}: {e}", "injected_mid_run": False,
                         "survived": False, "rows_lost": None, "rows_duplicated": None, "restarts": None,
                         "redone_docs": None, "notes": "see the log"}
                r["wall_s"] = round(time.time() - t0, 1)
                rows.append(r)

    headline = {
        "faults_injected": sum(1 for r in rows if r.get("injected_mid_run")),
        "faults_survived": sum(1 for r in rows if r.get("survived")),
        "faults_tried": len(rows),
        "rows_lost": sum(r.get("rows_lost") or 0 for r in rows),
        "rows_duplicated": sum(r.get("rows_duplicated") or 0 for r in rows),
        "restarts": sum(r.get("restarts") or 0 for r in rows),
        "redone_docs": sum(r.get("redone_docs") or 0 for r in rows),
        "bad_inputs_tried": len(bad), "bad_inputs_handled": sum(1 for b in bad if b["handled"]),
        "bad_inputs_message_names_all": sum(1 for b in bad if b["handled"] and b["names_shown"]),
    }
    tables = []
    if rows:
        tables.append(Table("Faults (each against an uninterrupted run of the same command)", [
            {"fault": r["fault"], "injected": r["injected"], "survived": "yes" if r["survived"] else "NO",
             "rows (final/expected)": f"{r.get('rows_final')}/{r.get('rows_expected')}", "lost": r.get("rows_lost"),
             "duplicated": r.get("rows_duplicated"), "bit-identical": r.get("bit_identical"),
             "restarts": r.get("restarts"), "redone docs": r.get("redone_docs"), "exit": r.get("exit_status"),
             "notes": r.get("notes", "")} for r in rows],
            ["fault", "injected", "survived", "rows (final/expected)", "lost", "duplicated", "bit-identical",
             "restarts", "redone docs", "exit", "notes"],
            note=f"Uninterrupted run: {base_info['rows'] if base_info else '-'} rows; command "
                 f"`{' '.join(base_info['command'][1:]) if base_info else ''}` (each fault: its own --out and "
                 "--store). Bit-identical = explanations, raw AV text, reconstructions and gold vectors equal bit "
                 "for bit on every row. bad_rows is compared on the documents it did not fail."))
    if bad:
        tables.append(Table("Bad inputs (tried / handled / what the user sees)", [
            {"case": b["case"], "input": b["input"], "handled": "yes" if b["handled"] else "NO", "how": b["how"],
             "what the user sees": b["seen"].replace("\n", " ")[:400]} for b in bad],
            ["case", "input", "handled", "how", "what the user sees"],
            note="'refused before any actor starts' = the driver's preflight (nla_ray.runtime.pipeline.preflight): "
                 "the job prints that one line and exits 2. Failed rows go to <out>/rows/<arm>/failed/ with their "
                 "error, are counted in summary.json run.arms.*.rows_failed/failures, and the job exits 3."))
    return Result(headline=headline, tables=tables,
                  extra={"faults": rows, "bad_inputs": bad, "baseline": base_info, "work_dir": str(work)},
                  legend="A fault is survived when the job (or its rerun) exits as expected and its final rows equal "
                         "the uninterrupted run's bit for bit, with no row lost, none duplicated and none unexpected, "
                         "and the fault-specific checks hold (restart seen, only unfinished documents redone, the part "
                         "set aside, the second run refused, the failed rows recorded and counted).",
                  clean=all(r.get("survived") for r in rows) and all(b["handled"] for b in bad))


if __name__ == "__main__":
    JOB.run_cli()
