"""``POST /v1/completions``: the text completion object and its chunk stream (echo and logprobs included)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request

from decoding import TokenLogprob

from .engine_loop import GenerationRequest
from .protocol import CompletionRequest
from .serving import Choice, OpenAIServing, knn_ssd_object, now, sse, usage
from .streaming import stream_choices


class CompletionBuilder:
    """The response objects of one completion request (``n`` choices per prompt, prompts in order)."""

    def __init__(self, srv: OpenAIServing, body: CompletionRequest, request_id: str, prompts: list[list[int]]) -> None:
        self.srv, self.body, self.id = srv, body, request_id
        self.prompt_tokens = sum(len(p) for p in prompts)  # each prompt once, whatever n (as OpenAI and vLLM)
        self.echoes = [srv.tokenizer.decode(p) if body.echo else "" for p in prompts]
        self.base = {"id": request_id, "object": "text_completion", "created": now(), "model": srv.model_name}
        self.offsets = [0] * (len(prompts) * body.n)  # characters before each choice's next reported token

    def echo(self, index: int) -> str:
        """The prompt text choice ``index`` echoes ('' without ``echo``)."""
        return self.echoes[index // self.body.n]

    def logprobs(self, index: int, items: list[TokenLogprob]) -> dict[str, Any] | None:
        if self.body.logprobs is None:
            return None
        out = self.srv.logprob_format.completion(items, self.offsets[index])
        self.offsets[index] += sum(map(len, out["tokens"]))
        return out

    def complete(self, choices: list[Choice]) -> dict[str, Any]:
        return {**self.base, "choices": [{"index": c.index, "text": self.echo(c.index) + c.text,
                                          "logprobs": self.logprobs(c.index, c.logprobs),
                                          "finish_reason": c.finish_reason,
                                          **self.srv.provenance(self.body, c.provenance)} for c in choices],
                "usage": usage(choices, self.prompt_tokens), "knn_ssd": knn_ssd_object(choices, self.srv.target)}

    async def stream(self, gens: list[GenerationRequest], queue: asyncio.Queue, request: Request) -> AsyncIterator[str]:
        """An echo goes out first, or, with logprobs, in a choice's first chunk with its prompt's logprobs."""
        echo_later = [bool(self.echo(i)) and self.body.logprobs is not None for i in range(len(gens))]

        def chunk(index: int, text: str, finish: str | None, items: list[TokenLogprob]) -> dict[str, Any]:
            if echo_later[index]:
                text, echo_later[index] = self.echo(index) + text, False
            return {**self.base, "choices": [{"index": index, "text": text, "logprobs": self.logprobs(index, items),
                                              "finish_reason": finish}]}

        for i in range(len(gens)):
            if self.echo(i) and not echo_later[i]:
                yield sse(chunk(i, self.echo(i), None, []))
        async for data in stream_choices(self.srv, gens, queue, request, self.body, self.prompt_tokens, self.base,
                                         chunk):
            yield data
