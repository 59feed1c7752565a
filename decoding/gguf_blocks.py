"""A GGUF file's weights as stored: each tensor's raw quantised blocks, named by the HF parameter it becomes.

The native target re-lays these blocks once in tiles of output columns (``qblock_pack``) and reads them
with ``qblock_linear``; nothing is dequantised. transformers' own GGUF loader decides the names and the row
order: the same tensor processor reorders rows where llama.cpp's converter permuted them (Llama's query and
key rows for its rotary layout), applied here to whole rows of blocks, which keeps every block intact.
"""

from __future__ import annotations

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


def read_stored_tensors(path: Path, hf_model: Any) -> dict[str, StoredTensor]:
    """Every 1-D and 2-D tensor of the GGUF file at ``path``, keyed by the ``hf_model`` parameter it loads into."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
    )

    reader = gguf.GGUFReader(path)
    field = reader.fields["general.architecture"]
    architecture = bytes(field.parts[field.data[0]]).decode()
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=hf_model.config.to_dict())
    names = get_gguf_hf_weights_map(hf_model, processor)
    out = {}
    for tensor in reader.tensors:
        if tensor.name not in names or len(tensor.shape) > 2:
            continue
        # GGUF lists the fastest-varying dimension first; a 1-D tensor (a bias, a norm) is one row of values
        in_features, rows = (int(tensor.shape[0]), int(tensor.shape[1]) if len(tensor.shape) == 2 else 1)
        data = np.asarray(tensor.data).reshape(rows, -1)
        if rows > 1:  # llama.cpp's converter may have permuted the rows: the same reordering transformers applies
            data = data[processor.process(np.arange(rows)[:, None], tensor.name).weights.reshape(-1)]
        stored = torch.from_numpy(np.array(data))  # a copy: the file's mapping closes with the reader
        out[names[tensor.name]] = StoredTensor(int(tensor.tensor_type), tensor.tensor_type.name, stored, in_features)
    return out
