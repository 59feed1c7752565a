"""A GGUF file's weights as stored: each tensor's raw quantised blocks, named by the HF parameter it becomes.

The native target re-lays these blocks once in tiles of output columns (``qblock_pack``) and reads them
with ``qblock_linear``; nothing is dequantised. transformers' own GGUF loader decides the names and the row
order: the same tensor processor reorders rows where llama.cpp's converter permuted them (Llama's query and
key rows for its rotary layout), applied here to whole rows of blocks, which keeps every block intact.

The file's table of tensors is read here (``gguf_tensors``), not with ``gguf.GGUFReader``: the reader builds
numpy views of every metadata value, the tokenizer's 151,936 tokens and merges included, which took 12 of
the 1.5B model's 28 s start (0.3 s here); the layout and the type tables are gguf's.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

# GGML types the native kernels compute on as stored (their ids, as GGUF stores them)
BLOCK_TYPES = {2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K"}


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of the file: its GGML type id and name, and its rows (uint8 blocks or float values)."""

    type_id: int
    type_name: str
    rows: torch.Tensor  # (N, row bytes) uint8 for block types; (N, K) float tensors as stored otherwise
    in_features: int

    @property
    def quantised(self) -> bool:
        return self.type_id in BLOCK_TYPES


@dataclass(frozen=True)
class FileTensor:
    """One entry of a GGUF file's tensor table: ``data`` is the file's bytes of it (mapped, not read)."""

    name: str
    dims: tuple[int, ...]  # as GGUF lists them: the fastest-varying dimension first
    type_id: int
    data: np.ndarray  # uint8


def gguf_tensors(path: Path) -> tuple[dict[str, Any], list[FileTensor]]:
    """The GGUF file's scalar and string metadata (arrays skipped) and its tensors, in file order."""
    import gguf

    scalars = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
    string, array = int(gguf.GGUFValueType.STRING), int(gguf.GGUFValueType.ARRAY)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as raw:
        buf = memoryview(raw)
        try:
            def take(fmt: str, at: int) -> tuple[Any, int]:
                return struct.unpack_from("<" + fmt, buf, at)[0], at + struct.calcsize(fmt)

            def text(at: int) -> tuple[str, int]:
                length, at = take("Q", at)
                return bytes(buf[at:at + length]).decode("utf-8"), at + length

            def value(kind: int, at: int) -> tuple[Any, int]:
                if kind == string:
                    return text(at)
                if kind != array:
                    return take(scalars[kind], at)
                item, at = take("I", at)
                count, at = take("Q", at)
                if item in scalars:  # a block of fixed-size values: skipped whole
                    return None, at + count * struct.calcsize(scalars[item])
                for _ in range(count):  # strings (a tokenizer's vocabulary) or nested arrays: one by one
                    at = take("Q", at)[0] + at + 8 if item == string else value(item, at)[1]
                return None, at

            magic, at = take("I", 0)
            if magic != gguf.GGUF_MAGIC:
                raise ValueError(f"{path} is not a GGUF file")
            version, at = take("I", at)
            if version not in (2, 3):  # 1 had 32-bit counts; a byte-swapped (big-endian) file reads as garbage
                raise ValueError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
            tensor_count, at = take("Q", at)
            kv_count, at = take("Q", at)
            metadata = {}
            for _ in range(kv_count):
                key, at = text(at)
                kind, at = take("I", at)
                metadata[key], at = value(kind, at)
            table = []
            for _ in range(tensor_count):
                name, at = text(at)
                n_dims, at = take("I", at)
                dims = struct.unpack_from(f"<{n_dims}Q", buf, at)
                at += 8 * n_dims
                type_id, at = take("I", at)
                offset, at = take("Q", at)
                table.append((name, dims, type_id, offset))
        finally:
            buf.release()
    alignment = metadata.get("general.alignment") or gguf.GGUF_DEFAULT_ALIGNMENT
    start = -(-at // alignment) * alignment
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    tensors = []
    for name, dims, type_id, offset in table:
        block, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(type_id)]
        size = int(np.prod(dims)) // block * block_bytes
        tensors.append(FileTensor(name, tuple(dims), type_id, mapped[start + offset:start + offset + size]))
    return metadata, tensors


# numpy types of the unquantised tensor types (ggml ids) read as values
_VALUE_TYPES = {0: np.float32, 1: np.float16, 24: np.int8, 25: np.int16, 26: np.int32, 27: np.int64, 28: np.float64}


def read_stored_tensors(path: Path, hf_model: Any) -> dict[str, StoredTensor]:
    """Every 1-D and 2-D tensor of the GGUF file at ``path``, keyed by the ``hf_model`` parameter it loads into."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    metadata, tensors = gguf_tensors(path)
    architecture = metadata["general.architecture"]
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=hf_model.config.to_dict())
    names = _hf_names(hf_model, processor)
    out = {}
    for tensor in tensors:
        if tensor.name not in names or len(tensor.dims) > 2:
            continue
        # GGUF lists the fastest-varying dimension first; a 1-D tensor (a bias, a norm) is one row of values
        in_features, rows = (tensor.dims[0], tensor.dims[1] if len(tensor.dims) == 2 else 1)
        value_type = _VALUE_TYPES.get(tensor.type_id)
        data = (tensor.data if value_type is None else tensor.data.view(value_type)).reshape(rows, -1)
        # a copy either way (the file's mapping closes with it); llama.cpp's converter may have permuted the
        # rows: the same reordering transformers applies
        data = data[processor.process(np.arange(rows)[:, None], tensor.name).weights.reshape(-1)] if rows > 1 \
            else np.array(data)
        stored = torch.from_numpy(data)
        type_name = gguf.GGMLQuantizationType(tensor.type_id).name
        out[names[tensor.name]] = StoredTensor(tensor.type_id, type_name, stored, in_features)
    return out


def read_tensors_outside_blocks(path: Path, hf_model: Any) -> dict[str, torch.Tensor]:
    """The GGUF file's tensors whose type is not in ``BLOCK_TYPES`` (norms, biases, float or other quantised
    weights), keyed by ``hf_model`` parameter name and taken as transformers' GGUF loader takes them: gguf's
    dequantisation (values as stored for float types), then the architecture's tensor processor."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    metadata, tensors = gguf_tensors(path)
    processor = TENSOR_PROCESSORS.get(metadata["general.architecture"], TensorProcessor)(
        config=hf_model.config.to_dict())
    names = _hf_names(hf_model, processor)
    out = {}
    for tensor in tensors:
        if tensor.type_id in BLOCK_TYPES or tensor.name not in names:
            continue
        rows = tensor.data.reshape(*reversed(tensor.dims[1:]), -1)  # (..., bytes of a row), as gguf reads it
        values = dequantize(rows, GGMLQuantizationType(tensor.type_id))
        values = processor.process(weights=values, name=tensor.name).weights
        out[names[tensor.name]] = torch.from_numpy(np.array(values))
    return out


def _hf_names(hf_model: Any, processor: Any) -> dict[str, str]:
    """GGUF tensor name -> ``hf_model`` parameter name, by transformers' map. Its map also walks every
    sub-module again (for checkpoints saved from a base model, e.g. Bloom's), rebuilding gguf's name table
    for each (6 s for the default model's 397 modules); the decoder families here name every parameter
    from the top, so the top-level pass is the whole map."""
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

    class TopLevel:  # the model without sub-modules to walk
        config = hf_model.config
        state_dict = hf_model.state_dict

        @staticmethod
        def named_children() -> list:
            return []

    return get_gguf_hf_weights_map(TopLevel, processor)
