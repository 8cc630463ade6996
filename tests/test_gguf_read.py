"""The fast GGUF reader builds exactly the fields the stock `gguf.GGUFReader` builds."""

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from nla_ray.nla.gguf_read import _reader_class, fast_gguf_reader  # noqa: E402


def _write(path):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_array("tokenizer.ggml.tokens", ["<pad>", "hello", "", "wörld", "▁the"] * 7)
    w.add_array("tokenizer.ggml.scores", [float(i) / 3 for i in range(35)])
    w.add_array("tokenizer.ggml.token_type", [1, 2, 3, 1, 1] * 7)
    w.add_array("empty.list", [])
    w.add_uint32("llama.block_count", 4)
    w.add_string("general.name", "tiny")
    w.add_tensor("blk.0.w", np.arange(12, dtype=np.float32).reshape(3, 4))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_fields_match_the_stock_reader(tmp_path):
    f = tmp_path / "tiny.gguf"
    _write(f)
    stock, fast = gguf.GGUFReader(str(f)), _reader_class()(str(f))
    assert list(stock.fields) == list(fast.fields)
    for name, a in stock.fields.items():
        b = fast.fields[name]
        assert (a.offset, a.data, a.types) == (b.offset, b.data, b.types), name
        assert len(a.parts) == len(b.parts), name
        for x, y in zip(a.parts, b.parts):
            assert (x.dtype, x.shape, bytes(x)) == (y.dtype, y.shape, bytes(y)), name
    assert fast.fields["tokenizer.ggml.tokens"].contents()[3] == "wörld"
    assert np.allclose(fast.fields["tokenizer.ggml.scores"].contents()[:3], [0, 1 / 3, 2 / 3])
    assert [t.name for t in stock.tensors] == [t.name for t in fast.tensors]
    assert np.array_equal(fast.tensors[0].data, stock.tensors[0].data)


def test_patch_is_scoped():
    original = gguf.GGUFReader
    with fast_gguf_reader():
        assert gguf.GGUFReader is not original and issubclass(gguf.GGUFReader, original)
    assert gguf.GGUFReader is original
