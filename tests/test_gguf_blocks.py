"""``gguf_blocks.gguf_tensors``, the native target's reader of a GGUF file's tensor table, against gguf-py's
own ``GGUFReader``: the shipped default model, and a file written with every kind of metadata value."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf.quants import quantize

from decoding.gguf_blocks import gguf_tensors
from decoding.loading import default_gguf_path


def assert_same_table(path) -> dict:
    metadata, tensors = gguf_tensors(path)
    reader = gguf.GGUFReader(path)
    assert [t.name for t in tensors] == [t.name for t in reader.tensors]
    for ours, theirs in zip(tensors, reader.tensors):
        assert ours.dims == tuple(int(d) for d in theirs.shape), ours.name
        assert ours.type_id == int(theirs.tensor_type), ours.name
        assert np.array_equal(ours.data, np.asarray(theirs.data).view(np.uint8).reshape(-1)), ours.name
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or field.types[0] == gguf.GGUFValueType.ARRAY:
            continue
        assert metadata[key] == field.contents(), key
    return metadata


def test_reads_the_default_models_table_as_gguf_does():
    metadata = assert_same_table(default_gguf_path())
    assert metadata["general.architecture"] == "llama"


def test_reads_every_kind_of_metadata_value_and_an_alignment(tmp_path):
    path = tmp_path / "kinds.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_uint32("general.alignment", 64)
    writer.add_string("kinds.text", "héllo")
    writer.add_bool("kinds.flag", True)
    writer.add_float32("kinds.f32", 0.5)
    writer.add_float64("kinds.f64", -2.25)
    writer.add_int8("kinds.i8", -3)
    writer.add_uint16("kinds.u16", 65535)
    writer.add_int64("kinds.i64", -(1 << 40))
    writer.add_uint64("kinds.u64", 1 << 50)
    writer.add_array("kinds.strings", ["a", "", "long" * 50])
    writer.add_array("kinds.ints", [1, 2, 3])
    writer.add_array("kinds.nested", [[1, 2], [3]])
    writer.add_string("kinds.after", "still read")
    rng = np.random.default_rng(0)
    writer.add_tensor("norm.weight", rng.standard_normal(64).astype(np.float32))
    blocks = quantize(rng.standard_normal((4, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q4_0)
    writer.add_tensor("proj.weight", blocks, raw_dtype=gguf.GGMLQuantizationType.Q4_0)
    writer.add_tensor("half.weight", rng.standard_normal((3, 32)).astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    metadata = assert_same_table(path)
    assert metadata["kinds.after"] == "still read" and metadata["kinds.u64"] == 1 << 50
    assert metadata["kinds.strings"] is None  # arrays are skipped, not read


def test_rejects_a_file_that_is_not_gguf_or_of_an_unknown_version(tmp_path):
    path = tmp_path / "not.gguf"
    path.write_bytes(bytes(64))
    with pytest.raises(ValueError, match="not a GGUF file"):
        gguf_tensors(path)
    path.write_bytes(b"GGUF" + (1).to_bytes(4, "little") + bytes(56))
    with pytest.raises(ValueError, match="GGUF version 1 is not supported"):
        gguf_tensors(path)
