"""``POST /v1/chat/completions``: the chat completion object and its chunk stream (tool calls included)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request

from decoding import TokenLogprob

from .engine_loop import GenerationRequest
from .protocol import ChatCompletionRequest
from .serving import Choice, OpenAIServing, knn_ssd_object, now, sse, usage
from .streaming import stream_choices
from .tools import ToolCallStream, parse_tool_calls


class ChatCompletionBuilder:
    """The response objects of one chat request (``n`` choices of one prompt)."""

    def __init__(self, srv: OpenAIServing, body: ChatCompletionRequest, request_id: str, prompt_tokens: int) -> None:
        self.srv, self.body, self.id = srv, body, request_id
        self.prompt_tokens = prompt_tokens  # once, whatever n
        self.base = {"id": request_id, "object": "chat.completion", "created": now(), "model": srv.model_name,
                     "system_fingerprint": None}

    def logprobs(self, items: list[TokenLogprob]) -> dict[str, Any] | None:
        return self.srv.logprob_format.chat(items) if self.body.logprobs else None

    def complete(self, choices: list[Choice]) -> dict[str, Any]:
        return {**self.base, "choices": [self.choice(c) for c in choices],
                "usage": usage(choices, self.prompt_tokens), "knn_ssd": knn_ssd_object(choices, self.srv.target)}

    def choice(self, choice: Choice) -> dict[str, Any]:
        """A finished choice; with tools, its text split into content and tool calls."""
        message: dict[str, Any] = {"role": "assistant", "content": choice.text}
        finish = choice.finish_reason
        if self.body.calls_tools():
            content, calls = parse_tool_calls(choice.text, self.body.tool_names())
            if calls:
                message = {"role": "assistant", "content": content, "tool_calls": [call.to_dict() for call in calls]}
                finish = "tool_calls"
        return {"index": choice.index, "message": message, "logprobs": self.logprobs(choice.logprobs),
                "finish_reason": finish, **self.srv.provenance(self.body, choice.provenance)}

    async def stream(self, gens: list[GenerationRequest], queue: asyncio.Queue, request: Request) -> AsyncIterator[str]:
        """OpenAI's chunks: each choice's role first, then content (and tool call) deltas."""
        body, base = self.body, {**self.base, "object": "chat.completion.chunk"}
        tool_streams = [ToolCallStream(body.tool_names()) for _ in gens] if body.calls_tools() else []

        def chunk(index: int, text: str, finish: str | None, items: list[TokenLogprob]) -> dict[str, Any]:
            calls: list[dict[str, Any]] = []
            if tool_streams:  # content up to a tool call, then the call's name and its arguments as written
                text, calls = tool_streams[index].feed(text)
                if finish is not None:
                    rest, more, called = tool_streams[index].finish()
                    text, calls, finish = text + rest, calls + more, "tool_calls" if called else finish
            delta: dict[str, Any] = {"content": text} if text else {}
            if calls:
                delta["tool_calls"] = calls
            return {**base, "choices": [{"index": index, "delta": delta,
                                         "logprobs": self.logprobs(items) if items else None, "finish_reason": finish}]}

        for i in range(len(gens)):
            role = {**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                         "finish_reason": None}]}
            yield sse({**role, "usage": None} if body.stream_options and body.stream_options.include_usage else role)
        async for data in stream_choices(self.srv, gens, queue, request, body, self.prompt_tokens, base, chunk):
            yield data
