"""A faster GGUF metadata reader for the one-time dequantization of the packaged models.

`gguf.GGUFReader` walks every element of every metadata array through a numpy-memmap slice; the
Gemma-3 vocabulary holds 262k tokens, scores and types, so one parse costs 1-3 minutes on a small
CPU, and transformers parses the file several times (tokenizer, config, weights). On a 2-core CI
box that turned the first test into the whole time budget. This subclass reads arrays of scalars
in one slice and arrays of strings with a byte-level loop, and returns exactly the fields (same
parts, indices and types) the stock reader builds, which `tests/test_gguf_read.py` checks.
"""

from __future__ import annotations

import contextlib

import numpy as np


def _reader_class():
    import gguf
    from gguf import GGUFValueType

    class FastGGUFReader(gguf.GGUFReader):
        def _plain(self) -> np.ndarray:
            # A plain ndarray view of the same mapping: slicing it skips memmap's Python hooks.
            p = self.__dict__.get("_plain_view")
            if p is None:
                p = self._plain_view = self.data.view(np.ndarray)
            return p

        def _get(self, offset, dtype, count=1, override_order=None):
            dt = np.dtype(dtype)
            count = int(count)
            arr = self._plain()[offset:offset + dt.itemsize * count].view(dt)[:count]
            order = self.byte_order if override_order is None else override_order
            return arr.view(arr.dtype.newbyteorder(order))

        def _get_field_parts(self, orig_offs, raw_type):
            if GGUFValueType(raw_type) != GGUFValueType.ARRAY or self.byte_order != "I":
                return super()._get_field_parts(orig_offs, raw_type)
            raw_itype = self._get(orig_offs, np.uint32)
            alen = self._get(orig_offs + 4, np.uint64)
            n, sub = int(alen[0]), GGUFValueType(int(raw_itype[0]))
            offs = orig_offs + 12
            parts: list = [raw_itype, alen]
            plain = self._plain()
            if sub == GGUFValueType.STRING:
                view = memoryview(plain)
                idxs = []
                for _ in range(n):
                    slen = int.from_bytes(view[offs:offs + 8], "little")
                    parts.append(plain[offs:offs + 8].view(np.uint64))
                    parts.append(plain[offs + 8:offs + 8 + slen])
                    idxs.append(len(parts) - 1)
                    offs += 8 + slen
            elif sub in self.gguf_scalar_to_np:
                dt = np.dtype(self.gguf_scalar_to_np[sub])
                block = plain[offs:offs + dt.itemsize * n].view(dt)
                parts.extend(block.reshape(n, 1))   # one (1,)-shaped view per element, as upstream
                idxs = list(range(2, 2 + n))
                offs += dt.itemsize * n
            else:  # arrays of arrays: rare and small; the stock path handles them
                return super()._get_field_parts(orig_offs, raw_type)
            types = [GGUFValueType.ARRAY] + ([sub] if n else [])
            return offs - orig_offs, parts, idxs, types

    return FastGGUFReader


@contextlib.contextmanager
def fast_gguf_reader():
    """Within the block, `gguf.GGUFReader` (which transformers imports at call time) is the fast one."""
    import gguf

    original = gguf.GGUFReader
    gguf.GGUFReader = _reader_class()
    try:
        yield
    finally:
        gguf.GGUFReader = original
