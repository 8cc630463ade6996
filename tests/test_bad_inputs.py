"""Every bad input ends in a clear message (naming the file, the field, what was expected and what was
found) or a counted skip, and nothing else is lost. The cases live in jobs/reliability.py (which also
writes them into results/reliability/table.md); here each one runs on the tiny family (a random
decoder on the real SmolLM2 tokenizer) and is asserted."""

from __future__ import annotations

import importlib
import json
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _reliability():
    """jobs/reliability.py (a script, not a package), imported once for collection."""
    sys.path.insert(0, str(REPO / "jobs"))
    try:
        return importlib.import_module("reliability")
    finally:
        sys.path.remove(str(REPO / "jobs"))


REL = _reliability()
CASES = {c.name: c for c in REL.cases()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The reliability job's tiny world: a random 4-block decoder (d=64) on the SmolLM2 tokenizer, as
    a base model, an NLA pair (weights copied) and a 3-document preset."""
    return REL.build_world(tmp_path_factory.mktemp("rel_world"), n_docs=3, max_new_tokens=6)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_handled_and_named(world, name, tmp_path):
    r = REL.run_case(CASES[name], world, tmp_path)
    assert r["handled"], r
    missing = [n for n in r["names"] if n not in r["seen"]]
    assert not missing, f"the message does not name {missing}: {r['seen']}"


def test_the_issue_list_is_covered():
    """The issue's list, case by case: a renamed or dropped case fails here."""
    names = set(CASES)
    for role, field in REL.REQUIRED:
        assert f"missing:{field}" in names
    assert {f"missing:{f}" for f in ("kind", "role", "d_model", "tokens.injection_token_id",
                                     "extraction.injection_scale", "critic.extraction_layer_index",
                                     "prompt_templates.av", "prompt_templates.ar")} <= names
    assert "type:schema_version" in names and "type:d_model" in names
    assert {"drift:tokens.injection_token_id", "drift:tokens.injection_left_neighbor_id",
            "drift:tokens.injection_right_neighbor_id", "drift:tokens.critic_suffix_ids"} <= names
    assert {"vector:wrong_width", "vector:nan", "vector:inf", "vector:zero"} <= names
    assert {"doc:empty", "doc:short", "doc:long", "doc:utf8", "doc:control"} <= names
    assert {"value_head:missing", "value_head:shape", "weights:pickle_only", "remote_code:refused",
            "remote_code:opt_in", "explanation:too_long", "config:preset", "config:field", "config:pool"} <= names


def test_sidecar_drift_stops_a_job_with_one_line(world, load_job, tmp_path, capsys):
    """What the user sees from a job (not just the check): one line naming the sidecar and the field,
    exit 2, before any actor starts and before anything is written."""
    import yaml

    preset = world.preset
    pair = tmp_path / "pair"
    shutil.copytree(world.av.parent, pair, symlinks=False)
    side = pair / "av" / "nla_meta.yaml"
    data = yaml.safe_load(side.read_text(encoding="utf-8"))
    live = data["tokens"]["injection_right_neighbor_id"]
    data["tokens"]["injection_right_neighbor_id"] = live + 7
    side.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    out = tmp_path / "out"
    rc = load_job("reproduce_fve").JOB.entry(["--preset", str(preset), "--out", str(out), "--store",
                                             str(tmp_path / "store"), "--set", f"pair={pair / 'av'},{pair / 'ar'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith("error: ") and str(side) in err[-1], err
    assert "'tokens.injection_right_neighbor_id'" in err[-1] and f"expected {live + 7}, live {live}" in err[-1]
    assert not list((out / "rows").glob("part-*.parquet")) and not (out / "rows" / "LOCK").exists()


def test_invalid_text_fails_alone_at_the_driver(tmp_path):
    """A lone surrogate cannot cross into Arrow: the driver records that document as failed (named,
    counted) and hands the others to the pools."""
    from nla_ray.runtime import pipeline
    from nla_ray.runtime.rows import RowParts

    parts = RowParts(tmp_path / "rows")
    info = pipeline.RunInfo()
    keep = pipeline._refuse_bad_texts([{"doc_id": "ok", "text": "fine"}, {"doc_id": "bad", "text": "x\udcffy"}],
                                      parts, info, log=lambda m: None)
    assert [k["doc_id"] for k in keep] == ["ok"]
    assert info.rows_failed == 1 and info.docs_failed == ["bad"]
    assert "doc bad" in info.failures[0]["error"] and "not valid Unicode" in info.failures[0]["error"]
    failed = parts.read_failed()
    assert failed.column("doc_id").to_pylist() == ["bad"] and parts.read() is None
    json.dumps(info.__dict__)  # the summary can hold it
