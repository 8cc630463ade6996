"""The activation store: what extraction produced, kept once and reused by every job that asks.

A store entry is keyed by everything its vectors depend on: the base model (its files hashed), the
layers, the position rule (seed, positions per document, max_length) or the anchors it was aligned
to, and whether extraction ran on a GPU (bf16) or a CPU (fp32). Entries grow by document: asking for
documents the entry lacks extracts only those. Several layers come out of one forward pass, and the
model is loaded only up to the deepest layer asked for.

Root: `$NLA_RAY_STORE`, else `<nla_ray cache>/store` (the driver's disk; the driver writes it).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa

from nla_ray.runtime.rows import RowParts, completed_docs, final_table
from nla_ray.runtime.stages import StageSpec

STAMP = re.compile(r".*_(t0|t1|worker)$")


def default_root() -> Path:
    if os.environ.get("NLA_RAY_STORE"):
        return Path(os.environ["NLA_RAY_STORE"])
    from nla_ray.nla.sources import cache_root

    return cache_root() / "store"


@dataclass
class ActivationKey:
    """Everything a stored vector depends on."""

    base: str
    layers: list
    seed: int
    positions_per_doc: int
    max_length: int
    device: str                       # gpu (bf16 under "auto") or cpu (fp32)
    dtype: str = "auto"
    anchors: str | None = None        # digest of the anchor entry + tolerance, for aligned extraction
    model_files: dict = field(default_factory=dict)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True, default=str).encode()).hexdigest()


def key_for(spec: StageSpec) -> ActivationKey:
    from nla_ray.nla import sources
    from nla_ray.runtime.pipeline import dir_digest

    kw = spec.kwargs
    if kw.get("positions", "sample") != "sample":  # the key has no field for another position rule
        raise ValueError("the activation store keeps stage-0 extractions only; run an every-position "
                         "extraction through ctx.run")
    path = sources.resolve(kw["base"]).path
    files = {"sha256": dir_digest(path)}
    if kw.get("adapter"):  # a fine-tuned model's own stream: its adapter is part of the weights
        ad = Path(kw["adapter"])
        files["adapter"] = dir_digest(ad / "adapter" if (ad / "adapter").is_dir() else ad)
    return ActivationKey(base=kw["base"], layers=sorted(kw["layers"]), seed=kw["seed"],
                         positions_per_doc=kw["positions_per_doc"], max_length=kw["max_length"],
                         device="gpu" if spec.pool.num_gpus else "cpu", dtype=kw.get("dtype", "auto"),
                         model_files=files)


class ActivationStore:
    def __init__(self, root: str | Path | None = None, log=print):
        self.root = Path(root) if root else default_root()
        self.log = log
        self.last_run: dict | None = None  # RunInfo of the last extraction `ensure` ran (None: all stored)

    def entry(self, key: ActivationKey) -> RowParts:
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", key.base)[-60:]
        return RowParts(self.root / slug / key.digest()[:16])

    def missing(self, key: ActivationKey, doc_ids: list[str]) -> list[str]:
        done = completed_docs(self.entry(key).read(), per_position=len(key.layers))
        return [d for d in doc_ids if d not in done]

    def load(self, key: ActivationKey, doc_ids: list[str]) -> pa.Table:
        """The entry's rows for `doc_ids` (deduplicated, stable order), without timing stamps."""
        t = self.entry(key).read()
        if t is None:
            raise KeyError(f"no stored activations for {key.base} layers {key.layers}")
        t = final_table(t, docs=doc_ids)
        return t.drop_columns([c for c in t.column_names if STAMP.match(c)])

    def tee(self, key: ActivationKey, columns: list[str]):
        """A writer for the pipeline's `tee`: keeps the extraction columns of each finished batch
        (first sample of each row only), so a streaming round trip fills the store as it goes."""
        parts = self.entry(key)
        parts.check(json.loads(json.dumps(asdict(key), default=str)))

        def write(batch: dict) -> None:
            keep = batch["sample_idx"] == 0 if "sample_idx" in batch else slice(None)
            sub = {c: batch[c][keep] for c in columns if c in batch}
            if len(sub["doc_id"]):
                parts.write(sub)
        return write

    def ensure(self, spec: StageSpec, docs: list, *, address: str | None = None, anchors: dict | None = None,
               anchor_key: str | None = None, machine=None) -> tuple[ActivationKey, pa.Table]:
        """Rows of `spec`'s extraction for `docs`, extracting (through a Ray Data pool) only the
        documents the entry lacks. `anchors`: {doc_id: [[position, char_end], ...]} for aligned
        extraction, identified by `anchor_key`. `machine`: the machine the preset names (the pool's
        memory is checked against its cards)."""
        from nla_ray.runtime import pipeline

        key = key_for(spec)
        if anchors is not None:
            key.anchors = f"{anchor_key}|tol={spec.kwargs.get('align_tolerance')}"
        ids = [d.doc_id for d in docs]
        todo = set(self.missing(key, ids))
        if todo:
            self.log(f"[store] extracting {len(todo)}/{len(ids)} documents: {key.base} layers {key.layers} "
                     f"-> {self.entry(key).dir}")
            items = [{"doc_id": d.doc_id, "text": d.text, **({"anchors": json.dumps(anchors.get(d.doc_id, []))}
                                                              if anchors is not None else {})}
                     for d in docs if d.doc_id in todo]
            info = pipeline.run([spec], source=items, parts=self.entry(key),
                                fingerprint=json.loads(json.dumps(asdict(key), default=str)),
                                per_position=len(key.layers), address=address, log=self.log, lock=False,
                                machine=machine)
            # Kept for the job: documents whose extraction failed are counted there (not clean, exit 3).
            self.last_run = info.__dict__
        else:
            self.last_run = None
            self.log(f"[store] {len(ids)} documents of {key.base} layers {key.layers} already stored")
        return key, self.load(key, ids)


def with_sample_idx(table: pa.Table) -> pa.Table:
    if "sample_idx" in table.column_names:
        return table
    return table.append_column("sample_idx", pa.array([0] * table.num_rows, pa.int64()))


def prefixed(table: pa.Table, prefix: str, keep: tuple = ("doc_id", "sample_rank")) -> pa.Table:
    """Rename every column but the join keys with `prefix` (a second family's rows: `b_vector`...)."""
    return table.rename_columns([c if c in keep else f"{prefix}{c}" for c in table.column_names])

