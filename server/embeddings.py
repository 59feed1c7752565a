"""``/v1/embeddings``: the prompt embedding the router routes by, for any client, in OpenAI's shape.

The embedding of a prompt is the mean of the target's final hidden states over its tokens (what
``SpeculativeEngine`` computes at the end of every prefill, whatever the chunking or the prefix cache),
scaled to unit length. Every input becomes one prefill-only sequence of the engine loop, so a list of
inputs is prefilled in packed batches like concurrent requests, and the prefix cache serves them too.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import torch
from fastapi import Request

from decoding import PLAIN, SamplingParams

from .engine_loop import RouteDecision
from .protocol import APIError, EmbeddingRequest
from .serving import OpenAIServing

EMBED_ONLY = SamplingParams(max_tokens=1, embed_only=True)
NO_ROUTE = RouteDecision(None, None, PLAIN)


async def embeddings(srv: OpenAIServing, body: EmbeddingRequest, request: Request, request_id: str) -> dict[str, Any]:
    """The response to an embeddings request: one unit vector per input, in input order."""
    srv.check_model(body.model)
    width = srv.loop.engine.runner.config.hidden_size
    if body.dimensions is not None and body.dimensions != width:
        raise APIError(400, f"dimensions must be {width} (this model's embedding width) or omitted: embeddings "
                            "are not truncated", "dimensions")
    inputs = srv.token_lists(body.input, "input")
    for ids in inputs:
        if len(ids) > srv.max_model_len:
            raise APIError(400, f"This model's maximum context length is {srv.max_model_len} tokens. However, an "
                                f"input has {len(ids)} tokens.", "input", "context_length_exceeded")
    gens, queue = srv.enqueue([(ids, EMBED_ONLY) for ids in inputs], lambda _: NO_ROUTE, request_id)
    vectors: list[torch.Tensor | None] = [None] * len(gens)
    try:
        async for index, event in srv.events(gens, queue, request):
            vectors[index] = event.embedding
    except APIError as exc:
        srv.metrics.request_done(exc.status, None)
        raise
    if any(v is None for v in vectors):
        srv.metrics.request_done(499, None)
        raise APIError(499, "client disconnected")
    srv.metrics.request_done(200, None)
    tokens = sum(len(ids) for ids in inputs)
    data = [{"object": "embedding", "index": i, "embedding": _encode(v, body.encoding_format)}
            for i, v in enumerate(vectors)]
    return {"object": "list", "data": data, "model": srv.model_name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def unit_vector(embedding: torch.Tensor) -> np.ndarray:
    """``embedding`` as float32 of length 1 (a zero vector stays zero)."""
    v = embedding.double()
    norm = float(v.norm())
    return (v / norm if norm > 0 else v).float().cpu().numpy()


def _encode(embedding: torch.Tensor, encoding_format: str) -> list[float] | str:
    """OpenAI's encodings: a list of floats, or base64 of the little-endian float32 array."""
    v = unit_vector(embedding)
    if encoding_format == "base64":
        return base64.b64encode(v.astype("<f4").tobytes()).decode("ascii")
    return v.tolist()
