"""What an overnight run survives, the fast parts (the slow faults — a SIGKILLed actor or driver, `ray job
stop` — run through jobs/reliability.py into results/reliability/): the run lock, a part cut short, rows
a stage raises on (kept apart, counted, exit 3), restart counting and the pool-layout check."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nla_ray.config import PoolConfig
from nla_ray.runtime import pipeline
from nla_ray.runtime.rows import RowParts, RunLocked, completed_docs
from nla_ray.runtime.stages import ERROR, FAULT_ENV, Stage, StageSpec, apply_spec, row_ok


def _batch(docs: list[str], positions_in_doc: int = 1) -> dict:
    n = len(docs)
    return {"doc_id": np.array(docs, dtype=object), "position": np.arange(60, 60 + n),
            "positions_in_doc": np.full(n, positions_in_doc), "layer": np.full(n, 2),
            "sample_idx": np.zeros(n, dtype=np.int64), "sample_rank": np.zeros(n, dtype=np.int64),
            "vector": np.ones((n, 4), np.float32)}


# ---------------------------------------------------------------------------------------------
# the lock


@pytest.fixture
def holder(tmp_path):
    """Another live process holding the lock of tmp_path/rows."""
    code = ("import sys, time; from nla_ray.runtime.rows import RowParts; "
            "RowParts(sys.argv[1]).acquire('python jobs/x.py --out held'); print('held', flush=True); time.sleep(120)")
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "rows")], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    yield p
    if p.poll() is None:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()


def test_a_second_run_is_refused_and_a_dead_ones_lock_taken_over(holder, tmp_path):
    parts = RowParts(tmp_path / "rows")
    with pytest.raises(RunLocked) as err:
        parts.acquire()
    msg = str(err.value)
    assert "in use by another run" in msg and f"pid {holder.pid}" in msg and "--out held" in msg
    assert "another --out" in msg
    # the pipeline refuses before it reads, writes or starts anything
    with pytest.raises(RunLocked):
        pipeline.run([apply_spec(lambda b: b, name="noop")], source=[{"doc_id": "a", "text": "x"}], parts=parts,
                     fingerprint={"stages": []}, log=lambda m: None)
    assert not (tmp_path / "rows" / "RUN.json").exists()
    os.kill(holder.pid, signal.SIGKILL)  # the holder dies without releasing, as a killed driver does
    holder.wait()
    got = parts.acquire()
    assert got["took_over"]["pid"] == holder.pid
    assert json.loads((tmp_path / "rows" / "LOCK").read_text())["pid"] == os.getpid()
    parts.release()
    assert not (tmp_path / "rows" / "LOCK").exists()


def test_a_lock_from_another_host_is_refused_with_how_to_clear_it(tmp_path):
    d = tmp_path / "rows"
    d.mkdir()
    (d / "LOCK").write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "x", "command": "job"}))
    with pytest.raises(RunLocked, match=r"host 'elsewhere'.*delete .*LOCK"):
        RowParts(d).acquire()


# ---------------------------------------------------------------------------------------------
# a part cut short, a writer's leftover .tmp


def test_a_part_cut_short_is_set_aside_and_its_documents_redone(tmp_path):
    parts = RowParts(tmp_path / "rows", log=lambda m: None)
    files = [parts.write(_batch(docs)) for docs in (["a", "b"], ["c", "d"], ["e"])]
    assert completed_docs(parts.read(), 1) == {"a", "b", "c", "d", "e"}
    raw = files[1].read_bytes()
    files[1].write_bytes(raw[: len(raw) // 2])  # as a crash mid-write leaves it
    (tmp_path / "rows" / "part-9-x.tmp").write_bytes(raw[:10])
    t = parts.read()
    assert completed_docs(t, 1) == {"a", "b", "e"}  # c and d are unfinished: a rerun redoes them
    assert [p["part"] for p in parts.set_aside] == [files[1].name] and "Arrow" in parts.set_aside[0]["reason"]
    assert (tmp_path / "rows" / "set_aside" / files[1].name).read_bytes() == raw[: len(raw) // 2]
    assert files[1] not in parts.files()
    assert parts.remove_stale_tmp() == ["part-9-x.tmp"] and not list((tmp_path / "rows").glob("*.tmp"))


# ---------------------------------------------------------------------------------------------
# rows a stage raises on


class Doubler(Stage):
    """Raises on a batch holding an unfailed row of document 'bad'; else writes y = 2 * position."""

    def process(self, batch: dict) -> dict:
        ok = row_ok(batch)
        if any(ok & (batch["doc_id"] == "bad")):
            raise ValueError("cannot double 'bad'")
        return {**batch, "y": np.where(ok, 2 * batch["position"], -1)}


def test_a_stage_isolates_the_rows_it_raises_on(monkeypatch):
    st = Doubler("dbl", 1)
    out = st(_batch(["g1", "bad", "g2"]))
    assert out["doc_id"].tolist() == ["g1", "bad", "g2"]
    assert out["y"].tolist() == [120, -1, 124]  # the others are processed, the bad row passed through
    assert out[ERROR].tolist()[0] == out[ERROR].tolist()[2] == ""
    assert out[ERROR][1] == "dbl: ValueError: cannot double 'bad'"
    alone = st(_batch(["bad"]))  # a batch of nothing but bad rows still gives rows of the same columns
    assert set(alone) == set(out) and alone[ERROR][0].startswith("dbl: ValueError")
    monkeypatch.setenv(FAULT_ENV, "dbl:g2")  # the fault-injection hook the reliability job uses
    out = Doubler("dbl", 1)(_batch(["g1", "g2"]))
    assert out[ERROR][0] == "" and "InjectedFault" in out[ERROR][1] and "['g2']" in out[ERROR][1]


@pytest.fixture(scope="module")
def world(tmp_path_factory, load_job):
    return load_job("reliability").build_world(tmp_path_factory.mktemp("rel_world"), n_docs=3, max_new_tokens=6)


@pytest.fixture(scope="module")
def victim(world):
    from nla_ray.config import load_config
    from nla_ray.jobkit import documents

    return documents(load_config(str(world.preset)))[1].doc_id


@pytest.fixture(scope="module")
def local_ray(victim):
    """One local Ray for the module, its workers told to fail the AV on `victim` (the hook only acts in a
    stage named av, so the other tests' stages are untouched)."""
    import ray

    ray.shutdown()
    before = os.environ.get(FAULT_ENV)
    os.environ[FAULT_ENV] = f"av:{victim}"
    ray.init(address="local", num_cpus=4, include_dashboard=False,
             runtime_env={"env_vars": {FAULT_ENV: os.environ[FAULT_ENV], "TOKENIZERS_PARALLELISM": "false"}})
    yield
    ray.shutdown()
    os.environ.pop(FAULT_ENV, None)
    if before is not None:
        os.environ[FAULT_ENV] = before


@pytest.mark.ray
def test_failed_rows_are_kept_apart_counted_and_retried(local_ray, tmp_path):
    def double(batch: dict) -> dict:  # local: shipped to the workers by value
        from nla_ray.runtime.stages import row_ok

        ok = row_ok(batch)
        if any(ok & (batch["doc_id"] == "d3")):
            raise RuntimeError("boom on d3")
        return {**batch, "y": 2 * batch["position"]}

    src = pa.table({"doc_id": [f"d{i}" for i in range(6)], "position": list(range(60, 66)),
                    "positions_in_doc": [1] * 6, "layer": [2] * 6, "sample_idx": [0] * 6})
    stages = [apply_spec(double, name="dbl", batch_size=3)]
    parts = RowParts(tmp_path / "rows")
    logs: list[str] = []
    info = pipeline.run(stages, source=src, parts=parts, fingerprint={"stages": "dbl"}, log=logs.append)
    assert info.rows_failed == 1 and info.docs_failed == ["d3"] and info.rows_written == 5
    assert info.failures[0]["doc_id"] == "d3" and "boom on d3" in info.failures[0]["error"]
    kept = parts.read()
    assert sorted(kept.column("doc_id").to_pylist()) == ["d0", "d1", "d2", "d4", "d5"]
    assert ERROR not in kept.column_names and kept.column("y").to_pylist() == [2 * p for p in kept.column("position").to_pylist()]
    failed = parts.read_failed()
    assert failed.column("doc_id").to_pylist() == ["d3"] and "boom" in failed.column(ERROR)[0].as_py()
    assert any("[failed]" in m for m in logs)
    assert info.worker_processes == {"dbl": 1} and info.actor_restarts == {"dbl": 0}
    # d3 is unfinished: the same command again submits it alone
    items, n = pipeline._items(src, completed_docs(parts.read(), 1))
    assert n == 1 and [it["doc_id"] for it in items] == ["d3"]
    assert not (tmp_path / "rows" / "LOCK").exists()


@pytest.mark.ray
def test_a_job_with_failed_rows_exits_3_and_says_so(local_ray, world, victim, load_job, tmp_path):
    out = tmp_path / "out"
    rc = load_job("reproduce_fve").JOB.entry(["--preset", str(world.preset), "--out", str(out), "--store",
                                             str(tmp_path / "store")])
    assert rc == 3
    arm = json.loads((out / "summary.json").read_text())["run"]["arms"]["main"]
    assert arm["rows_failed"] == 2 and arm["docs_failed"] == [victim]
    assert all("InjectedFault" in f["error"] and f["doc_id"] == victim for f in arm["failures"])
    rows = pq.read_table(out / "rows.parquet")
    assert victim not in rows.column("doc_id").to_pylist() and rows.num_rows == 4  # the other documents kept


# ---------------------------------------------------------------------------------------------
# restarts and the pool layout


def test_restarts_are_counted_from_the_rows_worker_stamps():
    spec = StageSpec(Doubler, "av", PoolConfig(concurrency=1))
    t = pa.table({"av_worker": ["h:1", "h:1", "h:7", "h:7", "h:9"], "ar_worker": ["h:2"] * 5})
    procs, restarts = pipeline.restarts_seen(t, [spec, StageSpec(Doubler, "ar", PoolConfig(concurrency=2))])
    assert procs == {"av": 3, "ar": 1} and restarts == {"av": 2, "ar": 0}


def test_pool_layout_check_names_pools_and_sums():
    def spec(name, g, c, n=1):
        return StageSpec(Doubler, name, PoolConfig(num_gpus=g, num_cpus=c, concurrency=n))

    stages = [spec("extract", 1, 2), spec("av", 1, 2, n=2), spec("ar", 0.5, 1)]
    verdict, msg = pipeline.layout_check(stages, {"GPU": 2.0, "CPU": 16.0})
    assert verdict == "in_turns"
    assert "3.5 GPUs, 7 CPUs" in msg and "2 GPUs, 16 CPUs" in msg and "cannot all run at once" in msg
    assert "extract 1x(1 GPU, 2 CPU)" in msg and "av 2x(1 GPU, 2 CPU)" in msg and "short of GPU" in msg
    verdict, msg = pipeline.layout_check([spec("av", 2, 1)], {"GPU": 1.0, "CPU": 8.0})
    assert verdict == "cannot" and "one av actor asks for 2 GPU" in msg
    verdict, msg = pipeline.layout_check(stages, {"GPU": 4.0, "CPU": 8.0})
    assert verdict == "ok" and "3.5 GPUs, 7 CPUs" in msg
    assert pipeline.layout_check([spec("av", 0, 4)], {"CPU": 2.0})[0] == "cannot"


def test_an_extraction_into_the_store_that_lost_rows_makes_the_job_exit_3(monkeypatch, tmp_path):
    """Rows an extraction into the activation store could not produce are not silently absent: the
    store keeps that run's counts and the job reports them as an arm (not clean, exit 3)."""
    from nla_ray.jobkit import Job, Result
    from nla_ray.runtime import store as store_mod

    def ensure(self, spec, docs, **kw):
        self.last_run = {"rows_failed": 2, "docs_failed": [docs[0].doc_id], "failures": []}
        return "key", pa.table({"doc_id": [d.doc_id for d in docs[1:]]})

    monkeypatch.setattr(store_mod.ActivationStore, "ensure", ensure)
    job = Job("store_only_probe", "A probe: extraction only.")

    @job.main
    def run(ctx):
        _, rows = ctx.activations()
        return Result(headline={"rows": rows.num_rows})

    out = tmp_path / "out"
    assert job.entry(["--preset", "mini", "--n", "10", "--out", str(out), "--store", str(tmp_path / "s")]) == 3
    arms = json.loads((out / "summary.json").read_text())["run"]["arms"]
    assert arms["extract:mini"]["rows_failed"] == 2
