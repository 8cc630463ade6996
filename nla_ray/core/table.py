"""Arrow <-> numpy for row tables: vectors as fixed-size lists of float32, text as strings.

A leaf: the Ray runtime writes row tables with it and the analyses read them with it, so neither
reaches into the other.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa


def to_arrow(batch: dict) -> pa.Table:
    """A numpy batch (Ray Data's "numpy" format) as an arrow table; 2-D columns become vectors."""
    cols = {}
    for k, v in batch.items():
        v = np.asarray(v)
        if v.ndim == 2:
            cols[k] = pa.FixedSizeListArray.from_arrays(pa.array(v.astype(np.float32).reshape(-1)), v.shape[1])
        elif v.dtype == object:
            cols[k] = pa.array([None if x is None else str(x) for x in v], type=pa.string())
        else:
            cols[k] = pa.array(v)
    return pa.table(cols)


def vectors(table: pa.Table, column: str) -> np.ndarray:
    """A vector column as an [n, d] float32 array."""
    if column not in table.column_names:
        raise KeyError(f"no vector column {column!r}; columns: {table.column_names}")
    col = table.column(column).combine_chunks()
    d = col.type.list_size
    return np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, d)


def column(table: pa.Table, name: str) -> np.ndarray:
    """A scalar column as numpy (strings as an object array)."""
    col = table.column(name)
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        return np.asarray(col.to_pylist(), dtype=object)
    return np.asarray(col.to_numpy())


def to_batch(table: pa.Table) -> dict:
    """An arrow table as a numpy batch (the inverse of `to_arrow`)."""
    out = {}
    for name in table.column_names:
        t = table.schema.field(name).type
        out[name] = vectors(table, name) if pa.types.is_fixed_size_list(t) else column(table, name)
    return out


def scored(table: pa.Table) -> pa.Table:
    """Rows with a real activation: short-document markers (position -1) and positions another
    tokenizer could not align (-2) removed."""
    return table.filter(pa.array(np.asarray(table.column("position").to_numpy()) >= 0))


def filter_rows(table: pa.Table, mask) -> pa.Table:
    return table.filter(pa.array(np.asarray(mask, dtype=bool)))


def write_json(path: Path, obj) -> None:
    """Atomic JSON write: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)


def write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def position_keys(table: pa.Table) -> list[tuple]:
    """(doc_id, position) per row: what identifies one activation across layers or models."""
    return list(zip(table.column("doc_id").to_pylist(), table.column("position").to_pylist()))
